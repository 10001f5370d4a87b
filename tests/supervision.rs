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

/// Before: an instance whose subscription dropped while the stream trimmed past its last
/// delivered message caught up with what was left and skipped the rest silently. Now its
/// members get an overflow notice from that id (and a rejoin from it answers `history_gap`).
#[tokio::test]
async fn a_catch_up_past_trimmed_history_is_announced() {
    if !require_redis() {
        return;
    }
    let redis = RedisServer::start_standalone().await;
    let cfg = redis.broker_toml("", "stream_maxlen = 5\ncommand_timeout = \"500ms\"");
    let a = Server::start(&cfg).await;
    let b = Server::start(&cfg).await;
    let room = "public:trimmed-catch-up";
    let mut sub = b.user("sub").await;
    sub.join(room).await;
    let mut publisher = a.user("pub").await;
    let first = publisher.publish(room, json!({"n": 0})).await;
    let v = sub.recv_message(room, WAIT).await.expect("first message");
    assert_eq!(v["id"], first.as_str());

    // Redis drops B's subscription once it falls 1 MiB behind; B is frozen meanwhile.
    // (A RESP3 subscriber counts as a normal client; the catch-up's replies stay below that.)
    let _: String = redis_cmd(
        redis.port,
        &[
            "CONFIG",
            "SET",
            "client-output-buffer-limit",
            "normal 1048576 1048576 0 pubsub 1048576 1048576 0",
        ],
    )
    .await
    .unwrap();
    let pid = b.pid().to_string();
    let signal = |s: &str| {
        std::process::Command::new("kill")
            .args([s, &pid])
            .status()
            .expect("kill");
    };
    signal("-STOP");
    let pad = "x".repeat(32 * 1024 - 200);
    let mut ids = vec![first];
    for n in 1..400 {
        ids.push(publisher.publish(room, json!({"n": n, "pad": pad})).await);
    }
    signal("-CONT");

    let mut received = vec![ids[0].clone()];
    let mut notice = None;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && received.last() != ids.last() {
        let Some(v) = sub.recv_json(Duration::from_millis(500)).await else {
            continue;
        };
        if v["type"] == "message" && v["room"] == room {
            received.push(v["id"].as_str().unwrap().to_string());
        } else if v["type"] == "system" && v["data"]["event"] == "overflow" {
            notice = Some((
                v["data"]["since"].as_str().unwrap().to_string(),
                received.len(),
            ));
        }
    }
    let (since, at) = notice.unwrap_or_else(|| {
        panic!(
            "the trimmed messages were not announced ({} of {} delivered)",
            received.len(),
            ids.len()
        )
    });
    println!(
        "catch-up past trimmed history: {} of {} delivered, notice since {since}",
        received.len(),
        ids.len()
    );
    assert_eq!(
        received.last(),
        ids.last(),
        "the retained messages are delivered"
    );
    assert_eq!(
        since,
        received[at - 1],
        "since = the last message given before the loss"
    );
    let mut expect = ids.iter().filter(|id| received.contains(id));
    assert!(
        received.iter().all(|r| expect.next() == Some(r)),
        "in order, each once"
    );
    assert!(received.len() < ids.len(), "messages were lost (trimmed)");
    assert!(b.metric_sum("rtgate_catch_up_lost_total", "").await >= 1.0);

    sub.leave(room).await;
    sub.request_err(
        json!({"type": "join", "room": room, "since": since}),
        "history_gap",
    )
    .await;
}
