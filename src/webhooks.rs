//! Webhooks (`webhooks.url`): room and presence events POSTed to the app's backend, batched,
//! signed, retried with backoff. Never in the way of delivery: events wait in a bounded queue
//! (`webhooks.queue_max`); beyond it they are dropped and counted.
//!
//! Each POST carries `{"events": [...]}`, `X-Rtgate-Timestamp: <unix seconds>` and
//! `X-Rtgate-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" with webhooks.secret>`,
//! so a receiver can check both the origin and the age of a batch (replay).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::broker::{Edge, PresenceEntry, RoomName};
use crate::config::WebhooksConfig;
use crate::protocol::{format_ts, now_ms};
use crate::telemetry::metric;

/// Longest wait between two tries of a batch the receiver refused.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub struct Webhooks {
    cfg: WebhooksConfig,
    instance_id: Arc<str>,
    queue: Mutex<VecDeque<Value>>,
    wake: tokio::sync::Notify,
}

impl Webhooks {
    pub fn new(cfg: WebhooksConfig, instance_id: Arc<str>) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            instance_id,
            queue: Mutex::default(),
            wake: tokio::sync::Notify::new(),
        })
    }

    pub fn enabled(&self) -> bool {
        !self.cfg.url.is_empty()
    }

    /// A room got its first member on any instance, or lost its last one everywhere.
    pub fn room(&self, room: &RoomName, edge: Edge) {
        let event = match edge {
            Edge::Occupied => "room_occupied",
            Edge::Vacated => "room_vacated",
        };
        self.push(|| json!({"event": event, "room": &**room}));
    }

    /// A connection's presence was added to a room (`track`).
    pub fn presence_join(&self, room: &RoomName, entry: &PresenceEntry) {
        self.push(|| {
            let meta: Value = serde_json::from_str(entry.meta.get()).unwrap_or(Value::Null);
            json!({
                "event": "presence_join",
                "room": &**room,
                "user_id": &*entry.user_id,
                "session_id": &*entry.conn_id,
                "meta": meta,
            })
        });
    }

    /// A connection's presence left a room (`untrack`, leave or disconnect).
    pub fn presence_leave(&self, room: &RoomName, user_id: &str, session_id: &str) {
        self.push(|| {
            json!({
                "event": "presence_leave",
                "room": &**room,
                "user_id": user_id,
                "session_id": session_id,
            })
        });
    }

    fn push(&self, event: impl FnOnce() -> Value) {
        if !self.enabled() {
            return;
        }
        let mut event = event();
        event["ts"] = json!(format_ts(now_ms()));
        event["instance_id"] = json!(&*self.instance_id);
        let mut queue = self.queue.lock();
        if queue.len() >= self.cfg.queue_max {
            drop(queue);
            metric::webhook_dropped(1);
            return;
        }
        queue.push_back(event);
        drop(queue);
        self.wake.notify_one();
    }

    /// Sends batches until `stop`, then what is left within `grace`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken, grace: Duration) {
        if !self.enabled() {
            return;
        }
        let client = match reqwest::Client::builder().timeout(self.cfg.timeout).build() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "webhook client cannot be built; webhooks are off");
                return;
            }
        };
        let mut batch: Vec<Value> = Vec::new();
        let mut backoff = self.cfg.interval;
        loop {
            if batch.is_empty() {
                // More than a batch may be waiting already: only an empty queue waits for news.
                if self.queue.lock().is_empty() {
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = stop.cancelled() => break,
                    }
                }
                // Batched: at most one POST per interval.
                tokio::select! {
                    _ = tokio::time::sleep(self.cfg.interval) => {}
                    _ = stop.cancelled() => {}
                }
                batch = self.take(self.cfg.batch_max);
                if batch.is_empty() {
                    continue;
                }
            }
            if self.send(&client, &batch).await {
                batch.clear();
                backoff = self.cfg.interval;
            } else {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => break,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        // Shutting down: one last try for what is queued, bounded by the grace.
        batch.extend(self.take(usize::MAX));
        if !batch.is_empty() {
            let sent = tokio::time::timeout(grace, async {
                for chunk in batch.chunks(self.cfg.batch_max.max(1)) {
                    if !self.send(&client, chunk).await {
                        return false;
                    }
                }
                true
            })
            .await;
            if !matches!(sent, Ok(true)) {
                metric::webhook_dropped(batch.len() as u64);
                tracing::warn!(
                    events = batch.len(),
                    "webhook events not sent before shutdown"
                );
            }
        }
    }

    fn take(&self, max: usize) -> Vec<Value> {
        let mut queue = self.queue.lock();
        let n = queue.len().min(max);
        queue.drain(..n).collect()
    }

    /// One POST; true on a 2xx answer.
    async fn send(&self, client: &reqwest::Client, events: &[Value]) -> bool {
        let body = json!({ "events": events }).to_string();
        let ts = (now_ms() / 1000).to_string();
        let signature = sign(self.cfg.secret.as_bytes(), &ts, &body);
        let result = client
            .post(&self.cfg.url)
            .header("content-type", "application/json")
            .header("x-rtgate-timestamp", &ts)
            .header("x-rtgate-signature", format!("sha256={signature}"))
            .body(body)
            .send()
            .await;
        match result {
            Ok(r) if r.status().is_success() => {
                metric::webhook_sent(events.len() as u64);
                true
            }
            Ok(r) => {
                metric::webhook_failed();
                tracing::warn!(status = %r.status(), events = events.len(), "webhook refused; retrying");
                false
            }
            Err(e) => {
                metric::webhook_failed();
                tracing::warn!(error = %e, events = events.len(), "webhook not delivered; retrying");
                false
            }
        }
    }
}

/// Hex HMAC-SHA256 of `<timestamp>.<body>`.
pub fn sign(secret: &[u8], timestamp: &str, body: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.as_bytes());
    ctx.update(b".");
    ctx.update(body.as_bytes());
    ctx.sign()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Python: hmac.new(b"Jefe", b'1700000000.{"events":[]}', hashlib.sha256).hexdigest()
        assert_eq!(
            sign(b"Jefe", "1700000000", r#"{"events":[]}"#),
            "a110c986da302c5f37accf36f899e479e3fefc1bf8e4d6b0c91b30f3838ed197"
        );
    }

    #[test]
    fn a_full_queue_drops_and_nothing_is_queued_when_off() {
        let cfg = WebhooksConfig {
            url: "http://127.0.0.1:9/hook".into(),
            secret: "s".repeat(32),
            queue_max: 2,
            ..WebhooksConfig::default()
        };
        let hooks = Webhooks::new(cfg, "i1".into());
        let room = RoomName::from("public:a");
        for _ in 0..5 {
            hooks.room(&room, Edge::Occupied);
        }
        assert_eq!(hooks.take(usize::MAX).len(), 2);
        let off = Webhooks::new(WebhooksConfig::default(), "i1".into());
        off.room(&room, Edge::Vacated);
        assert!(off.take(usize::MAX).is_empty());
    }
}
