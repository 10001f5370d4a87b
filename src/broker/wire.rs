//! What travels through a shared broker (Redis, Kafka): compact JSON payloads. The room is
//! not in the payload: it is the channel, stream or topic.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{MessageId, MessageKind, Origin, PresenceEntry, RoomEvent, RoomMessage, RoomName};

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
