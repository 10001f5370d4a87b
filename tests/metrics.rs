//! `/metrics` against scripted sessions: every counter a session touches must move by exactly
//! what the session did (ops/grafana and ops/prometheus are built on these numbers).
//! Each test starts its own `rtgate` process (see tests/common/mod.rs); every wait is bounded.
//!
//! Metric assertions are collected and reported together, each marked MISSING (no such sample
//! in `/metrics`) or WRONG (the sample is there, the value is not the expected one), so one run
//! shows everything that is off.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::time::Instant;

// =============================================================================================
// A small parser for the Prometheus text format (0.0.4)

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug, Clone, Default)]
struct Scrape {
    samples: Vec<Sample>,
    text: String,
}

/// Parses `name{k="v",...} value [timestamp]` lines; comments and blank lines are skipped.
fn parse_exposition(text: &str) -> Scrape {
    let mut samples = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let sample =
            parse_sample(line).unwrap_or_else(|e| panic!("/metrics line {}: {e}: {raw}", n + 1));
        samples.push(sample);
    }
    Scrape {
        samples,
        text: text.to_string(),
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = line[..name_end].to_string();
    if name.is_empty() {
        return Err("empty metric name".into());
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let mut end = None;
        for _ in 0..body.len() + 1 {
            // Skip separators.
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            let Some(&(start, c)) = chars.peek() else {
                return Err("unterminated label set".into());
            };
            if c == '}' {
                end = Some(start + 1);
                break;
            }
            // Label name up to '='.
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            match chars.next() {
                Some((_, '"')) => {}
                _ => return Err(format!("label {key}: value must be quoted")),
            }
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, other)) => value.push(other),
                        None => return Err("dangling escape".into()),
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    other => value.push(other),
                }
            }
            if !closed {
                return Err(format!("label {key}: unterminated value"));
            }
            labels.insert(key.trim().to_string(), value);
        }
        let end = end.ok_or("label set too long")?;
        rest = &body[end..];
    }
    let value_text = rest.split_whitespace().next().ok_or("no value")?;
    let value = value_text
        .parse::<f64>()
        .map_err(|e| format!("value {value_text:?}: {e}"))?;
    Ok(Sample {
        name,
        labels,
        value,
    })
}

impl Scrape {
    /// Sum of the samples named `name` whose labels include every pair of `labels`;
    /// `None` when there is no such sample at all.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = false;
        let mut sum = 0.0;
        for s in &self.samples {
            if s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            {
                found = true;
                sum += s.value;
            }
        }
        found.then_some(sum)
    }

    /// Like `get`, with an absent sample read as 0 (a counter that was never incremented is
    /// not exported yet).
    fn or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// The lines of `/metrics` about `name`, for failure messages.
    fn lines_of(&self, name: &str) -> String {
        let lines: Vec<&str> = self
            .text
            .lines()
            .filter(|l| !l.starts_with('#') && l.starts_with(name))
            .collect();
        if lines.is_empty() {
            "(none)".into()
        } else {
            lines.join(" | ")
        }
    }
}

async fn scrape(srv: &Server) -> Scrape {
    let (status, body) = srv.get("/metrics").await;
    assert_eq!(status, 200, "GET /metrics: {body}");
    parse_exposition(&body)
}

/// Scrapes until `pred` holds or `t` has passed (bounded); returns the last scrape either way.
async fn scrape_until(srv: &Server, t: Duration, pred: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + t;
    let mut last = scrape(srv).await;
    for _ in 0..1000 {
        if pred(&last) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        last = scrape(srv).await;
    }
    last
}

