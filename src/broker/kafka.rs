//! Kafka broker: one topic per room (`rt.room.<escaped room>.v1`), direct messages on
//! `rt.direct.v1`, ids from positions (`<partition>-<offset + 1>`, so that no message has the
//! id `0-0`, which a `since` uses for "from the start").
//!
//! The producer is idempotent with `acks=all`: a publish is acked once Kafka has it. One
//! consumer per instance reads only the topics of rooms with local members, by assigning their
//! partitions itself (no consumer group, no rebalances): from the end when a room gets its
//! first member, from the last delivered offset after that. Presence and heartbeats are not
//! here: the gateway pairs this broker with a [`super::Registry`] (Redis when `[redis]` is
//! configured, else this process).

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};

use super::idempotency::{self, Claim, ClaimTerms, IdempotencyStore, LocalIdempotency};
use super::wire;
use super::{
    Broker, BrokerError, Deliver, DirectMessage, History, MessageId, RoomEvent, RoomMessage,
    RoomName, Subscribed,
};
use crate::config::KafkaConfig;
use crate::supervise::{self, Exit, Handoff};

/// The topic every instance reads for direct messages.
pub const DIRECT_TOPIC: &str = "rt.direct.v1";
/// Self-probes: each instance writes records keyed by its id and expects to read them back.
pub const PROBE_TOPIC: &str = "rt.probe.v1";
const TRACEPARENT: &str = "traceparent";
/// The idempotency scope of a keyed record, so that a retry whose first attempt timed out can
/// find it (Kafka gives no id for a record whose ack was lost).
const IDEMPOTENCY_HEADER: &str = "rt-idempotency";
/// Room topics whose end [`Shared::saw_record`] remembers.
const MAX_KNOWN_ENDS: usize = 100_000;
/// Kafka's longest topic name.
const MAX_TOPIC_LEN: usize = 249;

/// `rt.room.<room>.v1`, keeping `[A-Za-z0-9-]` and writing every other byte as `_XX`.
pub fn room_topic(room: &str) -> String {
    let mut topic = String::with_capacity(room.len() + 12);
    topic.push_str("rt.room.");
    for b in room.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            topic.push(b as char);
        } else {
            topic.push_str(&format!("_{b:02X}"));
        }
    }
    topic.push_str(".v1");
    topic
}

/// librdkafka reports every failed reconnect as an error; availability is tracked (and logged
/// once per change) by the health watcher, so these go to debug.
#[derive(Clone, Default)]
pub struct QuietContext;

impl rdkafka::ClientContext for QuietContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical => tracing::error!(fac, "librdkafka: {log_message}"),
            _ => tracing::debug!(fac, "librdkafka: {log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "librdkafka error");
    }
}

impl rdkafka::consumer::ConsumerContext for QuietContext {}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

enum Command {
    Subscribe(RoomName, oneshot::Sender<Result<(), BrokerError>>),
    Unsubscribe(RoomName),
    /// Kafka is back after an outage: find partitions that started over.
    Resync,
    /// A self-probe did not come back: start over with a new consumer.
    Restart,
}

/// How often a self-probe goes out and how long it may take to come back.
#[derive(Clone, Copy, Debug)]
pub struct ProbeTiming {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for ProbeTiming {
    /// The defaults of `broker.probe_interval` and `broker.probe_timeout`.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(3),
        }
    }
}

struct Shared {
    cfg: KafkaConfig,
    sink: Arc<dyn Deliver>,
    /// Replaced when Kafka comes back: an idempotent producer whose broker lost its state
    /// stays stuck on the old producer id.
    producer: Mutex<FutureProducer<QuietContext>>,
    admin: AdminClient<QuietContext>,
    /// Settings every consumer of this instance starts from.
    consumer_config: ClientConfig,
    /// Topics known to exist (created or seen).
    topics: Mutex<HashSet<String>>,
    ready: AtomicBool,
    /// Set when the broker is dropped: its tasks end.
    closed: AtomicBool,
    instance_id: Arc<str>,
    probe: ProbeTiming,
    /// The newest of this instance's probes the consumer read back.
    probe_seen: AtomicU64,
    /// The consumer's positions when its last run ended: the next run resumes there, so a
    /// room with nothing delivered yet does not skip to the end of its topic.
    positions: Mutex<HashMap<String, Position>>,
    /// The consumer's current run has its partitions assigned (probes can come back).
    consuming: AtomicBool,
    /// Per room topic, an offset its log has reached (the latest ack here): where a record
    /// produced later will be at the earliest.
    known_ends: Mutex<HashMap<String, u64>>,
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
    }
}

pub struct KafkaBroker {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    /// Serializes `since` replays (and searches for keyed records) on one reader.
    history: tokio::sync::Mutex<Option<BaseConsumer<QuietContext>>>,
    /// Where `idempotency_key`s are remembered: Redis when configured, else this process.
    idempotency: Arc<dyn IdempotencyStore>,
    idempotency_window: Duration,
}

fn base_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", cfg.brokers.join(","))
        .set("client.id", &cfg.client_id)
        .set("socket.nagle.disable", "true");
    c
}

