//! Logging, Prometheus metrics and OpenTelemetry traces.

use std::sync::OnceLock;
use std::sync::atomic::Ordering;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, TelemetryConfig};

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Flushes pending spans when the process ends.
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("rtgate: span export shutdown: {e}");
        }
    }
}

/// Installs the log subscriber (stderr), the metrics recorder and, when an OTLP endpoint is
/// configured, the trace exporter. Call inside the tokio runtime.
pub fn init(config: &TelemetryConfig, instance_id: &str) -> anyhow::Result<TelemetryGuard> {
    // rust-rdkafka warns on every failed poll while Kafka is away; the broker logs the outage once.
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("rdkafka=error,{}", config.log_level)))
        .map_err(|e| anyhow::anyhow!("telemetry.log_level: {e}"))?;
    let provider = trace::provider(config, instance_id)?;
    let otel = provider.as_ref().map(|p| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer().with_tracer(p.tracer("rtgate"))
    });
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    match config.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(json_log::JsonWithTraceIds)
                    .with_writer(std::io::stderr),
            )
            .try_init()?,
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init()?,
    }
    install_metrics();
    trace::ENABLED.store(provider.is_some(), Ordering::Relaxed);
    Ok(TelemetryGuard { provider })
}

/// Installs the Prometheus recorder once per process.
pub fn install_metrics() {
    PROMETHEUS.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                &[
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5,
                ],
            )
            .expect("bucket list is not empty")
            .install_recorder()
            .expect("no other metrics recorder is installed");
        metric::describe();
        handle
    });
}

/// The Prometheus text exposition of every metric.
pub fn render_metrics() -> String {
    PROMETHEUS.get().map(|h| h.render()).unwrap_or_default()
}

/// Metric names and the updates the rest of the code makes. Hot paths update once per
/// message (with a count), never once per recipient.
pub mod metric {
    use std::time::Duration;

    use metrics::{
        counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
    };

    use crate::config::OverflowPolicy;

    pub fn describe() {
        describe_gauge!("rtgate_connections", "Open WebSocket connections");
        describe_gauge!("rtgate_rooms", "Rooms with local members");
        describe_counter!("rtgate_joins_total", "Room joins");
        describe_counter!(
            "rtgate_messages_in_total",
            "Client requests received, by type"
        );
        describe_counter!(
            "rtgate_messages_out_total",
            "Frames queued to local clients for broker deliveries, by type"
        );
        describe_counter!(
            "rtgate_dropped_frames_total",
            "Frames dropped for slow consumers, by overflow policy"
        );
        describe_counter!(
            "rtgate_rate_limited_total",
            "Requests refused by the per-connection rate limit"
        );
        describe_counter!(
            "rtgate_connections_refused_total",
            "WebSocket clients refused, by reason (connect_rate, origin, auth, max_connections, max_connections_per_user)"
        );
        describe_counter!(
            "rtgate_broker_bad_payloads_total",
            "Broker payloads skipped because they failed validation, by broker"
        );
        describe_counter!(
            "rtgate_limit_exceeded_total",
            "Requests refused by a configured limit, by limit"
        );
        describe_counter!(
            "rtgate_bad_frames_total",
            "Malformed, binary or oversized client frames"
        );
        describe_counter!(
            "rtgate_broker_reconnects_total",
            "Times the broker connection was lost and rebuilt (failovers included)"
        );
        describe_counter!(
            "rtgate_bytes_in_total",
            "Bytes of client text frames received"
        );
        describe_counter!(
            "rtgate_bytes_out_total",
            "Bytes of delivery frames queued to local clients"
        );
        describe_histogram!(
            "rtgate_delivery_latency_seconds",
            "From the publish timestamp in the message to the local fan-out, on every delivering instance"
        );
        describe_gauge!("rtgate_broker_ready", "1 while the broker takes writes");
        describe_gauge!(
            "rtgate_heartbeat_age_seconds",
            "Seconds since this instance's last successful heartbeat"
        );
        describe_gauge!("rtgate_draining", "1 while the instance shuts down");
        describe_counter!(
            "rtgate_span_export_dropped_total",
            "Trace spans dropped because the export queue was full"
        );
        describe_histogram!(
            "rtgate_broker_publish_seconds",
            "Time for the broker to store and fan out a publish"
        );
        describe_counter!(
            "rtgate_webhook_events_sent_total",
            "Webhook events the receiver accepted (2xx)"
        );
        describe_counter!(
            "rtgate_webhook_events_dropped_total",
            "Webhook events dropped: the queue was full (webhooks.queue_max), or unsent at shutdown"
        );
        describe_counter!(
            "rtgate_webhook_failures_total",
            "Webhook POSTs that failed (error, timeout or non-2xx); the batch is retried"
        );
        describe_counter!(
            "rtgate_authorize_requests_total",
            "Join authorization requests to the app's backend, by outcome (allow, deny, error)"
        );
        describe_histogram!(
            "rtgate_authorize_seconds",
            "Time the app's backend took to answer a join authorization"
        );
        describe_counter!(
            "rtgate_api_requests_total",
            "Server API calls, by call and HTTP status"
        );
        describe_histogram!(
            "rtgate_broker_shard_publish_seconds",
            "Redis Cluster: time to store and fan out a publish, by the master (shard) serving the room"
        );
        describe_counter!(
            "rtgate_presence_resent_total",
            "Members sent a room's presence again after its diffs were lost with a broker subscription"
        );
        describe_counter!(
            "rtgate_overflow_notices_total",
            "`overflow` notices sent: a room lost messages to a connection's overflow policy"
        );
        describe_counter!(
            "rtgate_idempotent_repeats_total",
            "Publishes answered with an earlier message's id because their idempotency_key repeated"
        );
        describe_counter!(
            "rtgate_idempotency_evictions_total",
            "Idempotency keys this process forgot before their window ended (at its key bound)"
        );
        describe_counter!(
            "rtgate_task_restarts_total",
            "Long-running tasks restarted by their supervisor after they ended or panicked, by task"
        );
        describe_counter!(
            "rtgate_broker_probes_missed_total",
            "Self-probes not received back through the broker in time (the subscriber is rebuilt)"
        );
        describe_counter!(
            "rtgate_jwks_refresh_total",
            "JWKS fetches (at start, periodic, and for unknown key ids), by result"
        );
    }

