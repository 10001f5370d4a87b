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

// ---- overflow notices ---------------------------------------------------------------------

fn parse_id(id: &str) -> (u64, u64) {
    let (hi, lo) = id.split_once('-').expect("id is <hi>-<lo>");
    (hi.parse().expect("hi"), lo.parse().expect("lo"))
}

/// A client that stops reading while ~12 MiB are published to its room loses frames to the
/// overflow policy; it is told, per room, from where to recover, and rejoining with that
/// `since` gives it back exactly what it missed.
async fn overflow_is_announced_and_recoverable(policy: &str) {
    const N: usize = 400;
    let server = Server::start(&format!(
        "[ws]\nsend_queue_max = 8\noverflow_policy = \"{policy}\"\n\
         rate_limit_per_sec = 100000\nrate_limit_burst = 100000\n\
         [broker]\nhistory_size = 2000\nreplay_limit = 2000"
    ))
    .await;
    let room = "public:overflow";
    let mut slow = Client::connect_small_rcvbuf(&server.ws_url(&token("slow", false, 3600))).await;
    slow.read_welcome().await;
    slow.join(room).await;
    let mut publisher = server.user("p").await;
    let filler = "x".repeat(32 * 1024 - 200);
    let mut ids = Vec::with_capacity(N);
    // One at a time: the publisher's own queue never overflows.
    for i in 0..N {
        ids.push(
            publisher
                .publish(room, json!({"n": i, "pad": filler}))
                .await,
        );
    }
    assert!(
        server
            .metric_sum(
                "rtgate_dropped_frames_total",
                &format!("policy=\"{policy}\"")
            )
            .await
            > 0.0,
        "the flood dropped nothing: the test proves nothing"
    );

    // Read everything: messages and notices, in arrival order.
    let mut received: Vec<String> = Vec::new();
    let mut notices: Vec<(String, usize)> = Vec::new(); // (since, messages received before it)
    for _ in 0..N * 4 {
        let Some(v) = slow.recv_json(Duration::from_millis(1500)).await else {
            break;
        };
        if v["type"] == "message" && v["room"] == room {
            received.push(v["id"].as_str().expect("id").to_string());
        } else if v["type"] == "system" && v["room"] == room && v["data"]["event"] == "overflow" {
            let since = v["data"]["since"].as_str().expect("since").to_string();
            notices.push((since, received.len()));
        }
    }
    assert!(
        !notices.is_empty(),
        "frames were dropped but no overflow notice came"
    );
    assert!(received.len() < N, "nothing was dropped for this client");
    for (since, seen_before) in &notices {
        assert!(
            received[..*seen_before].contains(since),
            "notice since {since} is not a message the client was given before it"
        );
    }
    // Every missed message is after the `since` of a notice.
    let missed: Vec<&String> = ids.iter().filter(|id| !received.contains(id)).collect();
    assert!(!missed.is_empty());
    for m in &missed {
        assert!(
            notices.iter().any(|(s, _)| parse_id(s) < parse_id(m)),
            "missed {m} is covered by no notice"
        );
    }

    // Recover as the SDK does: rejoin with each notice's `since`; nothing stays missing.
    let mut recovered: Vec<String> = received.clone();
    for (since, _) in &notices {
        slow.leave(room).await;
        let (replayed, reply) = join_since(&mut slow, room, since).await;
        assert_eq!(reply["type"], "ack", "rejoin with {since}: {reply}");
        for m in replayed {
            let id = m["id"].as_str().expect("id").to_string();
            if !recovered.contains(&id) {
                recovered.push(id);
            }
        }
    }
    recovered.sort_by_key(|id| parse_id(id));
    assert_eq!(
        recovered, ids,
        "after recovery every message is there exactly once"
    );
    assert!(server.metric_sum("rtgate_overflow_notices_total", "").await >= notices.len() as f64);
}

#[tokio::test]
async fn drop_oldest_overflow_is_announced_and_recoverable() {
    overflow_is_announced_and_recoverable("drop_oldest").await;
}

