//! `rtgate-bench`: a load tool for the gateway's WebSocket API (wire contract: PROTOCOL.md).
//!
//! Scenarios, each printing one pretty JSON object to stdout (progress notes go to stderr):
//! - `latency`: one publisher (first `--url`) and one subscriber (last `--url`), a fixed publish
//!   rate, end-to-end and ack latency percentiles, loss, duplicates and reordering;
//! - `fanout`: N subscribers in one room and a publisher whose rate ramps up step by step until
//!   deliveries fall behind; reports every step and the best sustained one;
//! - `idle`: C idle connections; server memory per connection and connect rate.
//!
//! The server's default rate limit (50 requests/s per connection, burst 100) throttles the
//! publisher: run the server with
//! `RTGATE_WS__RATE_LIMIT_PER_SEC=100000 RTGATE_WS__RATE_LIMIT_BURST=100000`.
//! `rate_limited` errors are counted and reported in the JSON.
//!
//! CPU figures come from `/proc/<pid>/stat` (utime + stime) converted with the clock-tick rate
//! read once from `getconf CLK_TCK` (100 assumed if that fails; the JSON says which).

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{
    self, Message, protocol::CloseFrame, protocol::WebSocketConfig,
};

type Ws = WebSocketStream<TcpStream>;

/// How long after the last publish we keep waiting for deliveries and acks.
const DRAIN: Duration = Duration::from_secs(2);
/// Safety net on top of `--max-duration` (the scenarios plan to finish inside it).
const HARD_CAP_GRACE: Duration = Duration::from_secs(5);
/// Connections per source address in `idle` (the ephemeral port range is ~28k per address).
const CONNS_PER_SOURCE_ADDR: usize = 20_000;
/// A fanout step passes when at least this share of the expected deliveries arrived.
const FANOUT_MIN_DELIVERY_RATIO: f64 = 0.95;
const RATE_LIMIT_HINT: &str = "run the server with RTGATE_WS__RATE_LIMIT_PER_SEC=100000 \
     RTGATE_WS__RATE_LIMIT_BURST=100000, or its default rate limit (50/s, burst 100) throttles the publisher";

// Linux errno values (no libc dependency).
const ENFILE: i32 = 23;
const EMFILE: i32 = 24;
const EADDRINUSE: i32 = 98;
const EADDRNOTAVAIL: i32 = 99;
const ECONNREFUSED: i32 = 111;

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

/// Load-test a running gateway over its WebSocket API.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub scenario: Scenario,

    /// Gateway WebSocket URL (ws:// only); repeat for several instances.
    #[arg(
        long = "url",
        global = true,
        default_value = "ws://127.0.0.1:8080/api/v1/ws"
    )]
    pub urls: Vec<String>,

    /// HS256 secret used to mint one token per connection (sub = "bench-<n>", exp = now + 1 h).
    #[arg(
        long,
        global = true,
        env = "RTGATE_AUTH__JWT_SECRET",
        hide_env_values = true
    )]
    pub secret: Option<String>,

    /// One ready-made JWT used by every connection (takes precedence over --secret).
    #[arg(long, global = true)]
    pub token: Option<String>,

    /// A server process to meter (CPU from /proc/PID/stat, VmRSS); repeat for several.
    #[arg(long = "server-pid", global = true)]
    pub server_pids: Vec<u32>,

    /// Room to use [default: bench:<scenario>].
    #[arg(long, global = true)]
    pub room: Option<String>,

    /// Hard cap on the whole run.
    #[arg(long, global = true, default_value = "60s", value_parser = humantime::parse_duration)]
    pub max_duration: Duration,

    /// How many connections may be in the middle of connecting at once.
    #[arg(long, global = true, default_value_t = 64)]
    pub concurrency: usize,

    /// Timeout for one connection: TCP connect, WebSocket handshake and welcome frame.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
}

#[derive(clap::Subcommand, Debug)]
pub enum Scenario {
    /// One publisher, one subscriber, fixed rate: end-to-end latency, loss and order.
    Latency(LatencyArgs),
    /// N subscribers in one room, publish rate ramping up until deliveries fall behind.
    Fanout(FanoutArgs),
    /// C idle connections: server memory per connection and connect rate.
    Idle(IdleArgs),
}

#[derive(clap::Args, Debug)]
pub struct LatencyArgs {
    /// Publish rate in messages per second.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Measured window.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Publishing before the measured window, not counted.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Padding string length added to each message's data, in bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Rooms (`<room>-0` ... when more than one): the publisher sends to each in turn, the
    /// subscriber is in all; order is checked per room.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Give every message an `idempotency_key` (as the SDK does on every send).
    #[arg(long)]
    pub keyed: bool,
}

#[derive(clap::Args, Debug)]
pub struct FanoutArgs {
    /// Subscribers, spread round-robin over the URLs, all in one room.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Publish rate of the first step, in messages per second.
    #[arg(long, default_value_t = 100.0)]
    pub start_rate: f64,
    /// Factor applied to the rate after each step.
    #[arg(long, default_value_t = 1.5)]
    pub step: f64,
    /// Length of one step.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub step_duration: Duration,
    /// Highest publish rate tried.
    #[arg(long, default_value_t = 20000.0)]
    pub max_rate: f64,
    /// A step fails when its p99 delivery latency exceeds this.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub max_p99: Duration,
    /// Padding string length added to each message's data, in bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
}

#[derive(clap::Args, Debug)]
pub struct IdleArgs {
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// How long to hold them once connected (memory is read after one second).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
}

// ---------------------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------------------

/// Runs one scenario and prints its JSON report to stdout.
pub async fn run(args: BenchArgs) -> Result<()> {
    let (name, params) = scenario_params(&args);
    let ctx = Ctx::new(&args, name).await?;
    if !matches!(args.scenario, Scenario::Idle(_)) {
        eprintln!("bench {name}: note: {RATE_LIMIT_HINT}");
    }

    let hard_cap = args.max_duration + HARD_CAP_GRACE;
    let scenario = async {
        match &args.scenario {
            Scenario::Latency(a) => run_latency(&ctx, a).await,
            Scenario::Fanout(a) => run_fanout(&ctx, a).await,
            Scenario::Idle(a) => run_idle(&ctx, a).await,
        }
    };
    let results = tokio::time::timeout(hard_cap, scenario)
        .await
        .map_err(|_| {
            anyhow!(
                "bench {name} exceeded --max-duration {} (+{}s grace); aborted",
                humantime::format_duration(args.max_duration),
                HARD_CAP_GRACE.as_secs()
            )
        })?
        .with_context(|| format!("bench {name} failed"))?;

    let report = Report {
        scenario: name,
        params,
        environment: ctx.environment(),
        results,
        warnings: ctx.warnings(),
        elapsed_s: round3(ctx.started.elapsed().as_secs_f64()),
    };
    let text = serde_json::to_string_pretty(&report).context("serializing the report")?;
    println!("{text}");
    Ok(())
}

/// The JSON printed on stdout (a struct so that the top-level keys keep this order).
#[derive(Serialize)]
struct Report {
    scenario: &'static str,
    params: Value,
    environment: Value,
    results: Value,
    warnings: Vec<String>,
    elapsed_s: f64,
}

fn scenario_params(args: &BenchArgs) -> (&'static str, Value) {
    let common = json!({
        "urls": args.urls,
        "auth": if args.token.is_some() { "token" } else { "secret" },
        "server_pids": args.server_pids,
        "max_duration_s": args.max_duration.as_secs_f64(),
        "concurrency": args.concurrency,
        "connect_timeout_s": args.connect_timeout.as_secs_f64(),
    });
    let (name, specific) = match &args.scenario {
        Scenario::Latency(a) => (
            "latency",
            json!({
                "rate": a.rate,
                "duration_s": a.duration.as_secs_f64(),
                "warmup_s": a.warmup.as_secs_f64(),
                "size": a.size,
                "rooms": a.rooms,
            }),
        ),
        Scenario::Fanout(a) => (
            "fanout",
            json!({
                "subscribers": a.subscribers,
                "start_rate": a.start_rate,
                "step": a.step,
                "step_duration_s": a.step_duration.as_secs_f64(),
                "max_rate": a.max_rate,
                "max_p99_ms": a.max_p99.as_secs_f64() * 1e3,
                "size": a.size,
            }),
        ),
        Scenario::Idle(a) => (
            "idle",
            json!({ "connections": a.connections, "hold_s": a.hold.as_secs_f64() }),
        ),
    };
    let mut params = specific;
    if let (Some(p), Value::Object(c)) = (params.as_object_mut(), common) {
        p.extend(c);
        p.insert(
            "room".into(),
            json!(args.room.clone().unwrap_or_else(|| format!("bench:{name}"))),
        );
    }
    (name, params)
}

