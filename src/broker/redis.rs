//! Redis broker: Pub/Sub for live fan-out, Streams for history and gapless recovery, master and
//! replicas found through Sentinel (or one `redis.url`), heartbeats and presence in Redis.
//!
//! One supervisor task per instance owns the Pub/Sub connection. It (re)discovers the master,
//! resubscribes every room after a reconnect and replays from each room's stream whatever was
//! written after the last id it delivered, so subscribers see no gap and no duplicate across a
//! failover. Publishes go through a multiplexed command connection; with `WAIT` the ack waits
//! for replicas, so an acked message survives the master's loss.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use parking_lot::RwLock;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use redis::aio::{MultiplexedConnection, PubSubSink};
use redis::{AsyncConnectionConfig, Client, RedisError, Value};
use serde::Deserialize;
use tokio::sync::{Notify, mpsc, oneshot};

use super::idempotency::{self, Claim, IdempotencyStore};
use super::wire::{self, WirePresence};
use super::{
    Broker, BrokerError, Deliver, DirectMessage, History, InstanceInfo, MessageId, PresenceEntry,
    RoomEvent, RoomMessage, RoomName, Subscribed, Tracked,
};
use crate::config::{BrokerConfig, RedisConfig};
use crate::supervise::{self, Exit, Handoff};

/// Key and channel names (PROTOCOL.md, "Broker naming").
mod names {
    pub fn room_channel(room: &str) -> String {
        format!("rt:room:{room}")
    }
    pub fn stream(room: &str) -> String {
        format!("rt:stream:{room}")
    }
    pub fn user_channel(user: &str) -> String {
        format!("rt:user:{user}")
    }
    /// The newest id trimmed out of a room's stream.
    pub fn trimmed(room: &str) -> String {
        format!("rt:trimmed:{room}")
    }
    pub fn presence(room: &str) -> String {
        format!("rt:presence:{room}")
    }
    /// A publish's idempotency key, scoped by room and sender (see `idempotency::scope`).
    pub fn idempotency(scope: &str) -> String {
        format!("rt:idem:{scope}")
    }
    pub fn presence_index(instance: &str) -> String {
        format!("rt:presence-of:{instance}")
    }
    pub const INSTANCES: &str = "rt:instances";
    pub fn instance(id: &str) -> String {
        format!("rt:instances:{id}")
    }
    /// Each instance's own self-probe channel.
    pub fn probe(instance: &str) -> String {
        format!("rt:probe:{instance}")
    }
    /// The key the self-probe writes.
    pub fn probe_key(instance: &str) -> String {
        format!("rt:probe-seq:{instance}")
    }
    /// The key written to confirm that what was just read is replicated.
    pub fn confirm_key(instance: &str) -> String {
        format!("rt:confirm:{instance}")
    }
    pub const ROOM_PREFIX: &str = "rt:room:";
    pub const USER_PREFIX: &str = "rt:user:";
}

/// Checks the idempotency key, stores, trims, expires and (with `publish_now`) publishes, in one
/// step. The live copy carries the stream id, so the live id and the history id are the same,
/// and the id stored before it (`prev`), so a subscriber that missed a live copy notices and
/// reads it from the stream. Trimming is exact and remembers the newest id it removed, so a
/// `since` older than the history is reported as a gap.
/// A repeated idempotency key stores nothing and answers the first id, with that entry's live
/// copy while it is retained (publishing it again is harmless: subscribers drop ids they had).
/// KEYS: stream, channel, trimmed-id key[, idempotency key].
/// ARGV: maxlen, ttl ms, payload, publish_now (1 or 0), idempotency window ms.
/// Returns {id, live copy or '' once published, 1 if a repeat else 0}.
const PUBLISH_SCRIPT: &str = r#"
if KEYS[4] then
  local first = redis.call('GET', KEYS[4])
  if first then
    local live = ''
    local e = redis.call('XRANGE', KEYS[1], first, first)
    if #e > 0 then
      local f = e[1][2]
      for i = 1, #f, 2 do
        if f[i] == 'm' then live = '{"id":"' .. first .. '",' .. string.sub(f[i + 1], 2) end
      end
    end
    if live ~= '' and ARGV[4] == '1' then
      redis.call('PUBLISH', KEYS[2], live)
      live = ''
    end
    return {first, live, 1}
  end
