//! What travels through a shared broker (Redis, Kafka): JSON shaped like the v1 envelope
//! (`type`, `room`, `data`, `ts`, `sender_id`, and `id` where the transport knows it), plus what
//! instances need: the publish time in milliseconds, the origin connection and, where the
//! transport has no headers, the W3C `traceparent`. Readable by any client of the broker.
//!
//! Whatever comes back from a broker is decoded here and only here, and checked field by field:
//! any writer of the broker may have sent it, so a bad payload is a [`DecodeError`].

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{
    Control, DirectKind, DirectMessage, MessageId, MessageKind, Origin, PresenceDiff,
    PresenceEntry, RoomEvent, RoomMessage, RoomName,
};
use crate::protocol::{MAX_TS_MS, format_ts, is_object, valid_room};

/// Longest user id, connection id, sender id or instance id read from a broker, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// Longest `traceparent` read from a broker, in bytes (version 00 takes 55).
pub const MAX_TRACEPARENT_LEN: usize = 256;

/// Why a broker payload was refused.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not the expected JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("`{field}` {problem}")]
    Field {
        field: &'static str,
        problem: &'static str,
    },
}

fn bad(field: &'static str, problem: &'static str) -> DecodeError {
    DecodeError::Field { field, problem }
}

/// A user, connection, sender or instance id: 1 to [`MAX_ID_LEN`] bytes.
fn check_id(field: &'static str, id: &str) -> Result<(), DecodeError> {
    match id.len() {
        0 => Err(bad(field, "is empty")),
        n if n > MAX_ID_LEN => Err(bad(field, "is too long")),
        _ => Ok(()),
    }
}

fn check_ts(ts_ms: u64) -> Result<(), DecodeError> {
    if ts_ms > MAX_TS_MS {
        return Err(bad("ts_ms", "is past year 9999"));
    }
    Ok(())
}

fn check_object(field: &'static str, raw: &RawValue) -> Result<(), DecodeError> {
    if !is_object(raw) {
        return Err(bad(field, "is not an object"));
    }
    Ok(())
}

/// Whether a W3C `traceparent` is plausible: 1 to [`MAX_TRACEPARENT_LEN`] bytes of visible ASCII.
pub fn valid_traceparent(tp: &str) -> bool {
    !tp.is_empty() && tp.len() <= MAX_TRACEPARENT_LEN && tp.bytes().all(|b| b.is_ascii_graphic())
}

fn check_traceparent(tp: Option<&str>) -> Result<(), DecodeError> {
    match tp {
        Some(tp) if !valid_traceparent(tp) => Err(bad("traceparent", "is not a trace context")),
        _ => Ok(()),
    }
}

/// A room message as stored (stream, topic) and carried live.
#[derive(Serialize, Deserialize)]
pub struct WireMessage<'a> {
    /// Only on Redis's live copy (the stream entry and the Kafka record have their own).
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Cow<'a, str>>,
    /// Only on Redis's live copy: the id of the entry stored before this one in the room's
    /// stream, so that a subscriber can tell it missed one.
    #[serde(borrow, default, skip_serializing)]
    pub prev: Option<Cow<'a, str>>,
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
    fn into_event(self, room: &RoomName, id: MessageId) -> RoomEvent {
        RoomEvent {
            id,
            prev: MessageId::ZERO,
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
                idempotency_key: None,
            },
        }
    }
}

/// The payload of a room message; the trace context goes in it unless the transport carries
/// it itself (Kafka headers).
pub fn encode_message(msg: &RoomMessage, with_traceparent: bool) -> String {
    serde_json::to_string(&WireMessage {
        id: None,
        prev: None,
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
    /// The id in the user's direct stream (Redis puts it on the live copy).
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Cow<'a, str>>,
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
        id: None,
        kind: Cow::Borrowed(match msg.kind {
            DirectKind::Message => "direct",
            DirectKind::Control => "control",
        }),
        to: Cow::Borrowed(&msg.to),
        data: &msg.data,
        sender_id: Cow::Borrowed(&msg.sender_id),
        ts: format_ts(msg.ts_ms),
        ts_ms: msg.ts_ms,
        traceparent: msg.traceparent.as_deref().map(Cow::Borrowed),
    })
    .expect("a direct message serializes")
}