fn with_properties(mut c: ClientConfig, cfg: &KafkaConfig) -> ClientConfig {
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

impl KafkaBroker {
    /// Creates the clients and starts the consumer. Presence and heartbeats are another port's
    /// ([`super::Registry`]).
    pub fn start(
        cfg: KafkaConfig,
        instance_id: Arc<str>,
        probe: ProbeTiming,
        sink: Arc<dyn Deliver>,
    ) -> Result<Self, KafkaError> {
        let producer = create_producer(&cfg)?;
        let admin: AdminClient<QuietContext> =
            with_properties(base_config(&cfg), &cfg).create_with_context(QuietContext)?;
        let consumer_config = with_properties(
            {
                let mut c = base_config(&cfg);
                // Partitions are assigned by hand; the group id is never used for offsets.
                c.set("group.id", format!("rtgate-{instance_id}"))
                    .set("enable.auto.commit", "false")
                    .set("enable.auto.offset.store", "false")
                    // A position the log no longer has (retention, a broker that lost its
                    // data): deliver what the log has rather than skip to its end.
                    .set("auto.offset.reset", "earliest")
                    .set("fetch.wait.max.ms", "10")
                    .set("fetch.min.bytes", "1")
                    .set("fetch.error.backoff.ms", "50")
                    .set("reconnect.backoff.ms", "50")
                    .set("reconnect.backoff.max.ms", "1000");
                c
            },
            &cfg,
        );
        let shared = Arc::new(Shared {
            cfg,
            sink,
            admin,
            consumer_config,
            producer: Mutex::new(producer),
            topics: Mutex::default(),
            ready: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            instance_id,
            probe,
            probe_seen: AtomicU64::new(0),
            positions: Mutex::default(),
            consuming: AtomicBool::new(false),
            known_ends: Mutex::default(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let commands = Handoff::new(rx);
        let down = Arc::downgrade(&shared);
        spawn_supervised(
            "kafka-consumer",
            &shared,
            move |shared| consume(shared, commands.clone()),
            move || {
                if let Some(shared) = down.upgrade() {
                    shared.ready.store(false, Ordering::SeqCst);
                }
            },
        );
        let health_tx = tx.clone();
        spawn_supervised(
            "kafka-health",
            &shared,
            move |shared| watch_health(shared, health_tx.clone()),
            || {},
        );
        Ok(Self {
            shared,
            commands: tx,
            history: tokio::sync::Mutex::new(None),
            idempotency: Arc::new(LocalIdempotency::new(100_000)),
            idempotency_window: Duration::from_secs(300),
        })
    }

    /// Where and how long `idempotency_key`s are remembered.
    pub fn with_idempotency(mut self, store: Arc<dyn IdempotencyStore>, window: Duration) -> Self {
        self.idempotency = store;
        self.idempotency_window = window;
        self
    }

    /// [`Self::produce_unbounded`] within twice `kafka.publish_timeout` (the queue wait, then
    /// the delivery): librdkafka was seen, rarely, not to report a record while the broker
    /// was down, and a publish must always be answered.
    async fn produce(
        &self,
        msg: &RoomMessage,
        scope: Option<&str>,
    ) -> Result<MessageId, BrokerError> {
        let limit = self.shared.cfg.publish_timeout * 2;
        match tokio::time::timeout(limit, self.produce_unbounded(msg, scope)).await {
            Ok(result) => result,
            Err(_) => Err(unavailable(format!(
                "Kafka did not confirm the record within {limit:?}"
            ))),
        }
    }

    async fn produce_unbounded(
        &self,
        msg: &RoomMessage,
        scope: Option<&str>,
    ) -> Result<MessageId, BrokerError> {
        let topic = room_topic(&msg.room);
        ensure_topic(&self.shared, &topic).await?;
        let payload = wire::encode_message(msg, false);
        let mut headers = OwnedHeaders::new();
        if let Some(tp) = &msg.traceparent {
            headers = headers.insert(Header {
                key: TRACEPARENT,
                value: Some(tp.as_bytes()),
            });
        }
        if let Some(scope) = scope {
            headers = headers.insert(Header {
                key: IDEMPOTENCY_HEADER,
                value: Some(scope.as_bytes()),
            });
        }
        let keyed = headers.count() > 0;
        let record = || {
            // One partition carries a room, so the room stays totally ordered.
            let record = FutureRecord::<(), _>::to(&topic)
                .partition(0)
                .payload(&payload);
            if keyed {
                record.headers(headers.clone())
            } else {
                record
            }
        };
        let (partition, offset) = self.shared.send(record).await?;
        self.shared.saw_record(&topic, offset);
        Ok(record_id(partition, offset))
    }

    /// A keyed publish. If its ack is lost (a timeout, a broker that stalled after taking the
    /// record), the key is left uncertain from the topic's end as last known here (an
    /// earlier ack; the log's start when none), and the retry looks for the record there
    /// instead of storing it twice.
    async fn publish_keyed(
        &self,
        msg: &RoomMessage,
        scope: &str,
    ) -> Result<MessageId, BrokerError> {
        let window = self.idempotency_window;
        let topic = room_topic(&msg.room);
        ensure_topic(&self.shared, &topic).await?;
        // Where the record will be at the earliest, known without asking Kafka (a round trip
        // here would also let keyed publishes overtake each other).
        let end = self.shared.known_end(&topic);
        // Longer than this claimer can hold it: the lock wait and the search (each within
        // publish_timeout), then the produce (within twice that).
        let terms = ClaimTerms {
            from: end,
            lease: self.shared.cfg.publish_timeout * 4 + Duration::from_secs(1),
            window,
        };
        let from = match self.idempotency.claim(scope, terms).await? {
            Claim::Repeat(id) => {
                crate::telemetry::metric::idempotent_repeat();
                return Ok(id);
            }
            Claim::InFlight => return Err(Claim::in_flight_error()),
            Claim::Uncertain(from) => match self.find_keyed(&topic, from, scope).await {
                Ok(Found::Record(id)) => {
                    crate::telemetry::metric::idempotent_repeat();
                    self.idempotency.complete(scope, id, window).await;
                    return Ok(id);
                }
                // Not stored: publish, still uncertain from the first attempt's position.
                Ok(Found::Nothing) => from,
                // The search did not finish: the next retry goes on from where it stopped.
                Ok(Found::NotYet(searched_to)) => {
                    self.idempotency.uncertain(scope, searched_to, window).await;
                    return Err(unavailable(
                        "could not check within kafka.publish_timeout whether an earlier attempt with this idempotency_key was stored",
                    ));
                }
                Err(e) => {
                    self.idempotency.uncertain(scope, from, window).await;
                    return Err(e);
                }
            },
            Claim::Fresh => end,
        };
        match self.produce(msg, Some(scope)).await {
            Ok(id) => {
                self.idempotency.complete(scope, id, window).await;
                Ok(id)
            }
            Err(e) => {
                self.idempotency.uncertain(scope, from, window).await;
                Err(e)
            }
        }
    }

    /// The record of `topic` at or after offset `from` that carries `scope`, if the log has
    /// one. Bounded by `kafka.publish_timeout`: a search that cannot finish says how far it
    /// got.
    async fn find_keyed(&self, topic: &str, from: u64, scope: &str) -> Result<Found, BrokerError> {
        let timeout = self.shared.cfg.publish_timeout;
        let (topic, scope) = (topic.to_string(), scope.to_string());
        // The wait for the reader is bounded too: the claim's lease counts on it.
        self.with_reader(Some(timeout), move |c| {
            search_keyed(c, &topic, from, &scope, timeout)
        })
        .await?
    }

    /// Runs `read` on the history reader, off the async runtime (librdkafka blocks), one read
    /// at a time; waits at most `wait` (when given) for the reads before it.
    async fn with_reader<T: Send + 'static>(
        &self,
        wait: Option<Duration>,
        read: impl FnOnce(&BaseConsumer<QuietContext>) -> T + Send + 'static,
    ) -> Result<T, BrokerError> {
        let mut reader = match wait {
            None => self.history.lock().await,
            Some(wait) => tokio::time::timeout(wait, self.history.lock())
                .await
                .map_err(|_| unavailable("the Kafka history reader is busy"))?,
        };
        let consumer = match reader.take() {
            Some(c) => c,
            None => self
                .shared
                .consumer_config
                .create_with_context::<_, BaseConsumer<QuietContext>>(QuietContext)
                .map_err(unavailable)?,
        };
        let (consumer, result) = tokio::task::spawn_blocking(move || {
            let result = read(&consumer);
            (consumer, result)
        })
        .await
        .map_err(|e| BrokerError::Other(e.to_string()))?;
        *reader = Some(consumer);
        Ok(result)
    }
}

/// What a search for a keyed record found.
enum Found {
    Record(MessageId),
    Nothing,
    /// Not found up to this offset when the time was up.
    NotYet(u64),
}

/// Reads `topic` from offset `from` to its end for a record whose idempotency header is
/// `scope`.
fn search_keyed(
    consumer: &BaseConsumer<QuietContext>,
    topic: &str,
    from: u64,
    scope: &str,
    timeout: Duration,
) -> Result<Found, BrokerError> {
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, timeout)
        .map_err(unavailable)?;
    let start = i64::try_from(from).unwrap_or(i64::MAX).max(low);
    if start >= high {
        return Ok(Found::Nothing);
    }
    let mut found = Found::Nothing;
    let next = read_range(consumer, topic, start..high, timeout, |m| {
        let keyed = m.headers().is_some_and(|h| {
            h.iter()
                .any(|h| h.key == IDEMPOTENCY_HEADER && h.value == Some(scope.as_bytes()))
        });
        if keyed {
            found = Found::Record(record_id(m.partition(), m.offset()));
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    })?;
    if matches!(found, Found::Nothing) && next < high {
        found = Found::NotYet(next.max(0) as u64);
    }
    Ok(found)
}

/// Runs `run` under a supervisor until the broker is dropped. The supervisor holds the shared
/// state weakly, so a dropped broker's tasks end instead of keeping it alive.
fn spawn_supervised<F, Fut>(
    task: &'static str,
    shared: &Arc<Shared>,
    run: F,
    on_fault: impl Fn() + Send + 'static,
) where
    F: Fn(Arc<Shared>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Exit> + Send + 'static,
{
    let weak = Arc::downgrade(shared);
    supervise::spawn(
        task,
        move || {
            let run = weak
                .upgrade()
                .filter(|s| !s.closed.load(Ordering::SeqCst))
                .map(&run);
            async move {
                match run {
                    Some(run) => run.await,
                    None => Exit::Done,
                }
            }
        },
        on_fault,
    );
}

fn create_producer(cfg: &KafkaConfig) -> Result<FutureProducer<QuietContext>, KafkaError> {
    let timeout_ms = cfg.publish_timeout.as_millis().to_string();
    let mut c = base_config(cfg);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        // Latency over batching: a message leaves at once.
        .set("linger.ms", "0")
        .set("message.timeout.ms", &timeout_ms);
    with_properties(c, cfg).create_with_context(QuietContext)
}

impl Shared {
    fn producer(&self) -> FutureProducer<QuietContext> {
        self.producer.lock().clone()
    }

    /// The earliest offset a record of `topic` produced from now on can get (0 when unknown).
    fn known_end(&self, topic: &str) -> u64 {
        self.known_ends.lock().get(topic).copied().unwrap_or(0)
    }

    fn saw_record(&self, topic: &str, offset: i64) {
        let next = offset.max(0) as u64 + 1;
        let mut ends = self.known_ends.lock();
        if let Some(end) = ends.get_mut(topic) {
            *end = (*end).max(next);
            return;
        }
        // Bounded: a forgotten topic only makes a rare search start earlier.
        if ends.len() >= MAX_KNOWN_ENDS {
            ends.clear();
        }
        ends.insert(topic.to_string(), next);
    }

    /// Sends the record `make` builds. A producer that an error left unusable is replaced, so
    /// records go out with a new producer id instead of failing forever: an idempotent
    /// producer whose in-flight record timed out (a lost ack) can be fenced by the broker, or
    /// end in a fatal state, and then refuses every record. A record the broker refused as
    /// fenced was not stored, so it is sent once more, on the new producer.
    async fn send<'a, K, P>(
        &self,
        make: impl Fn() -> FutureRecord<'a, K, P>,
    ) -> Result<(i32, i64), BrokerError>
    where
        K: rdkafka::message::ToBytes + ?Sized + 'a,
        P: rdkafka::message::ToBytes + ?Sized + 'a,
    {
        let producer = self.producer();
        let error = match producer.send(make(), self.cfg.publish_timeout).await {
            Ok(position) => return Ok(position),
            Err((e, _)) => e,
        };
        if !producer_is_broken(&producer, &error) {
            return Err(unavailable(error));
        }
        self.replace_producer(&producer, &error);
        let refused = matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch)
        );
        if !refused {
            return Err(unavailable(error));
        }
        self.producer()
            .send(make(), self.cfg.publish_timeout)
            .await
            .map_err(|(e, _)| unavailable(e))
    }

    /// Replaces `broken` with a new producer, unless another caller did already.
    fn replace_producer(&self, broken: &FutureProducer<QuietContext>, error: &KafkaError) {
        let mut current = self.producer.lock();
        if current.client().native_ptr() != broken.client().native_ptr() {
            return;
        }
        match create_producer(&self.cfg) {
            Ok(p) => {
                tracing::warn!(%error, "Kafka producer unusable; replaced with a new one");
                crate::telemetry::metric::broker_reconnect();
                *current = p;
            }
            Err(e) => tracing::warn!(error = %e, "cannot recreate the producer"),
        }
    }
}

/// Whether `producer` refuses every record from now on.
fn producer_is_broken(producer: &FutureProducer<QuietContext>, error: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    producer.client().fatal_error().is_some()
        || matches!(
            error.rdkafka_error_code(),
            Some(
                C::ProducerFenced
                    | C::InvalidProducerEpoch
                    | C::OutOfOrderSequenceNumber
                    | C::UnknownProducerId
                    | C::InvalidProducerIdMapping
                    | C::Fatal
            )
        )
}

/// Creates `topic` unless it is known to exist.
async fn ensure_topic(shared: &Shared, topic: &str) -> Result<(), BrokerError> {
    if shared.topics.lock().contains(topic) {
        return Ok(());
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(BrokerError::Other(format!(
            "room name too long for a Kafka topic ({} > {MAX_TOPIC_LEN} bytes once escaped)",
            topic.len()
        )));
    }
    let cfg = &shared.cfg;
    let retention = cfg.retention.as_millis().to_string();
    let new = NewTopic::new(
        topic,
        cfg.topic_partitions,
        TopicReplication::Fixed(cfg.replication_factor),
    )
    .set("retention.ms", &retention);
    let options = AdminOptions::new().operation_timeout(Some(cfg.publish_timeout));
    let results = shared
        .admin
        .create_topics([&new], &options)
        .await
        .map_err(unavailable)?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(unavailable(format!("cannot create topic {name}: {code}")));
            }
        }
    }
    shared.topics.lock().insert(topic.to_string());
    Ok(())
}