end
local maxlen = tonumber(ARGV[1])
local over = redis.call('XLEN', KEYS[1]) - maxlen + 1
if over > 0 then
  local gone = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', over)
  redis.call('SET', KEYS[3], gone[#gone][1], 'PX', ARGV[2])
end
local prev = '0-0'
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then prev = last[1][1] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', maxlen, '*', 'm', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if KEYS[4] then redis.call('SET', KEYS[4], id, 'PX', ARGV[5]) end
-- The live copy is the stored JSON with the stream ids in front.
local live = '{"id":"' .. id .. '","prev":"' .. prev .. '",' .. string.sub(ARGV[3], 2)
if ARGV[4] == '1' then
  redis.call('PUBLISH', KEYS[2], live)
  return {id, '', 0}
end
return {id, live, 0}
"#;

/// The self-probe: a write and a publish, so that a node that can no longer take writes (a
/// demoted master) fails it like one whose subscription went deaf.
/// KEYS: probe key, probe channel. ARGV: sequence number, ttl ms.
const PROBE_SCRIPT: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('PUBLISH', KEYS[2], ARGV[1])
";

/// Adds or replaces a connection's presence and announces the diff on the room channel, unless
/// the room holds ARGV[4] other entries already (then returns 0).
/// KEYS: presence hash, instance index, room channel. ARGV: conn id, entry JSON, index member,
/// most entries.
const TRACK_SCRIPT: &str = r#"
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
local leaves = ''
if old then leaves = old end
redis.call('PUBLISH', KEYS[3], '{"type":"presence_diff","data":{"joins":[' .. ARGV[2] .. '],"leaves":[' .. leaves .. ']}}')
return 1
"#;

/// Removes a connection's presence, if any, and announces the diff.
const UNTRACK_SCRIPT: &str = r#"
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
if not old then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('PUBLISH', KEYS[3], '{"type":"presence_diff","data":{"joins":[],"leaves":[' .. old .. ']}}')
return 1
"#;

/// Records a heartbeat by the server's clock and returns the ids whose heartbeat expired.
/// KEYS: instance set, instance info key. ARGV: id, ttl ms, info JSON.
const HEARTBEAT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
";

/// Live instances' info, by the server's clock.
const INSTANCES_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
local out = {}
for _, id in ipairs(ids) do
  local info = redis.call('GET', 'rt:instances:' .. id)
  if info then table.insert(out, info) end
end
return out
";

/// Removes a dead instance's presence (once, whoever gets there first) and announces leaves.
const REAP_SCRIPT: &str = r#"
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
local index = 'rt:presence-of:' .. ARGV[1]
for _, member in ipairs(redis.call('SMEMBERS', index)) do
  local nl = string.find(member, '\n', 1, true)
  local room = string.sub(member, 1, nl - 1)
  local conn = string.sub(member, nl + 1)
  local hash = 'rt:presence:' .. room
  local old = redis.call('HGET', hash, conn)
  if old then
    redis.call('HDEL', hash, conn)
    redis.call('PUBLISH', 'rt:room:' .. room, '{"type":"presence_diff","data":{"joins":[],"leaves":[' .. old .. ']}}')
  end
end
redis.call('DEL', index)
return 1
"#;

/// What the supervisor is asked to do with subscriptions, in the order the gateway asked.
enum Command {
    SubscribeRoom(RoomName, oneshot::Sender<Result<(), BrokerError>>),
    UnsubscribeRoom(RoomName),
    SubscribeUser(Arc<str>, oneshot::Sender<Result<(), BrokerError>>),
    UnsubscribeUser(Arc<str>),
}

struct Shared {
    cfg: RedisConfig,
    /// An instance whose heartbeat is older than this is dead.
    heartbeat_ttl: Duration,
    instance_id: Arc<str>,
    sink: Arc<dyn Deliver>,
    /// Command connection to the current master; `None` while there is none.
    master: RwLock<Option<MultiplexedConnection>>,
    /// A replica for history reads, when configured and available.
    replica: RwLock<Option<MultiplexedConnection>>,
    ready: AtomicBool,
    /// Replicas each publish waits for (resolved at connect time).
    min_acks: AtomicU32,
    /// Anyone who sees the master fail asks the supervisor to rediscover it.
    reconnect: Notify,
    idempotency_window: Duration,
    probe_interval: Duration,
    probe_timeout: Duration,
}

pub struct RedisBroker {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// Errors that mean the master is gone or demoted: rediscover it.
fn is_connection_failure(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_unrecoverable_error()
        || matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"))
}

impl RedisBroker {
    /// Starts the supervisor; the broker reports ready once a master is connected.
    pub fn start(
        cfg: RedisConfig,
        broker: &BrokerConfig,
        heartbeat_ttl: Duration,
        instance_id: Arc<str>,
        sink: Arc<dyn Deliver>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            cfg,
            heartbeat_ttl,
            instance_id,
            sink,
            master: RwLock::new(None),
            replica: RwLock::new(None),
            ready: AtomicBool::new(false),
            min_acks: AtomicU32::new(0),
            reconnect: Notify::new(),
            idempotency_window: broker.idempotency_window,
            probe_interval: broker.probe_interval,
            probe_timeout: broker.probe_timeout,
        });
        let commands = Handoff::new(rx);
        let run = shared.clone();
        let down = shared.clone();
        supervise::spawn(
            "redis-subscriber",
            move || supervise(run.clone(), commands.clone()),
            move || {
                down.ready.store(false, Ordering::SeqCst);
                *down.master.write() = None;
                *down.replica.write() = None;
            },
        );
        Self {
            shared,
            commands: tx,
        }
    }

    fn master(&self) -> Result<MultiplexedConnection, BrokerError> {
        self.shared
            .master
            .read()
            .clone()
            .ok_or_else(|| unavailable("no Redis master connected"))
    }

    /// Maps a command error, asking for a reconnect when the master is the problem.
    fn failed(&self, e: RedisError) -> BrokerError {
        if is_connection_failure(&e) {
            self.shared.ready.store(false, Ordering::SeqCst);
            self.shared.reconnect.notify_one();
        }
        unavailable(e)
    }

    fn send_command(&self, cmd: Command) -> bool {
        self.commands.send(cmd).is_ok()
    }

    fn waiter(&self, rx: oneshot::Receiver<Result<(), BrokerError>>, sent: bool) -> Subscribed {
        // Bounded: during an outage a join is refused rather than left hanging.
        let limit = self.shared.cfg.command_timeout * 5;
        async move {
            if !sent {
                return Err(unavailable("Redis supervisor stopped"));
            }
            match tokio::time::timeout(limit, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(unavailable("Redis supervisor stopped")),
                Err(_) => Err(unavailable("Redis subscription timed out")),
            }
        }
        .boxed()
    }
}

#[async_trait::async_trait]
impl Broker for RedisBroker {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::SeqCst)
    }

    async fn publish(&self, msg: RoomMessage) -> Result<MessageId, BrokerError> {
        let mut conn = self.master()?;
        let payload = wire::encode_message(&msg, true);
        let cfg = &self.shared.cfg;
        let min_acks = self.shared.min_acks.load(Ordering::Relaxed);
        let idempotency = idempotency::scope(&msg).map(|s| names::idempotency(&s));
        // With replicas to wait for, the live copy goes out only once they confirmed the
        // write: nobody sees a message that a failover could erase from history.
        let publish_now = min_acks == 0;
        let mut pipe = redis::pipe();
        let eval = pipe
            .cmd("EVAL")
            .arg(PUBLISH_SCRIPT)
            .arg(if idempotency.is_some() { 4 } else { 3 })
            .arg(names::stream(&msg.room))
            .arg(names::room_channel(&msg.room))
            .arg(names::trimmed(&msg.room));
        if let Some(key) = &idempotency {
            eval.arg(key);
        }
        eval.arg(cfg.stream_maxlen)
            .arg(cfg.stream_ttl.as_millis() as u64)
            .arg(&payload)
            .arg(if publish_now { 1 } else { 0 })
            .arg(self.shared.idempotency_window.as_millis() as u64);
        if !publish_now {
            pipe.cmd("WAIT")
                .arg(min_acks)
                .arg(cfg.wait_timeout.as_millis() as u64);
        }
        let replies: Vec<Value> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        let (id, live, repeat): (String, String, i64) = replies
            .first()
            .and_then(|v| redis::from_redis_value_ref(v).ok())
            .ok_or_else(|| BrokerError::Other("unexpected publish script reply".into()))?;
        let id: MessageId = id
            .parse()
            .map_err(|_| BrokerError::Other(format!("unexpected stream id {id}")))?;
        if repeat == 1 {
            crate::telemetry::metric::idempotent_repeat();
        }
        if !publish_now {
            let acked: i64 = replies
                .get(1)
                .and_then(|v| redis::from_redis_value_ref(v).ok())
                .unwrap_or(0);
            if acked < i64::from(min_acks) {
                // Stored on the master, not confirmed, not published: it may not survive a
                // failover. A retry with the same idempotency key publishes it once confirmed;
                // if it survives, the room's next message leads subscribers to it.
                return Err(unavailable(format!(
                    "{acked} of {min_acks} replicas confirmed the write in time"
                )));
            }
            if !live.is_empty() {
                let published: Result<i64, _> = redis::cmd("PUBLISH")
                    .arg(names::room_channel(&msg.room))
                    .arg(&live)
                    .query_async(&mut conn)
                    .await;
                if let Err(e) = published {
                    // Durable already, so the publish stands: subscribers read it from the
                    // stream when they reconnect or when the room's next message arrives.
                    tracing::warn!(error = %e, room = %msg.room, "live copy not published");
                    let _ = self.failed(e);
                }
            }
        }
        Ok(id)
    }

    fn subscribe(&self, room: &RoomName) -> Subscribed {
        let (tx, rx) = oneshot::channel();
        let sent = self.send_command(Command::SubscribeRoom(room.clone(), tx));
        self.waiter(rx, sent)
    }

    fn unsubscribe(&self, room: &RoomName) {
        self.send_command(Command::UnsubscribeRoom(room.clone()));
    }

    async fn history_after(
        &self,
        room: &RoomName,
        after: MessageId,
        limit: usize,
    ) -> Result<History, BrokerError> {
        let replica = if self.shared.cfg.read_from_replicas {
            self.shared.replica.read().clone()
        } else {
            None
        };
        let mut history = match replica {
            Some(mut conn) => read_history(&mut conn, room, after, limit, &self.shared.cfg)
                .await
                .ok(),
            None => None,
        };
        // The master has the newest tail a replica may not have yet.
        let mut master = self.master()?;
        match &mut history {
            Some(h) => {
                let from = h.events.last().map_or(after, |e| e.id);
                let tail = read_history(&mut master, room, from, limit, &self.shared.cfg)
                    .await
                    .map_err(|e| self.failed(e))?;
                h.events.extend(tail.events);
                if h.events.len() > limit {
                    let extra = h.events.len() - limit;
                    h.events.drain(..extra);
                    h.gap = true;
                }
            }
            None => {
                history = Some(
                    read_history(&mut master, room, after, limit, &self.shared.cfg)
                        .await
                        .map_err(|e| self.failed(e))?,
                );
            }
        }
        if history.as_ref().is_some_and(|h| !h.events.is_empty()) {
            match confirm_read(&self.shared, &mut master).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(unavailable(
                        "the replicas did not confirm the history in time",
                    ));
                }
                Err(e) => return Err(self.failed(e)),
            }
        }
        Ok(history.unwrap_or_default())
    }

    async fn send_direct(&self, msg: DirectMessage) -> Result<(), BrokerError> {
        let mut conn = self.master()?;
        let payload = wire::encode_direct(&msg);
        redis::cmd("PUBLISH")
            .arg(names::user_channel(&msg.to))
            .arg(payload)
            .query_async::<i64>(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(())
    }

    fn subscribe_user(&self, user: &Arc<str>) -> Subscribed {
        let (tx, rx) = oneshot::channel();
        let sent = self.send_command(Command::SubscribeUser(user.clone(), tx));
        self.waiter(rx, sent)
    }

    fn unsubscribe_user(&self, user: &Arc<str>) {
        self.send_command(Command::UnsubscribeUser(user.clone()));
    }

    async fn track(
        &self,
        room: &RoomName,
        entry: PresenceEntry,
        max_entries: usize,
    ) -> Result<Tracked, BrokerError> {
        let mut conn = self.master()?;
        let stored = serde_json::to_string(&WirePresence {
            user_id: std::borrow::Cow::Borrowed(&entry.user_id),
            conn_id: std::borrow::Cow::Borrowed(&entry.conn_id),
            meta: &entry.meta,
        })
        .map_err(|e| BrokerError::Other(e.to_string()))?;
        let stored = redis::cmd("EVAL")
            .arg(TRACK_SCRIPT)
            .arg(3)
            .arg(names::presence(room))
            .arg(names::presence_index(&self.shared.instance_id))
            .arg(names::room_channel(room))
            .arg(&*entry.conn_id)
            .arg(stored)
            .arg(format!("{room}\n{}", entry.conn_id))
            .arg(max_entries)
            .query_async::<i64>(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(if stored == 1 {
            Tracked::Stored
        } else {
            Tracked::RoomFull
        })
    }

    async fn untrack(&self, room: &RoomName, conn_id: &Arc<str>) -> Result<(), BrokerError> {
        let mut conn = self.master()?;
        redis::cmd("EVAL")
            .arg(UNTRACK_SCRIPT)
            .arg(3)
            .arg(names::presence(room))
            .arg(names::presence_index(&self.shared.instance_id))
            .arg(names::room_channel(room))
            .arg(&**conn_id)
            .arg(format!("{room}\n{conn_id}"))
            .query_async::<i64>(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(())
    }

    async fn presence(&self, room: &RoomName) -> Result<Vec<PresenceEntry>, BrokerError> {
        let mut conn = self.master()?;
        let values: Vec<String> = redis::cmd("HVALS")
            .arg(names::presence(room))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(values
            .iter()
            .filter_map(|v| match wire::decode_presence(v.as_bytes()) {
                Ok(entry) => Some(entry),
                Err(e) => {
                    wire::skip_bad_payload("redis", "presence entry", &e);
                    None
                }
            })
            .collect())
    }

    async fn heartbeat(&self, me: &InstanceInfo) -> Result<(), BrokerError> {
        let mut conn = self.master()?;
        let info = serde_json::to_string(me).map_err(|e| BrokerError::Other(e.to_string()))?;
        let ttl_ms = self.shared.heartbeat_ttl.as_millis() as u64;
        let dead: Vec<String> = redis::cmd("EVAL")
            .arg(HEARTBEAT_SCRIPT)
            .arg(2)
            .arg(names::INSTANCES)
            .arg(names::instance(&me.id))
            .arg(&me.id)
            .arg(ttl_ms)
            .arg(info)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        for id in dead {
            let reaped: i64 = redis::cmd("EVAL")
                .arg(REAP_SCRIPT)
                .arg(1)
                .arg(names::INSTANCES)
                .arg(&id)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.failed(e))?;
            if reaped == 1 {
                tracing::info!(instance = %id, "removed a dead instance's presence");
            }
        }
        Ok(())
    }

    async fn instances(&self) -> Result<Vec<InstanceInfo>, BrokerError> {
        let mut conn = self.master()?;
        let infos: Vec<String> = redis::cmd("EVAL")
            .arg(INSTANCES_SCRIPT)
            .arg(1)
            .arg(names::INSTANCES)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(infos
            .iter()
            .filter_map(|i| serde_json::from_str::<InstanceInfoOwned>(i).ok())
            .map(InstanceInfo::from)
            .collect())
    }
}

#[derive(Deserialize)]
struct InstanceInfoOwned {
    id: String,
    address: String,
    started_at: String,
    connections: usize,
    version: String,
}

impl From<InstanceInfoOwned> for InstanceInfo {
    fn from(i: InstanceInfoOwned) -> Self {
        InstanceInfo {
            id: i.id,
            address: i.address,
            started_at: i.started_at,
            connections: i.connections,
            version: i.version,
        }
    }
}

/// Idempotency keys for a broker that has no script of its own (Kafka with a Redis side):
/// a placeholder claimed with `SET NX`, replaced by the id once the publish is acked.
#[async_trait::async_trait]
impl IdempotencyStore for RedisBroker {
    async fn claim(&self, scope: &str, window: Duration) -> Result<Claim, BrokerError> {
        const PENDING: &str = "pending";
        let mut conn = self.master()?;
        let key = names::idempotency(scope);
        let (set, current): (Option<String>, Option<String>) = redis::pipe()
            .cmd("SET")
            .arg(&key)
            .arg(PENDING)
            .arg("NX")
            .arg("PX")
            .arg(window.as_millis() as u64)
            .cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        if set.is_some() {
            return Ok(Claim::Fresh);
        }
        Ok(match current.as_deref() {
            None => Claim::Fresh,
            Some(PENDING) => Claim::InFlight,
            Some(id) => match id.parse() {
                Ok(id) => Claim::Repeat(id),
                Err(_) => Claim::InFlight,
            },
        })
    }

    async fn complete(&self, scope: &str, id: MessageId, window: Duration) {
        if let Ok(mut conn) = self.master() {
            let done: Result<(), _> = redis::cmd("SET")
                .arg(names::idempotency(scope))
                .arg(id.to_string())
                .arg("PX")
                .arg(window.as_millis() as u64)
                .query_async(&mut conn)
                .await;
            if let Err(e) = done {
                tracing::warn!(error = %e, "idempotency key not recorded");
            }
        }
    }

    async fn abandon(&self, scope: &str) {
        if let Ok(mut conn) = self.master() {
            let _: Result<(), _> = redis::cmd("DEL")
                .arg(names::idempotency(scope))
                .query_async(&mut conn)
                .await;
        }
    }
}

/// Stream entries of `room` after `after`, the newest `limit`, oldest first; `gap` when some
/// entry after `after` was trimmed or expired.
async fn read_history(
    conn: &mut MultiplexedConnection,
    room: &RoomName,
    after: MessageId,
    limit: usize,
    cfg: &RedisConfig,
) -> Result<History, RedisError> {
    let key = names::stream(room);
    let mut pipe = redis::pipe();
    pipe.cmd("EXISTS").arg(&key);
    pipe.cmd("GET").arg(names::trimmed(room));
    pipe.cmd("XREVRANGE")
        .arg(&key)
        .arg("+")
        .arg(format!("({after}"))
        .arg("COUNT")
        .arg(limit + 1);
    // Whether `after` itself is still stored: if it is neither stored nor the newest trimmed
    // id, the history it belonged to is gone (Redis lost its data, a failover lost writes).
    pipe.cmd("XRANGE")
        .arg(&key)
        .arg(after.to_string())
        .arg(after.to_string());
    let (exists, trimmed, entries, itself): (bool, Option<String>, Vec<Value>, Vec<Value>) =
        pipe.query_async(conn).await?;
    let mut events = parse_entries(room, &entries);
    events.reverse();
    let mut gap = false;
    if events.len() > limit {
        events.drain(..events.len() - limit);
        gap = true;
    }
    let trimmed = trimmed.and_then(|t| t.parse::<MessageId>().ok());
    if let Some(trimmed) = trimmed {
        gap |= trimmed > after;
    }
    let known = after == MessageId::ZERO || !itself.is_empty() || trimmed == Some(after);
    gap |= !known;
    if !exists && after != MessageId::ZERO {
        // The whole stream expired: a `since` older than the TTL may have missed messages.
        let ttl_ms = cfg.stream_ttl.as_millis() as u64;
        gap |= after.hi + ttl_ms < crate::protocol::now_ms();
    }
    Ok(History {
        events: events.into_iter().map(Arc::new).collect(),
        gap,
    })
}

/// Parses XRANGE/XREVRANGE replies: `[[id, [field, value, ...]], ...]`.
fn parse_entries(room: &RoomName, entries: &[Value]) -> Vec<RoomEvent> {
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(parts) = entry else { continue };
        let (Some(id), Some(Value::Array(fields))) = (parts.first(), parts.get(1)) else {
            continue;
        };
        let Ok(id) = redis::from_redis_value_ref::<String>(id) else {
            continue;
        };
        let Ok(id) = id.parse::<MessageId>() else {
            continue;
        };
        let payload = fields.chunks(2).find_map(|kv| {
            let name: String = redis::from_redis_value_ref(&kv[0]).ok()?;
            (name == "m")
                .then(|| redis::from_redis_value_ref::<String>(kv.get(1)?).ok())
                .flatten()
        });
        match payload
            .as_deref()
            .map(|p| wire::decode_message(p.as_bytes(), Some(room), Some(id)))
        {
            Some(Ok(event)) => out.push(event),
            Some(Err(e)) => wire::skip_bad_payload("redis", "stream entry", &e),
            None => wire::skip_bad_payload("redis", "stream entry", &"no payload field"),
        }
    }
    out
}