    pub fn connections_changed(delta: i64) {
        gauge!("rtgate_connections").increment(delta as f64);
    }

    pub fn rooms_changed(delta: i64) {
        gauge!("rtgate_rooms").increment(delta as f64);
    }

    pub fn joined() {
        counter!("rtgate_joins_total").increment(1);
    }

    pub fn message_in(kind: &'static str) {
        counter!("rtgate_messages_in_total", "type" => kind).increment(1);
    }

    pub fn delivered(kind: &'static str, count: u64) {
        counter!("rtgate_messages_out_total", "type" => kind).increment(count);
    }

    pub fn dropped(policy: OverflowPolicy) {
        counter!("rtgate_dropped_frames_total", "policy" => policy.as_str()).increment(1);
    }

    /// Live events not held for a member during its `since` replay (more than
    /// `broker.replay_limit` arrived meanwhile); the member gets an overflow notice.
    pub fn dropped_while_replaying(n: u64) {
        counter!("rtgate_dropped_frames_total", "policy" => "replay_buffer").increment(n);
    }

    /// Redis Cluster: every wanted sharded channel subscribed again (a node dropped, a slot
    /// moved, or a probe missed).
    pub fn resubscribed() {
        counter!("rtgate_broker_resubscribes_total").increment(1);
    }

    /// An instance catching up a room from history found messages trimmed before it read
    /// them; its members got an overflow notice.
    pub fn catch_up_lost() {
        counter!("rtgate_catch_up_lost_total").increment(1);
    }

    /// Members sent a room's current presence again after its diffs were lost with the
    /// broker's subscription.
    pub fn presence_resent(members: u64) {
        counter!("rtgate_presence_resent_total").increment(members);
    }

    /// A connection was told which room lost messages and from where to recover them.
    pub fn overflow_notice() {
        counter!("rtgate_overflow_notices_total").increment(1);
    }

    pub fn idempotent_repeat() {
        counter!("rtgate_idempotent_repeats_total").increment(1);
    }

    pub fn idempotency_eviction() {
        counter!("rtgate_idempotency_evictions_total").increment(1);
    }

    pub fn task_restart(task: &'static str) {
        counter!("rtgate_task_restarts_total", "task" => task).increment(1);
    }

    pub fn probe_missed() {
        counter!("rtgate_broker_probes_missed_total").increment(1);
    }

