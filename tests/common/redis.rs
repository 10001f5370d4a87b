//! Real Redis topologies for integration tests: a standalone `redis-server`, and a Sentinel
//! set-up (master, 2 replicas, 3 sentinels). Every process listens on a free loopback port,
//! has its own config file and log file (stdout + stderr) in a temp dir, and is SIGKILLed and
//! reaped on drop. Every wait is bounded by a timeout, every loop by a count, and every
//! future here is `Send` (usable inside `tokio::spawn`).

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
const POLL_EVERY: Duration = Duration::from_millis(100);

/// True when `redis-server` and `redis-sentinel` are on PATH. When they are missing: panics
/// if `CI=true`, else prints a "skipping" line to stderr and returns false.
pub fn require_redis() -> bool {
    let on_path = |bin: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
    };
    super::require(
        on_path("redis-server") && on_path("redis-sentinel"),
        "redis-server or redis-sentinel",
    )
}

/// Sends one command to 127.0.0.1:`port` on a fresh connection; connect and reply are each
/// bounded by one second (a frozen or dead server yields an error, never a hang).
pub async fn redis_cmd<T: FromRedisValue>(port: u16, args: &[&str]) -> anyhow::Result<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut con = timeout(CMD_TIMEOUT, client.get_multiplexed_async_connection()).await??;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    Ok(timeout(CMD_TIMEOUT, cmd.query_async::<T>(&mut con)).await??)
}

/// `INFO <section>` of 127.0.0.1:`port`, or an empty string if it does not answer.
async fn info(port: u16, section: &str) -> String {
    redis_cmd(port, &["INFO", section])
        .await
        .unwrap_or_default()
}

/// Value of `field` in an INFO reply.
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

