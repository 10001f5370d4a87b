//! Fuzzing on stable Rust: no panic may be reachable from what a client, a token or a broker
//! sends. Each target runs every file of `tests/fuzz_corpus/<target>/`, then inputs mutated
//! from that corpus or generated, from a fixed seed, each call under `catch_unwind`. The first
//! panic fails the test with the seed, the iteration and the input (also written to
//! `CARGO_TARGET_TMPDIR/fuzz-failures/`, ready to add to the corpus).
//!
//! `FUZZ_SEED=<u64>` and `FUZZ_ITERS=<n per target>` override the defaults, e.g. for a long run;
//! `FUZZ_WRITE_CORPUS=1 cargo test --test fuzz corpus` rewrites the generated corpus files.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use serde_json::value::RawValue;

use rtgate::auth::Authenticator;
use rtgate::broker::wire::{self, DecodeError};
use rtgate::broker::{
    DirectMessage, MessageId, MessageKind, Origin, RoomEvent, RoomMessage, RoomName,
};
use rtgate::protocol::{
    self, ClientFrame, ErrorCode, MAX_TS_MS, RequestKind, ServerFrame, format_ts,
};

const SEED: u64 = 0x7274_6761_7465_0001;
/// Generated inputs per target; the whole crate stays well under 20 s in a debug build.
const ITERS: usize = 40_000;
/// Mutated inputs are cut at this size, so that a run stays fast.
const MAX_INPUT: usize = 256 * 1024;

const SECRET: &[u8] = b"fuzz-secret-fuzz-secret-fuzz-sec";
const ROOM: &str = "public:lobby";

// ---- the targets -------------------------------------------------------------------------------

thread_local! {
    /// Inputs the current thread's target accepted (parsed, decoded, verified): the share of
    /// inputs that get past the parsers to the checks.
    static ACCEPTED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn accepted() {
    ACCEPTED.with(|n| n.set(n.get() + 1));
}

/// What the gateway does with a client's text frame before any broker call (see
/// `gateway/session.rs`), including the error and ack frames it builds from the input.
fn client_frame(input: &[u8]) {
    // WebSocket text frames are UTF-8; other bytes are still worth a try once made UTF-8.
    let text = String::from_utf8_lossy(input);
    let frame: ClientFrame = match serde_json::from_str(&text) {
        Ok(f) => f,
        Err(e) => {
            let _ = e.is_data();
            protocol::error_frame(
                ErrorCode::BadRequest,
                &format!("bad envelope: {e}"),
                None,
                None,
            );
            return;
        }
    };
    accepted();
    let room = frame.room.as_deref();
    if let Some(kind) = frame.kind
        && RequestKind::parse(kind).is_none()
    {
        protocol::error_frame(
            ErrorCode::UnknownType,
            &format!("unknown type `{kind}`"),
            room,
            frame.reference,
        );
    }
    if let Some(room) = room
        && !protocol::valid_room(room)
    {
        protocol::error_frame(ErrorCode::BadRequest, protocol::ROOM_RULE, None, None);
    }
    if let Some(data) = frame.data {
        protocol::json_too_deep(data.get(), 32);
        if protocol::is_object(data) {
            // `track` reads the meta object; `direct` reads `data.to`.
            let _ = serde_json::from_str::<Value>(data.get());
            let _ = serde_json::from_str::<BTreeMap<Cow<str>, &RawValue>>(data.get());
        }
    }
    if let (None, Some(text)) = (frame.data, &frame.text) {
        serde_json::value::to_raw_value(&serde_json::json!({ "text": text }))
            .expect("a text shorthand serializes");
    }
    if let Some(since) = frame.since.as_deref()
        && let Ok(id) = since.parse::<MessageId>()
    {
        assert_eq!(id.to_string().parse::<MessageId>().ok(), Some(id));
    }
    let reply = RawValue::from_string(r#"{"id":"1-2"}"#.into()).expect("JSON");
    protocol::ack_frame(room, &*reply, frame.reference);
}

/// A secret of 32 bytes, no API keys, no leeway.
fn authenticator() -> Authenticator {
    Authenticator::new(SECRET, vec![], Duration::ZERO)
}

/// Runs the (async) token check to completion; with only an HS256 secret it never waits.
fn verify_now(
    auth: &Authenticator,
    token: &str,
) -> Result<rtgate::auth::Identity, rtgate::auth::AuthError> {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime");
    }
    RUNTIME.with(|rt| rt.block_on(auth.verify(Some(token))))
}

/// The token check of the WebSocket upgrade; the one place to adapt if `Authenticator` changes.
fn verify_token(auth: &Authenticator, token: &str) {
    if let Ok(id) = verify_now(auth, token) {
        accepted();
        assert!(!id.user_id.is_empty(), "an identity without a user id");
    }
}

fn token(input: &[u8]) {
    thread_local! {
        static AUTH: Authenticator = authenticator();
    }
    let token = String::from_utf8_lossy(input);
    AUTH.with(|auth| verify_token(auth, &token));
}

/// A decoded room message, as the gateway sends it and as a broker would carry it again.
fn check_event(event: &RoomEvent) {
    accepted();
    rtgate::gateway::room_event_frame(event);
    let again = wire::encode_message(&event.msg, true);
    let room = event.msg.room.clone();
    if let Err(e) = wire::decode_message(again.as_bytes(), Some(&room), Some(event.id)) {
        panic!("a decoded message does not decode once encoded again: {e}\n{again}");
    }
}

/// Room messages: Redis's live copy (room and id in the payload) and a stored copy (room and
/// id from the transport, as a Redis stream entry or a Kafka record).
fn message(input: &[u8]) {
    if let Ok(event) = wire::decode_message(input, None, None) {
        check_event(&event);
    }
    let room = RoomName::from(ROOM);
    if let Ok(event) = wire::decode_message(input, Some(&room), Some(MessageId::new(0, 42))) {
        check_event(&event);
    }
}

fn direct(input: &[u8]) {
    let Ok(msg) = wire::decode_direct(input) else {
        return;
    };
    accepted();
    let ts = format_ts(msg.ts_ms);
    ServerFrame {
        ts: Some(&ts),
        sender_id: Some(&msg.sender_id),
        ..ServerFrame::new("direct", None, &*msg.data)
    }
    .to_json();
    let again = wire::encode_direct(&msg);
    if let Err(e) = wire::decode_direct(again.as_bytes()) {
        panic!("a decoded direct message does not decode once encoded again: {e}\n{again}");
    }
}

/// Presence entries (a Redis hash value) and presence diffs (on a room's channel).
fn presence(input: &[u8]) {
    let room = RoomName::from(ROOM);
    let mut entries = Vec::new();
    if let Ok(entry) = wire::decode_presence(input) {
        entries.push(entry);
    }
    if let Ok(diff) = wire::decode_presence_diff(input, &room) {
        entries.extend(diff.joins);
        entries.extend(diff.leaves);
    }
    for e in entries {
        accepted();
        // What the gateway does to build `presence_state` and `presence_diff` frames.
        let meta: Value = serde_json::from_str(e.meta.get()).unwrap_or(Value::Null);
        serde_json::to_string(&serde_json::json!({ &*e.user_id: [meta] })).expect("serializes");
    }
}

fn message_id(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    if let Ok(id) = text.parse::<MessageId>() {
        accepted();
        assert_eq!(id.to_string().parse::<MessageId>().ok(), Some(id));
    }
}

/// Any u64, read as decimal text when it is one, else from up to 8 bytes.
fn format_ts_target(input: &[u8]) {
    let ms = std::str::from_utf8(input)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            let mut b = [0u8; 8];
            let n = input.len().min(8);
            b[..n].copy_from_slice(&input[..n]);
            u64::from_le_bytes(b)
        });
    accepted();
    let ts = format_ts(ms);
    assert_eq!(ts.len(), "9999-12-31T23:59:59.999Z".len(), "{ts}");
    let back = humantime::parse_rfc3339(&ts).expect("format_ts writes RFC 3339");
    let back_ms = back
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis() as u64;
    assert_eq!(back_ms, ms.min(MAX_TS_MS), "{ts}");
}