/// Low and high watermarks of partition 0, off the async runtime (librdkafka blocks).
async fn watermarks(
    consumer_config: ClientConfig,
    topic: String,
    timeout: Duration,
) -> Result<(i64, i64), BrokerError> {
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer<QuietContext> = consumer_config
            .create_with_context(QuietContext)
            .map_err(unavailable)?;
        consumer
            .fetch_watermarks(&topic, 0, timeout)
            .map_err(unavailable)
    })
    .await
    .map_err(|e| BrokerError::Other(e.to_string()))?
}

#[async_trait::async_trait]
impl Broker for KafkaBroker {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::SeqCst)
    }

    async fn publish(&self, msg: RoomMessage) -> Result<MessageId, BrokerError> {
        if !self.shared.ready.load(Ordering::SeqCst) {
            return Err(unavailable("Kafka is not reachable"));
        }
        match idempotency::scope(&msg) {
            Some(scope) => self.publish_keyed(&msg, &scope).await,
            None => self.produce(&msg, None).await,
        }
    }

    fn subscribe(&self, room: &RoomName) -> Subscribed {
        let (tx, rx) = oneshot::channel();
        let sent = self
            .commands
            .send(Command::Subscribe(room.clone(), tx))
            .is_ok();
        let limit = self.shared.cfg.publish_timeout;
        async move {
            if !sent {
                return Err(unavailable("Kafka consumer stopped"));
            }
            match tokio::time::timeout(limit, rx).await {
                Ok(Ok(result)) => result?,
                Ok(Err(_)) => return Err(unavailable("Kafka consumer stopped")),
                Err(_) => return Err(unavailable("Kafka subscription timed out")),
            }
            Ok(())
        }
        .boxed()
    }

    fn unsubscribe(&self, room: &RoomName) {
        let _ = self.commands.send(Command::Unsubscribe(room.clone()));
    }

    async fn history_after(
        &self,
        room: &RoomName,
        after: MessageId,
        limit: usize,
    ) -> Result<History, BrokerError> {
        let topic = room_topic(room);
        if !self.shared.topics.lock().contains(&topic) {
            ensure_topic(&self.shared, &topic).await?;
        }
        let timeout = self.shared.cfg.publish_timeout;
        let (records, gap) = self
            .with_reader(None, move |c| {
                read_history(c, &topic, after, limit, timeout)
            })
            .await??;
        let events = records
            .into_iter()
            .filter_map(|(offset, payload)| {
                let id = record_id(0, offset);
                match wire::decode_message(&payload, Some(room), Some(id)) {
                    Ok(event) => Some(Arc::new(event)),
                    Err(e) => {
                        wire::skip_bad_payload("kafka", "stored record", &e);
                        None
                    }
                }
            })
            .collect();
        Ok(History { events, gap })
    }

    async fn send_direct(&self, msg: DirectMessage) -> Result<(), BrokerError> {
        if !self.shared.ready.load(Ordering::SeqCst) {
            return Err(unavailable("Kafka is not reachable"));
        }
        ensure_topic(&self.shared, DIRECT_TOPIC).await?;
        let payload = wire::encode_direct(&msg);
        self.shared
            .send(|| {
                FutureRecord::to(DIRECT_TOPIC)
                    .key(msg.to.as_bytes())
                    .payload(&payload)
            })
            .await?;
        Ok(())
    }

    fn subscribe_user(&self, _user: &Arc<str>) -> Subscribed {
        // Every instance reads the whole direct topic; the hub keeps what is for its users.
        futures_util::future::ready(Ok(())).boxed()
    }

    fn unsubscribe_user(&self, _user: &Arc<str>) {}
}

