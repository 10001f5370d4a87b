//! Redis Cluster (`redis.cluster_nodes`): rooms spread over the masters by hash slot. Every
//! key and channel of a room carries the room as a hash tag (`rt:stream:{<room>}`,
//! `rt:room:{<room>}`), so the publish script runs atomically on the room's master, `WAIT`
//! goes to that master, and live copies use sharded Pub/Sub (`SPUBLISH`/`SSUBSCRIBE`), which
//! touches only the room's shard.
//!
//! One task owns the cluster connection and its pushes. redis-rs routes commands to the slot's
//! current master and follows `MOVED`, but it does not move a sharded subscription after a
//! failover (tests/redis_topology.rs), so the task subscribes every wanted channel again, and
//! catches each room up from its stream, whenever a node connection drops, the server
//! unsubscribes a channel (a slot moved), or its self-probe does not come back.

use std::collections::HashSet;
use std::sync::LazyLock;

use parking_lot::Mutex;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use redis::{PushInfo, PushKind};

use super::*;

/// The room (or user, or instance) as a hash tag: every key of it lands in one slot.
fn tag(s: &str) -> String {
    format!("{{{s}}}")
}

/// The heartbeat keys share one slot.
const INSTANCES: &str = "rt:{instances}";

fn instance_key(id: &str) -> String {
    format!("rt:{{instances}}:{id}")
}

/// A connection's presence entries in one room, per instance (same slot as the room).
fn presence_index(room: &str, instance: &str) -> String {
    format!("rt:presence-of:{}:{instance}", tag(room))
}

/// The rooms where an instance has presence entries (read when it is reaped).
fn presence_rooms(instance: &str) -> String {
    format!("rt:presence-rooms:{}", tag(instance))
}

