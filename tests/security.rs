//! Admission and input limits against the real binary: each refusal gives its close code, HTTP
//! status or error code, publishes and delivers nothing, moves its counter, and leaves the
//! legitimate client next to it unaffected.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A room message data object nested `depth` levels deep (the object itself is level 1).
fn nested(depth: usize) -> Value {
    let mut v = json!({"leaf": true});
    for _ in 1..depth {
        v = json!({ "a": v });
    }
    v
}

/// Two members of `room`: a sender and a watcher that must see only what is allowed.
async fn pair(server: &Server, room: &str) -> (Client, Client) {
    let mut sender = server.user("sender").await;
    let mut watcher = server.user("watcher").await;
    sender.join(room).await;
    watcher.join(room).await;
    (sender, watcher)
}

/// The watcher gets exactly the messages with these `n` values, in order, and nothing else.
async fn assert_received(watcher: &mut Client, room: &str, expected: &[i64]) {
    let frames = watcher.collect_for(QUIET).await;
    let got: Vec<i64> = messages_in(&frames, room)
        .iter()
        .filter_map(|m| m["data"]["n"].as_i64())
        .collect();
    assert_eq!(
        got,
        expected,
        "frames: {:?}",
        frames.iter().map(short).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn demo_mode_is_development_only() {
    // A configured secret: no demo unless asked for.
    let server = Server::start("").await;
    assert_eq!(server.get("/api/v1/demo/token?user=mallory").await.0, 404);
    assert_eq!(server.get("/").await.0, 404);

    // Asked for explicitly: served, with a warning at every start.
    let server = Server::start("[server]\ndemo = true").await;
    let (status, body) = server.get("/api/v1/demo/token?user=alice").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        server
            .logs()
            .contains("server.demo = true with configured keys"),
        "no warning in:\n{}",
        server.logs()
    );

    // The ephemeral development secret: on by default.
    let server = Server::start("[auth]\njwt_secret = \"\"").await;
    assert_eq!(server.get("/api/v1/demo/token?user=alice").await.0, 200);
    assert_eq!(server.get("/").await.0, 200);
}

#[tokio::test]
async fn instance_connection_limit_closes_with_1013() {
    let server = Server::start("[server]\nmax_connections = 2").await;
    let room = "public:full";
    let (mut sender, mut watcher) = pair(&server, room).await;
    let mut third = Client::connect(&server.ws_url(&token("third", false, 3600))).await;
    assert_eq!(third.expect_close(WAIT).await, Some(1013));
    let reason = third.close_reason.clone().unwrap_or_default();
    assert!(reason.contains("instance"), "reason: {reason}");
    assert!(
        third.frames_before_close.is_empty(),
        "no welcome for a refused client"
    );
    assert_eq!(
        server
            .metric_sum(
                "rtgate_connections_refused_total",
                r#"reason="max_connections""#
            )
            .await,
        1.0
    );
    // The two admitted clients are unaffected.
    sender.publish(room, json!({"n": 1})).await;
    assert_received(&mut watcher, room, &[1]).await;
    assert_eq!(server.stats().await["connections"], 2);
    // Room is freed when one leaves.
    drop(sender);
    server.wait_stats(WAIT, |s| s["connections"] == 1).await;
    server.user("fourth").await.assert_alive().await;
}

#[tokio::test]
async fn per_user_connection_limit_closes_with_1013() {
    let server = Server::start("[server]\nmax_connections_per_user = 2").await;
    let mut a1 = server.user("alice").await;
    let _a2 = server.user("alice").await;
    let mut a3 = Client::connect(&server.ws_url(&token("alice", false, 3600))).await;
    assert_eq!(a3.expect_close(WAIT).await, Some(1013));
    assert!(a3.close_reason.clone().unwrap_or_default().contains("user"));
    assert_eq!(
        server
            .metric_sum(
                "rtgate_connections_refused_total",
                r#"reason="max_connections_per_user""#
            )
            .await,
        1.0
    );
    // Another user is not affected, and alice's first connections still work.
    let mut bob = server.user("bob").await;
    bob.assert_alive().await;
    a1.assert_alive().await;
}

#[tokio::test]
async fn connect_rate_per_address_answers_429_before_the_upgrade() {
    let server = Server::start(
        "[server]\nconnect_rate_per_ip = 1\nconnect_burst_per_ip = 2\ntrusted_proxies = []",
    )
    .await;
    let url = server.ws_url(&token("u", false, 3600));
    let spoofed = [("X-Forwarded-For", "198.51.100.1")];
    let mut first = Client::try_connect(&url, &spoofed, None)
        .await
        .expect("first");
    first.read_welcome().await;
    let mut second = Client::try_connect(&url, &[], None).await.expect("second");
    second.read_welcome().await;
    // An untrusted peer's X-Forwarded-For is ignored: same bucket, refused.
    let third = Client::try_connect(&url, &[("X-Forwarded-For", "198.51.100.2")], None).await;
    assert_eq!(third.err(), Some(429));
    assert_eq!(
        server
            .metric_sum(
                "rtgate_connections_refused_total",
                r#"reason="connect_rate""#
            )
            .await,
        1.0
    );
    assert_eq!(
        server.stats().await["connections"],
        2,
        "nothing was created"
    );
    first.assert_alive().await;
}

#[tokio::test]
async fn trusted_proxy_forwards_the_client_address() {
    let server = Server::start(
        "[server]\nconnect_rate_per_ip = 1\nconnect_burst_per_ip = 1\ntrusted_proxies = [\"127.0.0.0/8\"]",
    )
    .await;
    let url = server.ws_url(&token("u", false, 3600));
    // Each forwarded client has its own bucket behind the trusted proxy.
    for client in ["198.51.100.1", "198.51.100.2", "2001:db8::1"] {
        let mut c = Client::try_connect(&url, &[("X-Forwarded-For", client)], None)
            .await
            .unwrap_or_else(|s| panic!("{client}: HTTP {s}"));
        c.read_welcome().await;
    }
    let fwd = "for=\"[2001:db8:0:1::2]:443\";proto=https";
    let mut c = Client::try_connect(&url, &[("Forwarded", fwd)], None)
        .await
        .expect("Forwarded");
    c.read_welcome().await;
    // The same forwarded client again: its bucket is empty.
    let again = Client::try_connect(&url, &[("X-Forwarded-For", "198.51.100.1")], None).await;
    assert_eq!(again.err(), Some(429));
}

#[tokio::test]
async fn browser_origins_are_checked() {
    let server = Server::start(
        "[server]\nallowed_origins = [\"https://app.example.com\", \"https://*.example.org\"]",
    )
    .await;
    let url = server.ws_url(&token("u", false, 3600));
    for (origin, status) in [
        ("https://evil.example.net", Some(403)),
        ("https://app.example.com.evil.net", Some(403)),
        ("null", Some(403)),
        ("https://app.example.com", None),
        ("https://chat.example.org", None),
    ] {
        let result = Client::try_connect(&url, &[("Origin", origin)], None).await;
        match (result, status) {
            (Err(got), Some(want)) => assert_eq!(got, want, "{origin}"),
            (Ok(mut c), None) => {
                c.read_welcome().await;
            }
            (Ok(_), Some(want)) => panic!("{origin}: accepted, expected {want}"),
            (Err(got), None) => panic!("{origin}: HTTP {got}, expected an upgrade"),
        }
    }
    // Not a browser: no Origin, not affected.
    server.user("cli").await.assert_alive().await;
    assert_eq!(
        server
            .metric_sum("rtgate_connections_refused_total", r#"reason="origin""#)
            .await,
        3.0
    );

    // Default: same origin only.
    let server = Server::start("").await;
    let url = server.ws_url(&token("u", false, 3600));
    let same = format!("http://127.0.0.1:{}", server.port);
    let mut ok = Client::try_connect(&url, &[("Origin", &same)], None)
        .await
        .expect("same origin");
    ok.read_welcome().await;
    let other = Client::try_connect(&url, &[("Origin", "http://127.0.0.1:1")], None).await;
    assert_eq!(other.err(), Some(403));
}

#[tokio::test]
async fn slow_request_headers_are_cut_off() {
    let server = Server::start("[server]\nheader_read_timeout = \"500ms\"").await;
    let addr = format!("127.0.0.1:{}", server.port);
    // Half a request header, then silence.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /api/v1/ws HTTP/1.1\r\nHost: x\r\nUpg")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
        .await
        .expect("a slow header must be cut off");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "connection closed, got {read:?}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );

    // An idle keep-alive connection is closed too.
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let closed = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "idle keep-alive must close"
    );

    // Meanwhile the gateway serves everyone else.
    assert_eq!(server.get("/healthz").await.0, 200);
    server.user("ok").await.assert_alive().await;
}

#[tokio::test]
async fn rooms_per_connection_are_limited() {
    let server = Server::start("[ws]\nmax_rooms_per_connection = 3").await;
    let mut c = server.user("u").await;
    for i in 0..3 {
        c.join(&format!("public:r{i}")).await;
    }
    c.join("public:r1").await; // joining a room again takes no new slot
    c.request_err(
        json!({"type": "join", "room": "public:r3"}),
        "limit_exceeded",
    )
    .await;
    assert_eq!(
        server
            .metric_sum(
                "rtgate_limit_exceeded_total",
                r#"limit="rooms_per_connection""#
            )
            .await,
        1.0
    );
    assert_eq!(
        server.stats().await["rooms"],
        3,
        "the refused room was not created"
    );
    // Leaving frees a slot.
    c.leave("public:r0").await;
    c.join("public:r3").await;
}

#[tokio::test]
async fn deep_json_is_refused_before_publishing() {
    let server = Server::start("[ws]\nmax_json_depth = 32").await;
    let room = "public:deep";
    let (mut sender, mut watcher) = pair(&server, room).await;
    let mut ok = nested(32);
    ok["n"] = json!(1);
    sender.publish(room, ok).await;
    let mut deep = nested(33);
    deep["n"] = json!(2);
    sender
        .request_err(
            json!({"type": "message", "room": room, "data": deep}),
            "bad_request",
        )
        .await;
    // Also through the shorthand-free path: a 5000-deep array inside data.
    let huge = format!(
        r#"{{"type":"message","room":"{room}","data":{{"n":3,"x":{}{}}},"ref":"h"}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    sender.send_text(&huge).await;
    let reply = sender
        .recv_until(|v| v["ref"] == "h", WAIT)
        .await
        .expect("reply to the deep frame");
    assert_eq!(reply["type"], "error", "{reply}");
    assert_received(&mut watcher, room, &[1]).await;
    assert!(
        server
            .metric_sum("rtgate_limit_exceeded_total", r#"limit="json_depth""#)
            .await
            >= 1.0
    );
    // Presence metas are held to the same depth.
    sender
        .request_err(
            json!({"type": "track", "room": room, "data": nested(40)}),
            "bad_request",
        )
        .await;
    sender.assert_alive().await;
}

#[tokio::test]
async fn presence_meta_size_and_room_presence_are_limited() {
    let server =
        Server::start("[ws]\nmax_presence_bytes = 256\n[rooms]\nmax_presence_per_room = 2").await;
    let room = "public:pres";
    let mut a = server.user("a").await;
    let mut b = server.user("b").await;
    let mut c = server.user("c").await;
    for x in [&mut a, &mut b, &mut c] {
        x.join(room).await;
    }
    let big = json!({"name": "x".repeat(300)});
    a.request_err(
        json!({"type": "track", "room": room, "data": big}),
        "too_large",
    )
    .await;
    a.request_ok(json!({"type": "track", "room": room, "data": {"name": "a"}}))
        .await;
    b.request_ok(json!({"type": "track", "room": room, "data": {"name": "b"}}))
        .await;
    c.request_err(
        json!({"type": "track", "room": room, "data": {"name": "c"}}),
        "limit_exceeded",
    )
    .await;
    // Updating one's own entry is not a new entry.
    a.request_ok(json!({"type": "track", "room": room, "data": {"name": "a2"}}))
        .await;
    assert_eq!(
        server
            .metric_sum("rtgate_limit_exceeded_total", r#"limit="presence_bytes""#)
            .await,
        1.0
    );
    assert_eq!(
        server
            .metric_sum(
                "rtgate_limit_exceeded_total",
                r#"limit="presence_per_room""#
            )
            .await,
        1.0
    );
    // What a newcomer sees: exactly the two admitted entries.
    let mut e = server.user("e").await;
    e.send_json(&json!({"type": "join", "room": room, "ref": "j"}))
        .await;
    let state = e
        .recv_until(|v| v["type"] == "presence_state", WAIT)
        .await
        .expect("presence_state");
    let users: Vec<&String> = state["data"].as_object().unwrap().keys().collect();
    assert_eq!(users, ["a", "b"], "{state}");
    assert_eq!(state["data"]["a"][0]["name"], "a2");
}

#[tokio::test]
async fn send_queue_byte_budget_applies_the_overflow_policy() {
    // The frame count cannot be reached; only the byte budget can.
    let server = Server::start(
        "[ws]\nsend_queue_max = 100000\nsend_queue_max_bytes = 262144\noverflow_policy = \"disconnect\"\n\
         rate_limit_per_sec = 100000\nrate_limit_burst = 100000",
    )
    .await;
    let room = "public:bytes";
    let mut slow = Client::connect_small_rcvbuf(&server.ws_url(&token("slow", false, 3600))).await;
    slow.read_welcome().await;
    slow.join(room).await;
    let mut fast = server.user("fast").await;
    fast.join(room).await;
    // Reads all along, so its queue never fills.
    let fast = tokio::spawn(async move { fast.collect_for(Duration::from_secs(6)).await });
    let mut sender = server.user("sender").await;
    sender
        .request_ok(json!({"type": "join", "room": room, "self": false}))
        .await;
    let text = "x".repeat(2000);
    let mut closed = false;
    // Bounded: at most 4000 messages of 2 KB (8 MB, more than the kernel buffers hold), in
    // bursts the reading client keeps up with, checking for the close as we go.
    for i in 0..4000 {
        sender
            .send_json(&json!({"type": "message", "room": room, "data": {"n": i, "t": text}}))
            .await;
        if i % 40 == 39 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if i % 200 == 199
            && server
                .metric_sum("rtgate_dropped_frames_total", r#"policy="disconnect""#)
                .await
                >= 1.0
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "the byte budget never overflowed");
    assert_eq!(slow.expect_close(Duration::from_secs(10)).await, Some(1013));
    // The reading client got every message in order.
    let frames = fast.await.unwrap();
    let ns: Vec<i64> = messages_in(&frames, room)
        .iter()
        .filter_map(|m| m["data"]["n"].as_i64())
        .collect();
    assert!(!ns.is_empty());
    assert!(
        ns.windows(2).all(|w| w[1] == w[0] + 1),
        "gapless for the fast client"
    );
}

#[tokio::test]
async fn rest_bodies_are_limited_and_checked() {
    let server = Server::start("[ws]\nmax_frame_bytes = 4096\nmax_json_depth = 16").await;
    let room = "public:rest";
    let mut watcher = server.user("watcher").await;
    watcher.join(room).await;
    let big = json!({"room": room, "type": "message", "data": {"n": 1, "t": "x".repeat(5000)}});
    let (status, body) = server.broadcast(Some(API_KEY), &big).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("too_large"), "{body}");
    let mut deep = nested(17);
    deep["n"] = json!(2);
    let (status, body) = server
        .broadcast(
            Some(API_KEY),
            &json!({"room": room, "type": "message", "data": deep}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let too_long_for_kafka = ":".repeat(80);
    let (status, _) = server
        .broadcast(
            Some(API_KEY),
            &json!({"room": too_long_for_kafka, "data": {"n": 3}}),
        )
        .await;
    assert_eq!(status, 400);
    // Without a key the body is not even read.
    let (status, _) = server.broadcast(None, &big).await;
    assert_eq!(status, 401);
    let (status, body) = server
        .broadcast(
            Some(API_KEY),
            &json!({"room": room, "type": "message", "data": {"n": 4}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_received(&mut watcher, room, &[4]).await;
    assert_eq!(
        server
            .metric_sum("rtgate_limit_exceeded_total", r#"limit="body_bytes""#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn room_names_must_fit_a_kafka_topic_on_every_broker() {
    let server = Server::start("").await;
    let mut c = server.user("u").await;
    c.request_err(
        json!({"type": "join", "room": ":".repeat(80)}),
        "bad_request",
    )
    .await;
    c.join(&":".repeat(79)).await;
}

#[tokio::test]
async fn admin_listener_takes_metrics_and_stats_off_the_public_one() {
    let server = Server::start("[server]\nadmin_listen = \"127.0.0.1:0\"").await;
    assert_eq!(server.get("/metrics").await.0, 404);
    assert_eq!(server.get("/api/v1/stats").await.0, 404);
    assert_eq!(server.get("/readyz").await.0, 200);
    let logs = server.logs();
    let marker = "admin endpoints (metrics, stats) at http://127.0.0.1:";
    let at = logs.find(marker).expect("admin address printed") + marker.len();
    let port: String = logs[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    let admin = format!("http://127.0.0.1:{port}");
    let http = server.http_client();
    let metrics = http.get(format!("{admin}/metrics")).send().await.unwrap();
    assert_eq!(metrics.status().as_u16(), 200);
    let stats: Value = http
        .get(format!("{admin}/api/v1/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["broker"], "memory");
    // The WebSocket is not served there.
    let ws = http.get(format!("{admin}/api/v1/ws")).send().await.unwrap();
    assert_eq!(ws.status().as_u16(), 404);
}
