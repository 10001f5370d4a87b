//! Redis broker: Pub/Sub for live fan-out, Streams for history and gapless recovery, master and
//! replicas found through Sentinel (or one `redis.url`), heartbeats and presence in Redis.
//!
//! One supervisor task per instance owns the Pub/Sub connection. It (re)discovers the master,
//! resubscribes every room after a reconnect and replays from each room's stream whatever was
//! written after the last id it delivered, so subscribers see no gap and no duplicate across a
//! failover. Publishes go through a multiplexed command connection; with `WAIT` the ack waits
//! for replicas, so an acked message survives the master's loss.
//!
//! Files: `names` (keys and channels), `scripts` (the Lua scripts), `connect` (connections,
//! Sentinel discovery), `subscriber` (the supervisor: subscriptions, catch-up, self-probe),
//! `history` (stream reads), and here the `Broker` implementation.

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

use super::idempotency::{self, Claim, ClaimTerms, IdempotencyStore};
use super::wire::{self, WirePresence};
use super::{
    Broker, BrokerError, Deliver, DirectMessage, Edge, History, InstanceInfo, MessageId, Occupant,
    PresenceEntry, Reaped, Registry, RoomEvent, RoomMessage, RoomName, Subscribed, Tracked,
};
use crate::config::{BrokerConfig, RedisConfig};
use crate::supervise::{self, Exit, Handoff};

mod cluster;
mod connect;
mod history;
mod names;
mod occupancy;
mod scripts;
mod subscriber;

pub use cluster::ClusterBroker;
use connect::*;
use history::*;
use scripts::*;
use subscriber::*;

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
    /// Sentinel has named replicas of the master once: publishes keep waiting for one.
    saw_replicas: AtomicBool,
    /// Anyone who sees the master fail asks the supervisor to rediscover it.
    reconnect: Notify,
    idempotency_window: Duration,
    probe_interval: Duration,
    probe_timeout: Duration,
}

pub struct RedisBroker {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    /// Used only as the registry (next to another message broker): watching a room's presence
    /// subscribes its channel, which carries the diffs. As the message broker too, the room's
    /// subscription carries them already.
    presence_only: bool,
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
            saw_replicas: AtomicBool::new(false),
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
            presence_only: false,
        }
    }

    /// For use as the [`Registry`] only, next to another message broker (Kafka).
    pub fn presence_only(mut self) -> Self {
        self.presence_only = true;
        self
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
            Some(mut conn) => read_history(&mut conn, room, room, after, limit, &self.shared.cfg)
                .await
                .ok(),
            None => None,
        };
        // The master has the newest tail a replica may not have yet.
        let mut master = self.master()?;
        match &mut history {
            Some(h) => {
                let from = h.events.last().map_or(after, |e| e.id);
                let tail = read_history(&mut master, room, room, from, limit, &self.shared.cfg)
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
                    read_history(&mut master, room, room, after, limit, &self.shared.cfg)
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
        // Kept a short while, so that an instance that was away delivers it on reconnecting.
        redis::cmd("EVAL")
            .arg(DIRECT_SCRIPT)
            .arg(2)
            .arg(names::direct_stream(&msg.to))
            .arg(names::user_channel(&msg.to))
            .arg(self.shared.cfg.direct_maxlen)
            .arg(self.shared.cfg.direct_ttl.as_millis() as u64)
            .arg(payload)
            .query_async::<String>(&mut conn)
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
}

#[async_trait::async_trait]
impl Registry for RedisBroker {
    fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::SeqCst)
    }

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
        Ok(match stored {
            0 => Tracked::RoomFull,
            2 => Tracked::Replaced,
            _ => Tracked::Added,
        })
    }

    async fn untrack(&self, room: &RoomName, conn_id: &Arc<str>) -> Result<bool, BrokerError> {
        let mut conn = self.master()?;
        let removed = redis::cmd("EVAL")
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
        Ok(removed == 1)
    }

    async fn presence(&self, room: &RoomName) -> Result<Vec<PresenceEntry>, BrokerError> {
        let mut conn = self.master()?;
        let values: Vec<String> = redis::cmd("HVALS")
            .arg(names::presence(room))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(presence_entries(&values))
    }

    async fn heartbeat(&self, me: &InstanceInfo) -> Result<Reaped, BrokerError> {
        let mut conn = self.master()?;
        let mut reaped_all = Reaped::default();
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
            let reaped: Vec<String> = redis::cmd("EVAL")
                .arg(REAP_SCRIPT)
                .arg(1)
                .arg(names::INSTANCES)
                .arg(&id)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.failed(e))?;
            let Some((first, entries)) = reaped.split_first() else {
                continue; // another instance reaped it
            };
            if first != "reaped" {
                continue;
            }
            for pair in entries.chunks_exact(2) {
                if let Some(left) = reaped_entry(&pair[0], &pair[1]) {
                    reaped_all.left.push(left);
                }
            }
            reaped_all.vacated.extend(
                occupancy::reap(&mut conn, OCCUPANCY, &id)
                    .await
                    .map_err(|e| self.failed(e))?,
            );
            tracing::info!(instance = %id, entries = entries.len() / 2, "removed a dead instance's presence");
        }
        Ok(reaped_all)
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
        Ok(instance_infos(&infos))
    }

    async fn set_local_count(
        &self,
        who: &Occupant,
        count: usize,
    ) -> Result<Option<Edge>, BrokerError> {
        let mut conn = self.master()?;
        occupancy::set_local_count(&mut conn, OCCUPANCY, &self.shared.instance_id, who, count)
            .await
            .map_err(|e| self.failed(e))
    }

    async fn count(&self, who: &Occupant) -> Result<u64, BrokerError> {
        let live = self.live_ids().await?;
        let mut conn = self.master()?;
        occupancy::count(&mut conn, OCCUPANCY, who, &live)
            .await
            .map_err(|e| self.failed(e))
    }

    async fn rooms(&self, after: &str, limit: usize) -> Result<Vec<(RoomName, u64)>, BrokerError> {
        let live = self.live_ids().await?;
        let mut conn = self.master()?;
        occupancy::rooms(&mut conn, OCCUPANCY, &live, after, limit)
            .await
            .map_err(|e| self.failed(e))
    }
}

