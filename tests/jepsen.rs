//! Faults in the style of Jepsen: three rtgate instances over a real Sentinel topology, three
//! keyed publishers that retry, SDK subscribers on every instance, and during the run a SIGKILL
//! of the Redis master, a 3 s SIGSTOP of the next master and a SIGKILL and restart of one
//! rtgate instance. At the end each subscriber's sequence must equal the room's stored history,
//! every acked message must be there exactly once, and nothing else.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::redis::{SentinelTopology, redis_cmd, require_redis};
use common::{Server, require, token};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::tungstenite::Message;

const ROOM: &str = "public:jepsen";
/// How long each publisher keeps starting new messages.
const RUN_FOR: Duration = Duration::from_secs(24);
/// Bound on the attempts for one message (each bounded by REPLY_WAIT or a short sleep).
const MAX_ATTEMPTS: u32 = 400;
const REPLY_WAIT: Duration = Duration::from_secs(3);

fn config(topo: &SentinelTopology, listen: Option<u16>) -> String {
    let listen = listen
        .map(|p| format!("[server]\nlisten = \"127.0.0.1:{p}\"\n"))
        .unwrap_or_default();
    listen
        + &topo.rtgate_toml(
            "probe_interval = \"500ms\"\nprobe_timeout = \"1500ms\"",
            "min_replicas_ack = 1",
        )
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

fn bundle() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sdk/js/dist/rtgate.browser.js")
}

// ---- SDK subscribers ------------------------------------------------------------------------

/// A Node process running tests/jepsen/subscriber.mjs; its JSON lines are collected.
struct Subscriber {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Subscriber {
    async fn start(name: &str, server: &Server) -> Subscriber {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/jepsen/subscriber.mjs");
        let url = format!("ws://127.0.0.1:{}/api/v1/ws", server.port);
        let mut child = Command::new("node")
            .arg("--experimental-websocket")
            .arg("--no-warnings")
            .arg(&script)
            .arg(bundle())
            .arg(&url)
            .arg(token(name, false, 3600))
            .arg(ROOM)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn node");
        let stdin = child.stdin.take();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let mut reader = BufReader::new(child.stdout.take().expect("stdout")).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = reader.next_line().await {
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("subscriber printed non-JSON ({e}): {line}"));
                sink.lock().unwrap().push(v);
            }
        });
        let sub = Subscriber {
            name: name.to_string(),
            child,
            stdin,
            lines,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sub.has(|v| v["ready"] == true) {
            assert!(
                Instant::now() < deadline,
                "{name}: not joined within 20 s: {:?}",
                sub.lines.lock().unwrap()
            );
            sleep(Duration::from_millis(50)).await;
        }
        sub
    }

    fn has(&self, pred: impl Fn(&Value) -> bool) -> bool {
        self.lines.lock().unwrap().iter().any(pred)
    }

    fn ids(&self) -> Vec<String> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter_map(|v| v["id"].as_str().map(str::to_string))
            .collect()
    }

    fn count(&self, key: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v.get(key).is_some())
            .count()
    }

    /// Closes stdin and waits for the process to print `done` and exit.
    async fn finish(&mut self) {
        drop(self.stdin.take());
        match timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(Ok(status)) => assert!(status.success(), "{}: exited {status}", self.name),
            other => panic!("{}: did not exit: {other:?}", self.name),
        }
    }
}

// ---- keyed publishers -----------------------------------------------------------------------

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

#[derive(Debug, Default)]
struct PublisherLog {
    /// (seq, id) of every acked message, in order.
    acked: Vec<(u64, String)>,
    unavailable: u32,
    reconnects: u32,
    /// Attempts after the first for one message (same key).
    retries: u32,
}

enum Outcome {
    Acked(String),
    Unavailable,
    Lost,
}

async fn open(url: &str) -> Option<Ws> {
    let (ws, _) = timeout(
        Duration::from_secs(2),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .ok()?
    .ok()?;
    Some(ws)
}

/// One attempt: sends the keyed message and waits for its reply.
async fn attempt(ws: &mut Ws, name: &str, seq: u64, attempt: u32) -> Outcome {
    let r = format!("{seq}.{attempt}");
    let frame = json!({
        "type": "message", "room": ROOM, "ref": r,
        "data": {"p": name, "seq": seq},
        "idempotency_key": format!("{name}-{seq}"),
    });
    if timeout(REPLY_WAIT, ws.send(Message::text(frame.to_string())))
        .await
        .map_or(true, |r| r.is_err())
    {
        return Outcome::Lost;
    }
    let deadline = Instant::now() + REPLY_WAIT;
    loop {
        let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(m))) => m,
            _ => return Outcome::Lost,
        };
        let Message::Text(t) = msg else {
            if matches!(msg, Message::Close(_)) {
                return Outcome::Lost;
            }
            continue;
        };
        let v: Value = serde_json::from_str(t.as_str()).expect("server frames are JSON");
        if v["ref"] != r.as_str() {
            continue;
        }
        return match v["type"].as_str() {
            Some("ack") => Outcome::Acked(v["data"]["id"].as_str().expect("ack id").to_string()),
            Some("error") if v["data"]["code"] == "unavailable" => Outcome::Unavailable,
            _ => panic!("{name}: unexpected reply to seq {seq}: {v}"),
        };
    }
}

