//! An instance's background work: the cluster-wide occupancy index, presence sent again
//! where diffs were lost, heartbeats (and the reaping of dead instances) and the liveness
//! sweep. Each `run_*` task runs under a supervisor (see `main.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use super::queue::Mark;
use super::{Gateway, Hub, Session, StaleMembers, presence_map};
use crate::broker::{BrokerError, Edge, Occupant, RoomName};
use crate::protocol::ServerFrame;
use crate::telemetry::metric;

impl Hub {
    /// Waits until some room or user count changed, then returns what changed.
    pub async fn changed_occupancy(&self) -> Vec<Occupant> {
        loop {
            // Taken, not drained: a burst of connects must not leave its capacity behind.
            let changed = std::mem::take(&mut *self.dirty.lock());
            if !changed.is_empty() {
                return changed.into_iter().collect();
            }
            self.dirty_wake.notified().await;
        }
    }

    /// Waits until some room's presence went stale here, then returns those rooms and who
    /// needs it.
    pub async fn stale_presence(&self) -> Vec<(RoomName, StaleMembers)> {
        loop {
            let stale = std::mem::take(&mut *self.stale_presence.lock());
            if !stale.is_empty() {
                return stale.into_iter().collect();
            }
            self.stale_wake.notified().await;
        }
    }

    /// Marks rooms whose presence must be sent again: to every member (`None`), or to these.
    pub fn mark_presence_stale(&self, stale: impl IntoIterator<Item = (RoomName, StaleMembers)>) {
        let mut pending = self.stale_presence.lock();
        for (room, who) in stale {
            let entry = pending.entry(room).or_insert_with(|| Some(Vec::new()));
            match (entry.as_mut(), who) {
                (None, _) => {}
                (Some(_), None) => *entry = None,
                (Some(list), Some(more)) => {
                    for s in more {
                        if !list.iter().any(|l| l.id == s.id) {
                            list.push(s);
                        }
                    }
                }
            }
        }
        if !pending.is_empty() {
            self.stale_wake.notify_one();
        }
    }

    /// A connection's queue dropped presence diffs of `rooms`.
    pub fn presence_lost(&self, session: &Arc<Session>, rooms: Vec<RoomName>) {
        self.mark_presence_stale(
            rooms
                .into_iter()
                .map(|room| (room, Some(vec![session.clone()]))),
        );
    }

    /// Sends `frame` (a room's presence) to its local members, all or those of `who` still
    /// there, through the bounded queue like a diff: one the overflow policy drops is asked
    /// for again once that client reads.
    fn send_presence(&self, room: &RoomName, who: &StaleMembers, frame: &Utf8Bytes) -> usize {
        let rooms = self.rooms.read();
        let Some(entry) = rooms.get(room) else {
            return 0;
        };
        let mark = Mark::Presence(room.clone());
        let mut sent = 0;
        for m in &entry.members {
            if who
                .as_ref()
                .is_none_or(|list| list.iter().any(|s| s.id == m.session.id))
            {
                m.session.send_marked(frame.clone(), &mark);
                sent += 1;
            }
        }
        sent
    }

    /// Marks again what could not be recorded (the broker was down).
    pub fn retry_occupancy(&self, who: Vec<Occupant>) {
        self.dirty.lock().extend(who);
    }
}

impl Gateway {
    /// Keeps the cluster-wide occupancy index in step with this instance's rooms and users,
    /// one write per changed room or user (changes coalesce while a write runs), and reports
    /// the rooms that became occupied or vacated everywhere to the webhooks.
    pub async fn run_occupancy(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let changed = tokio::select! {
                changed = self.hub.changed_occupancy() => changed,
                _ = stop.cancelled() => return,
            };
            if !self.record_occupancy(changed).await {
                // The broker is down: try again shortly (what changed meanwhile coalesces).
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }

    /// Writes the current local counts of `changed`; false if some could not be written (they
    /// are marked again).
    async fn record_occupancy(&self, changed: Vec<Occupant>) -> bool {
        let mut failed = Vec::new();
        for who in changed {
            if let Occupant::Room(room) = &who
                && crate::supervise::injected("slow-index", room)
            {
                // Test-only: the index lags behind this room's first join.
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            let count = self.hub.local_count(&who);
            match self.registry.set_local_count(&who, count).await {
                Ok(Some(edge)) => {
                    if let Occupant::Room(room) = &who {
                        self.webhooks.room(room, edge);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "occupancy not recorded; retrying");
                    failed.push(who);
                }
            }
        }
        let ok = failed.is_empty();
        self.hub.retry_occupancy(failed);
        ok
    }

    /// Sends the current presence (`presence_state`) again to the members of rooms whose
    /// presence diffs were lost (with the broker's subscription, or dropped by a member's
    /// overflow policy), so that no client keeps a stale view.
    pub async fn run_presence_resync(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let rooms = tokio::select! {
                rooms = self.hub.stale_presence() => rooms,
                _ = stop.cancelled() => return,
            };
            let mut again = Vec::new();
            for (room, who) in rooms {
                let seq = self.hub.presence_seq(&room);
                match self.registry.presence(&room).await {
                    Ok(entries) => {
                        let state = serde_json::Value::Object(presence_map(&entries));
                        let frame = Utf8Bytes::from(
                            ServerFrame::new("presence_state", Some(&room), &state).to_json(),
                        );
                        let members = self.hub.send_presence(&room, &who, &frame);
                        metric::presence_resent(members as u64);
                        if self.hub.presence_seq(&room) != seq {
                            // A diff overtook this state: read it again (the next round).
                            again.push((room, who));
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, room = %room, "presence not sent again; retrying");
                        again.push((room, who));
                    }
                }
            }
            if !again.is_empty() {
                self.hub.mark_presence_stale(again);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }

    /// After the drain: the last occupancy changes (every room left), bounded by `limit`.
    pub async fn flush_occupancy(&self, limit: Duration) {
        let changed: Vec<Occupant> = std::mem::take(&mut *self.hub.dirty.lock())
            .into_iter()
            .collect();
        if changed.is_empty() {
            return;
        }
        if tokio::time::timeout(limit, self.record_occupancy(changed))
            .await
            .is_err()
        {
            tracing::warn!("occupancy not recorded before shutdown; other instances reap it");
        }
    }

    /// Records this instance as alive. What it removed of dead instances goes to the
    /// webhooks: their presence entries as `presence_leave`, then the rooms left empty.
    pub async fn heartbeat(&self) -> Result<(), BrokerError> {
        let reaped = self.registry.heartbeat(&self.instance_info()).await?;
        for (room, entry) in &reaped.left {
            self.webhooks
                .presence_leave(room, &entry.user_id, &entry.conn_id);
        }
        for room in &reaped.vacated {
            self.webhooks.room(room, Edge::Vacated);
        }
        Ok(())
    }

    /// Periodic work: liveness sweep and heartbeat.
    pub async fn run_maintenance(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut last_heartbeat: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let ws = &self.config.ws;
            self.hub.sweep(
                ws.idle_timeout,
                ws.ping_interval,
                self.config.auth.jwt_leeway,
            );
            metric::broker_ready(self.broker.is_ready() && self.registry.is_ready());
            if let Some(t) = last_heartbeat {
                metric::heartbeat_age(t.elapsed());
            }
            // A failed heartbeat is retried on the next tick once the broker is back.
            let due = last_heartbeat.is_none_or(|t| t.elapsed() >= self.config.heartbeat.interval);
            if due && self.registry.is_ready() {
                match self.heartbeat().await {
                    Ok(()) => last_heartbeat = Some(Instant::now()),
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
                metric::upkeep();
            }
        }
    }
}