    /// A broker payload that failed validation and was skipped.
    pub fn broker_bad_payload(broker: &'static str) {
        counter!("rtgate_broker_bad_payloads_total", "broker" => broker).increment(1);
    }

    /// A client refused at the door (`reason`: which check).
    pub fn connection_refused(reason: &'static str) {
        counter!("rtgate_connections_refused_total", "reason" => reason).increment(1);
    }

    /// A request refused by a configured limit (`limit`: which one).
    pub fn limit_exceeded(limit: &'static str) {
        counter!("rtgate_limit_exceeded_total", "limit" => limit).increment(1);
    }

    pub fn rate_limited() {
        counter!("rtgate_rate_limited_total").increment(1);
    }

    pub fn bad_frame(reason: &'static str) {
        counter!("rtgate_bad_frames_total", "reason" => reason).increment(1);
    }

    pub fn broker_failover() {
        counter!("rtgate_broker_failovers_total").increment(1);
    }

    pub fn broker_reconnect() {
        counter!("rtgate_broker_reconnects_total").increment(1);
    }

    pub fn jwks_refresh(ok: bool) {
        let result = if ok { "ok" } else { "error" };
        counter!("rtgate_jwks_refresh_total", "result" => result).increment(1);
    }

    pub fn span_dropped() {
        counter!("rtgate_span_export_dropped_total").increment(1);
    }

    pub fn bytes_in(n: usize) {
        counter!("rtgate_bytes_in_total").increment(n as u64);
    }

    pub fn bytes_out(n: u64) {
        counter!("rtgate_bytes_out_total").increment(n);
    }

    /// From the publish timestamp carried in the message to the local fan-out.
    pub fn delivery_latency(publish_ts_ms: u64) {
        let now = crate::protocol::now_ms();
        histogram!("rtgate_delivery_latency_seconds")
            .record(now.saturating_sub(publish_ts_ms) as f64 / 1000.0);
    }

    pub fn broker_ready(ready: bool) {
        gauge!("rtgate_broker_ready").set(if ready { 1.0 } else { 0.0 });
    }

    pub fn heartbeat_age(age: Duration) {
        gauge!("rtgate_heartbeat_age_seconds").set(age.as_secs_f64());
    }

    pub fn draining() {
        gauge!("rtgate_draining").set(1.0);
    }

    /// Gauges that must read 0 from the start rather than be absent.
    pub fn started() {
        gauge!("rtgate_draining").set(0.0);
        gauge!("rtgate_connections").increment(0.0);
        gauge!("rtgate_rooms").increment(0.0);
    }

    pub fn publish_latency(elapsed: Duration) {
        histogram!("rtgate_broker_publish_seconds").record(elapsed.as_secs_f64());
    }

    pub fn webhook_sent(events: u64) {
        counter!("rtgate_webhook_events_sent_total").increment(events);
    }

    pub fn webhook_dropped(events: u64) {
        counter!("rtgate_webhook_events_dropped_total").increment(events);
    }

    pub fn webhook_failed() {
        counter!("rtgate_webhook_failures_total").increment(1);
    }

    /// `outcome`: allow, deny or error.
    pub fn authorized(outcome: &'static str) {
        counter!("rtgate_authorize_requests_total", "outcome" => outcome).increment(1);
    }

    pub fn authorize_latency(elapsed: Duration) {
        histogram!("rtgate_authorize_seconds").record(elapsed.as_secs_f64());
    }

    pub fn api_request(call: &'static str, status: u16) {
        counter!("rtgate_api_requests_total", "call" => call, "status" => status.to_string())
            .increment(1);
    }

    /// Redis Cluster: one series per master (`host:port`), so one slow shard stands out.
    pub fn shard_publish_latency(shard: &str, elapsed: Duration) {
        histogram!("rtgate_broker_shard_publish_seconds", "shard" => shard.to_string())
            .record(elapsed.as_secs_f64());
    }

    /// Periodic housekeeping of the exporter (histogram buckets).
    pub fn upkeep() {
        if let Some(h) = super::PROMETHEUS.get() {
            h.run_upkeep();
        }
    }
}

/// Traces: one per message, from the publishing instance through the broker to every delivering
/// instance (OpenTelemetry messaging conventions).
pub mod trace {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::{Context, KeyValue};
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::{
        BatchSpanProcessor, Sampler, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor,
    };
    use tracing::Span as TracingSpan;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::metric;
    use crate::config::{OtlpProtocol, TelemetryConfig};