// ---- the supervisor ---------------------------------------------------------------------------

/// What the supervisor keeps across reconnects.
#[derive(Default)]
struct Subscriptions {
    /// Rooms wanted, with the last id delivered here.
    rooms: HashMap<RoomName, MessageId>,
    users: HashMap<Arc<str>, ()>,
    /// Rooms taken over from a run that ended by a fault with nothing delivered yet: they
    /// start from the stream's newest id, not from its beginning.
    start_at_newest: Vec<RoomName>,
}

impl Subscriptions {
    /// What the gateway still wants, after a restart.
    fn from_wanted(wanted: super::Wanted) -> Self {
        let mut subs = Subscriptions::default();
        for (room, last) in wanted.rooms {
            if last == MessageId::ZERO {
                subs.start_at_newest.push(room.clone());
            }
            subs.rooms.insert(room, last);
        }
        subs.users = wanted.users.into_iter().map(|u| (u, ())).collect();
        subs
    }
}

/// Connections to one master.
struct Connected {
    master: MultiplexedConnection,
    sink: PubSubSink,
    stream: redis::aio::PubSubStream,
    /// `+switch-master` notices from a sentinel, when Sentinel is used.
    switch: Option<redis::aio::PubSubStream>,
}

/// One run of the subscriber: (re)connects and serves until the broker is dropped. A panic
/// ends the run; the next one (see [`supervise::spawn`]) rebuilds the subscriptions from what
/// the gateway wants and catches every room up from its last delivered id.
async fn supervise(
    shared: Arc<Shared>,
    commands: Handoff<mpsc::UnboundedReceiver<Command>>,
) -> Exit {
    let Some(mut commands) = commands.take() else {
        return Exit::Failed;
    };
    let mut subs = Subscriptions::from_wanted(shared.sink.wanted());
    const FIRST_RETRY: Duration = Duration::from_millis(50);
    // With Sentinel, asking again is cheap and finds a promoted master soon after it is named.
    let max_retry = if shared.cfg.sentinels.is_empty() {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(250)
    };
    let mut backoff = FIRST_RETRY;
    loop {
        match connect(&shared).await {
            Ok(conn) => {
                let started = Instant::now();
                if let Some(()) = serve(&shared, conn, &mut subs, &mut commands).await {
                    return Exit::Done;
                }
                shared.ready.store(false, Ordering::SeqCst);
                *shared.master.write() = None;
                *shared.replica.write() = None;
                crate::telemetry::metric::broker_reconnect();
                tracing::warn!(
                    connected_for_ms = started.elapsed().as_millis() as u64,
                    "Redis master lost; rediscovering"
                );
                // A master that takes connections but cannot serve (a probe never returns, a
                // demoted node) is retried with backoff like an unreachable one.
                if started.elapsed() > Duration::from_secs(5) {
                    backoff = FIRST_RETRY;
                    continue;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "Redis unavailable");
            }
        }
        // Refuse subscriptions asked for meanwhile rather than keep them waiting.
        let deadline = tokio::time::sleep(backoff);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                cmd = commands.recv() => match cmd {
                    None => return Exit::Done,
                    Some(cmd) => refuse_while_down(cmd, &mut subs),
                },
            }
        }
        let jitter = rand::random_range(0..=backoff.as_millis() as u64 / 4);
        backoff = (backoff * 2).min(max_retry) + Duration::from_millis(jitter);
    }
}

