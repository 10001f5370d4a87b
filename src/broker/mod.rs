//! The broker port: how instances share rooms, history, direct messages, presence and
//! heartbeats. One adapter per backend; the gateway sees only [`Broker`].
//!
//! Deliveries flow the other way, through [`Deliver`], called by the adapter's receiving task
//! for every message of a room this instance subscribed. Implementations of `Deliver` must not
//! block: the gateway only queues frames there.

pub mod idempotency;
pub mod kafka;
pub mod memory;
pub mod redis;
pub mod wire;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::Serialize;
use serde_json::value::RawValue;

pub use kafka::{KafkaBroker, ProbeTiming};
pub use memory::MemoryBroker;
pub use redis::{ClusterBroker, RedisBroker};

/// Room names are shared, never copied per message.
pub type RoomName = Arc<str>;

/// A message id, totally ordered within a room. Written `<hi>-<lo>`: a Redis stream id
/// (milliseconds, sequence) or a Kafka position (partition, offset); opaque to clients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId {
    pub hi: u64,
    pub lo: u64,
}

impl MessageId {
    pub const ZERO: MessageId = MessageId { hi: 0, lo: 0 };

    pub fn new(hi: u64, lo: u64) -> Self {
        Self { hi, lo }
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.hi, self.lo)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("malformed message id")]
pub struct BadMessageId;

impl FromStr for MessageId {
    type Err = BadMessageId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s.split_once('-').ok_or(BadMessageId)?;
        Ok(MessageId {
            hi: hi.parse().map_err(|_| BadMessageId)?,
            lo: lo.parse().map_err(|_| BadMessageId)?,
        })
    }
}

/// Stored room message kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    Message,
    System,
}

impl MessageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Message => "message",
            MessageKind::System => "system",
        }
    }
}

/// The connection a message came from, so that a sender who joined with `self: false` is skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub instance: Arc<str>,
    pub session: u64,
}

/// A room message as the publishing instance hands it to the broker.
#[derive(Debug)]
pub struct RoomMessage {
    pub room: RoomName,
    pub kind: MessageKind,
    pub data: Box<RawValue>,
    /// `None` for server broadcasts.
    pub sender_id: Option<Arc<str>>,
    /// Publish time, Unix milliseconds.
    pub ts_ms: u64,
    pub origin: Option<Origin>,
    /// W3C `traceparent` of the publish span, carried to every delivering instance.
    pub traceparent: Option<String>,
    /// Set by the publisher (validated, see [`idempotency::valid_key`]); never stored.
    pub idempotency_key: Option<Box<str>>,
}

/// A stored room message with its id. Shared by every local recipient.
#[derive(Debug)]
pub struct RoomEvent {
    pub id: MessageId,
    pub msg: RoomMessage,
    /// Delivered live: the room's stored message just before this one, as the delivering
    /// broker knows it (`0-0`: none, or not known; history reads leave it so). The `since`
    /// that recovers this message if it is dropped.
    pub prev: MessageId,
}

/// A message for every connection of one user, on any instance.
#[derive(Debug)]
pub struct DirectMessage {
    /// A `direct` frame for the user's clients, or a server API command for the instances
    /// that hold the user's connections.
    pub kind: DirectKind,
    pub to: Arc<str>,
    pub data: Box<RawValue>,
    pub sender_id: Arc<str>,
    pub ts_ms: u64,
    pub traceparent: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectKind {
    Message,
    /// `data` is a [`Control`] command, applied by the instance, never shown to clients.
    Control,
}

/// A server API command carried to every instance holding a user's connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Control {
    /// Close every connection of the user with this code and reason.
    Disconnect { code: u16, reason: String },
    /// The user's connections leave the room (and are told with a `system` notice).
    Unsubscribe { room: String },
}

impl Control {
    /// Longest close reason a WebSocket close frame carries (125 bytes less the code).
    pub const MAX_REASON_BYTES: usize = 123;

