//! One trace per message across instances, exported to a real OpenTelemetry collector (rotel):
//! the publish span on the publishing instance, a process span on each delivering instance as
//! its child. With the Redis broker and with Kafka. And a collector that is away blocks nothing.

mod common;

use std::time::Duration;

use common::kafka::{KafkaServer, require_kafka};
use common::otel::{Collector, ReceivedSpan, require_rotel};
use common::redis::{RedisServer, require_redis};
use common::{Server, WAIT};
use serde_json::json;

/// Instance `id` exporting to the collector, over gRPC or HTTP.
fn traced_toml(broker_toml: &str, id: &str, endpoint: &str, protocol: &str) -> String {
    format!(
        "{broker_toml}\n[server]\ninstance_id = \"{id}\"\n[telemetry]\notlp_endpoint = \"{endpoint}\"\notlp_protocol = \"{protocol}\"\n"
    )
}

/// Publishes through instance-a, delivers on instance-b, and checks the trace.
async fn one_trace_across_instances(broker_toml: &str, system: &str) {
    let collector = Collector::start().await;
    let grpc = format!("http://127.0.0.1:{}", collector.grpc_port);
    let http = format!("http://127.0.0.1:{}", collector.http_port);
    let a = Server::start(&traced_toml(broker_toml, "instance-a", &grpc, "grpc")).await;
    let b = Server::start(&traced_toml(broker_toml, "instance-b", &http, "http")).await;
    let room = "public:traced";
    let mut member = b.user("bob").await;
    member.join(room).await;
    let mut publisher = a.user("alice").await;
    let id = publisher.publish(room, json!({"text": "traced"})).await;
    let got = member
        .recv_message(room, WAIT)
        .await
        .expect("delivered on B");
    assert_eq!(got["id"], id.as_str());

    let is_publish = |s: &ReceivedSpan| {
        s.name == format!("{room} publish") && s.attr("messaging.message.id") == Some(&id)
    };
    let spans = collector
        .wait_for(
            "publish on A and process on B",
            Duration::from_secs(10),
            |spans| {
                spans.iter().any(is_publish)
                    && spans.iter().any(|s| {
                        s.name == format!("{room} process")
                            && s.instance == "instance-b"
                            && s.attr("messaging.message.id") == Some(&id)
                    })
            },
        )
        .await;
    let publish = spans.iter().find(|s| is_publish(s)).unwrap();
    assert_eq!(publish.instance, "instance-a");
    assert_eq!(publish.kind, "SPAN_KIND_PRODUCER");
    assert_eq!(publish.attr("messaging.system"), Some(system));
    assert_eq!(publish.attr("messaging.destination.name"), Some(room));
    let process = spans
        .iter()
        .find(|s| {
            s.name == format!("{room} process")
                && s.instance == "instance-b"
                && s.attr("messaging.message.id") == Some(&id)
        })
        .unwrap();
    assert_eq!(process.kind, "SPAN_KIND_CONSUMER");
    assert_eq!(process.trace_id, publish.trace_id, "one trace");
    assert_eq!(
        process.parent_id, publish.id,
        "B's process span is a child of A's publish span"
    );
    assert_eq!(process.attr("rtgate.recipients"), Some("1"));
    // The publish span is a child of the frame that carried it.
    let receive = spans
        .iter()
        .find(|s| s.id == publish.parent_id)
        .expect("the publish span's parent was exported");
    assert_eq!(receive.name, "ws.receive");
    assert_eq!(receive.instance, "instance-a");
}

#[tokio::test]
async fn one_trace_per_message_through_redis() {
    if !require_rotel() || !require_redis() {
        return;
    }
    let redis = RedisServer::start_standalone().await;
    let broker = format!(
        "[broker]\nkind = \"redis\"\n[redis]\nurl = \"{}\"\n",
        redis.url()
    );
    one_trace_across_instances(&broker, "redis").await;
}

#[tokio::test]
async fn one_trace_per_message_through_kafka() {
    if !require_rotel() || !require_kafka() {
        return;
    }
    let kafka = KafkaServer::start().await;
    let broker = format!(
        "[broker]\nkind = \"kafka\"\n[kafka]\nbrokers = [\"{}\"]\n[kafka.properties]\n\"batch.num.messages\" = \"1\"\n",
        kafka.addr()
    );
    one_trace_across_instances(&broker, "kafka").await;
}

#[tokio::test]
async fn a_collector_that_is_away_blocks_nothing_and_drops_are_counted() {
    // Nothing listens on this port: every export fails.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let srv = Server::start(&format!(
        "[telemetry]\notlp_endpoint = \"{endpoint}\"\nspan_queue_size = 16\n"
    ))
    .await;
    let room = "public:untraced";
    let mut member = srv.user("m").await;
    member.join(room).await;
    let mut publisher = srv.user("p").await;
    let started = std::time::Instant::now();
    for n in 0..200 {
        publisher.publish(room, json!({ "n": n })).await;
    }
    let took = started.elapsed();
    let mut received = 0;
    while member
        .recv_message(room, Duration::from_millis(500))
        .await
        .is_some()
    {
        received += 1;
        if received == 200 {
            break;
        }
    }
    assert_eq!(received, 200, "every message delivered");
    assert!(took < Duration::from_secs(10), "publishing took {took:?}");
    let dropped = srv.metric_sum("rtgate_span_export_dropped_total", "").await;
    assert!(
        dropped > 0.0,
        "spans beyond the queue are dropped and counted: {dropped}"
    );
}

#[tokio::test]
async fn json_log_lines_carry_trace_and_span_ids() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let srv = Server::start(&format!(
        "[telemetry]\notlp_endpoint = \"{endpoint}\"\nlog_format = \"json\"\nlog_level = \"rtgate=debug,info\"\n"
    ))
    .await;
    let room = "public:logged";
    let mut member = srv.user("m").await;
    member.join(room).await;
    let id = member.publish(room, json!({"x": 1})).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let line = loop {
        let found = srv.logs().lines().find_map(|l| {
            let json = l.split_once(' ').map(|(_, j)| j)?;
            let v: serde_json::Value = serde_json::from_str(json).ok()?;
            (v["fields"]["message"] == "fan-out" && v["fields"]["id"] == id.as_str()).then_some(v)
        });
        if let Some(v) = found {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no fan-out log line: {}",
            srv.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let trace_id = line["trace_id"].as_str().expect("trace_id on the line");
    let span_id = line["span_id"].as_str().expect("span_id on the line");
    assert_eq!(trace_id.len(), 32, "{line}");
    assert_eq!(span_id.len(), 16, "{line}");
    assert_eq!(line["level"], "DEBUG");
}
