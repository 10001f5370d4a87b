//! In-process broker for a single instance: bounded history per room, presence, direct
//! messages. Deliveries happen under the room's history lock so they leave in id order.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use futures_util::FutureExt;

use super::idempotency::{self, LocalIdempotency};
use super::{
    Broker, BrokerError, Deliver, DirectMessage, Edge, History, InstanceInfo, MessageId, Occupant,
    PresenceDiff, PresenceEntry, Reaped, Registry, RoomEvent, RoomMessage, RoomName, Subscribed,
    Tracked,
};

#[derive(Default)]
struct RoomLog {
    events: VecDeque<Arc<RoomEvent>>,
    /// Newest id trimmed out of `events`: a `since` older than this has a gap.
    trimmed_through: Option<MessageId>,
}

#[derive(Default)]
struct IdClock {
    last: MessageId,
}

impl IdClock {
    /// Redis-style ids: milliseconds, then a sequence within the millisecond; never backwards.
    fn next(&mut self, now_ms: u64) -> MessageId {
        self.last = if now_ms > self.last.hi {
            MessageId::new(now_ms, 0)
        } else {
            MessageId::new(self.last.hi, self.last.lo + 1)
        };
        self.last
    }
}

pub struct MemoryBroker {
    sink: Arc<dyn Deliver>,
    history_size: usize,
    clock: Mutex<IdClock>,
    logs: Mutex<HashMap<RoomName, RoomLog>>,
    subscribed: Mutex<HashSet<RoomName>>,
    /// Rooms whose presence diffs this instance wants.
    watched: Mutex<HashSet<RoomName>>,
    users: Mutex<HashSet<Arc<str>>>,
    presence: Mutex<HashMap<RoomName, Vec<PresenceEntry>>>,
    me: Mutex<Option<InstanceInfo>>,
    /// Room members and user connections here (the only instance).
    occupancy: Mutex<HashMap<Occupant, usize>>,
    idempotency: LocalIdempotency,
    idempotency_window: Duration,
}

impl MemoryBroker {
    pub fn new(sink: Arc<dyn Deliver>, history_size: usize) -> Self {
        Self {
            sink,
            history_size,
            clock: Mutex::default(),
            logs: Mutex::default(),
            subscribed: Mutex::default(),
            watched: Mutex::default(),
            users: Mutex::default(),
            presence: Mutex::default(),
            me: Mutex::default(),
            occupancy: Mutex::default(),
            idempotency: LocalIdempotency::new(100_000),
            idempotency_window: Duration::from_secs(300),
        }
    }

    /// How long and how many `idempotency_key`s are remembered.
    pub fn with_idempotency(mut self, window: Duration, max_keys: usize) -> Self {
        self.idempotency = LocalIdempotency::new(max_keys);
        self.idempotency_window = window;
        self
    }

    fn announce(&self, diff: PresenceDiff) {
        if self.watched.lock().contains(&diff.room) {
            self.sink.presence(Arc::new(diff));
        }
    }
}

fn ready() -> Subscribed {
    futures_util::future::ready(Ok(())).boxed()
}

#[async_trait::async_trait]
impl Broker for MemoryBroker {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn is_ready(&self) -> bool {
        true
    }

    async fn publish(&self, msg: RoomMessage) -> Result<MessageId, BrokerError> {
        let mut logs = self.logs.lock();
        // Checked and recorded under the log lock: a repeat can never race its first.
        let scope = idempotency::scope(&msg);
        if let Some(first) = scope.as_deref().and_then(|s| self.idempotency.lookup(s)) {
            crate::telemetry::metric::idempotent_repeat();
            return Ok(first);
        }
        let id = self.clock.lock().next(msg.ts_ms);
        if let Some(scope) = &scope {
            self.idempotency.record(scope, id, self.idempotency_window);
        }
        let log = logs.entry(msg.room.clone()).or_default();
        let prev = log
            .events
            .back()
            .map(|e| e.id)
            .or(log.trimmed_through)
            .unwrap_or(MessageId::ZERO);
        let event = Arc::new(RoomEvent { id, msg, prev });
        log.events.push_back(event.clone());
        while log.events.len() > self.history_size {
            if let Some(old) = log.events.pop_front() {
                log.trimmed_through = Some(old.id);
            }
        }
        // Still under the log lock: concurrent publishes reach subscribers in id order.
        if self.subscribed.lock().contains(&event.msg.room) {
            self.sink.room_event(event);
        }
        Ok(id)
    }

    fn subscribe(&self, room: &RoomName) -> Subscribed {
        self.subscribed.lock().insert(room.clone());
        ready()
    }

    fn unsubscribe(&self, room: &RoomName) {
        self.subscribed.lock().remove(room);
    }

