//! `since` replays are complete and in order whatever the send queue size, or a `history_gap`
//! with nothing replayed: never a partial replay.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::time::Instant;

/// Publishes `n` messages `{"n": i}` to `room` as fast as the connection takes them; returns
/// their ids in order.
async fn publish_many(publisher: &mut Client, room: &str, n: usize) -> Vec<String> {
    for i in 0..n {
        publisher
            .send_json(&json!({"type": "message", "room": room, "data": {"n": i}, "ref": i}))
            .await;
    }
    let mut ids = vec![String::new(); n];
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let v = publisher
            .recv_json(left)
            .await
            .expect("acks for every publish");
        if v["type"] == "ack"
            && let Some(i) = v["ref"].as_u64()
        {
            ids[i as usize] = v["data"]["id"].as_str().expect("id").to_string();
            acked += 1;
        }
    }
    ids
}

/// Joins `room` with `since` and reads until the join's ack or error; returns the replayed
/// message frames and the reply.
async fn join_since(c: &mut Client, room: &str, since: &str) -> (Vec<Value>, Value) {
    c.send_json(&json!({"type": "join", "room": room, "since": since, "ref": "j"}))
        .await;
    let mut replayed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for _ in 0..200_000 {
        let left = deadline.saturating_duration_since(Instant::now());
        let v = c.recv_json(left).await.expect("the join is answered");
        if v["ref"] == "j" {
            return (replayed, v);
        }
        if v["type"] == "message" && v["room"] == room {
            replayed.push(v);
        }
    }
    panic!("no reply to the join");
}

fn numbers(frames: &[Value]) -> Vec<i64> {
    frames
        .iter()
        .filter_map(|m| m["data"]["n"].as_i64())
        .collect()
}

#[tokio::test]
async fn ten_thousand_message_replay_through_an_eight_frame_queue() {
    let server = Server::start(
        "[ws]\nsend_queue_max = 8\nrate_limit_per_sec = 100000\nrate_limit_burst = 100000\n\
         [broker]\nhistory_size = 20000\nreplay_limit = 20000",
    )
    .await;
    let room = "public:replay";
    let mut publisher = server.user("p").await;
    let ids = publish_many(&mut publisher, room, 10_001).await;
    let mut late = server.user("late").await;
    let (replayed, reply) = join_since(&mut late, room, &ids[0]).await;
    assert_eq!(reply["type"], "ack", "{reply}");
    let want: Vec<i64> = (1..10_001).collect();
    assert_eq!(
        numbers(&replayed),
        want,
        "every message after `since`, in order, once"
    );
    let got_ids: Vec<&str> = replayed.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(
        got_ids,
        ids[1..].iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(
        server.metric_sum("rtgate_dropped_frames_total", "").await,
        0.0,
        "nothing went through the overflow policy"
    );
    // Live messages follow.
    publisher.publish(room, json!({"n": 20_000})).await;
    let live = late
        .recv_message(room, WAIT)
        .await
        .expect("live after replay");
    assert_eq!(live["data"]["n"], 20_000);
}

#[tokio::test]
async fn replay_larger_than_the_default_queue_is_complete() {
    // The defaults (queue 100, drop_oldest, history 1000): 600 messages after `since`.
    let server =
        Server::start("[ws]\nrate_limit_per_sec = 100000\nrate_limit_burst = 100000").await;
    let room = "public:defaults";
    let mut publisher = server.user("p").await;
    let ids = publish_many(&mut publisher, room, 601).await;
    let mut late = server.user("late").await;
    let (replayed, reply) = join_since(&mut late, room, &ids[0]).await;
    assert_eq!(reply["type"], "ack", "{reply}");
    assert_eq!(numbers(&replayed), (1..601).collect::<Vec<i64>>());
}

#[tokio::test]
async fn more_missing_than_the_replay_limit_is_a_gap_with_nothing_replayed() {
    let server = Server::start(
        "[ws]\nrate_limit_per_sec = 100000\nrate_limit_burst = 100000\n[broker]\nreplay_limit = 50",
    )
    .await;
    let room = "public:limit";
    let mut publisher = server.user("p").await;
    let ids = publish_many(&mut publisher, room, 61).await;
    let mut late = server.user("late").await;
    let (replayed, reply) = join_since(&mut late, room, &ids[0]).await;
    assert!(is_error(&reply, "history_gap"), "{reply}");
    assert!(
        replayed.is_empty(),
        "no partial replay: {:?}",
        numbers(&replayed)
    );
    // Exactly the limit is still replayed in full.
    let (replayed, reply) = join_since(&mut server.user("edge").await, room, &ids[10]).await;
    assert_eq!(reply["type"], "ack", "{reply}");
    assert_eq!(numbers(&replayed), (11..61).collect::<Vec<i64>>());
    // The gapped client gets live messages.
    publisher.publish(room, json!({"n": 100})).await;
    let live = late
        .recv_message(room, WAIT)
        .await
        .expect("live after the gap");
    assert_eq!(live["data"]["n"], 100);
}