/// Occupancy keys with Sentinel or one server: plain names.
const OCCUPANCY: occupancy::Keys = occupancy::Keys { tagged: false };

impl RedisBroker {
    async fn live_ids(&self) -> Result<std::collections::HashSet<String>, BrokerError> {
        Ok(Registry::instances(self)
            .await?
            .into_iter()
            .map(|i| i.id)
            .collect())
    }
}

/// The stored presence entries of a room (`HVALS`); a bad one is skipped and counted.
fn presence_entries(values: &[String]) -> Vec<PresenceEntry> {
    values
        .iter()
        .filter_map(|v| match wire::decode_presence(v.as_bytes()) {
            Ok(entry) => Some(entry),
            Err(e) => {
                wire::skip_bad_payload("redis", "presence entry", &e);
                None
            }
        })
        .collect()
}

/// A reaped presence entry as stored (untrusted: one that does not decode is skipped).
fn reaped_entry(room: &str, entry: &str) -> Option<(RoomName, PresenceEntry)> {
    if !crate::protocol::valid_room(room) {
        return None;
    }
    let room: RoomName = Arc::from(room);
    match wire::decode_presence(entry.as_bytes()) {
        Ok(entry) => Some((room, entry)),
        Err(e) => {
            wire::skip_bad_payload("redis", "presence entry", &e);
            None
        }
    }
}