/// Everything the scenarios share.
struct Ctx {
    started: Instant,
    /// The scenarios plan to be done by then.
    deadline: Instant,
    targets: Vec<Target>,
    auth: Auth,
    room: String,
    concurrency: usize,
    connect_timeout: Duration,
    meter: Meter,
    clock: Clock,
    events: Arc<Events>,
    warnings: Mutex<Vec<String>>,
}

impl Ctx {
    async fn new(args: &BenchArgs, scenario: &str) -> Result<Self> {
        let started = Instant::now();
        ensure!(!args.urls.is_empty(), "at least one --url is needed");
        ensure!(args.concurrency > 0, "--concurrency must be at least 1");
        let mut targets = Vec::with_capacity(args.urls.len());
        for url in &args.urls {
            let resolved = tokio::time::timeout(args.connect_timeout, Target::resolve(url))
                .await
                .map_err(|_| anyhow!("{url}: name resolution timed out"))??;
            targets.push(resolved);
        }
        let auth = match (&args.token, &args.secret) {
            (Some(t), _) => Auth::Token(t.clone()),
            (None, Some(s)) => Auth::Secret(jsonwebtoken::EncodingKey::from_secret(s.as_bytes())),
            (None, None) => bail!(
                "pass --secret (the server's HS256 JWT secret; RTGATE_AUTH__JWT_SECRET is read too) or --token"
            ),
        };
        nofile_soft_limit(); // cache it while files can still be opened
        // Fail early on a bad secret rather than on the first connection.
        auth.token(0).context("minting a token")?;
        for pid in &args.server_pids {
            proc_cpu_ticks(&pid.to_string()).with_context(|| format!("--server-pid {pid}"))?;
        }
        let room = args
            .room
            .clone()
            .unwrap_or_else(|| format!("bench:{scenario}"));
        Ok(Self {
            started,
            deadline: started + args.max_duration,
            targets,
            auth,
            room,
            concurrency: args.concurrency,
            connect_timeout: args.connect_timeout,
            meter: Meter::new(args.server_pids.clone()),
            clock: Clock::new(),
            events: Arc::new(Events::default()),
            warnings: Mutex::new(Vec::new()),
        })
    }

    fn warn(&self, msg: impl Into<String>) {
        let msg = msg.into();
        eprintln!("bench: warning: {msg}");
        lock(&self.warnings).push(msg);
    }

    fn warnings(&self) -> Vec<String> {
        lock(&self.warnings).clone()
    }

