//! WebSocket sessions, local rooms and fan-out.
//!
//! [`Hub`] is this instance's registry of sessions, room members and users; it receives what
//! the broker delivers ([`Deliver`]) and queues it to local connections, serializing each
//! message once. [`Gateway`] joins the hub, the broker and the configuration; [`session`] runs
//! one connection.

pub mod queue;
pub mod session;
mod upkeep;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use futures_util::FutureExt;
use futures_util::future::Shared;
use serde_json::value::RawValue;

use crate::auth::rooms::RoomAccess;
use crate::auth::{Authenticator, Identity};
use crate::broker::{
    Broker, BrokerError, Control, Deliver, DirectKind, DirectMessage, InstanceInfo, MessageId,
    Occupant, PresenceDiff, PresenceEntry, Registry, RoomEvent, RoomName, Subscribed, Wanted,
};
use crate::config::Config;
use crate::protocol::{ServerFrame, close, format_ts};
use crate::telemetry::{metric, trace};
use crate::webhooks::Webhooks;
use queue::{EventMark, Mark, Pushed, SendQueue};

/// One WebSocket connection, as the rest of the instance sees it.
pub struct Session {
    /// Instance-local number.
    pub id: u64,
    /// Globally unique id, `<instance>:<n>` (the `session_id` of `welcome`).
    pub public_id: Arc<str>,
    pub identity: Identity,
    pub queue: SendQueue,
    /// Milliseconds since the hub started when the client last sent anything.
    last_seen_ms: AtomicU64,
    ping_outstanding: AtomicBool,
    /// Wakes the reader when the server starts closing the connection, or kicks it out of a
    /// room.
    closing: tokio::sync::Notify,
    kicked: Mutex<Vec<RoomName>>,
}

impl Session {
    /// Queues a frame, applying the overflow policy.
    pub fn send(&self, frame: Utf8Bytes) {
        self.push(frame, None);
    }

    /// Queues a room message (`Mark::Message`) or presence diff (`Mark::Presence`); if the
    /// overflow policy drops it, the loss is announced or made good.
    pub fn send_marked(&self, frame: Utf8Bytes, mark: &Mark) {
        self.push(frame, Some(mark));
    }

    fn push(&self, frame: Utf8Bytes, mark: Option<&Mark>) {
        match self.queue.push(frame, mark) {
            Pushed::Queued | Pushed::Closed => {}
            Pushed::Dropped => metric::dropped(self.queue.policy()),
            Pushed::Overflowed => {
                metric::dropped(self.queue.policy());
                self.closing.notify_one();
                tracing::info!(session = %self.public_id, "slow consumer disconnected");
            }
        }
    }

    pub fn send_text(&self, text: String) {
        self.send(Utf8Bytes::from(text));
    }

    /// Closes after the frames already queued.
    pub fn close(&self, code: u16, reason: impl Into<Utf8Bytes>) {
        if self.queue.close(code, reason, false) {
            self.closing.notify_one();
        }
    }

    /// Makes the connection leave `room` (the server API's unsubscribe): its reader does it.
    fn kick(&self, room: RoomName) {
        let mut kicked = self.kicked.lock();
        if !kicked.contains(&room) {
            kicked.push(room);
        }
        drop(kicked);
        self.closing.notify_one();
    }

    /// Rooms the server API removed this connection from since the last call.
    pub fn take_kicked(&self) -> Vec<RoomName> {
        std::mem::take(&mut *self.kicked.lock())
    }
}

/// A local member of a room.
struct Member {
    session: Arc<Session>,
    echo_self: bool,
    /// Set while a `since` replay is running: live events wait here instead of the queue.
    replay_buffer: Option<Arc<Mutex<ReplayBuffer>>>,
}

/// Live events held for a member while its `since` replay runs; bounded: once `max` are held,
/// later ones are not kept and the member is told to recover them (an overflow notice).
#[derive(Default)]
struct ReplayBuffer {
    events: Vec<Arc<RoomEvent>>,
    max: usize,
    /// Live events not held because the buffer was full.
    not_held: u64,
}

