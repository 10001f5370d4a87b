//! The supervisor: owns the Pub/Sub connection, resubscribes and catches up after every
//! reconnect, delivers, and runs the self-probe.

use super::*;

/// What the supervisor keeps across reconnects.
#[derive(Default)]
pub(super) struct Subscriptions {
    /// Rooms wanted, with the last id delivered here.
    pub(super) rooms: HashMap<RoomName, MessageId>,
    /// Users wanted, with the last direct message id delivered here.
    pub(super) users: HashMap<Arc<str>, MessageId>,
    /// Rooms taken over from a run that ended by a fault with nothing delivered yet: they
    /// start from the stream's newest id, not from its beginning.
    pub(super) start_at_newest: Vec<RoomName>,
    /// Users whose last direct id is not known (subscribed while Redis was down, or taken over
    /// after a fault): they start from their direct stream's newest id.
    pub(super) users_at_newest: Vec<Arc<str>>,
}

impl Subscriptions {
    /// What the gateway still wants, after a restart.
    fn from_wanted(wanted: crate::broker::Wanted) -> Self {
        let mut subs = Subscriptions::default();
        for (room, last) in wanted.rooms {
            if last == MessageId::ZERO {
                subs.start_at_newest.push(room.clone());
            }
            subs.rooms.insert(room, last);
        }
        for user in wanted.users {
            subs.users.insert(user.clone(), MessageId::ZERO);
            subs.users_at_newest.push(user);
        }
        subs
    }
}