static PUBLISH: LazyLock<String> =
    LazyLock::new(|| PUBLISH_SCRIPT.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'"));
static TRACK: LazyLock<String> =
    LazyLock::new(|| TRACK_SCRIPT.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'"));
static UNTRACK: LazyLock<String> =
    LazyLock::new(|| UNTRACK_SCRIPT.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'"));
static LIVE_INSTANCES: LazyLock<String> =
    LazyLock::new(|| INSTANCES_SCRIPT.replace("'rt:instances:'", "'rt:{instances}:'"));
static DIRECT: LazyLock<String> =
    LazyLock::new(|| DIRECT_SCRIPT.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'"));
static PROBE: LazyLock<String> =
    LazyLock::new(|| PROBE_SCRIPT.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'"));

/// Removes a dead instance's presence in one room and announces the leaves.
/// KEYS: presence hash, the instance's index in the room, room channel.
/// Returns the removed entries.
const REAP_ROOM_SCRIPT: &str = r#"
local out = {}
for _, conn in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local old = redis.call('HGET', KEYS[1], conn)
  if old then
    redis.call('HDEL', KEYS[1], conn)
    redis.call('SPUBLISH', KEYS[3], '{"type":"presence_diff","data":{"joins":[],"leaves":[' .. old .. ']}}')
    table.insert(out, old)
  end
end
redis.call('DEL', KEYS[2])
return out
"#;

enum Request {
    Room(RoomName, Option<oneshot::Sender<Result<(), BrokerError>>>),
    DropRoom(RoomName),
    User(Arc<str>, Option<oneshot::Sender<Result<(), BrokerError>>>),
    DropUser(Arc<str>),
}

struct ClusterShared {
    cfg: RedisConfig,
    heartbeat_ttl: Duration,
    instance_id: Arc<str>,
    sink: Arc<dyn Deliver>,
    conn: RwLock<Option<ClusterConnection>>,
    ready: AtomicBool,
    min_acks: u32,
    /// Subscribed rooms, with the last id delivered here.
    rooms: Mutex<HashMap<RoomName, MessageId>>,
    /// Users wanted, with the last direct message id delivered here.
    users: Mutex<HashMap<Arc<str>, MessageId>>,
    idempotency_window: Duration,
    probe_interval: Duration,
    probe_timeout: Duration,
    closed: AtomicBool,
    /// Slot ranges and the address of the master serving each (from `CLUSTER SLOTS`, refreshed
    /// between probe rounds): labels the per-shard publish latency.
    shards: RwLock<Vec<(u16, u16, Arc<str>)>>,
}

impl ClusterShared {
    /// The master that served `slot` at the last refresh (`"?"` before the first).
    fn shard_of(&self, slot: u16) -> Arc<str> {
        self.shards
            .read()
            .iter()
            .find(|(lo, hi, _)| (*lo..=*hi).contains(&slot))
            .map(|(_, _, addr)| addr.clone())
            .unwrap_or_else(|| Arc::from("?"))
    }
}

pub struct ClusterBroker {
    shared: Arc<ClusterShared>,
    requests: mpsc::UnboundedSender<Request>,
    /// Only the registry (presence, instances, occupancy) and idempotency keys of another
    /// message broker (Kafka): `watch` subscribes the room channel, which then carries only
    /// presence diffs.
    presence_only: bool,
}

impl Drop for ClusterBroker {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
    }
}

impl ClusterBroker {
    /// Starts the task that connects to the cluster; ready once its self-probe came back.
    pub fn start(
        cfg: RedisConfig,
        broker: &BrokerConfig,
        heartbeat_ttl: Duration,
        instance_id: Arc<str>,
        sink: Arc<dyn Deliver>,
    ) -> Self {
        let shared = Arc::new(ClusterShared {
            min_acks: cfg.min_replicas_ack.unwrap_or(1),
            cfg,
            heartbeat_ttl,
            instance_id,
            sink,
            conn: RwLock::new(None),
            ready: AtomicBool::new(false),
            rooms: Mutex::default(),
            users: Mutex::default(),
            idempotency_window: broker.idempotency_window,
            probe_interval: broker.probe_interval,
            probe_timeout: broker.probe_timeout,
            closed: AtomicBool::new(false),
            shards: RwLock::default(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let requests = Handoff::new(rx);
        let weak = Arc::downgrade(&shared);
        let down = weak.clone();
        supervise::spawn(
            "redis-cluster",
            move || {
                let weak = weak.clone();
                let requests = requests.clone();
                async move {
                    match weak.upgrade() {
                        Some(shared) => run(shared, requests).await,
                        None => Exit::Done,
                    }
                }
            },
            move || {
                if let Some(shared) = down.upgrade() {
                    shared.ready.store(false, Ordering::SeqCst);
                }
            },
        );
        Self {
            shared,
            requests: tx,
            presence_only: false,
        }
    }

    /// Serves as the registry and idempotency store of another broker (Kafka).
    pub fn presence_only(mut self) -> Self {
        self.presence_only = true;
        self
    }

    fn conn(&self) -> Result<ClusterConnection, BrokerError> {
        self.shared
            .conn
            .read()
            .clone()
            .ok_or_else(|| unavailable("no Redis Cluster connection"))
    }

    fn ask(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), BrokerError>>) -> Request,
    ) -> Subscribed {
        let (tx, rx) = oneshot::channel();
        let sent = self.requests.send(make(tx)).is_ok();
        let limit = self.shared.cfg.command_timeout * 5;
        async move {
            if !sent {
                return Err(unavailable("Redis Cluster task stopped"));
            }
            match tokio::time::timeout(limit, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(unavailable("Redis Cluster task stopped")),
                Err(_) => Err(unavailable("Redis Cluster subscription timed out")),
            }
        }
        .boxed()
    }

    /// Stores (with the idempotency check) and publishes on the room's master, in one script.
    async fn publish_on_shard(&self, msg: RoomMessage) -> Result<MessageId, BrokerError> {
        let mut conn = self.conn()?;
        let cfg = &self.shared.cfg;
        let room = tag(&msg.room);
        let stream = names::stream(&room);
        let payload = wire::encode_message(&msg, true);
        // The scope starts with the room: tagged, its key lands in the room's slot.
        let idempotency = idempotency::scope(&msg).map(|s| {
            let rest = s.strip_prefix(&*msg.room).unwrap_or(&s);
            names::idempotency(&format!("{room}{rest}"))
        });
        let min_acks = self.shared.min_acks;
        let publish_now = min_acks == 0;
        let mut eval = redis::cmd("EVAL");
        eval.arg(PUBLISH.as_str())
            .arg(if idempotency.is_some() { 4 } else { 3 })
            .arg(&stream)
            .arg(names::room_channel(&room))
            .arg(names::trimmed(&room));
        if let Some(key) = &idempotency {
            eval.arg(key);
        }
        eval.arg(cfg.stream_maxlen)
            .arg(cfg.stream_ttl.as_millis() as u64)
            .arg(&payload)
            .arg(if publish_now { 1 } else { 0 })
            .arg(self.shared.idempotency_window.as_millis() as u64);
        let (id, live, repeat): (String, String, i64) =
            eval.query_async(&mut conn).await.map_err(unavailable)?;
        let id: MessageId = id
            .parse()
            .map_err(|_| BrokerError::Other(format!("unexpected stream id {id}")))?;
        if repeat == 1 {
            crate::telemetry::metric::idempotent_repeat();
        }
        if !publish_now {
            let acked = wait_on_master(&mut conn, &stream, min_acks, cfg.wait_timeout)
                .await
                .map_err(unavailable)?;
            if acked < i64::from(min_acks) {
                return Err(unavailable(format!(
                    "{acked} of {min_acks} replicas confirmed the write in time"
                )));
            }
            if !live.is_empty() {
                let published: Result<i64, _> = redis::cmd("SPUBLISH")
                    .arg(names::room_channel(&room))
                    .arg(&live)
                    .query_async(&mut conn)
                    .await;
                if let Err(e) = published {
                    // Durable already: subscribers read it from the stream later.
                    tracing::warn!(error = %e, room = %msg.room, "live copy not published");
                }
            }
        }
        Ok(id)
    }
}

/// Idempotency keys for Kafka with a Cluster beside it: one key per scope, tagged by room.
#[async_trait::async_trait]
impl IdempotencyStore for ClusterBroker {
    async fn claim(&self, scope: &str, claim: ClaimTerms) -> Result<Claim, BrokerError> {
        let mut conn = self.conn()?;
        super::keyed::claim(&mut conn, &idempotency_key(scope), claim)
            .await
            .map_err(unavailable)
    }

    async fn complete(&self, scope: &str, id: MessageId, window: Duration) {
        if let Ok(mut conn) = self.conn() {
            super::keyed::complete(&mut conn, &idempotency_key(scope), id, window).await;
        }
    }

    async fn abandon(&self, scope: &str) {
        if let Ok(mut conn) = self.conn() {
            super::keyed::abandon(&mut conn, &idempotency_key(scope)).await;
        }
    }

    async fn uncertain(&self, scope: &str, from: u64, window: Duration) {
        if let Ok(mut conn) = self.conn() {
            super::keyed::uncertain(&mut conn, &idempotency_key(scope), from, window).await;
        }
    }
}

/// `rt:idem:{<scope>}`: any slot will do for a single key.
fn idempotency_key(scope: &str) -> String {
    names::idempotency(&tag(scope))
}

/// Occupancy keys on a Cluster: the room, user or instance as a hash tag.
const OCCUPANCY: occupancy::Keys = occupancy::Keys { tagged: true };

impl ClusterBroker {
    async fn live_ids(&self) -> Result<HashSet<String>, BrokerError> {
        Ok(Registry::instances(self)
            .await?
            .into_iter()
            .map(|i| i.id)
            .collect())
    }
}

/// `WAIT` on the master of `key`'s slot: the writes of this connection to that node.
async fn wait_on_master(
    conn: &mut ClusterConnection,
    key: &str,
    min_acks: u32,
    timeout: Duration,
) -> Result<i64, RedisError> {
    let mut wait = redis::cmd("WAIT");
    wait.arg(min_acks).arg(timeout.as_millis() as u64);
    let route = Route::with_slot(Slot::for_key(key), SlotAddr::Master);
    let reply = conn
        .route_command(
            wait,
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
        )
        .await?;
    Ok(redis::from_redis_value(reply)?)
}

#[async_trait::async_trait]
impl Broker for ClusterBroker {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::SeqCst)
    }

    async fn publish(&self, msg: RoomMessage) -> Result<MessageId, BrokerError> {
        let started = Instant::now();
        let slot = key_slot(&names::stream(&tag(&msg.room)));
        let published = self.publish_on_shard(msg).await;
        if published.is_ok() {
            let shard = self.shared.shard_of(slot);
            crate::telemetry::metric::shard_publish_latency(&shard, started.elapsed());
        }
        published
    }

    fn subscribe(&self, room: &RoomName) -> Subscribed {
        let room = room.clone();
        self.ask(move |done| Request::Room(room, Some(done)))
    }

    fn unsubscribe(&self, room: &RoomName) {
        let _ = self.requests.send(Request::DropRoom(room.clone()));
    }

    async fn history_after(
        &self,
        room: &RoomName,
        after: MessageId,
        limit: usize,
    ) -> Result<History, BrokerError> {
        let mut conn = self.conn()?;
        let tagged = tag(room);
        let history = read_history(&mut conn, room, &tagged, after, limit, &self.shared.cfg)
            .await
            .map_err(unavailable)?;
        if !history.events.is_empty() && !confirm(&self.shared, &mut conn, &tagged).await {
            return Err(unavailable(
                "the replicas did not confirm the history in time",
            ));
        }
        Ok(history)
    }

    async fn send_direct(&self, msg: DirectMessage) -> Result<(), BrokerError> {
        let mut conn = self.conn()?;
        let tagged = tag(&msg.to);
        // Kept a short while, so that an instance that was away delivers it on resubscribing.
        redis::cmd("EVAL")
            .arg(DIRECT.as_str())
            .arg(2)
            .arg(names::direct_stream(&tagged))
            .arg(names::user_channel(&tagged))
            .arg(self.shared.cfg.direct_maxlen)
            .arg(self.shared.cfg.direct_ttl.as_millis() as u64)
            .arg(wire::encode_direct(&msg))
            .query_async::<String>(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn subscribe_user(&self, user: &Arc<str>) -> Subscribed {
        let user = user.clone();
        self.ask(move |done| Request::User(user, Some(done)))
    }

    fn unsubscribe_user(&self, user: &Arc<str>) {
        let _ = self.requests.send(Request::DropUser(user.clone()));
    }
}

#[async_trait::async_trait]
impl Registry for ClusterBroker {
    fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::SeqCst)
    }

    /// The room's subscription carries its presence diffs (subscribed here when another
    /// broker carries the messages).
    fn watch(&self, room: &RoomName) -> Subscribed {
        if self.presence_only {
            Broker::subscribe(self, room)
        } else {
            futures_util::future::ready(Ok(())).boxed()
        }
    }

    fn unwatch(&self, room: &RoomName) {
        if self.presence_only {
            Broker::unsubscribe(self, room);
        }
    }

    async fn track(
        &self,
        room: &RoomName,
        entry: PresenceEntry,
        max_entries: usize,
    ) -> Result<Tracked, BrokerError> {
        let mut conn = self.conn()?;
        let stored = serde_json::to_string(&WirePresence {
            user_id: std::borrow::Cow::Borrowed(&entry.user_id),
            conn_id: std::borrow::Cow::Borrowed(&entry.conn_id),
            meta: &entry.meta,
        })
        .map_err(|e| BrokerError::Other(e.to_string()))?;
        let id = &self.shared.instance_id;
        // Listed first, so a reaper finds the room even if the entry's write is cut short.
        redis::cmd("SADD")
            .arg(presence_rooms(id))
            .arg(&**room)
            .query_async::<i64>(&mut conn)
            .await
            .map_err(unavailable)?;
        let tagged = tag(room);
        let stored: i64 = redis::cmd("EVAL")
            .arg(TRACK.as_str())
            .arg(3)
            .arg(names::presence(&tagged))
            .arg(presence_index(room, id))
            .arg(names::room_channel(&tagged))
            .arg(&*entry.conn_id)
            .arg(stored)
            .arg(&*entry.conn_id)
            .arg(max_entries)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(match stored {
            0 => Tracked::RoomFull,
            2 => Tracked::Replaced,
            _ => Tracked::Added,
        })
    }

    async fn untrack(&self, room: &RoomName, conn_id: &Arc<str>) -> Result<bool, BrokerError> {
        let mut conn = self.conn()?;
        let tagged = tag(room);
        let removed = redis::cmd("EVAL")
            .arg(UNTRACK.as_str())
            .arg(3)
            .arg(names::presence(&tagged))
            .arg(presence_index(room, &self.shared.instance_id))
            .arg(names::room_channel(&tagged))
            .arg(&**conn_id)
            .arg(&**conn_id)
            .query_async::<i64>(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(removed == 1)
    }

    async fn presence(&self, room: &RoomName) -> Result<Vec<PresenceEntry>, BrokerError> {
        let mut conn = self.conn()?;
        let values: Vec<String> = redis::cmd("HVALS")
            .arg(names::presence(&tag(room)))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(presence_entries(&values))
    }

    async fn heartbeat(&self, me: &InstanceInfo) -> Result<Reaped, BrokerError> {
        let mut conn = self.conn()?;
        let mut reaped = Reaped::default();
        let info = serde_json::to_string(me).map_err(|e| BrokerError::Other(e.to_string()))?;
        let dead: Vec<String> = redis::cmd("EVAL")
            .arg(HEARTBEAT_SCRIPT)
            .arg(2)
            .arg(INSTANCES)
            .arg(instance_key(&me.id))
            .arg(&me.id)
            .arg(self.shared.heartbeat_ttl.as_millis() as u64)
            .arg(info)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        for id in dead {
            // Whoever removes the instance first reaps its presence, room by room.
            let removed: i64 = redis::cmd("ZREM")
                .arg(INSTANCES)
                .arg(&id)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if removed == 0 {
                continue;
            }
            let rooms: Vec<String> = redis::cmd("SMEMBERS")
                .arg(presence_rooms(&id))
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            for room in &rooms {
                let tagged = tag(room);
                let entries: Vec<String> = redis::cmd("EVAL")
                    .arg(REAP_ROOM_SCRIPT)
                    .arg(3)
                    .arg(names::presence(&tagged))
                    .arg(presence_index(room, &id))
                    .arg(names::room_channel(&tagged))
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                for entry in &entries {
                    if let Some(left) = super::reaped_entry(room, entry) {
                        reaped.left.push(left);
                    }
                }
            }
            redis::cmd("DEL")
                .arg(presence_rooms(&id))
                .query_async::<i64>(&mut conn)
                .await
                .map_err(unavailable)?;
            reaped.vacated.extend(
                occupancy::reap(&mut conn, OCCUPANCY, &id)
                    .await
                    .map_err(unavailable)?,
            );
            tracing::info!(instance = %id, rooms = rooms.len(), "removed a dead instance's presence");
        }
        Ok(reaped)
    }

    async fn instances(&self) -> Result<Vec<InstanceInfo>, BrokerError> {
        let mut conn = self.conn()?;
        let infos: Vec<String> = redis::cmd("EVAL")
            .arg(LIVE_INSTANCES.as_str())
            .arg(1)
            .arg(INSTANCES)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(instance_infos(&infos))
    }

    async fn set_local_count(
        &self,
        who: &Occupant,
        count: usize,
    ) -> Result<Option<Edge>, BrokerError> {
        let mut conn = self.conn()?;
        occupancy::set_local_count(&mut conn, OCCUPANCY, &self.shared.instance_id, who, count)
            .await
            .map_err(unavailable)
    }

    async fn count(&self, who: &Occupant) -> Result<u64, BrokerError> {
        let live = self.live_ids().await?;
        let mut conn = self.conn()?;
        occupancy::count(&mut conn, OCCUPANCY, who, &live)
            .await
            .map_err(unavailable)
    }

    async fn rooms(&self, after: &str, limit: usize) -> Result<Vec<(RoomName, u64)>, BrokerError> {
        let live = self.live_ids().await?;
        let mut conn = self.conn()?;
        occupancy::rooms(&mut conn, OCCUPANCY, &live, after, limit)
            .await
            .map_err(unavailable)
    }
}

/// With replicas to wait for: a write in the room's slot after a read, confirmed by `WAIT`
/// on the same master, shows that what the read returned is replicated.
async fn confirm(shared: &ClusterShared, conn: &mut ClusterConnection, tagged: &str) -> bool {
    if shared.min_acks == 0 {
        return true;
    }
    let key = names::confirm_key(tagged);
    let set: Result<(), _> = redis::cmd("SET")
        .arg(&key)
        .arg(1)
        .arg("PX")
        .arg(shared.cfg.wait_timeout.as_millis().max(1000) as u64)
        .query_async(conn)
        .await;
    if set.is_err() {
        return false;
    }
    wait_on_master(conn, &key, shared.min_acks, shared.cfg.wait_timeout)
        .await
        .is_ok_and(|n| n >= i64::from(shared.min_acks))
}

fn client(
    cfg: &RedisConfig,
    pushes: mpsc::UnboundedSender<PushInfo>,
) -> RedisResult<ClusterConnectionClient> {
    let urls: Vec<String> = cfg
        .cluster_nodes
        .iter()
        .map(|n| format!("{}://{n}/?protocol=3", connect::node_scheme(cfg)))
        .collect();
    let mut builder = ClusterClientBuilder::new(urls)
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(pushes)
        .connection_timeout(cfg.command_timeout)
        .response_timeout(cfg.command_timeout);
    if !cfg.password.is_empty() {
        builder = builder.password(cfg.password.clone());
    }
    if cfg.tls {
        builder = builder.tls(redis::TlsMode::Secure);
    }
    if let Some(certs) = connect::tls_certificates(cfg)? {
        builder = builder.certs(certs);
    }
    builder.build()
}

type ClusterConnectionClient = redis::cluster::ClusterClient;
type RedisResult<T> = Result<T, RedisError>;

/// The cluster task: (re)connects, keeps every wanted channel subscribed, delivers pushes in
/// order, catches rooms up, and probes.
async fn run(
    shared: Arc<ClusterShared>,
    requests: Handoff<mpsc::UnboundedReceiver<Request>>,
) -> Exit {
    let Some(mut requests) = requests.take() else {
        return Exit::Failed;
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        if shared.closed.load(Ordering::SeqCst) {
            return Exit::Done;
        }
        let (tx, mut pushes) = mpsc::unbounded_channel();
        let connected = match client(&shared.cfg, tx) {
            Ok(c) => tokio::time::timeout(shared.cfg.command_timeout * 5, c.get_async_connection())
                .await
                .map_err(|_| io_timeout("cluster connect"))
                .and_then(|r| r),
            Err(e) => Err(e),
        };
        let mut conn = match connected {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "Redis Cluster unreachable; retrying");
                refuse_all(&mut requests);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        *shared.conn.write() = Some(conn.clone());
        tracing::info!(nodes = ?shared.cfg.cluster_nodes, "connected to Redis Cluster");
        serve(&shared, &mut conn, &mut pushes, &mut requests).await;
        shared.ready.store(false, Ordering::SeqCst);
        *shared.conn.write() = None;
        crate::telemetry::metric::broker_reconnect();
    }
}

/// While no connection exists, subscriptions are refused (the gateway retries the join).
fn refuse_all(requests: &mut mpsc::UnboundedReceiver<Request>) {
    while let Ok(r) = requests.try_recv() {
        match r {
            Request::Room(_, Some(done)) | Request::User(_, Some(done)) => {
                let _ = done.send(Err(unavailable("Redis Cluster unreachable")));
            }
            _ => {}
        }
    }
}

/// The self-probes: one channel per master (its hash tag picked in a slot range that master
/// serves), so a shard whose sharded subscription went silent is noticed, not just one.
#[derive(Default)]
struct Probes {
    /// Probe tag (`<instance>.<k>`) per master, refreshed from `CLUSTER SLOTS` between rounds.
    tags: Vec<String>,
    /// The masters' slot ranges the tags were picked for.
    ranges: Vec<(String, (u16, u16))>,
    seq: u64,
    /// Channels whose probe of round `seq` has not come back yet, and when the round began.
    pending: HashSet<String>,
    sent_at: Option<Instant>,
}

/// `host:port` of a node in a `CLUSTER SLOTS` entry (`[host, port, id, ...]`).
fn node_addr(node: &[Value]) -> String {
    let host = node
        .first()
        .and_then(|h| redis::from_redis_value_ref::<String>(h).ok())
        .unwrap_or_default();
    let port = node
        .get(1)
        .and_then(|p| redis::from_redis_value_ref::<u16>(p).ok())
        .unwrap_or_default();
    format!("{host}:{port}")
}

/// The slot of a key (the CRC16 of its hash tag, as Redis Cluster computes it).
fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match (
        key.find('{'),
        key.find('{').and_then(|o| key[o + 1..].find('}')),
    ) {
        (Some(open), Some(len)) if len > 0 => &bytes[open + 1..open + 1 + len],
        _ => bytes,
    };
    crc16::State::<crc16::XMODEM>::calculate(hashed) % 16384
}

impl Probes {
    /// One tag per slot range that a master serves (ranges of one master share its tag).
    async fn refresh(
        &mut self,
        shared: &ClusterShared,
        conn: &mut ClusterConnection,
    ) -> RedisResult<()> {
        let reply = conn
            .route_command(
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await?;
        let ranges: Vec<Vec<Value>> = redis::from_redis_value(reply)?;
        let mut masters: HashMap<String, (u16, u16)> = HashMap::new();
        let mut shards = Vec::new();
        for range in &ranges {
            let (Some(lo), Some(hi), Some(Value::Array(master))) =
                (range.first(), range.get(1), range.get(2))
            else {
                continue;
            };
            let (Ok(lo), Ok(hi)) = (
                redis::from_redis_value_ref::<u16>(lo),
                redis::from_redis_value_ref::<u16>(hi),
            ) else {
                continue;
            };
            let addr = node_addr(master);
            shards.push((lo, hi, Arc::from(addr.as_str())));
            masters.entry(addr).or_insert((lo, hi));
        }
        *shared.shards.write() = shards;
        let mut ranges: Vec<(String, (u16, u16))> = masters.into_iter().collect();
        ranges.sort();
        if ranges == self.ranges {
            return Ok(());
        }
        let mut tags = Vec::new();
        for (_, (lo, hi)) in &ranges {
            // About 16384 / range-width tries on average; bounded.
            let found = (0..200_000u32)
                .map(|k| format!("{}.{k}", shared.instance_id))
                .find(|t| (*lo..=*hi).contains(&key_slot(&tag(t))));
            if let Some(t) = found {
                tags.push(t);
            }
        }
        tags.sort();
        self.tags = tags;
        self.ranges = ranges;
        Ok(())
    }

    fn channels(&self) -> Vec<String> {
        self.tags.iter().map(|t| names::probe(&tag(t))).collect()
    }

    /// A probe message came back on `channel`; true if it belongs to this instance.
    fn came_back(&mut self, shared: &ClusterShared, channel: &str, payload: &[u8]) -> bool {
        let mine = untag(channel, "rt:probe:").is_some_and(|t| {
            t.strip_prefix(&*shared.instance_id)
                .is_some_and(|r| r.starts_with('.'))
        });
        if !mine {
            return false;
        }
        let seq = std::str::from_utf8(payload)
            .ok()
            .and_then(|p| p.parse::<u64>().ok());
        if seq.is_some_and(|s| s >= self.seq) {
            self.pending.remove(channel);
            if self.pending.is_empty() && self.sent_at.is_some() {
                self.sent_at = None;
                shared.ready.store(true, Ordering::SeqCst);
            }
        }
        true
    }
}

/// Serves one connection until the task should reconnect.
async fn serve(
    shared: &ClusterShared,
    conn: &mut ClusterConnection,
    pushes: &mut mpsc::UnboundedReceiver<PushInfo>,
    requests: &mut mpsc::UnboundedReceiver<Request>,
) {
    let mut resubscribe = true;
    let mut first = true;
    let mut probes = Probes::default();
    if let Err(e) = probes.refresh(shared, conn).await {
        tracing::warn!(error = %e, "cannot read the cluster's slots");
        return;
    }
    let mut tick = tokio::time::interval(shared.probe_interval.min(shared.probe_timeout) / 2);
    loop {
        if shared.closed.load(Ordering::SeqCst) {
            return;
        }
        if resubscribe {
            match resubscribe_all(shared, conn, &probes.channels()).await {
                Ok(()) => {
                    resubscribe = false;
                    if !std::mem::take(&mut first) {
                        crate::telemetry::metric::resubscribed();
                    }
                }
                Err(e) => {
                    shared.ready.store(false, Ordering::SeqCst);
                    tracing::debug!(error = %e, "resubscribing on the cluster");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        tokio::select! {
            request = requests.recv() => match request {
                None => return,
                Some(r) => {
                    if apply(shared, conn, r).await.is_err() {
                        resubscribe = true;
                    }
                }
            },
            push = pushes.recv() => match push {
                None => return,
                Some(push) => {
                    let failed = match push.kind {
                        PushKind::SMessage => {
                            on_push(shared, conn, &push.data, &mut probes).await.is_err()
                        }
                        // A node connection dropped.
                        PushKind::Disconnection => true,
                        // The server moved a wanted channel's slot away (not the confirmation
                        // of this instance's own SUNSUBSCRIBE: resubscribing every room on
                        // each leave cost O(rooms) SSUBSCRIBEs per leave).
                        PushKind::SUnsubscribe => still_wanted(shared, &push.data, &probes),
                        _ => false,
                    };
                    resubscribe |= failed;
                }
            },
            _ = tick.tick() => {
                if let Some(at) = probes.sent_at {
                    if at.elapsed() > shared.probe_timeout {
                        // A shard's subscription is silent: subscribe everything again.
                        crate::telemetry::metric::probe_missed();
                        shared.ready.store(false, Ordering::SeqCst);
                        probes.sent_at = None;
                        probes.pending.clear();
                        resubscribe = true;
                    }
                    continue;
                }
                // Between rounds: follow the masters, then probe each.
                let before = probes.tags.clone();
                if probes.refresh(shared, conn).await.is_err() {
                    shared.ready.store(false, Ordering::SeqCst);
                    continue;
                }
                if probes.tags != before {
                    resubscribe = true;
                    continue;
                }
                probes.seq += 1;
                let mut sent_all = true;
                for t in &probes.tags {
                    let sent: Result<Value, _> = redis::cmd("EVAL")
                        .arg(PROBE.as_str())
                        .arg(2)
                        .arg(names::probe_key(&tag(t)))
                        .arg(names::probe(&tag(t)))
                        .arg(probes.seq)
                        .arg(shared.probe_timeout.as_millis().max(1000) as u64)
                        .query_async(conn)
                        .await;
                    sent_all &= sent.is_ok();
                }
                if sent_all {
                    probes.pending = probes.channels().into_iter().collect();
                    probes.sent_at = Some(Instant::now());
                } else {
                    shared.ready.store(false, Ordering::SeqCst);
                }
            }
        }
    }
}

/// Subscribes every wanted channel again (where its slot is now), then catches each room up.
async fn resubscribe_all(
    shared: &ClusterShared,
    conn: &mut ClusterConnection,
    probe_channels: &[String],
) -> RedisResult<()> {
    for channel in probe_channels {
        conn.ssubscribe(channel).await?;
    }
    let rooms: Vec<RoomName> = shared.rooms.lock().keys().cloned().collect();
    for room in &rooms {
        conn.ssubscribe(names::room_channel(&tag(room))).await?;
    }
    let users: Vec<Arc<str>> = shared.users.lock().keys().cloned().collect();
    for user in &users {
        conn.ssubscribe(names::user_channel(&tag(user))).await?;
    }
    for room in &rooms {
        catch_up(shared, conn, room, None).await?;
    }
    for user in &users {
        catch_up_directs(shared, conn, user).await?;
    }
    // Messages were caught up from the streams; presence diffs have no stream.
    if !rooms.is_empty() {
        shared.sink.presence_stale(rooms);
    }
    Ok(())
}

async fn apply(
    shared: &ClusterShared,
    conn: &mut ClusterConnection,
    request: Request,
) -> RedisResult<()> {
    match request {
        Request::Room(room, done) => {
            let known = shared.rooms.lock().contains_key(&room);
            if known {
                if let Some(done) = done {
                    let _ = done.send(Ok(()));
                }
                return Ok(());
            }
            // From the stream's newest id: subscribe, then catch up what came in between.
            let tagged = tag(&room);
            let result = async {
                let newest: Vec<Value> = redis::cmd("XREVRANGE")
                    .arg(names::stream(&tagged))
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(conn)
                    .await?;
                let newest = parse_entries(&room, &newest)
                    .first()
                    .map_or(MessageId::ZERO, |e| e.id);
                shared.rooms.lock().insert(room.clone(), newest);
                conn.ssubscribe(names::room_channel(&tagged)).await?;
                catch_up(shared, conn, &room, None).await
            }
            .await;
            if result.is_err() {
                shared.rooms.lock().remove(&room);
            }
            if let Some(done) = done {
                let _ = done.send(result.as_ref().map(|_| ()).map_err(unavailable));
            }
            result
        }
        Request::DropRoom(room) => {
            shared.rooms.lock().remove(&room);
            conn.sunsubscribe(names::room_channel(&tag(&room))).await
        }
        Request::User(user, done) => {
            let known = shared.users.lock().contains_key(&user);
            let result = if known {
                Ok(())
            } else {
                // As for a room: the newest id, subscribe, then what came in between.
                let tagged = tag(&user);
                let result = async {
                    let newest = newest_stream_id(conn, &names::direct_stream(&tagged)).await?;
                    shared.users.lock().insert(user.clone(), newest);
                    conn.ssubscribe(names::user_channel(&tagged)).await?;
                    catch_up_directs(shared, conn, &user).await
                }
                .await;
                if result.is_err() {
                    // Still wanted: the resubscription this error leads to takes it (from the
                    // start of its short stream, where the newest id could not be read).
                    shared
                        .users
                        .lock()
                        .entry(user.clone())
                        .or_insert(MessageId::ZERO);
                }
                result
            };
            if let Some(done) = done {
                let _ = done.send(result.as_ref().map(|_| ()).map_err(unavailable));
            }
            result
        }
        Request::DropUser(user) => {
            shared.users.lock().remove(&user);
            conn.sunsubscribe(names::user_channel(&tag(&user))).await
        }
    }
}

/// `rt:room:{<room>}` → `<room>`.
fn untag<'a>(channel: &'a str, prefix: &str) -> Option<&'a str> {
    channel
        .strip_prefix(prefix)?
        .strip_prefix('{')?
        .strip_suffix('}')
}

/// Whether the channel of a `sunsubscribe` push (`[channel, count]`) is one this instance
/// still wants (a room or user with local members, or a probe channel).
fn still_wanted(shared: &ClusterShared, data: &[Value], probes: &Probes) -> bool {
    let Some(channel) = data
        .first()
        .and_then(|c| redis::from_redis_value_ref::<String>(c).ok())
    else {
        return true; // Unreadable: resubscribing is the safe side.
    };
    if let Some(room) = untag(&channel, names::ROOM_PREFIX) {
        return shared.rooms.lock().contains_key(room);
    }
    if let Some(user) = untag(&channel, names::USER_PREFIX) {
        return shared.users.lock().contains_key(user);
    }
    probes.channels().contains(&channel)
}

/// One sharded message: `[channel, payload]`.
async fn on_push(
    shared: &ClusterShared,
    conn: &mut ClusterConnection,
    data: &[Value],
    probes: &mut Probes,
) -> RedisResult<()> {
    let (Some(channel), Some(payload)) = (data.first(), data.get(1)) else {
        return Ok(());
    };
    let (Ok(channel), Ok(payload)) = (
        redis::from_redis_value_ref::<String>(channel),
        redis::from_redis_value_ref::<Vec<u8>>(payload),
    ) else {
        return Ok(());
    };
    if probes.came_back(shared, &channel, &payload) {
        return Ok(());
    }
    if let Some(room) = untag(&channel, names::ROOM_PREFIX) {
        let known = shared
            .rooms
            .lock()
            .get_key_value(room)
            .map(|(r, l)| (r.clone(), *l));
        let Some((room, last)) = known else {
            return Ok(());
        };
        if payload.starts_with(br#"{"type":"presence_diff""#) {
            if cfg!(debug_assertions) && supervise::injected("cut", &room) {
                // Test-only: the diff is lost and every channel subscribed again.
                return Err(io_timeout("injected: a presence diff lost"));
            }
            match wire::decode_presence_diff(&payload, &room) {
                Ok(diff) => shared.sink.presence(Arc::new(diff)),
                Err(e) => wire::skip_bad_payload("redis", "presence diff", &e),
            }
            return Ok(());
        }
        match wire::decode_live_message(&payload, Some(&room), None) {
            Ok((event, Some(prev))) if prev > last && event.id > last => {
                // An earlier message never arrived live: read it from the stream first.
                catch_up(shared, conn, &room, Some(event.id)).await?;
                deliver(shared, event);
            }
            Ok((event, _)) => deliver(shared, event),
            Err(e) => wire::skip_bad_payload("redis", "room message", &e),
        }
    } else if let Some(user) = untag(&channel, names::USER_PREFIX) {
        if cfg!(debug_assertions) && supervise::injected("cut-direct", user) {
            // Test-only: the direct message is lost and every channel subscribed again.
            return Err(io_timeout("injected: a direct message lost"));
        }
        match wire::decode_live_direct(&payload) {
            Ok((msg, id)) => {
                let new = {
                    let mut users = shared.users.lock();
                    should_deliver_direct(&mut users, user, id, &msg, DirectFrom::Live)
                };
                if new {
                    shared.sink.direct(Arc::new(msg));
                }
            }
            Err(e) => wire::skip_bad_payload("redis", "direct message", &e),
        }
    }
    Ok(())
}

/// Delivers the direct messages `user`'s stream kept after the last one delivered here (see
/// the single-node subscriber).
async fn catch_up_directs(
    shared: &ClusterShared,
    conn: &mut ClusterConnection,
    user: &Arc<str>,
) -> RedisResult<()> {
    let Some(last) = shared.users.lock().get(user).copied() else {
        return Ok(());
    };
    let entries: Vec<Value> = redis::cmd("XRANGE")
        .arg(names::direct_stream(&tag(user)))
        .arg(format!("({last}"))
        .arg("+")
        .arg("COUNT")
        .arg(shared.cfg.direct_maxlen.saturating_mul(2))
        .query_async(conn)
        .await?;
    for (id, msg) in parse_directs(&entries) {
        let new = {
            let mut users = shared.users.lock();
            should_deliver_direct(&mut users, user, Some(id), &msg, DirectFrom::Stream)
        };
        if new {
            shared.sink.direct(Arc::new(msg));
        }
    }
    Ok(())
}

/// Delivers a room event unless it was delivered already (ids only grow per room); the last
/// id delivered here is the one before it (see the single-node subscriber).
fn deliver(shared: &ClusterShared, mut event: RoomEvent) {
    {
        let mut rooms = shared.rooms.lock();
        let Some(last) = rooms.get_mut(&event.msg.room) else {
            return;
        };
        if event.id <= *last {
            return;
        }
        event.prev = *last;
        *last = event.id;
    }
    shared.sink.room_event(Arc::new(event));
}

/// Reads what the room's stream holds after the last delivered id (through `through`) and
/// delivers it, once the replicas confirm it; announces messages trimmed meanwhile.
async fn catch_up(
    shared: &ClusterShared,
    conn: &mut ClusterConnection,
    room: &RoomName,
    through: Option<MessageId>,
) -> RedisResult<()> {
    const PAGE: usize = 500;
    let tagged = tag(room);
    let last = shared.rooms.lock().get(room).copied();
    if let Some(last) = last
        && last != MessageId::ZERO
    {
        let trimmed: Option<String> = redis::cmd("GET")
            .arg(names::trimmed(&tagged))
            .query_async(conn)
            .await?;
        if trimmed
            .and_then(|t| t.parse::<MessageId>().ok())
            .is_some_and(|t| t > last)
        {
            crate::telemetry::metric::catch_up_lost();
            shared.sink.lost(room, last);
        }
    }
    for _ in 0..1000 {
        let last = shared.rooms.lock().get(room).copied();
        let Some(last) = last else {
            return Ok(());
        };
        if through.is_some_and(|t| t <= last) {
            return Ok(());
        }
        let entries: Vec<Value> = redis::cmd("XRANGE")
            .arg(names::stream(&tagged))
            .arg(format!("({last}"))
            .arg(through.map_or_else(|| "+".to_string(), |t| t.to_string()))
            .arg("COUNT")
            .arg(PAGE)
            .query_async(conn)
            .await?;
        let events = parse_entries(room, &entries);
        if !events.is_empty() && !confirm(shared, conn, &tagged).await {
            return Err(io_timeout("replica confirmation of the catch-up"));
        }
        for event in events {
            deliver(shared, event);
        }
        if entries.len() < PAGE {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rooms_keys_share_its_hash_tag() {
        let room = tag("public:lobby");
        assert_eq!(names::stream(&room), "rt:stream:{public:lobby}");
        assert_eq!(names::room_channel(&room), "rt:room:{public:lobby}");
        assert_eq!(
            presence_index("public:lobby", "i1"),
            "rt:presence-of:{public:lobby}:i1"
        );
        assert_eq!(
            untag("rt:room:{public:lobby}", names::ROOM_PREFIX),
            Some("public:lobby")
        );
        assert_eq!(
            Slot::for_key(names::stream(&room)),
            Slot::for_key(names::room_channel(&room))
        );
        assert!(
            PUBLISH.contains("redis.call('SPUBLISH'") && !PUBLISH.contains("redis.call('PUBLISH'")
        );
        assert!(LIVE_INSTANCES.contains("'rt:{instances}:'"));
        // Redis's own examples: CLUSTER KEYSLOT.
        assert_eq!(key_slot("123456789"), 12739);
        assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
        assert_eq!(
            key_slot("rt:stream:{public:lobby}"),
            key_slot("public:lobby")
        );
    }
}