impl ReplayBuffer {
    /// Once one event was not held, none is: the loss is one contiguous run, announced
    /// from the last event given.
    fn hold(&mut self, event: Arc<RoomEvent>) {
        if self.not_held == 0 && self.events.len() < self.max {
            self.events.push(event);
        } else {
            self.not_held += 1;
        }
    }
}

struct Room {
    members: Vec<Member>,
    /// Resolves once the broker delivers this room here.
    subscribed: Shared<Subscribed>,
    /// The newest message delivered here: the `since` that recovers the next one.
    last_id: Mutex<MessageId>,
    /// Presence diffs delivered here so far: a presence state read while this moved may be
    /// older than a diff its members already got.
    presence_seq: AtomicU64,
}

/// This instance's sessions, rooms and users.
pub struct Hub {
    instance_id: Arc<str>,
    /// For the spans' `messaging.system`.
    broker_kind: &'static str,
    started: Instant,
    rooms: RwLock<HashMap<RoomName, Room>>,
    users: RwLock<HashMap<Arc<str>, Vec<Arc<Session>>>>,
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    /// Rooms and users whose local count changed since the occupancy index last heard of
    /// them (bounded by the rooms and users there are).
    dirty: Mutex<HashSet<Occupant>>,
    dirty_wake: tokio::sync::Notify,
    /// Rooms whose members missed presence diffs: all of them (`None`: the broker's
    /// subscription was lost) or the listed ones (their queues dropped a diff). They get the
    /// current presence again.
    stale_presence: Mutex<HashMap<RoomName, StaleMembers>>,
    stale_wake: tokio::sync::Notify,
}

/// Who of a room's members need its presence again: `None` for all.
pub type StaleMembers = Option<Vec<Arc<Session>>>;

/// How many connections an instance and one user on it may hold.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub per_instance: usize,
    pub per_user: usize,
}

/// Which connection limit refused a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionLimit {
    Instance,
    User,
}

impl ConnectionLimit {
    /// The metric label (the config key's last part).
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionLimit::Instance => "max_connections",
            ConnectionLimit::User => "max_connections_per_user",
        }
    }

    /// The close reason the client gets.
    pub fn reason(self) -> &'static str {
        match self {
            ConnectionLimit::Instance => "connection limit of this instance reached",
            ConnectionLimit::User => "connection limit of this user reached",
        }
    }
}

/// What `Hub::join` did.
pub struct Joined {
    pub subscribed: Shared<Subscribed>,
    pub already_member: bool,
}

impl Hub {
    pub fn new(instance_id: Arc<str>, broker_kind: &'static str) -> Self {
        Self {
            instance_id,
            broker_kind,
            started: Instant::now(),
            rooms: RwLock::default(),
            users: RwLock::default(),
            sessions: Mutex::default(),
            dirty: Mutex::default(),
            dirty_wake: tokio::sync::Notify::new(),
            stale_presence: Mutex::default(),
            stale_wake: tokio::sync::Notify::new(),
        }
    }

    fn mark_dirty(&self, who: Occupant) {
        if self.dirty.lock().insert(who) {
            self.dirty_wake.notify_one();
        }
    }

    /// How many presence diffs `room` got here so far (see [`Room::presence_seq`]).
    pub fn presence_seq(&self, room: &RoomName) -> u64 {
        self.rooms
            .read()
            .get(room)
            .map_or(0, |r| r.presence_seq.load(Ordering::Relaxed))
    }

    /// This instance's members of a room, or connections of a user.
    pub fn local_count(&self, who: &Occupant) -> usize {
        match who {
            Occupant::Room(room) => self.rooms.read().get(room).map_or(0, |r| r.members.len()),
            Occupant::User(user) => self.users.read().get(user).map_or(0, Vec::len),
        }
    }