    fn environment(&self) -> Value {
        let targets: Vec<Value> = self
            .targets
            .iter()
            .map(|t| json!({"url": t.url, "addr": t.addr.to_string()}))
            .collect();
        json!({
            "targets": targets,
            "clk_tck": self.meter.clk_tck,
            "clk_tck_source": self.meter.clk_tck_source,
            "nofile_soft_limit": nofile_soft_limit(),
        })
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

// ---------------------------------------------------------------------------------------------
// Scenario: latency
// ---------------------------------------------------------------------------------------------

/// Step numbers carried in `data.k` by the latency scenario's messages.
const STEP_WARMUP: usize = 0;
const STEP_MEASURED: usize = 1;

async fn run_latency(ctx: &Ctx, a: &LatencyArgs) -> Result<Value> {
    ensure!(
        a.rate > 0.0 && a.rate.is_finite(),
        "--rate must be positive"
    );
    let warmup_n = (a.rate * a.warmup.as_secs_f64()).round() as u64;
    let measured_n = (a.rate * a.duration.as_secs_f64()).round() as u64;
    ensure!(
        measured_n > 0,
        "--rate x --duration gives no measured message"
    );
    let total = warmup_n + measured_n;
    let needed = a.warmup + a.duration + DRAIN + Duration::from_secs(1);
    ensure!(
        needed <= ctx.remaining(),
        "warmup + duration + {}s drain needs about {}; raise --max-duration",
        DRAIN.as_secs(),
        humantime::format_duration(needed)
    );

    ensure!(a.rooms >= 1, "--rooms must be at least 1");
    let rooms: Vec<String> = if a.rooms == 1 {
        vec![ctx.room.clone()]
    } else {
        (0..a.rooms).map(|i| format!("{}-{i}", ctx.room)).collect()
    };
    let pub_target = &ctx.targets[0];
    let sub_target = &ctx.targets[ctx.targets.len() - 1];
    let (mut sub_ws, sub_welcome) = connect(
        sub_target,
        &ctx.auth.token(1)?,
        None,
        stream_config(),
        ctx.connect_timeout,
    )
    .await
    .context("subscriber")?;
    for room in &rooms {
        join(&mut sub_ws, room, true, ctx.connect_timeout)
            .await
            .context("subscriber")?;
    }
    let (mut pub_ws, pub_welcome) = connect(
        pub_target,
        &ctx.auth.token(0)?,
        None,
        stream_config(),
        ctx.connect_timeout,
    )
    .await
    .context("publisher")?;
    // `self: false` so the publisher's socket does not also carry every message back.
    for room in &rooms {
        join(&mut pub_ws, room, false, ctx.connect_timeout)
            .await
            .context("publisher")?;
    }
    eprintln!(
        "bench latency: publisher on {} (instance {}), subscriber on {} (instance {}); {total} messages at {}/s",
        pub_target.url,
        pub_welcome.instance(),
        sub_target.url,
        sub_welcome.instance(),
        a.rate
    );

    let recv = Arc::new(LatencyRecv::new(total, rooms.len()));
    let log = Arc::new(PubLog::new(total, 2));
    let (sink, stream) = pub_ws.split();
    let mut tasks = JoinSet::new();
    tasks.spawn(latency_subscriber(
        sub_ws,
        recv.clone(),
        ctx.events.clone(),
        ctx.clock,
    ));
    tasks.spawn(read_acks(
        stream,
        log.clone(),
        ctx.events.clone(),
        ctx.clock,
    ));

    let start = Instant::now() + Duration::from_millis(20);
    let window_start = start + a.warmup;
    // Take the CPU snapshot when the measured window opens, off the publishing path.
    let meter = ctx.meter.clone();
    let first_snapshot = tokio::spawn(async move {
        tokio::time::sleep_until(window_start.into()).await;
        meter.snapshot()
    });
    let mut publisher = Publisher::new(sink, &rooms, a.size, log.clone(), ctx.clock)?;
    publisher.keyed = a.keyed;
    let plan = PacePlan {
        start,
        rate: a.rate,
        first_seq: 0,
        count: total,
    };
    let step_of = move |i: u64| {
        if i < warmup_n {
            STEP_WARMUP
        } else {
            STEP_MEASURED
        }
    };
    // Keep the publisher (and so its socket) open until the drain is over.
    let (_publisher, outcome) = publisher.publish_paced(plan, step_of, ctx.deadline).await?;
    if let Some(err) = &outcome.error {
        ctx.warn(format!("publisher stopped early: {err}"));
    }

    let sent = log.steps[STEP_MEASURED].sent.load(Relaxed);
    wait_until(Instant::now() + DRAIN, || {
        recv.unique_measured.load(Relaxed) >= sent && log.replied_total() >= outcome.sent
    })
    .await;
    let before = first_snapshot.await.context("CPU snapshot task failed")?;
    let after = ctx.meter.snapshot();
    tasks.abort_all();

    let cpu = ctx.meter.window(&before, &after);
    let received = recv.unique_measured.load(Relaxed);
    let step = &log.steps[STEP_MEASURED];
    let rate_limited = log.rate_limited_total();
    if rate_limited > 0 {
        ctx.warn(format!(
            "{rate_limited} publishes were rate_limited: {RATE_LIMIT_HINT}"
        ));
    }
    Ok(json!({
        "publisher_instance": pub_welcome.instance(),
        "subscriber_instance": sub_welcome.instance(),
        "warmup_sent": log.steps[STEP_WARMUP].sent.load(Relaxed),
        "sent": sent,
        "acked": step.acked.load(Relaxed),
        "received": received,
        "lost": sent.saturating_sub(received),
        "duplicates": recv.duplicates.load(Relaxed),
        "out_of_order": recv.out_of_order.load(Relaxed),
        "rate_limited": rate_limited,
        "publish_errors": log.error_counts(),
        "latency_us": recv.from_scheduled.summary(),
        "latency_from_send_us": recv.from_send.summary(),
        "ack_latency_us": step.ack_latency.summary(),
        "achieved_rate": achieved_rate(sent, window_start, outcome.last_send, a.rate),
        "server_cpu_us_per_delivery": cpu.server_cpu_us.map(|us| per(us, received)),
        "server_cpu_percent": cpu.server_cpu_percent(),
        "bench_cpu_percent": cpu.bench_cpu_percent(),
        "window_s": round3(cpu.wall_s),
        "events": ctx.events.report(),
    }))
}

/// Measured messages per second actually sent: below `--rate` when the publisher could not
/// keep up. `n` messages span `n - 1` periods, hence the extra period.
fn achieved_rate(sent: u64, from: Instant, last_send: Option<Instant>, rate: f64) -> Option<f64> {
    let span = last_send?.saturating_duration_since(from).as_secs_f64() + 1.0 / rate;
    (sent > 0).then(|| round3(sent as f64 / span))
}

/// What the latency subscriber has seen.
struct LatencyRecv {
    seen: Vec<AtomicBool>,
    /// Per room (message `seq % rooms`): highest seq seen so far, plus one (0: none yet).
    next_seq: Vec<AtomicU64>,
    unique_measured: AtomicU64,
    duplicates: AtomicU64,
    out_of_order: AtomicU64,
    /// From the scheduled send time: includes any delay of the publisher (coordinated omission).
    from_scheduled: Histogram,
    /// From the moment the frame was handed to the socket.
    from_send: Histogram,
}

impl LatencyRecv {
    fn new(total: u64, rooms: usize) -> Self {
        Self {
            seen: (0..total).map(|_| AtomicBool::new(false)).collect(),
            next_seq: (0..rooms.max(1)).map(|_| AtomicU64::new(0)).collect(),
            unique_measured: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            out_of_order: AtomicU64::new(0),
            from_scheduled: Histogram::new(),
            from_send: Histogram::new(),
        }
    }

    /// Duplicates and reordering are counted over every message, warm-up included.
    fn record(&self, d: &Delivery, now_ns: u64) {
        let Some(slot) = usize::try_from(d.seq).ok().and_then(|i| self.seen.get(i)) else {
            return; // not one of ours (e.g. a previous run still draining)
        };
        if slot.swap(true, Relaxed) {
            self.duplicates.fetch_add(1, Relaxed);
            return;
        }
        let next_seq = &self.next_seq[(d.seq % self.next_seq.len() as u64) as usize];
        if d.seq + 1 < next_seq.load(Relaxed) {
            self.out_of_order.fetch_add(1, Relaxed);
        } else {
            next_seq.store(d.seq + 1, Relaxed);
        }
        if d.step == STEP_MEASURED {
            self.from_scheduled.record(now_ns.saturating_sub(d.t));
            self.from_send.record(now_ns.saturating_sub(d.st));
            self.unique_measured.fetch_add(1, Relaxed);
        }
    }
}

async fn latency_subscriber(mut ws: Ws, recv: Arc<LatencyRecv>, events: Arc<Events>, clock: Clock) {
    while let Some(frame) = ws.next().await {
        match frame {
            Ok(Message::Text(text)) => {
                let now = clock.now_ns();
                match parse_delivery(&text) {
                    Some(d) => recv.record(&d, now),
                    None => events.other_frame(&text),
                }
            }
            Ok(Message::Close(f)) => {
                events.closed("subscriber", f.as_ref());
                break;
            }
            Ok(_) => {}
            Err(e) => {
                events.conn_error("subscriber", &e);
                break;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scenario: fanout
// ---------------------------------------------------------------------------------------------

async fn run_fanout(ctx: &Ctx, a: &FanoutArgs) -> Result<Value> {
    ensure!(a.subscribers > 0, "--subscribers must be at least 1");
    ensure!(
        a.start_rate > 0.0 && a.start_rate.is_finite(),
        "--start-rate must be positive"
    );
    ensure!(
        a.step > 1.0 && a.step.is_finite(),
        "--step must be greater than 1"
    );
    ensure!(
        a.max_rate >= a.start_rate && a.max_rate.is_finite(),
        "--max-rate must be at least --start-rate"
    );
    ensure!(
        !a.step_duration.is_zero(),
        "--step-duration must be positive"
    );
    let rates = ramp(a.start_rate, a.step, a.max_rate);
    let counts: Vec<u64> = rates
        .iter()
        .map(|r| ((r * a.step_duration.as_secs_f64()).round() as u64).max(1))
        .collect();
    let capacity: u64 = counts.iter().sum();

    let recv = Arc::new(FanoutRecv::new(rates.len()));
    let mut tasks = JoinSet::new();
    let subs = connect_fanout_subscribers(ctx, a.subscribers, &recv, &mut tasks).await?;
    let connected = subs.connected;

    let (mut pub_ws, pub_welcome) = connect(
        &ctx.targets[0],
        &ctx.auth.token(0)?,
        None,
        stream_config(),
        ctx.connect_timeout,
    )
    .await
    .context("publisher")?;
    join(&mut pub_ws, &ctx.room, false, ctx.connect_timeout)
        .await
        .context("publisher")?;
    let log = Arc::new(PubLog::new(capacity, rates.len()));
    let (sink, stream) = pub_ws.split();
    tasks.spawn(read_acks(
        stream,
        log.clone(),
        ctx.events.clone(),
        ctx.clock,
    ));
    let mut publisher = Publisher::new(
        sink,
        std::slice::from_ref(&ctx.room),
        a.size,
        log.clone(),
        ctx.clock,
    )?;
    // Let cross-instance subscriptions settle before the first step.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut steps = Vec::new();
    let mut best: Option<Value> = None;
    let mut stopped_by = "max_rate";
    let mut first_seq = 0;
    for (k, (&rate, &count)) in rates.iter().zip(&counts).enumerate() {
        if Instant::now() + a.step_duration + DRAIN > ctx.deadline {
            stopped_by = "max_duration";
            break;
        }
        let before = ctx.meter.snapshot();
        let step_start = Instant::now() + Duration::from_millis(5);
        let plan = PacePlan {
            start: step_start,
            rate,
            first_seq,
            count,
        };
        first_seq += count;
        let (next, outcome) = publisher
            .publish_paced(plan, move |_| k, ctx.deadline)
            .await?;
        publisher = next;
        let expected = outcome.sent * connected as u64;
        let hist = &recv.steps[k];
        wait_until(Instant::now() + DRAIN, || {
            hist.count() >= expected && log.steps[k].replied.load(Relaxed) >= outcome.sent
        })
        .await;
        let cpu = ctx.meter.window(&before, &ctx.meter.snapshot());

        let delivered = hist.count();
        let lat = hist.summary();
        let ack = log.steps[k].ack_latency.summary();
        let ratio = if expected == 0 {
            0.0
        } else {
            delivered as f64 / expected as f64
        };
        let passed = outcome.error.is_none()
            && ratio >= FANOUT_MIN_DELIVERY_RATIO
            && lat.p99 <= a.max_p99.as_secs_f64() * 1e6;
        let row = json!({
            "step": k,
            "rate": round3(rate),
            "sent": outcome.sent,
            "achieved_rate": achieved_rate(outcome.sent, step_start, outcome.last_send, rate),
            "acked": log.steps[k].acked.load(Relaxed),
            "rate_limited": log.steps[k].rate_limited.load(Relaxed),
            "expected_deliveries": expected,
            "delivered": delivered,
            "delivery_ratio": round3(ratio),
            "deliveries_per_sec": round3(delivered as f64 / cpu.wall_s),
            "latency_us": {"p50": lat.p50, "p99": lat.p99, "max": lat.max},
            "ack_latency_us": {"p50": ack.p50, "p99": ack.p99},
            "server_cpu_us_per_delivery": cpu.server_cpu_us.map(|us| per(us, delivered)),
            "server_cpu_percent": cpu.server_cpu_percent(),
            "bench_cpu_percent": cpu.bench_cpu_percent(),
            "window_s": round3(cpu.wall_s),
            "subscribers_alive": recv.alive.load(Relaxed),
            "passed": passed,
        });
        eprintln!(
            "bench fanout: step {k} rate {rate:.0}/s delivered {delivered}/{expected} p99 {}us {}",
            lat.p99,
            if passed { "ok" } else { "FELL BEHIND" }
        );
        if let Some(err) = outcome.error {
            ctx.warn(format!("publisher stopped at step {k}: {err}"));
            steps.push(row);
            stopped_by = "publisher_error";
            break;
        }
        if passed {
            best = Some(row.clone());
        }
        steps.push(row);
        if !passed {
            stopped_by = "fell_behind";
            break;
        }
    }
    tasks.abort_all();

    let rate_limited = log.rate_limited_total();
    if rate_limited > 0 {
        ctx.warn(format!(
            "{rate_limited} publishes were rate_limited: {RATE_LIMIT_HINT}"
        ));
    }
    Ok(json!({
        "publisher_instance": pub_welcome.instance(),
        "subscribers_connected": connected,
        "subscribers_failed": subs.failed,
        "subscriber_connect_s": round3(subs.elapsed.as_secs_f64()),
        "subscriber_connect_errors": subs.first_errors,
        "subscribers_per_instance": subs.per_instance,
        "stopped_by": stopped_by,
        "best_sustained": best,
        "steps": steps,
        "rate_limited": rate_limited,
        "publish_errors": log.error_counts(),
        "events": ctx.events.report(),
    }))
}

/// Publish rates of the ramp: start, start x step, ... capped at (and ending with) max.
fn ramp(start: f64, step: f64, max: f64) -> Vec<f64> {
    let mut rates = vec![start.min(max)];
    while let Some(&last) = rates.last() {
        if last >= max || rates.len() >= 64 {
            break;
        }
        rates.push((last * step).min(max));
    }
    rates
}

/// Deliveries seen by every fanout subscriber, per step (`data.k`), latency from the scheduled
/// send time. Shared by all subscriber tasks, hence atomic.
struct FanoutRecv {
    steps: Vec<Histogram>,
    alive: AtomicU64,
}

impl FanoutRecv {
    fn new(steps: usize) -> Self {
        Self {
            steps: (0..steps).map(|_| Histogram::new()).collect(),
            alive: AtomicU64::new(0),
        }
    }
}

struct SubscriberSet {
    connected: usize,
    failed: usize,
    elapsed: Duration,
    first_errors: Vec<String>,
    per_instance: BTreeMap<String, u64>,
}

/// Connects and joins `n` subscribers, at most `--concurrency` at a time, and starts a reader
/// task for each as soon as it has joined.
async fn connect_fanout_subscribers(
    ctx: &Ctx,
    n: usize,
    recv: &Arc<FanoutRecv>,
    tasks: &mut JoinSet<()>,
) -> Result<SubscriberSet> {
    let t0 = Instant::now();
    let mut set = SubscriberSet {
        connected: 0,
        failed: 0,
        elapsed: Duration::ZERO,
        first_errors: Vec::new(),
        per_instance: BTreeMap::new(),
    };
    let mut pending = futures_util::stream::iter(0..n)
        .map(|i| connect_subscriber(ctx, i))
        .buffer_unordered(ctx.concurrency);
    let mut last_note = Instant::now();
    loop {
        let next = tokio::time::timeout_at(ctx.deadline.into(), pending.next()).await;
        let Ok(next) = next else {
            ctx.warn("connecting subscribers hit --max-duration");
            break;
        };
        let Some(result) = next else { break };
        match result {
            Ok((ws, welcome)) => {
                set.connected += 1;
                *set.per_instance.entry(welcome.instance()).or_default() += 1;
                recv.alive.fetch_add(1, Relaxed);
                tasks.spawn(fanout_subscriber(
                    ws,
                    recv.clone(),
                    ctx.events.clone(),
                    ctx.clock,
                ));
            }
            Err(e) => {
                set.failed += 1;
                if set.first_errors.len() < 5 {
                    set.first_errors.push(format!("{e:#}"));
                }
                if is_fd_exhaustion(&e) {
                    ctx.warn(fd_exhaustion_message(set.connected));
                    break;
                }
            }
        }
        if last_note.elapsed() >= Duration::from_secs(1) {
            last_note = Instant::now();
            eprintln!(
                "bench fanout: {} subscribers joined, {} failed",
                set.connected, set.failed
            );
        }
    }
    set.elapsed = t0.elapsed();
    eprintln!(
        "bench fanout: {} subscribers joined ({} failed) in {:.2}s",
        set.connected,
        set.failed,
        set.elapsed.as_secs_f64()
    );
    if set.connected == 0 {
        bail!(
            "no subscriber could connect; first errors: {:?}",
            set.first_errors
        );
    }
    Ok(set)
}

async fn connect_subscriber(ctx: &Ctx, i: usize) -> Result<(Ws, Welcome)> {
    let target = &ctx.targets[i % ctx.targets.len()];
    let token = ctx.auth.token(i + 1)?;
    let (mut ws, welcome) = connect(
        target,
        &token,
        None,
        subscriber_config(),
        ctx.connect_timeout,
    )
    .await?;
    join(&mut ws, &ctx.room, true, ctx.connect_timeout).await?;
    Ok((ws, welcome))
}

async fn fanout_subscriber(mut ws: Ws, recv: Arc<FanoutRecv>, events: Arc<Events>, clock: Clock) {
    while let Some(frame) = ws.next().await {
        match frame {
            Ok(Message::Text(text)) => {
                let now = clock.now_ns();
                match parse_delivery(&text) {
                    Some(d) => {
                        if let Some(hist) = recv.steps.get(d.step) {
                            hist.record(now.saturating_sub(d.t));
                        }
                    }
                    None => events.other_frame(&text),
                }
            }
            Ok(Message::Close(f)) => {
                events.closed("subscriber", f.as_ref());
                break;
            }
            Ok(_) => {}
            Err(e) => {
                events.conn_error("subscriber", &e);
                break;
            }
        }
    }
    recv.alive.fetch_sub(1, Relaxed);
}

// ---------------------------------------------------------------------------------------------
// Scenario: idle
// ---------------------------------------------------------------------------------------------

async fn run_idle(ctx: &Ctx, a: &IdleArgs) -> Result<Value> {
    ensure!(a.connections > 0, "--connections must be at least 1");
    ensure!(
        a.connections <= 254 * CONNS_PER_SOURCE_ADDR,
        "at most {} connections (source addresses 127.0.0.1-254)",
        254 * CONNS_PER_SOURCE_ADDR
    );
    let hold = a.hold.max(Duration::from_secs(1));
    ensure!(
        hold + Duration::from_secs(2) < ctx.remaining(),
        "--hold {} does not fit in --max-duration",
        humantime::format_duration(hold)
    );
    if let Some(limit) = nofile_soft_limit()
        && (a.connections as u64) + 64 > limit
    {
        ctx.warn(format!(
            "the open-file limit is {limit}, below --connections {} + margin: expect EMFILE; raise it with `ulimit -n`",
            a.connections
        ));
    }

    let rss_before = ctx.meter.server_rss();
    let shared = Arc::new(IdleShared::default());
    let t0 = Instant::now();
    // Leave room for the hold inside --max-duration.
    let connect_deadline = ctx
        .deadline
        .checked_sub(hold + Duration::from_secs(1))
        .unwrap_or(t0);
    let mut conns = JoinSet::new();
    let launched = launch_idle_connections(
        ctx,
        a.connections,
        &shared,
        &mut conns,
        t0,
        connect_deadline,
    )
    .await?;
    let connected = shared.connected.load(Relaxed);
    let connect_s = shared.last_connect_ns.load(Relaxed) as f64 / 1e9;
    eprintln!(
        "bench idle: {connected} connected, {} failed, in {connect_s:.2}s",
        shared.failed.load(Relaxed)
    );

    // Memory is read once the connections have been idle for a second.
    let hold_start = Instant::now();
    let hold_end = (hold_start + hold).min(ctx.deadline);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = ctx.meter.server_rss();
    let cpu_before = ctx.meter.snapshot();
    tokio::time::sleep_until(hold_end.into()).await;
    let cpu = ctx.meter.window(&cpu_before, &ctx.meter.snapshot());
    let alive = shared.alive.load(Relaxed);
    let bench_rss_kib = proc_rss_kib("self").ok();
    conns.abort_all();

    let fatal = lock(&shared.fatal).clone();
    if let Some(f) = &fatal {
        ctx.warn(f.clone());
    }
    let per_server: Vec<Value> = ctx
        .meter
        .pids
        .iter()
        .zip(rss_before.iter().zip(&rss_after))
        .map(|(pid, (b, a))| json!({"pid": pid, "rss_before_kib": b, "rss_after_kib": a}))
        .collect();
    let before_total = sum_opt(&rss_before);
    let after_total = sum_opt(&rss_after);
    let per_conn = match (before_total, after_total) {
        (Some(b), Some(a)) if connected > 0 => {
            Some(round3((a as f64 - b as f64) * 1024.0 / connected as f64))
        }
        _ => None,
    };
    Ok(json!({
        "requested": a.connections,
        "launched": launched,
        "connected": connected,
        "failed": shared.failed.load(Relaxed),
        "connect_s": round3(connect_s),
        "connect_rate_per_sec": (connect_s > 0.0).then(|| round3(connected as f64 / connect_s)),
        "alive_at_end": alive,
        "closed_during_hold": shared.closed.load(Relaxed),
        "rss_before_kib": before_total,
        "rss_after_kib": after_total,
        "rss_per_connection_bytes": per_conn,
        "per_server": per_server,
        "server_cpu_percent_while_idle": cpu.server_cpu_percent(),
        "bench_rss_kib": bench_rss_kib,
        "bench_rss_per_connection_bytes": bench_rss_kib.and_then(|k| per(k as f64 * 1024.0, connected)),
        "bench_cpu_percent_while_idle": cpu.bench_cpu_percent(),
        "fatal": fatal,
        "error_counts": lock(&shared.error_kinds).clone(),
        "first_errors": lock(&shared.first_errors).clone(),
        "events": ctx.events.report(),
    }))
}

#[derive(Default)]
struct IdleShared {
    connected: AtomicU64,
    failed: AtomicU64,
    alive: AtomicU64,
    closed: AtomicU64,
    /// Nanoseconds from the first attempt to the latest successful connection.
    last_connect_ns: AtomicU64,
    /// Set on EMFILE/ENFILE/EADDRNOTAVAIL: no further connection is attempted.
    stop: AtomicBool,
    fatal: Mutex<Option<String>>,
    error_kinds: Mutex<BTreeMap<String, u64>>,
    first_errors: Mutex<Vec<String>>,
}

impl IdleShared {
    fn failure(&self, err: &anyhow::Error) {
        self.failed.fetch_add(1, Relaxed);
        let code = os_error_code(err);
        let kind = match code {
            Some(EMFILE) => "EMFILE".to_string(),
            Some(ENFILE) => "ENFILE".to_string(),
            Some(EADDRNOTAVAIL) => "EADDRNOTAVAIL".to_string(),
            Some(EADDRINUSE) => "EADDRINUSE".to_string(),
            Some(ECONNREFUSED) => "ECONNREFUSED".to_string(),
            Some(c) => format!("os error {c}"),
            None if format!("{err:#}").contains("timed out") => "timeout".to_string(),
            None => "other".to_string(),
        };
        *lock(&self.error_kinds).entry(kind).or_default() += 1;
        {
            let mut first = lock(&self.first_errors);
            if first.len() < 5 {
                first.push(format!("{err:#}"));
            }
        }
        let fatal = match code {
            Some(EMFILE | ENFILE) => {
                Some(fd_exhaustion_message(self.connected.load(Relaxed) as usize))
            }
            Some(EADDRNOTAVAIL | EADDRINUSE) => Some(format!(
                "local ports exhausted after {} connections ({err:#})",
                self.connected.load(Relaxed)
            )),
            _ => None,
        };
        if let Some(msg) = fatal
            && !self.stop.swap(true, Relaxed)
        {
            eprintln!("bench idle: {msg}; no further connections are attempted");
            *lock(&self.fatal) = Some(msg);
        }
    }
}

/// Starts one task per connection; a semaphore permit is held while connecting, which bounds
/// both the connects in flight and the tasks waiting to start. Returns how many were launched.
async fn launch_idle_connections(
    ctx: &Ctx,
    n: usize,
    shared: &Arc<IdleShared>,
    conns: &mut JoinSet<()>,
    t0: Instant,
    connect_deadline: Instant,
) -> Result<usize> {
    let sem = Arc::new(Semaphore::new(ctx.concurrency));
    let mut launched = 0;
    let mut last_note = Instant::now();
    for i in 0..n {
        if shared.stop.load(Relaxed) {
            break;
        }
        let acquired =
            tokio::time::timeout_at(connect_deadline.into(), sem.clone().acquire_owned()).await;
        let Ok(Ok(permit)) = acquired else {
            ctx.warn(format!(
                "connect phase cut short by --max-duration after {launched} attempts"
            ));
            break;
        };
        if shared.stop.load(Relaxed) {
            break;
        }
        let target = ctx.targets[i % ctx.targets.len()].clone();
        let source = source_addr(i, &target);
        let token = ctx.auth.token(i)?;
        conns.spawn(idle_connection(
            IdleConn {
                target,
                token,
                source,
                timeout: ctx.connect_timeout,
                t0,
            },
            shared.clone(),
            ctx.events.clone(),
            permit,
        ));
        launched += 1;
        if last_note.elapsed() >= Duration::from_secs(1) {
            last_note = Instant::now();
            eprintln!(
                "bench idle: {} connected, {} failed",
                shared.connected.load(Relaxed),
                shared.failed.load(Relaxed)
            );
        }
    }
    // Wait for the connects still in flight (each is bounded by --connect-timeout).
    let all = u32::try_from(ctx.concurrency).unwrap_or(u32::MAX);
    let grace = ctx.connect_timeout + Duration::from_secs(1);
    if tokio::time::timeout(grace, sem.acquire_many(all))
        .await
        .is_err()
    {
        ctx.warn("some connects were still pending after --connect-timeout");
    }
    Ok(launched)
}

struct IdleConn {
    target: Target,
    token: String,
    source: Option<IpAddr>,
    timeout: Duration,
    t0: Instant,
}

/// Connects, then keeps reading (tungstenite answers pings while reading) until the run ends.
async fn idle_connection(
    c: IdleConn,
    shared: Arc<IdleShared>,
    events: Arc<Events>,
    permit: OwnedSemaphorePermit,
) {
    let result = connect(&c.target, &c.token, c.source, idle_config(), c.timeout).await;
    let mut ws = match result {
        Ok((ws, _)) => ws,
        // The permit is released after counting, so the launcher's final tally is complete.
        Err(e) => return shared.failure(&e),
    };
    shared.connected.fetch_add(1, Relaxed);
    shared.alive.fetch_add(1, Relaxed);
    let took = u64::try_from(c.t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
    shared.last_connect_ns.fetch_max(took, Relaxed);
    drop(permit);
    while let Some(frame) = ws.next().await {
        match frame {
            Ok(Message::Close(f)) => {
                events.closed("idle", f.as_ref());
                break;
            }
            Ok(_) => {}
            Err(e) => {
                events.conn_error("idle", &e);
                break;
            }
        }
    }
    shared.alive.fetch_sub(1, Relaxed);
    shared.closed.fetch_add(1, Relaxed);
}

/// Source address for connection `i`: 127.0.0.1, .2, ... every 20000 connections, so a single
/// address never runs out of ephemeral ports; only for a loopback IPv4 target.
fn source_addr(i: usize, target: &Target) -> Option<IpAddr> {
    match target.addr.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => {
            let n = 1 + i / CONNS_PER_SOURCE_ADDR;
            u8::try_from(n)
                .ok()
                .map(|n| IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)))
        }
        _ => None,
    }
}

fn fd_exhaustion_message(connected: usize) -> String {
    let limit = nofile_soft_limit().map_or("unknown".to_string(), |l| l.to_string());
    format!(
        "EMFILE/ENFILE (too many open files) after {connected} connections: the open-file \
         limit is {limit}; raise it with `ulimit -n 1048576` (the server needs it too)"
    )
}

fn is_fd_exhaustion(err: &anyhow::Error) -> bool {
    matches!(os_error_code(err), Some(EMFILE | ENFILE))
}

/// The OS error code anywhere in the error chain, also inside a tungstenite I/O error.
fn os_error_code(err: &anyhow::Error) -> Option<i32> {
    err.chain().find_map(|cause| {
        if let Some(e) = cause.downcast_ref::<io::Error>() {
            return e.raw_os_error();
        }
        match cause.downcast_ref::<tungstenite::Error>() {
            Some(tungstenite::Error::Io(e)) => e.raw_os_error(),
            _ => None,
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Connections and the wire
// ---------------------------------------------------------------------------------------------

/// A gateway WebSocket URL, resolved once.
#[derive(Clone, Debug)]
struct Target {
    url: String,
    addr: SocketAddr,
}

impl Target {
    async fn resolve(url: &str) -> Result<Self> {
        let rest = match url.strip_prefix("ws://") {
            Some(rest) => rest,
            None if url.starts_with("wss://") => {
                bail!("{url}: wss:// is not supported (the bench client has no TLS); use ws://")
            }
            None => bail!("{url}: expected a ws:// URL"),
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let (host, port) = split_host_port(authority)
            .with_context(|| format!("{url}: cannot read host and port"))?;
        let addr = tokio::net::lookup_host((host, port))
            .await
            .with_context(|| format!("{url}: resolving {host}"))?
            .next()
            .with_context(|| format!("{url}: {host} has no address"))?;
        Ok(Self {
            url: url.to_string(),
            addr,
        })
    }

    /// The URL with `token=<JWT>` added to its query.
    fn request_url(&self, token: &str) -> String {
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{sep}token={}", self.url, percent_encode(token))
    }
}

fn split_host_port(authority: &str) -> Option<(&str, u16)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after.strip_prefix(':') {
            Some(p) => (host, p.parse().ok()?),
            None if after.is_empty() => (host, 80),
            None => return None,
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok()?),
            None => (authority, 80),
        }
    };
    (!host.is_empty()).then_some((host, port))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

enum Auth {
    Token(String),
    Secret(jsonwebtoken::EncodingKey),
}

#[derive(Serialize)]
struct Claims {
    sub: String,
    exp: u64,
}

impl Auth {
    /// The token for connection `n` (`sub = "bench-<n>"` when minted).
    fn token(&self, n: usize) -> Result<String> {
        match self {
            Auth::Token(t) => Ok(t.clone()),
            Auth::Secret(key) => {
                let claims = Claims {
                    sub: format!("bench-{n}"),
                    exp: unix_now().as_secs() + 3600,
                };
                jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, key)
                    .context("signing a JWT")
            }
        }
    }
}

/// WebSocket settings. tungstenite zero-fills its whole read buffer before every read, so a
/// big buffer costs CPU per message; frames here are small (larger ones still work: the
/// buffer grows for them).
fn stream_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(1 << 20))
}

/// Fanout subscribers: many sockets, small frames.
fn subscriber_config() -> WebSocketConfig {
    stream_config().read_buffer_size(4 * 1024)
}

/// Idle connections: the read buffer is allocated eagerly (default 128 KiB), keep it small.
fn idle_config() -> WebSocketConfig {
    stream_config().read_buffer_size(2 * 1024)
}

/// Opens a WebSocket to `target` (from `source` when given) and reads the welcome frame, all
/// within `timeout`.
async fn connect(
    target: &Target,
    token: &str,
    source: Option<IpAddr>,
    config: WebSocketConfig,
    timeout: Duration,
) -> Result<(Ws, Welcome)> {
    let attempt = async {
        let socket = if target.addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .context("creating a socket")?;
        if let Some(ip) = source {
            socket
                .bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("binding source address {ip}"))?;
        }
        let stream = socket
            .connect(target.addr)
            .await
            .with_context(|| format!("TCP connect to {}", target.addr))?;
        stream.set_nodelay(true).context("setting TCP_NODELAY")?;
        let (mut ws, _response) = tokio_tungstenite::client_async_with_config(
            target.request_url(token),
            stream,
            Some(config),
        )
        .await
        .context("WebSocket handshake")?;
        let welcome = read_welcome(&mut ws).await?;
        Ok((ws, welcome))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(anyhow!(
            "timed out after {}",
            humantime::format_duration(timeout)
        )),
    }
    .with_context(|| format!("connecting to {}", target.url))
}

/// The parts of a control frame (welcome, ack, error) the tool looks at.
#[derive(Deserialize)]
struct Control {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, rename = "ref")]
    reference: Option<Value>,
    #[serde(default)]
    data: Option<Value>,
}

impl Control {
    fn reference(&self) -> Option<String> {
        match &self.reference {
            Some(Value::String(s)) => Some(s.clone()),
            Some(v @ Value::Number(_)) => Some(v.to_string()),
            _ => None,
        }
    }

