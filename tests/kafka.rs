//! rtgate instances sharing rooms through a real Kafka-compatible broker (tansu) started by the
//! harness; topics read back with a plain Kafka consumer; broker restart.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::kafka::{KafkaServer, require_kafka, require_persistent_kafka};
use common::redis::{RedisServer, require_redis};
use common::{Server, WAIT, messages_in};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use rtgate::broker::{
    Broker, Deliver, DirectMessage, KafkaBroker, MessageKind, PresenceDiff, ProbeTiming, RoomEvent,
    RoomMessage,
};
use rtgate::config::KafkaConfig;
use serde_json::{Value, json};

/// Gateway config for Kafka; presence and heartbeats through `redis` when given.
fn kafka_toml(kafka: &KafkaServer, redis: Option<&RedisServer>) -> String {
    let mut cfg = format!(
        r#"
[broker]
kind = "kafka"
[kafka]
brokers = ["{}"]
# Long enough for a first produce on a loaded 2-core CI machine (connection, metadata, topic),
# short enough that a refusal comes within the tests' 3 s reply wait.
publish_timeout = "2s"
[kafka.properties]
"batch.num.messages" = "1"
[heartbeat]
interval = "500ms"
ttl = "2s"
"#,
        kafka.addr()
    );
    if let Some(r) = redis {
        cfg.push_str(&format!("[redis]\nurl = \"{}\"\n", r.url()));
    }
    cfg
}

struct Discard;
impl Deliver for Discard {
    fn room_event(&self, _: Arc<RoomEvent>) {}
    fn direct(&self, _: Arc<DirectMessage>) {}
    fn presence(&self, _: Arc<PresenceDiff>) {}
}

#[tokio::test]
async fn a_plain_kafka_consumer_finds_the_envelope_header_and_escaped_topic() {
    if !require_kafka() {
        return;
    }
    let kafka = KafkaServer::start().await;
    let sink: Arc<dyn Deliver> = Arc::new(Discard);
    let cfg = KafkaConfig {
        brokers: vec![kafka.addr()],
        ..KafkaConfig::default()
    };
    let broker = KafkaBroker::start(cfg, "k1".into(), ProbeTiming::default(), sink).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !broker.is_ready() {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let id = broker
        .publish(RoomMessage {
            room: "public:lobby".into(),
            kind: MessageKind::Message,
            data: serde_json::value::to_raw_value(&json!({"text": "hi"})).unwrap(),
            sender_id: Some("alice".into()),
            ts_ms: 1_732_183_810_123,
            origin: None,
            traceparent: Some(traceparent.into()),
            idempotency_key: None,
        })
        .await
        .unwrap();
    assert_eq!(
        id.to_string(),
        "0-1",
        "first record: partition 0, offset 0, id offset + 1"
    );

    // rdkafka's own consumer, not rtgate's code path.
    let addr = kafka.addr();
    let (topic, payload, header) = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &addr)
            .set("group.id", "plain-reader")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("rt.room.public_3Alobby.v1", 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let header = m.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == "traceparent")
                        .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).to_string()))
                });
                return (
                    m.topic().to_string(),
                    String::from_utf8_lossy(m.payload().unwrap_or_default()).to_string(),
                    header,
                );
            }
        }
        panic!("no record read back");
    })
    .await
    .unwrap();
    assert_eq!(topic, "rt.room.public_3Alobby.v1");
    assert_eq!(header.as_deref(), Some(traceparent));
    let v: Value = serde_json::from_str(&payload).unwrap();
    assert_eq!(v["type"], "message", "{payload}");
    assert_eq!(v["room"], "public:lobby");
    assert_eq!(v["data"]["text"], "hi");
    assert_eq!(v["sender_id"], "alice");
    assert_eq!(v["ts"], "2024-11-21T10:10:10.123Z");
}

