//! Configuration: built-in defaults, then an optional TOML file, then `RTGATE_*` environment
//! variables (`__` separates nesting levels). Unknown keys and bad values name the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "RTGATE_CONFIG";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub ws: WsConfig,
    pub rooms: RoomsConfig,
    pub broker: BrokerConfig,
    pub shutdown: ShutdownConfig,
    pub telemetry: TelemetryConfig,
    pub heartbeat: HeartbeatConfig,
    pub redis: RedisConfig,
    pub kafka: KafkaConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the one HTTP listener (WebSocket, REST, health, metrics).
    pub listen: SocketAddr,
    /// Stable instance id; a random one is generated when empty.
    pub instance_id: String,
    /// Serve the demo page at `/`. It hands out tokens to anyone (for development only).
    pub demo: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            instance_id: String::new(),
            demo: true,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 secret. Empty: `serve` generates an ephemeral one (development only).
    pub jwt_secret: String,
    /// Keys accepted by `POST /api/v1/broadcast`.
    pub api_keys: Vec<String>,
    /// Clock skew tolerated on `exp`.
    #[serde(with = "humantime_serde")]
    pub jwt_leeway: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    DropOldest,
    DropNew,
    Disconnect,
}

impl OverflowPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            OverflowPolicy::DropOldest => "drop_oldest",
            OverflowPolicy::DropNew => "drop_new",
            OverflowPolicy::Disconnect => "disconnect",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsConfig {
    /// Frames queued per connection before the overflow policy applies.
    pub send_queue_max: usize,
    pub overflow_policy: OverflowPolicy,
    /// Largest accepted client frame; larger ones get `too_large`.
    pub max_frame_bytes: usize,
    pub rate_limit_per_sec: u32,
    pub rate_limit_burst: u32,
    /// A connection that sends nothing (not even a pong) for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// The server pings a connection that has been quiet for this long.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Bad frames (binary, non-JSON, oversized) tolerated before the connection is closed.
    pub max_violations: u32,
}

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            send_queue_max: 100,
            overflow_policy: OverflowPolicy::DropOldest,
            max_frame_bytes: 64 * 1024,
            rate_limit_per_sec: 50,
            rate_limit_burst: 100,
            idle_timeout: Duration::from_secs(60),
            ping_interval: Duration::from_secs(25),
            max_violations: 3,
        }
    }
}

/// Access to rooms that are neither `public:` nor `private:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomPolicy {
    /// Any authenticated user may join and send.
    Allow,
    /// Only admins.
    Deny,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomsConfig {
    pub policy: RoomPolicy,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            policy: RoomPolicy::Allow,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BrokerKind {
    Memory,
    Redis,
    Kafka,
}

impl BrokerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerKind::Memory => "memory",
            BrokerKind::Redis => "redis",
            BrokerKind::Kafka => "kafka",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    pub kind: BrokerKind,
    /// Messages kept per room for `since` replay.
    pub history_size: usize,
    /// Most messages replayed for one `join` with `since`.
    pub replay_limit: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            kind: BrokerKind::Memory,
            history_size: 1000,
            replay_limit: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Time clients get between the drain notice and the process exit.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatConfig {
    /// How often this instance announces itself.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// An instance whose last heartbeat is older than this counts as dead.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            ttl: Duration::from_secs(15),
        }
    }
}

/// The Redis broker: either `url`, or `sentinels` with `master_name`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://host:port` or `rediss://...`; used when `sentinels` is empty.
    pub url: String,
    /// Sentinel addresses, `host:port`.
    pub sentinels: Vec<String>,
    pub master_name: String,
    pub password: String,
    pub sentinel_password: String,
    pub db: i64,
    /// Serve `since` replay from a replica (the newest tail still comes from the master).
    pub read_from_replicas: bool,
    /// Messages kept per room stream.
    pub stream_maxlen: u64,
    /// A room's stream expires this long after its last message.
    #[serde(with = "humantime_serde")]
    pub stream_ttl: Duration,
    /// Replicas that must confirm a publish before it is acked (`WAIT`). Unset: 1 when
    /// Sentinel knows replicas, else 0.
    pub min_replicas_ack: Option<u32>,
    /// How long `WAIT` may take before the publish is refused as `unavailable`.
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// Timeout of every command and of connecting; a frozen master is detected by it.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            sentinels: Vec::new(),
            master_name: "mymaster".to_string(),
            password: String::new(),
            sentinel_password: String::new(),
            db: 0,
            read_from_replicas: false,
            stream_maxlen: 10_000,
            stream_ttl: Duration::from_secs(24 * 3600),
            min_replicas_ack: None,
            wait_timeout: Duration::from_millis(500),
            command_timeout: Duration::from_secs(1),
        }
    }
}

