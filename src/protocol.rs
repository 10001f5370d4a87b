//! The v1 wire contract: envelope types, validation, error and close codes.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// WebSocket close codes used by the gateway.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// Error codes carried in `error.data.code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Forbidden,
    RoomRequired,
    UnknownType,
    BadRequest,
    TooLarge,
    RateLimited,
    HistoryGap,
    Unavailable,
    LimitExceeded,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RoomRequired => "room_required",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::HistoryGap => "history_gap",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::LimitExceeded => "limit_exceeded",
        }
    }
}

/// Longest room name, in bytes.
pub const MAX_ROOM_LEN: usize = 200;

/// Longest room name once escaped for a Kafka topic (`rt.room.<escaped>.v1`, 249 bytes at most;
/// every byte but `[A-Za-z0-9-]` takes three). Checked for every broker, so that a room valid on
/// one backend is valid on all.
pub const MAX_ESCAPED_ROOM_LEN: usize = 249 - "rt.room.".len() - ".v1".len();

/// What a room name must be, for error messages.
pub const ROOM_RULE: &str = "room names are 1 to 200 bytes of [A-Za-z0-9:_.@-], at most 238 once \
     every byte but [A-Za-z0-9-] counts three";

/// A room name is 1 to 200 bytes of `[A-Za-z0-9:_.@-]` that fits a Kafka topic name.
/// A byte a room name may hold: `[A-Za-z0-9:_.@-]`.
pub fn room_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'.' | b'@' | b'-')
}

pub fn valid_room(name: &str) -> bool {
    let mut escaped = 0;
    for b in name.bytes() {
        escaped += match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' => 1,
            b':' | b'_' | b'.' | b'@' => 3,
            _ => return false,
        };
    }
    !name.is_empty() && name.len() <= MAX_ROOM_LEN && escaped <= MAX_ESCAPED_ROOM_LEN
}

/// Whether JSON text nests arrays and objects deeper than `max` (a top-level object is depth 1).
/// Runs over text serde already accepted as JSON, so only strings need care.
pub fn json_too_deep(json: &str, max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json.as_bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// A frame from a client, parsed without copying `data` or `ref`.
#[derive(Debug, Deserialize)]
pub struct ClientFrame<'a> {
    #[serde(rename = "type")]
    pub kind: Option<&'a str>,
    #[serde(default)]
    pub room: Option<String>,
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub since: Option<String>,
    #[serde(rename = "self", default)]
    pub echo_self: Option<bool>,
    #[serde(rename = "ref", borrow, default)]
    pub reference: Option<&'a RawValue>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// The request kinds a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Join,
    Leave,
    Message,
    Direct,
    Track,
    Untrack,
    Ping,
}

impl RequestKind {
    pub fn parse(kind: &str) -> Option<Self> {
        Some(match kind {
            "join" => RequestKind::Join,
            "leave" => RequestKind::Leave,
            "message" => RequestKind::Message,
            "direct" => RequestKind::Direct,
            "track" => RequestKind::Track,
            "untrack" => RequestKind::Untrack,
            "ping" => RequestKind::Ping,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Join => "join",
            RequestKind::Leave => "leave",
            RequestKind::Message => "message",
            RequestKind::Direct => "direct",
            RequestKind::Track => "track",
            RequestKind::Untrack => "untrack",
            RequestKind::Ping => "ping",
        }
    }
}

/// A frame from the server. Serialized once and shared by every local recipient.
#[derive(Debug, Serialize)]
pub struct ServerFrame<'a, D: Serialize + ?Sized> {
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub room: Option<&'a str>,
    pub data: &'a D,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a str>,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<&'a RawValue>,
}

impl<'a, D: Serialize + ?Sized> ServerFrame<'a, D> {
    pub fn new(kind: &'a str, room: Option<&'a str>, data: &'a D) -> Self {
        Self {
            kind,
            room,
            data,
            ts: None,
            sender_id: None,
            id: None,
            reference: None,
        }
    }

    pub fn to_json(&self) -> String {
        // Serializing plain structs, strings and raw JSON cannot fail.
        serde_json::to_string(self).expect("server frame serializes")
    }
}

