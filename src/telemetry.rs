//! Logging and Prometheus metrics.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, TelemetryConfig};

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the log subscriber (stderr) and the metrics recorder.
pub fn init(config: &TelemetryConfig) -> anyhow::Result<()> {
    // rust-rdkafka warns on every failed poll while Kafka is away; the broker logs the outage once.
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("rdkafka=error,{}", config.log_level)))
        .map_err(|e| anyhow::anyhow!("telemetry.log_level: {e}"))?;
    let registry = tracing_subscriber::registry().with(filter);
    match config.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()?,
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init()?,
    }
    install_metrics();
    Ok(())
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
            "rtgate_bad_frames_total",
            "Malformed, binary or oversized client frames"
        );
        describe_counter!(
            "rtgate_broker_reconnects_total",
            "Times the broker connection was lost and rebuilt (failovers included)"
        );
        describe_histogram!(
            "rtgate_broker_publish_seconds",
            "Time for the broker to store and fan out a publish"
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

    pub fn rate_limited() {
        counter!("rtgate_rate_limited_total").increment(1);
    }

    pub fn bad_frame(reason: &'static str) {
        counter!("rtgate_bad_frames_total", "reason" => reason).increment(1);
    }

    pub fn broker_reconnect() {
        counter!("rtgate_broker_reconnects_total").increment(1);
    }

    pub fn publish_latency(elapsed: Duration) {
        histogram!("rtgate_broker_publish_seconds").record(elapsed.as_secs_f64());
    }

    /// Periodic housekeeping of the exporter (histogram buckets).
    pub fn upkeep() {
        if let Some(h) = super::PROMETHEUS.get() {
            h.run_upkeep();
        }
    }
}