    fn data_str(&self, key: &str) -> Option<&str> {
        self.data.as_ref()?.get(key)?.as_str()
    }

    fn error_code(&self) -> String {
        self.data_str("code").unwrap_or("unknown").to_string()
    }
}

struct Welcome {
    instance_id: Option<String>,
}

impl Welcome {
    fn instance(&self) -> String {
        self.instance_id
            .clone()
            .unwrap_or_else(|| "unknown".to_string())
    }
}

async fn read_welcome(ws: &mut Ws) -> Result<Welcome> {
    loop {
        let frame = ws
            .next()
            .await
            .context("connection closed before the welcome frame")?
            .context("reading the welcome frame")?;
        match frame {
            Message::Text(text) => {
                let c: Control = serde_json::from_str(&text)
                    .with_context(|| format!("first frame is not an envelope: {}", clip(&text)))?;
                ensure!(
                    c.kind == "welcome",
                    "expected a welcome frame, got: {}",
                    clip(&text)
                );
                return Ok(Welcome {
                    instance_id: c.data_str("instance_id").map(str::to_string),
                });
            }
            Message::Close(f) => bail!(
                "server closed the connection before the welcome ({}); check --secret / --token",
                describe_close(f.as_ref())
            ),
            _ => {}
        }
    }
}

/// Joins `room` and waits for the ack; an `error` reply is a failure.
async fn join(ws: &mut Ws, room: &str, receive_own: bool, timeout: Duration) -> Result<()> {
    let frame = json!({"type": "join", "room": room, "self": receive_own, "ref": "j1"});
    ws.send(Message::text(frame.to_string()))
        .await
        .context("sending join")?;
    let wait = async {
        loop {
            let frame = ws
                .next()
                .await
                .context("connection closed before the join reply")?
                .context("reading the join reply")?;
            match frame {
                Message::Text(text) => {
                    let Ok(c) = serde_json::from_str::<Control>(&text) else {
                        continue;
                    };
                    if c.reference().as_deref() != Some("j1") {
                        continue;
                    }
                    match c.kind.as_str() {
                        "ack" => return Ok(()),
                        "error" => bail!(
                            "join {room} refused: {} ({})",
                            c.error_code(),
                            c.data_str("message").unwrap_or("")
                        ),
                        _ => bail!("unexpected reply to join: {}", clip(&text)),
                    }
                }
                Message::Close(f) => bail!(
                    "server closed the connection during join ({})",
                    describe_close(f.as_ref())
                ),
                _ => {}
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| anyhow!("no reply to join {room} within {timeout:?}"))?
}

/// What a subscriber needs from a delivery. Our publishes carry
/// `data: {"seq", "k" (step), "t" (scheduled ns), "st" (sent ns), "pad"}`.
struct Delivery {
    seq: u64,
    step: usize,
    t: u64,
    st: u64,
}

/// Reads a delivery by scanning the frame instead of parsing all of it: checks that `type` is
/// `message`, then reads our numeric keys inside `data`. Key matches require the surrounding
/// quotes and a following colon, so string values (room, id, ts, sender_id) cannot match.
fn parse_delivery(text: &str) -> Option<Delivery> {
    if !value_after_key(text, "type")?.starts_with("\"message\"") {
        return None;
    }
    let data = value_after_key(text, "data")?;
    if !data.starts_with('{') {
        return None;
    }
    Some(Delivery {
        seq: u64_after_key(data, "seq")?,
        step: usize::try_from(u64_after_key(data, "k")?).ok()?,
        t: u64_after_key(data, "t")?,
        st: u64_after_key(data, "st")?,
    })
}

/// The text right after `"key"` and its colon (whitespace skipped). Walks the quotes of
/// the frame: cheaper than a substring search for one-letter keys.
fn value_after_key<'a>(s: &'a str, key: &str) -> Option<&'a str> {
    let (bytes, key) = (s.as_bytes(), key.as_bytes());
    let mut from = 0;
    while let Some(offset) = bytes[from..].iter().position(|&b| b == b'"') {
        let start = from + offset + 1;
        let end = start + key.len();
        if bytes.get(start..end) == Some(key) && bytes.get(end) == Some(&b'"') {
            // `end + 1` follows an ASCII quote, so it is a char boundary.
            if let Some(value) = s[end + 1..].trim_start().strip_prefix(':') {
                return Some(value.trim_start());
            }
        }
        from = start;
    }
    None
}

fn u64_after_key(s: &str, key: &str) -> Option<u64> {
    let value = value_after_key(s, key)?;
    let end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    value[..end].parse().ok()
}

fn describe_close(frame: Option<&CloseFrame>) -> String {
    match frame {
        Some(f) => format!("close code {} {}", u16::from(f.code), f.reason.as_str()),
        None => "close without code".to_string(),
    }
}

fn clip(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

// ---------------------------------------------------------------------------------------------
// Publishing
// ---------------------------------------------------------------------------------------------

/// Publish-side bookkeeping shared with the ack reader: send time per seq, counters per step.
struct PubLog {
    send_ns: Vec<AtomicU64>,
    steps: Vec<PubStep>,
}

#[derive(Default)]
struct PubStep {
    sent: AtomicU64,
    acked: AtomicU64,
    /// Acks plus errors: every publish gets exactly one reply.
    replied: AtomicU64,
    rate_limited: AtomicU64,
    ack_latency: Histogram,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl PubLog {
    fn new(capacity: u64, steps: usize) -> Self {
        Self {
            send_ns: (0..capacity).map(|_| AtomicU64::new(0)).collect(),
            steps: (0..steps).map(|_| PubStep::default()).collect(),
        }
    }

    fn replied_total(&self) -> u64 {
        self.steps.iter().map(|s| s.replied.load(Relaxed)).sum()
    }

    fn rate_limited_total(&self) -> u64 {
        self.steps
            .iter()
            .map(|s| s.rate_limited.load(Relaxed))
            .sum()
    }

    fn error_counts(&self) -> BTreeMap<String, u64> {
        let mut all = BTreeMap::new();
        for step in &self.steps {
            for (code, n) in lock(&step.errors).iter() {
                *all.entry(code.clone()).or_default() += n;
            }
        }
        all
    }

    /// Handles the reply to publish `ref = "<step>.<seq>"`.
    fn reply(&self, c: &Control, now_ns: u64) -> bool {
        let Some((step, seq)) = c.reference().as_deref().and_then(parse_pub_ref) else {
            return false;
        };
        let Some(s) = self.steps.get(step) else {
            return false;
        };
        match c.kind.as_str() {
            "ack" => {
                s.acked.fetch_add(1, Relaxed);
                let sent = usize::try_from(seq)
                    .ok()
                    .and_then(|i| self.send_ns.get(i))
                    .map_or(0, |a| a.load(Relaxed));
                if sent > 0 {
                    s.ack_latency.record(now_ns.saturating_sub(sent));
                }
            }
            "error" => {
                let code = c.error_code();
                if code == "rate_limited" {
                    s.rate_limited.fetch_add(1, Relaxed);
                }
                *lock(&s.errors).entry(code).or_default() += 1;
            }
            _ => return false,
        }
        s.replied.fetch_add(1, Relaxed);
        true
    }
}

fn parse_pub_ref(r: &str) -> Option<(usize, u64)> {
    let (step, seq) = r.split_once('.')?;
    Some((step.parse().ok()?, seq.parse().ok()?))
}

/// Reads the publisher's socket: acks and errors for its publishes.
async fn read_acks(
    mut stream: SplitStream<Ws>,
    log: Arc<PubLog>,
    events: Arc<Events>,
    clock: Clock,
) {
    while let Some(frame) = stream.next().await {
        match frame {
            Ok(Message::Text(text)) => {
                let now = clock.now_ns();
                match serde_json::from_str::<Control>(&text) {
                    Ok(c) if log.reply(&c, now) => {}
                    _ => events.other_frame(&text),
                }
            }
            Ok(Message::Close(f)) => {
                events.closed("publisher", f.as_ref());
                break;
            }
            Ok(_) => {}
            Err(e) => {
                events.conn_error("publisher", &e);
                break;
            }
        }
    }
}

/// A fixed-rate schedule: message `i` is due at `start + i / rate` and gets seq `first_seq + i`.
struct PacePlan {
    start: Instant,
    rate: f64,
    first_seq: u64,
    count: u64,
}

struct PaceOutcome {
    sent: u64,
    /// When the last frame was written.
    last_send: Option<Instant>,
    error: Option<String>,
}

struct Publisher {
    sink: SplitSink<Ws, Message>,
    /// The rooms, JSON-encoded; message `seq` goes to `rooms[seq % len]`.
    room_json: Vec<String>,
    pad: String,
    log: Arc<PubLog>,
    clock: Clock,
    /// Each frame carries `idempotency_key` `b<seq>`.
    keyed: bool,
}

impl Publisher {
    fn new(
        sink: SplitSink<Ws, Message>,
        rooms: &[String],
        size: usize,
        log: Arc<PubLog>,
        clock: Clock,
    ) -> Result<Self> {
        ensure!(!rooms.is_empty(), "no room to publish to");
        Ok(Self {
            sink,
            room_json: rooms
                .iter()
                .map(|r| serde_json::to_string(r).context("encoding the room name"))
                .collect::<Result<_>>()?,
            pad: "x".repeat(size),
            log,
            clock,
            keyed: false,
        })
    }

    /// Publishes on the plan's absolute schedule and gives the publisher back. `data.t` is the
    /// scheduled time, so a publisher held up by a slow server shows up in the latency instead
    /// of hiding it (coordinated omission); `data.st` is the actual send time. Stops at
    /// `deadline` or on a send error.
    ///
    /// Pacing runs on a blocking thread that also writes the frames (through `Handle::block_on`):
    /// tokio timers have 1 ms granularity and a hand-off to a worker adds a wake-up, either of
    /// which would inflate latencies measured from the scheduled time; `std::thread::sleep` is
    /// precise to tens of microseconds.
    async fn publish_paced(
        mut self,
        plan: PacePlan,
        step_of: impl Fn(u64) -> usize + Send + 'static,
        deadline: Instant,
    ) -> Result<(Self, PaceOutcome)> {
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let outcome = self.pace_blocking(&handle, &plan, &step_of, deadline);
            (self, outcome)
        })
        .await
        .context("the publishing thread failed")
    }

    fn pace_blocking(
        &mut self,
        handle: &tokio::runtime::Handle,
        plan: &PacePlan,
        step_of: &dyn Fn(u64) -> usize,
        deadline: Instant,
    ) -> PaceOutcome {
        let mut sent = 0;
        let mut last_send = None;
        for i in 0..plan.count {
            let due = plan.start + Duration::from_secs_f64(i as f64 / plan.rate);
            let now = Instant::now();
            if now >= deadline {
                return PaceOutcome {
                    sent,
                    last_send,
                    error: Some("reached --max-duration".into()),
                };
            }
            if due > now {
                std::thread::sleep(due - now);
            }
            let seq = plan.first_seq + i;
            let step = step_of(i);
            let t = self.clock.ns(due);
            let st = self.clock.now_ns();
            if let Some(slot) = usize::try_from(seq)
                .ok()
                .and_then(|s| self.log.send_ns.get(s))
            {
                slot.store(st, Relaxed);
            }
            let key = if self.keyed {
                format!(r#","idempotency_key":"b{seq}""#)
            } else {
                String::new()
            };
            let frame = format!(
                r#"{{"type":"message","room":{room},"ref":"{step}.{seq}"{key},"data":{{"seq":{seq},"k":{step},"t":{t},"st":{st},"pad":"{pad}"}}}}"#,
                room = self.room_json[(seq % self.room_json.len() as u64) as usize],
                pad = self.pad,
            );
            if let Err(e) = handle.block_on(self.sink.send(Message::text(frame))) {
                return PaceOutcome {
                    sent,
                    last_send,
                    error: Some(format!("send failed: {e}")),
                };
            }
            if let Some(s) = self.log.steps.get(step) {
                s.sent.fetch_add(1, Relaxed);
            }
            sent += 1;
            last_send = Some(Instant::now());
        }
        PaceOutcome {
            sent,
            last_send,
            error: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connection events (errors, closes, unexpected frames) for the report
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Events {
    /// `error` frames not tied to a publish, by code.
    error_codes: Mutex<BTreeMap<String, u64>>,
    /// Connections that ended, by role and reason.
    closes: Mutex<BTreeMap<String, u64>>,
    other_frames: AtomicU64,
}

impl Events {
    /// A frame that is not a delivery or a publish reply: count `error`s by code.
    fn other_frame(&self, text: &str) {
        match serde_json::from_str::<Control>(text) {
            Ok(c) if c.kind == "error" => {
                *lock(&self.error_codes).entry(c.error_code()).or_default() += 1;
            }
            _ => {
                self.other_frames.fetch_add(1, Relaxed);
            }
        }
    }

    fn closed(&self, role: &str, frame: Option<&CloseFrame>) {
        let key = format!("{role}: {}", describe_close(frame));
        *lock(&self.closes).entry(key).or_default() += 1;
    }

    fn conn_error(&self, role: &str, err: &tungstenite::Error) {
        let key = format!("{role}: {err}");
        *lock(&self.closes).entry(key).or_default() += 1;
    }

    fn report(&self) -> Value {
        json!({
            "error_codes": lock(&self.error_codes).clone(),
            "connections_ended": lock(&self.closes).clone(),
            "other_frames": self.other_frames.load(Relaxed),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Time and latency histograms
// ---------------------------------------------------------------------------------------------

/// Unix-epoch nanoseconds derived from one monotonic base, so that times taken by different
/// tasks of this process are comparable and never go backwards.
#[derive(Clone, Copy)]
struct Clock {
    base: Instant,
    base_unix_ns: u64,
}

impl Clock {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            base_unix_ns: u64::try_from(unix_now().as_nanos()).unwrap_or(0),
        }
    }

    fn ns(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.base).as_nanos();
        self.base_unix_ns + u64::try_from(since).unwrap_or(u64::MAX / 2)
    }

    fn now_ns(&self) -> u64 {
        self.ns(Instant::now())
    }
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Sub-buckets per power of two are 2^(SUB_BITS-1): relative error below 0.8 %.
const SUB_BITS: u32 = 8;
const HALF: u64 = 1 << (SUB_BITS - 1);
const BUCKETS: usize = ((64 - SUB_BITS + 2) as usize) * HALF as usize;

/// A lock-free log-linear histogram of nanosecond values (HdrHistogram-like), so that many
/// subscriber tasks can record into one without keeping every sample.
struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum: AtomicU64,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Serialize, Clone, Copy, Default)]
struct LatencyUs {
    count: u64,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
    mean: f64,
}

impl Histogram {
    fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }

    fn index(v: u64) -> usize {
        if v < 2 * HALF {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros();
        let shift = msb - (SUB_BITS - 1);
        ((u64::from(shift) + 1) * HALF + ((v >> shift) - HALF)) as usize
    }

    /// The middle of bucket `i`'s value range.
    fn value_of(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * HALF {
            return i;
        }
        let shift = i / HALF - 1;
        let low = (i % HALF + HALF) << shift;
        low + (1 << shift) / 2
    }

    fn record(&self, ns: u64) {
        self.buckets[Self::index(ns)].fetch_add(1, Relaxed);
        self.sum.fetch_add(ns, Relaxed);
        if ns > self.max.load(Relaxed) {
            self.max.fetch_max(ns, Relaxed);
        }
        // Counted last: a reader that sees the count also sees the sample.
        self.count.fetch_add(1, Relaxed);
    }

    fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Percentiles in microseconds (bucket middles, capped at the exact maximum).
    fn summary(&self) -> LatencyUs {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return LatencyUs::default();
        }
        let max = self.max.load(Relaxed);
        let quantile = |q: f64| {
            let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return us(Self::value_of(i).min(max));
                }
            }
            us(max)
        };
        LatencyUs {
            count: total,
            p50: quantile(0.50),
            p90: quantile(0.90),
            p99: quantile(0.99),
            p999: quantile(0.999),
            max: us(max),
            mean: round1(self.sum.load(Relaxed) as f64 / total as f64 / 1e3),
        }
    }
}

fn us(ns: u64) -> f64 {
    round1(ns as f64 / 1e3)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn per(total: f64, n: u64) -> Option<f64> {
    (n > 0).then(|| round3(total / n as f64))
}

/// Polls `done` every 5 ms until it holds or `until` passes.
async fn wait_until(until: Instant, done: impl Fn() -> bool) {
    while !done() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// /proc metering
// ---------------------------------------------------------------------------------------------

/// Reads CPU time and RSS of the server processes and of this process.
#[derive(Clone)]
struct Meter {
    pids: Vec<u32>,
    clk_tck: u64,
    clk_tck_source: &'static str,
}

#[derive(Clone)]
struct CpuSnapshot {
    at: Instant,
    bench_ticks: Option<u64>,
    server_ticks: Option<u64>,
}

struct CpuWindow {
    wall_s: f64,
    bench_cpu_us: Option<f64>,
    server_cpu_us: Option<f64>,
}

impl CpuWindow {
    fn server_cpu_percent(&self) -> Option<f64> {
        self.server_cpu_us
            .map(|us| round3(us / (self.wall_s * 1e4)))
    }

    fn bench_cpu_percent(&self) -> Option<f64> {
        self.bench_cpu_us.map(|us| round3(us / (self.wall_s * 1e4)))
    }
}

impl Meter {
    fn new(pids: Vec<u32>) -> Self {
        let (clk_tck, clk_tck_source) = match clk_tck_from_getconf() {
            Some(hz) => (hz, "getconf CLK_TCK"),
            None => (100, "assumed (getconf CLK_TCK failed)"),
        };
        Self {
            pids,
            clk_tck,
            clk_tck_source,
        }
    }

    fn snapshot(&self) -> CpuSnapshot {
        let server_ticks = if self.pids.is_empty() {
            None
        } else {
            self.pids
                .iter()
                .map(|pid| proc_cpu_ticks(&pid.to_string()))
                .sum::<Result<u64>>()
                .ok()
        };
        CpuSnapshot {
            at: Instant::now(),
            bench_ticks: proc_cpu_ticks("self").ok(),
            server_ticks,
        }
    }

    fn window(&self, a: &CpuSnapshot, b: &CpuSnapshot) -> CpuWindow {
        let to_us = |x: Option<u64>, y: Option<u64>| {
            Some(y?.saturating_sub(x?) as f64 * 1e6 / self.clk_tck as f64)
        };
        CpuWindow {
            wall_s: b.at.saturating_duration_since(a.at).as_secs_f64().max(1e-9),
            bench_cpu_us: to_us(a.bench_ticks, b.bench_ticks),
            server_cpu_us: to_us(a.server_ticks, b.server_ticks),
        }
    }

    /// VmRSS of each server process, in KiB (None where unreadable).
    fn server_rss(&self) -> Vec<Option<u64>> {
        self.pids
            .iter()
            .map(|pid| proc_rss_kib(&pid.to_string()).ok())
            .collect()
    }
}

fn clk_tck_from_getconf() -> Option<u64> {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()?;
    let hz: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    (out.status.success() && hz > 0).then_some(hz)
}

/// utime + stime of a process, in clock ticks (all threads).
fn proc_cpu_ticks(pid: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may contain spaces: fields are counted after its ')'.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .with_context(|| format!("{path}: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime is field 14 and stime field 15.
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: cannot read field {}", i + 3))
    };
    Ok(field(11)? + field(12)?)
}

fn proc_rss_kib(pid: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{path}: no VmRSS"))
}

/// The soft RLIMIT_NOFILE of this process (None when unlimited or unreadable). Read once and
/// cached: once the limit is hit, /proc/self/limits can no longer be opened.
fn nofile_soft_limit() -> Option<u64> {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        line.split_whitespace().nth(3)?.parse().ok()
    })
}

fn sum_opt(values: &[Option<u64>]) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    values.iter().copied().sum()
}

/// Locks a mutex, ignoring poisoning (the data are plain counters).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_continuous_and_accurate() {
        for v in [
            0u64,
            1,
            255,
            256,
            257,
            511,
            512,
            1000,
            123_456,
            9_876_543_210,
        ] {
            let i = Histogram::index(v);
            let mid = Histogram::value_of(i) as f64;
            assert!(
                (mid - v as f64).abs() <= v as f64 * 0.008 + 1.0,
                "{v} -> {mid}"
            );
        }
        let h = Histogram::new();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert!((s.p50 - 500.0).abs() < 5.0, "{}", s.p50);
        assert!((s.p99 - 990.0).abs() < 8.0, "{}", s.p99);
        assert_eq!(s.max, 1000.0);
    }