    /// Spans are only built when an exporter is installed: no cost on the hot path otherwise.
    pub(super) static ENABLED: AtomicBool = AtomicBool::new(false);

    pub fn enabled() -> bool {
        ENABLED.load(Ordering::Relaxed)
    }

    pub(super) fn provider(
        config: &TelemetryConfig,
        instance_id: &str,
    ) -> anyhow::Result<Option<SdkTracerProvider>> {
        let env_endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default();
        if config.otlp_endpoint.is_empty() && env_endpoint.is_empty() {
            return Ok(None);
        }
        let protocol = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
            Ok("grpc") => OtlpProtocol::Grpc,
            Ok("http/protobuf") => OtlpProtocol::Http,
            _ => config.otlp_protocol,
        };
        let timeout = Duration::from_secs(3);
        let exporter = match protocol {
            OtlpProtocol::Grpc => {
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_timeout(timeout);
                if !config.otlp_endpoint.is_empty() {
                    b = b.with_endpoint(&config.otlp_endpoint);
                }
                b.build()?
            }
            OtlpProtocol::Http => {
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(Protocol::HttpBinary)
                    .with_timeout(timeout);
                if !config.otlp_endpoint.is_empty() {
                    let base = config.otlp_endpoint.trim_end_matches('/');
                    b = b.with_endpoint(format!("{base}/v1/traces"));
                }
                b.build()?
            }
        };
        let in_flight = Arc::new(AtomicUsize::new(0));
        let exporter = OnRuntime {
            inner: Arc::new(exporter),
            runtime: tokio::runtime::Handle::current(),
            in_flight: in_flight.clone(),
        };
        let batch = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                opentelemetry_sdk::trace::BatchConfigBuilder::default()
                    // Never full before ours: drops are decided (and counted) below.
                    .with_max_queue_size(config.span_queue_size * 2)
                    .with_scheduled_delay(Duration::from_millis(200))
                    .build(),
            )
            .build();
        let processor = Bounded {
            inner: batch,
            in_flight,
            capacity: config.span_queue_size,
        };
        let resource = Resource::builder()
            .with_service_name(
                std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "rtgate".to_string()),
            )
            .with_attributes([
                KeyValue::new("service.version", crate::VERSION),
                KeyValue::new("service.instance.id", instance_id.to_string()),
            ])
            .build();
        let mut builder = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource);
        if std::env::var_os("OTEL_TRACES_SAMPLER").is_none() {
            // Decided once by the publisher; every other instance follows the parent.
            builder = builder.with_sampler(Sampler::ParentBased(Box::new(
                Sampler::TraceIdRatioBased(config.sample_ratio),
            )));
        }
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        Ok(Some(builder.build()))
    }

    /// Runs each export on the tokio runtime (the OTLP clients need it; the batch processor
    /// exports from its own thread) and counts spans leaving the queue.
    #[derive(Debug)]
    struct OnRuntime<E> {
        inner: Arc<E>,
        runtime: tokio::runtime::Handle,
        in_flight: Arc<AtomicUsize>,
    }

    impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            let n = batch.len();
            let inner = self.inner.clone();
            let result = self
                .runtime
                .spawn(async move { inner.export(batch).await })
                .await;
            self.in_flight.fetch_sub(n, Ordering::Relaxed);
            result.unwrap_or_else(|e| {
                Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                    e.to_string(),
                ))
            })
        }

        fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
            self.inner.shutdown_with_timeout(timeout)
        }

        fn set_resource(&mut self, resource: &Resource) {
            // Called once while building the provider, before any export shares `inner`.
            if let Some(inner) = Arc::get_mut(&mut self.inner) {
                inner.set_resource(resource);
            }
        }
    }

    /// Drops (and counts) spans beyond `capacity` waiting for export, so a collector that is
    /// away never grows memory and never blocks the hot path.
    #[derive(Debug)]
    struct Bounded {
        inner: BatchSpanProcessor,
        in_flight: Arc<AtomicUsize>,
        capacity: usize,
    }

    impl SpanProcessor for Bounded {
        fn on_start(&self, span: &mut Span, cx: &Context) {
            self.inner.on_start(span, cx);
        }

        fn on_end(&self, span: SpanData) {
            if self.in_flight.fetch_add(1, Ordering::Relaxed) >= self.capacity {
                self.in_flight.fetch_sub(1, Ordering::Relaxed);
                metric::span_dropped();
                return;
            }
            self.inner.on_end(span);
        }

        fn force_flush(&self) -> OTelSdkResult {
            self.inner.force_flush()
        }

        fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
            self.inner.shutdown_with_timeout(timeout)
        }

        fn set_resource(&mut self, resource: &Resource) {
            self.inner.set_resource(resource);
        }
    }

    /// `<room> publish` (producer) on the publishing instance.
    pub fn publish_span(room: &str, broker: &'static str) -> TracingSpan {
        tracing::info_span!(
            "publish",
            otel.name = format!("{room} publish"),
            otel.kind = "producer",
            messaging.system = broker,
            messaging.operation.type = "publish",
            messaging.destination.name = room,
            messaging.message.id = tracing::field::Empty,
        )
    }

    /// `<room> process` (consumer) on a delivering instance, child of the publisher's span.
    pub fn process_span(room: &str, broker: &'static str, traceparent: &str) -> TracingSpan {
        let span = tracing::info_span!(
            "process",
            otel.name = format!("{room} process"),
            otel.kind = "consumer",
            messaging.system = broker,
            messaging.operation.type = "process",
            messaging.destination.name = room,
            messaging.message.id = tracing::field::Empty,
            rtgate.recipients = tracing::field::Empty,
        );
        let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
        let parent = TraceContextPropagator::new().extract(&carrier);
        let _ = span.set_parent(parent);
        span
    }

    /// `ws.receive` for one client frame.
    pub fn receive_span(session: &str) -> TracingSpan {
        tracing::info_span!(
            "ws.receive",
            otel.kind = "server",
            rtgate.session.id = session
        )
    }

    /// The W3C `traceparent` of `span`, to carry with the message.
    pub fn traceparent(span: &TracingSpan) -> Option<String> {
        let mut carrier: HashMap<String, String> = HashMap::new();
        TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
        carrier.remove("traceparent")
    }
}