#[tokio::test]
async fn three_instances_exchange_room_and_direct_messages_and_replay() {
    if !require_kafka() || !require_redis() {
        return;
    }
    let kafka = KafkaServer::start().await;
    let redis = RedisServer::start_standalone().await;
    let cfg = kafka_toml(&kafka, Some(&redis));
    let a = Server::start(&cfg).await;
    let b = Server::start(&cfg).await;
    let c = Server::start(&cfg).await;
    a.wait_stats(Duration::from_secs(5), |s| s["instances"] == 3)
        .await;

    let room = "public:kafka";
    let mut on_a = a.user("alice").await;
    let mut on_b = b.user("bob").await;
    let mut on_c = c.user("carol").await;
    on_b.join(room).await;
    on_c.join(room).await;
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(on_a.publish(room, json!({ "n": n })).await);
    }
    for cl in [&mut on_b, &mut on_c] {
        let frames = cl.collect_for(Duration::from_millis(800)).await;
        let got: Vec<String> = messages_in(&frames, room)
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(got, ids, "each message once, in order, with the acked ids");
    }

    on_a.request_ok(json!({"type": "direct", "data": {"to": "carol", "k": 1}}))
        .await;
    let d = on_c
        .recv_until(|v| v["type"] == "direct", WAIT)
        .await
        .expect("direct across instances");
    assert_eq!(d["sender_id"], "alice");
    assert!(
        on_b.recv_until(|v| v["type"] == "direct", Duration::from_millis(300))
            .await
            .is_none(),
        "bob got carol's direct message"
    );

    // Written through A, replayed through C by a client that was not there.
    let mut late = c.user("dave").await;
    late.request_ok(json!({"type": "join", "room": room, "since": ids[14]}))
        .await;
    let frames = late.collect_for(Duration::from_millis(500)).await;
    let replayed: Vec<String> = messages_in(&frames, room)
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(replayed, ids[15..].to_vec());
}

#[tokio::test]
async fn broker_restart_keeps_clients_and_delivery_resumes() {
    if !require_kafka() {
        return;
    }
    let mut kafka = KafkaServer::start().await;
    let cfg = kafka_toml(&kafka, None);
    let a = Server::start(&cfg).await;
    let b = Server::start(&cfg).await;
    let room = "public:restart";
    let mut publisher = a.user("p").await;
    let mut sub = b.user("s").await;
    sub.join(room).await;
    // The broker has just started: the first produce may time out while the client connects
    // (CI saw it once); only a delivery before the restart matters here.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = publisher
            .request(json!({"type": "message", "room": room, "data": {"before": true}}))
            .await;
        if reply["type"] == "ack" {
            break;
        }
        assert_eq!(reply["data"]["code"], "unavailable", "{reply}");
        assert!(Instant::now() < deadline, "never acked before the restart");
    }
    assert!(sub.recv_message(room, WAIT).await.is_some());

    kafka.kill().await;
    // Refused within about kafka.publish_timeout; on a loaded CI machine, allow more than the
    // harness's usual 3 s reply wait.
    let asked = Instant::now();
    publisher
        .send_json(&json!({"type": "message", "room": room, "data": {"down": true}, "ref": "down"}))
        .await;
    let refused = publisher
        .recv_until(|v| v["ref"] == "down", Duration::from_secs(10))
        .await
        .expect("the publish is answered while Kafka is down");
    println!(
        "publish refused after {:?} with Kafka down",
        asked.elapsed()
    );
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["data"]["code"], "unavailable", "{refused}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.get("/readyz").await.0 != 503 {
        assert!(Instant::now() < deadline, "/readyz never turned 503");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    kafka.restart().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut acked = Vec::new();
    while Instant::now() < deadline && acked.len() < 5 {
        let reply = publisher
            .request(json!({"type": "message", "room": room, "data": {"after": acked.len()}}))
            .await;
        if reply["type"] == "ack" {
            acked.push(reply["data"]["id"].as_str().unwrap().to_string());
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert_eq!(acked.len(), 5, "publishing resumed after the restart");
    let frames = sub.collect_for(Duration::from_secs(3)).await;
    let got: Vec<String> = messages_in(&frames, room)
        .iter()
        .filter(|m| m["data"]["after"].is_number())
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        got, acked,
        "every message acked after the restart, once, in order"
    );
    sub.assert_alive().await;
    assert_eq!(a.get("/readyz").await.0, 200);
}

