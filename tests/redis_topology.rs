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
    let _: () = redis_cmd(old, &["SET", "{public:lobby}x", "1"])
        .await
        .expect("SET on the slot's master");

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
