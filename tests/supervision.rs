//! Supervised delivery and self-probes against the real binary and real Redis: a receive task
//! that panics is restarted with nothing lost, and a master that can no longer serve the
//! instance (demoted with `REPLICAOF` under it) turns `/readyz` 503 until it can again.

mod common;

use std::time::Duration;

use common::redis::{RedisServer, redis_cmd, require_redis};
use common::*;
use serde_json::{Value, json};
use tokio::time::Instant;

async fn wait_ready(server: &Server, want: u16, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let (status, _) = server.get("/readyz").await;
        if status == want {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "/readyz never answered {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn numbers(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .map(|v| v["data"]["n"].as_u64().unwrap())
        .collect()
}

/// Before: a panic in the Redis receive task left the instance delivering nothing, with
/// `/readyz` 200. Now the task is restarted, rooms are resubscribed and caught up from the
/// stream, and the restart is counted.
#[tokio::test]
async fn a_panicking_redis_receiver_is_restarted_and_loses_nothing() {
    if !require_redis() {
        return;
    }
    let redis = RedisServer::start_standalone().await;
    let cfg = redis.broker_toml("", "");
    let a = Server::start(&cfg).await;
    let b = Server::start_with_env(&cfg, &[("RTGATE_FAULT_INJECTION", "1")]).await;
    let room = "public:steady";
    let mut sub = b.user("sub").await;
    sub.join(room).await;
    sub.join("public:fault-panic").await;
    let mut publisher = a.user("pub").await;
    let mut acked = Vec::new();
    for n in 0..40u64 {
        if n == 10 {
            // Panics B's receive task when it arrives there.
            publisher
                .publish("public:fault-panic", json!({"boom": true}))
                .await;
        }
        acked.push(publisher.publish(room, json!({"n": n})).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 40 && Instant::now() < deadline {
        if let Some(v) = sub.recv_message(room, Duration::from_millis(500)).await {
            got.push(v);
        }
    }
    assert_eq!(
        numbers(&got),
        (0..40).collect::<Vec<u64>>(),
        "all, once, in order"
    );
    let ids: Vec<&str> = got.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(ids, acked.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        b.metric_sum("rtgate_task_restarts_total", r#"task="redis-subscriber""#)
            .await,
        1.0,
        "{}",
        b.logs()
    );
    wait_ready(&b, 200, Duration::from_secs(5)).await;
    sub.assert_alive().await;
}

/// The scenario of centrifuge PR #594: the node under the instance stops being a master while
/// its connections stay open. The self-probe (a write and a publish through the command
/// connection, expected back on the subscription) fails, `/readyz` answers 503 and the miss is
/// counted; clients stay connected; once the node is a master again probes flow, `/readyz` is
/// 200 and delivery resumes.
#[tokio::test]
async fn a_master_demoted_under_the_instance_fails_its_probes_until_promoted_again() {
    if !require_redis() {
        return;
    }
    let redis = RedisServer::start_standalone().await;
    let other = RedisServer::start_standalone().await;
    let cfg = redis.broker_toml(
        "probe_interval = \"200ms\"\nprobe_timeout = \"500ms\"",
        "command_timeout = \"500ms\"",
    );
    let server = Server::start(&cfg).await;
    wait_ready(&server, 200, Duration::from_secs(5)).await;
    let room = "public:demoted";
    let mut sub = server.user("sub").await;
    sub.join(room).await;
    let mut publisher = server.user("pub").await;
    publisher.publish(room, json!({"n": 1})).await;
    assert!(sub.recv_message(room, WAIT).await.is_some());

    let port = other.port.to_string();
    let _: String = redis_cmd(redis.port, &["REPLICAOF", "127.0.0.1", &port])
        .await
        .unwrap();
    let took = wait_ready(&server, 503, Duration::from_secs(5)).await;
    println!("demoted: /readyz 503 after {} ms", took.as_millis());
    // Stays 503 while the node cannot serve (not flapping back to 200 on each reconnect).
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(server.get("/readyz").await.0, 503);
    }
    assert!(
        server
            .metric_sum("rtgate_broker_probes_missed_total", "")
            .await
            >= 1.0
    );
    let refused = publisher
        .request(json!({"type": "message", "room": room, "data": {"n": 2}}))
        .await;
    assert!(is_error(&refused, "unavailable"), "{refused}");

    let _: String = redis_cmd(redis.port, &["REPLICAOF", "NO", "ONE"])
        .await
        .unwrap();
    let took = wait_ready(&server, 200, Duration::from_secs(10)).await;
    println!("promoted again: /readyz 200 after {} ms", took.as_millis());
    let id = publisher.publish(room, json!({"n": 3})).await;
    let got = sub
        .recv_message(room, WAIT)
        .await
        .expect("delivery resumed");
    assert_eq!(got["id"], id.as_str());
    sub.assert_alive().await;
}