    pub fn instance_id(&self) -> &Arc<str> {
        &self.instance_id
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn connections(&self) -> usize {
        self.sessions.lock().len()
    }

    pub fn room_count(&self) -> usize {
        self.rooms.read().len()
    }

    pub fn sessions(&self) -> Vec<Arc<Session>> {
        self.sessions.lock().values().cloned().collect()
    }

    /// Adds `session` to `room`, subscribing the room at the broker if it is the first member.
    /// With `replay = Some(max)`, up to `max` live events for this member are held until
    /// [`Hub::take_held`] ends the replay.
    fn join(
        &self,
        broker: &dyn Broker,
        registry: &dyn Registry,
        room: &RoomName,
        session: &Arc<Session>,
        echo_self: bool,
        replay: Option<usize>,
    ) -> Joined {
        let mut rooms = self.rooms.write();
        let entry = rooms.entry(room.clone()).or_insert_with(|| {
            metric::rooms_changed(1);
            // The room's messages, and its presence diffs.
            let messages = broker.subscribe(room);
            let presence = registry.watch(room);
            let subscribed: Subscribed = async move {
                messages.await?;
                presence.await
            }
            .boxed();
            Room {
                members: Vec::new(),
                subscribed: subscribed.shared(),
                last_id: Mutex::new(MessageId::ZERO),
                presence_seq: AtomicU64::new(0),
            }
        });
        let subscribed = entry.subscribed.clone();
        if let Some(m) = entry
            .members
            .iter_mut()
            .find(|m| m.session.id == session.id)
        {
            m.echo_self = echo_self;
            return Joined {
                subscribed,
                already_member: true,
            };
        }
        self.mark_dirty(Occupant::Room(room.clone()));
        entry.members.push(Member {
            session: session.clone(),
            echo_self,
            replay_buffer: replay.map(|max| {
                Arc::new(Mutex::new(ReplayBuffer {
                    max,
                    ..ReplayBuffer::default()
                }))
            }),
        });
        Joined {
            subscribed,
            already_member: false,
        }
    }

    /// Removes `session` from `room`; unsubscribes the room when it was the last member.
    /// Returns whether it was a member.
    fn leave(
        &self,
        broker: &dyn Broker,
        registry: &dyn Registry,
        room: &RoomName,
        session_id: u64,
    ) -> bool {
        let mut rooms = self.rooms.write();
        let Some(entry) = rooms.get_mut(room) else {
            return false;
        };
        let Some(i) = entry
            .members
            .iter()
            .position(|m| m.session.id == session_id)
        else {
            return false;
        };
        entry.members.swap_remove(i);
        self.mark_dirty(Occupant::Room(room.clone()));
        if entry.members.is_empty() {
            rooms.remove(room);
            broker.unsubscribe(room);
            registry.unwatch(room);
            metric::rooms_changed(-1);
        }
        true
    }

    /// Continues a `since` replay that got through `delivered_through`: returns the live
    /// events held meanwhile that are newer (the caller queues them with backpressure, then
    /// asks again), or, when none are left, ends the replay under the rooms lock, so no event
    /// slips between the buffer and the queue, and live delivery goes on from there. Events
    /// that were not held (the buffer was full) are announced with an overflow notice.
    fn take_held(
        &self,
        room: &RoomName,
        session_id: u64,
        delivered_through: MessageId,
    ) -> Vec<Arc<RoomEvent>> {
        let mut rooms = self.rooms.write();
        let Some(entry) = rooms.get_mut(room) else {
            return Vec::new();
        };
        let Some(member) = entry
            .members
            .iter_mut()
            .find(|m| m.session.id == session_id)
        else {
            return Vec::new();
        };
        let Some(buffer) = &member.replay_buffer else {
            return Vec::new();
        };
        let mut held = buffer.lock();
        let newer: Vec<Arc<RoomEvent>> = std::mem::take(&mut held.events)
            .into_iter()
            .filter(|e| e.id > delivered_through)
            .collect();
        if !newer.is_empty() {
            return newer;
        }
        let not_held = held.not_held;
        drop(held);
        member.replay_buffer = None;
        if not_held > 0 {
            // Live events after `delivered_through` were not held: still in history.
            metric::dropped_while_replaying(not_held);
            member.session.queue.announce_loss(room, delivered_through);
        }
        let mut last = entry.last_id.lock();
        *last = (*last).max(delivered_through);
        Vec::new()
    }

    /// Registers `session` unless a connection limit is reached; the first connection of a
    /// user subscribes the user's direct messages.
    fn add_session(
        &self,
        broker: &dyn Broker,
        session: &Arc<Session>,
        limits: ConnectionLimits,
    ) -> Result<Option<Subscribed>, ConnectionLimit> {
        // Both locks at once, so concurrent connects cannot overshoot either limit.
        let mut users = self.users.write();
        let mut sessions = self.sessions.lock();
        if sessions.len() >= limits.per_instance {
            return Err(ConnectionLimit::Instance);
        }
        let user = &session.identity.user_id;
        let list = users.entry(user.clone()).or_default();
        if list.len() >= limits.per_user {
            return Err(ConnectionLimit::User);
        }
        list.push(session.clone());
        self.mark_dirty(Occupant::User(user.clone()));
        sessions.insert(session.id, session.clone());
        metric::connections_changed(1);
        Ok((list.len() == 1).then(|| broker.subscribe_user(user)))
    }

    fn remove_session(&self, broker: &dyn Broker, session: &Session) {
        if self.sessions.lock().remove(&session.id).is_some() {
            metric::connections_changed(-1);
        }
        let mut users = self.users.write();
        let user = &session.identity.user_id;
        if let Some(list) = users.get_mut(user) {
            list.retain(|s| s.id != session.id);
            self.mark_dirty(Occupant::User(user.clone()));
            if list.is_empty() {
                users.remove(user);
                broker.unsubscribe_user(user);
            }
        }
    }

    /// Pings quiet connections, closes silent ones and those whose token expired.
    /// Tokens count as expired `leeway` after their `exp`, as at connect.
    pub fn sweep(&self, idle_timeout: Duration, ping_interval: Duration, leeway: Duration) {
        let now = self.now_ms();
        let now_unix = (crate::protocol::now_ms() / 1000).saturating_sub(leeway.as_secs());
        for session in self.sessions() {
            let quiet = now.saturating_sub(session.last_seen_ms.load(Ordering::Relaxed));
            if quiet >= idle_timeout.as_millis() as u64 {
                session.close(close::NORMAL, "idle timeout");
            } else if session.identity.expires_at <= now_unix {
                session.close(close::POLICY, "token expired");
            } else if quiet >= ping_interval.as_millis() as u64
                && !session.ping_outstanding.swap(true, Ordering::Relaxed)
            {
                session.queue.ping();
            }
        }
    }
}

impl Hub {
    /// A server API command for the local connections of `msg.to`. One lock at a time: the
    /// users map for a disconnect, the room for an unsubscribe (only members are kicked, so a
    /// connection's kick list stays within its rooms whatever the broker carries).
    fn control(&self, msg: &DirectMessage) {
        // Checked by the decoder; a command that does not parse is ignored.
        match serde_json::from_str::<Control>(msg.data.get()).map(|c| (c.is_valid(), c)) {
            Ok((false, _)) => tracing::warn!("invalid control command ignored"),
            Ok((true, Control::Disconnect { code, reason })) => {
                let users = self.users.read();
                let sessions = users.get(&msg.to).map_or(&[][..], Vec::as_slice);
                for s in sessions {
                    s.close(code, reason.clone());
                }
                tracing::info!(user = %msg.to, connections = sessions.len(), code, "disconnected by the server API");
            }
            Ok((true, Control::Unsubscribe { room })) => {
                let rooms = self.rooms.read();
                if let Some((name, entry)) = rooms.get_key_value(room.as_str()) {
                    for m in &entry.members {
                        if m.session.identity.user_id == msg.to {
                            m.session.kick(name.clone());
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "unreadable control command"),
        }
    }
}

/// `message`/`system` frame of a stored event: what every local recipient gets.
pub fn room_event_frame(event: &RoomEvent) -> Utf8Bytes {
    let ts = format_ts(event.msg.ts_ms);
    let id = event.id.to_string();
    let frame = ServerFrame {
        ts: Some(&ts),
        sender_id: event.msg.sender_id.as_deref(),
        id: Some(&id),
        ..ServerFrame::new(
            event.msg.kind.as_str(),
            Some(&event.msg.room),
            &*event.msg.data,
        )
    };
    Utf8Bytes::from(frame.to_json())
}

pub fn presence_map(entries: &[PresenceEntry]) -> serde_json::Map<String, serde_json::Value> {
    let mut map = serde_json::Map::new();
    for e in entries {
        let meta: serde_json::Value =
            serde_json::from_str(e.meta.get()).unwrap_or(serde_json::Value::Null);
        match map
            .entry(e.user_id.to_string())
            .or_insert_with(|| serde_json::Value::Array(vec![]))
        {
            serde_json::Value::Array(list) => list.push(meta),
            _ => unreachable!("presence lists are arrays"),
        }
    }
    map
}

impl Deliver for Hub {
    fn presence_stale(&self, rooms: Vec<RoomName>) {
        let here: Vec<RoomName> = {
            let local = self.rooms.read();
            rooms
                .into_iter()
                .filter(|r| local.contains_key(r))
                .collect()
        };
        self.mark_presence_stale(here.into_iter().map(|room| (room, None)));
    }

    fn lost(&self, room: &RoomName, since: MessageId) {
        let rooms = self.rooms.read();
        if let Some(room_entry) = rooms.get(room) {
            for member in &room_entry.members {
                member.session.queue.announce_loss(room, since);
            }
        }
    }

    fn wanted(&self) -> Wanted {
        Wanted {
            rooms: self
                .rooms
                .read()
                .iter()
                .map(|(name, room)| (name.clone(), *room.last_id.lock()))
                .collect(),
            users: self.users.read().keys().cloned().collect(),
        }
    }

    fn room_event(&self, event: Arc<RoomEvent>) {
        let span = match &event.msg.traceparent {
            Some(tp) if trace::enabled() => {
                Some(trace::process_span(&event.msg.room, self.broker_kind, tp))
            }
            _ => None,
        };
        let _entered = span.as_ref().map(tracing::Span::enter);
        // Serialize once; every recipient shares the bytes.
        let frame = room_event_frame(&event);
        let own_origin = event
            .msg
            .origin
            .as_ref()
            .filter(|o| o.instance == self.instance_id)
            .map(|o| o.session);
        let rooms = self.rooms.read();
        let Some(room) = rooms.get(&event.msg.room) else {
            return;
        };
        let prev = {
            let mut last = room.last_id.lock();
            // The broker knows what was stored before the room's first delivery here.
            let prev = (*last).max(event.prev);
            *last = prev.max(event.id);
            prev
        };
        let mark = Mark::Message(Arc::new(EventMark {
            room: event.msg.room.clone(),
            prev,
        }));
        metric::delivery_latency(event.msg.ts_ms);
        let mut delivered = 0u64;
        for member in &room.members {
            if !member.echo_self && Some(member.session.id) == own_origin {
                continue;
            }
            if let Some(buffer) = &member.replay_buffer {
                buffer.lock().hold(event.clone());
                continue;
            }
            member.session.send_marked(frame.clone(), &mark);
            delivered += 1;
        }
        metric::delivered(event.msg.kind.as_str(), delivered);
        metric::bytes_out(delivered * frame.len() as u64);
        tracing::debug!(room = %event.msg.room, id = %event.id, recipients = delivered, "fan-out");
        if let Some(span) = &span {
            span.record("rtgate.recipients", delivered);
            span.record("messaging.message.id", event.id.to_string());
        }
    }

    fn direct(&self, msg: Arc<DirectMessage>) {
        if msg.kind == DirectKind::Control {
            self.control(&msg);
            return;
        }
        let users = self.users.read();
        let Some(sessions) = users.get(&msg.to) else {
            return;
        };
        let ts = format_ts(msg.ts_ms);
        let frame = Utf8Bytes::from(
            ServerFrame {
                ts: Some(&ts),
                sender_id: Some(&msg.sender_id),
                ..ServerFrame::new("direct", None, &*msg.data)
            }
            .to_json(),
        );
        for s in sessions {
            s.send(frame.clone());
        }
        metric::delivered("direct", sessions.len() as u64);
        metric::bytes_out(sessions.len() as u64 * frame.len() as u64);
    }

    fn presence(&self, diff: Arc<PresenceDiff>) {
        let data = serde_json::json!({
            "joins": presence_map(&diff.joins),
            "leaves": presence_map(&diff.leaves),
        });
        let frame =
            Utf8Bytes::from(ServerFrame::new("presence_diff", Some(&diff.room), &data).to_json());
        let mark = Mark::Presence(diff.room.clone());
        let rooms = self.rooms.read();
        if let Some(room) = rooms.get(&diff.room) {
            room.presence_seq.fetch_add(1, Ordering::Relaxed);
            for m in &room.members {
                m.session.send_marked(frame.clone(), &mark);
            }
        }
    }
}

/// The instance: hub, broker, registry, auth and configuration.
pub struct Gateway {
    pub config: Arc<Config>,
    pub auth: Authenticator,
    /// Who may use which room (`[[rooms.rules]]`, the app's authorize endpoint).
    pub access: RoomAccess,
    pub webhooks: Arc<Webhooks>,
    pub broker: Arc<dyn Broker>,
    /// Presence and instances.
    pub registry: Arc<dyn Registry>,
    pub hub: Arc<Hub>,
    pub started_at: String,
    /// Address other instances and operators reach this one at (for heartbeats).
    pub advertised_address: String,
    draining: AtomicBool,
    next_session: AtomicU64,
}

impl Gateway {
    pub fn new(
        config: Arc<Config>,
        auth: Authenticator,
        broker: Arc<dyn Broker>,
        registry: Arc<dyn Registry>,
        hub: Arc<Hub>,
        advertised_address: String,
    ) -> anyhow::Result<Self> {
        let access = RoomAccess::new(&config.rooms)?
            .with_meta_limits(config.ws.max_presence_bytes, config.ws.max_json_depth);
        let webhooks = Webhooks::new(config.webhooks.clone(), hub.instance_id().clone());
        Ok(Self {
            config,
            auth,
            access,
            webhooks,
            broker,
            registry,
            hub,
            started_at: format_ts(crate::protocol::now_ms()),
            advertised_address,
            draining: AtomicBool::new(false),
            next_session: AtomicU64::new(1),
        })
    }

    /// Removes a connection's presence in `room`, announcing the leave to the webhooks.
    pub(crate) async fn untrack(&self, room: &RoomName, session: &Session) {
        match self.registry.untrack(room, &session.public_id).await {
            Ok(true) => {
                self.webhooks
                    .presence_leave(room, &session.identity.user_id, &session.public_id)
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, room = %room, "presence cleanup failed"),
        }
    }

    /// A server API command for every connection of `user`, on every instance.
    pub async fn control(&self, user: &str, command: &Control) -> Result<(), BrokerError> {
        let data = serde_json::value::to_raw_value(command)
            .map_err(|e| BrokerError::Other(e.to_string()))?;
        self.broker
            .send_direct(DirectMessage {
                kind: DirectKind::Control,
                to: Arc::from(user),
                data,
                sender_id: Arc::from(CONTROL_SENDER),
                ts_ms: crate::protocol::now_ms(),
                traceparent: None,
            })
            .await
    }

    pub fn instance_id(&self) -> &Arc<str> {
        self.hub.instance_id()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.broker.is_ready() && self.registry.is_ready()
    }

    pub fn instance_info(&self) -> InstanceInfo {
        InstanceInfo {
            id: self.instance_id().to_string(),
            address: self.advertised_address.clone(),
            started_at: self.started_at.clone(),
            connections: self.hub.connections(),
            version: crate::VERSION.to_string(),
        }
    }

    /// Registers a new connection, unless a connection limit refuses it.
    fn open_session(
        &self,
        identity: Identity,
    ) -> Result<(Arc<Session>, Option<Subscribed>), ConnectionLimit> {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let ws = &self.config.ws;
        let session = Arc::new(Session {
            id,
            public_id: format!("{}:{id}", self.instance_id()).into(),
            identity,
            queue: SendQueue::new(
                ws.send_queue_max,
                ws.send_queue_max_bytes,
                ws.overflow_policy,
            ),
            last_seen_ms: AtomicU64::new(self.hub.now_ms()),
            ping_outstanding: AtomicBool::new(false),
            closing: tokio::sync::Notify::new(),
            kicked: Mutex::default(),
        });
        let limits = ConnectionLimits {
            per_instance: self.config.server.max_connections,
            per_user: self.config.server.max_connections_per_user,
        };
        let user_subscribed = self.hub.add_session(&*self.broker, &session, limits)?;
        Ok((session, user_subscribed))
    }

    /// Records that the client sent something.
    fn touch(&self, session: &Session) {
        session
            .last_seen_ms
            .store(self.hub.now_ms(), Ordering::Relaxed);
        session.ping_outstanding.store(false, Ordering::Relaxed);
    }

    /// Leaves every room, drops presence and unregisters the connection.
    async fn close_session(&self, session: &Arc<Session>, rooms: &[RoomName]) {
        for room in rooms {
            self.hub
                .leave(&*self.broker, &*self.registry, room, session.id);
            self.untrack(room, session).await;
        }
        self.hub.remove_session(&*self.broker, session);
        // Stops the writer if the client went away without a close handshake.
        session.queue.close(close::NORMAL, "", true);
    }

    /// Starts draining: readiness turns false, every client gets a `system` notice and is
    /// closed with 1001. Returns once all connections ended or `grace` passed.
    pub async fn drain(&self, grace: Duration) {
        self.draining.store(true, Ordering::SeqCst);
        metric::draining();
        let notice = Utf8Bytes::from(
            ServerFrame::new(
                "system",
                None,
                &serde_json::json!({"event": "draining", "grace_ms": grace.as_millis() as u64}),
            )
            .to_json(),
        );
        let sessions = self.hub.sessions();
        tracing::info!(connections = sessions.len(), "draining");
        for s in &sessions {
            s.send(notice.clone());
            s.close(close::GOING_AWAY, "server shutting down");
        }
        let deadline = Instant::now() + grace;
        while self.hub.connections() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The sender id of server API commands (never a user's: user ids come from tokens).
const CONTROL_SENDER: &str = "rtgate:server-api";

/// Builds the meta stored for a tracked connection: the backend's defaults (if any), the
/// client's object over them, plus `session_id`.
fn presence_meta(
    data: Option<&RawValue>,
    defaults: Option<&RawValue>,
    session: &Session,
) -> Result<Box<RawValue>, ()> {
    let object = |raw: &RawValue| match serde_json::from_str::<serde_json::Value>(raw.get()) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        _ => Err(()),
    };
    let mut meta = match defaults {
        Some(d) => object(d).unwrap_or_default(),
        None => serde_json::Map::new(),
    };
    if let Some(raw) = data {
        meta.extend(object(raw)?);
    }
    meta.insert(
        "session_id".into(),
        serde_json::Value::String(session.public_id.to_string()),
    );
    serde_json::value::to_raw_value(&meta).map_err(|_| ())
}

pub(crate) fn unavailable_message(e: &BrokerError) -> String {
    match e {
        BrokerError::Unavailable(why) => format!("broker unavailable, retry later: {why}"),
        BrokerError::Other(why) => format!("broker error: {why}"),
    }
}