/// While no master is reachable, keep the wanted set current and refuse new subscriptions.
fn refuse_while_down(cmd: Command, subs: &mut Subscriptions) {
    match cmd {
        Command::SubscribeRoom(_, done) => {
            // The gateway undoes the join; the client may retry.
            let _ = done.send(Err(unavailable("no Redis master reachable")));
        }
        Command::UnsubscribeRoom(room) => {
            subs.rooms.remove(&room);
        }
        Command::SubscribeUser(user, done) => {
            subs.users.insert(user, ());
            let _ = done.send(Ok(()));
        }
        Command::UnsubscribeUser(user) => {
            subs.users.remove(&user);
        }
    }
}

fn client_config(cfg: &RedisConfig) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(cfg.command_timeout))
        .set_response_timeout(Some(cfg.command_timeout))
}

async fn connect(shared: &Shared) -> Result<Connected, RedisError> {
    let cfg = &shared.cfg;
    let timeout = cfg.command_timeout;
    let (client, replicas, sentinel_client) = if cfg.sentinels.is_empty() {
        (Client::open(cfg.url.as_str())?, Vec::new(), None)
    } else {
        discover(cfg).await?
    };
    let master = client
        .get_multiplexed_async_connection_with_config(&client_config(cfg))
        .await?;
    let pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
        .await
        .map_err(|_| io_timeout("Pub/Sub connect"))??;
    let (sink, stream) = pubsub.split();

    let acks = match cfg.min_replicas_ack {
        Some(n) => n,
        None if !replicas.is_empty() => 1,
        None => 0,
    };
    shared.min_acks.store(acks, Ordering::Relaxed);
    let mut replica = None;
    if cfg.read_from_replicas {
        for r in &replicas {
            if let Ok(Ok(c)) = tokio::time::timeout(
                timeout,
                r.get_multiplexed_async_connection_with_config(&client_config(cfg)),
            )
            .await
            {
                replica = Some(c);
                break;
            }
        }
    }
    let switch = match sentinel_client {
        Some(s) => match tokio::time::timeout(timeout, s.get_async_pubsub()).await {
            Ok(Ok(mut ps)) => match ps.subscribe("+switch-master").await {
                Ok(()) => Some(ps.into_on_message()),
                Err(_) => None,
            },
            _ => None,
        },
        None => None,
    };
    *shared.master.write() = Some(master.clone());
    *shared.replica.write() = replica;
    tracing::info!(
        master = %client.get_connection_info().addr(),
        replicas = replicas.len(),
        min_replicas_ack = acks,
        "connected to Redis"
    );
    Ok(Connected {
        master,
        sink,
        stream,
        switch,
    })
}