/// With a broker that persists (tansu on SQLite), every message acked before a SIGKILL of the
/// broker is still there after its restart: a live subscriber gets each once, and a `since`
/// from before the restart replays them all, then the new ones, in order.
#[tokio::test]
async fn acked_messages_survive_a_persistent_broker_restart() {
    if !require_persistent_kafka() {
        return;
    }
    let mut kafka = KafkaServer::start_persistent().await;
    let cfg = kafka_toml(&kafka, None);
    let a = Server::start(&cfg).await;
    let b = Server::start(&cfg).await;
    let room = "public:persist";
    let mut publisher = a.user("p").await;
    let mut live = b.user("live").await;
    live.join(room).await;
    let mut before = Vec::new();
    for n in 0..30 {
        before.push(publisher.publish(room, json!({"n": n})).await);
    }

    kafka.kill().await;
    kafka.restart().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut after = Vec::new();
    let mut n = 30;
    while Instant::now() < deadline && after.len() < 10 {
        let reply = publisher
            .request(json!({"type": "message", "room": room, "data": {"n": n}}))
            .await;
        if reply["type"] == "ack" {
            after.push(reply["data"]["id"].as_str().unwrap().to_string());
            n += 1;
        } else {
            assert_eq!(reply["data"]["code"], "unavailable", "{reply}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert_eq!(after.len(), 10, "publishing resumed after the restart");
    let all: Vec<String> = before.iter().chain(&after).cloned().collect();

    let frames = live.collect_for(Duration::from_secs(3)).await;
    let got: Vec<String> = messages_in(&frames, room)
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        got, all,
        "the live subscriber: every acked message once, in order"
    );
    live.assert_alive().await;

    // A `since` from before the restart: the records stored before it are still there.
    let mut late = a.user("late").await;
    let since = &before[4];
    let r = late.fresh_ref();
    late.send_json(&json!({"type": "join", "room": room, "since": since, "ref": r}))
        .await;
    let rv = json!(r);
    let mut replayed = Vec::new();
    for _ in 0..1000 {
        let v = late.recv_json(WAIT).await.expect("replay and ack");
        if common::is_reply_to(&v, &rv) {
            assert_eq!(v["type"], "ack", "join with since {since}: {v}");
            break;
        }
        if v["type"] == "message" {
            replayed.push(v["id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(replayed, all[5..].to_vec(), "replay after {since}");
}

#[tokio::test]
async fn a_frozen_broker_loses_no_acked_message() {
    if !require_kafka() {
        return;
    }
    let kafka = KafkaServer::start().await;
    let cfg = kafka_toml(&kafka, None);
    let a = Server::start(&cfg).await;
    let b = Server::start(&cfg).await;
    let room = "public:freeze";
    let mut sub = b.user("s").await;
    sub.join(room).await;
    let publisher = a.user("p").await;

    // A publisher sends numbered messages with `ref` every 20 ms for 8 s; the broker is
    // frozen (SIGSTOP) for 2 s in the middle, then resumed.
    let pubs = tokio::spawn(async move {
        let mut publisher = publisher;
        let mut acked = Vec::new();
        let started = Instant::now();
        let mut seq = 0u64;
        while started.elapsed() < Duration::from_secs(8) && seq < 1000 {
            seq += 1;
            let reply = publisher
                .request(json!({"type": "message", "room": room, "data": {"seq": seq}}))
                .await;
            if reply["type"] == "ack" {
                acked.push((seq, reply["data"]["id"].as_str().unwrap().to_string()));
            } else {
                assert_eq!(reply["data"]["code"], "unavailable", "{reply}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        publisher.assert_alive().await;
        acked
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    kafka.signal("STOP");
    tokio::time::sleep(Duration::from_secs(2)).await;
    kafka.signal("CONT");
    let acked = pubs.await.expect("publisher");
    let frames = sub.collect_for(Duration::from_secs(3)).await;
    sub.assert_alive().await;
    let got: Vec<(u64, String)> = messages_in(&frames, room)
        .iter()
        .map(|m| {
            (
                m["data"]["seq"].as_u64().unwrap(),
                m["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        acked.len() > 100,
        "publishing went on: {} acked\n{}",
        acked.len(),
        a.logs()
    );
    for (seq, id) in &acked {
        let copies = got.iter().filter(|(_, g)| g == id).count();
        assert_eq!(
            copies, 1,
            "acked message {seq} ({id}) delivered {copies} times"
        );
    }
    let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "out of order: {seqs:?}"
    );
}

/// Before: a consumer that stopped reading while Kafka still answered metadata left the
/// instance delivering nothing with `/readyz` 200. Now the self-probes (written to
/// `rt.probe.v1`, expected back through the consumer) miss, `/readyz` turns 503, the consumer
/// is restarted, and it resumes where it stopped: nothing published meanwhile is lost.
/// (The stuck consumer is injected: debug builds, `RTGATE_FAULT_INJECTION=1`.)
#[tokio::test]
async fn a_deaf_consumer_fails_its_probes_and_resumes_with_nothing_lost() {
    if !require_kafka() {
        return;
    }
    let kafka = KafkaServer::start().await;
    let cfg = kafka_toml(&kafka, None).replace(
        "kind = \"kafka\"",
        "kind = \"kafka\"\nprobe_interval = \"200ms\"\nprobe_timeout = \"1s\"",
    );
    let a = Server::start_with_env(&cfg, &[("RTGATE_FAULT_INJECTION", "1")]).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while a.get("/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready: {}", a.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let room = "public:fault-deaf";
    let mut sub = a.user("s").await;
    sub.join(room).await;
    let mut publisher = a.user("p").await;
    // The first record of the room makes the consumer stop reading.
    let mut ids = vec![publisher.publish(room, json!({"n": 0})).await];
    for n in 1..5 {
        ids.push(publisher.publish(room, json!({"n": n})).await);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.get("/readyz").await.0 != 503 {
        assert!(
            Instant::now() < deadline,
            "/readyz stayed 200 with a deaf consumer"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.get("/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready again: {}", a.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ids.push(publisher.publish(room, json!({"n": 5})).await);
    let frames = sub.collect_for(Duration::from_secs(2)).await;
    let got: Vec<String> = messages_in(&frames, room)
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        got, ids,
        "every message once, in order, across the consumer restart"
    );
    assert!(a.metric_sum("rtgate_broker_probes_missed_total", "").await >= 1.0);
    assert!(
        a.metric_sum("rtgate_task_restarts_total", "task=\"kafka-consumer\"")
            .await
            >= 1.0
    );
}

/// Kafka for messages, a Redis Cluster beside it for presence, heartbeats, occupancy and
/// idempotency keys: two instances see each other, share presence and the rooms listing, and
/// a repeated idempotency key publishes once.
#[tokio::test]
async fn a_redis_cluster_serves_as_the_registry() {
    if !require_kafka() || !require_redis() {
        return;
    }
    let kafka = KafkaServer::start().await;
    let topo = common::redis::ClusterTopology::start().await;
    let nodes: Vec<String> = topo
        .seed_addrs()
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect();
    let cfg =
        kafka_toml(&kafka, None) + &format!("[redis]\ncluster_nodes = [{}]\n", nodes.join(", "));
    let a = Server::start(&cfg).await;
    let b = Server::start(&cfg).await;
    let stats = a
        .wait_stats(Duration::from_secs(15), |s| s["instances"] == 2)
        .await;
    assert_eq!(stats["broker"], "kafka");
    let room = "public:kafka-cluster";
    let mut on_a = a.user("ann").await;
    let mut on_b = b.user("ben").await;
    on_a.join(room).await;
    on_a.request_ok(json!({"type": "track", "room": room, "data": {"at": "a"}}))
        .await;
    let joined = on_b.request(json!({"type": "join", "room": room})).await;
    assert_eq!(joined["type"], "ack", "{joined}");
    let state = on_b
        .recv_until(|v| v["type"] == "presence_state", WAIT)
        .await
        .expect("presence_state");
    assert_eq!(state["data"]["ann"][0]["at"], "a", "{state}");
    // Live presence diffs cross instances through the Cluster.
    on_b.request_ok(json!({"type": "track", "room": room, "data": {"at": "b"}}))
        .await;
    let diff = on_a
        .recv_until(
            |v| v["type"] == "presence_diff" && v["data"]["joins"]["ben"].is_array(),
            WAIT,
        )
        .await
        .expect("ben's join reaches A");
    assert_eq!(diff["room"], room);
    // Messages through Kafka, once, with an idempotency key kept in the Cluster.
    let first = on_a
        .request_ok(
            json!({"type": "message", "room": room, "data": {"n": 1}, "idempotency_key": "k1"}),
        )
        .await;
    let again = on_a
        .request_ok(
            json!({"type": "message", "room": room, "data": {"n": 1}, "idempotency_key": "k1"}),
        )
        .await;
    assert_eq!(first["data"]["id"], again["data"]["id"]);
    let frames = on_b.collect_for(Duration::from_millis(800)).await;
    assert_eq!(messages_in(&frames, room).len(), 1, "{frames:?}");
    // The rooms listing sums both instances.
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = a
            .http_client()
            .get(a.http("/api/v1/rooms"))
            .bearer_auth(common::API_KEY)
            .send()
            .await
            .map(|r| (r.status().as_u16(), r))
            .expect("GET /api/v1/rooms");
        assert_eq!(status, 200);
        let rooms: Value = body.json().await.expect("json");
        if rooms["rooms"] == json!([{"room": room, "members": 2}]) {
            break;
        }
        assert!(Instant::now() < deadline, "rooms listing: {rooms}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every record of `topic` read with a plain consumer: (id as rtgate gives it, payload).
async fn topic_records(kafka: &KafkaServer, topic: &str) -> Vec<(String, Value)> {
    let (addr, topic) = (kafka.addr(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &addr)
            .set("group.id", "plain-reader")
            .create()
            .unwrap();
        let (_, high) = consumer
            .fetch_watermarks(&topic, 0, Duration::from_secs(5))
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut next = 0;
        while next < high && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                next = m.offset() + 1;
                let v: Value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
                out.push((format!("0-{}", m.offset() + 1), v));
            }
        }
        assert!(next >= high, "read {next} of {high} records of {topic}");
        out
    })
    .await
    .unwrap()
}

/// Publishes with `key` until acked (retrying `unavailable` for up to 20 s); the id.
/// The id of the record of `topic` with `data.seq == seq`, once the broker has it (bounded).
async fn stored_id_of(kafka: &KafkaServer, topic: &str, seq: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records = topic_records(kafka, topic).await;
        if let Some((id, _)) = records.iter().find(|(_, v)| v["data"]["seq"] == seq) {
            return id.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the broker did not store seq {seq}: {records:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `data.seq` of every record of `topic`, in order.
async fn stored_seqs(kafka: &KafkaServer, topic: &str) -> Vec<u64> {
    topic_records(kafka, topic)
        .await
        .iter()
        .map(|(_, v)| v["data"]["seq"].as_u64().unwrap())
        .collect()
}

async fn publish_keyed_until_acked(
    server: &Server,
    client: &mut common::Client,
    room: &str,
    data: Value,
    key: &str,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = client
            .request(json!({"type": "message", "room": room, "data": data, "idempotency_key": key}))
            .await;
        if reply["type"] == "ack" {
            return reply["data"]["id"].as_str().unwrap().to_string();
        }
        assert_eq!(reply["data"]["code"], "unavailable", "{reply}");
        assert!(
            Instant::now() < deadline,
            "never acked: {reply}\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A keyed publish whose ack was lost: the broker stores the record, its answer is lost on
/// the way back (a proxy drops produce answers), the publish times out (`unavailable`).
/// Before: the retry with the same key stored it a second time under a new id, and every
/// subscriber got it twice. Now the retry finds the record by its key and is acked with its
/// id. Run with keys in this process (one instance) and in Redis (the retry through another
/// instance).
#[tokio::test]
async fn a_keyed_retry_after_a_lost_ack_is_not_stored_twice() {
    if !require_kafka() || !require_redis() {
        return;
    }
    let kafka = KafkaServer::start_with_ack_loss().await;
    let redis = RedisServer::start_standalone().await;
    for (case, with_redis) in [("in-process keys", false), ("keys in Redis", true)] {
        let cfg = kafka_toml(&kafka, with_redis.then_some(&redis));
        let a = Server::start(&cfg).await;
        let b = if with_redis {
            Some(Server::start(&cfg).await)
        } else {
            None
        };
        let room = if with_redis {
            "public:lost-ack-redis"
        } else {
            "public:lost-ack"
        };
        let mut sub = b.as_ref().unwrap_or(&a).user("s").await;
        sub.join(room).await;
        let mut first = a.user("p").await;
        first.publish(room, json!({"seq": 0})).await;

        kafka.lose_produce_acks(true);
        // Answered within twice kafka.publish_timeout.
        let reply = first
            .request_within(
                json!({"type": "message", "room": room, "data": {"seq": 1}, "idempotency_key": "k-1"}),
                Duration::from_secs(6),
            )
            .await;
        assert_eq!(reply["data"]["code"], "unavailable", "{case}: {reply}");
        kafka.lose_produce_acks(false);
        assert!(kafka.lost_produce_acks() > 0, "{case}: no ack was lost");

        // The broker took the record: this is the case under test.
        let topic = rtgate::broker::kafka::room_topic(room);
        let stored_id = stored_id_of(&kafka, &topic, 1).await;

        // The retry, through the other instance when keys are shared.
        let mut retrier = b.as_ref().unwrap_or(&a).user("p").await;
        let id = publish_keyed_until_acked(
            b.as_ref().unwrap_or(&a),
            &mut retrier,
            room,
            json!({"seq": 1}),
            "k-1",
        )
        .await;
        assert_eq!(
            id, stored_id,
            "{case}: the retry is acked with the stored id"
        );
        retrier.publish(room, json!({"seq": 2})).await;

        let seqs = stored_seqs(&kafka, &topic).await;
        assert_eq!(seqs, [0, 1, 2], "{case}: stored once each, in order");
        let frames = sub.collect_for(Duration::from_secs(2)).await;
        let got: Vec<u64> = messages_in(&frames, room)
            .iter()
            .map(|m| m["data"]["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(got, [0, 1, 2], "{case}: delivered once each, in order");
        println!(
            "{case}: the timed-out record was stored as {stored_id}; the retry was acked with it"
        );
    }
}

/// A keyed publish in flight when its connection drops (its ack is lost, so it stays in flight
/// for `kafka.publish_timeout`). Before: the session dropped the publish midway and its key
/// stayed claimed for `broker.idempotency_window` (5 min): the client's resend after
/// reconnecting was refused as in flight all that time. Now the publish runs to its end and
/// the resend is acked with the stored id.
#[tokio::test]
async fn a_keyed_publish_cut_off_by_a_disconnect_leaves_its_key_usable() {
    if !require_kafka() {
        return;
    }
    let kafka = KafkaServer::start_with_ack_loss().await;
    let a = Server::start(&kafka_toml(&kafka, None)).await;
    let room = "public:cut-off";
    let mut first = a.user("p").await;
    first.publish(room, json!({"seq": 0})).await;

    kafka.lose_produce_acks(true);
    first
        .send_json(&json!({"type": "message", "room": room, "data": {"seq": 1}, "idempotency_key": "k-cut"}))
        .await;
    let topic = rtgate::broker::kafka::room_topic(room);
    let stored_id = stored_id_of(&kafka, &topic, 1).await;
    // Gone while its publish waits for the lost ack.
    drop(first);
    kafka.lose_produce_acks(false);

    let mut again = a.user("p").await;
    let id = publish_keyed_until_acked(&a, &mut again, room, json!({"seq": 1}), "k-cut").await;
    assert_eq!(id, stored_id, "the resend is acked with the stored id");
    let seqs = stored_seqs(&kafka, &topic).await;
    assert_eq!(seqs, [0, 1], "stored once each");

    // The same through the server API: the caller hangs up while its broadcast waits.
    kafka.lose_produce_acks(true);
    let body =
        json!({"room": room, "type": "message", "data": {"seq": 2}, "idempotency_key": "k-api"});
    let hung_up = a
        .http_client()
        .post(a.http("/api/v1/broadcast"))
        .bearer_auth(common::API_KEY)
        .json(&body)
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(hung_up.is_err(), "the ack was lost: {hung_up:?}");
    kafka.lose_produce_acks(false);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let resp = a
            .http_client()
            .post(a.http("/api/v1/broadcast"))
            .bearer_auth(common::API_KEY)
            .json(&body)
            .send()
            .await
            .expect("broadcast");
        let status = resp.status().as_u16();
        let answer: Value = resp.json().await.expect("json answer");
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{answer}");
        assert!(Instant::now() < deadline, "never acked: {answer}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seqs = stored_seqs(&kafka, &topic).await;
    assert_eq!(seqs, [0, 1, 2], "the broadcast stored once");
}

/// The instance that claimed a key dies (SIGKILL) while its keyed publish waits for a lost
/// ack. Before: the key stayed claimed for `broker.idempotency_window` (5 min) and every
/// resend through another instance was refused as in flight. Now the claim's lease (four
/// times `kafka.publish_timeout`, plus 1 s) runs out, the resend takes it over, finds the
/// record and is acked with its id.
#[tokio::test]
async fn a_keyed_publish_whose_instance_died_is_found_after_the_claims_lease() {
    if !require_kafka() || !require_redis() {
        return;
    }
    let kafka = KafkaServer::start_with_ack_loss().await;
    let redis = RedisServer::start_standalone().await;
    let cfg = kafka_toml(&kafka, Some(&redis));
    let (a, b) = (Server::start(&cfg).await, Server::start(&cfg).await);
    let room = "public:claimer-died";
    let mut first = a.user("p").await;
    first.publish(room, json!({"seq": 0})).await;

    kafka.lose_produce_acks(true);
    first
        .send_json(&json!({"type": "message", "room": room, "data": {"seq": 1}, "idempotency_key": "k-died"}))
        .await;
    let topic = rtgate::broker::kafka::room_topic(room);
    let stored_id = stored_id_of(&kafka, &topic, 1).await;
    // SIGKILL, while the claim waits for the lost ack.
    drop(first);
    drop(a);
    kafka.lose_produce_acks(false);

    let started = Instant::now();
    let mut again = b.user("p").await;
    let id = publish_keyed_until_acked(&b, &mut again, room, json!({"seq": 1}), "k-died").await;
    assert_eq!(id, stored_id, "the resend is acked with the stored id");
    let seqs = stored_seqs(&kafka, &topic).await;
    assert_eq!(seqs, [0, 1], "stored once each");
    println!(
        "the dead instance's claim was taken over after {:?}",
        started.elapsed()
    );
}
