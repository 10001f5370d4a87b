//! A stand-in for the app's backend, on a free loopback port: the join authorization endpoint
//! (`POST /authorize`) and the webhook receiver (`POST /hooks`). Answers by room name:
//! a room containing `allow` gets 200 with presence meta defaults, `bigmeta` 200 with meta
//! defaults of 100 kB, `deny` 403, `slow` an answer after 5 s, `error` 500. Every call is
//! recorded.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};

/// One webhook POST as received.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub timestamp: String,
    pub signature: String,
    pub body: String,
}

#[derive(Default)]
struct Recorded {
    authorize: Vec<Value>,
    hooks: Vec<Delivery>,
    /// POSTs to `/hooks-flaky` refused so far (the first two are).
    refused: usize,
}

pub struct Backend {
    pub port: u16,
    recorded: Arc<Mutex<Recorded>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn authorize(State(r): State<Arc<Mutex<Recorded>>>, body: String) -> (StatusCode, String) {
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let room = v["room"].as_str().unwrap_or_default().to_string();
    r.lock().unwrap().authorize.push(v);
    if room.contains("slow") {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    if room.contains("bigmeta") {
        // Allowed, with meta defaults far over any presence limit.
        let filler = "x".repeat(100_000);
        (
            StatusCode::OK,
            json!({"meta": {"filler": filler}}).to_string(),
        )
    } else if room.contains("allow") {
        (
            StatusCode::OK,
            json!({"meta": {"role": "member", "color": "blue"}}).to_string(),
        )
    } else if room.contains("deny") {
        (StatusCode::FORBIDDEN, "{}".into())
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, "boom".into())
    }
}

async fn hooks(
    State(r): State<Arc<Mutex<Recorded>>>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    r.lock().unwrap().hooks.push(Delivery {
        timestamp: header("x-rtgate-timestamp"),
        signature: header("x-rtgate-signature"),
        body,
    });
    StatusCode::NO_CONTENT
}

/// `/hooks`, but the first two POSTs get 500 (nothing recorded): the sender must retry.
async fn flaky_hooks(
    State(r): State<Arc<Mutex<Recorded>>>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    {
        let mut rec = r.lock().unwrap();
        if rec.refused < 2 {
            rec.refused += 1;
            return StatusCode::INTERNAL_SERVER_ERROR;
        }
    }
    hooks(State(r), headers, body).await
}

impl Backend {
    pub async fn start() -> Backend {
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let app = axum::Router::new()
            .route("/authorize", post(authorize))
            .route("/hooks", post(hooks))
            .route("/hooks-flaky", post(flaky_hooks))
            .with_state(recorded.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the backend");
        let port = listener.local_addr().expect("local addr").port();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Backend {
            port,
            recorded,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Bodies of the authorization requests so far.
    pub fn authorize_calls(&self) -> Vec<Value> {
        self.recorded.lock().unwrap().authorize.clone()
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.recorded.lock().unwrap().hooks.clone()
    }

    /// Every webhook event received so far, in order.
    pub fn events(&self) -> Vec<Value> {
        self.deliveries()
            .iter()
            .flat_map(|d| {
                let v: Value = serde_json::from_str(&d.body).unwrap_or(Value::Null);
                v["events"].as_array().cloned().unwrap_or_default()
            })
            .collect()
    }

    /// Waits (bounded) until `pred` holds for the events received.
    pub async fn wait_events(
        &self,
        limit: Duration,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let events = self.events();
            if pred(&events) || tokio::time::Instant::now() >= deadline {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Hex HMAC-SHA256 of `<timestamp>.<body>` with `secret`, as the receiver checks it.
pub fn expected_signature(secret: &str, timestamp: &str, body: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, format!("{timestamp}.{body}").as_bytes());
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
