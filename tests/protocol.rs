//! Black-box tests of the v1 wire contract (/work/shared/PROTOCOL.md).
//! Each test starts its own `rtgate` process (see tests/common/mod.rs).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

fn is_msg(v: &Value, room: &str) -> bool {
    v["type"] == "message" && v["room"] == room
}

fn seq_of(v: &Value) -> i64 {
    v["data"]["seq"]
        .as_i64()
        .unwrap_or_else(|| panic!("frame without data.seq: {}", short(v)))
}

fn pad(n: usize) -> String {
    "x".repeat(n)
}

// =============================================================================================
// Endpoints

#[tokio::test]
async fn welcome_is_first_frame_with_user_instance_and_session() {
    let srv = Server::start("").await;
    let mut a = Client::connect(&srv.ws_url(&token("alice", false, 3600))).await;
    let w1 = a.read_welcome().await;
    assert_eq!(w1["user_id"], "alice", "welcome: {w1}");
    let inst = w1["instance_id"].as_str().expect("instance_id string");
    assert!(!inst.is_empty());
    let s1 = w1["session_id"].as_str().expect("session_id string");
    assert!(!s1.is_empty());

    // A second connection of the same user is a distinct session on the same instance.
    let mut a2 = Client::connect(&srv.ws_url(&token("alice", false, 3600))).await;
    let w2 = a2.read_welcome().await;
    assert_eq!(w2["user_id"], "alice");
    assert_eq!(w2["instance_id"], w1["instance_id"]);
    assert_ne!(
        w2["session_id"], w1["session_id"],
        "session ids must differ"
    );

    let stats = srv.stats().await;
    assert_eq!(stats["instance_id"], w1["instance_id"], "stats: {stats}");
}

#[tokio::test]
async fn ws_auth_via_authorization_header() {
    let srv = Server::start("").await;
    let mut c = Client::connect_bearer(&srv.ws_url_no_token(), &token("hdr-user", false, 60)).await;
    let w = c.read_welcome().await;
    assert_eq!(w["user_id"], "hdr-user");
    c.join("public:hdr").await;
    c.assert_alive().await;

    // A bad token in the header is refused like a bad query token.
    let bad = token_with(
        &json!({"sub": "mallory", "exp": now_secs() + 3600}),
        "wrong-secret",
    );
    let mut m = Client::connect_bearer(&srv.ws_url_no_token(), &bad).await;
    assert_eq!(m.expect_close(WAIT).await, Some(1008));
    assert!(
        !m.frames_before_close.iter().any(|f| f["type"] == "welcome"),
        "no welcome for a refused token: {:?}",
        m.frames_before_close
    );
}

#[tokio::test]
async fn bad_tokens_are_closed_with_1008_and_leave_no_state() {
    let srv = Server::start("").await;
    let now = now_secs();
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("malformed", Some("not-a-jwt".to_string())),
        ("expired", Some(token("alice", false, -3600))),
        (
            "wrong signature",
            Some(token_with(
                &json!({"sub": "alice", "exp": now + 3600}),
                "not-the-secret",
            )),
        ),
        ("alg none", Some(alg_none_token("alice", true))),
        ("no exp", Some(token_with(&json!({"sub": "alice"}), SECRET))),
        (
            "no sub",
            Some(token_with(&json!({"exp": now + 3600}), SECRET)),
        ),
    ];
    for (name, tok) in cases {
        let url = match &tok {
            Some(t) => srv.ws_url(t),
            None => srv.ws_url_no_token(),
        };
        let mut c = Client::connect(&url).await;
        // Try to create state right away; the server must not act on it.
        let _ = c
            .send_raw(Message::text(
                json!({"type": "join", "room": "public:leak", "ref": "j"}).to_string(),
            ))
            .await;
        let code = c.expect_close(WAIT).await;
        assert_eq!(code, Some(1008), "{name} token: close code");
        assert!(
            !c.close_reason.clone().unwrap_or_default().is_empty(),
            "{name} token: the close frame should carry a reason"
        );
        assert!(
            !c.frames_before_close
                .iter()
                .any(|f| f["type"] == "welcome" || f["type"] == "ack"),
            "{name} token: got frames meant for an authenticated client: {:?}",
            c.frames_before_close
        );
    }
    let stats = srv
        .wait_stats(WAIT, |s| s["connections"] == 0 && s["rooms"] == 0)
        .await;
    assert_eq!(
        stats["connections"], 0,
        "stats after refused tokens: {stats}"
    );
    assert_eq!(stats["rooms"], 0, "stats after refused tokens: {stats}");
}

#[tokio::test]
async fn healthz_and_readyz_answer_200() {
    let srv = Server::start("").await;
    assert_eq!(srv.get("/healthz").await.0, 200);
    assert_eq!(srv.get("/readyz").await.0, 200);
}

#[tokio::test]
async fn stats_reports_one_live_instance_with_memory_broker() {
    let srv = Server::start("").await;
    let s = srv.stats().await;
    let id = s["instance_id"].as_str().unwrap_or_default();
    assert!(!id.is_empty(), "{s}");
    assert_eq!(s["broker"], "memory", "{s}");
    assert_eq!(s["instances"], 1, "memory broker: instances must be 1: {s}");
    let live = s["live_instances"]
        .as_array()
        .expect("live_instances array");
    assert_eq!(live.len(), 1, "memory broker: one live instance: {s}");
}

#[tokio::test]
async fn stats_counts_connections_and_rooms() {
    let srv = Server::start("").await;
    let s0 = srv.stats().await;
    assert_eq!(s0["connections"], 0, "{s0}");
    assert_eq!(s0["rooms"], 0, "{s0}");

    let mut a = srv.user("alice").await;
    let mut b = srv.user("bob").await;
    a.join("public:s1").await;
    b.join("public:s1").await;
    b.join("public:s2").await;
    let s = srv
        .wait_stats(WAIT, |s| s["connections"] == 2 && s["rooms"] == 2)
        .await;
    assert_eq!(s["connections"], 2, "{s}");
    assert_eq!(s["rooms"], 2, "{s}");

    b.leave("public:s2").await;
    let s = srv.wait_stats(WAIT, |s| s["rooms"] == 1).await;
    assert_eq!(s["rooms"], 1, "after leaving s2: {s}");

    drop(b);
    let s = srv.wait_stats(WAIT, |s| s["connections"] == 1).await;
    assert_eq!(s["connections"], 1, "after bob disconnected: {s}");
    assert_eq!(s["rooms"], 1, "alice still in s1: {s}");

    a.send_close(1000).await;
    let _ = a.expect_close(WAIT).await;
    let s = srv
        .wait_stats(WAIT, |s| s["connections"] == 0 && s["rooms"] == 0)
        .await;
    assert_eq!(s["connections"], 0, "{s}");
    assert_eq!(s["rooms"], 0, "{s}");
}

#[tokio::test]
async fn metrics_endpoint_serves_prometheus_text() {
    let srv = Server::start("").await;
    let mut a = srv.user("alice").await;
    a.join("public:m").await;
    a.publish("public:m", json!({"x": 1})).await;
    let (status, body) = srv.get("/metrics").await;
    assert_eq!(status, 200);
    let mut samples = 0;
    for line in body.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with('#') {
            continue;
        }
        let value = line.rsplit(' ').next().unwrap();
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "not a Prometheus sample line: {line:?}"
        );
        let name_ok = line
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
        assert!(name_ok, "bad metric name: {line:?}");
        samples += 1;
    }
    assert!(samples > 0, "no samples after traffic:\n{body}");
}