// ---- the corpus ---------------------------------------------------------------------------------

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_corpus")
        .join(target)
}

fn read_corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("corpus entry").path();
            let bytes = std::fs::read(&path).expect("corpus file");
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, bytes)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    files
}

fn nested(levels: usize, open: &str, inner: &str, close: &str) -> String {
    format!("{}{inner}{}", open.repeat(levels), close.repeat(levels))
}

fn sign(header: &[u8], claims: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let signed = format!("{}.{}", b64.encode(header), b64.encode(claims));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET);
    let tag = ring::hmac::sign(&key, signed.as_bytes());
    format!("{signed}.{}", b64.encode(tag.as_ref()))
}

const HS256: &[u8] = br#"{"alg":"HS256","typ":"JWT"}"#;

fn example_message(sender: bool, traceparent: bool) -> RoomMessage {
    RoomMessage {
        room: ROOM.into(),
        kind: if sender {
            MessageKind::Message
        } else {
            MessageKind::System
        },
        data: RawValue::from_string(r#"{"text":"hi","n":[1,2.5,null]}"#.into()).unwrap(),
        sender_id: sender.then(|| Arc::from("alice")),
        ts_ms: 1_732_183_810_123,
        origin: sender.then(|| Origin {
            instance: "i-1".into(),
            session: 7,
        }),
        traceparent: traceparent
            .then(|| "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        idempotency_key: None,
    }
}

/// The live copy Redis publishes: the stored JSON with the stream id in front.
fn live_copy(id: &str, stored: &str) -> String {
    format!(r#"{{"id":"{id}",{}"#, &stored[1..])
}

/// The corpus files made by code (every valid example comes from the encoders); the corpus
/// directories may hold more (hand-written or found) files.
fn generated_corpus() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut c: Vec<(&str, &str, Vec<u8>)> = Vec::new();
    let mut add =
        |t: &'static str, name: &'static str, bytes: &[u8]| c.push((t, name, bytes.to_vec()));

    // Client frames.
    for (name, text) in [
        (
            "valid_join.json",
            r#"{"type":"join","room":"public:lobby","since":"1732183810123-0","self":false,"ref":1}"#,
        ),
        (
            "valid_message.json",
            r#"{"type":"message","room":"public:lobby","data":{"text":"hi"},"ref":"a"}"#,
        ),
        (
            "valid_text.json",
            r#"{"type":"message","room":"public:lobby","text":"hi"}"#,
        ),
        (
            "valid_direct.json",
            r#"{"type":"direct","data":{"to":"bob","text":"hi"},"ref":[1,{"x":null}]}"#,
        ),
        (
            "valid_track.json",
            r#"{"type":"track","room":"public:lobby","data":{"status":"away"}}"#,
        ),
        ("valid_ping.json", r#"{"type":"ping"}"#),
        ("empty_object.json", "{}"),
        (
            "wrong_types.json",
            r#"{"type":1,"room":["r"],"data":"x","text":{},"since":5,"self":"yes","ref":{}}"#,
        ),
        (
            "huge_numbers.json",
            r#"{"type":"join","room":"r","since":1e999999,"ref":18446744073709551616,"data":{"n":-0,"m":1e-999999}}"#,
        ),
        (
            "since_overflow.json",
            r#"{"type":"join","room":"r","since":"18446744073709551616-99999999999999999999"}"#,
        ),
        (
            "lone_surrogates.json",
            r#"{"type":"\ud800","room":"\udfff","data":{"\ud800":"\udc00\ud800"}}"#,
        ),
        (
            "duplicate_keys.json",
            r#"{"type":"join","type":"leave","room":"a","room":"b","data":{"a":1,"a":2}}"#,
        ),
        (
            "nul.json",
            "{\"type\":\"join\u{0}\",\"room\":\"a\\u0000b\"}",
        ),
    ] {
        add("client_frame", name, text.as_bytes());
    }
    add(
        "client_frame",
        "deep_array.json",
        nested(10_000, "[", "", "]").as_bytes(),
    );
    add(
        "client_frame",
        "deep_data.json",
        format!(
            r#"{{"type":"message","room":"r","data":{}}}"#,
            nested(2_000, r#"{"a":"#, "1", "}")
        )
        .as_bytes(),
    );
    add(
        "client_frame",
        "invalid_utf8.bin",
        b"{\"type\":\"join\",\"room\":\"\xff\xfe\xc0\x80\xed\xa0\x80\"}",
    );

    // Tokens (signed with the fuzz secret where the signature matters).
    let far = 4_102_444_800u64; // 2100-01-01
    add(
        "token",
        "valid.txt",
        sign(
            HS256,
            format!(r#"{{"sub":"alice","exp":{far}}}"#).as_bytes(),
        )
        .as_bytes(),
    );
    add(
        "token",
        "valid_admin.txt",
        sign(
            HS256,
            format!(r#"{{"sub":"root","exp":{far},"admin":true}}"#).as_bytes(),
        )
        .as_bytes(),
    );
    for (name, claims) in [
        ("expired.txt", r#"{"sub":"alice","exp":1}"#.to_string()),
        (
            "exp_huge.txt",
            r#"{"sub":"alice","exp":18446744073709551615}"#.into(),
        ),
        (
            "exp_overflow.txt",
            r#"{"sub":"alice","exp":18446744073709551616}"#.into(),
        ),
        ("exp_inf.txt", r#"{"sub":"alice","exp":1e999999}"#.into()),
        ("exp_negative.txt", r#"{"sub":"alice","exp":-1}"#.into()),
        (
            "wrong_types.txt",
            format!(r#"{{"sub":7,"exp":"{far}","admin":"yes","nbf":[],"aud":{{}}}}"#),
        ),
        ("empty_sub.txt", format!(r#"{{"sub":"","exp":{far}}}"#)),
        ("empty_claims.txt", "{}".into()),
        (
            "lone_surrogate_sub.txt",
            format!(r#"{{"sub":"\ud800","exp":{far}}}"#),
        ),
        (
            "deep_claims.txt",
            format!(
                r#"{{"sub":"a","exp":{far},"x":{}}}"#,
                nested(2_000, "[", "", "]")
            ),
        ),
    ] {
        add("token", name, sign(HS256, claims.as_bytes()).as_bytes());
    }
    add(
        "token",
        "alg_none.txt",
        sign(
            br#"{"alg":"none","typ":"JWT"}"#,
            format!(r#"{{"sub":"alice","exp":{far}}}"#).as_bytes(),
        )
        .rsplit_once('.')
        .map(|(signed, _)| format!("{signed}."))
        .unwrap()
        .as_bytes(),
    );
    add(
        "token",
        "header_wrong_types.txt",
        sign(br#"{"alg":1,"typ":[],"kid":{},"jwk":"x","x5c":7}"#, b"{}").as_bytes(),
    );
    add(
        "token",
        "header_deep.txt",
        sign(
            format!(r#"{{"alg":"HS256","jwk":{}}}"#, nested(2_000, "[", "", "]")).as_bytes(),
            b"{}",
        )
        .as_bytes(),
    );
    add("token", "not_a_jwt.txt", b"x.y.z");
    add("token", "dots.txt", b"...........");
    add(
        "token",
        "invalid_utf8.bin",
        b"eyJ\xff\xfe.\xc0\x80.\xed\xa0\x80",
    );

    // Room messages, from the encoder.
    let stored = wire::encode_message(&example_message(true, true), true);
    add(
        "message",
        "valid_live.json",
        live_copy("1732183810123-0", &stored).as_bytes(),
    );
    add("message", "valid_stored.json", stored.as_bytes());
    add(
        "message",
        "valid_kafka.json",
        wire::encode_message(&example_message(true, true), false).as_bytes(),
    );
    add(
        "message",
        "valid_system.json",
        live_copy(
            "1-1",
            &wire::encode_message(&example_message(false, false), true),
        )
        .as_bytes(),
    );
    let base = r#""type":"message","room":"public:lobby","data":{"a":1}"#;
    for (name, text) in [
        ("empty_object.json", "{}".to_string()),
        (
            "ts_past_9999.json",
            format!(r#"{{"id":"1-1",{base},"ts_ms":253402300800000}}"#),
        ),
        (
            "ts_huge.json",
            format!(r#"{{"id":"1-1",{base},"ts_ms":99999999999999999}}"#),
        ),
        (
            "ts_overflow.json",
            format!(r#"{{"id":"1-1",{base},"ts_ms":18446744073709551616}}"#),
        ),
        (
            "ts_inf.json",
            format!(r#"{{"id":"1-1",{base},"ts_ms":1e999999,"ts":"+99999-01-01T00:00:00Z"}}"#),
        ),
        (
            "ts_negative_zero.json",
            format!(r#"{{"id":"1-1",{base},"ts_ms":-0}}"#),
        ),
        (
            "wrong_types.json",
            r#"{"id":1,"type":"shout","room":7,"data":[],"ts_ms":"1","sender_id":{},"origin_instance":[],"origin_session":-1,"traceparent":false}"#.into(),
        ),
        (
            "id_overflow.json",
            format!(r#"{{"id":"18446744073709551616-0",{base},"ts_ms":1}}"#),
        ),
        (
            "bad_room.json",
            r#"{"id":"1-1","type":"message","room":"no room","data":{},"ts_ms":1}"#.into(),
        ),
        (
            "lone_surrogates.json",
            format!(r#"{{"id":"1-1",{base},"ts_ms":1,"sender_id":"\ud800","traceparent":"\udfff"}}"#),
        ),
        (
            "empty_ids.json",
            format!(r#"{{"id":"",{base},"ts_ms":1,"sender_id":"","origin_instance":"","origin_session":0}}"#),
        ),
        (
            "deep_data.json",
            format!(
                r#"{{"id":"1-1","type":"message","room":"r","data":{},"ts_ms":1}}"#,
                nested(2_000, r#"{"a":"#, "1", "}")
            ),
        ),
        (
            "duplicate_keys.json",
            format!(r#"{{"id":"1-1",{base},"ts_ms":1,"ts_ms":2}}"#),
        ),
    ] {
        add("message", name, text.as_bytes());
    }
    add(
        "message",
        "invalid_utf8.bin",
        format!(r#"{{"id":"1-1",{base},"ts_ms":1,"sender_id":"XX"}}"#)
            .replace("XX", "\u{0}")
            .as_bytes()
            .iter()
            .map(|&b| if b == 0 { 0xff } else { b })
            .collect::<Vec<_>>()
            .as_slice(),
    );

    // Direct messages, from the encoder.
    let valid_direct = wire::encode_direct(&DirectMessage {
        kind: rtgate::broker::DirectKind::Message,
        to: "bob".into(),
        data: RawValue::from_string(r#"{"to":"bob","text":"hi"}"#.into()).unwrap(),
        sender_id: "alice".into(),
        ts_ms: 1_732_183_810_123,
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
    });
    add("direct", "valid.json", valid_direct.as_bytes());
    for (name, text) in [
        ("empty_object.json", "{}".to_string()),
        (
            "wrong_types.json",
            r#"{"type":1,"to":[],"data":"x","sender_id":{},"ts_ms":true,"traceparent":7}"#.into(),
        ),
        (
            "ts_past_9999.json",
            r#"{"to":"bob","data":{},"sender_id":"a","ts_ms":99999999999999999}"#.into(),
        ),
        (
            "ts_inf.json",
            r#"{"to":"bob","data":{},"sender_id":"a","ts_ms":1e999999}"#.into(),
        ),
        (
            "lone_surrogates.json",
            r#"{"to":"\ud800","data":{"\udfff":1},"sender_id":"a","ts_ms":1}"#.into(),
        ),
        (
            "deep_data.json",
            format!(
                r#"{{"to":"bob","data":{},"sender_id":"a","ts_ms":1}}"#,
                nested(2_000, r#"{"a":"#, "[]", "}")
            ),
        ),
    ] {
        add("direct", name, text.as_bytes());
    }

    // Presence, shaped as the Lua scripts in broker/redis.rs write it.
    let entry =
        r#"{"user_id":"alice","conn_id":"c-1","meta":{"status":"away","session_id":"c-1"}}"#;
    let entry2 = r#"{"user_id":"bob","conn_id":"c-2","meta":{"session_id":"c-2"}}"#;
    for (name, text) in [
        ("valid_entry.json", entry.to_string()),
        (
            "valid_diff_track.json",
            format!(r#"{{"type":"presence_diff","data":{{"joins":[{entry}],"leaves":[{entry2}]}}}}"#),
        ),
        (
            "valid_diff_untrack.json",
            format!(r#"{{"type":"presence_diff","data":{{"joins":[],"leaves":[{entry}]}}}}"#),
        ),
        ("empty_object.json", "{}".into()),
        (
            "wrong_types.json",
            r#"{"type":"presence_diff","data":{"joins":{},"leaves":[{"user_id":1,"conn_id":[],"meta":"x"}]}}"#.into(),
        ),
        (
            "empty_ids.json",
            r#"{"type":"presence_diff","data":{"joins":[{"user_id":"","conn_id":"","meta":{}}],"leaves":[]}}"#.into(),
        ),
        (
            "deep_meta.json",
            format!(
                r#"{{"user_id":"a","conn_id":"c","meta":{}}}"#,
                nested(2_000, r#"{"a":"#, "1", "}")
            ),
        ),
        (
            "huge_numbers.json",
            r#"{"user_id":"a","conn_id":"c","meta":{"n":1e999999,"m":18446744073709551616,"z":-0}}"#.into(),
        ),
        (
            "lone_surrogates.json",
            r#"{"user_id":"\ud800","conn_id":"\udfff","meta":{"\ud800":1}}"#.into(),
        ),
    ] {
        add("presence", name, text.as_bytes());
    }

    for (name, text) in [
        ("valid.txt", "1732183810123-4"),
        ("max.txt", "18446744073709551615-18446744073709551615"),
        ("overflow.txt", "18446744073709551616-0"),
        ("empty.txt", ""),
        ("dash.txt", "-"),
        ("signs.txt", "+1--1"),
        ("three_parts.txt", "1-2-3"),
        ("nul.txt", "1\u{0}-2"),
        ("long.txt", &"9".repeat(4096)),
    ] {
        add("message_id", name, text.as_bytes());
    }

    for (name, text) in [
        ("zero.txt", "0"),
        ("last_ms_of_9999.txt", "253402300799999"),
        ("year_10000.txt", "253402300800000"),
        ("huge.txt", "99999999999999999"),
        ("u64_max.txt", "18446744073709551615"),
    ] {
        add("format_ts", name, text.as_bytes());
    }
    c
}

/// The committed corpus holds every generated file, unchanged (or is rewritten on request).
#[test]
fn corpus_is_up_to_date() {
    let write = std::env::var_os("FUZZ_WRITE_CORPUS").is_some();
    let mut stale = Vec::new();
    for (target, name, bytes) in generated_corpus() {
        let path = corpus_dir(target).join(name);
        if write {
            std::fs::create_dir_all(corpus_dir(target)).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        } else if std::fs::read(&path).ok().as_deref() != Some(&bytes[..]) {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale corpus files (FUZZ_WRITE_CORPUS=1 cargo test --test fuzz corpus): {stale:?}"
    );
}

/// Every valid example decodes: the fuzzing starts from inputs that reach the checks.
#[test]
fn valid_examples_decode() {
    let room = RoomName::from(ROOM);
    for (name, bytes) in read_corpus("message") {
        if name.starts_with("valid_live") || name.starts_with("valid_system") {
            wire::decode_message(&bytes, None, None).unwrap();
        } else if name.starts_with("valid") {
            wire::decode_message(&bytes, Some(&room), Some(MessageId::new(0, 1))).unwrap();
        }
    }
    for (name, bytes) in read_corpus("direct") {
        if name.starts_with("valid") {
            wire::decode_direct(&bytes).unwrap();
        }
    }
    for (name, bytes) in read_corpus("presence") {
        if name.starts_with("valid_entry") {
            wire::decode_presence(&bytes).unwrap();
        } else if name.starts_with("valid") {
            wire::decode_presence_diff(&bytes, &room).unwrap();
        }
    }
    let auth = authenticator();
    for (name, bytes) in read_corpus("token") {
        if name.starts_with("valid") {
            verify_now(&auth, std::str::from_utf8(&bytes).unwrap()).unwrap();
        }
    }
    // And the ones past year 9999 are errors.
    for (name, bytes) in read_corpus("message") {
        if name.starts_with("ts_past") || name.starts_with("ts_huge") {
            let e = wire::decode_message(&bytes, None, None).unwrap_err();
            assert!(
                matches!(e, DecodeError::Field { field: "ts_ms", .. }),
                "{name}: {e}"
            );
        }
    }
}

// ---- mutation and generation ---------------------------------------------------------------------

/// Raw JSON values that break parsers and checks: huge or odd numbers, lone surrogates, NULs,
/// wrong types, ids and timestamps at their limits.
const NASTY_VALUES: &[&str] = &[
    "null",
    "true",
    "false",
    "0",
    "-0",
    "-1",
    "1.5",
    "1e999999",
    "-1e999999",
    "1e-999999",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "99999999999999999",
    "253402300799999",
    "253402300800000",
    "340282366920938463463374607431768211456",
    r#""""#,
    r#""x""#,
    r#""\ud800""#,
    r#""\udfff\ud800""#,
    r#""\ud800\u0041""#,
    r#""\u0000""#,
    r#""a\u0000b""#,
    r#""1-2""#,
    r#""18446744073709551615-18446744073709551615""#,
    r#""18446744073709551616-0""#,
    r#""-""#,
    r#""+1-+1""#,
    r#""public:lobby""#,
    r#""private:alice""#,
    r#""bad room""#,
    r#""message""#,
    r#""system""#,
    r#""direct""#,
    r#""presence_diff""#,
    r#""join""#,
    r#""00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01""#,
    "[]",
    "{}",
    "[[]]",
    r#"{"a":{}}"#,
    r#"{"to":"bob"}"#,
    r#"[{"user_id":"u","conn_id":"c","meta":{}}]"#,
];

/// Every field name any target reads.
const FIELDS: &[&str] = &[
    "type",
    "room",
    "data",
    "text",
    "since",
    "self",
    "ref",
    "id",
    "ts",
    "ts_ms",
    "sender_id",
    "origin_instance",
    "origin_session",
    "traceparent",
    "to",
    "joins",
    "leaves",
    "user_id",
    "conn_id",
    "meta",
    "sub",
    "exp",
    "nbf",
    "iat",
    "aud",
    "admin",
    "alg",
    "typ",
    "kid",
    "jwk",
];

/// Byte sequences that break UTF-8 and JSON: invalid UTF-8, escapes, structure.
const NASTY_BYTES: &[&[u8]] = &[
    b"\xff",
    b"\xfe\xff",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\xe2\x82",
    b"\0",
    b"\\ud800",
    b"\\udfff",
    b"\\u0000",
    b"\\",
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"-",
    b".",
    b"e",
];

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(..items.len())]
}

fn nasty_value(rng: &mut StdRng) -> String {
    match rng.random_range(0..12) {
        0 => {
            // Very long strings, some of them past the id and traceparent limits.
            let n = *pick(rng, &[255, 256, 257, 1000, 70_000]);
            format!("\"{}\"", "x".repeat(n))
        }
        1 => {
            let n = *pick(rng, &[31, 32, 33, 127, 128, 129, 1000, 10_000]);
            if rng.random() {
                nested(n, "[", "", "]")
            } else {
                nested(n, r#"{"a":"#, "1", "}")
            }
        }
        2 => rng.random::<u64>().to_string(),
        3 => format!("\"{}-{}\"", rng.random::<u64>(), rng.random::<u64>()),
        4 => (MAX_TS_MS as i128 + rng.random_range(-3..=3)).to_string(),
        _ => pick(rng, NASTY_VALUES).to_string(),
    }
}

/// A position in `buf`, often right after a `:`, `[` or `,` (where a value starts).
fn value_position(rng: &mut StdRng, buf: &[u8]) -> usize {
    if rng.random_bool(0.6) {
        let starts: Vec<usize> = buf
            .iter()
            .enumerate()
            .filter(|(_, b)| matches!(b, b':' | b'[' | b','))
            .map(|(i, _)| i + 1)
            .collect();
        if !starts.is_empty() {
            return *pick(rng, &starts);
        }
    }
    rng.random_range(0..=buf.len())
}

/// Replaces the value at a random path of a JSON object (or removes the key, or adds one),
/// so that each field meets every wrong type; the nasty value is spliced in as raw text.
fn mutate_value(rng: &mut StdRng, buf: &[u8]) -> Option<Vec<u8>> {
    const MARK: &str = "\u{1}fuzz\u{1}";
    let mut v: Value = serde_json::from_slice(buf).ok()?;
    // Choose a path first (a JSON pointer), then change what it points to.
    let mut pointer = String::new();
    let mut at = &v;
    while rng.random_bool(0.4) {
        match at {
            Value::Object(map) if !map.is_empty() => {
                let (key, next) = map.iter().nth(rng.random_range(..map.len()))?;
                pointer.push('/');
                pointer.push_str(&key.replace('~', "~0").replace('/', "~1"));
                at = next;
            }
            Value::Array(list) if !list.is_empty() => {
                let i = rng.random_range(..list.len());
                pointer.push_str(&format!("/{i}"));
                at = &list[i];
            }
            _ => break,
        }
    }
    let at = v.pointer_mut(&pointer)?;
    let replacement = nasty_value(rng);
    match at {
        Value::Object(map) => {
            let key = if !map.is_empty() && rng.random_bool(0.7) {
                map.keys().nth(rng.random_range(..map.len()))?.clone()
            } else {
                pick(rng, FIELDS).to_string()
            };
            if rng.random_bool(0.15) {
                map.remove(&key);
            } else {
                map.insert(key, Value::String(MARK.into()));
            }
        }
        other => *other = Value::String(MARK.into()),
    }
    let text = serde_json::to_string(&v).ok()?;
    let mark = serde_json::to_string(MARK).ok()?;
    Some(text.replacen(&mark, &replacement, 1).into_bytes())
}

fn mutate(rng: &mut StdRng, corpus: &[(String, Vec<u8>)]) -> Vec<u8> {
    // Valid examples half the time: small changes to them reach the checks past the parser.
    let valid: Vec<&(String, Vec<u8>)> = corpus
        .iter()
        .filter(|(name, _)| name.starts_with("valid"))
        .collect();
    let mut buf = if !valid.is_empty() && rng.random() {
        pick(rng, &valid).1.clone()
    } else {
        pick(rng, corpus).1.clone()
    };
    let rounds = *pick(rng, &[1, 1, 1, 2, 2, 3, 4]);
    for _ in 0..rounds {
        let len = buf.len();
        match rng.random_range(0..14) {
            0..=2 => {
                if let Some(b) = mutate_value(rng, &buf) {
                    buf = b;
                }
            }
            3 if len > 0 => {
                for _ in 0..rng.random_range(1..=4) {
                    let i = rng.random_range(..len);
                    buf[i] ^= 1 << rng.random_range(0..8);
                }
            }
            4 if len > 0 => {
                let i = rng.random_range(..len);
                buf[i] = rng.random();
            }
            5 => buf.truncate(rng.random_range(0..=len)),
            6 => {
                // Splice: the head of this input, the tail of another.
                let other = &pick(rng, corpus).1;
                let j = rng.random_range(0..=other.len());
                buf.truncate(rng.random_range(0..=len));
                buf.extend_from_slice(&other[j..]);
            }
            7 => {
                let i = value_position(rng, &buf);
                let levels = *pick(rng, &[33, 129, 1000, 10_000]);
                let open = if rng.random() { "[" } else { r#"{"a":"# };
                let deep = if rng.random() {
                    open.repeat(levels)
                } else {
                    nested(levels, open, "0", if open == "[" { "]" } else { "}" })
                };
                buf.splice(i..i, deep.into_bytes());
            }
            8 => {
                let i = value_position(rng, &buf);
                let v = nasty_value(rng);
                // Replace what stood there up to the next delimiter, or just insert.
                let end = if rng.random() {
                    buf[i..]
                        .iter()
                        .position(|b| matches!(b, b',' | b'}' | b']'))
                        .map_or(len, |p| i + p)
                } else {
                    i
                };
                buf.splice(i..end, v.into_bytes());
            }
            9 => {
                // A duplicate or extra key right after an opening brace.
                if let Some(p) = buf.iter().position(|&b| b == b'{') {
                    let field = format!(r#""{}":{},"#, pick(rng, FIELDS), nasty_value(rng));
                    buf.splice(p + 1..p + 1, field.into_bytes());
                }
            }
            10 => {
                let i = rng.random_range(0..=len);
                buf.splice(i..i, pick(rng, NASTY_BYTES).iter().copied());
            }
            11 if len > 0 => {
                let i = rng.random_range(..len);
                let j = rng.random_range(i..=len.min(i + 64));
                buf.drain(i..j);
            }
            12 if len > 0 => {
                // Repeat a chunk.
                let i = rng.random_range(..len);
                let j = rng.random_range(i..=len.min(i + 64));
                let chunk = buf[i..j].repeat(rng.random_range(1..=64));
                buf.splice(j..j, chunk);
            }
            13 => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..=8);
                buf.splice(i..i, std::iter::repeat_n(0u8, n));
            }
            _ => {}
        }
        buf.truncate(MAX_INPUT);
    }
    buf
}

/// Inputs made from nothing, by target: random bytes, random objects of known fields, and the
/// shapes only a target knows (signed tokens, message ids, timestamps).
fn generate(rng: &mut StdRng, target: &str, corpus: &[(String, Vec<u8>)]) -> Vec<u8> {
    match (target, rng.random_range(0..4)) {
        (_, 0) => {
            let n = rng.random_range(0..64);
            (0..n).map(|_| rng.random()).collect()
        }
        ("token", _) => {
            // A correctly signed token around a mutated header or claims set: only the
            // signature of a token lets its claims be read.
            let header = if rng.random_bool(0.7) {
                HS256.to_vec()
            } else {
                mutate(rng, &[("h".into(), HS256.to_vec())])
            };
            let far = 4_102_444_800u64;
            let claims = format!(r#"{{"sub":"alice","exp":{far},"admin":true}}"#);
            let claims = mutate(rng, &[("c".into(), claims.into_bytes())]);
            sign(&header, &claims).into_bytes()
        }
        ("message_id", _) => {
            let part = |rng: &mut StdRng| match rng.random_range(0..4) {
                0 => rng.random::<u64>().to_string(),
                1 => format!("{}{}", u64::MAX, rng.random_range(0..10)),
                2 => "0".repeat(rng.random_range(0..100)),
                _ => rng.random_range(0..1000).to_string(),
            };
            format!("{}-{}", part(rng), part(rng)).into_bytes()
        }
        ("format_ts", _) => {
            let ms = match rng.random_range(0..4) {
                0 => rng.random::<u64>(),
                1 => MAX_TS_MS
                    .wrapping_add(rng.random_range(0..5))
                    .wrapping_sub(2),
                2 => 1u64 << rng.random_range(0..64),
                _ => rng.random_range(0..MAX_TS_MS),
            };
            ms.to_string().into_bytes()
        }
        _ => {
            // An object of random known fields, values from the nasty list or a valid example.
            let mut out = String::from("{");
            for i in 0..rng.random_range(0..8) {
                if i > 0 {
                    out.push(',');
                }
                let value = if rng.random_bool(0.2) {
                    String::from_utf8_lossy(&pick(rng, corpus).1).into_owned()
                } else {
                    nasty_value(rng)
                };
                out.push_str(&format!(r#""{}":{value}"#, pick(rng, FIELDS)));
            }
            out.push('}');
            out.into_bytes()
        }
    }
}

// ---- the driver ----------------------------------------------------------------------------------

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn show(input: &[u8]) -> String {
    const SHOWN: usize = 2048;
    let more = if input.len() > SHOWN {
        format!(" ... ({} bytes in all)", input.len())
    } else {
        String::new()
    };
    let head = &input[..input.len().min(SHOWN)];
    match std::str::from_utf8(input) {
        Ok(_) => format!("{:?}{more}", String::from_utf8_lossy(head)),
        Err(_) => {
            let hex: String = head.iter().map(|b| format!("{b:02x}")).collect();
            format!("hex {hex}{more}")
        }
    }
}

/// Runs `f` on `input`; on a panic, saves the input and fails with how to find it again.
fn run_one(target: &str, seed: u64, what: &str, input: &[u8], f: fn(&[u8])) {
    if catch_unwind(AssertUnwindSafe(|| f(input))).is_ok() {
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    let file = dir.join(format!("{target}-{seed}-{}", what.replace(' ', "_")));
    let saved = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&file, input))
        .map_or_else(
            |e| format!("not saved: {e}"),
            |()| format!("saved as {}", file.display()),
        );
    panic!(
        "fuzz target `{target}` panicked: seed {seed}, {what}\ninput ({saved}): {}",
        show(input)
    );
}

fn fuzz(target: &str, f: fn(&[u8])) {
    let seed = env_u64("FUZZ_SEED").unwrap_or(SEED);
    let iters = env_u64("FUZZ_ITERS").map_or(ITERS, |n| n as usize);
    let corpus = read_corpus(target);
    let started = Instant::now();
    for (name, bytes) in &corpus {
        run_one(target, seed, &format!("corpus file {name}"), bytes, f);
    }
    // One stream per target, so that a target's run does not depend on the others.
    let target_seed = target.bytes().fold(seed, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut rng = StdRng::seed_from_u64(target_seed);
    for i in 0..iters {
        let input = if rng.random_bool(0.8) {
            mutate(&mut rng, &corpus)
        } else {
            generate(&mut rng, target, &corpus)
        };
        run_one(target, seed, &format!("iteration {i}"), &input, f);
    }
    eprintln!(
        "fuzz {target}: {} corpus files and {iters} generated inputs (seed {seed}), {} accepted, \
         in {:?}",
        corpus.len(),
        ACCEPTED.with(|n| n.get()),
        started.elapsed()
    );
}

#[test]
fn fuzz_client_frames() {
    fuzz("client_frame", client_frame);
}

#[test]
fn fuzz_tokens() {
    fuzz("token", token);
}

#[test]
fn fuzz_room_messages() {
    fuzz("message", message);
}

#[test]
fn fuzz_direct_messages() {
    fuzz("direct", direct);
}

#[test]
fn fuzz_presence() {
    fuzz("presence", presence);
}

#[test]
fn fuzz_message_ids() {
    fuzz("message_id", message_id);
}

#[test]
fn fuzz_format_ts() {
    fuzz("format_ts", format_ts_target);
}
