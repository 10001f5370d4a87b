//! Real Redis topologies for integration tests: a standalone `redis-server`, and a
//! Sentinel set-up (master, 2 replicas, 3 sentinels). Every process listens on a free
//! loopback port, has its own config file and log file (stdout + stderr) in a temp dir,
//! and is SIGKILLed and reaped on drop. Every wait is bounded by a timeout, every loop by a count.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::FromRedisValue;
use tokio::time::{Instant, sleep, timeout};

/// Master name monitored by the sentinels.
pub const MASTER_NAME: &str = "rtmaster";
/// Per-command timeout of the harness's own client (connect and reply, each).
const CMD_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a freshly spawned process gets to answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);

/// True when `redis-server` and `redis-sentinel` are on PATH. When they are missing, panics
/// if `CI=true`, else prints a "skipping" line and returns false.
pub fn require_redis() -> bool {
    let on_path = |bin: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
    };
    let missing: Vec<&str> = ["redis-server", "redis-sentinel"]
        .into_iter()
        .filter(|b| !on_path(b))
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but {} not on PATH", missing.join(", "));
    }
    eprintln!(
        "skipping: redis-server not installed ({} not on PATH)",
        missing.join(", ")
    );
    false
}

/// Sends one command to 127.0.0.1:`port` on a fresh connection; connect and reply are each
/// bounded by one second (a frozen server yields an error, not a hang).
pub async fn redis_cmd<T: FromRedisValue>(port: u16, args: &[&str]) -> anyhow::Result<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut con = timeout(CMD_TIMEOUT, client.get_multiplexed_async_connection()).await??;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    Ok(timeout(CMD_TIMEOUT, cmd.query_async::<T>(&mut con)).await??)
}

/// Value of `field` in an INFO reply, if present.
fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// A free loopback port (bind :0, read, release; the small race is handled by one retry).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// Polls `check` every 100 ms until it is true; returns the time taken, or None after `limit`.
async fn poll_until(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    let rounds = limit.as_millis() / POLL.as_millis() + 1;
    for _ in 0..rounds {
        if check().await {
            return Some(start.elapsed());
        }
        if start.elapsed() >= limit {
            break;
        }
        sleep(POLL).await;
    }
    None
}

/// One redis-server or redis-sentinel process (restartable with the same config and port).
struct Node {
    name: String,
    port: u16,
    conf: PathBuf,
    log: PathBuf,
    sentinel: bool,
    child: Option<Child>,
    pid: u32,
}

impl Node {
    /// Writes `<name>.conf` from `conf(port)` on a free port and starts the process; retries
    /// once on another port if the first one turns out to be taken.
    async fn start(dir: &Path, name: &str, sentinel: bool, conf: impl Fn(u16) -> String) -> Node {
        let mut last_err = String::new();
        for _attempt in 0..2 {
            let port = free_port();
            let mut node = Node {
                name: name.to_string(),
                port,
                conf: dir.join(format!("{name}.conf")),
                log: dir.join(format!("{name}.log")),
                sentinel,
                child: None,
                pid: 0,
            };
            std::fs::write(&node.conf, conf(port)).expect("write redis config");
            match node.launch().await {
                Ok(()) => return node,
                Err(e) => last_err = e,
            }
        }
        panic!("could not start {name} (two attempts): {last_err}");
    }