/// With replicas to wait for, confirms that what was just read from `master` is on
/// `min_replicas_ack` replicas: a write made after the read, then `WAIT` for it. Replication is
/// one ordered stream, so a replica that has the write has every entry the read returned.
/// Without this, a master frozen through a failover and then resumed (before it is demoted)
/// could hand out entries stored after the new master took over, which no failover keeps.
/// Returns whether the replicas confirmed in time.
async fn confirm_read(
    shared: &Shared,
    master: &mut MultiplexedConnection,
) -> Result<bool, RedisError> {
    let min_acks = shared.min_acks.load(Ordering::Relaxed);
    if min_acks == 0 {
        return Ok(true);
    }
    let ttl_ms = shared.cfg.wait_timeout.as_millis().max(1000) as u64;
    let (_, acked): (Value, i64) = redis::pipe()
        .cmd("SET")
        .arg(names::confirm_key(&shared.instance_id))
        .arg(1)
        .arg("PX")
        .arg(ttl_ms)
        .cmd("WAIT")
        .arg(min_acks)
        .arg(shared.cfg.wait_timeout.as_millis() as u64)
        .query_async(master)
        .await?;
    if acked < i64::from(min_acks) {
        tracing::warn!(
            acked,
            min_acks,
            "history read not confirmed by the replicas"
        );
    }
    Ok(acked >= i64::from(min_acks))
}