/// A free loopback port (bind :0, read it, release it; the race is covered by one retry).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// A free port for a cluster node: below 55535, with its bus port (+ 10000) free too.
fn free_cluster_port() -> u16 {
    for _ in 0..1000 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        if port < 55535 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
    // The ephemeral range is above 55535 on some systems: pick from below it.
    for port in (20000..55535).step_by(7) {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port pair for a cluster node");
}

/// Bounded polling: `while poll.next().await { ... }` runs the body at once, then every
/// 100 ms, until `limit` has passed (and at most limit / 100 ms + 1 times).
struct Poll {
    start: Instant,
    limit: Duration,
    round: u128,
}

impl Poll {
    fn new(limit: Duration) -> Poll {
        let start = Instant::now();
        Poll {
            start,
            limit,
            round: 0,
        }
    }

    async fn next(&mut self) -> bool {
        if self.round > 0 {
            sleep(POLL_EVERY).await;
        }
        self.round += 1;
        let max_rounds = self.limit.as_millis() / POLL_EVERY.as_millis() + 1;
        self.round <= max_rounds && (self.round == 1 || self.start.elapsed() <= self.limit)
    }

    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// One redis-server or redis-sentinel process, restartable with the same config and port.
struct Node {
    name: String,
    port: u16,
    conf: PathBuf,
    log: PathBuf,
    bin: &'static str, // redis-server or redis-sentinel
    child: Option<Child>,
    pid: u32,
}

impl Node {
    /// Writes `<name>.conf` (from `conf(port)`) for a free port and starts the process;
    /// retries once on another port if the first one turns out to be taken.
    async fn start(
        dir: &Path,
        name: &str,
        bin: &'static str,
        conf: impl Fn(u16) -> String,
    ) -> Node {
        Self::start_on(dir, name, bin, conf, free_port).await
    }

    /// [`Node::start`] with the port picked by `pick`.
    async fn start_on(
        dir: &Path,
        name: &str,
        bin: &'static str,
        conf: impl Fn(u16) -> String,
        pick: fn() -> u16,
    ) -> Node {
        let mut last_err = String::new();
        for _attempt in 0..2 {
            let port = pick();
            let mut node = Node {
                name: name.to_string(),
                port,
                conf: dir.join(format!("{name}.conf")),
                log: dir.join(format!("{name}.log")),
                bin,
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

    /// Spawns the process with its config file; waits until its port answers INFO with this
    /// process's pid (so a port taken by another process is detected, not mistaken for ours).
    async fn launch(&mut self) -> Result<(), String> {
        let log = OpenOptions::new().create(true).append(true).open(&self.log);
        let log = log.expect("open log file");
        let bin = self.bin;
        let child = Command::new(bin)
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        self.pid = child.id();
        let pid = self.pid.to_string();
        // Owned by `self` at once: if this future is dropped, Node's Drop still kills it.
        let child = self.child.insert(child);
        let mut exited = None;
        let mut poll = Poll::new(START_TIMEOUT);
        while exited.is_none() && poll.next().await {
            if info_field(&info(self.port, "server").await, "process_id") == Some(&pid) {
                return Ok(());
            }
            exited = child.try_wait().ok().flatten();
        }
        self.kill();
        Err(format!(
            "{} on port {} not ready within {START_TIMEOUT:?} (exit: {exited:?})\n{}",
            self.name,
            self.port,
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
        let pid = self.pid.to_string();
        let status = Command::new("kill").args([sig, &pid]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill {sig} {pid} failed");
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        let (name, port) = (&self.name, self.port);
        format!(
            "--- {name} (port {port}) {} ---\n{tail}",
            self.log.display()
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Config of a redis-server; a replica of `master` (port) if given.
fn server_conf(dir: &Path, name: &str, port: u16, master: Option<u16>) -> String {
    let mut conf = format!(
        "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\ndir {}\n\
         dbfilename {name}.rdb\nsave \"\"\nappendonly no\nrepl-diskless-sync-delay 0\n",
        dir.display()
    );
    if let Some(mp) = master {
        conf += &format!("replicaof 127.0.0.1 {mp}\nreplica-announce-ip 127.0.0.1\n");
    }
    conf
}

/// A throwaway CA and a server certificate for 127.0.0.1 signed by it (openssl CLI).
pub struct TestCerts {
    pub ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestCerts {
    pub fn generate() -> TestCerts {
        let dir = tempfile::tempdir().expect("tempdir");
        let at = |f: &str| dir.path().join(f);
        std::fs::write(at("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("write san.ext");
        let steps: [&[&str]; 3] = [
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=rtgate-test-ca",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
            ],
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
            ],
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "san.ext",
                "-out",
                "server.crt",
            ],
        ];
        for args in steps {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        TestCerts {
            ca: at("ca.crt"),
            cert: at("server.crt"),
            key: at("server.key"),
            _dir: dir,
        }
    }

    /// redis.conf lines: TLS on `tls_port` (beside the plain port, which the harness keeps
    /// using), for replication and the cluster bus too; clients need no certificate.
    fn server_conf(&self, tls_port: u16) -> String {
        format!(
            "tls-port {tls_port}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
             tls-auth-clients no\ntls-replication yes\n",
            self.cert.display(),
            self.key.display(),
            self.ca.display()
        )
    }
}

/// One standalone redis-server process.
pub struct RedisServer {
    pub port: u16,
    /// The TLS port, when started with [`RedisServer::start_tls`].
    pub tls_port: Option<u16>,
    node: Node,
    _dir: tempfile::TempDir, // declared after `node`: the process dies before its dir goes
}

impl RedisServer {
    pub async fn start_standalone() -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path();
        let conf = |p| server_conf(path, "standalone", p, None);
        let node = Node::start(path, "standalone", "redis-server", conf).await;
        RedisServer {
            port: node.port,
            tls_port: None,
            node,
            _dir: dir,
        }
    }

    /// A standalone server that also listens with TLS (certificate from `certs`).
    pub async fn start_tls(certs: &TestCerts) -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path();
        let tls_port = free_port();
        let conf = |p| server_conf(path, "standalone", p, None) + &certs.server_conf(tls_port);
        let node = Node::start(path, "standalone", "redis-server", conf).await;
        RedisServer {
            port: node.port,
            tls_port: Some(tls_port),
            node,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// rtgate config for the Redis broker on this server; `broker_extra` and `redis_extra` are
    /// TOML lines added to the `[broker]` and `[redis]` tables.
    pub fn broker_toml(&self, broker_extra: &str, redis_extra: &str) -> String {
        format!(
            "[broker]\nkind = \"redis\"\n{broker_extra}\n[redis]\nurl = \"{}\"\n{redis_extra}\n",
            self.url()
        )
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        self.node.kill();
    }

    /// Starts again on the same port and dir (SIGKILLing it first if still running); returns
    /// once it answers. Retries once after 500 ms if the port is briefly unavailable.
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
    _dir: tempfile::TempDir, // declared last: dropped after every process
}

impl SentinelTopology {
    /// Starts the master, the replicas (waits for `master_link_status:up`), then the sentinels;
    /// returns once every sentinel passes `SENTINEL ckquorum` and knows 2 replicas and the
    /// 2 other sentinels. Panics with the logs' tails if that takes over 15 s (+ 20 s).
    pub async fn start() -> SentinelTopology {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        let conf = |p| server_conf(&path, "master", p, None);
        let master = Node::start(&path, "master", "redis-server", conf).await;
        let mp = master.port;
        let mut topo = SentinelTopology {
            master_name: MASTER_NAME.to_string(),
            nodes: vec![master],
            sentinels: Vec::new(),
            _dir: dir,
        };
        for name in ["replica1", "replica2"] {
            let conf = |p| server_conf(&path, name, p, Some(mp));
            let replica = Node::start(&path, name, "redis-server", conf).await;
            topo.nodes.push(replica);
        }
        // A sentinel learns the replicas from the master's INFO, asked at once and then only
        // every 10 s: start the sentinels once both replicas are attached.
        let (mut poll, mut linked) = (Poll::new(Duration::from_secs(15)), false);
        while !linked && poll.next().await {
            linked = topo.replicas_linked().await;
        }
        if !linked {
            topo.fail("replicas did not reach master_link_status:up within 15 s");
        }
        for name in ["sentinel1", "sentinel2", "sentinel3"] {
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
            let sentinel = Node::start(&path, name, "redis-sentinel", conf).await;
            topo.sentinels.push(sentinel);
        }
        let (mut poll, mut agreed) = (Poll::new(Duration::from_secs(20)), false);
        while !agreed && poll.next().await {
            agreed = topo.sentinels_agree().await;
        }
        if !agreed {
            topo.fail("sentinels did not agree on the topology within 20 s");
        }
        topo
    }

    async fn replicas_linked(&self) -> bool {
        for replica in &self.nodes[1..] {
            let info = info(replica.port, "replication").await;
            if info_field(&info, "master_link_status") != Some("up") {
                return false;
            }
        }
        let info = info(self.nodes[0].port, "replication").await;
        info_field(&info, "connected_slaves") == Some("2")
    }

    async fn sentinels_agree(&self) -> bool {
        for s in &self.sentinels {
            let ok = redis_cmd::<String>(s.port, &["SENTINEL", "ckquorum", MASTER_NAME]).await;
            if !ok.is_ok_and(|s| s.starts_with("OK"))
                || Self::known(s.port, "replicas").await != 2
                || Self::known(s.port, "sentinels").await != 2
            {
                return false;
            }
        }
        true
    }

    /// How many `replicas` / `sentinels` the sentinel on `port` knows (0 if no answer).
    async fn known(port: u16, what: &str) -> usize {
        let reply = redis_cmd::<Vec<redis::Value>>(port, &["SENTINEL", what, MASTER_NAME]).await;
        reply.map_or(0, |v| v.len())
    }

    /// Panics with `msg` and the tail of every log.
    fn fail(&self, msg: &str) -> ! {
        let all = self.nodes.iter().chain(&self.sentinels);
        let logs: Vec<String> = all.map(|n| n.log_tail(15)).collect();
        panic!("{msg}\n{}", logs.join("\n"));
    }

    /// rtgate config for this topology (short heartbeats, so instance death shows quickly);
    /// `broker_extra` and `redis_extra` are TOML lines added to `[broker]` and `[redis]`.
    pub fn rtgate_toml(&self, broker_extra: &str, redis_extra: &str) -> String {
        let sentinels: Vec<String> = self
            .sentinel_addrs()
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect();
        format!(
            "[broker]\nkind = \"redis\"\n{broker_extra}\n[redis]\nsentinels = [{}]\n\
             master_name = \"{}\"\ncommand_timeout = \"500ms\"\n{redis_extra}\n\
             [heartbeat]\ninterval = \"500ms\"\nttl = \"2s\"\n",
            sentinels.join(", "),
            self.master_name
        )
    }

    pub fn sentinel_addrs(&self) -> Vec<String> {
        let ports = self.sentinels.iter().map(|s| s.port);
        ports.map(|p| format!("127.0.0.1:{p}")).collect()
    }

    /// The master port named by each live sentinel (None where it does not answer).
    async fn named_masters(&self) -> Vec<Option<u16>> {
        let mut named = Vec::new();
        for s in self.sentinels.iter().filter(|s| s.alive()) {
            let args = ["SENTINEL", "get-master-addr-by-name", MASTER_NAME];
            let reply = redis_cmd::<Vec<String>>(s.port, &args).await;
            named.push(reply.ok().and_then(|a| a.get(1)?.parse().ok()));
        }
        named
    }

    /// "127.0.0.1:PORT" of the master, as named by the first sentinel that answers (5 s max).
    pub async fn master_addr(&self) -> String {
        let mut poll = Poll::new(Duration::from_secs(5));
        while poll.next().await {
            if let Some(p) = self.named_masters().await.into_iter().flatten().next() {
                return format!("127.0.0.1:{p}");
            }
        }
        self.fail("no sentinel answered get-master-addr-by-name within 5 s")
    }

    pub fn initial_master_port(&self) -> u16 {
        self.nodes[0].port
    }

    /// Master + replicas, in initial order.
    pub fn node_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    fn node_index(&self, port: u16) -> usize {
        let i = self.nodes.iter().position(|n| n.port == port);
        i.unwrap_or_else(|| panic!("no redis node on port {port}"))
    }

    /// SIGKILL (and reap) the redis-server on `port`; the port is free afterwards.
    pub fn kill_node(&mut self, port: u16) {
        let i = self.node_index(port);
        self.nodes[i].kill();
    }

    /// Starts a (killed) node again: same port, same config file (Sentinel may have rewritten
    /// it); returns once it answers. Sentinel then turns an old master into a replica.
    pub async fn restart_node(&mut self, port: u16) {
        let i = self.node_index(port);
        let node = &mut self.nodes[i];
        node.kill();
        if let Err(e) = node.launch().await {
            panic!("restart of node {port} failed: {e}");
        }
    }

    /// SIGSTOP (freeze) the redis-server on `port`.
    pub fn stop_node(&self, port: u16) {
        self.nodes[self.node_index(port)].signal("-STOP");
    }

    /// SIGCONT the redis-server on `port`.
    pub fn cont_node(&self, port: u16) {
        self.nodes[self.node_index(port)].signal("-CONT");
    }

    /// Waits until every live sentinel names the same master, other than `old_port`, and that
    /// node reports `role:master`; returns its port and the time waited. Panics with the logs'
    /// tails after `limit`.
    pub async fn wait_for_failover(&self, old_port: u16, limit: Duration) -> (u16, Duration) {
        let mut poll = Poll::new(limit);
        while poll.next().await {
            let named = self.named_masters().await;
            let Some(Some(port)) = named.first().copied() else {
                continue;
            };
            if port == old_port || named.iter().any(|p| *p != Some(port)) {
                continue;
            }
            if info_field(&info(port, "replication").await, "role") == Some("master") {
                return (port, poll.elapsed());
            }
        }
        self.fail(&format!(
            "no failover away from port {old_port} within {limit:?}"
        ))
    }

    /// Asks a live sentinel for a failover now (`SENTINEL FAILOVER`), retrying while it
    /// refuses (one already in progress) for up to 10 s.
    pub async fn force_failover(&self) {
        let mut poll = Poll::new(Duration::from_secs(10));
        while poll.next().await {
            for s in self.sentinels.iter().filter(|s| s.alive()) {
                let asked: anyhow::Result<String> =
                    redis_cmd(s.port, &["SENTINEL", "FAILOVER", MASTER_NAME]).await;
                if asked.is_ok() {
                    return;
                }
            }
        }
        self.fail("no sentinel took SENTINEL FAILOVER within 10 s")
    }

    /// Pids of the live processes: nodes (initial order), then sentinels.
    pub fn pids(&self) -> Vec<u32> {
        let all = self.nodes.iter().chain(&self.sentinels);
        all.filter(|n| n.alive()).map(|n| n.pid).collect()
    }
}

/// A Redis Cluster on loopback: 6 nodes (`cluster-node-timeout` 1 s) joined by
/// `redis-cli --cluster create --cluster-replicas 1`, so 3 masters with one replica each.
pub struct ClusterTopology {
    nodes: Vec<Node>,
    /// The nodes' TLS ports (in node order), when started with [`ClusterTopology::start_tls`].
    tls_ports: Vec<u16>,
    _dir: tempfile::TempDir, // declared last: dropped after every process
}

impl ClusterTopology {
    /// Starts the nodes, creates the cluster and returns once every node reports
    /// `cluster_state:ok` with all slots assigned and 6 known nodes (20 s at most).
    pub async fn start() -> ClusterTopology {
        Self::start_with(None).await
    }

    /// The same cluster, its nodes also listening with TLS (clients, replication and the
    /// cluster bus); the harness itself keeps to the plain ports.
    pub async fn start_tls(certs: &TestCerts) -> ClusterTopology {
        Self::start_with(Some(certs)).await
    }

    async fn start_with(certs: Option<&TestCerts>) -> ClusterTopology {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        let mut topo = ClusterTopology {
            nodes: Vec::new(),
            tls_ports: Vec::new(),
            _dir: dir,
        };
        for i in 1..=6 {
            let name = format!("node{i}");
            let tls = certs.map(|c| (c, free_port()));
            let conf = |p| {
                let mut conf = server_conf(&path, &name, p, None)
                    + &format!(
                        "cluster-enabled yes\ncluster-config-file {name}-cluster.conf\n\
                         cluster-node-timeout 1000\ncluster-announce-ip 127.0.0.1\n"
                    );
                if let Some((certs, tls_port)) = tls {
                    conf += &certs.server_conf(tls_port);
                    conf += "tls-cluster yes\n";
                }
                conf
            };
            let node = Node::start_on(&path, &name, "redis-server", conf, free_cluster_port).await;
            topo.nodes.push(node);
            topo.tls_ports.extend(tls.map(|(_, p)| p));
        }
        let addrs = topo.seed_addrs();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        if !out.status.success() {
            topo.fail(&format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let (mut poll, mut ok) = (Poll::new(Duration::from_secs(20)), false);
        while !ok && poll.next().await {
            ok = topo.healthy().await;
        }
        if !ok {
            topo.fail("the cluster did not reach cluster_state:ok on every node within 20 s");
        }
        topo
    }

    /// Every live node: state ok, all slots assigned, 6 nodes known.
    pub async fn healthy(&self) -> bool {
        for n in self.nodes.iter().filter(|n| n.alive()) {
            let info: String = redis_cmd(n.port, &["CLUSTER", "INFO"])
                .await
                .unwrap_or_default();
            if info_field(&info, "cluster_state") != Some("ok")
                || info_field(&info, "cluster_slots_assigned") != Some("16384")
                || info_field(&info, "cluster_known_nodes") != Some("6")
            {
                return false;
            }
        }
        true
    }

    /// "127.0.0.1:PORT" of every node, in start order.
    pub fn seed_addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    /// "127.0.0.1:TLS_PORT" of every node (empty unless started with TLS).
    pub fn tls_seed_addrs(&self) -> Vec<String> {
        self.tls_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// The hash slot of `key` (asked of a live node).
    pub async fn keyslot(&self, key: &str) -> u16 {
        let port = self.live_port();
        let slot: i64 = redis_cmd(port, &["CLUSTER", "KEYSLOT", key])
            .await
            .expect("CLUSTER KEYSLOT");
        slot as u16
    }

    /// The port of the master serving `slot`, as a live node sees it (5 s max).
    pub async fn master_of(&self, slot: u16) -> u16 {
        let mut poll = Poll::new(Duration::from_secs(5));
        while poll.next().await {
            if let Some(p) = self.slot_master(self.live_port(), slot).await {
                return p;
            }
        }
        self.fail(&format!(
            "no node named a master for slot {slot} within 5 s"
        ))
    }

    async fn slot_master(&self, port: u16, slot: u16) -> Option<u16> {
        let slots: Vec<Vec<redis::Value>> = redis_cmd(port, &["CLUSTER", "SLOTS"]).await.ok()?;
        for range in slots {
            let (Some(lo), Some(hi), Some(master)) = (range.first(), range.get(1), range.get(2))
            else {
                continue;
            };
            let lo: i64 = redis::from_redis_value_ref(lo).ok()?;
            let hi: i64 = redis::from_redis_value_ref(hi).ok()?;
            if (lo..=hi).contains(&i64::from(slot)) {
                let addr: Vec<redis::Value> = redis::from_redis_value_ref(master).ok()?;
                let p: i64 = redis::from_redis_value_ref(addr.get(1)?).ok()?;
                return u16::try_from(p).ok();
            }
        }
        None
    }

    fn live_port(&self) -> u16 {
        let n = self.nodes.iter().find(|n| n.alive());
        n.expect("a live cluster node").port
    }

    /// Ports of the live nodes that are masters now.
    pub async fn masters(&self) -> Vec<u16> {
        let mut out = Vec::new();
        for n in self.nodes.iter().filter(|n| n.alive()) {
            if info_field(&info(n.port, "replication").await, "role") == Some("master") {
                out.push(n.port);
            }
        }
        out
    }

    fn node_index(&self, port: u16) -> usize {
        let i = self.nodes.iter().position(|n| n.port == port);
        i.unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    /// SIGKILL (and reap) the node on `port`.
    pub fn kill_node(&mut self, port: u16) {
        let i = self.node_index(port);
        self.nodes[i].kill();
    }

    /// SIGSTOP (freeze) / SIGCONT the node on `port`.
    pub fn signal_node(&self, port: u16, sig: &str) {
        self.nodes[self.node_index(port)].signal(sig);
    }

    /// Starts a killed node again (same port and cluster config file); it rejoins as a replica.
    pub async fn restart_node(&mut self, port: u16) {
        let i = self.node_index(port);
        let node = &mut self.nodes[i];
        node.kill();
        if let Err(e) = node.launch().await {
            panic!("restart of cluster node {port} failed: {e}");
        }
    }

    /// Waits until every live node names a master other than `old` for `slot` and the cluster
    /// is ok again; returns the new master's port and the time waited.
    pub async fn wait_for_failover(&self, slot: u16, old: u16, limit: Duration) -> (u16, Duration) {
        let mut poll = Poll::new(limit);
        'poll: while poll.next().await {
            let mut named = None;
            for n in self.nodes.iter().filter(|n| n.alive()) {
                let info: String = redis_cmd(n.port, &["CLUSTER", "INFO"])
                    .await
                    .unwrap_or_default();
                if info_field(&info, "cluster_state") != Some("ok") {
                    continue 'poll;
                }
                match self.slot_master(n.port, slot).await {
                    Some(p) if p != old && named.is_none_or(|m| m == p) => named = Some(p),
                    _ => continue 'poll,
                }
            }
            if let Some(p) = named {
                return (p, poll.elapsed());
            }
        }
        self.fail(&format!(
            "no failover of slot {slot} away from {old} within {limit:?}"
        ))
    }

    /// Moves `slot` and its keys from its master to the master on `to` while clients keep
    /// using it: `SETSLOT IMPORTING`/`MIGRATING`, `MIGRATE` of the keys in batches, then
    /// `SETSLOT NODE` on every master. Returns how long it took.
    pub async fn migrate_slot(&self, slot: u16, to: u16) -> Duration {
        let started = Instant::now();
        let from = self.master_of(slot).await;
        assert_ne!(from, to, "slot {slot} is on {to} already");
        let id = |port: u16| async move {
            redis_cmd::<String>(port, &["CLUSTER", "MYID"])
                .await
                .expect("CLUSTER MYID")
        };
        let (from_id, to_id) = (id(from).await, id(to).await);
        let s = slot.to_string();
        let ok = |r: anyhow::Result<String>, what: &str| {
            r.unwrap_or_else(|e| self.fail(&format!("{what}: {e}")));
        };
        ok(
            redis_cmd(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]).await,
            "IMPORTING",
        );
        ok(
            redis_cmd(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]).await,
            "MIGRATING",
        );
        let to_port = to.to_string();
        for _ in 0..10_000 {
            let keys: Vec<String> = redis_cmd(from, &["CLUSTER", "GETKEYSINSLOT", &s, "100"])
                .await
                .expect("GETKEYSINSLOT");
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            ok(redis_cmd(from, &args).await, "MIGRATE");
        }
        for port in self.masters().await {
            ok(
                redis_cmd(port, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]).await,
                "SETSLOT NODE",
            );
        }
        started.elapsed()
    }

    /// Panics with `msg` and the tail of every log.
    fn fail(&self, msg: &str) -> ! {
        let logs: Vec<String> = self.nodes.iter().map(|n| n.log_tail(15)).collect();
        panic!("{msg}\n{}", logs.join("\n"));
    }
}
