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
    pub webhooks: WebhooksConfig,
    pub api: ApiConfig,
}

/// Limits of the server API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Rooms one `POST /api/v1/broadcast` may name in `rooms`.
    pub max_broadcast_rooms: usize,
    /// Largest `limit` of a history or rooms page.
    pub max_page: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            max_broadcast_rooms: 100,
            max_page: 1000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the public HTTP listener (WebSocket, REST, health; metrics and stats too
    /// unless `admin_listen` is set).
    pub listen: SocketAddr,
    /// When set, `/metrics` and `/api/v1/stats` are served here and not on `listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<SocketAddr>,
    /// Stable instance id; a random one is generated when empty.
    pub instance_id: String,
    /// Serve the demo page at `/` and `/api/v1/demo/token`, which hands a token to anyone.
    /// Unset: on only with the ephemeral development secret (empty `auth.jwt_secret`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub demo: Option<bool>,
    /// WebSocket connections this instance holds at most; beyond, new ones are closed with 1013.
    pub max_connections: usize,
    /// Connections one user (`sub`) may hold on this instance; beyond, closed with 1013.
    pub max_connections_per_user: usize,
    /// WebSocket upgrades per second from one client address (token bucket); beyond, HTTP 429.
    /// 0 turns the limit off.
    pub connect_rate_per_ip: u32,
    /// Bucket size of `connect_rate_per_ip`: upgrades one address may make in a burst.
    pub connect_burst_per_ip: u32,
    /// Proxies (CIDRs) whose `X-Forwarded-For` / `Forwarded` header names the client address.
    pub trusted_proxies: Vec<String>,
    /// Browser origins allowed to open a WebSocket (`https://app.example.com`,
    /// `https://*.example.com`, or `*` for any). Empty: same origin as the request's `Host`
    /// only. Requests without `Origin` (non-browser clients) are not affected.
    pub allowed_origins: Vec<String>,
    /// Time a client has to send a complete request header, and the longest an idle
    /// keep-alive connection is kept waiting for its next request.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: None,
            instance_id: String::new(),
            demo: None,
            max_connections: 50_000,
            max_connections_per_user: 100,
            connect_rate_per_ip: 20,
            connect_burst_per_ip: 100,
            trusted_proxies: Vec::new(),
            allowed_origins: Vec::new(),
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

impl ServerConfig {
    /// Whether the demo page and token endpoint are served.
    pub fn demo_enabled(&self, auth: &AuthConfig) -> bool {
        self.demo.unwrap_or(!auth.has_keys())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 secret, at least 32 bytes. Empty (and no public key): `serve` generates an
    /// ephemeral one (development only).
    pub jwt_secret: String,
    /// Keys accepted by the server API (`POST /api/v1/broadcast`).
    pub api_keys: Vec<String>,
    /// Clock skew tolerated on `exp` and `nbf` (also by the expiry sweep).
    #[serde(with = "humantime_serde")]
    pub jwt_leeway: Duration,
    /// Required `iss` when set.
    pub issuer: String,
    /// Accepted `aud` values (a string or a list). When set, a token's `aud` (a string or a
    /// list) must contain one of them; when empty, `aud` is not checked (tokens with or
    /// without it are accepted).
    #[serde(deserialize_with = "one_or_many")]
    pub audience: Vec<String>,
    /// Longest accepted token lifetime (`exp` - `iat`, or `exp` - now without `iat`).
    #[serde(
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_token_lifetime: Option<Duration>,
    /// PEM public key (RSA, EC P-256 or Ed25519) for RS256, ES256 or EdDSA tokens.
    pub public_key_file: String,
    /// JWKS endpoint (for example an OIDC provider's `jwks_uri`) for RS256, ES256, EdDSA tokens.
    pub jwks_url: String,
    /// How often the JWKS is fetched again.
    #[serde(with = "humantime_serde")]
    pub jwks_refresh: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: String::new(),
            api_keys: Vec::new(),
            jwt_leeway: Duration::ZERO,
            issuer: String::new(),
            audience: Vec::new(),
            max_token_lifetime: None,
            public_key_file: String::new(),
            jwks_url: String::new(),
            jwks_refresh: Duration::from_secs(300),
        }
    }
}