fn io_timeout(what: &str) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} timed out"),
    ))
}

/// Asks the sentinels for the master (and replicas). Returns the master client, the replica
/// clients and a client for one reachable sentinel (for `+switch-master`).
async fn discover(cfg: &RedisConfig) -> Result<(Client, Vec<Client>, Option<Client>), RedisError> {
    let auth = if cfg.sentinel_password.is_empty() {
        String::new()
    } else {
        format!(":{}@", urlencode(&cfg.sentinel_password))
    };
    let urls: Vec<String> = cfg
        .sentinels
        .iter()
        .map(|s| format!("redis://{auth}{s}"))
        .collect();
    let mut sentinel = redis::sentinel::Sentinel::build(urls.clone())?;
    let mut node = redis::RedisConnectionInfo::default().set_db(cfg.db);
    if !cfg.password.is_empty() {
        node = node.set_password(&cfg.password);
    }
    let node =
        redis::sentinel::SentinelNodeConnectionInfo::default().set_redis_connection_info(node);
    let timeout = cfg.command_timeout * 3;
    let master = tokio::time::timeout(
        timeout,
        sentinel.async_master_for(&cfg.master_name, Some(&node)),
    )
    .await
    .map_err(|_| io_timeout("Sentinel master lookup"))??;
    let replicas = tokio::time::timeout(
        timeout,
        sentinel.async_get_replica_clients(&cfg.master_name, Some(&node)),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .unwrap_or_default();
    let sentinel_client = urls.first().and_then(|u| Client::open(u.as_str()).ok());
    Ok((master, replicas, sentinel_client))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Runs on one master until it fails. `Some(())` when the broker is dropped.
async fn serve(
    shared: &Shared,
    conn: Connected,
    subs: &mut Subscriptions,
    commands: &mut mpsc::UnboundedReceiver<Command>,
) -> Option<()> {
    let Connected {
        mut master,
        mut sink,
        mut stream,
        switch,
    } = conn;
    // Resubscribe everything, then deliver what was written while we were away.
    let probe_channel = names::probe(&shared.instance_id);
    let rooms: Vec<String> = subs.rooms.keys().map(|r| names::room_channel(r)).collect();
    let users: Vec<String> = subs.users.keys().map(|u| names::user_channel(u)).collect();
    for channels in [vec![probe_channel.clone()], rooms, users] {
        if !channels.is_empty() && sink.subscribe(&channels).await.is_err() {
            return None;
        }
    }
    for room in std::mem::take(&mut subs.start_at_newest) {
        let Ok(newest) = newest_id(&mut master, &room).await else {
            subs.start_at_newest.push(room);
            return None;
        };
        if let Some(last) = subs.rooms.get_mut(&room) {
            *last = (*last).max(newest);
        }
    }
    let wanted: Vec<RoomName> = subs.rooms.keys().cloned().collect();
    for room in wanted {
        if catch_up(shared, &mut master, &room, subs, None)
            .await
            .is_err()
        {
            return None;
        }
    }
    // Ready once a probe went through the master and came back on this subscription.
    let mut probe = Probe::default();
    let mut probe_tick = tokio::time::interval(shared.probe_interval.min(shared.probe_timeout));
    if probe
        .send(shared, &mut master, &probe_channel)
        .await
        .is_err()
    {
        return None;
    }

    let mut switch = switch;
    let mut health =
        tokio::time::interval(shared.cfg.command_timeout.max(Duration::from_millis(500)));
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(msg) if msg.get_channel_name() == probe_channel => {
                    if probe.received(msg.get_payload_bytes()) {
                        shared.ready.store(true, Ordering::SeqCst);
                    }
                }
                Some(msg) => {
                    if let Some(event) = on_message(shared, &msg, subs) {
                        let room = event.msg.room.clone();
                        if catch_up(shared, &mut master, &room, subs, Some(event.id)).await.is_err() {
                            return None;
                        }
                        // Delivered by the catch-up unless the stream no longer holds it.
                        deliver_room(shared, subs, event);
                    }
                }
                None => return None,
            },
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { return Some(()) };
                if apply(shared, &mut master, &mut sink, cmd, subs).await.is_err() {
                    return None;
                }
            }
            notice = next_switch(&mut switch) => {
                crate::telemetry::metric::broker_failover();
                tracing::info!(notice = %notice, "Sentinel switched the master");
                return None;
            }
            _ = health.tick() => {
                let ping: Result<String, _> = redis::cmd("PING").query_async(&mut master).await;
                if ping.is_err() {
                    return None;
                }
            }
            _ = probe_tick.tick() => {
                if probe.overdue(shared.probe_timeout) {
                    // The subscription is open but deaf (or the master cannot publish): rebuild.
                    crate::telemetry::metric::probe_missed();
                    tracing::warn!(
                        timeout_ms = shared.probe_timeout.as_millis() as u64,
                        "self-probe not received back through Redis; reconnecting"
                    );
                    return None;
                }
                if probe.due(shared.probe_interval)
                    && probe.send(shared, &mut master, &probe_channel).await.is_err()
                {
                    return None;
                }
            }
            _ = shared.reconnect.notified() => return None,
        }
    }
}