#[tokio::test]
async fn drop_new_overflow_is_announced_and_recoverable() {
    overflow_is_announced_and_recoverable("drop_new").await;
}

/// Publishes 400 messages of 32 KiB to `room`, one at a time, so that a member that stopped
/// reading (small receive buffer) loses frames to `policy`; returns the frames dropped so far
/// (asserted above zero: else the test proves nothing).
async fn flood_past_a_full_queue(
    server: &Server,
    publisher: &mut Client,
    room: &str,
    policy: &str,
) -> f64 {
    let filler = "x".repeat(32 * 1024 - 200);
    for i in 0..400 {
        publisher
            .publish(room, json!({"n": i, "pad": filler}))
            .await;
    }
    let dropped = server
        .metric_sum(
            "rtgate_dropped_frames_total",
            &format!("policy=\"{policy}\""),
        )
        .await;
    assert!(
        dropped > 0.0,
        "the flood dropped nothing: the test proves nothing"
    );
    dropped
}

/// The first message this instance delivers in a room is dropped for a slow member. Before:
/// its notice said `since` `0-0` (nothing delivered here yet), and the rejoin replayed the
/// room's whole history, messages from before the member joined included. Now the notice
/// names the stored message before the dropped one, and the rejoin gives back exactly that.
#[tokio::test]
async fn a_first_delivery_dropped_is_recovered_from_the_message_before_it() {
    const N: usize = 400;
    let server = Server::start(
        "[ws]\nsend_queue_max = 8\noverflow_policy = \"drop_new\"\n\
         rate_limit_per_sec = 100000\nrate_limit_burst = 100000\n\
         [broker]\nhistory_size = 2000\nreplay_limit = 2000",
    )
    .await;
    let (flood, late) = ("public:flood", "public:quiet");
    let mut publisher = server.user("p").await;
    let mut before = Vec::new();
    for i in 0..3 {
        before.push(publisher.publish(late, json!({"n": i})).await);
    }
    let mut slow = Client::connect_small_rcvbuf(&server.ws_url(&token("slow", false, 3600))).await;
    slow.read_welcome().await;
    slow.join(flood).await;
    slow.join(late).await;
    // The slow client stops reading: its queue fills and stays full.
    let dropped = flood_past_a_full_queue(&server, &mut publisher, flood, "drop_new").await;
    let lost = publisher.publish(late, json!({"n": 3})).await;
    assert!(
        server
            .metric_sum("rtgate_dropped_frames_total", "policy=\"drop_new\"")
            .await
            > dropped,
        "the quiet room's message was not dropped: the test proves nothing"
    );

    let mut notices = Vec::new();
    for _ in 0..N * 4 {
        let Some(v) = slow.recv_json(Duration::from_millis(1500)).await else {
            break;
        };
        assert!(
            !(v["type"] == "message" && v["room"] == late),
            "the quiet room's message was delivered: {v}"
        );
        if v["type"] == "system" && v["room"] == late && v["data"]["event"] == "overflow" {
            notices.push(v["data"]["since"].as_str().expect("since").to_string());
        }
    }
    assert_eq!(
        notices,
        [before[2].clone()],
        "one notice, from the message before"
    );
    // As the SDK does: leave, then join again with the notice's `since`.
    slow.leave(late).await;
    let (replayed, reply) = join_since(&mut slow, late, &notices[0]).await;
    assert_eq!(reply["type"], "ack", "{reply}");
    let ids: Vec<&str> = replayed.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [lost.as_str()], "exactly the dropped message");
}

