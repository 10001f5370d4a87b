//! Idempotent publish against the real binary: a repeated `idempotency_key` by the same sender
//! in the same room is acked with the first id and publishes nothing, over WebSocket and REST,
//! on one instance and across instances sharing Redis.

mod common;

use std::time::Duration;

use common::redis::{RedisServer, require_redis};
use common::*;
use serde_json::{Value, json};

fn keyed(room: &str, n: u64, key: &str) -> Value {
    json!({"type": "message", "room": room, "data": {"n": n}, "idempotency_key": key})
}

/// Every `message` frame of `room` that arrives within `t`.
async fn drain_messages(c: &mut Client, room: &str, t: Duration) -> Vec<Value> {
    let mut got = Vec::new();
    while let Some(v) = c.recv_message(room, t).await {
        got.push(v);
    }
    got
}

fn ids(frames: &[Value]) -> Vec<&str> {
    frames.iter().map(|v| v["id"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn a_repeated_key_is_acked_with_the_first_id_and_delivered_once() {
    let server = Server::start("").await;
    let room = "public:idem";
    let mut sub = server.user("sub").await;
    sub.join(room).await;
    let mut alice = server.user("alice").await;

    let first = alice.request_ok(keyed(room, 1, "send-1")).await;
    let first_id = first["data"]["id"].as_str().unwrap().to_string();
    // A retry on the same connection and on a new connection of the same user.
    let again = alice.request_ok(keyed(room, 2, "send-1")).await;
    assert_eq!(again["data"]["id"], first_id.as_str());
    let mut alice_again = server.user("alice").await;
    let again = alice_again.request_ok(keyed(room, 3, "send-1")).await;
    assert_eq!(again["data"]["id"], first_id.as_str());
    // Another user's identical key is another message.
    let mut bob = server.user("bob").await;
    let bobs = bob.request_ok(keyed(room, 4, "send-1")).await;
    let bobs_id = bobs["data"]["id"].as_str().unwrap().to_string();
    assert_ne!(bobs_id, first_id);

    // REST: the server's own scope, same rule.
    let body =
        json!({"room": room, "type": "message", "data": {"n": 5}, "idempotency_key": "send-1"});
    let (status, reply) = server.broadcast(Some(API_KEY), &body).await;
    assert_eq!(status, 200, "{reply}");
    let rest_id = serde_json::from_str::<Value>(&reply).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, reply) = server.broadcast(Some(API_KEY), &body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        serde_json::from_str::<Value>(&reply).unwrap()["id"],
        rest_id.as_str()
    );

    let got = drain_messages(&mut sub, room, Duration::from_millis(500)).await;
    assert_eq!(
        ids(&got),
        vec![first_id.as_str(), bobs_id.as_str(), rest_id.as_str()],
        "each message once: {got:?}"
    );
    assert_eq!(got[0]["data"]["n"], 1, "the first payload is the one kept");
    assert_eq!(
        server
            .metric_sum("rtgate_idempotent_repeats_total", "")
            .await,
        3.0
    );

    // Bad keys are refused, naming the rule, and publish nothing.
    for bad in [
        json!(""),
        json!("x".repeat(65)),
        json!("no spaces"),
        json!(7),
    ] {
        let reply = alice
            .request(
                json!({"type": "message", "room": room, "data": {"n": 9}, "idempotency_key": bad}),
            )
            .await;
        assert_eq!(reply["type"], "error", "{reply}");
    }
    let (status, _) = server
        .broadcast(
            Some(API_KEY),
            &json!({"room": room, "data": {}, "idempotency_key": "bad key"}),
        )
        .await;
    assert_eq!(status, 400);
    let got = drain_messages(&mut sub, room, Duration::from_millis(300)).await;
    assert!(got.is_empty(), "refused publishes deliver nothing: {got:?}");
}

#[tokio::test]
async fn a_key_repeated_through_another_instance_publishes_once_over_redis() {
    if !require_redis() {
        return;
    }
    let redis = RedisServer::start_standalone().await;
    let cfg = redis.broker_toml("", "");
    let (a, b) = (Server::start(&cfg).await, Server::start(&cfg).await);
    let room = "public:idem-redis";
    let mut sub = b.user("sub").await;
    sub.join(room).await;
    let mut on_a = a.user("alice").await;
    let mut on_b = b.user("alice").await;
    let mut first_ids = Vec::new();
    for n in 0..20u64 {
        let key = format!("k-{n}");
        let first = on_a.request_ok(keyed(room, n, &key)).await;
        // The retry lands on the other instance, as after a reconnect through a load balancer.
        let again = on_b.request_ok(keyed(room, n + 100, &key)).await;
        assert_eq!(again["data"]["id"], first["data"]["id"]);
        first_ids.push(first["data"]["id"].as_str().unwrap().to_string());
    }
    let got = drain_messages(&mut sub, room, Duration::from_millis(500)).await;
    assert_eq!(ids(&got), first_ids, "20 messages, each once, in order");
    assert!(got.iter().all(|v| v["data"]["n"].as_u64().unwrap() < 100));
}