    async fn history_after(
        &self,
        room: &RoomName,
        after: MessageId,
        limit: usize,
    ) -> Result<History, BrokerError> {
        let logs = self.logs.lock();
        let Some(log) = logs.get(room) else {
            // Nothing retained: a `since` names history this process no longer has (a restart).
            return Ok(History {
                events: Vec::new(),
                gap: after != MessageId::ZERO,
            });
        };
        let start = log.events.partition_point(|e| e.id <= after);
        let newer = log.events.len() - start;
        let skip = newer.saturating_sub(limit);
        // `since` must be a retained id, or the newest trimmed one; any other id is history
        // this process lost (or never had), so what follows it may be incomplete.
        let known = after == MessageId::ZERO
            || log.trimmed_through == Some(after)
            || (start > 0 && log.events[start - 1].id == after);
        Ok(History {
            events: log.events.iter().skip(start + skip).cloned().collect(),
            gap: skip > 0 || !known || log.trimmed_through.is_some_and(|t| t > after),
        })
    }

    async fn send_direct(&self, msg: DirectMessage) -> Result<(), BrokerError> {
        if self.users.lock().contains(&msg.to) {
            self.sink.direct(Arc::new(msg));
        }
        Ok(())
    }

    fn subscribe_user(&self, user: &Arc<str>) -> Subscribed {
        self.users.lock().insert(user.clone());
        ready()
    }

    fn unsubscribe_user(&self, user: &Arc<str>) {
        self.users.lock().remove(user);
    }
}

#[async_trait::async_trait]
impl Registry for MemoryBroker {
    fn is_ready(&self) -> bool {
        true
    }

    fn watch(&self, room: &RoomName) -> Subscribed {
        self.watched.lock().insert(room.clone());
        ready()
    }

    fn unwatch(&self, room: &RoomName) {
        self.watched.lock().remove(room);
    }

    async fn track(
        &self,
        room: &RoomName,
        entry: PresenceEntry,
        max_entries: usize,
    ) -> Result<Tracked, BrokerError> {
        let replaced = {
            let mut presence = self.presence.lock();
            let entries = presence.entry(room.clone()).or_default();
            let old = entries.iter().position(|e| e.conn_id == entry.conn_id);
            if old.is_none() && entries.len() >= max_entries {
                if entries.is_empty() {
                    presence.remove(room);
                }
                return Ok(Tracked::RoomFull);
            }
            let old = old.map(|i| entries.swap_remove(i));
            entries.push(entry.clone());
            old
        };
        let replaced_any = replaced.is_some();
        self.announce(PresenceDiff {
            room: room.clone(),
            joins: vec![entry],
            leaves: replaced.into_iter().collect(),
        });
        Ok(if replaced_any {
            Tracked::Replaced
        } else {
            Tracked::Added
        })
    }

    async fn untrack(&self, room: &RoomName, conn_id: &Arc<str>) -> Result<bool, BrokerError> {
        let removed = {
            let mut presence = self.presence.lock();
            let Some(entries) = presence.get_mut(room) else {
                return Ok(false);
            };
            let removed = entries
                .iter()
                .position(|e| &e.conn_id == conn_id)
                .map(|i| entries.swap_remove(i));
            if entries.is_empty() {
                presence.remove(room);
            }
            removed
        };
        let was_there = removed.is_some();
        if let Some(entry) = removed {
            self.announce(PresenceDiff {
                room: room.clone(),
                joins: vec![],
                leaves: vec![entry],
            });
        }
        Ok(was_there)
    }

    async fn presence(&self, room: &RoomName) -> Result<Vec<PresenceEntry>, BrokerError> {
        Ok(self.presence.lock().get(room).cloned().unwrap_or_default())
    }

    async fn heartbeat(&self, me: &InstanceInfo) -> Result<Reaped, BrokerError> {
        *self.me.lock() = Some(me.clone());
        Ok(Reaped::default())
    }

    async fn instances(&self) -> Result<Vec<InstanceInfo>, BrokerError> {
        Ok(self.me.lock().iter().cloned().collect())
    }

    async fn set_local_count(
        &self,
        who: &Occupant,
        count: usize,
    ) -> Result<Option<Edge>, BrokerError> {
        let mut occupancy = self.occupancy.lock();
        let before = if count == 0 {
            occupancy.remove(who)
        } else {
            occupancy.insert(who.clone(), count)
        };
        Ok(match (before.is_some(), count > 0) {
            (false, true) => Some(Edge::Occupied),
            (true, false) => Some(Edge::Vacated),
            _ => None,
        })
    }

    async fn count(&self, who: &Occupant) -> Result<u64, BrokerError> {
        Ok(self.occupancy.lock().get(who).copied().unwrap_or(0) as u64)
    }

    async fn rooms(&self, after: &str, limit: usize) -> Result<Vec<(RoomName, u64)>, BrokerError> {
        let mut rooms: Vec<(RoomName, u64)> = self
            .occupancy
            .lock()
            .iter()
            .filter_map(|(who, n)| match who {
                Occupant::Room(r) if &**r > after => Some((r.clone(), *n as u64)),
                _ => None,
            })
            .collect();
        rooms.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        rooms.truncate(limit);
        Ok(rooms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_within_a_millisecond_and_across_clock_steps_back() {
        let mut c = IdClock::default();
        let a = c.next(100);
        let b = c.next(100);
        let d = c.next(99);
        let e = c.next(101);
        assert!(a < b && b < d && d < e, "{a} {b} {d} {e}");
        assert_eq!(e.to_string(), "101-0");
        assert_eq!("101-0".parse::<MessageId>().unwrap(), e);
    }
}