    /// A close code a server may send: 1000, 1001, 1008, 1011, 1013 or 3000-4999.
    pub fn valid_code(code: u16) -> bool {
        matches!(code, 1000 | 1001 | 1008 | 1011 | 1013 | 3000..=4999)
    }

    /// Checked wherever a command comes from (the API, or any writer of the broker).
    pub fn is_valid(&self) -> bool {
        match self {
            Control::Disconnect { code, reason } => {
                Self::valid_code(*code) && reason.len() <= Self::MAX_REASON_BYTES
            }
            Control::Unsubscribe { room } => crate::protocol::valid_room(room),
        }
    }
}

/// What the cluster-wide occupancy index counts: the members of a room, or the connections
/// of a user, per instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Occupant {
    Room(RoomName),
    User(Arc<str>),
}

impl Occupant {
    pub fn kind(&self) -> &'static str {
        match self {
            Occupant::Room(_) => "room",
            Occupant::User(_) => "user",
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Occupant::Room(r) => r,
            Occupant::User(u) => u,
        }
    }
}

/// A room (or user) that had no member on any instance got one, or lost its last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edge {
    Occupied,
    Vacated,
}

/// One connection's presence in a room.
#[derive(Debug, Clone)]
pub struct PresenceEntry {
    pub user_id: Arc<str>,
    /// Globally unique connection id (the `session_id` of `welcome`).
    pub conn_id: Arc<str>,
    /// The client's meta object, with `session_id` added.
    pub meta: Arc<RawValue>,
}

/// What a heartbeat removed of instances found dead, for the webhooks.
#[derive(Debug, Default)]
pub struct Reaped {
    /// Rooms left with no member anywhere.
    pub vacated: Vec<RoomName>,
    /// The dead instances' presence entries, by room.
    pub left: Vec<(RoomName, PresenceEntry)>,
}

#[derive(Debug, Default)]
pub struct PresenceDiff {
    pub room: RoomName,
    pub joins: Vec<PresenceEntry>,
    pub leaves: Vec<PresenceEntry>,
}

/// What `track` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracked {
    /// The connection had no entry in the room.
    Added,
    /// Replaced the connection's earlier entry.
    Replaced,
    /// The room is at its presence limit; nothing changed.
    RoomFull,
}

/// What `since` replay found.
#[derive(Debug, Default)]
pub struct History {
    /// Messages after the requested id, oldest first.
    pub events: Vec<Arc<RoomEvent>>,
    /// Some message after the requested id is no longer retained.
    pub gap: bool,
}

/// One instance's heartbeat.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceInfo {
    pub id: String,
    pub address: String,
    pub started_at: String,
    pub connections: usize,
    pub version: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The broker cannot take the request now (down, failing over); nothing was written.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker error: {0}")]
    Other(String),
}

/// Resolves once a subscription is live.
pub type Subscribed = BoxFuture<'static, Result<(), BrokerError>>;

/// What this instance needs delivered: rooms with local members (with the last id delivered
/// here, `0-0` if none yet) and users with local connections.
#[derive(Debug, Default)]
pub struct Wanted {
    pub rooms: Vec<(RoomName, MessageId)>,
    pub users: Vec<Arc<str>>,
}

/// Where an adapter hands what it receives. Must not block.
pub trait Deliver: Send + Sync + 'static {
    fn room_event(&self, event: Arc<RoomEvent>);
    fn direct(&self, msg: Arc<DirectMessage>);
    fn presence(&self, diff: Arc<PresenceDiff>);
    /// Messages of `room` after `since` can no longer be delivered here (the broker dropped
    /// them before this instance read them): local members are told where to recover from.
    fn lost(&self, _room: &RoomName, _since: MessageId) {}
    /// The subscription that carries the presence diffs of `rooms` was made again after a
    /// loss: diffs sent meanwhile are gone, so local members need the current presence.
    fn presence_stale(&self, _rooms: Vec<RoomName>) {}
    /// Read by a receiving task that restarts after a fault, to subscribe again.
    fn wanted(&self) -> Wanted {
        Wanted::default()
    }
}

