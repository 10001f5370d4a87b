//! A real OpenTelemetry collector (`rotel`, from PyPI) on free loopback ports, printing the
//! spans it receives; a reader of that output.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// The `rotel-agent` binary: `$ROTEL_BIN`, else the one in the project's `.venv`.
pub fn rotel_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ROTEL_BIN") {
        return Some(PathBuf::from(p));
    }
    super::venv_binary("rotel/rotel-agent")
}

/// True when rotel is available (see [`super::require`]).
pub fn require_rotel() -> bool {
    super::require(rotel_bin().is_some(), "rotel (set ROTEL_BIN)")
}

/// One span as the collector printed it.
#[derive(Debug, Clone, Default)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub parent_id: String,
    pub id: String,
    pub name: String,
    pub kind: String,
    /// `service.instance.id` of the resource that sent it.
    pub instance: String,
    pub attributes: Vec<(String, String)>,
}

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

pub struct Collector {
    pub grpc_port: u16,
    pub http_port: u16,
    out: PathBuf,
    _child: Child,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Collector {
    pub async fn start() -> Collector {
        let dir = tempfile::tempdir().expect("tempdir");
        let (grpc_port, http_port) = (free_port(), free_port());
        let out = dir.path().join("spans.txt");
        let file = std::fs::File::create(&out).expect("output file");
        let child = Command::new(rotel_bin().expect("rotel"))
            .arg("start")
            .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc_port}")])
            .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http_port}")])
            .args(["--exporter", "blackhole"])
            .args(["--debug-log", "traces", "--debug-log-verbosity", "detailed"])
            .args([
                "--pid-file",
                &dir.path().join("rotel.pid").to_string_lossy(),
            ])
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("file"))
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn rotel");
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in [grpc_port, http_port] {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                assert!(Instant::now() < deadline, "rotel did not listen on {port}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Collector {
            grpc_port,
            http_port,
            out,
            _child: child,
            _dir: dir,
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        parse(&std::fs::read_to_string(&self.out).unwrap_or_default())
    }

    /// Waits (bounded) until `done` holds for the spans received.
    pub async fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + limit;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "collector never got {what}; spans so far: {:#?}",
                spans
                    .iter()
                    .map(|s| (&s.name, &s.instance))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Parses rotel's detailed debug output (the collector's debug exporter format).
fn parse(text: &str) -> Vec<ReceivedSpan> {
    let mut spans = Vec::new();
    let mut instance = String::new();
    let mut current: Option<ReceivedSpan> = None;
    let mut in_resource = false;
    let mut in_attributes = false;
    let field = |line: &str| line.split_once(':').map(|(_, v)| v.trim().to_string());
    let value = |v: &str| {
        v.trim()
            .trim_start_matches(|c: char| c.is_alphabetic())
            .trim_start_matches('(')
            .trim_end_matches(')')
            .to_string()
    };
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("ResourceSpans #") {
            spans.extend(current.take());
            instance.clear();
            in_resource = true;
            in_attributes = false;
        } else if t.starts_with("Span #") {
            spans.extend(current.take());
            in_resource = false;
            in_attributes = false;
            current = Some(ReceivedSpan {
                instance: instance.clone(),
                ..Default::default()
            });
        } else if t.starts_with("ScopeSpans") || t.starts_with("InstrumentationScope") {
            in_resource = false;
        } else if let Some(rest) = t.strip_prefix("-> ") {
            let Some((k, v)) = rest.split_once(':') else {
                continue;
            };
            if in_resource && k == "service.instance.id" {
                instance = value(v);
            } else if in_attributes && let Some(s) = current.as_mut() {
                s.attributes.push((k.to_string(), value(v)));
            }
        } else if let Some(s) = current.as_mut() {
            if t.starts_with("Trace ID") {
                s.trace_id = field(t).unwrap_or_default();
            } else if t.starts_with("Parent ID") {
                s.parent_id = field(t).unwrap_or_default();
            } else if t.starts_with("ID") {
                s.id = field(t).unwrap_or_default();
            } else if t.starts_with("Name") {
                s.name = field(t).unwrap_or_default();
            } else if t.starts_with("Kind") {
                s.kind = field(t).unwrap_or_default();
            } else if t.starts_with("Attributes:") {
                in_attributes = true;
            }
        }
    }
    spans.extend(current);
    spans
}