// =============================================================================================
// Broadcast endpoint

#[tokio::test]
async fn broadcast_with_missing_or_wrong_api_key_is_refused() {
    let srv = Server::start("").await;
    let mut a = srv.user("alice").await;
    a.join("public:news").await;

    let bad = json!({"room": "public:news", "type": "system", "data": {"marker": "bad"}});
    assert_eq!(srv.broadcast(None, &bad).await.0, 401, "missing key");
    assert_eq!(
        srv.broadcast(Some("wrong-key"), &bad).await.0,
        401,
        "wrong key"
    );
    // A user JWT is not an API key either.
    let jwt = token("alice", true, 3600);
    assert_eq!(
        srv.broadcast(Some(&jwt), &bad).await.0,
        401,
        "JWT as api key"
    );

    // Positive control: the first broadcast frame alice sees must be the authorised one.
    let good = json!({"room": "public:news", "type": "system", "data": {"marker": "good"}});
    let (status, body) = srv.broadcast(Some(API_KEY), &good).await;
    assert_eq!(status, 200, "{body}");
    let f = a
        .recv_until(|v| v["type"] == "system" || v["type"] == "message", WAIT)
        .await
        .expect("authorised broadcast not delivered");
    assert_eq!(
        f["data"]["marker"], "good",
        "refused broadcast was delivered: {f}"
    );
    let extra = a.recv_until(|v| v["data"]["marker"] == "bad", QUIET).await;
    assert!(
        extra.is_none(),
        "refused broadcast was delivered: {extra:?}"
    );
}