fn describe(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

// =============================================================================================
// Checks: collected, then reported together

#[derive(Default)]
struct Checks {
    failures: Vec<String>,
}

impl Checks {
    /// The sample must exist in `after`; returns its value.
    fn present(&mut self, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let v = after.get(name, labels);
        if v.is_none() {
            self.failures.push(format!(
                "MISSING {}: no such sample in /metrics (lines named {name}: {})",
                describe(name, labels),
                after.lines_of(name)
            ));
        }
        v
    }

    /// A counter moved by exactly `expected` between the scrapes.
    fn delta_eq(
        &mut self,
        before: &Scrape,
        after: &Scrape,
        name: &str,
        labels: &[(&str, &str)],
        expected: f64,
    ) {
        // "Did not move" holds for a counter that was never incremented (not exported yet).
        if expected == 0.0 && after.get(name, labels).is_none() {
            return;
        }
        let Some(a) = self.present(after, name, labels) else {
            return;
        };
        let b = before.or_zero(name, labels);
        if a - b != expected {
            self.failures.push(format!(
                "WRONG {}: moved by {} (before {b}, after {a}), expected +{expected}",
                describe(name, labels),
                a - b
            ));
        }
    }

    /// A counter moved by at least `min` between the scrapes.
    fn delta_at_least(
        &mut self,
        before: &Scrape,
        after: &Scrape,
        name: &str,
        labels: &[(&str, &str)],
        min: f64,
    ) {
        let Some(a) = self.present(after, name, labels) else {
            return;
        };
        let b = before.or_zero(name, labels);
        if a - b < min {
            self.failures.push(format!(
                "WRONG {}: moved by {} (before {b}, after {a}), expected at least +{min}",
                describe(name, labels),
                a - b
            ));
        }
    }

    /// A value (gauge) equals `expected`.
    fn value_eq(&mut self, s: &Scrape, name: &str, labels: &[(&str, &str)], expected: f64) {
        let Some(v) = self.present(s, name, labels) else {
            return;
        };
        if v != expected {
            self.failures.push(format!(
                "WRONG {}: is {v}, expected {expected}",
                describe(name, labels)
            ));
        }
    }

    /// A value lies within `[lo, hi]`.
    fn value_within(&mut self, s: &Scrape, name: &str, labels: &[(&str, &str)], lo: f64, hi: f64) {
        let Some(v) = self.present(s, name, labels) else {
            return;
        };
        if !(lo..=hi).contains(&v) {
            self.failures.push(format!(
                "WRONG {}: is {v}, expected within [{lo}, {hi}]",
                describe(name, labels)
            ));
        }
    }

    fn check(&mut self, ok: bool, what: String) {
        if !ok {
            self.failures.push(format!("WRONG {what}"));
        }
    }

    fn finish(self, srv: &Server) {
        if !self.failures.is_empty() {
            panic!(
                "{} metric assertion(s) failed:\n  {}\nserver log tail:\n{}",
                self.failures.len(),
                self.failures.join("\n  "),
                tail(&srv.logs(), 20)
            );
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// =============================================================================================
// Client helpers that know exactly how many bytes they sent

/// Sends `req` with a fresh ref as one text frame, adds its length to `sent` and returns the
/// reply (`ack` or `error` with that ref).
async fn request_counted(c: &mut Client, mut req: Value, sent: &mut usize) -> Value {
    let r = c.fresh_ref();
    req["ref"] = json!(r);
    let text = req.to_string();
    *sent += text.len();
    c.send_text(&text).await;
    let rv = json!(r);
    c.recv_until(|v| is_reply_to(v, &rv), WAIT)
        .await
        .unwrap_or_else(|| panic!("no ack/error for {text}"))
}

async fn request_ok_counted(c: &mut Client, req: Value, sent: &mut usize) -> Value {
    let reply = request_counted(c, req.clone(), sent).await;
    assert_eq!(reply["type"], "ack", "request {req} was not acked: {reply}");
    reply
}

/// Closes from the client side and waits (bounded) for the server's close reply.
async fn close(c: &mut Client) {
    c.send_close(1000).await;
    let _ = c.expect_close(WAIT).await;
}

const MSG_IN: &str = "rtgate_messages_in_total";
const MSG_OUT: &str = "rtgate_messages_out_total";
const JOINS: &str = "rtgate_joins_total";
const CONNS: &str = "rtgate_connections";
const ROOMS: &str = "rtgate_rooms";
const BYTES_IN: &str = "rtgate_bytes_in_total";
const BYTES_OUT: &str = "rtgate_bytes_out_total";
const DELIVERY_COUNT: &str = "rtgate_delivery_latency_seconds_count";
const DELIVERY_SUM: &str = "rtgate_delivery_latency_seconds_sum";
const PUBLISH_COUNT: &str = "rtgate_broker_publish_seconds_count";
const RATE_LIMITED: &str = "rtgate_rate_limited_total";
const BAD_FRAMES: &str = "rtgate_bad_frames_total";

// =============================================================================================
// Tests

/// Two members of one room (the sender joined with `"self": false`), 3 publishes: every
/// counter moves by exactly what happened, the gauges follow connections and rooms.
#[tokio::test]
async fn counters_follow_a_scripted_session_exactly() {
    let srv = Server::start("").await;
    let room = "public:metrics";
    let before = scrape(&srv).await;
    let mut checks = Checks::default();

    let mut reader = srv.user("rita").await;
    let mut sender = srv.user("sam").await;
    let mut sent_bytes = 0usize;
    request_ok_counted(
        &mut reader,
        json!({"type": "join", "room": room}),
        &mut sent_bytes,
    )
    .await;
    request_ok_counted(
        &mut sender,
        json!({"type": "join", "room": room, "self": false}),
        &mut sent_bytes,
    )
    .await;

    // Gauges while both are connected and in the room.
    let during = scrape_until(&srv, WAIT, |s| {
        s.or_zero(CONNS, &[]) == 2.0 && s.or_zero(ROOMS, &[]) == 1.0
    })
    .await;
    checks.value_eq(&during, CONNS, &[], 2.0);
    checks.value_eq(&during, ROOMS, &[], 1.0);

    let mut ids = Vec::new();
    for n in 0..3 {
        let ack = request_ok_counted(
            &mut sender,
            json!({"type": "message", "room": room, "data": {"n": n, "text": "metrics"}}),
            &mut sent_bytes,
        )
        .await;
        let id = ack["data"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("message ack without data.id: {ack}"))
            .to_string();
        ids.push(id);
    }

    // The other member gets all three; the self:false sender gets none.
    let mut received_bytes = 0usize;
    let mut got_ids = Vec::new();
    for _ in 0..3 {
        let m = reader
            .recv_message(room, WAIT)
            .await
            .unwrap_or_else(|| panic!("reader missed a message; got {got_ids:?} of {ids:?}"));
        received_bytes += m.to_string().len();
        got_ids.push(m["id"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(got_ids, ids, "reader's messages vs the sender's acks");
    let echoed: Vec<Value> = sender
        .collect_for(QUIET)
        .await
        .into_iter()
        .filter(|v| v["type"] == "message")
        .collect();
    assert!(
        echoed.is_empty(),
        "a self:false sender must not receive its own messages: {echoed:?}"
    );

    // Counters: wait (bounded) until they have caught up, then give them a quiet window to
    // overshoot before reading them for good.
    scrape_until(&srv, WAIT, |s| {
        s.or_zero(MSG_OUT, &[("type", "message")]) - before.or_zero(MSG_OUT, &[("type", "message")])
            >= 3.0
            && s.or_zero(DELIVERY_COUNT, &[]) - before.or_zero(DELIVERY_COUNT, &[]) >= 3.0
            && s.or_zero(PUBLISH_COUNT, &[]) - before.or_zero(PUBLISH_COUNT, &[]) >= 3.0
    })
    .await;
    tokio::time::sleep(QUIET).await;
    let after = scrape(&srv).await;

    checks.delta_eq(&before, &after, MSG_IN, &[("type", "message")], 3.0);
    checks.delta_eq(&before, &after, MSG_IN, &[("type", "join")], 2.0);
    checks.delta_eq(&before, &after, MSG_IN, &[], 5.0);
    checks.delta_eq(&before, &after, JOINS, &[], 2.0);
    checks.delta_eq(&before, &after, MSG_OUT, &[("type", "message")], 3.0);
    checks.delta_eq(&before, &after, MSG_OUT, &[], 3.0);
    checks.delta_at_least(&before, &after, BYTES_IN, &[], sent_bytes as f64);
    checks.delta_at_least(&before, &after, BYTES_OUT, &[], received_bytes as f64);
    checks.delta_eq(&before, &after, DELIVERY_COUNT, &[], 3.0);
    checks.delta_eq(&before, &after, PUBLISH_COUNT, &[], 3.0);
    if let Some(sum) = checks.present(&after, DELIVERY_SUM, &[]) {
        let d = sum - before.or_zero(DELIVERY_SUM, &[]);
        // Same host, same clock: three deliveries take far less than this.
        checks.check(
            (0.0..3.0).contains(&d),
            format!("{DELIVERY_SUM}: moved by {d}s for 3 local deliveries"),
        );
    }
    checks.value_eq(&after, CONNS, &[], 2.0);
    checks.value_eq(&after, ROOMS, &[], 1.0);

    // Both leave by closing: back to no connection and no room.
    close(&mut sender).await;
    close(&mut reader).await;
    let end = scrape_until(&srv, WAIT, |s| {
        s.or_zero(CONNS, &[]) == 0.0 && s.or_zero(ROOMS, &[]) == 0.0
    })
    .await;
    checks.value_eq(&end, CONNS, &[], 0.0);
    checks.value_eq(&end, ROOMS, &[], 0.0);
    // Closing sends nothing to anyone.
    checks.delta_eq(&after, &end, MSG_OUT, &[], 0.0);
    checks.delta_eq(&after, &end, JOINS, &[], 0.0);

    let stats = srv.stats().await;
    checks.check(
        stats["connections"] == 0 && stats["rooms"] == 0,
        format!("/api/v1/stats after both closed: {stats}"),
    );
    checks.finish(&srv);
}

/// With a low rate limit, `rtgate_rate_limited_total` counts exactly the `rate_limited` errors
/// the client got, and only accepted requests count as `messages_in`; one malformed frame moves
/// `rtgate_bad_frames_total` by one.
#[tokio::test]
async fn rate_limit_refusals_and_bad_frames_are_counted_exactly() {
    let srv = Server::start("[ws]\nrate_limit_per_sec = 1\nrate_limit_burst = 5\n").await;
    let mut checks = Checks::default();
    let before = scrape(&srv).await;

    // 9 pings back to back against a bucket of 5 refilled at 1/s: some are refused, and never
    // more than 5 in a row (that would close the connection).
    let mut a = srv.user("alice").await;
    const N: usize = 9;
    let refs: Vec<String> = (0..N).map(|i| format!("p{i}")).collect();
    for r in &refs {
        a.send_text(&json!({"type": "ping", "ref": r}).to_string())
            .await;
    }
    let mut replies: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let deadline = Instant::now() + WAIT;
    for _ in 0..N * 4 {
        if replies.len() == N || Instant::now() >= deadline {
            break;
        }
        let Some(v) = a
            .recv_until(
                |v| {
                    (v["type"] == "pong" || v["type"] == "error")
                        && v["ref"].as_str().is_some_and(|r| r.starts_with('p'))
                },
                deadline.saturating_duration_since(Instant::now()),
            )
            .await
        else {
            break;
        };
        let r = v["ref"].as_str().unwrap_or_default().to_string();
        replies.entry(r).or_default().push(v);
    }
    for v in a.collect_for(QUIET).await {
        if let Some(r) = v["ref"].as_str().filter(|r| refs.iter().any(|x| x == r)) {
            replies.entry(r.to_string()).or_default().push(v.clone());
        }
    }
    let mut pongs = 0usize;
    let mut limited = 0usize;
    for r in &refs {
        let rs = replies.get(r).cloned().unwrap_or_default();
        assert_eq!(
            rs.len(),
            1,
            "ref {r}: exactly one reply expected, got {rs:?}"
        );
        if rs[0]["type"] == "pong" {
            pongs += 1;
        } else {
            assert!(is_error(&rs[0], "rate_limited"), "ref {r}: {}", rs[0]);
            limited += 1;
        }
    }
    assert!(
        limited >= 2,
        "{N} rapid pings with burst 5 at 1/s: only {limited} rate_limited"
    );

    scrape_until(&srv, WAIT, |s| {
        s.or_zero(RATE_LIMITED, &[]) - before.or_zero(RATE_LIMITED, &[]) >= limited as f64
    })
    .await;
    tokio::time::sleep(QUIET).await;
    let after_limit = scrape(&srv).await;
    checks.delta_eq(&before, &after_limit, RATE_LIMITED, &[], limited as f64);
    checks.delta_eq(
        &before,
        &after_limit,
        MSG_IN,
        &[("type", "ping")],
        pongs as f64,
    );
    checks.delta_eq(&before, &after_limit, MSG_IN, &[], pongs as f64);
    checks.delta_eq(&before, &after_limit, BAD_FRAMES, &[], 0.0);

    // One malformed frame, on a fresh connection (its own full bucket, so the rate limit
    // cannot take it first).
    let mut b = srv.user("bob").await;
    b.send_text("this is not json").await;
    let err = b
        .recv_until(|v| v["type"] == "error", WAIT)
        .await
        .expect("no error for a non-JSON frame");
    assert!(is_error(&err, "bad_request"), "non-JSON frame: {err}");
    b.assert_alive().await; // one bad frame is tolerated (ws.max_violations = 3)

    scrape_until(&srv, WAIT, |s| {
        s.or_zero(BAD_FRAMES, &[]) - after_limit.or_zero(BAD_FRAMES, &[]) >= 1.0
    })
    .await;
    tokio::time::sleep(QUIET).await;
    let after_bad = scrape(&srv).await;
    checks.delta_eq(&after_limit, &after_bad, BAD_FRAMES, &[], 1.0);
    checks.delta_eq(
        &after_limit,
        &after_bad,
        BAD_FRAMES,
        &[("reason", "bad_request")],
        1.0,
    );
    checks.delta_eq(&after_limit, &after_bad, RATE_LIMITED, &[], 0.0);
    // The ping of `assert_alive` is the only request accepted meanwhile.
    checks.delta_eq(&after_limit, &after_bad, MSG_IN, &[], 1.0);
    checks.finish(&srv);
}

/// The other delivery types: one direct message to a user with one connection, one system
/// broadcast (POST /api/v1/broadcast) to a room with two members.
#[tokio::test]
async fn direct_and_system_deliveries_are_counted_by_type() {
    let srv = Server::start("").await;
    let room = "public:announcements";
    let mut checks = Checks::default();

    let mut alice = srv.user("alice").await;
    let mut bob = srv.user("bob").await;
    let mut carol = srv.user("carol").await;
    bob.join(room).await;
    carol.join(room).await;
    let before = scrape(&srv).await;

    alice
        .request_ok(json!({"type": "direct", "data": {"to": "bob", "text": "psst"}}))
        .await;
    let direct = bob
        .recv_until(|v| v["type"] == "direct", WAIT)
        .await
        .expect("bob missed the direct message");
    let mut out_bytes = direct.to_string().len();

    let (status, body) = srv
        .broadcast(
            Some(API_KEY),
            &json!({"room": room, "type": "system", "data": {"notice": "maintenance"}}),
        )
        .await;
    assert_eq!(status, 200, "broadcast: {body}");
    for c in [&mut bob, &mut carol] {
        let f = c
            .recv_until(|v| v["type"] == "system", WAIT)
            .await
            .expect("a member missed the system broadcast");
        out_bytes += f.to_string().len();
    }

    scrape_until(&srv, WAIT, |s| {
        s.or_zero(MSG_OUT, &[]) - before.or_zero(MSG_OUT, &[]) >= 3.0
    })
    .await;
    tokio::time::sleep(QUIET).await;
    let after = scrape(&srv).await;
    checks.delta_eq(&before, &after, MSG_IN, &[("type", "direct")], 1.0);
    // A broadcast is not a client request.
    checks.delta_eq(&before, &after, MSG_IN, &[], 1.0);
    checks.delta_eq(&before, &after, MSG_OUT, &[("type", "direct")], 1.0);
    checks.delta_eq(&before, &after, MSG_OUT, &[("type", "system")], 2.0);
    checks.delta_eq(&before, &after, MSG_OUT, &[("type", "message")], 0.0);
    checks.delta_at_least(&before, &after, BYTES_OUT, &[], out_bytes as f64);
    // One room publish reached this instance (one fan-out, two recipients).
    checks.delta_eq(&before, &after, DELIVERY_COUNT, &[], 1.0);
    checks.finish(&srv);
}

/// A healthy instance on the memory broker: ready, not draining, heartbeat fresh.
#[tokio::test]
async fn health_gauges_of_a_ready_instance() {
    let srv = Server::start("").await;
    let (status, body) = srv.get("/readyz").await;
    assert_eq!(status, 200, "/readyz: {body}");
    let mut checks = Checks::default();
    let s = scrape_until(&srv, WAIT, |s| {
        s.get("rtgate_broker_ready", &[]).is_some()
            && s.get("rtgate_draining", &[]).is_some()
            && s.get("rtgate_heartbeat_age_seconds", &[]).is_some()
    })
    .await;
    checks.value_eq(&s, "rtgate_broker_ready", &[], 1.0);
    checks.value_eq(&s, "rtgate_draining", &[], 0.0);
    // heartbeat.interval is 5s and heartbeat.ttl 15s by default: a live instance is never
    // older than the ttl (what RtgateHeartbeatStale alerts on).
    checks.value_within(&s, "rtgate_heartbeat_age_seconds", &[], 0.0, 15.0);
    checks.finish(&srv);
}

#[test]
fn exposition_parser_reads_labels_escapes_and_histograms() {
    let s = parse_exposition(
        "# HELP x_total help\n# TYPE x_total counter\n\
         x_total{type=\"message\"} 3\n\
         x_total{type=\"join\",extra=\"a\\\"b,c}\"} 2 1700000000000\n\
         x_total_other 100\n\
         h_seconds_bucket{le=\"+Inf\"} 4\n\
         h_seconds_count 4\n\
         g -1.5e0\n",
    );
    assert_eq!(s.get("x_total", &[]), Some(5.0));
    assert_eq!(s.get("x_total", &[("type", "message")]), Some(3.0));
    assert_eq!(s.get("x_total", &[("extra", "a\"b,c}")]), Some(2.0));
    assert_eq!(s.get("x_total", &[("type", "direct")]), None);
    assert_eq!(s.get("h_seconds_count", &[]), Some(4.0));
    assert_eq!(s.get("h_seconds_bucket", &[("le", "+Inf")]), Some(4.0));
    assert_eq!(s.get("g", &[]), Some(-1.5));
    assert_eq!(s.get("missing", &[]), None);
    assert_eq!(s.or_zero("missing", &[]), 0.0);
}
