//! Self-test of the Redis harness (`tests/common/redis.rs`): real redis-server / redis-sentinel.

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use common::redis::{ClusterTopology, RedisServer, SentinelTopology, redis_cmd, require_redis};

/// Compile-time check that the harness futures can run inside `tokio::spawn`.
fn send<F: Future + Send>(f: F) -> F {
    f
}

#[tokio::test]
async fn standalone_start_kill_restart_same_port() {
    if !require_redis() {
        return;
    }
    let mut server = send(RedisServer::start_standalone()).await;
    let port = server.port;
    assert_eq!(server.url(), format!("redis://127.0.0.1:{port}"));
    let pong: String = redis_cmd(port, &["PING"]).await.expect("PING");
    assert_eq!(pong, "PONG");
    let first_pid = server.pid();

    server.kill();
    assert!(
        redis_cmd::<String>(port, &["PING"]).await.is_err(),
        "PING answered after SIGKILL"
    );

    let t = Instant::now();
    send(server.restart()).await;
    eprintln!("standalone restart on port {port} took {:?}", t.elapsed());
    assert_eq!(server.port, port);
    assert_ne!(server.pid(), first_pid);
    let pong: String = redis_cmd(port, &["PING"])
        .await
        .expect("PING after restart");
    assert_eq!(pong, "PONG");
}

#[tokio::test]
async fn sentinel_topology_comes_up_healthy() {
    if !require_redis() {
        return;
    }
    let t = Instant::now();
    let topo = send(SentinelTopology::start()).await;
    eprintln!("sentinel topology up in {:?}", t.elapsed());
    assert_eq!(topo.master_name, "rtmaster");
    assert_eq!(topo.sentinel_addrs().len(), 3);
    assert_eq!(topo.node_ports().len(), 3);
    assert_eq!(topo.pids().len(), 6);
    assert_eq!(
        send(topo.master_addr()).await,
        format!("127.0.0.1:{}", topo.initial_master_port())
    );
    let role: Vec<redis::Value> = redis_cmd(topo.node_ports()[1], &["ROLE"])
        .await
        .expect("ROLE");
    assert_eq!(
        role.first(),
        Some(&redis::Value::BulkString(b"slave".to_vec()))
    );
}

#[tokio::test]
async fn sigkill_of_master_fails_over_within_10s() {
    if !require_redis() {
        return;
    }
    let mut topo = SentinelTopology::start().await;
    let old = topo.initial_master_port();
    let _: () = redis_cmd(old, &["SET", "before", "1"])
        .await
        .expect("SET on master");

    topo.kill_node(old);
    let (new_port, took) = send(topo.wait_for_failover(old, Duration::from_secs(10))).await;
    eprintln!("failover {old} -> {new_port} took {took:?}");
    assert_ne!(new_port, old);
    assert!(topo.node_ports().contains(&new_port));
    assert!(took < Duration::from_secs(10));
    assert_eq!(topo.master_addr().await, format!("127.0.0.1:{new_port}"));

    let _: () = redis_cmd(new_port, &["SET", "after", "2"])
        .await
        .expect("SET on new master");
    let v: String = redis_cmd(new_port, &["GET", "after"]).await.expect("GET");
    assert_eq!(v, "2");

    // The killed master's port is free again.
    std::net::TcpListener::bind(("127.0.0.1", old)).expect("old master port reusable");
}

#[tokio::test]
async fn cluster_comes_up_with_three_masters_and_fails_over_a_killed_one() {
    if !require_redis() {
        return;
    }
    let started = Instant::now();
    let mut topo = send(ClusterTopology::start()).await;
    eprintln!("cluster of 6 healthy after {:?}", started.elapsed());
    assert_eq!(topo.masters().await.len(), 3);
    // The room's keys share one slot through the hash tag.
    let slot = topo.keyslot("rt:stream:{public:lobby}").await;
    assert_eq!(slot, topo.keyslot("rt:room:{public:lobby}").await);
    let old = topo.master_of(slot).await;
    // Written and confirmed by the replica (WAIT on the same connection) before the kill:
    // replication is asynchronous, an unconfirmed write may die with the master.
    let client = redis::Client::open(format!("redis://127.0.0.1:{old}")).expect("client");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the slot's master");
    let (_, acked): ((), i64) = redis::pipe()
        .cmd("SET")
        .arg("{public:lobby}x")
        .arg("1")
        .cmd("WAIT")
        .arg(1)
        .arg(2000)
        .query_async(&mut con)
        .await
        .expect("SET and WAIT on the slot's master");
    assert_eq!(acked, 1, "the replica confirmed the write");

    topo.kill_node(old);
    let (new, took) = send(topo.wait_for_failover(slot, old, Duration::from_secs(15))).await;
    eprintln!("cluster failover of slot {slot}: {old} -> {new} in {took:?}");
    assert_ne!(new, old);
    let v: String = redis_cmd(new, &["GET", "{public:lobby}x"])
        .await
        .expect("GET");
    assert_eq!(v, "1", "the replica had the write");
    topo.restart_node(old).await;
}

