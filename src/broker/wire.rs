//! What travels through a shared broker (Redis, Kafka): compact JSON payloads. The room is
//! not in the payload: it is the channel, stream or topic.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{
    DirectMessage, MessageId, MessageKind, Origin, PresenceEntry, RoomEvent, RoomMessage, RoomName,
};

/// The payload of a room message; the trace context goes in it unless the transport carries
/// it itself (Kafka headers).
pub fn encode_message(msg: &RoomMessage, with_traceparent: bool) -> String {
    serde_json::to_string(&WireMessage {
        k: msg.kind,
        d: &msg.data,
        s: msg.sender_id.as_deref(),
        t: msg.ts_ms,
        oi: msg.origin.as_ref().map(|o| &*o.instance),
        os: msg.origin.as_ref().map(|o| o.session),
        tp: if with_traceparent {
            msg.traceparent.as_deref()
        } else {
            None
        },
    })
    .expect("a room message serializes")
}

pub fn encode_direct(msg: &DirectMessage) -> String {
    serde_json::to_string(&WireDirect {
        to: &msg.to,
        d: &msg.data,
        s: &msg.sender_id,
        t: msg.ts_ms,
        tp: msg.traceparent.as_deref(),
    })
    .expect("a direct message serializes")
}

/// A direct message from its payload.
pub fn decode_direct(payload: &[u8]) -> Result<DirectMessage, serde_json::Error> {
    let w: WireDirect = serde_json::from_slice(payload)?;
    Ok(DirectMessage {
        to: w.to.into(),
        data: w.d.to_owned(),
        sender_id: w.s.into(),
        ts_ms: w.t,
        traceparent: w.tp.map(str::to_string),
    })
}

/// A room message as stored (stream, topic) and carried live.
#[derive(Serialize, Deserialize)]
pub struct WireMessage<'a> {
    pub k: MessageKind,
    #[serde(borrow)]
    pub d: &'a RawValue,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s: Option<&'a str>,
    pub t: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oi: Option<&'a str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tp: Option<&'a str>,
}

impl WireMessage<'_> {
    pub fn into_event(self, room: &RoomName, id: MessageId) -> RoomEvent {
        RoomEvent {
            id,
            msg: RoomMessage {
                room: room.clone(),
                kind: self.k,
                data: self.d.to_owned(),
                sender_id: self.s.map(Arc::from),
                ts_ms: self.t,
                origin: match (self.oi, self.os) {
                    (Some(instance), Some(session)) => Some(Origin {
                        instance: instance.into(),
                        session,
                    }),
                    _ => None,
                },
                traceparent: self.tp.map(str::to_string),
            },
        }
    }
}

#[derive(Serialize, Deserialize)]
pub struct WireDirect<'a> {
    pub to: &'a str,
    #[serde(borrow)]
    pub d: &'a RawValue,
    pub s: &'a str,
    pub t: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tp: Option<&'a str>,
}

/// One connection's presence as stored in the room's hash and carried in diffs.
#[derive(Serialize, Deserialize)]
pub struct WirePresence<'a> {
    pub u: &'a str,
    pub c: &'a str,
    #[serde(borrow)]
    pub m: &'a RawValue,
}

#[derive(Deserialize)]
pub struct WirePresenceDiff<'a> {
    #[serde(borrow)]
    pub joins: Vec<WirePresence<'a>>,
    #[serde(borrow)]
    pub leaves: Vec<WirePresence<'a>>,
}

impl From<WirePresence<'_>> for PresenceEntry {
    fn from(w: WirePresence<'_>) -> Self {
        PresenceEntry {
            user_id: w.u.into(),
            conn_id: w.c.into(),
            meta: Arc::from(w.m.to_owned()),
        }
    }
}