/// The Kafka broker. Presence and heartbeats use `[redis]` when it is configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port`.
    pub brokers: Vec<String>,
    pub client_id: String,
    /// Partitions of a room topic created by rtgate (1 keeps a room totally ordered).
    pub topic_partitions: i32,
    pub replication_factor: i32,
    /// `retention.ms` of the topics rtgate creates.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How long a publish may wait for Kafka before it is refused as `unavailable`.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Passed to librdkafka as they are (SASL, TLS, tuning); they win over rtgate's settings.
    pub properties: std::collections::BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: vec!["127.0.0.1:9092".to_string()],
            client_id: "rtgate".to_string(),
            topic_partitions: 1,
            replication_factor: 1,
            retention: Duration::from_secs(24 * 3600),
            publish_timeout: Duration::from_secs(5),
            properties: Default::default(),
        }
    }
}

impl RedisConfig {
    /// Whether a Redis is configured at all (Kafka uses it for presence and heartbeats).
    pub fn is_configured(&self) -> bool {
        !self.url.is_empty() || !self.sentinels.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// `tracing` filter directive, e.g. `info` or `rtgate=debug,info`; `RUST_LOG` overrides it.
    pub log_level: String,
    /// OTLP collector, e.g. `http://127.0.0.1:4317`. Empty: `OTEL_EXPORTER_OTLP_ENDPOINT`, and
    /// tracing is off when neither is set.
    pub otlp_endpoint: String,
    /// `grpc` or `http` (HTTP/protobuf); `OTEL_EXPORTER_OTLP_PROTOCOL` overrides it.
    pub otlp_protocol: OtlpProtocol,
    /// Share of new traces kept, decided once by the publisher (`OTEL_TRACES_SAMPLER` overrides).
    pub sample_ratio: f64,
    /// Spans waiting for export; beyond it spans are dropped (and counted), never queued.
    pub span_queue_size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OtlpProtocol {
    Grpc,
    Http,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            log_level: "info".to_string(),
            otlp_endpoint: String::new(),
            otlp_protocol: OtlpProtocol::Grpc,
            sample_ratio: 1.0,
            span_queue_size: 4096,
        }
    }
}

/// A configuration that could not be loaded, with the offending key.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    /// Dotted key path, e.g. `ws.send_queue_max`; empty when the error is not about one key.
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn from_figment(err: figment::Error) -> Self {
        use figment::error::Kind;
        let mut path = err.path.clone();
        // figment may report an unknown field at its parent's path; name the field itself.
        if let Kind::UnknownField(field, _) = &err.kind
            && path.last() != Some(field)
        {
            path.push(field.clone());
        }
        let key = path.join(".");
        let origin = err
            .metadata
            .as_ref()
            .map(|m| match &m.source {
                Some(source) => format!(" (from {} {})", m.name, source),
                None => format!(" (from {})", m.name),
            })
            .unwrap_or_default();
        let message = if key.is_empty() {
            format!("invalid configuration: {}{origin}", err.kind)
        } else {
            format!("invalid configuration key `{key}`: {}{origin}", err.kind)
        };
        Self { key, message }
    }
}