/// What the Redis Cluster mode builds on, checked against a real cluster: redis-rs' cluster
/// client (RESP3 with a push sender) subscribes a sharded channel on the node that owns its
/// slot. After a SIGKILL of that master the client does not move the subscription to the
/// promoted replica by itself (`SPUBLISH` there answers 0 receivers); subscribing again does.
/// So the Cluster mode must detect the silent shard (a probe) and resubscribe itself. Prints
/// how long the channel was silent.
#[tokio::test]
async fn sharded_pubsub_comes_back_after_a_failover_once_subscribed_again() {
    use redis::cluster::ClusterClientBuilder;
    if !require_redis() {
        return;
    }
    let mut topo = ClusterTopology::start().await;
    let urls: Vec<String> = topo
        .seed_addrs()
        .iter()
        .map(|a| format!("redis://{a}/?protocol=3"))
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let subscriber = ClusterClientBuilder::new(urls.clone())
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(tx)
        .connection_timeout(Duration::from_secs(1))
        .response_timeout(Duration::from_secs(1))
        .build()
        .expect("cluster client");
    let mut sub = subscriber.get_async_connection().await.expect("connect");
    let channel = "rt:room:{public:lobby}";
    sub.ssubscribe(channel).await.expect("SSUBSCRIBE");
    let publisher = ClusterClientBuilder::new(urls)
        .connection_timeout(Duration::from_secs(1))
        .response_timeout(Duration::from_secs(1))
        .build()
        .expect("cluster client");
    let mut publish = publisher.get_async_connection().await.expect("connect");

    // Waits (bounded) for the message `text` on the sharded channel.
    async fn received(
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
        text: &str,
        limit: Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while let Ok(Some(push)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            if push.kind == redis::PushKind::SMessage
                && push
                    .data
                    .get(1)
                    .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                    == Some(text.to_string())
            {
                return true;
            }
        }
        false
    }

    let n: i64 = redis::cmd("SPUBLISH")
        .arg(channel)
        .arg("before")
        .query_async(&mut publish)
        .await
        .expect("SPUBLISH");
    assert_eq!(n, 1, "one subscriber on the shard");
    assert!(received(&mut rx, "before", Duration::from_secs(5)).await);

    let slot = topo.keyslot(channel).await;
    let old = topo.master_of(slot).await;
    let killed = Instant::now();
    topo.kill_node(old);
    let mut back = None;
    let mut resubscribed = 0;
    for i in 0..200 {
        let text = format!("after-{i}");
        let sent: Result<i64, _> = redis::cmd("SPUBLISH")
            .arg(channel)
            .arg(&text)
            .query_async(&mut publish)
            .await;
        match sent {
            Ok(n) if n >= 1 => {
                if received(&mut rx, &text, Duration::from_millis(200)).await {
                    back = Some(killed.elapsed());
                    break;
                }
            }
            // The new master answers, with nobody subscribed: the client did not move the
            // subscription by itself (seen with redis-rs 1.8, idle or not), so subscribe again.
            Ok(_) => {
                resubscribed += 1;
                let _ = sub.ssubscribe(channel).await;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back = back.expect("the sharded subscription never came back after the failover");
    eprintln!(
        "sharded Pub/Sub back {back:?} after SIGKILL of the slot's master {old} \
         ({resubscribed} SSUBSCRIBE sent again)"
    );
    assert!(back < Duration::from_secs(20));
}