/// Publishes seq 1, 2, ... every 20 ms for `run_for`; each message is retried with the same
/// idempotency key until acked (on `unavailable`, a timeout or a lost connection).
async fn publish(url: String, name: String, run_for: Duration) -> PublisherLog {
    let mut log = PublisherLog::default();
    let stop = Instant::now() + run_for;
    let mut ws: Option<Ws> = None;
    let mut seq = 0;
    while Instant::now() < stop {
        seq += 1;
        let mut tries = 0;
        let id = loop {
            tries += 1;
            assert!(tries <= MAX_ATTEMPTS, "{name}: seq {seq} never acked");
            if tries > 1 {
                log.retries += 1;
            }
            let Some(conn) = ws.as_mut() else {
                ws = open(&url).await;
                if ws.is_none() {
                    sleep(Duration::from_millis(100)).await;
                } else {
                    log.reconnects += 1;
                }
                continue;
            };
            match attempt(conn, &name, seq, tries).await {
                Outcome::Acked(id) => break id,
                Outcome::Unavailable => {
                    log.unavailable += 1;
                    sleep(Duration::from_millis(100)).await;
                }
                Outcome::Lost => ws = None,
            }
        };
        log.acked.push((seq, id));
        sleep(Duration::from_millis(20)).await;
    }
    log.reconnects -= 1; // the first connection is not a reconnect
    log
}

// ---- the history, as stored -----------------------------------------------------------------

fn parse_id(id: &str) -> (u64, u64) {
    let (a, b) = id.split_once('-').expect("id is a-b");
    (a.parse().expect("id"), b.parse().expect("id"))
}