/// A room message from its payload. `room` and `id` are the transport's when it has them (a
/// Kafka topic and position, a Redis stream entry's id); otherwise they are read from the
/// payload (Redis's live copy carries its `id`). The payload's own `room` must be valid either
/// way.
pub fn decode_message(
    payload: &[u8],
    room: Option<&RoomName>,
    id: Option<MessageId>,
) -> Result<RoomEvent, DecodeError> {
    decode_live_message(payload, room, id).map(|(event, _)| event)
}

/// [`decode_message`], also returning the `prev` id a live copy carries, if any.
pub fn decode_live_message(
    payload: &[u8],
    room: Option<&RoomName>,
    id: Option<MessageId>,
) -> Result<(RoomEvent, Option<MessageId>), DecodeError> {
    let w: WireMessage = serde_json::from_slice(payload)?;
    let prev = match w.prev.as_deref() {
        None => None,
        Some(p) => Some(
            p.parse::<MessageId>()
                .map_err(|_| bad("prev", "is not a message id"))?,
        ),
    };
    if !valid_room(&w.room) {
        return Err(bad("room", "is not a valid room name"));
    }
    check_object("data", w.data)?;
    check_ts(w.ts_ms)?;
    if let Some(sender) = &w.sender_id {
        check_id("sender_id", sender)?;
    }
    if let Some(instance) = &w.origin_instance {
        check_id("origin_instance", instance)?;
    }
    check_traceparent(w.traceparent.as_deref())?;
    let id = match id {
        Some(id) => id,
        None => {
            w.id.as_deref()
                .ok_or(bad("id", "is missing"))?
                .parse::<MessageId>()
                .map_err(|_| bad("id", "is not a message id"))?
        }
    };
    let room = match room {
        Some(room) => room.clone(),
        None => RoomName::from(&*w.room),
    };
    Ok((w.into_event(&room, id), prev))
}

/// A direct message from its payload.
pub fn decode_direct(payload: &[u8]) -> Result<DirectMessage, DecodeError> {
    decode_live_direct(payload).map(|(msg, _)| msg)
}

/// [`decode_direct`], also returning the stream id a live copy carries, if any.
pub fn decode_live_direct(
    payload: &[u8],
) -> Result<(DirectMessage, Option<MessageId>), DecodeError> {
    let w: WireDirect = serde_json::from_slice(payload)?;
    let id = match w.id.as_deref() {
        None => None,
        Some(id) => Some(id.parse().map_err(|_| bad("id", "is not a message id"))?),
    };
    let kind = match &*w.kind {
        "" | "direct" => DirectKind::Message,
        "control" => {
            if !serde_json::from_str::<Control>(w.data.get()).is_ok_and(|c| c.is_valid()) {
                return Err(bad("data", "is not a control command"));
            }
            DirectKind::Control
        }
        _ => return Err(bad("type", "is not `direct` or `control`")),
    };
    check_id("to", &w.to)?;
    check_id("sender_id", &w.sender_id)?;
    check_object("data", w.data)?;
    check_ts(w.ts_ms)?;
    check_traceparent(w.traceparent.as_deref())?;
    Ok((
        DirectMessage {
            kind,
            to: Arc::from(&*w.to),
            data: w.data.to_owned(),
            sender_id: Arc::from(&*w.sender_id),
            ts_ms: w.ts_ms,
            traceparent: w.traceparent.map(Cow::into_owned),
        },
        id,
    ))
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
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
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

impl WirePresence<'_> {
    fn into_entry(self) -> Result<PresenceEntry, DecodeError> {
        check_id("user_id", &self.user_id)?;
        check_id("conn_id", &self.conn_id)?;
        check_object("meta", self.meta)?;
        Ok(PresenceEntry {
            user_id: Arc::from(&*self.user_id),
            conn_id: Arc::from(&*self.conn_id),
            meta: Arc::from(self.meta.to_owned()),
        })
    }
}