#[tokio::test]
async fn broadcast_system_and_message_are_delivered_to_members_only() {
    let srv = Server::start("").await;
    let mut a = srv.user("alice").await;
    let mut outsider = srv.user("bob").await;
    a.join("public:news").await;
    outsider.join("public:other").await;

    let (status, body) = srv
        .broadcast(
            Some(API_KEY),
            &json!({"room": "public:news", "type": "system", "data": {"notice": "maintenance"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let resp: Value = serde_json::from_str(&body).expect("JSON body");
    assert!(resp["id"].as_str().is_some_and(|s| !s.is_empty()), "{resp}");
    let f = a
        .recv_until(|v| v["type"] == "system", WAIT)
        .await
        .expect("system broadcast not delivered");
    assert_eq!(f["room"], "public:news", "{f}");
    assert_eq!(f["data"]["notice"], "maintenance", "{f}");

    let (status, body) = srv
        .broadcast(
            Some(API_KEY),
            &json!({"room": "public:news", "type": "message", "data": {"text": "from server"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let resp: Value = serde_json::from_str(&body).expect("JSON body");
    let id = resp["id"].as_str().expect("id").to_string();
    let m = a
        .recv_message("public:news", WAIT)
        .await
        .expect("message broadcast not delivered");
    assert_eq!(m["data"]["text"], "from server", "{m}");
    assert_eq!(
        m["id"],
        id.as_str(),
        "delivered id must be the one answered: {m}"
    );
    assert!(m["ts"].as_str().is_some_and(is_rfc3339_utc), "ts: {m}");

    let leaked = outsider
        .recv_until(|v| v["room"] == "public:news", QUIET)
        .await;
    assert!(leaked.is_none(), "non-member got {leaked:?}");
}

// =============================================================================================
// Envelope and messages

#[tokio::test]
async fn message_is_acked_and_fanned_out_with_server_fields() {
    let srv = Server::start("").await;
    let mut a = srv.user("alice").await;
    let mut b = srv.user("bob").await;
    let mut c = srv.user("carol").await;
    a.join("public:chat").await;
    b.join("public:chat").await;
    c.join("public:elsewhere").await;

    let ack = a
        .request_ok(
            json!({"type": "message", "room": "public:chat", "data": {"text": "hi", "n": 1}}),
        )
        .await;
    let id = ack["data"]["id"].as_str().expect("ack data.id").to_string();
    assert!(!id.is_empty());

    for (who, cl) in [("bob", &mut b), ("alice (self)", &mut a)] {
        let m = cl
            .recv_message("public:chat", WAIT)
            .await
            .unwrap_or_else(|| panic!("{who} did not get the message"));
        assert_eq!(m["data"], json!({"text": "hi", "n": 1}), "{who}: {m}");
        assert_eq!(m["sender_id"], "alice", "{who}: {m}");
        assert_eq!(m["id"], id.as_str(), "{who}: id must equal the ack id: {m}");
        let ts = m["ts"].as_str().unwrap_or_default();
        assert!(is_rfc3339_utc(ts), "{who}: ts not RFC 3339 UTC: {m}");
    }
    let leaked = c.recv_until(|v| v["type"] == "message", QUIET).await;
    assert!(leaked.is_none(), "member of another room got {leaked:?}");
}

#[tokio::test]
async fn messages_from_one_sender_arrive_in_order_with_distinct_ids() {
    let srv = Server::start("").await;
    let mut a = srv.user("alice").await;
    let mut b = srv.user("bob").await;
    a.join("public:order").await;
    b.join("public:order").await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(a.publish("public:order", json!({"seq": i})).await);
    }
    let uniq: HashSet<&String> = ids.iter().collect();
    assert_eq!(uniq.len(), ids.len(), "ids must be distinct: {ids:?}");
    for (i, id) in ids.iter().enumerate() {
        let m = b
            .recv_message("public:order", WAIT)
            .await
            .unwrap_or_else(|| panic!("bob missed message {i}"));
        assert_eq!(seq_of(&m), i as i64, "out of order: {m}");
        assert_eq!(m["id"], id.as_str());
    }
}

#[tokio::test]
async fn text_shorthand_is_delivered_as_data_text() {
    let srv = Server::start("").await;
    let mut a = srv.user("alice").await;
    let mut b = srv.user("bob").await;
    a.join("public:chat").await;
    b.join("public:chat").await;
    a.request_ok(json!({"type": "message", "room": "public:chat", "text": "hi"}))
        .await;
    let m = b.recv_message("public:chat", WAIT).await.expect("message");
    assert_eq!(m["data"], json!({"text": "hi"}), "{m}");
}

#[tokio::test]
async fn server_set_fields_are_not_trusted_and_unknown_fields_ignored() {
    let srv = Server::start("").await;
    let mut a = srv.user("alice").await;
    let mut b = srv.user("bob").await;
    a.request_ok(json!({"type": "join", "room": "public:t", "future_field": {"x": 1}}))
        .await;
    b.join("public:t").await;
    let ack = a
        .request_ok(json!({
            "type": "message", "room": "public:t", "data": {"k": "v"},
            "sender_id": "mallory", "id": "forged-id", "ts": "1999-01-01T00:00:00Z",
            "another_unknown": true
        }))
        .await;
    let m = b.recv_message("public:t", WAIT).await.expect("message");
    assert_eq!(
        m["sender_id"], "alice",
        "sender_id must come from the token: {m}"
    );
    assert_ne!(m["id"], "forged-id", "{m}");
    assert_eq!(m["id"], ack["data"]["id"], "{m}");
    assert_ne!(m["ts"], "1999-01-01T00:00:00Z", "{m}");
    // `room: null` is a valid envelope for a request that takes no room.
    a.send_json(&json!({"type": "ping", "room": null, "ref": "nullroom"}))
        .await;
    let p = a
        .recv_until(|v| v["ref"] == "nullroom", WAIT)
        .await
        .expect("reply to ping with room null");
    assert_eq!(p["type"], "pong", "{p}");
}

#[tokio::test]
async fn self_false_suppresses_only_own_messages() {
    let srv = Server::start("").await;
    let mut a = srv.user("alice").await;
    let mut b = srv.user("bob").await;
    a.request_ok(json!({"type": "join", "room": "public:q", "self": false}))
        .await;
    b.join("public:q").await;

    let id = a.publish("public:q", json!({"from": "alice"})).await;
    let m = b.recv_message("public:q", WAIT).await.expect("bob gets it");
    assert_eq!(m["id"], id.as_str());
    // Then bob publishes: alice must get bob's message but never her own.
    b.publish("public:q", json!({"from": "bob"})).await;
    let m = a
        .recv_message("public:q", WAIT)
        .await
        .expect("alice gets bob's message");
    assert_eq!(m["data"]["from"], "bob", "alice got her own message: {m}");
    let again = a
        .recv_until(
            |v| v["type"] == "message" && v["data"]["from"] == "alice",
            QUIET,
        )
        .await;
    assert!(
        again.is_none(),
        "self:false sender got own message: {again:?}"
    );

    // Default (self omitted) is true: bob gets his own message.
    let m = b
        .recv_until(
            |v| is_msg(v, "public:q") && v["data"]["from"] == "bob",
            WAIT,
        )
        .await;
    assert!(m.is_some(), "self defaults to true");
}

#[tokio::test]
async fn leave_stops_delivery() {
    let srv = Server::start("").await;
    let mut a = srv.user("alice").await;
    let mut b = srv.user("bob").await;
    a.join("public:l").await;
    b.join("public:l").await;
    a.publish("public:l", json!({"n": 1})).await;
    assert!(
        b.recv_message("public:l", WAIT).await.is_some(),
        "before leave"
    );

    b.leave("public:l").await;
    a.publish("public:l", json!({"n": 2})).await;
    // Alice (self) receives n=2, so the fan-out happened.
    a.recv_until(|v| is_msg(v, "public:l") && v["data"]["n"] == 2, WAIT)
        .await
        .expect("alice's own echo");
    let late = b.recv_until(|v| is_msg(v, "public:l"), QUIET).await;
    assert!(late.is_none(), "delivered after leave: {late:?}");
    b.assert_alive().await;
}

#[tokio::test]
async fn direct_reaches_every_connection_of_the_user() {
    let srv = Server::start("").await;
    let mut alice = srv.user("alice").await;
    let mut bob1 = srv.user("bob").await;
    let mut bob2 = srv.user("bob").await;
    let mut carol = srv.user("carol").await;

    alice
        .request_ok(json!({"type": "direct", "data": {"to": "bob", "x": 1}}))
        .await;
    for (i, b) in [&mut bob1, &mut bob2].into_iter().enumerate() {
        let d = b
            .recv_until(|v| v["type"] == "direct", WAIT)
            .await
            .unwrap_or_else(|| panic!("bob connection {i} missed the direct"));
        assert_eq!(d["data"], json!({"to": "bob", "x": 1}), "{d}");
        assert_eq!(d["sender_id"], "alice", "{d}");
    }
    let c = carol.recv_until(|v| v["type"] == "direct", QUIET).await;
    assert!(c.is_none(), "carol got {c:?}");
    let s = alice
        .recv_until(|v| v["type"] == "direct", Duration::from_millis(100))
        .await;
    assert!(s.is_none(), "sender got {s:?}");
}

// =============================================================================================
// Presence

fn diff_has(v: &Value, side: &str, user: &str) -> bool {
    v["type"] == "presence_diff"
        && v["data"][side]
            .get(user)
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
}

#[tokio::test]
async fn track_untrack_and_leave_produce_presence_diffs_and_state() {
    let srv = Server::start("").await;
    let room = "public:p";
    let mut a = srv.user("alice").await;
    let mut b = srv.user("bob").await;
    a.join(room).await;
    b.join(room).await;

    a.request_ok(json!({"type": "track", "room": room, "data": {"status": "online"}}))
        .await;
    for (who, cl) in [("bob", &mut b), ("alice", &mut a)] {
        let d = cl
            .recv_until(|v| diff_has(v, "joins", "alice"), WAIT)
            .await
            .unwrap_or_else(|| panic!("{who} got no presence_diff joins for alice"));
        assert_eq!(d["data"]["joins"]["alice"][0]["status"], "online", "{d}");
    }

    // A later joiner gets presence_state with alice's meta.
    let mut c = srv.user("carol").await;
    c.send_json(&json!({"type": "join", "room": room, "ref": "cj"}))
        .await;
    let st = c
        .recv_until(|v| v["type"] == "presence_state", WAIT)
        .await
        .expect("presence_state after join");
    let metas = st["data"]["alice"]
        .as_array()
        .expect("alice in presence_state");
    assert!(metas.iter().any(|m| m["status"] == "online"), "{st}");
    assert!(st["data"].get("bob").is_none(), "bob never tracked: {st}");
    let reply = c
        .recv_until(|v| is_reply_to(v, &json!("cj")), WAIT)
        .await
        .expect("join reply");
    assert_eq!(reply["type"], "ack");

    a.request_ok(json!({"type": "untrack", "room": room})).await;
    let d = b
        .recv_until(|v| diff_has(v, "leaves", "alice"), WAIT)
        .await
        .expect("presence_diff leaves after untrack");
    assert_eq!(d["data"]["leaves"]["alice"][0]["status"], "online", "{d}");

    // Track again, then leave: members see alice leave.
    b.request_ok(json!({"type": "track", "room": room, "data": {"status": "away"}}))
        .await;
    let d = a
        .recv_until(|v| diff_has(v, "joins", "bob"), WAIT)
        .await
        .expect("bob's join diff");
    assert_eq!(d["data"]["joins"]["bob"][0]["status"], "away");
    b.leave(room).await;
    a.recv_until(|v| diff_has(v, "leaves", "bob"), WAIT)
        .await
        .expect("presence_diff leaves after leave");
}

/// A presence diff overtakes the state of a join (injected: the state is sent 1 s after it
/// was read, and lee tracks meanwhile). Before: kim got lee's join diff, then the older state
/// without lee, which replaced it: kim never saw lee. Now the current state follows.
#[tokio::test]
async fn a_diff_that_overtakes_the_join_state_is_not_lost() {
    let srv = Server::start_with_env("", &[("RTGATE_FAULT_INJECTION", "1")]).await;
    let room = "public:fault-slow-presence";
    let mut kim = srv.user("kim").await;
    let mut lee = srv.user("lee").await;
    kim.send_json(&json!({"type": "join", "room": room, "ref": "kj"}))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    lee.join(room).await;
    lee.request_ok(json!({"type": "track", "room": room, "data": {"here": 1}}))
        .await;
    // Apply every presence frame as a client does: a state replaces, a diff adds.
    let mut view: HashMap<String, Value> = HashMap::new();
    let mut frames = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let Some(v) = kim.recv_json(Duration::from_millis(1500)).await else {
            break;
        };
        if v["room"] != room {
            continue;
        }
        match v["type"].as_str() {
            Some("presence_state") => {
                view = v["data"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
            }
            Some("presence_diff") => {
                for (user, metas) in v["data"]["joins"].as_object().cloned().unwrap_or_default() {
                    view.insert(user, metas);
                }
            }
            _ => {}
        }
        frames.push(v);
        if view.contains_key("lee") && frames.iter().any(|f| is_reply_to(f, &json!("kj"))) {
            break;
        }
    }
    assert!(
        frames.iter().any(|f| f["type"] == "presence_diff"),
        "the diff did not overtake the state: the test proves nothing: {frames:?}"
    );
    assert!(view.contains_key("lee"), "kim's view lost lee: {frames:?}");
}

#[tokio::test]
async fn abrupt_disconnect_of_tracked_client_produces_presence_leave() {
    let srv = Server::start("").await;
    let room = "public:abrupt";
    let mut a = srv.user("alice").await;
    let mut b = srv.user("bob").await;
    a.join(room).await;
    b.join(room).await;
    a.request_ok(json!({"type": "track", "room": room, "data": {"status": "online"}}))
        .await;
    b.recv_until(|v| diff_has(v, "joins", "alice"), WAIT)
        .await
        .expect("joins diff");
    // Drop the TCP stream without a close frame.
    drop(a);
    let d = b
        .recv_until(|v| diff_has(v, "leaves", "alice"), Duration::from_secs(5))
        .await
        .expect("no presence_diff leaves after abrupt disconnect");
    assert_eq!(d["data"]["leaves"]["alice"][0]["status"], "online", "{d}");
    let s = srv.wait_stats(WAIT, |s| s["connections"] == 1).await;
    assert_eq!(s["connections"], 1, "{s}");
}

// =============================================================================================
// Requests and replies

#[tokio::test]
async fn ping_gets_pong_with_ref_and_ws_ping_gets_pong() {
    let srv = Server::start("").await;
    let mut a = srv.user("alice").await;
    a.send_json(&json!({"type": "ping"})).await;
    let p = a.recv_json(WAIT).await.expect("pong");
    assert_eq!(p["type"], "pong", "{p}");
    a.send_json(&json!({"type": "ping", "ref": "p-1"})).await;
    let p = a.recv_json(WAIT).await.expect("pong");
    assert_eq!(p["type"], "pong", "{p}");
    assert_eq!(p["ref"], "p-1", "{p}");
    let more = a.collect_for(Duration::from_millis(200)).await;
    assert!(
        !more.iter().any(|v| v["ref"] == "p-1"),
        "a ping got more than one reply: {more:?}"
    );
    assert!(
        a.ws_ping_roundtrip(b"hello", WAIT).await,
        "no WebSocket pong for a ping control frame"
    );
}

#[tokio::test]
async fn every_ref_is_answered_exactly_once_and_verbatim() {
    let srv = Server::start("").await;
    let mut a = srv.user("alice").await;
    // (ref, request, expected reply type, expected error code)
    let cases: Vec<(Value, Value, &str, Option<&str>)> = vec![
        (
            json!("r-join"),
            json!({"type": "join", "room": "public:x"}),
            "ack",
            None,
        ),
        (
            json!(7),
            json!({"type": "message", "room": "public:x", "data": {"a": 1}}),
            "ack",
            None,
        ),
        (
            json!("7"),
            json!({"type": "message", "room": "public:x", "text": "t"}),
            "ack",
            None,
        ),
        (
            json!("007"),
            json!({"type": "track", "room": "public:x", "data": {"s": 1}}),
            "ack",
            None,
        ),
        (
            json!(1.5),
            json!({"type": "untrack", "room": "public:x"}),
            "ack",
            None,
        ),
        (
            json!("r-priv"),
            json!({"type": "join", "room": "private:bob"}),
            "error",
            Some("forbidden"),
        ),
        (
            json!("r-bad"),
            json!({"type": "join", "room": "bad room"}),
            "error",
            Some("bad_request"),
        ),
        (
            json!("r-unk"),
            json!({"type": "frobnicate"}),
            "error",
            Some("unknown_type"),
        ),
        (
            json!("r-noroom"),
            json!({"type": "message", "data": {}}),
            "error",
            Some("room_required"),
        ),
        (
            json!("r-direct"),
            json!({"type": "direct", "data": {"to": "bob"}}),
            "ack",
            None,
        ),
        (json!("r-ping"), json!({"type": "ping"}), "pong", None),
        (
            json!(0),
            json!({"type": "leave", "room": "public:x"}),
            "ack",
            None,
        ),
    ];
    for (r, req, _, _) in &cases {
        let mut req = req.clone();
        req["ref"] = r.clone();
        a.send_json(&req).await;
    }
    let reply_types = ["ack", "error", "pong"];
    let mut replies: Vec<Value> = Vec::new();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let done = cases
            .iter()
            .all(|(r, ..)| replies.iter().any(|v| v.get("ref") == Some(r)));
        if done {
            break;
        }
        match a
            .recv_json(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            Some(v) if reply_types.contains(&v["type"].as_str().unwrap_or("")) => replies.push(v),
            Some(_) => {}
            None => break,
        }
    }
    // Wait a little longer to catch duplicate replies.
    for v in a.collect_for(Duration::from_millis(300)).await {
        if reply_types.contains(&v["type"].as_str().unwrap_or("")) {
            replies.push(v);
        }
    }
    for (r, req, ty, code) in &cases {
        let mine: Vec<&Value> = replies.iter().filter(|v| v.get("ref") == Some(r)).collect();
        assert_eq!(
            mine.len(),
            1,
            "ref {r} ({req}) got {} replies: {mine:?}",
            mine.len()
        );
        assert_eq!(mine[0]["type"], *ty, "ref {r} ({req}): {}", mine[0]);
        if let Some(code) = code {
            assert_eq!(
                mine[0]["data"]["code"], *code,
                "ref {r} ({req}): {}",
                mine[0]
            );
        }
    }
    let strays: Vec<&Value> = replies
        .iter()
        .filter(|v| !cases.iter().any(|(r, ..)| v.get("ref") == Some(r)))
        .filter(|v| v.get("ref").is_some_and(|r| !r.is_null()))
        .collect();
    assert!(
        strays.is_empty(),
        "replies with refs never sent: {strays:?}"
    );
}

#[tokio::test]
async fn missing_room_is_room_required() {
    let srv = Server::start("").await;
    let mut a = srv.user("alice").await;
    a.request_err(json!({"type": "join"}), "room_required")
        .await;
    a.request_err(json!({"type": "join", "room": null}), "room_required")
        .await;
    a.request_err(
        json!({"type": "message", "data": {"x": 1}}),
        "room_required",
    )
    .await;
    a.request_err(json!({"type": "leave"}), "room_required")
        .await;
    a.request_err(json!({"type": "track", "data": {"s": 1}}), "room_required")
        .await;
    a.assert_alive().await;
}

// =============================================================================================
// Rooms and access

#[tokio::test]
async fn public_rooms_are_open_to_everyone_even_with_deny_policy() {
    let srv = Server::start("[rooms]\npolicy = \"deny\"\n").await;
    let mut a = srv.user("alice").await;
    let mut b = srv.user("bob").await;
    a.join("public:lobby").await;
    b.join("public:lobby").await;
    b.publish("public:lobby", json!({"hi": 1})).await;
    let m = a
        .recv_message("public:lobby", WAIT)
        .await
        .expect("delivered");
    assert_eq!(m["sender_id"], "bob");
}

#[tokio::test]
async fn private_room_acl_owner_other_and_admin() {
    let srv = Server::start("").await;
    let mut alice = srv.user("alice").await;
    let mut bob = srv.user("bob").await;
    let mut root = srv.admin("root").await;

    alice.join("private:alice").await;
    bob.request_err(
        json!({"type": "join", "room": "private:alice"}),
        "forbidden",
    )
    .await;
    bob.request_err(
        json!({"type": "message", "room": "private:alice", "data": {"spy": true}}),
        "forbidden",
    )
    .await;
    root.join("private:alice").await;

    let id = alice.publish("private:alice", json!({"n": 1})).await;
    let m = root
        .recv_message("private:alice", WAIT)
        .await
        .expect("admin member receives");
    assert_eq!(m["id"], id.as_str());
    // Bob's forbidden message was never published.
    let spy = alice.recv_until(|v| v["data"]["spy"] == true, QUIET).await;
    assert!(spy.is_none(), "forbidden message delivered: {spy:?}");
    // An admin may also publish there.
    root.publish("private:alice", json!({"from": "root"})).await;
    alice
        .recv_until(
            |v| is_msg(v, "private:alice") && v["data"]["from"] == "root",
            WAIT,
        )
        .await
        .expect("owner receives admin message");
    // The prefix must match the whole user id.
    alice
        .request_err(
            json!({"type": "join", "room": "private:alice2"}),
            "forbidden",
        )
        .await;
    bob.request_err(json!({"type": "join", "room": "private:bo"}), "forbidden")
        .await;
}

#[tokio::test]
async fn deny_policy_requires_admin_for_other_rooms() {
    let srv = Server::start("[rooms]\npolicy = \"deny\"\n").await;
    let mut alice = srv.user("alice").await;
    let mut root = srv.admin("root").await;
    alice
        .request_err(json!({"type": "join", "room": "team:core"}), "forbidden")
        .await;
    alice
        .request_err(
            json!({"type": "message", "room": "team:core", "data": {}}),
            "forbidden",
        )
        .await;
    alice.join("private:alice").await;
    root.join("team:core").await;
    root.publish("team:core", json!({"ok": 1})).await;
}

#[tokio::test]
async fn allow_policy_lets_users_into_other_rooms() {
    let srv = Server::start("[rooms]\npolicy = \"allow\"\n").await;
    let mut alice = srv.user("alice").await;
    let mut bob = srv.user("bob").await;
    alice.join("team:core").await;
    bob.join("team:core").await;
    alice.publish("team:core", json!({"n": 1})).await;
    bob.recv_message("team:core", WAIT)
        .await
        .expect("delivered");
}

#[tokio::test]
async fn room_names_are_validated() {
    let srv = Server::start("").await;
    let mut a = srv.user("alice").await;
    let long_ok = format!("public:{}", "a".repeat(200 - 7));
    assert_eq!(long_ok.len(), 200);
    let too_long = format!("public:{}", "a".repeat(201 - 7));
    let bad = [
        "public:lob by",
        "public:lobby/x",
        "public:lobby#1",
        "public:caf\u{e9}",
        "public:tab\there",
        "public:nul\u{0}",
        "public:*",
        too_long.as_str(),
    ];
    for room in bad {
        a.request_err(json!({"type": "join", "room": room}), "bad_request")
            .await;
    }
    a.request_err(
        json!({"type": "message", "room": "public:bad room", "data": {}}),
        "bad_request",
    )
    .await;
    // The empty name is invalid (1..200 bytes); `room_required` is tolerated here.
    let r = a.request(json!({"type": "join", "room": ""})).await;
    assert!(
        is_error(&r, "bad_request") || is_error(&r, "room_required"),
        "empty room name: {r}"
    );
    a.join(&long_ok).await;
    a.join("public:A-Z_a.b@c:9").await;
    a.join("x").await;
}

// =============================================================================================
// Bad frames

const SMALL_FRAMES: &str = "[ws]\nmax_frame_bytes = 1024\nmax_violations = 3\n";

fn oversized_ping(len: usize) -> String {
    let base = json!({"type": "ping", "pad": ""}).to_string();
    let v = json!({"type": "ping", "pad": pad(len - base.len())}).to_string();
    assert_eq!(v.len(), len);
    v
}

#[tokio::test]
async fn non_json_frame_gets_bad_request_and_connection_survives() {
    let srv = Server::start("").await;
    let mut a = srv.user("alice").await;
    a.send_text("this is not json").await;
    let e = a.recv_json(WAIT).await.expect("error frame");
    assert!(is_error(&e, "bad_request"), "{e}");
    a.send_text("{\"type\": ").await;
    let e = a.recv_json(WAIT).await.expect("error frame");
    assert!(is_error(&e, "bad_request"), "{e}");
    a.assert_alive().await;
}

#[tokio::test]
async fn binary_frame_gets_bad_request() {
    let srv = Server::start("").await;
    let mut a = srv.user("alice").await;
    a.send_raw(Message::binary(
        b"{\"type\":\"ping\",\"ref\":\"bin\"}".to_vec(),
    ))
    .await
    .unwrap();
    let e = a.recv_json(WAIT).await.expect("error frame");
    assert!(is_error(&e, "bad_request"), "{e}");
    a.assert_alive().await;
}

#[tokio::test]
async fn unknown_type_gets_unknown_type_error_without_close() {
    let srv = Server::start("").await;
    let mut a = srv.user("alice").await;
    a.request_err(
        json!({"type": "subscribe", "room": "public:x"}),
        "unknown_type",
    )
    .await;
    // Without ref, too.
    a.send_json(&json!({"type": "frobnicate"})).await;
    let e = a.recv_json(WAIT).await.expect("error frame");
    assert!(is_error(&e, "unknown_type"), "{e}");
    // Many unknown types are not abuse of the frame format: still open.
    for _ in 0..5 {
        a.request_err(json!({"type": "nope"}), "unknown_type").await;
    }
    a.assert_alive().await;
}

#[tokio::test]
async fn oversized_frame_gets_too_large_and_connection_survives() {
    let srv = Server::start(SMALL_FRAMES).await;
    let mut a = srv.user("alice").await;
    a.join("public:big").await;
    a.send_text(&oversized_ping(2000)).await;
    let e = a
        .recv_until(|v| v["type"] == "error", WAIT)
        .await
        .expect("error frame");
    assert!(is_error(&e, "too_large"), "{e}");
    a.assert_alive().await;
    // A frame just under the limit is fine.
    let data = json!({"pad": pad(900)});
    a.publish("public:big", data).await;
}

/// Sends bad frames one at a time (`make(i)`), each time reading the error (and a close frame
/// that may follow it); returns (number of bad frames sent when the close came, close code).
async fn send_violations_until_close(
    a: &mut Client,
    make: impl Fn(usize) -> Message,
    expect_code: &str,
) -> (usize, Option<u16>) {
    for i in 1..=6 {
        if let Err(e) = a.send_raw(make(i)).await {
            // The server may have closed right after the previous error.
            match a.next_event(Instant::now() + WAIT).await {
                Event::Close(code, _) => return (i - 1, Some(code)),
                other => panic!("send of violation {i} failed ({e}); then read {other:?}"),
            }
        }
        match a.next_event(Instant::now() + WAIT).await {
            Event::Json(v) => {
                assert!(is_error(&v, expect_code), "violation {i}: {v}");
            }
            Event::Close(code, _) => return (i, Some(code)),
            Event::Ended(e) => panic!("violation {i}: connection ended without close frame: {e}"),
            Event::Timeout => panic!("violation {i}: neither error nor close"),
        }
        // A close frame may follow the error at once.
        match a
            .next_event(Instant::now() + Duration::from_millis(200))
            .await
        {
            Event::Timeout => {}
            Event::Close(code, _) => return (i, Some(code)),
            Event::Json(v) => panic!("violation {i}: unexpected second frame {v}"),
            Event::Ended(e) => panic!("violation {i}: connection ended without close frame: {e}"),
        }
    }
    (7, None)
}

#[tokio::test]
async fn repeated_oversized_frames_close_with_1009() {
    let srv = Server::start(SMALL_FRAMES).await;
    let mut a = srv.user("alice").await;
    let (n, code) =
        send_violations_until_close(&mut a, |_| Message::text(oversized_ping(2000)), "too_large")
            .await;
    assert_eq!(code, Some(1009), "close code after {n} oversized frames");
    assert!(
        (3..=4).contains(&n),
        "closed after {n} oversized frames; max_violations = 3"
    );
}

#[tokio::test]
async fn repeated_binary_and_non_json_frames_close_with_1008() {
    let srv = Server::start(SMALL_FRAMES).await;
    let mut a = srv.user("alice").await;
    let make = |i: usize| {
        if i.is_multiple_of(2) {
            Message::binary(vec![1u8, 2, 3])
        } else {
            Message::text("not json")
        }
    };
    let (n, code) = send_violations_until_close(&mut a, make, "bad_request").await;
    assert_eq!(code, Some(1008), "close code after {n} bad frames");
    assert!(
        (3..=4).contains(&n),
        "closed after {n} bad frames; max_violations = 3"
    );
}

#[tokio::test]
async fn last_violation_oversized_closes_with_1009() {
    let srv = Server::start(SMALL_FRAMES).await;
    let mut a = srv.user("alice").await;
    for _ in 0..2 {
        a.send_text("garbage").await;
        let e = a.recv_json(WAIT).await.expect("error");
        assert!(is_error(&e, "bad_request"), "{e}");
    }
    let (n, code) =
        send_violations_until_close(&mut a, |_| Message::text(oversized_ping(2000)), "too_large")
            .await;
    assert_eq!(
        code,
        Some(1009),
        "closed after 2 bad + {n} oversized frames"
    );
    assert!(n <= 2, "closed only after 2 bad + {n} oversized frames");
}

#[tokio::test]
async fn far_oversized_frame_closes_with_1009_at_once() {
    let srv = Server::start(SMALL_FRAMES).await;
    let mut a = srv.user("alice").await;
    a.send_text(&oversized_ping(8 * 1024)).await;
    assert_eq!(a.expect_close(WAIT).await, Some(1009));
}

// =============================================================================================
// Rate limiting

const LOW_RATE: &str = "[ws]\nrate_limit_per_sec = 5\nrate_limit_burst = 5\n";

#[tokio::test]
async fn rate_limit_rejects_excess_requests_and_refills() {
    let srv = Server::start(LOW_RATE).await;
    let room = "public:rl";
    let mut a = srv.user("alice").await;
    let mut b = srv.user("bob").await;
    a.join(room).await;
    b.join(room).await;

    let n = 8;
    for i in 0..n {
        a.send_json(&json!({"type": "message", "room": room, "data": {"n": i}, "ref": i}))
            .await;
    }
    let mut replies: BTreeMap<i64, Vec<Value>> = BTreeMap::new();
    let deadline = Instant::now() + WAIT;
    for _ in 0..1000 {
        if (0..n).all(|i| replies.contains_key(&i)) || Instant::now() >= deadline {
            break;
        }
        let Some(v) = a
            .recv_until(
                |v| v["type"] == "ack" || v["type"] == "error",
                deadline.saturating_duration_since(Instant::now()),
            )
            .await
        else {
            break;
        };
        if let Some(r) = v["ref"].as_i64() {
            replies.entry(r).or_default().push(v);
        }
    }
    let more = a.collect_for(Duration::from_millis(200)).await;
    for v in more
        .into_iter()
        .filter(|v| v["type"] == "ack" || v["type"] == "error")
    {
        if let Some(r) = v["ref"].as_i64() {
            replies.entry(r).or_default().push(v);
        }
    }
    let mut acked = HashSet::new();
    let mut limited = 0;
    for i in 0..n {
        let rs = replies.get(&i).cloned().unwrap_or_default();
        assert_eq!(rs.len(), 1, "ref {i} replies: {rs:?}");
        if rs[0]["type"] == "ack" {
            acked.insert(i);
        } else {
            assert!(is_error(&rs[0], "rate_limited"), "ref {i}: {}", rs[0]);
            limited += 1;
        }
    }
    assert!(
        limited >= 2,
        "8 rapid requests with burst 5: only {limited} rate_limited"
    );
    assert!(acked.len() >= 3, "burst should allow some: acked {acked:?}");

    // Rejected messages were not published; accepted ones were.
    let got: Vec<Value> = b
        .collect_for(Duration::from_millis(500))
        .await
        .into_iter()
        .filter(|v| is_msg(v, room))
        .collect();
    let got_n: HashSet<i64> = got
        .iter()
        .map(|v| v["data"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(got_n, acked, "delivered set must equal acked set");

    // Tokens refill.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    a.publish(room, json!({"n": 100})).await;
}

#[tokio::test]
async fn rate_limit_flood_is_closed_with_1008() {
    let srv = Server::start(LOW_RATE).await;
    let mut a = srv.user("alice").await;
    a.join("public:flood").await;
    for i in 0..60 {
        let frame = json!({"type": "message", "room": "public:flood", "data": {"n": i}, "ref": i})
            .to_string();
        if a.send_raw(Message::text(frame)).await.is_err() {
            break;
        }
    }
    let code = a.expect_close(WAIT).await;
    assert_eq!(code, Some(1008), "flooding client close code");
    assert!(
        a.frames_before_close
            .iter()
            .any(|v| is_error(v, "rate_limited")),
        "expected rate_limited errors before the close: {:?}",
        a.frames_before_close.iter().take(10).collect::<Vec<_>>()
    );
}

// =============================================================================================
// History: since / history_gap

#[tokio::test]
async fn join_since_replays_later_messages_then_live() {
    let srv = Server::start("").await;
    let room = "public:h";
    let mut p = srv.user("pub").await;
    p.join(room).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(p.publish(room, json!({"seq": i})).await);
    }
    let mut r = srv.user("reader").await;
    r.send_json(&json!({"type": "join", "room": room, "since": ids[1], "ref": "js"}))
        .await;
    let reply = r
        .recv_until(|v| is_reply_to(v, &json!("js")), WAIT)
        .await
        .expect("join reply");
    assert_eq!(reply["type"], "ack", "{reply}");
    let mut seqs = Vec::new();
    for _ in 0..3 {
        let m = r.recv_message(room, WAIT).await.expect("replayed message");
        assert_eq!(m["id"], ids[seq_of(&m) as usize].as_str(), "{m}");
        seqs.push(seq_of(&m));
    }
    assert_eq!(seqs, vec![2, 3, 4], "replay after ids[1]");
    let live_id = p.publish(room, json!({"seq": 5})).await;
    let m = r.recv_message(room, WAIT).await.expect("live message");
    assert_eq!(seq_of(&m), 5);
    assert_eq!(m["id"], live_id.as_str());
    let dup = r.recv_until(|v| is_msg(v, room), QUIET).await;
    assert!(dup.is_none(), "unexpected extra message {dup:?}");

    // `since` = the latest id: nothing to replay.
    let mut r2 = srv.user("reader2").await;
    r2.request_ok(json!({"type": "join", "room": room, "since": live_id}))
        .await;
    let extra = r2.recv_until(|v| is_msg(v, room), QUIET).await;
    assert!(extra.is_none(), "replayed at/before since: {extra:?}");
}

#[tokio::test]
async fn join_since_has_no_gap_and_no_duplicate_under_concurrent_publishing() {
    let srv = Server::start("[broker]\nhistory_size = 1000\n").await;
    let room = "public:race";
    let total: i64 = 150;
    let mut p = srv.user("pub").await;
    p.request_ok(json!({"type": "join", "room": room, "self": false}))
        .await;
    let mut ids: Vec<String> = Vec::new();
    for i in 0..10 {
        ids.push(p.publish(room, json!({"seq": i})).await);
    }
    let progress = Arc::new(AtomicUsize::new(10));
    let prog = progress.clone();
    let publisher = tokio::spawn(async move {
        let mut ids = Vec::new();
        for i in 10..total {
            ids.push(p.publish(room, json!({"seq": i})).await);
            prog.store(i as usize + 1, Ordering::SeqCst);
        }
        ids
    });
    // Join while publishing is in full swing.
    let deadline = Instant::now() + WAIT;
    while progress.load(Ordering::SeqCst) < 40 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let at_join = progress.load(Ordering::SeqCst);
    let mut r = srv.user("reader").await;
    r.send_json(&json!({"type": "join", "room": room, "since": ids[4], "ref": "since"}))
        .await;

    let mut got: Vec<Value> = Vec::new();
    let mut reply = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..10_000 {
        if got.last().is_some_and(|m| seq_of(m) == total - 1) && reply.is_some() {
            break;
        }
        let Some(v) = r
            .recv_json(deadline.saturating_duration_since(Instant::now()))
            .await
        else {
            break;
        };
        if is_reply_to(&v, &json!("since")) {
            assert!(reply.is_none(), "second join reply: {v}");
            reply = Some(v);
        } else if is_msg(&v, room) {
            got.push(v);
        }
    }
    let later_ids = publisher.await.expect("publisher task");
    ids.extend(later_ids);
    let reply = reply.expect("no join reply");
    assert_eq!(reply["type"], "ack", "{reply}");
    // Anything still arriving would be a duplicate.
    for v in r.collect_for(Duration::from_millis(300)).await {
        if is_msg(&v, room) {
            got.push(v);
        }
    }
    let seqs: Vec<i64> = got.iter().map(seq_of).collect();
    let expected: Vec<i64> = (5..total).collect();
    assert_eq!(
        seqs, expected,
        "since replay must be gap-free, duplicate-free and ordered (joined when {at_join} were published)"
    );
    for m in &got {
        assert_eq!(m["id"], ids[seq_of(m) as usize].as_str(), "{}", short(m));
    }
}

#[tokio::test]
async fn join_since_older_than_history_reports_history_gap_then_live() {
    let srv = Server::start("[broker]\nhistory_size = 5\n").await;
    let room = "public:gap";
    let mut p = srv.user("pub").await;
    p.join(room).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(p.publish(room, json!({"seq": i})).await);
    }
    let mut r = srv.user("reader").await;
    r.send_json(&json!({"type": "join", "room": room, "since": ids[0], "ref": "g"}))
        .await;
    let reply = r
        .recv_until(|v| is_reply_to(v, &json!("g")), WAIT)
        .await
        .expect("join reply");
    assert!(
        is_error(&reply, "history_gap"),
        "since beyond history: {reply}"
    );

    // Still inside history: normal replay.
    let mut r2 = srv.user("reader2").await;
    r2.send_json(&json!({"type": "join", "room": room, "since": ids[16], "ref": "ok"}))
        .await;
    let reply2 = r2
        .recv_until(|v| is_reply_to(v, &json!("ok")), WAIT)
        .await
        .expect("join reply");
    assert_eq!(reply2["type"], "ack", "since inside history: {reply2}");
    let mut seqs2 = Vec::new();
    for _ in 0..3 {
        let m = r2.recv_message(room, WAIT).await.expect("replayed");
        seqs2.push(seq_of(&m));
    }
    assert_eq!(seqs2, vec![17, 18, 19]);

    // Then live messages reach the client that was told about the gap.
    p.publish(room, json!({"seq": 20})).await;
    let mut seqs = Vec::new();
    let deadline = Instant::now() + WAIT;
    for _ in 0..100 {
        let Some(m) = r
            .recv_message(room, deadline.saturating_duration_since(Instant::now()))
            .await
        else {
            break;
        };
        seqs.push(seq_of(&m));
        if seqs.last() == Some(&20) {
            break;
        }
    }
    for v in r.collect_for(Duration::from_millis(200)).await {
        if is_msg(&v, room) {
            seqs.push(seq_of(&v));
        }
    }
    assert_eq!(
        seqs.iter().filter(|s| **s == 20).count(),
        1,
        "live message: {seqs:?}"
    );
    assert!(
        seqs.iter().all(|s| *s >= 15) && seqs.windows(2).all(|w| w[0] < w[1]),
        "after a gap only retained messages, in order, may be replayed: {seqs:?}"
    );
    let extra: Vec<Value> = r
        .collect_for(Duration::from_millis(100))
        .await
        .into_iter()
        .filter(|v| is_reply_to(v, &json!("g")))
        .collect();
    assert!(extra.is_empty(), "second reply to the join: {extra:?}");
}

// =============================================================================================
// Slow consumers

const OVERFLOW_N: i64 = 400;

/// Joins a slow (non-reading, tiny receive buffer) client and pushes OVERFLOW_N ~32 KiB
/// messages through a publisher; returns the slow client once every publish was acked.
async fn flood_slow_consumer(srv: &Server, room: &str) -> Client {
    let mut slow = Client::connect_small_rcvbuf(&srv.ws_url(&token("slow", false, 3600))).await;
    slow.read_welcome().await;
    slow.join(room).await;

    let mut p = srv.user("pub").await;
    p.request_ok(json!({"type": "join", "room": room, "self": false}))
        .await;
    let filler = pad(32 * 1024 - 200);
    // One publish at a time: the publisher itself must never look like a slow consumer
    // (its acks share its own bounded queue).
    for i in 0..OVERFLOW_N {
        p.publish(room, json!({"seq": i, "pad": filler})).await;
    }
    p.assert_alive().await;
    slow
}

/// Reads what the slow client gets; stops at the last seq or after 1.5 s of silence.
async fn read_seqs(slow: &mut Client, room: &str) -> Vec<i64> {
    let mut seqs = Vec::new();
    for _ in 0..OVERFLOW_N * 2 {
        let Some(v) = slow.recv_json(Duration::from_millis(1500)).await else {
            break;
        };
        if is_msg(&v, room) {
            seqs.push(seq_of(&v));
            if seqs.last() == Some(&(OVERFLOW_N - 1)) {
                break;
            }
        }
    }
    seqs
}

async fn wait_metric(srv: &Server, name: &str, label: &str) -> f64 {
    let deadline = Instant::now() + WAIT;
    let mut v = srv.metric_sum(name, label).await;
    while v <= 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        v = srv.metric_sum(name, label).await;
    }
    v
}

#[tokio::test]
async fn slow_consumer_drop_oldest_keeps_newest() {
    let srv = Server::start(
        "[ws]\nsend_queue_max = 8\noverflow_policy = \"drop_oldest\"\nrate_limit_per_sec = 100000\nrate_limit_burst = 100000\n",
    )
    .await;
    let room = "public:slow";
    let mut slow = flood_slow_consumer(&srv, room).await;
    let dropped = wait_metric(
        &srv,
        "rtgate_dropped_frames_total",
        "policy=\"drop_oldest\"",
    )
    .await;
    assert!(dropped > 0.0, "no drop_oldest drops counted");

    let seqs = read_seqs(&mut slow, room).await;
    assert!(!seqs.is_empty(), "slow client got nothing");
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "order not kept: {seqs:?}"
    );
    assert!((seqs.len() as i64) < OVERFLOW_N, "nothing was dropped");
    assert_eq!(
        seqs.last(),
        Some(&(OVERFLOW_N - 1)),
        "drop_oldest must keep the newest message (got {} frames)",
        seqs.len()
    );
    slow.assert_alive().await;
}

#[tokio::test]
async fn slow_consumer_drop_new_keeps_oldest() {
    let srv = Server::start(
        "[ws]\nsend_queue_max = 8\noverflow_policy = \"drop_new\"\nrate_limit_per_sec = 100000\nrate_limit_burst = 100000\n",
    )
    .await;
    let room = "public:slow";
    let mut slow = flood_slow_consumer(&srv, room).await;
    let dropped = wait_metric(&srv, "rtgate_dropped_frames_total", "policy=\"drop_new\"").await;
    assert!(dropped > 0.0, "no drop_new drops counted");

    let seqs = read_seqs(&mut slow, room).await;
    assert!(!seqs.is_empty(), "slow client got nothing");
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "order not kept: {seqs:?}"
    );
    assert_eq!(seqs[0], 0, "drop_new must keep the oldest frames");
    assert!(
        !seqs.contains(&(OVERFLOW_N - 1)),
        "drop_new delivered the newest message although the queue was full ({} frames)",
        seqs.len()
    );
    slow.assert_alive().await;
}

#[tokio::test]
async fn slow_consumer_disconnect_policy_closes_with_1013() {
    let srv = Server::start(
        "[ws]\nsend_queue_max = 8\noverflow_policy = \"disconnect\"\nrate_limit_per_sec = 100000\nrate_limit_burst = 100000\n",
    )
    .await;
    let room = "public:slow";
    let mut slow = flood_slow_consumer(&srv, room).await;
    let code = slow.expect_close(Duration::from_secs(10)).await;
    assert_eq!(code, Some(1013), "slow consumer close code");
    let s = srv.wait_stats(WAIT, |s| s["connections"] == 1).await;
    assert_eq!(s["connections"], 1, "only the publisher remains: {s}");
}

// =============================================================================================
// Lifecycle: idle, close, drain

#[tokio::test]
async fn idle_reader_stays_connected_and_silent_client_is_closed() {
    let srv = Server::start("[ws]\nidle_timeout = \"2s\"\nping_interval = \"1s\"\n").await;
    let mut reader = srv.user("reader").await;
    let mut silent = srv.user("silent").await;
    // The reader sends nothing but keeps reading (and so auto-answers pings).
    let frames = reader.collect_for(Duration::from_millis(4500)).await;
    assert!(frames.is_empty(), "unexpected frames: {frames:?}");
    assert!(
        reader.pings_seen >= 2,
        "server sent {} pings in 4.5 s",
        reader.pings_seen
    );
    reader.assert_alive().await;

    // The silent client never read, so it never answered a ping: it must be gone.
    let _code = silent.expect_close(WAIT).await;
    let s = srv.wait_stats(WAIT, |s| s["connections"] == 1).await;
    assert_eq!(s["connections"], 1, "{s}");
}

#[tokio::test]
async fn client_close_1000_is_answered_and_cleans_up() {
    let srv = Server::start("").await;
    let mut a = srv.user("alice").await;
    a.join("public:bye").await;
    a.send_close(1000).await;
    assert_eq!(
        a.expect_close(WAIT).await,
        Some(1000),
        "the server must answer the client's close frame with a close frame (RFC 6455 5.5.1); \
         None = the connection ended without one"
    );
    let s = srv
        .wait_stats(WAIT, |s| s["connections"] == 0 && s["rooms"] == 0)
        .await;
    assert_eq!(s["connections"], 0, "{s}");
    assert_eq!(s["rooms"], 0, "{s}");
}

#[tokio::test]
async fn sigterm_drains_clients_with_1001_and_exits_0() {
    let mut srv = Server::start("[shutdown]\ngrace = \"3s\"\n").await;
    let mut a = srv.user("alice").await;
    let mut b = srv.user("bob").await;
    a.join("public:d").await;
    b.join("public:d").await;

    let t0 = Instant::now();
    srv.sigterm();
    let mut saw_503 = false;
    for _ in 0..100 {
        if t0.elapsed() > Duration::from_secs(2) {
            break;
        }
        let r = srv.http_client().get(srv.http("/readyz")).send().await;
        if let Ok(r) = r
            && r.status().as_u16() == 503
        {
            saw_503 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_503, "/readyz never answered 503 while draining");

    let mut codes: HashMap<&str, Option<u16>> = HashMap::new();
    for (who, c) in [("alice", &mut a), ("bob", &mut b)] {
        let code = c.expect_close(Duration::from_secs(6)).await;
        codes.insert(who, code);
        let draining = c
            .frames_before_close
            .iter()
            .any(|v| v["type"] == "system" && v["data"]["event"] == "draining");
        assert!(
            draining,
            "{who}: no draining notice before close: {:?}",
            c.frames_before_close
        );
    }
    let closed_after = t0.elapsed();
    assert_eq!(codes["alice"], Some(1001), "{codes:?}");
    assert_eq!(codes["bob"], Some(1001), "{codes:?}");
    assert!(
        closed_after <= Duration::from_millis(4500),
        "clients closed after {closed_after:?} (grace 3s)"
    );
    drop(a);
    drop(b);
    let status = srv.wait_exit(Duration::from_secs(8)).await;
    let status = status.unwrap_or_else(|| panic!("server did not exit\n{}", srv.logs()));
    assert!(status.success(), "exit status {status:?}\n{}", srv.logs());
}