    /// Spawns the process with the existing config; waits until it answers on its port with
    /// its own pid (so that a port collision with another process is detected).
    async fn launch(&mut self) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log file");
        let bin = if self.sentinel {
            "redis-sentinel"
        } else {
            "redis-server"
        };
        let child = Command::new(bin)
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        self.pid = child.id();
        self.child = Some(child);
        let (port, pid) = (self.port, self.pid.to_string());
        let mut exited = None;
        let ready = poll_until(START_TIMEOUT, async || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                exited = Some(status);
                return true;
            }
            let info = redis_cmd::<String>(port, &["INFO", "server"]).await;
            info.is_ok_and(|i| info_field(&i, "process_id").as_deref() == Some(pid.as_str()))
        })
        .await;
        if ready.is_some() && exited.is_none() {
            return Ok(());
        }
        self.kill();
        Err(format!(
            "{} on port {port} not ready within {START_TIMEOUT:?} (exit: {exited:?})\n{}",
            self.name,
            self.log_tail(30)
        ))
    }

    fn alive(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL and reap (works on SIGSTOPped processes too).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal(&self, sig: &str) {
        assert!(self.alive(), "{} is not running", self.name);
        let status = Command::new("kill")
            .args([sig, &self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {} failed", self.pid);
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        format!(
            "--- {} (port {}) {} ---\n{tail}",
            self.name,
            self.port,
            self.log.display()
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Config of a plain redis-server (`replicaof` is appended for replicas).
fn server_conf(dir: &Path, name: &str, port: u16) -> String {
    format!(
        "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\ndir {}\n\
         dbfilename {name}.rdb\nsave \"\"\nappendonly no\nrepl-diskless-sync-delay 0\n",
        dir.display()
    )
}

/// One standalone redis-server process.
pub struct RedisServer {
    pub port: u16,
    node: Node,
    _dir: tempfile::TempDir, // dropped after `node`: the process dies before its dir goes
}

impl RedisServer {
    pub async fn start_standalone() -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        let node = Node::start(&path, "standalone", false, |p| {
            server_conf(&path, "standalone", p)
        })
        .await;
        RedisServer {
            port: node.port,
            node,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        self.node.kill();
    }

    /// Starts again on the same port with the same dir (killing it first if it still runs);
    /// returns once it answers. Retries once after 500 ms if the port is briefly unavailable.
    pub async fn restart(&mut self) {
        self.node.kill();
        if self.node.launch().await.is_ok() {
            return;
        }
        sleep(Duration::from_millis(500)).await;
        if let Err(e) = self.node.launch().await {
            panic!("restart on port {} failed: {e}", self.port);
        }
    }

    /// Pid of the current (or last) process.
    pub fn pid(&self) -> u32 {
        self.node.pid
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.node.log_tail(lines)
    }
}

/// A master, 2 replicas and 3 sentinels (quorum 2) on loopback.
pub struct SentinelTopology {
    pub master_name: String,
    nodes: Vec<Node>, // initial master first, then the replicas
    sentinels: Vec<Node>,
    _dir: tempfile::TempDir, // dropped last
}

impl SentinelTopology {
    /// Starts master, replicas (waiting for `master_link_status:up`), then sentinels; returns
    /// once every sentinel passes `SENTINEL ckquorum` and knows 2 replicas and 2 other sentinels.
    pub async fn start() -> SentinelTopology {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        let master = Node::start(&path, "master", false, |p| server_conf(&path, "master", p)).await;
        let mp = master.port;
        let mut nodes = vec![master];
        for i in 1..=2 {
            let name = format!("replica{i}");
            let conf = |p| {
                server_conf(&path, &name, p)
                    + &format!("replicaof 127.0.0.1 {mp}\nreplica-announce-ip 127.0.0.1\n")
            };
            nodes.push(Node::start(&path, &name, false, conf).await);
        }
        let mut topo = SentinelTopology {
            master_name: MASTER_NAME.to_string(),
            nodes,
            sentinels: Vec::new(),
            _dir: dir,
        };
        // Sentinels find replicas through the master's INFO (sent at once, then every 10 s):
        // start them only once the replicas are attached.
        let replica_ports: Vec<u16> = topo.nodes[1..].iter().map(|n| n.port).collect();
        let linked = poll_until(Duration::from_secs(15), async || {
            for &p in &replica_ports {
                let info = redis_cmd::<String>(p, &["INFO", "replication"]).await;
                if !info.is_ok_and(|i| i.contains("master_link_status:up")) {
                    return false;
                }
            }
            let info = redis_cmd::<String>(mp, &["INFO", "replication"]).await;
            info.is_ok_and(|i| info_field(&i, "connected_slaves").as_deref() == Some("2"))
        })
        .await;
        if linked.is_none() {
            topo.fail("replicas did not reach master_link_status:up within 15 s");
        }
        for i in 1..=3 {
            let name = format!("sentinel{i}");
            let conf = |p| {
                format!(
                    "port {p}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\ndir {}\n\
                     sentinel announce-ip 127.0.0.1\nsentinel resolve-hostnames no\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {mp} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 5000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n",
                    path.display()
                )
            };
            topo.sentinels
                .push(Node::start(&path, &name, true, conf).await);
        }
        let ports: Vec<u16> = topo.sentinels.iter().map(|s| s.port).collect();
        let healthy = poll_until(Duration::from_secs(20), async || {
            for &p in &ports {
                let count = async |what: &str| {
                    let args = ["SENTINEL", what, MASTER_NAME];
                    redis_cmd::<Vec<redis::Value>>(p, &args)
                        .await
                        .map_or(0, |v| v.len())
                };
                let ok = redis_cmd::<String>(p, &["SENTINEL", "ckquorum", MASTER_NAME]).await;
                if !ok.is_ok_and(|s| s.starts_with("OK"))
                    || count("replicas").await != 2
                    || count("sentinels").await != 2
                {
                    return false;
                }
            }
            true
        })
        .await;
        if healthy.is_none() {
            topo.fail("sentinels did not agree on the topology within 20 s");
        }
        topo
    }

    /// Panics with `msg` and the tail of every log.
    fn fail(&self, msg: &str) -> ! {
        let logs: Vec<String> = self
            .nodes
            .iter()
            .chain(&self.sentinels)
            .map(|n| n.log_tail(15))
            .collect();
        panic!("{msg}\n{}", logs.join("\n"));
    }

    pub fn sentinel_addrs(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect()
    }

    /// The master port that sentinel `port` names, if it answers.
    async fn master_port_from(port: u16) -> Option<u16> {
        let reply =
            redis_cmd::<Vec<String>>(port, &["SENTINEL", "get-master-addr-by-name", MASTER_NAME]);
        reply.await.ok()?.get(1)?.parse().ok()
    }

    /// "127.0.0.1:PORT" of the master according to the first sentinel that answers (5 s max).
    pub async fn master_addr(&self) -> String {
        let mut found = None;
        poll_until(Duration::from_secs(5), async || {
            for s in self.sentinels.iter().filter(|s| s.alive()) {
                found = Self::master_port_from(s.port).await;
                if found.is_some() {
                    return true;
                }
            }
            false
        })
        .await;
        match found {
            Some(p) => format!("127.0.0.1:{p}"),
            None => self.fail("no sentinel answered get-master-addr-by-name within 5 s"),
        }
    }

    pub fn initial_master_port(&self) -> u16 {
        self.nodes[0].port
    }

    /// Master + replicas, in initial order.
    pub fn node_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    fn node(&self, port: u16) -> &Node {
        let node = self.nodes.iter().find(|n| n.port == port);
        node.unwrap_or_else(|| panic!("no redis node on port {port}"))
    }

    /// SIGKILL (and reap) the redis-server on `port`; the port becomes free.
    pub fn kill_node(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port);
        node.unwrap_or_else(|| panic!("no redis node on port {port}"))
            .kill();
    }

    /// Starts a killed node again, same port and config file (which Sentinel may have rewritten).
    pub async fn restart_node(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port);
        let node = node.unwrap_or_else(|| panic!("no redis node on port {port}"));
        node.kill();
        if let Err(e) = node.launch().await {
            panic!("restart of node {port} failed: {e}");
        }
    }

    /// SIGSTOP (freeze) the redis-server on `port`.
    pub fn stop_node(&self, port: u16) {
        self.node(port).signal("-STOP");
    }

    /// SIGCONT the redis-server on `port`.
    pub fn cont_node(&self, port: u16) {
        self.node(port).signal("-CONT");
    }

    /// Waits until every sentinel names the same master, not `old_port`, and that node reports
    /// `role:master`; returns its port and the time waited. Panics with the logs on timeout.
    pub async fn wait_for_failover(&self, old_port: u16, limit: Duration) -> (u16, Duration) {
        let mut new_port = 0;
        let took = poll_until(limit, async || {
            let mut named = Vec::new();
            for s in self.sentinels.iter().filter(|s| s.alive()) {
                named.push(Self::master_port_from(s.port).await);
            }
            let Some(Some(first)) = named.first().copied() else {
                return false;
            };
            if first == old_port || named.iter().any(|p| *p != Some(first)) {
                return false;
            }
            new_port = first;
            let info = redis_cmd::<String>(first, &["INFO", "replication"]).await;
            info.is_ok_and(|i| info_field(&i, "role").as_deref() == Some("master"))
        })
        .await;
        match took {
            Some(t) => (new_port, t),
            None => self.fail(&format!(
                "no failover away from port {old_port} within {limit:?}"
            )),
        }
    }

    /// Pids of the live processes: nodes (initial order), then sentinels.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .chain(&self.sentinels)
            .filter(|n| n.alive())
            .map(|n| n.pid)
            .collect()
    }
}