/// The room's stream on the current master: (id, publisher, seq) in stream order.
async fn stored_history(topo: &SentinelTopology) -> Vec<(String, String, u64)> {
    let master = topo.master_addr().await;
    let port: u16 = master.rsplit(':').next().unwrap().parse().unwrap();
    let key = format!("rt:stream:{ROOM}");
    let entries: Vec<(String, Vec<(String, String)>)> =
        redis_cmd(port, &["XRANGE", &key, "-", "+"])
            .await
            .expect("XRANGE");
    entries
        .into_iter()
        .map(|(id, fields)| {
            let payload = fields
                .iter()
                .find(|(k, _)| k == "m")
                .map(|(_, v)| v.clone())
                .expect("entry has m");
            let v: Value = serde_json::from_str(&payload).expect("stored payload is JSON");
            let data = &v["data"];
            (
                id,
                data["p"].as_str().unwrap_or_default().to_string(),
                data["seq"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

fn kill9(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_lose_nothing_acked_and_nobody_sees_what_history_lost() {
    if !require_redis()
        || !require(
            on_path("node") && bundle().is_file(),
            "node and sdk/js/dist",
        )
    {
        return;
    }
    let mut topo = SentinelTopology::start().await;
    let a = Server::start(&config(&topo, None)).await;
    let b = Server::start(&config(&topo, None)).await;
    let mut c = Server::start(&config(&topo, None)).await;
    let c_port = c.port;

    let mut subs = Vec::new();
    for (name, server) in [("sub-a", &a), ("sub-b", &b), ("sub-c", &c)] {
        subs.push(Subscriber::start(name, server).await);
    }

    let started = Instant::now();
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let pubs: Vec<_> = [("pub-a", a.port), ("pub-b", b.port), ("pub-c", c_port)]
        .into_iter()
        .map(|(name, port)| {
            let url = format!(
                "ws://127.0.0.1:{port}/api/v1/ws?token={}",
                token(name, false, 3600)
            );
            tokio::spawn(publish(url, name.to_string(), RUN_FOR))
        })
        .collect();

    // Fault 1: SIGKILL the master; once failed over, it comes back as a replica.
    sleep(Duration::from_secs(3)).await;
    let first = topo.initial_master_port();
    topo.kill_node(first);
    let (second, failover1) = topo.wait_for_failover(first, Duration::from_secs(15)).await;
    topo.restart_node(first).await;
    println!(
        "jepsen: SIGKILL master {first} at {:?}; {second} master after {failover1:?}",
        started.elapsed()
    );

    // Fault 2: freeze the new master for 3 s (Sentinel fails over again meanwhile).
    sleep(Duration::from_secs(3)).await;
    topo.stop_node(second);
    println!("jepsen: SIGSTOP master {second} at {:?}", started.elapsed());
    sleep(Duration::from_secs(3)).await;
    topo.cont_node(second);
    let (third, failover2) = topo
        .wait_for_failover(second, Duration::from_secs(15))
        .await;
    println!("jepsen: SIGCONT {second}; {third} master after {failover2:?}");

    // Fault 3: SIGKILL rtgate C (its subscriber and publisher reconnect), restart it.
    sleep(Duration::from_secs(2)).await;
    kill9(c.pid());
    println!("jepsen: SIGKILL rtgate C at {:?}", started.elapsed());
    sleep(Duration::from_secs(1)).await;
    drop(c);
    c = Server::start(&config(&topo, Some(c_port))).await;

    let mut logs = Vec::new();
    for p in pubs {
        logs.push(p.await.expect("publisher"));
    }
    let acked: HashSet<&str> = logs
        .iter()
        .flat_map(|l| l.acked.iter().map(|(_, id)| id.as_str()))
        .collect();

    // Subscribers drain: every acked message, or 20 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline
        && subs.iter().any(|s| {
            let got: HashSet<String> = s.ids().into_iter().collect();
            acked.iter().any(|id| !got.contains(*id))
        })
    {
        sleep(Duration::from_millis(100)).await;
    }
    sleep(Duration::from_millis(500)).await; // a straggler duplicate would show up here
    for s in &mut subs {
        s.finish().await;
    }

    let history = stored_history(&topo).await;
    let history_ids: Vec<&str> = history.iter().map(|(id, _, _)| id.as_str()).collect();
    let total_acked: usize = logs.iter().map(|l| l.acked.len()).sum();
    println!(
        "jepsen: {} published and acked ({}), {} in history; unavailable answers {}, retries {}, publisher reconnects {}",
        total_acked,
        logs.iter()
            .zip(["pub-a", "pub-b", "pub-c"])
            .map(|(l, n)| format!("{n} {}", l.acked.len()))
            .collect::<Vec<_>>()
            .join(", "),
        history.len(),
        logs.iter().map(|l| l.unavailable).sum::<u32>(),
        logs.iter().map(|l| l.retries).sum::<u32>(),
        logs.iter().map(|l| l.reconnects).sum::<u32>(),
    );
    for s in &subs {
        println!(
            "jepsen: {} received {} messages, {} gaps, {} state changes",
            s.name,
            s.ids().len(),
            s.count("gap"),
            s.count("state")
        );
    }

    // The history holds each (publisher, seq) once: retries with the key never published twice.
    let mut by_key: HashMap<(&str, u64), Vec<&str>> = HashMap::new();
    for (id, p, seq) in &history {
        by_key.entry((p.as_str(), *seq)).or_default().push(id);
    }
    let twice: Vec<_> = by_key.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(twice.is_empty(), "published twice: {twice:?}");
    assert!(
        history_ids
            .windows(2)
            .all(|w| parse_id(w[0]) < parse_id(w[1])),
        "stream ids are increasing"
    );

    // Every acked message is in the history, under the id its publisher was given.
    let history_set: HashSet<&str> = history_ids.iter().copied().collect();
    for (l, name) in logs.iter().zip(["pub-a", "pub-b", "pub-c"]) {
        for (seq, id) in &l.acked {
            assert!(
                history_set.contains(id.as_str()),
                "{name} seq {seq}: acked {id} is not in the history"
            );
            assert_eq!(
                by_key.get(&(name, *seq)).map(|v| v[0]),
                Some(id.as_str()),
                "{name} seq {seq}"
            );
        }
        let seqs: Vec<u64> = l.acked.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "{name}: every seq acked"
        );
    }
    // Stored but never acked: only a publisher's last message could be (it stops at RUN_FOR
    // only after its ack), so there is none.
    let not_acked: Vec<_> = history_ids
        .iter()
        .filter(|id| !acked.contains(**id))
        .collect();
    assert!(not_acked.is_empty(), "stored but not acked: {not_acked:?}");

    // Each subscriber saw exactly the history, in its order: nothing missing, nothing twice,
    // nothing the history does not hold, and no gap.
    let mut problems = Vec::new();
    for s in &subs {
        let got = s.ids();
        if got != history_ids || s.count("gap") > 0 {
            let got_set: HashSet<&str> = got.iter().map(String::as_str).collect();
            let missing: Vec<_> = history_ids
                .iter()
                .filter(|id| !got_set.contains(**id))
                .collect();
            let extra: Vec<_> = got
                .iter()
                .filter(|id| !history_set.contains(id.as_str()))
                .collect();
            let events: Vec<String> = s
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter(|v| v.get("id").is_none())
                .map(Value::to_string)
                .collect();
            problems.push(format!(
                "{}: sequence differs from the history ({} vs {}): {} gaps, missing {} {:?}, not in history {extra:?}, duplicates {}; events {events:?}",
                s.name,
                got.len(),
                history_ids.len(),
                s.count("gap"),
                missing.len(),
                missing.iter().take(5).collect::<Vec<_>>(),
                got.len() - got_set.len()
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "started at {started_ms}\n{}",
        problems.join("\n")
    );
    assert!(
        total_acked > 300,
        "the run published too little to mean anything: {total_acked}"
    );
    drop((a, b, c));
}