/// One run of the subscriber: (re)connects and serves until the broker is dropped. A panic
/// ends the run; the next one (see [`supervise::spawn`]) rebuilds the subscriptions from what
/// the gateway wants and catches every room up from its last delivered id.
pub(super) async fn supervise(
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

/// Test-only fault injection (see [`supervise::injected`]): the connection is lost with the
/// first presence diff of the room `public:fault-cut`, or the first direct message to the
/// user `public:fault-cut-direct`, unread.
fn cut_by_fault(msg: &redis::Msg) -> bool {
    if !cfg!(debug_assertions) {
        return false;
    }
    let channel = msg.get_channel_name();
    if let Some(user) = channel.strip_prefix(names::USER_PREFIX) {
        return supervise::injected("cut-direct", user);
    }
    channel
        .strip_prefix(names::ROOM_PREFIX)
        .is_some_and(|room| {
            msg.get_payload_bytes()
                .starts_with(br#"{"type":"presence_diff""#)
                && supervise::injected("cut", room)
        })
}

/// While no master is reachable, keep the wanted set current and refuse new subscriptions.
pub(super) fn refuse_while_down(cmd: Command, subs: &mut Subscriptions) {
    match cmd {
        Command::SubscribeRoom(_, done) => {
            // The gateway undoes the join; the client may retry.
            let _ = done.send(Err(unavailable("no Redis master reachable")));
        }
        Command::UnsubscribeRoom(room) => {
            subs.rooms.remove(&room);
        }
        Command::SubscribeUser(user, done) => {
            if !subs.users.contains_key(&user) {
                subs.users.insert(user.clone(), MessageId::ZERO);
                subs.users_at_newest.push(user);
            }
            let _ = done.send(Ok(()));
        }
        Command::UnsubscribeUser(user) => {
            subs.users.remove(&user);
        }
    }
}

/// Runs on one master until it fails. `Some(())` when the broker is dropped.
pub(super) async fn serve(
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
    for user in std::mem::take(&mut subs.users_at_newest) {
        let Ok(newest) = newest_stream_id(&mut master, &names::direct_stream(&user)).await else {
            subs.users_at_newest.push(user);
            return None;
        };
        if let Some(last) = subs.users.get_mut(&user) {
            *last = (*last).max(newest);
        }
    }
    let wanted: Vec<RoomName> = subs.rooms.keys().cloned().collect();
    for room in &wanted {
        if catch_up(shared, &mut master, room, subs, None)
            .await
            .is_err()
        {
            return None;
        }
    }
    // Messages were caught up from the streams; presence diffs have no stream.
    if !wanted.is_empty() {
        shared.sink.presence_stale(wanted);
    }
    let users: Vec<Arc<str>> = subs.users.keys().cloned().collect();
    for user in &users {
        if catch_up_directs(shared, &mut master, user, subs)
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
                    if cut_by_fault(&msg) {
                        return None;
                    }
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
pub(super) struct Probe {
    pub(super) seq: u64,
    /// When the outstanding probe was sent; `None` once it came back.
    pub(super) outstanding: Option<Instant>,
    pub(super) last_sent: Option<Instant>,
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

pub(super) async fn next_switch(switch: &mut Option<redis::aio::PubSubStream>) -> String {
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

pub(super) async fn apply(
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
            if subs.users.contains_key(&user) {
                let _ = done.send(Ok(()));
                return Ok(());
            }
            // As for a room: the newest id, subscribe, then what came in between.
            let newest = match newest_stream_id(master, &names::direct_stream(&user)).await {
                Ok(id) => id,
                Err(e) => {
                    // Still wanted: the reconnect this error leads to subscribes it.
                    subs.users.insert(user.clone(), MessageId::ZERO);
                    subs.users_at_newest.push(user);
                    let _ = done.send(Err(unavailable(&e)));
                    return Err(e);
                }
            };
            subs.users.insert(user.clone(), newest);
            let mut result = sink.subscribe(names::user_channel(&user)).await;
            if result.is_ok() {
                result = catch_up_directs(shared, master, &user, subs).await;
            }
            let _ = done.send(result.as_ref().map(|_| ()).map_err(unavailable));
            result
        }
        Command::UnsubscribeUser(user) => {
            subs.users.remove(&user);
            sink.unsubscribe(names::user_channel(&user)).await
        }
    }
}

/// The newest id in the stream `key` (`0-0` when it has none).
pub(super) async fn newest_stream_id<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
) -> Result<MessageId, RedisError> {
    let entries: Vec<Value> = redis::cmd("XREVRANGE")
        .arg(key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    Ok(first_entry_id(&entries))
}

/// Delivers the direct messages `user`'s stream kept after the last one delivered here (sent
/// while this instance was away). Server API commands are not replayed: each applied to the
/// connections there were when it was sent.
async fn catch_up_directs(
    shared: &Shared,
    master: &mut MultiplexedConnection,
    user: &Arc<str>,
    subs: &mut Subscriptions,
) -> Result<(), RedisError> {
    let Some(&last) = subs.users.get(user) else {
        return Ok(());
    };
    // The stream keeps about `redis.direct_maxlen`: one read covers it.
    let entries: Vec<Value> = redis::cmd("XRANGE")
        .arg(names::direct_stream(user))
        .arg(format!("({last}"))
        .arg("+")
        .arg("COUNT")
        .arg(shared.cfg.direct_maxlen.saturating_mul(2))
        .query_async(master)
        .await?;
    for (id, msg) in history::parse_directs(&entries) {
        if should_deliver_direct(&mut subs.users, user, Some(id), &msg, DirectFrom::Stream) {
            shared.sink.direct(Arc::new(msg));
        }
    }
    Ok(())
}

/// Where a direct message came from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum DirectFrom {
    Live,
    Stream,
}

/// Whether a direct message of `user`'s channel or stream is to be delivered: not if it was
/// already (ids only grow per user; `users` keeps the last id delivered), nor a server API
/// command read back from the stream.
pub(super) fn should_deliver_direct(
    users: &mut HashMap<Arc<str>, MessageId>,
    user: &str,
    id: Option<MessageId>,
    msg: &DirectMessage,
    from: DirectFrom,
) -> bool {
    if let (Some(id), Some(last)) = (id, users.get_mut(user)) {
        if id <= *last {
            return false;
        }
        *last = id;
    }
    !(from == DirectFrom::Stream && msg.kind == crate::broker::DirectKind::Control)
}

/// The id of the first entry of an XRANGE/XREVRANGE reply (`0-0` when there is none).
fn first_entry_id(entries: &[Value]) -> MessageId {
    entries
        .first()
        .and_then(|e| match e {
            Value::Array(parts) => parts.first(),
            _ => None,
        })
        .and_then(|id| redis::from_redis_value_ref::<String>(id).ok())
        .and_then(|id| id.parse().ok())
        .unwrap_or(MessageId::ZERO)
}

pub(super) async fn newest_id(
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
    Ok(first_entry_id(&entries))
}

/// Delivers what the room's stream holds after the last id delivered here (up to `through`,
/// when given: entries after it may still wait for their replicas).
pub(super) async fn catch_up(
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
            deliver_room(shared, subs, event);
        }
        if !full {
            return Ok(());
        }
    }
    Ok(())
}

/// Delivers a room event unless it was delivered already (ids only grow per room). The last
/// id delivered here (from the stream's newest when the room was subscribed) is the one
/// before it: every entry between was delivered first, by the catch-up.
pub(super) fn deliver_room(shared: &Shared, subs: &mut Subscriptions, mut event: RoomEvent) {
    let Some(last) = subs.rooms.get_mut(&event.msg.room) else {
        return;
    };
    if event.id <= *last {
        return;
    }
    event.prev = *last;
    *last = event.id;
    shared.sink.room_event(Arc::new(event));
}

/// Delivers one Pub/Sub message. Returns it undelivered when it shows that an earlier one never
/// arrived live (its `prev` is newer than the last delivered): catch up through it first.
pub(super) fn on_message(
    shared: &Shared,
    msg: &redis::Msg,
    subs: &mut Subscriptions,
) -> Option<RoomEvent> {
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
                return Some(event);
            }
            Ok((event, _)) => deliver_room(shared, subs, event),
            Err(e) => wire::skip_bad_payload("redis", "room message", &e),
        }
    } else if let Some(user) = channel.strip_prefix(names::USER_PREFIX) {
        match wire::decode_live_direct(payload) {
            Ok((msg, id)) => {
                if should_deliver_direct(&mut subs.users, user, id, &msg, DirectFrom::Live) {
                    shared.sink.direct(Arc::new(msg));
                }
            }
            Err(e) => wire::skip_bad_payload("redis", "direct message", &e),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::DirectKind;

    fn direct(kind: DirectKind) -> DirectMessage {
        DirectMessage {
            kind,
            to: "u".into(),
            data: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
            sender_id: "s".into(),
            ts_ms: 1,
            traceparent: None,
        }
    }

    #[test]
    fn a_direct_message_is_delivered_once_and_commands_are_not_replayed() {
        let mut users: HashMap<Arc<str>, MessageId> = HashMap::new();
        users.insert("u".into(), MessageId::new(5, 0));
        let msg = direct(DirectKind::Message);
        let id = |hi| Some(MessageId::new(hi, 0));
        let live = DirectFrom::Live;
        assert!(
            !should_deliver_direct(&mut users, "u", id(5), &msg, live),
            "already delivered"
        );
        assert!(should_deliver_direct(&mut users, "u", id(6), &msg, live));
        assert!(
            !should_deliver_direct(&mut users, "u", id(6), &msg, DirectFrom::Stream),
            "read back after the live copy"
        );
        assert!(
            should_deliver_direct(&mut users, "u", None, &msg, live),
            "no id: no dedup"
        );
        let command = direct(DirectKind::Control);
        assert!(
            !should_deliver_direct(&mut users, "u", id(7), &command, DirectFrom::Stream),
            "a command applies when sent"
        );
        assert!(should_deliver_direct(
            &mut users,
            "u",
            id(8),
            &command,
            live
        ));
        assert_eq!(users["u"], MessageId::new(8, 0));
    }
}