/// A presence diff dropped by a slow member's overflow policy. Before: it was gone for good,
/// and the client kept a stale view of who is there (no notice, nothing to recover from).
/// Now the client gets the room's current presence once it reads again.
#[tokio::test]
async fn a_dropped_presence_diff_is_made_good_with_the_current_presence() {
    const N: usize = 400;
    let server = Server::start(
        "[ws]\nsend_queue_max = 8\noverflow_policy = \"drop_new\"\n\
         rate_limit_per_sec = 100000\nrate_limit_burst = 100000\n",
    )
    .await;
    let (flood, room) = ("public:flood-p", "public:who");
    let mut slow = Client::connect_small_rcvbuf(&server.ws_url(&token("slow", false, 3600))).await;
    slow.read_welcome().await;
    slow.join(flood).await;
    slow.join(room).await;
    let mut publisher = server.user("p").await;
    let dropped = flood_past_a_full_queue(&server, &mut publisher, flood, "drop_new").await;
    let mut tia = server.user("tia").await;
    tia.join(room).await;
    tia.request_ok(json!({"type": "track", "room": room, "data": {"here": 1}}))
        .await;
    assert!(
        server
            .metric_sum("rtgate_dropped_frames_total", "policy=\"drop_new\"")
            .await
            > dropped,
        "tia's presence diff was not dropped: the test proves nothing"
    );

    let mut state = None;
    for _ in 0..N * 4 {
        let Some(v) = slow.recv_json(Duration::from_millis(1500)).await else {
            break;
        };
        assert!(
            !(v["type"] == "presence_diff" && v["room"] == room),
            "the diff was dropped, yet delivered: {v}"
        );
        if v["type"] == "presence_state" && v["room"] == room && v["data"]["tia"].is_array() {
            state = Some(v);
            break;
        }
    }
    let state = state.expect("the current presence, with tia");
    assert_eq!(state["data"]["tia"][0]["here"], 1, "{state}");
    assert!(server.metric_sum("rtgate_presence_resent_total", "").await >= 1.0);
}