impl AuthConfig {
    /// Whether tokens can be verified with configured keys (else `serve` makes a dev secret).
    pub fn has_keys(&self) -> bool {
        !self.jwt_secret.is_empty() || !self.public_key_file.is_empty() || !self.jwks_url.is_empty()
    }
}

/// Accepts `"a"` as well as `["a", "b"]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) if s.is_empty() => Vec::new(),
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
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
    /// Bytes queued per connection before the overflow policy applies (next to the count).
    pub send_queue_max_bytes: usize,
    /// Rooms one connection may be in; a join beyond gets `limit_exceeded`.
    pub max_rooms_per_connection: usize,
    /// Deepest nesting of arrays and objects in `data` and presence metas (`bad_request`).
    pub max_json_depth: usize,
    /// Largest presence meta, in bytes of JSON (`too_large`).
    pub max_presence_bytes: usize,
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
            send_queue_max_bytes: 1024 * 1024,
            max_rooms_per_connection: 128,
            max_json_depth: 32,
            max_presence_bytes: 2048,
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
    /// The app's backend decides (`rooms.authorize_url`), as for a `hook` rule.
    Hook,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomsConfig {
    /// Rooms no rule matches: `allow` (any user), `deny` (admins only) or `hook` (the app's
    /// backend decides, at `rooms.authorize_url`).
    pub policy: RoomPolicy,
    /// Presence entries one room holds at most (all instances); `track` beyond gets
    /// `limit_exceeded`.
    pub max_presence_per_room: usize,
    /// Who may join rooms by name prefix; the longest matching prefix wins. After these,
    /// `public:` is public and `private:<user>` belongs to that user.
    pub rules: Vec<RoomRule>,
    /// The app's endpoint asked on `join` by rules with `policy = "hook"` that name no URL.
    pub authorize_url: String,
    /// How long the endpoint may take; slower is `unavailable`.
    #[serde(with = "humantime_serde")]
    pub authorize_timeout: Duration,
    /// How long an allow or deny is reused for the same user and room (0: ask every time).
    #[serde(with = "humantime_serde")]
    pub authorize_cache: Duration,
    /// Answers cached at most (oldest forgotten first).
    pub authorize_cache_max: usize,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            policy: RoomPolicy::Allow,
            max_presence_per_room: 1000,
            rules: Vec::new(),
            authorize_url: String::new(),
            authorize_timeout: Duration::from_secs(2),
            authorize_cache: Duration::from_secs(30),
            authorize_cache_max: 100_000,
        }
    }
}

/// Access to the rooms whose name starts with `prefix`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomRule {
    pub prefix: String,
    pub policy: RulePolicy,
    /// For `policy = "hook"`: the endpoint to ask (else `rooms.authorize_url`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub authorize_url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RulePolicy {
    /// Any authenticated user.
    Public,
    /// The user whose id follows the prefix (`private:<user>`), and admins.
    Owner,
    /// Admins only.
    Admin,
    /// The app's backend decides (`authorize_url`); admins always may.
    Hook,
}