/// Offsets and payloads after `after` on partition 0, the newest `limit`; `gap` when
/// retention removed some of them or `limit` cut them.
#[allow(clippy::type_complexity)]
fn read_history(
    consumer: &BaseConsumer<QuietContext>,
    topic: &str,
    after: MessageId,
    limit: usize,
    timeout: Duration,
) -> Result<(Vec<(i64, Vec<u8>)>, bool), BrokerError> {
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, timeout)
        .map_err(unavailable)?;
    let wanted = offset_after(after);
    let mut start = wanted.max(low);
    // A `since` past the log's end, or on another partition, names records the log no longer
    // has (a broker that lost its data, a topic recreated): what follows may be incomplete.
    let lost = after.hi != 0 || wanted > high;
    let mut gap = low > wanted || lost;
    if high - start > limit as i64 {
        start = high - limit as i64;
        gap = true;
    }
    let mut out = Vec::new();
    if start >= high {
        return Ok((out, gap));
    }
    let next = read_range(consumer, topic, start..high, timeout, |m| {
        out.push((m.offset(), m.payload().unwrap_or_default().to_vec()));
        ControlFlow::Continue(())
    })?;
    if next < high {
        return Err(unavailable("Kafka history read timed out"));
    }
    Ok((out, gap))
}

/// Reads the records of `topic` in `range` (partition 0) in order, each once, until `visit`
/// breaks, the range is read or `timeout` passes; the offset after the last record read.
fn read_range(
    consumer: &BaseConsumer<QuietContext>,
    topic: &str,
    range: std::ops::Range<i64>,
    timeout: Duration,
    mut visit: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> ControlFlow<()>,
) -> Result<i64, BrokerError> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(range.start))
        .map_err(unavailable)?;
    consumer.assign(&tpl).map_err(unavailable)?;
    let deadline = Instant::now() + timeout;
    let mut next = range.start;
    let mut result = Ok(());
    while next < range.end && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) if m.topic() == topic && (next..range.end).contains(&m.offset()) => {
                next = m.offset() + 1;
                if visit(&m).is_break() {
                    break;
                }
            }
            Some(Ok(_)) | None => {}
            Some(Err(e)) => {
                result = Err(unavailable(e));
                break;
            }
        }
    }
    let _ = consumer.unassign();
    result.map(|()| next)
}