/// The live instances' stored heartbeats; one that does not parse is left out.
fn instance_infos(infos: &[String]) -> Vec<InstanceInfo> {
    infos
        .iter()
        .filter_map(|i| serde_json::from_str::<InstanceInfoOwned>(i).ok())
        .map(InstanceInfo::from)
        .collect()
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
/// a pending claim with a lease, replaced by the id once the publish is acked. One key per
/// scope, so the same commands serve a Cluster.
pub(super) mod keyed {
    use super::*;
    use crate::broker::idempotency::ClaimTerms;
    use redis::aio::ConnectionLike;

    /// `p:<lease end, ms>:<position>`: claimed; after the lease, taken over as uncertain from
    /// the position.
    const PENDING: &str = "p:";
    /// `u:<position>`: a publish failed with its outcome unknown (see [`Claim::Uncertain`]).
    const UNCERTAIN: &str = "u:";

    /// Claims a free key, or takes over one whose outcome is unknown or whose lease ran out
    /// (on the server's clock), in one step: two retries never both get to look and publish.
    /// KEYS: the key. ARGV: window ms, lease ms, the claimer's position.
    /// Returns the value before (nil when free; `u:<position>` for a lease that ran out).
    const CLAIM_SCRIPT: &str = r"
local cur = redis.call('GET', KEYS[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local from = ARGV[3]
if cur and string.sub(cur, 1, 2) == 'p:' then
  local lease_end, pos = string.match(cur, '^p:(%d+):(%d+)$')
  if lease_end == nil or tonumber(lease_end) > now then
    return cur
  end
  cur = 'u:' .. pos
end
if cur and string.sub(cur, 1, 2) == 'u:' then
  from = string.sub(cur, 3)
elseif cur then
  return cur
end
redis.call('SET', KEYS[1], 'p:' .. string.format('%.0f', now + tonumber(ARGV[2])) .. ':' .. from, 'PX', ARGV[1])
return cur
";

    pub(in crate::broker::redis) async fn claim<C: ConnectionLike + Send>(
        conn: &mut C,
        key: &str,
        claim: ClaimTerms,
    ) -> Result<Claim, RedisError> {
        let current: Option<String> = redis::cmd("EVAL")
            .arg(CLAIM_SCRIPT)
            .arg(1)
            .arg(key)
            .arg(claim.window.as_millis() as u64)
            .arg(claim.lease.as_millis() as u64)
            .arg(claim.from)
            .query_async(conn)
            .await?;
        Ok(match current.as_deref() {
            None => Claim::Fresh,
            Some(v) if v.starts_with(PENDING) => Claim::InFlight,
            Some(v) => match v.strip_prefix(UNCERTAIN) {
                // An unreadable position: look from the start of the log rather than not at all.
                Some(from) => Claim::Uncertain(from.parse().unwrap_or(0)),
                None => match v.parse() {
                    Ok(id) => Claim::Repeat(id),
                    // Not ours to read (another version's `pending`): wait for the window.
                    Err(_) => Claim::InFlight,
                },
            },
        })
    }

    pub(in crate::broker::redis) async fn uncertain<C: ConnectionLike + Send>(
        conn: &mut C,
        key: &str,
        from: u64,
        window: Duration,
    ) {
        let done: Result<(), _> = redis::cmd("SET")
            .arg(key)
            .arg(format!("{UNCERTAIN}{from}"))
            .arg("PX")
            .arg(window.as_millis() as u64)
            .query_async(conn)
            .await;
        if let Err(e) = done {
            tracing::warn!(error = %e, "idempotency key's unknown outcome not recorded");
        }
    }

    pub(in crate::broker::redis) async fn complete<C: ConnectionLike + Send>(
        conn: &mut C,
        key: &str,
        id: MessageId,
        window: Duration,
    ) {
        let done: Result<(), _> = redis::cmd("SET")
            .arg(key)
            .arg(id.to_string())
            .arg("PX")
            .arg(window.as_millis() as u64)
            .query_async(conn)
            .await;
        if let Err(e) = done {
            tracing::warn!(error = %e, "idempotency key not recorded");
        }
    }

    pub(in crate::broker::redis) async fn abandon<C: ConnectionLike + Send>(
        conn: &mut C,
        key: &str,
    ) {
        let _: Result<(), _> = redis::cmd("DEL").arg(key).query_async(conn).await;
    }
}

#[async_trait::async_trait]
impl IdempotencyStore for RedisBroker {
    async fn claim(&self, scope: &str, claim: ClaimTerms) -> Result<Claim, BrokerError> {
        let mut conn = self.master()?;
        keyed::claim(&mut conn, &names::idempotency(scope), claim)
            .await
            .map_err(|e| self.failed(e))
    }

    async fn complete(&self, scope: &str, id: MessageId, window: Duration) {
        if let Ok(mut conn) = self.master() {
            keyed::complete(&mut conn, &names::idempotency(scope), id, window).await;
        }
    }

    async fn abandon(&self, scope: &str) {
        if let Ok(mut conn) = self.master() {
            keyed::abandon(&mut conn, &names::idempotency(scope)).await;
        }
    }

    async fn uncertain(&self, scope: &str, from: u64, window: Duration) {
        if let Ok(mut conn) = self.master() {
            keyed::uncertain(&mut conn, &names::idempotency(scope), from, window).await;
        }
    }
}