/// Webhooks to the app's backend: room occupied/vacated (across instances), presence
/// join/leave; batched, signed, retried, bounded.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Where events are POSTed; empty: webhooks off.
    pub url: String,
    /// Key of the `X-Rtgate-Signature` HMAC (at least 16 bytes).
    pub secret: String,
    /// At most one POST per interval; events meanwhile are batched.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Events per POST at most.
    pub batch_max: usize,
    /// Events waiting at most; beyond, new ones are dropped and counted.
    pub queue_max: usize,
    /// Timeout of one POST.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            secret: String::new(),
            interval: Duration::from_secs(1),
            batch_max: 100,
            queue_max: 10_000,
            timeout: Duration::from_secs(5),
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
    /// How long a publish's `idempotency_key` is remembered.
    #[serde(with = "humantime_serde")]
    pub idempotency_window: Duration,
    /// Most idempotency keys one process remembers (memory broker, Kafka without Redis).
    pub idempotency_max_keys: usize,
    /// How often the instance sends itself a probe through the broker.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// How long a probe may take to come back before the subscriber is rebuilt.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            kind: BrokerKind::Memory,
            history_size: 1000,
            replay_limit: 10_000,
            idempotency_window: Duration::from_secs(300),
            idempotency_max_keys: 100_000,
            probe_interval: Duration::from_secs(2),
            probe_timeout: Duration::from_secs(3),
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
    /// Redis Cluster seed nodes, `host:port` (rooms sharded by hash slot, sharded Pub/Sub);
    /// instead of `url` and `sentinels`.
    pub cluster_nodes: Vec<String>,
    pub master_name: String,
    pub password: String,
    pub sentinel_password: String,
    /// TLS to the cluster nodes, or to the master and replicas found through Sentinel
    /// (for one server, say `rediss://` in `url`).
    pub tls: bool,
    /// PEM file of the CA that signed the Redis servers' certificates, trusted instead of the
    /// system's store (`url` and `cluster_nodes`).
    pub tls_ca_file: String,
    pub db: i64,
    /// Serve `since` replay from a replica (the newest tail still comes from the master).
    pub read_from_replicas: bool,
    /// Messages kept per room stream.
    pub stream_maxlen: u64,
    /// A room's stream expires this long after its last message.
    #[serde(with = "humantime_serde")]
    pub stream_ttl: Duration,
    /// Direct messages kept per user (about), so that an instance that reconnects delivers
    /// what was sent meanwhile.
    pub direct_maxlen: u64,
    /// A user's direct messages expire this long after the last one.
    #[serde(with = "humantime_serde")]
    pub direct_ttl: Duration,
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
            cluster_nodes: Vec::new(),
            master_name: "mymaster".to_string(),
            password: String::new(),
            sentinel_password: String::new(),
            tls: false,
            tls_ca_file: String::new(),
            db: 0,
            read_from_replicas: false,
            stream_maxlen: 10_000,
            stream_ttl: Duration::from_secs(24 * 3600),
            direct_maxlen: 100,
            direct_ttl: Duration::from_secs(120),
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
        !self.url.is_empty() || !self.sentinels.is_empty() || !self.cluster_nodes.is_empty()
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
                // `RTGATE_FAULT_INJECTION` is read by the test-only fault points, not config.
                .filter(|key| key != "config" && key != "fault_injection"),
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
        if self.broker.idempotency_window.is_zero() {
            return Err(bad("broker.idempotency_window", "must be more than 0"));
        }
        if self.broker.idempotency_max_keys == 0 {
            return Err(bad("broker.idempotency_max_keys", "must be at least 1"));
        }
        if self.broker.probe_interval.is_zero() || self.broker.probe_timeout.is_zero() {
            return Err(bad(
                "broker.probe_interval",
                "broker.probe_interval and broker.probe_timeout must be more than 0",
            ));
        }
        if self.heartbeat.interval.is_zero() || self.heartbeat.ttl <= self.heartbeat.interval {
            return Err(bad(
                "heartbeat.ttl",
                "must be longer than heartbeat.interval (which must be more than 0)",
            ));
        }
        let modes = [
            !self.redis.url.is_empty(),
            !self.redis.sentinels.is_empty(),
            !self.redis.cluster_nodes.is_empty(),
        ];
        if modes.iter().filter(|m| **m).count() > 1 {
            return Err(bad(
                "redis.cluster_nodes",
                "redis.url, redis.sentinels and redis.cluster_nodes exclude each other: set one",
            ));
        }
        if self.broker.kind == BrokerKind::Redis {
            if !self.redis.is_configured() {
                return Err(bad(
                    "redis.url",
                    "broker.kind = \"redis\" needs redis.url, redis.sentinels or redis.cluster_nodes",
                ));
            }
            if !self.redis.sentinels.is_empty() && self.redis.master_name.is_empty() {
                return Err(bad("redis.master_name", "is required with redis.sentinels"));
            }
            if self.redis.stream_maxlen == 0 {
                return Err(bad("redis.stream_maxlen", "must be at least 1"));
            }
            if self.redis.direct_maxlen == 0 {
                return Err(bad("redis.direct_maxlen", "must be at least 1"));
            }
            if self.redis.direct_ttl < Duration::from_secs(1) {
                return Err(bad("redis.direct_ttl", "must be at least 1s"));
            }
        }
        if self.redis.tls && !self.redis.url.is_empty() {
            return Err(bad(
                "redis.tls",
                "is for redis.cluster_nodes and redis.sentinels; with redis.url, write rediss://",
            ));
        }
        if !self.redis.tls_ca_file.is_empty() {
            if !self.redis.sentinels.is_empty() {
                return Err(bad(
                    "redis.tls_ca_file",
                    "is not supported with redis.sentinels (the system's trust store is used)",
                ));
            }
            if let Err(e) = std::fs::read(&self.redis.tls_ca_file) {
                return Err(bad(
                    "redis.tls_ca_file",
                    &format!("cannot read {}: {e}", self.redis.tls_ca_file),
                ));
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
        let http_url = |u: &str| u.starts_with("http://") || u.starts_with("https://");
        for (i, rule) in self.rooms.rules.iter().enumerate() {
            if rule.prefix.is_empty() || !rule.prefix.bytes().all(crate::protocol::room_byte) {
                return Err(bad(
                    &format!("rooms.rules.{i}.prefix"),
                    "must be 1 or more of [A-Za-z0-9:_.@-]",
                ));
            }
            if !rule.authorize_url.is_empty() && !http_url(&rule.authorize_url) {
                return Err(bad(
                    &format!("rooms.rules.{i}.authorize_url"),
                    "must be an http:// or https:// URL",
                ));
            }
            if rule.policy == RulePolicy::Hook
                && rule.authorize_url.is_empty()
                && self.rooms.authorize_url.is_empty()
            {
                return Err(bad(
                    &format!("rooms.rules.{i}.authorize_url"),
                    "policy \"hook\" needs authorize_url here or rooms.authorize_url",
                ));
            }
        }
        if self.rooms.policy == RoomPolicy::Hook && self.rooms.authorize_url.is_empty() {
            return Err(bad(
                "rooms.authorize_url",
                "rooms.policy = \"hook\" needs rooms.authorize_url",
            ));
        }
        if !self.rooms.authorize_url.is_empty() && !http_url(&self.rooms.authorize_url) {
            return Err(bad(
                "rooms.authorize_url",
                "must be an http:// or https:// URL",
            ));
        }
        if self.rooms.authorize_timeout.is_zero() {
            return Err(bad("rooms.authorize_timeout", "must be more than 0"));
        }
        if !self.webhooks.url.is_empty() {
            if !http_url(&self.webhooks.url) {
                return Err(bad("webhooks.url", "must be an http:// or https:// URL"));
            }
            if self.webhooks.secret.len() < 16 {
                return Err(bad(
                    "webhooks.secret",
                    "at least 16 bytes are needed to sign the webhooks",
                ));
            }
        }
        if self.api.max_broadcast_rooms == 0 {
            return Err(bad("api.max_broadcast_rooms", "must be at least 1"));
        }
        if self.api.max_page == 0 {
            return Err(bad("api.max_page", "must be at least 1"));
        }
        if self.webhooks.interval.is_zero() {
            return Err(bad("webhooks.interval", "must be more than 0"));
        }
        if self.webhooks.batch_max == 0 {
            return Err(bad("webhooks.batch_max", "must be at least 1"));
        }
        if self.webhooks.timeout.is_zero() {
            return Err(bad("webhooks.timeout", "must be more than 0"));
        }
        if !(0.0..=1.0).contains(&self.telemetry.sample_ratio) {
            return Err(bad("telemetry.sample_ratio", "must be between 0 and 1"));
        }
        if self.telemetry.span_queue_size == 0 {
            return Err(bad("telemetry.span_queue_size", "must be at least 1"));
        }
        if !self.auth.jwt_secret.is_empty() && self.auth.jwt_secret.len() < MIN_SECRET_BYTES {
            return Err(bad(
                "auth.jwt_secret",
                "must be at least 32 bytes (for example `openssl rand -hex 32`)",
            ));
        }
        if self.auth.audience.iter().any(|a| a.is_empty()) {
            return Err(bad("auth.audience", "values must not be empty"));
        }
        if self.auth.max_token_lifetime.is_some_and(|d| d.is_zero()) {
            return Err(bad("auth.max_token_lifetime", "must be more than 0"));
        }
        let jwks = &self.auth.jwks_url;
        if !jwks.is_empty() && !jwks.starts_with("https://") && !jwks.starts_with("http://") {
            return Err(bad("auth.jwks_url", "must be an http:// or https:// URL"));
        }
        if !self.auth.jwks_url.is_empty() && self.auth.jwks_refresh < Duration::from_secs(1) {
            return Err(bad("auth.jwks_refresh", "must be at least 1s"));
        }
        if !self.auth.public_key_file.is_empty()
            && let Err(e) = crate::auth::load_public_key_file(&self.auth.public_key_file)
        {
            return Err(bad("auth.public_key_file", &e.detail()));
        }
        if self.server.max_connections == 0 {
            return Err(bad("server.max_connections", "must be at least 1"));
        }
        if self.server.max_connections_per_user == 0 {
            return Err(bad("server.max_connections_per_user", "must be at least 1"));
        }
        if self.server.connect_rate_per_ip > 0 && self.server.connect_burst_per_ip == 0 {
            return Err(bad("server.connect_burst_per_ip", "must be at least 1"));
        }
        for (i, cidr) in self.server.trusted_proxies.iter().enumerate() {
            if crate::http::admission::parse_cidr(cidr).is_none() {
                return Err(bad(
                    &format!("server.trusted_proxies.{i}"),
                    &format!("`{cidr}` is not an IP address or CIDR (e.g. 10.0.0.0/8)"),
                ));
            }
        }
        for (i, origin) in self.server.allowed_origins.iter().enumerate() {
            if let Err(why) = crate::http::admission::OriginPattern::parse(origin) {
                return Err(bad(&format!("server.allowed_origins.{i}"), &why));
            }
        }
        if self.server.header_read_timeout.is_zero() {
            return Err(bad("server.header_read_timeout", "must be more than 0"));
        }
        if self
            .server
            .admin_listen
            .is_some_and(|admin| admin == self.server.listen && admin.port() != 0)
        {
            return Err(bad("server.admin_listen", "must differ from server.listen"));
        }
        if self.ws.send_queue_max_bytes < self.ws.max_frame_bytes {
            return Err(bad(
                "ws.send_queue_max_bytes",
                "must be at least ws.max_frame_bytes",
            ));
        }
        if self.ws.max_rooms_per_connection == 0 {
            return Err(bad("ws.max_rooms_per_connection", "must be at least 1"));
        }
        if !(2..=128).contains(&self.ws.max_json_depth) {
            return Err(bad("ws.max_json_depth", "must be between 2 and 128"));
        }
        if self.ws.max_presence_bytes < 64 {
            return Err(bad("ws.max_presence_bytes", "must be at least 64"));
        }
        if self.rooms.max_presence_per_room == 0 {
            return Err(bad("rooms.max_presence_per_room", "must be at least 1"));
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
            &mut shown.webhooks.secret,
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

/// Shortest accepted HS256 secret (RFC 7518 3.2: a key at least as long as the hash).
pub const MIN_SECRET_BYTES: usize = 32;

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
    fn redis_modes_exclude_each_other() {
        let cluster = "cluster_nodes = [\"127.0.0.1:7000\"]";
        let ok = Config::from_toml_str(&format!("[broker]\nkind = \"redis\"\n[redis]\n{cluster}"));
        assert!(ok.is_ok(), "{:?}", ok.err());
        for other in [
            "url = \"redis://127.0.0.1:6379\"",
            "sentinels = [\"127.0.0.1:26379\"]",
        ] {
            let e = Config::from_toml_str(&format!(
                "[broker]\nkind = \"redis\"\n[redis]\n{cluster}\n{other}"
            ))
            .unwrap_err();
            assert_eq!(e.key, "redis.cluster_nodes");
            assert!(e.message.contains("redis.url") && e.message.contains("redis.sentinels"));
        }
        // A Cluster may serve as the Kafka broker's registry.
        let kafka = Config::from_toml_str(&format!(
            "[broker]\nkind = \"kafka\"\n[kafka]\nbrokers = [\"k:9092\"]\n[redis]\n{cluster}"
        ));
        assert!(kafka.is_ok(), "{:?}", kafka.err());
    }

    #[test]
    fn redis_tls_keys_are_checked() {
        let load = |redis: &str| {
            Config::from_toml_str(&format!("[broker]\nkind = \"redis\"\n[redis]\n{redis}"))
        };
        let e = load("url = \"redis://r:6379\"\ntls = true").unwrap_err();
        assert_eq!(e.key, "redis.tls");
        assert!(e.message.contains("rediss://"), "{}", e.message);
        let e =
            load("cluster_nodes = [\"a:1\"]\ntls = true\ntls_ca_file = \"/nonexistent/ca.pem\"")
                .unwrap_err();
        assert_eq!(e.key, "redis.tls_ca_file");
        assert!(e.message.contains("/nonexistent/ca.pem"), "{}", e.message);
        let ca = tempfile_path("ca.pem");
        std::fs::write(&ca, "pem").unwrap();
        let e = load(&format!(
            "sentinels = [\"s:26379\"]\ntls = true\ntls_ca_file = \"{ca}\""
        ))
        .unwrap_err();
        assert_eq!(e.key, "redis.tls_ca_file");
        let c = load(&format!(
            "cluster_nodes = [\"a:1\"]\ntls = true\ntls_ca_file = \"{ca}\""
        ))
        .unwrap();
        assert!(c.redis.tls);
        let _ = std::fs::remove_file(&ca);
    }

    /// A file name in the temp dir, unique to this process.
    fn tempfile_path(name: &str) -> String {
        std::env::temp_dir()
            .join(format!("rtgate-config-{}-{name}", std::process::id()))
            .display()
            .to_string()
    }

    #[test]
    fn redaction_hides_secrets() {
        let c = Config::from_toml_str(
            "[auth]\njwt_secret = \"supersecret-supersecret-supersecret\"\napi_keys = [\"k1\"]",
        )
        .unwrap();
        let shown = c.to_redacted_toml();
        assert!(
            !shown.contains("supersecret") && !shown.contains("\"k1\""),
            "{shown}"
        );
        // Still valid TOML with every key in place (a redacted secret is too short to load).
        let back: toml::Table = shown.parse().unwrap();
        assert_eq!(back["auth"]["api_keys"].as_array().unwrap().len(), 1);
        assert_eq!(back["auth"]["jwt_secret"].as_str(), Some(REDACTED));
    }
}