#[derive(Debug, Serialize)]
pub struct ErrorData<'a> {
    pub code: &'static str,
    pub message: &'a str,
}

/// An `error` frame, replying to `reference` when the request had one.
pub fn error_frame(
    code: ErrorCode,
    message: &str,
    room: Option<&str>,
    reference: Option<&RawValue>,
) -> String {
    let data = ErrorData {
        code: code.as_str(),
        message,
    };
    ServerFrame {
        reference,
        ..ServerFrame::new("error", room, &data)
    }
    .to_json()
}

/// An `ack` frame carrying `data`.
pub fn ack_frame<D: Serialize + ?Sized>(
    room: Option<&str>,
    data: &D,
    reference: Option<&RawValue>,
) -> String {
    ServerFrame {
        reference,
        ..ServerFrame::new("ack", room, data)
    }
    .to_json()
}

/// The last millisecond of year 9999, the latest time RFC 3339 can write.
pub const MAX_TS_MS: u64 = 253_402_300_799_999;

/// RFC 3339 UTC timestamp with milliseconds, from Unix milliseconds. Times past year 9999
/// (which RFC 3339 cannot write) are written as its last millisecond.
pub fn format_ts(unix_ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms.min(MAX_TS_MS));
    humantime::format_rfc3339_millis(t).to_string()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether a raw JSON value is an object.
pub fn is_object(raw: &RawValue) -> bool {
    raw.get().trim_start().starts_with('{')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names() {
        assert!(valid_room("public:lobby"));
        assert!(valid_room("a.b@c-d_e:1"));
        assert!(valid_room(&"x".repeat(200)));
        assert!(!valid_room(&"x".repeat(201)));
        assert!(!valid_room(""));
        assert!(!valid_room("public:lob by"));
        assert!(!valid_room("room/1"));
        assert!(!valid_room("caf\u{e9}"));
        // 200 bytes, but 600 once escaped for Kafka.
        assert!(!valid_room(&":".repeat(200)));
        assert!(valid_room(&":".repeat(79)));
        assert!(!valid_room(&":".repeat(80)));
    }

    #[test]
    fn json_depth() {
        assert!(!json_too_deep(r#"{"a":{"b":[1,2]}}"#, 3));
        assert!(json_too_deep(r#"{"a":{"b":[1,2]}}"#, 2));
        assert!(
            !json_too_deep(r#"{"a":"[[[[{{{{"}"#, 1),
            "brackets inside strings"
        );
        assert!(!json_too_deep(r#"{"a":"\"[[[["}"#, 1), "escaped quote");
        assert!(
            !json_too_deep(r#"{"a":"\\","b":1}"#, 1),
            "escaped backslash"
        );
        let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        assert!(json_too_deep(&deep, 32));
    }

    #[test]
    fn client_frame_borrows_data_and_ref() {
        let text = r#"{"type":"message","room":"r","data":{"a":[1,2]},"ref":7,"extra":true}"#;
        let f: ClientFrame = serde_json::from_str(text).unwrap();
        assert_eq!(f.kind, Some("message"));
        assert_eq!(f.data.unwrap().get(), r#"{"a":[1,2]}"#);
        assert_eq!(f.reference.unwrap().get(), "7");
    }

    #[test]
    fn frames_serialize() {
        let r = RawValue::from_string("\"x\"".into()).unwrap();
        let e = error_frame(ErrorCode::BadRequest, "no", Some("r"), Some(&r));
        let v: serde_json::Value = serde_json::from_str(&e).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["ref"], "x");
        assert_eq!(v["data"]["code"], "bad_request");
        assert_eq!(format_ts(1_732_183_810_123), "2024-11-21T10:10:10.123Z");
    }

    #[test]
    fn timestamps_past_year_9999_are_clamped() {
        assert_eq!(format_ts(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ts(MAX_TS_MS), "9999-12-31T23:59:59.999Z");
        assert_eq!(format_ts(MAX_TS_MS + 1), "9999-12-31T23:59:59.999Z");
        assert_eq!(format_ts(u64::MAX), "9999-12-31T23:59:59.999Z");
    }
}