/// Marks the broker ready while Kafka answers metadata requests and this instance's
/// self-probes come back through its consumer. A probe that does not come back within
/// `probe.timeout` restarts the consumer (a consumer that stopped reading while Kafka still
/// answers would otherwise deliver nothing with `/readyz` 200) and counts a missed probe.
async fn watch_health(shared: Arc<Shared>, commands: mpsc::UnboundedSender<Command>) -> Exit {
    let probe: Arc<BaseConsumer<QuietContext>> =
        match shared.consumer_config.create_with_context(QuietContext) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(error = %e, "cannot create the Kafka health probe");
                return Exit::Failed;
            }
        };
    let mut was_down = false;
    // Seq of the probe in flight and when it went out; the probes' verdict so far.
    let mut seq = shared.probe_seen.load(Ordering::SeqCst);
    let mut in_flight: Option<(u64, Instant)> = None;
    let mut last_sent: Option<Instant> = None;
    let mut probes_ok = false;
    loop {
        let client = probe.clone();
        let reachable = tokio::task::spawn_blocking(move || {
            client.fetch_metadata(None, Duration::from_secs(1)).is_ok()
        })
        .await
        .unwrap_or(false);
        if reachable {
            if let Some((sent, at)) = in_flight {
                if shared.probe_seen.load(Ordering::SeqCst) >= sent {
                    in_flight = None;
                    probes_ok = true;
                } else if at.elapsed() > shared.probe.timeout {
                    in_flight = None;
                    if probes_ok {
                        tracing::warn!("Kafka self-probe missed; restarting the consumer");
                    }
                    probes_ok = false;
                    crate::telemetry::metric::probe_missed();
                    let _ = commands.send(Command::Restart);
                }
            }
            // Only once the consumer reads the probe topic, so a probe cannot go by unread.
            if in_flight.is_none()
                && shared.consuming.load(Ordering::SeqCst)
                && last_sent.is_none_or(|t| t.elapsed() >= shared.probe.interval || !probes_ok)
            {
                seq += 1;
                last_sent = Some(Instant::now());
                if send_probe(&shared, seq).await.is_ok() {
                    in_flight = Some((seq, Instant::now()));
                } else {
                    probes_ok = false;
                }
            }
        } else {
            in_flight = None;
        }
        if reachable && was_down {
            // Topics may have to be created again (a broker that lost its data), and the
            // producer starts over with a new producer id.
            shared.topics.lock().clear();
            match create_producer(&shared.cfg) {
                Ok(p) => *shared.producer.lock() = p,
                Err(e) => tracing::warn!(error = %e, "cannot recreate the producer"),
            }
            let _ = commands.send(Command::Resync);
            was_down = false;
            tracing::info!("Kafka reachable");
        } else if !reachable && !was_down {
            was_down = true;
            tracing::warn!("Kafka unreachable");
            crate::telemetry::metric::broker_reconnect();
        }
        let ok = reachable && probes_ok;
        shared.ready.store(ok, Ordering::SeqCst);
        if shared.closed.load(Ordering::SeqCst) {
            return Exit::Done;
        }
        let pause = if in_flight.is_some() || !ok {
            100
        } else {
            1000
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// Writes self-probe `seq`, keyed by this instance's id.
async fn send_probe(shared: &Shared, seq: u64) -> Result<(), BrokerError> {
    ensure_topic(shared, PROBE_TOPIC).await?;
    let payload = seq.to_string();
    let record = || {
        FutureRecord::to(PROBE_TOPIC)
            .partition(0)
            .key(shared.instance_id.as_bytes())
            .payload(payload.as_bytes())
    };
    shared.send(record).await.map(|_| ())
}

/// What a partition carries.
#[derive(Clone)]
enum Feed {
    Room(RoomName),
    Direct,
    Probe,
}

/// Where the consumer stands in one partition.
#[derive(Clone)]
struct Position {
    feed: Feed,
    /// Next offset to deliver.
    next: i64,
    /// Fingerprint of the record at `next - 1`, to recognise a log that started over.
    last: Option<u64>,
}

fn fingerprint(payload: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    payload.hash(&mut h);
    h.finish()
}

/// The consumer task: owns the assignment and delivers what it reads.
/// One run of the consumer. After a fault the next run takes the rooms the gateway still
/// wants and reads each from the offset after its last delivered id.
async fn consume(shared: Arc<Shared>, commands: Handoff<mpsc::UnboundedReceiver<Command>>) -> Exit {
    let Some(mut commands) = commands.take() else {
        return Exit::Failed;
    };
    let consumer: StreamConsumer<QuietContext> =
        match shared.consumer_config.create_with_context(QuietContext) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot create the Kafka consumer");
                return Exit::Failed;
            }
        };
    // Where the previous run stopped, for the rooms still wanted; saved again however this
    // run ends (a panic included).
    let wanted = shared.sink.wanted();
    let mut positions = SavedPositions {
        shared: &shared,
        map: shared.positions.lock().clone(),
    };
    positions.map.retain(|_, p| match &p.feed {
        Feed::Room(room) => wanted.rooms.iter().any(|(r, _)| r == room),
        Feed::Direct | Feed::Probe => true,
    });
    let timeout = shared.cfg.publish_timeout;
    // Direct messages and self-probes: from the end, once the topics exist.
    for (topic, feed) in [(DIRECT_TOPIC, Feed::Direct), (PROBE_TOPIC, Feed::Probe)] {
        if positions.map.contains_key(topic) {
            continue;
        }
        loop {
            if ensure_topic(&shared, topic).await.is_ok()
                && let Ok((_, high)) =
                    watermarks(shared.consumer_config.clone(), topic.into(), timeout).await
            {
                positions.map.insert(
                    topic.into(),
                    Position {
                        feed,
                        next: high,
                        last: None,
                    },
                );
                break;
            }
            if shared.closed.load(Ordering::SeqCst) {
                return Exit::Done;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for (room, last) in wanted.rooms {
        let topic = room_topic(&room);
        if positions.map.contains_key(&topic) {
            continue;
        }
        let next = if last == MessageId::ZERO {
            let high = async {
                ensure_topic(&shared, &topic).await?;
                watermarks(shared.consumer_config.clone(), topic.clone(), timeout).await
            };
            match high.await {
                Ok((_, high)) => high,
                Err(e) => {
                    tracing::warn!(error = %e, topic, "cannot resume the room's topic");
                    return Exit::Failed;
                }
            }
        } else {
            offset_after(last)
        };
        positions.map.insert(
            topic,
            Position {
                feed: Feed::Room(room),
                next,
                last: None,
            },
        );
    }
    let positions = &mut positions.map;
    assign(&consumer, positions);
    shared.consuming.store(true, Ordering::SeqCst);
    // Set when the connection to Kafka failed: nothing is delivered until the positions are
    // checked against what the broker has now.
    let mut suspect = false;
    // Test-only (supervise::injected): this run stopped reading, as a stuck consumer would.
    let mut deaf = false;

    loop {
        tokio::select! {
            cmd = commands.recv() => match cmd {
                None => return Exit::Done,
                Some(Command::Subscribe(room, done)) => {
                    let topic = room_topic(&room);
                    if positions.contains_key(&topic) {
                        let _ = done.send(Ok(()));
                        continue;
                    }
                    // From the end: what is published after the join is delivered.
                    let start = async {
                        ensure_topic(&shared, &topic).await?;
                        watermarks(shared.consumer_config.clone(), topic.clone(), timeout).await
                    }
                    .await;
                    match start {
                        Ok((_, high)) => {
                            positions.insert(topic, Position { feed: Feed::Room(room), next: high, last: None });
                            assign(&consumer, positions);
                            let _ = done.send(Ok(()));
                        }
                        Err(e) => {
                            let _ = done.send(Err(e));
                        }
                    }
                }
                Some(Command::Unsubscribe(room)) => {
                    if positions.remove(&room_topic(&room)).is_some() {
                        assign(&consumer, positions);
                    }
                }
                Some(Command::Resync) => {
                    resync(&shared, positions).await;
                    assign(&consumer, positions);
                    suspect = false;
                }
                // A new run resumes every room after its last delivered id.
                Some(Command::Restart) => return Exit::Failed,
            },
            received = consumer.recv() => match received {
                Ok(m) => {
                    if suspect {
                        // This record is fetched again after the check and reassignment.
                        resync(&shared, positions).await;
                        assign(&consumer, positions);
                        suspect = false;
                        continue;
                    }
                    let Some(pos) = positions.get_mut(m.topic()) else { continue };
                    if let Feed::Room(room) = &pos.feed
                        && supervise::injected("deaf", room)
                    {
                        tracing::warn!("injected fault: the Kafka consumer stops reading");
                        deaf = true;
                    }
                    if deaf {
                        continue;
                    }
                    // Ids only grow per partition: below the position is a duplicate.
                    if m.offset() < pos.next {
                        continue;
                    }
                    pos.next = m.offset() + 1;
                    let payload = m.payload().unwrap_or_default();
                    pos.last = Some(fingerprint(payload));
                    match &pos.feed {
                        Feed::Room(room) => deliver_room(&shared, room, &m, payload),
                        Feed::Direct => deliver_direct(&shared, payload),
                        Feed::Probe => {
                            if m.key() == Some(shared.instance_id.as_bytes())
                                && let Some(seq) = std::str::from_utf8(payload).ok().and_then(|p| p.parse().ok())
                            {
                                shared.probe_seen.fetch_max(seq, Ordering::SeqCst);
                            }
                        }
                    }
                }
                Err(e) => {
                    suspect = true;
                    tracing::debug!(error = %e, "Kafka consumer error");
                }
            },
        }
    }
}

/// The consumer's positions, handed to the next run when this one ends.
struct SavedPositions<'a> {
    shared: &'a Shared,
    map: HashMap<String, Position>,
}

impl Drop for SavedPositions<'_> {
    fn drop(&mut self) {
        self.shared.consuming.store(false, Ordering::SeqCst);
        *self.shared.positions.lock() = std::mem::take(&mut self.map);
    }
}

/// After an outage: a partition whose log is gone, ends before our position, or holds another
/// record where we left off started over on a broker that lost its data; read it from its start.
async fn resync(shared: &Shared, positions: &mut HashMap<String, Position>) {
    let timeout = shared.cfg.publish_timeout;
    for (topic, pos) in positions.iter_mut() {
        if pos.next == 0 {
            continue;
        }
        let restarted =
            match watermarks(shared.consumer_config.clone(), topic.clone(), timeout).await {
                Err(_) => true,
                Ok((_, high)) if high < pos.next => true,
                Ok(_) => match pos.last {
                    None => false,
                    Some(last) => {
                        let found = record_at(
                            shared.consumer_config.clone(),
                            topic.clone(),
                            pos.next - 1,
                            timeout,
                        )
                        .await;
                        found.map(|p| fingerprint(&p)) != Some(last)
                    }
                },
            };
        if restarted {
            tracing::warn!(
                topic,
                from = pos.next,
                "partition started over; reading it from its start"
            );
            pos.next = 0;
            pos.last = None;
        }
    }
}

/// The payload of the record at `offset` of partition 0, if the broker has it.
async fn record_at(
    consumer_config: ClientConfig,
    topic: String,
    offset: i64,
    timeout: Duration,
) -> Option<Vec<u8>> {
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer<QuietContext> =
            consumer_config.create_with_context(QuietContext).ok()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Offset(offset))
            .ok()?;
        consumer.assign(&tpl).ok()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                if m.offset() == offset {
                    return Some(m.payload().unwrap_or_default().to_vec());
                }
                if m.offset() > offset {
                    return None;
                }
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// Assigns every wanted partition at its next offset (positions survive reassignment).
fn assign(consumer: &StreamConsumer<QuietContext>, positions: &HashMap<String, Position>) {
    let mut tpl = TopicPartitionList::new();
    for (topic, pos) in positions {
        if let Err(e) = tpl.add_partition_offset(topic, 0, Offset::Offset(pos.next)) {
            tracing::warn!(error = %e, topic, "cannot assign");
        }
    }
    if let Err(e) = consumer.assign(&tpl) {
        tracing::warn!(error = %e, "Kafka assignment failed");
    }
}

/// The id of the record at `offset` of `partition`.
fn record_id(partition: i32, offset: i64) -> MessageId {
    MessageId::new(partition.max(0) as u64, offset.max(0) as u64 + 1)
}

/// The first offset after the record with id `after` (`0-0`: the first offset).
fn offset_after(after: MessageId) -> i64 {
    i64::try_from(after.lo).unwrap_or(i64::MAX)
}

fn deliver_room<M: Message>(shared: &Shared, room: &RoomName, m: &M, payload: &[u8]) {
    crate::supervise::fault_point(room);
    let id = record_id(m.partition(), m.offset());
    let mut event: RoomEvent = match wire::decode_message(payload, Some(room), Some(id)) {
        Ok(event) => event,
        Err(e) => {
            wire::skip_bad_payload("kafka", "room message", &e);
            return;
        }
    };
    let traceparent = m.headers().and_then(|h| {
        h.iter()
            .find(|h| h.key == TRACEPARENT)
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .filter(|v| wire::valid_traceparent(v))
    });
    event.msg.traceparent = traceparent.map(String::from);
    // The record before this one in the room's partition (`0-0` before the first).
    event.prev = MessageId::new(id.hi, id.lo.saturating_sub(1));
    shared.sink.room_event(Arc::new(event));
}

fn deliver_direct(shared: &Shared, payload: &[u8]) {
    match wire::decode_direct(payload) {
        Ok(msg) => shared.sink.direct(Arc::new(msg)),
        Err(e) => wire::skip_bad_payload("kafka", "direct message", &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_escape_every_other_byte() {
        assert_eq!(room_topic("public:lobby"), "rt.room.public_3Alobby.v1");
        assert_eq!(room_topic("a.b_c@d-E9"), "rt.room.a_2Eb_5Fc_40d-E9.v1");
    }
}