/// JSON log lines that carry the OpenTelemetry `trace_id` and `span_id` of the span they were
/// written in, so a log line leads to its trace.
mod json_log {
    use std::fmt;

    use opentelemetry::trace::TraceContextExt;
    use serde_json::{Map, Value};
    use tracing::field::{Field, Visit};
    use tracing::{Event, Subscriber};
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
    use tracing_subscriber::registry::LookupSpan;

    pub struct JsonWithTraceIds;

    struct Fields(Map<String, Value>);

    impl Visit for Fields {
        fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
            self.0.insert(
                field.name().to_string(),
                Value::String(format!("{value:?}")),
            );
        }
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0
                .insert(field.name().to_string(), Value::String(value.to_string()));
        }
        fn record_i64(&mut self, field: &Field, value: i64) {
            self.0.insert(field.name().to_string(), value.into());
        }
        fn record_u64(&mut self, field: &Field, value: u64) {
            self.0.insert(field.name().to_string(), value.into());
        }
        fn record_bool(&mut self, field: &Field, value: bool) {
            self.0.insert(field.name().to_string(), value.into());
        }
    }

    impl<S, N> FormatEvent<S, N> for JsonWithTraceIds
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
    {
        fn format_event(
            &self,
            ctx: &FmtContext<'_, S, N>,
            mut writer: Writer<'_>,
            event: &Event<'_>,
        ) -> fmt::Result {
            let meta = event.metadata();
            let mut fields = Fields(Map::new());
            event.record(&mut fields);
            let mut line = Map::new();
            line.insert(
                "timestamp".into(),
                crate::protocol::format_ts(crate::protocol::now_ms()).into(),
            );
            line.insert("level".into(), meta.level().as_str().into());
            line.insert("target".into(), meta.target().into());
            if let Some(span) = ctx.lookup_current() {
                line.insert("span".into(), span.name().into());
                let ids = tracing::dispatcher::get_default(|d| {
                    tracing_opentelemetry::get_otel_context(&span.id(), d)
                });
                if let Some(cx) = ids {
                    let sc = cx.span().span_context().clone();
                    if sc.is_valid() {
                        line.insert("trace_id".into(), sc.trace_id().to_string().into());
                        line.insert("span_id".into(), sc.span_id().to_string().into());
                    }
                }
            }
            line.insert("fields".into(), Value::Object(fields.0));
            writeln!(writer, "{}", Value::Object(line))
        }
    }
}