impl Config {
    /// Loads defaults, then `file` (or the file named by `RTGATE_CONFIG`), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let file: Option<PathBuf> = file
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from));
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &file {
            if !path.exists() {
                return Err(ConfigError {
                    key: String::new(),
                    message: format!("config file {} does not exist", path.display()),
                });
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(
            Env::prefixed("RTGATE_")
                .split("__")
                .filter(|key| key.as_str() != "config"),
        );
        Self::from_figment(figment)
    }

    /// Loads from TOML text on top of the defaults (no environment); used by tests and tools.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        Self::from_figment(
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text)),
        )
    }

    fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(ConfigError::from_figment)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that serde cannot express.
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| ConfigError {
            key: key.to_string(),
            message: format!("invalid configuration key `{key}`: {why}"),
        };
        if self.ws.send_queue_max == 0 {
            return Err(bad("ws.send_queue_max", "must be at least 1"));
        }
        if self.ws.max_frame_bytes < 64 {
            return Err(bad("ws.max_frame_bytes", "must be at least 64"));
        }
        if self.ws.rate_limit_per_sec == 0 {
            return Err(bad("ws.rate_limit_per_sec", "must be at least 1"));
        }
        if self.ws.rate_limit_burst == 0 {
            return Err(bad("ws.rate_limit_burst", "must be at least 1"));
        }
        if self.ws.idle_timeout.is_zero() {
            return Err(bad("ws.idle_timeout", "must be more than 0"));
        }
        if self.ws.ping_interval.is_zero() || self.ws.ping_interval >= self.ws.idle_timeout {
            return Err(bad(
                "ws.ping_interval",
                "must be more than 0 and less than ws.idle_timeout",
            ));
        }
        if self.ws.max_violations == 0 {
            return Err(bad("ws.max_violations", "must be at least 1"));
        }
        if self.broker.history_size == 0 {
            return Err(bad("broker.history_size", "must be at least 1"));
        }
        if self.heartbeat.interval.is_zero() || self.heartbeat.ttl <= self.heartbeat.interval {
            return Err(bad(
                "heartbeat.ttl",
                "must be longer than heartbeat.interval (which must be more than 0)",
            ));
        }
        if self.broker.kind == BrokerKind::Redis {
            if self.redis.url.is_empty() && self.redis.sentinels.is_empty() {
                return Err(bad(
                    "redis.url",
                    "broker.kind = \"redis\" needs redis.url or redis.sentinels",
                ));
            }
            if !self.redis.sentinels.is_empty() && self.redis.master_name.is_empty() {
                return Err(bad("redis.master_name", "is required with redis.sentinels"));
            }
            if self.redis.stream_maxlen == 0 {
                return Err(bad("redis.stream_maxlen", "must be at least 1"));
            }
        }
        if self.broker.kind == BrokerKind::Kafka {
            if self.kafka.brokers.is_empty() {
                return Err(bad(
                    "kafka.brokers",
                    "broker.kind = \"kafka\" needs at least one broker",
                ));
            }
            if self.kafka.topic_partitions < 1 {
                return Err(bad("kafka.topic_partitions", "must be at least 1"));
            }
            if self.kafka.replication_factor < 1 {
                return Err(bad("kafka.replication_factor", "must be at least 1"));
            }
        }
        if !(0.0..=1.0).contains(&self.telemetry.sample_ratio) {
            return Err(bad("telemetry.sample_ratio", "must be between 0 and 1"));
        }
        if self.telemetry.span_queue_size == 0 {
            return Err(bad("telemetry.span_queue_size", "must be at least 1"));
        }
        if !self.auth.jwt_secret.is_empty() && self.auth.jwt_secret.len() < 8 {
            return Err(bad("auth.jwt_secret", "must be at least 8 bytes"));
        }
        if self.auth.api_keys.iter().any(|k| k.is_empty()) {
            return Err(bad("auth.api_keys", "keys must not be empty"));
        }
        Ok(())
    }

    /// The effective configuration as TOML, secrets replaced by `"<redacted>"`.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        if !shown.auth.jwt_secret.is_empty() {
            shown.auth.jwt_secret = REDACTED.to_string();
        }
        for key in &mut shown.auth.api_keys {
            *key = REDACTED.to_string();
        }
        for secret in [
            &mut shown.redis.password,
            &mut shown.redis.sentinel_password,
        ] {
            if !secret.is_empty() {
                *secret = REDACTED.to_string();
            }
        }
        for (key, value) in shown.kafka.properties.iter_mut() {
            if key.contains("password") || key.contains("secret") || key.contains("key") {
                *value = REDACTED.to_string();
            }
        }
        if let Some(at) = shown.redis.url.find('@') {
            // A password inside the URL: redis://user:secret@host.
            let scheme_end = shown.redis.url.find("://").map_or(0, |i| i + 3);
            shown.redis.url = format!(
                "{}{REDACTED}{}",
                &shown.redis.url[..scheme_end],
                &shown.redis.url[at..]
            );
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

const REDACTED: &str = "<redacted>";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::from_toml_str("").unwrap();
        assert_eq!(c.server.listen.port(), 8080);
        assert_eq!(c.ws.send_queue_max, 100);
        assert_eq!(c.ws.overflow_policy, OverflowPolicy::DropOldest);
        assert_eq!(c.broker.history_size, 1000);
    }

    #[test]
    fn durations_parse_human_form() {
        let c = Config::from_toml_str("[ws]\nidle_timeout = \"500ms\"\nping_interval = \"100ms\"\n[shutdown]\ngrace = \"24h\"").unwrap();
        assert_eq!(c.ws.idle_timeout, Duration::from_millis(500));
        assert_eq!(c.shutdown.grace, Duration::from_secs(24 * 3600));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_toml_str("[ws]\nsend_queue_maks = 3").unwrap_err();
        assert_eq!(e.key, "ws.send_queue_maks");
        assert!(e.message.contains("ws.send_queue_maks"), "{}", e.message);
        let e = Config::from_toml_str("[wss]\nx = 1").unwrap_err();
        assert_eq!(e.key, "wss");
    }

    #[test]
    fn bad_value_is_named() {
        let e = Config::from_toml_str("[ws]\noverflow_policy = \"drop_all\"").unwrap_err();
        assert_eq!(e.key, "ws.overflow_policy");
        let e = Config::from_toml_str("[shutdown]\ngrace = \"soon\"").unwrap_err();
        assert_eq!(e.key, "shutdown.grace");
        let e = Config::from_toml_str("[ws]\nsend_queue_max = 0").unwrap_err();
        assert_eq!(e.key, "ws.send_queue_max");
    }

    #[test]
    fn redaction_hides_secrets() {
        let c = Config::from_toml_str("[auth]\njwt_secret = \"supersecret\"\napi_keys = [\"k1\"]")
            .unwrap();
        let shown = c.to_redacted_toml();
        assert!(
            !shown.contains("supersecret") && !shown.contains("\"k1\""),
            "{shown}"
        );
        let back = Config::from_toml_str(&shown).unwrap();
        assert_eq!(back.auth.api_keys.len(), 1);
    }
}