/// The self-probe: a sequence number published on this instance's probe channel through the
/// command connection, expected back on the subscription.
#[derive(Default)]
struct Probe {
    seq: u64,
    /// When the outstanding probe was sent; `None` once it came back.
    outstanding: Option<Instant>,
    last_sent: Option<Instant>,
}

impl Probe {
    async fn send(
        &mut self,
        shared: &Shared,
        master: &mut MultiplexedConnection,
        channel: &str,
    ) -> Result<(), RedisError> {
        self.seq += 1;
        let now = Instant::now();
        // Keep the older send time if one is still outstanding: that is the one overdue.
        self.outstanding.get_or_insert(now);
        self.last_sent = Some(now);
        let sent: Result<i64, RedisError> = tokio::time::timeout(
            shared.probe_timeout,
            redis::cmd("EVAL")
                .arg(PROBE_SCRIPT)
                .arg(2)
                .arg(names::probe_key(&shared.instance_id))
                .arg(channel)
                .arg(self.seq)
                .arg(shared.probe_timeout.as_millis() as u64 * 10)
                .query_async(master),
        )
        .await
        .unwrap_or_else(|_| Err(io_timeout("self-probe publish")));
        if let Err(e) = &sent {
            crate::telemetry::metric::probe_missed();
            tracing::warn!(error = %e, "self-probe could not be published; reconnecting");
        }
        sent.map(|_| ())
    }

    /// A probe came back; true if it is the newest one sent.
    fn received(&mut self, payload: &[u8]) -> bool {
        let newest = std::str::from_utf8(payload)
            .ok()
            .and_then(|p| p.parse::<u64>().ok())
            == Some(self.seq);
        if newest {
            self.outstanding = None;
        }
        newest
    }

    fn overdue(&self, timeout: Duration) -> bool {
        self.outstanding.is_some_and(|t| t.elapsed() > timeout)
    }

    fn due(&self, interval: Duration) -> bool {
        self.last_sent.is_none_or(|t| t.elapsed() >= interval)
    }
}