    #[test]
    fn order_is_checked_per_room() {
        let d = |seq| Delivery {
            seq,
            step: STEP_WARMUP,
            t: 0,
            st: 0,
        };
        // Two rooms: seq 0, 2, 4 in one, 1, 3, 5 in the other.
        let recv = LatencyRecv::new(6, 2);
        for seq in [1, 3, 0, 2, 5, 4] {
            recv.record(&d(seq), 0);
        }
        assert_eq!(
            recv.out_of_order.load(Relaxed),
            0,
            "each room stayed in order"
        );
        let one = LatencyRecv::new(6, 1);
        for seq in [1, 3, 0, 2] {
            one.record(&d(seq), 0);
        }
        assert_eq!(
            one.out_of_order.load(Relaxed),
            2,
            "0 and 2 came after 3 in one room"
        );
        recv.record(&d(4), 0);
        assert_eq!(recv.duplicates.load(Relaxed), 1);
    }

    #[test]
    fn scans_deliveries() {
        let frame = r#"{"type":"message","room":"bench:t","data":{"seq":7,"k":1,"t":100,"st":120,"pad":"xx"},"id":"1-0","ts":"2026-11-21T10:10:10.123Z","sender_id":"bench-0"}"#;
        let d = parse_delivery(frame).expect("delivery");
        assert_eq!((d.seq, d.step, d.t, d.st), (7, 1, 100, 120));
        let spaced = r#"{ "ts" : "x", "type" : "message", "data" : { "pad": "t", "st": 5, "t": 4, "k": 0, "seq": 3 } }"#;
        let d = parse_delivery(spaced).expect("delivery");
        assert_eq!((d.seq, d.step, d.t, d.st), (3, 0, 4, 5));
        let escaped = r#"{"type":"message","data":{"pad":"\"t\":9","seq":1,"k":0,"t":5,"st":6}}"#;
        let d = parse_delivery(escaped).expect("delivery");
        assert_eq!((d.seq, d.step, d.t, d.st), (1, 0, 5, 6));
        assert!(parse_delivery(r#"{"type":"ack","ref":"1.2","data":{"id":"1"}}"#).is_none());
    }

    #[test]
    fn parses_urls() {
        assert_eq!(split_host_port("127.0.0.1:8080"), Some(("127.0.0.1", 8080)));
        assert_eq!(split_host_port("[::1]:9"), Some(("::1", 9)));
        assert_eq!(split_host_port("example.com"), Some(("example.com", 80)));
        assert_eq!(split_host_port(":80"), None);
        assert_eq!(ramp(100.0, 1.5, 300.0), vec![100.0, 150.0, 225.0, 300.0]);
    }
}

/// `rtgate-bench <scenario> [options]`.
#[derive(clap::Parser, Debug)]
#[command(
    name = "rtgate-bench",
    version,
    about = "Load tool for rtgate: drives gateways over the v1 protocol"
)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn main() -> std::process::ExitCode {
    use clap::Parser;
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rtgate-bench: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rtgate-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
