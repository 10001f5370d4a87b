//! What travels through a shared broker (Redis, Kafka): JSON shaped like the v1 envelope
//! (`type`, `room`, `data`, `ts`, `sender_id`, and `id` where the transport knows it), plus what
//! instances need: the publish time in milliseconds, the origin connection and, where the
//! transport has no headers, the W3C `traceparent`. Readable by any client of the broker.

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{
    DirectMessage, MessageId, MessageKind, Origin, PresenceEntry, RoomEvent, RoomMessage, RoomName,
};
use crate::protocol::format_ts;

/// A room message as stored (stream, topic) and carried live.
#[derive(Serialize, Deserialize)]
pub struct WireMessage<'a> {
    /// Only on Redis's live copy (the stream entry and the Kafka record have their own).
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Cow<'a, str>>,
    #[serde(rename = "type")]
    pub kind: MessageKind,
    #[serde(borrow)]
    pub room: Cow<'a, str>,
    #[serde(borrow)]
    pub data: &'a RawValue,
    /// RFC 3339, as clients see it; instances read `ts_ms`.
    #[serde(default, skip_deserializing, skip_serializing_if = "String::is_empty")]
    pub ts: String,
    pub ts_ms: u64,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub sender_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub origin_instance: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_session: Option<u64>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<Cow<'a, str>>,
}

impl WireMessage<'_> {
    pub fn into_event(self, room: &RoomName, id: MessageId) -> RoomEvent {
        RoomEvent {
            id,
            msg: RoomMessage {
                room: room.clone(),
                kind: self.kind,
                data: self.data.to_owned(),
                sender_id: self.sender_id.map(|s| Arc::from(&*s)),
                ts_ms: self.ts_ms,
                origin: match (self.origin_instance, self.origin_session) {
                    (Some(instance), Some(session)) => Some(Origin {
                        instance: Arc::from(&*instance),
                        session,
                    }),
                    _ => None,
                },
                traceparent: self.traceparent.map(Cow::into_owned),
            },
        }
    }
}

/// The payload of a room message; the trace context goes in it unless the transport carries
/// it itself (Kafka headers).
pub fn encode_message(msg: &RoomMessage, with_traceparent: bool) -> String {
    serde_json::to_string(&WireMessage {
        id: None,
        kind: msg.kind,
        room: Cow::Borrowed(&msg.room),
        data: &msg.data,
        ts: format_ts(msg.ts_ms),
        ts_ms: msg.ts_ms,
        sender_id: msg.sender_id.as_deref().map(Cow::Borrowed),
        origin_instance: msg.origin.as_ref().map(|o| Cow::Borrowed(&*o.instance)),
        origin_session: msg.origin.as_ref().map(|o| o.session),
        traceparent: msg
            .traceparent
            .as_deref()
            .filter(|_| with_traceparent)
            .map(Cow::Borrowed),
    })
    .expect("a room message serializes")
}

#[derive(Serialize, Deserialize)]
pub struct WireDirect<'a> {
    #[serde(rename = "type", default)]
    pub kind: Cow<'a, str>,
    #[serde(borrow)]
    pub to: Cow<'a, str>,
    #[serde(borrow)]
    pub data: &'a RawValue,
    #[serde(borrow)]
    pub sender_id: Cow<'a, str>,
    #[serde(default, skip_deserializing, skip_serializing_if = "String::is_empty")]
    pub ts: String,
    pub ts_ms: u64,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<Cow<'a, str>>,
}

pub fn encode_direct(msg: &DirectMessage) -> String {
    serde_json::to_string(&WireDirect {
        kind: Cow::Borrowed("direct"),
        to: Cow::Borrowed(&msg.to),
        data: &msg.data,
        sender_id: Cow::Borrowed(&msg.sender_id),
        ts: format_ts(msg.ts_ms),
        ts_ms: msg.ts_ms,
        traceparent: msg.traceparent.as_deref().map(Cow::Borrowed),
    })
    .expect("a direct message serializes")
}

/// A direct message from its payload.
pub fn decode_direct(payload: &[u8]) -> Result<DirectMessage, serde_json::Error> {
    let w: WireDirect = serde_json::from_slice(payload)?;
    Ok(DirectMessage {
        to: Arc::from(&*w.to),
        data: w.data.to_owned(),
        sender_id: Arc::from(&*w.sender_id),
        ts_ms: w.ts_ms,
        traceparent: w.traceparent.map(Cow::into_owned),
    })
}

/// One connection's presence as stored (Redis hash) and carried in diffs.
#[derive(Serialize, Deserialize)]
pub struct WirePresence<'a> {
    #[serde(borrow)]
    pub user_id: Cow<'a, str>,
    #[serde(borrow)]
    pub conn_id: Cow<'a, str>,
    #[serde(borrow)]
    pub meta: &'a RawValue,
}

/// `{"type":"presence_diff","data":{"joins":[...],"leaves":[...]}}` on a room's channel.
#[derive(Deserialize)]
pub struct WirePresenceDiff<'a> {
    #[serde(borrow)]
    pub data: WirePresenceChanges<'a>,
}

#[derive(Deserialize)]
pub struct WirePresenceChanges<'a> {
    #[serde(borrow)]
    pub joins: Vec<WirePresence<'a>>,
    #[serde(borrow)]
    pub leaves: Vec<WirePresence<'a>>,
}

impl From<WirePresence<'_>> for PresenceEntry {
    fn from(w: WirePresence<'_>) -> Self {
        PresenceEntry {
            user_id: Arc::from(&*w.user_id),
            conn_id: Arc::from(&*w.conn_id),
            meta: Arc::from(w.meta.to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_read_like_the_envelope() {
        let msg = RoomMessage {
            room: "public:lobby".into(),
            kind: MessageKind::System,
            data: RawValue::from_string(r#"{"a":1}"#.into()).unwrap(),
            sender_id: Some("u\"1".into()),
            ts_ms: 1_732_183_810_123,
            origin: Some(Origin {
                instance: "i1".into(),
                session: 9,
            }),
            traceparent: Some("00-x".into()),
        };
        let json = encode_message(&msg, true);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["type"], "system");
        assert_eq!(v["room"], "public:lobby");
        assert_eq!(v["ts"], "2024-11-21T10:10:10.123Z");
        assert_eq!(v["sender_id"], "u\"1");
        assert_eq!(v["traceparent"], "00-x");
        let back: WireMessage = serde_json::from_str(&json).unwrap();
        let ev = back.into_event(&RoomName::from("public:lobby"), MessageId::new(1, 2));
        assert_eq!(ev.msg.data.get(), r#"{"a":1}"#);
        assert_eq!(ev.msg.sender_id.as_deref(), Some("u\"1"));
        assert_eq!(ev.msg.origin.as_ref().unwrap().session, 9);
        assert!(!encode_message(&ev.msg, false).contains("traceparent"));
    }

    #[test]
    fn directs_round_trip() {
        let msg = DirectMessage {
            to: "bob".into(),
            data: RawValue::from_string(r#"{"to":"bob"}"#.into()).unwrap(),
            sender_id: "alice".into(),
            ts_ms: 5,
            traceparent: None,
        };
        let back = decode_direct(encode_direct(&msg).as_bytes()).unwrap();
        assert_eq!(&*back.to, "bob");
        assert_eq!(&*back.sender_id, "alice");
    }
}