#[async_trait::async_trait]
pub trait Broker: Send + Sync + 'static {
    /// `memory`, `redis` or `kafka`.
    fn kind(&self) -> &'static str;

    /// Connected and able to take writes.
    fn is_ready(&self) -> bool;

    /// Stores `msg` in the room's history and fans it out to every subscribed instance.
    /// Returns once the message is durable as configured; its id is the history id.
    async fn publish(&self, msg: RoomMessage) -> Result<MessageId, BrokerError>;

    /// Starts live delivery of `room` to this instance. The interest is registered before this
    /// returns, so calls made in order under the caller's lock keep that order; the future
    /// resolves once every message published afterwards will be delivered.
    fn subscribe(&self, room: &RoomName) -> Subscribed;

    /// Stops live delivery of `room`; registered before this returns, like `subscribe`.
    fn unsubscribe(&self, room: &RoomName);

    /// Retained messages of `room` after `after`, oldest first, at most `limit` (the newest).
    async fn history_after(
        &self,
        room: &RoomName,
        after: MessageId,
        limit: usize,
    ) -> Result<History, BrokerError>;

    /// Delivers `msg` to every connection of `msg.to` on every instance.
    async fn send_direct(&self, msg: DirectMessage) -> Result<(), BrokerError>;

    /// Starts delivery of direct messages for `user` to this instance (same ordering rule as
    /// `subscribe`).
    fn subscribe_user(&self, user: &Arc<str>) -> Subscribed;

    fn unsubscribe_user(&self, user: &Arc<str>);
}

/// Presence and instances: who is in a room, and which instances are alive. A port of its
/// own, so that a message broker without them (Kafka) is paired with one that has them.
#[async_trait::async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Able to answer and record now.
    fn is_ready(&self) -> bool;

    /// Starts delivery of `room`'s presence diffs to this instance ([`Deliver::presence`]),
    /// with the same ordering rule as [`Broker::subscribe`].
    fn watch(&self, room: &RoomName) -> Subscribed;

    fn unwatch(&self, room: &RoomName);

    /// Adds or replaces a connection's presence and announces the diff to the room everywhere,
    /// unless the room already holds `max_entries` others (checked atomically with the add).
    async fn track(
        &self,
        room: &RoomName,
        entry: PresenceEntry,
        max_entries: usize,
    ) -> Result<Tracked, BrokerError>;

    /// Removes a connection's presence (if any) and announces the diff; true if it had one.
    async fn untrack(&self, room: &RoomName, conn_id: &Arc<str>) -> Result<bool, BrokerError>;

    /// Everyone present in `room`, on every instance.
    async fn presence(&self, room: &RoomName) -> Result<Vec<PresenceEntry>, BrokerError>;

    /// Records this instance as alive. Instances found dead are removed (presence and
    /// occupancy); returns what this removed.
    async fn heartbeat(&self, me: &InstanceInfo) -> Result<Reaped, BrokerError>;

    /// Every instance whose heartbeat is alive.
    async fn instances(&self) -> Result<Vec<InstanceInfo>, BrokerError>;

    /// Records that this instance now holds `count` of `who` (members of a room, connections
    /// of a user; 0: none). Returns the cluster-wide edge this caused, if any: decided
    /// atomically, so exactly one instance sees each edge.
    async fn set_local_count(
        &self,
        who: &Occupant,
        count: usize,
    ) -> Result<Option<Edge>, BrokerError>;

    /// `who`'s count summed over the live instances (0: no member, or no connection, anywhere).
    async fn count(&self, who: &Occupant) -> Result<u64, BrokerError>;

    /// Rooms with members on a live instance and their member counts, by name, the first
    /// `limit` after `after`.
    async fn rooms(&self, after: &str, limit: usize) -> Result<Vec<(RoomName, u64)>, BrokerError>;
}