async fn next_switch(switch: &mut Option<redis::aio::PubSubStream>) -> String {
    match switch {
        Some(s) => match s.next().await {
            Some(msg) => msg.get_payload::<String>().unwrap_or_default(),
            None => {
                *switch = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

async fn apply(
    shared: &Shared,
    master: &mut MultiplexedConnection,
    sink: &mut PubSubSink,
    cmd: Command,
    subs: &mut Subscriptions,
) -> Result<(), RedisError> {
    match cmd {
        Command::SubscribeRoom(room, done) => {
            if subs.rooms.contains_key(&room) {
                let _ = done.send(Ok(()));
                return Ok(());
            }
            // Start from the stream's newest id, subscribe, then replay what came in between:
            // nothing published after the subscription started is missed.
            let newest = newest_id(master, &room).await;
            let newest = match newest {
                Ok(id) => id,
                Err(e) => {
                    let _ = done.send(Err(unavailable(&e)));
                    return Err(e);
                }
            };
            subs.rooms.insert(room.clone(), newest);
            if let Err(e) = sink.subscribe(names::room_channel(&room)).await {
                let _ = done.send(Err(unavailable(&e)));
                return Err(e);
            }
            let caught_up = catch_up(shared, master, &room, subs, None).await;
            let _ = done.send(caught_up.as_ref().map(|_| ()).map_err(unavailable));
            caught_up
        }
        Command::UnsubscribeRoom(room) => {
            subs.rooms.remove(&room);
            sink.unsubscribe(names::room_channel(&room)).await
        }
        Command::SubscribeUser(user, done) => {
            let result = sink.subscribe(names::user_channel(&user)).await;
            subs.users.insert(user, ());
            let _ = done.send(result.as_ref().map(|_| ()).map_err(unavailable));
            result
        }
        Command::UnsubscribeUser(user) => {
            subs.users.remove(&user);
            sink.unsubscribe(names::user_channel(&user)).await
        }
    }
}

async fn newest_id(
    master: &mut MultiplexedConnection,
    room: &RoomName,
) -> Result<MessageId, RedisError> {
    let entries: Vec<Value> = redis::cmd("XREVRANGE")
        .arg(names::stream(room))
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(master)
        .await?;
    Ok(entries
        .first()
        .and_then(|e| match e {
            Value::Array(parts) => parts.first(),
            _ => None,
        })
        .and_then(|id| redis::from_redis_value_ref::<String>(id).ok())
        .and_then(|id| id.parse().ok())
        .unwrap_or(MessageId::ZERO))
}

/// Delivers what the room's stream holds after the last id delivered here (up to `through`,
/// when given: entries after it may still wait for their replicas).
async fn catch_up(
    shared: &Shared,
    master: &mut MultiplexedConnection,
    room: &RoomName,
    subs: &mut Subscriptions,
    through: Option<MessageId>,
) -> Result<(), RedisError> {
    const PAGE: usize = 500;
    if let Some(&last) = subs.rooms.get(room) {
        // Entries after `last` trimmed before this instance read them: not silently skipped.
        let trimmed: Option<String> = redis::cmd("GET")
            .arg(names::trimmed(room))
            .query_async(master)
            .await?;
        if let Some(trimmed) = trimmed.and_then(|t| t.parse::<MessageId>().ok())
            && trimmed > last
            && last != MessageId::ZERO
        {
            tracing::warn!(room = %room, since = %last, trimmed = %trimmed, "catch-up lost trimmed messages");
            crate::telemetry::metric::catch_up_lost();
            shared.sink.lost(room, last);
        }
    }
    for _ in 0..1000 {
        let Some(&last) = subs.rooms.get(room) else {
            return Ok(());
        };
        if through.is_some_and(|t| t <= last) {
            return Ok(());
        }
        let entries: Vec<Value> = redis::cmd("XRANGE")
            .arg(names::stream(room))
            .arg(format!("({last}"))
            .arg(through.map_or_else(|| "+".to_string(), |t| t.to_string()))
            .arg("COUNT")
            .arg(PAGE)
            .query_async(master)
            .await?;
        let events = parse_entries(room, &entries);
        let full = entries.len() == PAGE;
        if !events.is_empty() && !confirm_read(shared, master).await? {
            // Try again on a fresh connection (maybe to another master), later.
            return Err(io_timeout("replica confirmation of the catch-up"));
        }
        for event in events {
            deliver_room(shared, subs, Arc::new(event));
        }
        if !full {
            return Ok(());
        }
    }
    Ok(())
}

/// Delivers a room event unless it was delivered already (ids only grow per room).
fn deliver_room(shared: &Shared, subs: &mut Subscriptions, event: Arc<RoomEvent>) {
    let Some(last) = subs.rooms.get_mut(&event.msg.room) else {
        return;
    };
    if event.id <= *last {
        return;
    }
    *last = event.id;
    shared.sink.room_event(event);
}

/// Delivers one Pub/Sub message. Returns it undelivered when it shows that an earlier one never
/// arrived live (its `prev` is newer than the last delivered): catch up through it first.
fn on_message(
    shared: &Shared,
    msg: &redis::Msg,
    subs: &mut Subscriptions,
) -> Option<Arc<RoomEvent>> {
    let channel = msg.get_channel_name();
    let payload = msg.get_payload_bytes();
    if let Some(room) = channel.strip_prefix(names::ROOM_PREFIX) {
        let (room, &last) = subs
            .rooms
            .get_key_value(room)
            .map(|(r, l)| (r.clone(), l))?;
        // Presence diffs are written by the scripts above and start with their type.
        if payload.starts_with(br#"{"type":"presence_diff""#) {
            match wire::decode_presence_diff(payload, &room) {
                Ok(diff) => shared.sink.presence(Arc::new(diff)),
                Err(e) => wire::skip_bad_payload("redis", "presence diff", &e),
            }
            return None;
        }
        crate::supervise::fault_point(&room);
        match wire::decode_live_message(payload, Some(&room), None) {
            Ok((event, Some(prev))) if prev > last && event.id > last => {
                return Some(Arc::new(event));
            }
            Ok((event, _)) => deliver_room(shared, subs, Arc::new(event)),
            Err(e) => wire::skip_bad_payload("redis", "room message", &e),
        }
    } else if channel.starts_with(names::USER_PREFIX) {
        match wire::decode_direct(payload) {
            Ok(msg) => shared.sink.direct(Arc::new(msg)),
            Err(e) => wire::skip_bad_payload("redis", "direct message", &e),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_protocol() {
        assert_eq!(names::room_channel("public:lobby"), "rt:room:public:lobby");
        assert_eq!(names::stream("public:lobby"), "rt:stream:public:lobby");
    }
}