/// One connection's presence as stored (a value of a room's presence hash).
pub fn decode_presence(payload: &[u8]) -> Result<PresenceEntry, DecodeError> {
    serde_json::from_slice::<WirePresence>(payload)?.into_entry()
}

/// A presence diff of `room` from its payload on the room's channel.
pub fn decode_presence_diff(payload: &[u8], room: &RoomName) -> Result<PresenceDiff, DecodeError> {
    let w: WirePresenceDiff = serde_json::from_slice(payload)?;
    if w.kind != "presence_diff" {
        return Err(bad("type", "is not `presence_diff`"));
    }
    let entries = |list: Vec<WirePresence>| {
        list.into_iter()
            .map(WirePresence::into_entry)
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(PresenceDiff {
        room: room.clone(),
        joins: entries(w.data.joins)?,
        leaves: entries(w.data.leaves)?,
    })
}

/// Records a broker payload that failed to decode and was skipped: counted in
/// `rtgate_broker_bad_payloads_total{broker}` and logged, at most once a second (a flood of bad
/// payloads must not become a flood of logs). Delivery goes on.
pub fn skip_bad_payload(broker: &'static str, what: &'static str, error: &dyn std::fmt::Display) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_LOG_S: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    crate::telemetry::metric::broker_bad_payload(broker);
    let now_s = crate::protocol::now_ms() / 1000;
    let last = LAST_LOG_S.load(Ordering::Relaxed);
    if now_s > last
        && LAST_LOG_S
            .compare_exchange(last, now_s, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let suppressed = SUPPRESSED.swap(0, Ordering::Relaxed);
        tracing::warn!(broker, what, %error, suppressed, "skipped an unreadable broker payload");
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
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
            idempotency_key: None,
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
            kind: DirectKind::Message,
            to: "bob".into(),
            data: RawValue::from_string(r#"{"to":"bob"}"#.into()).unwrap(),
            sender_id: "alice".into(),
            ts_ms: 5,
            traceparent: None,
        };
        let back = decode_direct(encode_direct(&msg).as_bytes()).unwrap();
        assert_eq!(&*back.to, "bob");
        assert_eq!(&*back.sender_id, "alice");
        assert_eq!(back.kind, DirectKind::Message);
        let control = DirectMessage {
            kind: DirectKind::Control,
            data: serde_json::value::to_raw_value(&Control::Unsubscribe {
                room: "public:x".into(),
            })
            .unwrap(),
            ..msg
        };
        let back = decode_direct(encode_direct(&control).as_bytes()).unwrap();
        assert_eq!(back.kind, DirectKind::Control);
        assert_eq!(
            back.data.get(),
            r#"{"action":"unsubscribe","room":"public:x"}"#
        );
    }

    fn message(ts_ms: u64) -> RoomMessage {
        RoomMessage {
            room: "public:lobby".into(),
            kind: MessageKind::Message,
            data: RawValue::from_string(r#"{"text":"hi"}"#.into()).unwrap(),
            sender_id: Some("alice".into()),
            ts_ms,
            origin: Some(Origin {
                instance: "i1".into(),
                session: 3,
            }),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            idempotency_key: None,
        }
    }

    /// The live copy Redis publishes: the stored JSON with the stream id in front.
    fn live_copy(id: &str, stored: &str) -> String {
        format!(r#"{{"id":"{id}",{}"#, &stored[1..])
    }

    fn field_error(e: DecodeError) -> &'static str {
        match e {
            DecodeError::Field { field, .. } => field,
            DecodeError::Json(e) => panic!("expected a field error, got {e}"),
        }
    }

    #[test]
    fn decodes_messages_with_or_without_the_transport_s_room_and_id() {
        let stored = encode_message(&message(1_732_183_810_123), true);
        let live = live_copy("1732183810123-4", &stored);
        let ev = decode_message(live.as_bytes(), None, None).unwrap();
        assert_eq!(ev.id, MessageId::new(1_732_183_810_123, 4));
        assert_eq!(&*ev.msg.room, "public:lobby");
        assert_eq!(ev.msg.ts_ms, 1_732_183_810_123);
        let room = RoomName::from("public:lobby");
        let ev =
            decode_message(stored.as_bytes(), Some(&room), Some(MessageId::new(0, 7))).unwrap();
        assert_eq!(ev.id, MessageId::new(0, 7));
        assert!(Arc::ptr_eq(&ev.msg.room, &room));
        // Without an id from the transport, the payload must carry one.
        let e = decode_message(stored.as_bytes(), Some(&room), None).unwrap_err();
        assert_eq!(field_error(e), "id");
        let e = decode_message(live_copy("7", &stored).as_bytes(), None, None).unwrap_err();
        assert_eq!(field_error(e), "id");
        let e = decode_message(
            live_copy("1-99999999999999999999", &stored).as_bytes(),
            None,
            None,
        )
        .unwrap_err();
        assert_eq!(field_error(e), "id");
    }

    #[test]
    fn timestamps_past_year_9999_are_errors() {
        let room = RoomName::from("public:lobby");
        let id = Some(MessageId::new(0, 1));
        let last = encode_message(&message(MAX_TS_MS), true);
        assert!(decode_message(last.as_bytes(), Some(&room), id).is_ok());
        let with_ts = |ts: &str| {
            last.replace(
                &format!(r#""ts_ms":{MAX_TS_MS}"#),
                &format!(r#""ts_ms":{ts}"#),
            )
        };
        for ts in [MAX_TS_MS + 1, 99_999_999_999_999_999, u64::MAX] {
            let json = with_ts(&ts.to_string());
            assert_ne!(json, last);
            let e = decode_message(json.as_bytes(), Some(&room), id).unwrap_err();
            assert_eq!(field_error(e), "ts_ms");
            let direct = format!(r#"{{"to":"bob","data":{{}},"sender_id":"a","ts_ms":{ts}}}"#);
            assert_eq!(
                field_error(decode_direct(direct.as_bytes()).unwrap_err()),
                "ts_ms"
            );
        }
        // Past u64, negative or not an integer: serde refuses it.
        for ts in ["18446744073709551616", "-1", "1e999999", "1.5"] {
            assert!(matches!(
                decode_message(with_ts(ts).as_bytes(), Some(&room), id),
                Err(DecodeError::Json(_))
            ));
        }
    }

    #[test]
    fn message_fields_are_checked() {
        let room = RoomName::from("public:lobby");
        let id = Some(MessageId::new(0, 1));
        let base = r#"{"type":"message","room":"public:lobby","data":{},"ts_ms":1"#;
        let check =
            |extra: &str| decode_message(format!("{base}{extra}}}").as_bytes(), Some(&room), id);
        assert!(check("").is_ok());
        let long = "x".repeat(MAX_ID_LEN + 1);
        for (extra, field) in [
            (r#","sender_id":"""#.to_string(), "sender_id"),
            (format!(r#","sender_id":"{long}""#), "sender_id"),
            (
                r#","origin_instance":"","origin_session":1"#.to_string(),
                "origin_instance",
            ),
            (
                format!(
                    r#","traceparent":"{}""#,
                    "0".repeat(MAX_TRACEPARENT_LEN + 1)
                ),
                "traceparent",
            ),
            (r#","traceparent":"00 x""#.to_string(), "traceparent"),
            (r#","traceparent":"""#.to_string(), "traceparent"),
        ] {
            assert_eq!(field_error(check(&extra).unwrap_err()), field, "{extra}");
        }
        assert!(check(&format!(r#","sender_id":"{}""#, "x".repeat(MAX_ID_LEN))).is_ok());
        for (json, field) in [
            (
                r#"{"type":"message","room":"bad room","data":{},"ts_ms":1}"#,
                "room",
            ),
            (
                r#"{"type":"message","room":"","data":{},"ts_ms":1}"#,
                "room",
            ),
            (
                r#"{"type":"message","room":"r","data":[],"ts_ms":1}"#,
                "data",
            ),
            (
                r#"{"type":"message","room":"r","data":"{}","ts_ms":1}"#,
                "data",
            ),
        ] {
            let e = decode_message(json.as_bytes(), Some(&room), id).unwrap_err();
            assert_eq!(field_error(e), field, "{json}");
        }
        for json in [
            r#"{"type":"shout","room":"r","data":{},"ts_ms":1}"#,
            r#"{"type":"message","room":"r","data":{},"ts_ms":"1"}"#,
            r#"{"type":"message","room":"r","data":{}}"#,
            r#"{"type":"message","room":"\ud800","data":{},"ts_ms":1}"#,
            "{}",
            "[]",
            "",
        ] {
            assert!(
                matches!(
                    decode_message(json.as_bytes(), Some(&room), id),
                    Err(DecodeError::Json(_))
                ),
                "{json}"
            );
        }
    }

    #[test]
    fn direct_fields_are_checked() {
        let ok = r#"{"type":"direct","to":"bob","data":{},"sender_id":"a","ts_ms":1}"#;
        assert!(decode_direct(ok.as_bytes()).is_ok());
        for (json, field) in [
            (
                r#"{"type":"room","to":"bob","data":{},"sender_id":"a","ts_ms":1}"#,
                "type",
            ),
            (r#"{"to":"","data":{},"sender_id":"a","ts_ms":1}"#, "to"),
            (
                r#"{"to":"bob","data":{},"sender_id":"","ts_ms":1}"#,
                "sender_id",
            ),
            (r#"{"to":"bob","data":1,"sender_id":"a","ts_ms":1}"#, "data"),
            (
                r#"{"type":"control","to":"b","data":{"action":"explode"},"sender_id":"a","ts_ms":1}"#,
                "data",
            ),
            (
                r#"{"type":"control","to":"b","data":{"action":"disconnect","code":1006,"reason":""},"sender_id":"a","ts_ms":1}"#,
                "data",
            ),
            (
                r#"{"to":"b","data":{},"sender_id":"a","ts_ms":1,"traceparent":"\u0000"}"#,
                "traceparent",
            ),
        ] {
            assert_eq!(
                field_error(decode_direct(json.as_bytes()).unwrap_err()),
                field,
                "{json}"
            );
        }
    }

    #[test]
    fn presence_is_checked() {
        let room = RoomName::from("public:lobby");
        let entry = r#"{"user_id":"7","conn_id":"c1","meta":{"session_id":"c1"}}"#;
        let e = decode_presence(entry.as_bytes()).unwrap();
        assert_eq!((&*e.user_id, &*e.conn_id), ("7", "c1"));
        // As the track script writes it.
        let diff =
            format!(r#"{{"type":"presence_diff","data":{{"joins":[{entry}],"leaves":[]}}}}"#);
        let d = decode_presence_diff(diff.as_bytes(), &room).unwrap();
        assert_eq!((d.joins.len(), d.leaves.len()), (1, 0));
        assert!(Arc::ptr_eq(&d.room, &room));
        let bad_entry = r#"{"user_id":"","conn_id":"c1","meta":{}}"#;
        assert_eq!(
            field_error(decode_presence(bad_entry.as_bytes()).unwrap_err()),
            "user_id"
        );
        let no_meta = r#"{"user_id":"7","conn_id":"c1","meta":null}"#;
        assert_eq!(
            field_error(decode_presence(no_meta.as_bytes()).unwrap_err()),
            "meta"
        );
        let diff = format!(
            r#"{{"type":"presence_diff","data":{{"joins":[],"leaves":[{entry},{bad_entry}]}}}}"#
        );
        let e = decode_presence_diff(diff.as_bytes(), &room).unwrap_err();
        assert_eq!(field_error(e), "user_id");
        let other = r#"{"type":"message","data":{"joins":[],"leaves":[]}}"#;
        assert_eq!(
            field_error(decode_presence_diff(other.as_bytes(), &room).unwrap_err()),
            "type"
        );
    }
}