/// Publishes until an ack comes back (the broker may still be reconnecting); returns the id.
async fn publish_when_ready(c: &mut Client, room: &str, data: Value) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reply = c
            .request(json!({"type": "message", "room": room, "data": data}))
            .await;
        if reply["type"] == "ack" {
            return reply["data"]["id"].as_str().unwrap().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "publishing never resumed: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Redis restarted without its data: a `since` from before names history that no longer
/// exists. Before, the rejoin replayed whatever the new stream held, with no gap.
#[tokio::test]
async fn redis_that_lost_its_data_answers_history_gap() {
    use common::redis::{RedisServer, require_redis};
    if !require_redis() {
        return;
    }
    let mut redis = RedisServer::start_standalone().await;
    let cfg = redis.broker_toml("", "command_timeout = \"500ms\"");
    let server = Server::start(&cfg).await;
    let room = "public:lost";
    let mut publisher = server.user("p").await;
    let before = publish_many(&mut publisher, room, 5).await;
    // Sanity: before the loss, the same since replays what followed it.
    let (replayed, reply) = join_since(&mut server.user("a").await, room, &before[2]).await;
    assert_eq!(reply["type"], "ack", "{reply}");
    assert_eq!(numbers(&replayed), vec![3, 4]);

    redis.kill();
    redis.restart().await; // no persistence: it starts empty
    let mut after = Vec::new();
    for n in 10..13 {
        after.push(publish_when_ready(&mut publisher, room, json!({"n": n})).await);
    }
    for since in [&before[2], &before[4]] {
        let (replayed, reply) = join_since(&mut server.user("b").await, room, since).await;
        assert!(is_error(&reply, "history_gap"), "since {since}: {reply}");
        assert!(replayed.is_empty(), "nothing replayed: {replayed:?}");
    }
    // A since from the new history is no gap.
    let (replayed, reply) = join_since(&mut server.user("c").await, room, &after[0]).await;
    assert_eq!(reply["type"], "ack", "{reply}");
    assert_eq!(numbers(&replayed), vec![11, 12]);
}

/// The memory broker loses its history with the process: a `since` from before a restart is a
/// gap, not an empty replay.
#[tokio::test]
async fn a_since_from_before_a_memory_broker_restart_is_a_gap() {
    let room = "public:restarted";
    let old = {
        let server = Server::start("").await;
        let mut publisher = server.user("p").await;
        publish_many(&mut publisher, room, 3).await
    };
    let server = Server::start("").await;
    let (replayed, reply) = join_since(&mut server.user("a").await, room, &old[1]).await;
    assert!(is_error(&reply, "history_gap"), "{reply}");
    assert!(replayed.is_empty());
    let mut publisher = server.user("p").await;
    let new = publish_many(&mut publisher, room, 2).await;
    let (replayed, reply) = join_since(&mut server.user("b").await, room, &old[2]).await;
    assert!(
        is_error(&reply, "history_gap"),
        "still a gap with new messages: {reply}"
    );
    assert!(replayed.is_empty());
    let (replayed, reply) = join_since(&mut server.user("c").await, room, &new[0]).await;
    assert_eq!(reply["type"], "ack", "{reply}");
    assert_eq!(numbers(&replayed), vec![1]);
}

/// Live messages that arrive while a `since` replay is stuck behind a slow reader are held
/// for it, up to `broker.replay_limit`; beyond that they are not held but announced with an
/// overflow notice, and rejoining from its `since` recovers them: each message once.
#[tokio::test]
async fn live_messages_beyond_the_replay_buffer_are_announced_and_recoverable() {
    const BEFORE: usize = 500;
    const DURING: usize = 600;
    let server = Server::start(
        "[ws]\nsend_queue_max = 8\nrate_limit_per_sec = 100000\nrate_limit_burst = 100000\n\
         [broker]\nhistory_size = 5000\nreplay_limit = 500",
    )
    .await;
    let room = "public:replay-buffer";
    let mut publisher = server.user("p").await;
    let pad = "x".repeat(32 * 1024 - 200);
    let mut ids = Vec::new();
    for i in 0..BEFORE {
        ids.push(publisher.publish(room, json!({"n": i, "pad": pad})).await);
    }
    // 499 frames of 32 KiB to replay: far more than the socket buffers take, so the replay
    // waits for the reader while the next messages arrive live.
    let mut slow = Client::connect_small_rcvbuf(&server.ws_url(&token("slow", false, 3600))).await;
    slow.read_welcome().await;
    slow.send_json(&json!({"type": "join", "room": room, "since": ids[0], "ref": "j"}))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in BEFORE..BEFORE + DURING {
        ids.push(publisher.publish(room, json!({"n": i, "pad": pad})).await);
    }

    let mut received: Vec<String> = Vec::new();
    let mut notices: Vec<String> = Vec::new();
    let mut acked = false;
    for _ in 0..(BEFORE + DURING) * 4 {
        let Some(v) = slow.recv_json(Duration::from_millis(1500)).await else {
            break;
        };
        if v["ref"] == "j" {
            assert_eq!(v["type"], "ack", "{v}");
            acked = true;
        } else if v["type"] == "message" && v["room"] == room {
            received.push(v["id"].as_str().expect("id").to_string());
        } else if v["type"] == "system" && v["data"]["event"] == "overflow" {
            notices.push(v["data"]["since"].as_str().expect("since").to_string());
        }
    }
    assert!(acked, "the join was acked");
    let not_held = server
        .metric_sum("rtgate_dropped_frames_total", "policy=\"replay_buffer\"")
        .await;
    assert!(
        not_held > 0.0,
        "the replay was not stuck: the test proves nothing"
    );
    assert_eq!(notices.len(), 1, "one notice for the room: {notices:?}");
    // What came is the start of the sequence, in order, each once.
    assert_eq!(received, ids[1..1 + received.len()].to_vec());
    assert_eq!(
        notices[0],
        *received.last().unwrap(),
        "since = the last message given"
    );
    assert_eq!(
        received.len(),
        BEFORE - 1 + 500,
        "the replay, then the 500 live messages held (replay_limit)"
    );
    assert_eq!(not_held as usize, DURING - 500);

    slow.leave(room).await;
    let (replayed, reply) = join_since(&mut slow, room, &notices[0]).await;
    assert_eq!(reply["type"], "ack", "{reply}");
    let recovered: Vec<String> = replayed
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    received.extend(recovered);
    assert_eq!(received, ids[1..].to_vec(), "each message once, in order");
}
