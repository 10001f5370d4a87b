//! The broker conformance suite: the same cases against every backend.
//!
//! Each backend provides a factory that builds two broker handles (two "instances") sharing
//! one backend, each with its own recording sink. Backends needing a service start it here.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rtgate::broker::idempotency::{Claim, ClaimTerms, IdempotencyStore};
use rtgate::broker::{
    Broker, Deliver, DirectMessage, Edge, InstanceInfo, MessageId, MessageKind, Occupant, Origin,
    PresenceDiff, PresenceEntry, Registry, RoomEvent, RoomMessage, RoomName,
};
use serde_json::value::RawValue;
use tokio::sync::Notify;

/// Records what a broker delivers.
#[derive(Default)]
struct Recording {
    rooms: Mutex<Vec<Arc<RoomEvent>>>,
    directs: Mutex<Vec<Arc<DirectMessage>>>,
    presence: Mutex<Vec<Arc<PresenceDiff>>>,
    changed: Notify,
}

impl Deliver for Recording {
    fn room_event(&self, event: Arc<RoomEvent>) {
        self.rooms.lock().unwrap().push(event);
        self.changed.notify_waiters();
    }
    fn direct(&self, msg: Arc<DirectMessage>) {
        self.directs.lock().unwrap().push(msg);
        self.changed.notify_waiters();
    }
    fn presence(&self, diff: Arc<PresenceDiff>) {
        self.presence.lock().unwrap().push(diff);
        self.changed.notify_waiters();
    }
}

impl Recording {
    /// Waits (bounded) until `done` holds.
    async fn wait(&self, what: &str, done: impl Fn(&Recording) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let changed = self.changed.notified();
            if done(self) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                assert!(done(self), "timed out waiting for {what}");
                return;
            }
        }
    }

    fn room_ids(&self, room: &str) -> Vec<MessageId> {
        self.rooms
            .lock()
            .unwrap()
            .iter()
            .filter(|e| &*e.msg.room == room)
            .map(|e| e.id)
            .collect()
    }
}

struct Instance {
    /// The instance id the broker was started with (what its heartbeats must carry).
    id: String,
    broker: Arc<dyn Broker>,
    /// Presence and instances (the same object as `broker` but for Kafka).
    registry: Arc<dyn Registry>,
    sink: Arc<Recording>,
}

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_string()).unwrap()
}

fn message(room: &RoomName, n: u64) -> RoomMessage {
    RoomMessage {
        room: room.clone(),
        kind: MessageKind::Message,
        data: raw(&format!(r#"{{"n":{n}}}"#)),
        sender_id: Some("u1".into()),
        ts_ms: rtgate::protocol::now_ms(),
        origin: Some(Origin {
            instance: "a".into(),
            session: 1,
        }),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        idempotency_key: None,
    }
}

fn unique_room(case: &str) -> RoomName {
    format!("conf:{case}:{}", rtgate::protocol::now_ms()).into()
}

// ---- the cases -------------------------------------------------------------------------------

async fn publish_reaches_subscribers_in_order_once(a: &Instance, b: &Instance) {
    let room = unique_room("order");
    // Stored before anyone subscribed: not delivered, but named as the first delivery's `prev`.
    // (The first write of a fresh Cluster may find its replica not synced yet: retried.)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let before = loop {
        match a.broker.publish(message(&room, 99)).await {
            Ok(id) => break id,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("first publish refused, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the first publish was never taken: {e}"),
        }
    };
    a.broker.subscribe(&room).await.unwrap();
    b.broker.subscribe(&room).await.unwrap();
    let mut ids = Vec::new();
    for n in 0..50 {
        ids.push(a.broker.publish(message(&room, n)).await.unwrap());
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    for inst in [a, b] {
        inst.sink
            .wait("50 deliveries", |s| s.room_ids(&room).len() >= 50)
            .await;
        assert_eq!(inst.sink.room_ids(&room), ids, "same ids, same order, once");
        let prevs: Vec<MessageId> = inst
            .sink
            .rooms
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.msg.room == room)
            .map(|e| e.prev)
            .collect();
        let want: Vec<MessageId> = std::iter::once(before)
            .chain(ids[..49].iter().copied())
            .collect();
        assert_eq!(
            prevs, want,
            "each delivery names the stored message before it"
        );
    }
    let first = a.sink.rooms.lock().unwrap()[0].clone();
    assert_eq!(first.msg.data.get(), r#"{"n":0}"#);
    assert_eq!(first.msg.sender_id.as_deref(), Some("u1"));
    assert_eq!(
        first.msg.traceparent.as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        "trace context travels with the message"
    );
    assert_eq!(first.msg.origin.as_ref().unwrap().session, 1);
}

async fn unsubscribed_rooms_are_not_delivered(a: &Instance, b: &Instance) {
    let room = unique_room("unsub");
    b.broker.subscribe(&room).await.unwrap();
    a.broker.publish(message(&room, 1)).await.unwrap();
    b.sink.wait("first", |s| s.room_ids(&room).len() == 1).await;
    b.broker.unsubscribe(&room);
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.broker.publish(message(&room, 2)).await.unwrap();
    // A later room's message proves the pipe is flowing.
    let probe = unique_room("probe");
    b.broker.subscribe(&probe).await.unwrap();
    a.broker.publish(message(&probe, 3)).await.unwrap();
    b.sink
        .wait("probe", |s| s.room_ids(&probe).len() == 1)
        .await;
    assert_eq!(b.sink.room_ids(&room).len(), 1, "nothing after unsubscribe");
}

async fn history_replays_after_an_id(a: &Instance, b: &Instance) {
    let room = unique_room("history");
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(a.broker.publish(message(&room, n)).await.unwrap());
    }
    let h = b.broker.history_after(&room, ids[3], 100).await.unwrap();
    assert!(!h.gap);
    assert_eq!(
        h.events.iter().map(|e| e.id).collect::<Vec<_>>(),
        ids[4..].to_vec()
    );
    assert_eq!(h.events[0].msg.data.get(), r#"{"n":4}"#);
    let h = b.broker.history_after(&room, ids[9], 100).await.unwrap();
    assert!(h.events.is_empty() && !h.gap);
    let h = b.broker.history_after(&room, ids[0], 3).await.unwrap();
    assert_eq!(h.events.len(), 3, "limit keeps the newest");
    assert_eq!(h.events[2].id, ids[9]);
    assert!(h.gap, "a limited replay is a gap");
}

async fn trimmed_history_is_a_gap(a: &Instance, history_size: usize) {
    let room = unique_room("gap");
    let mut ids = Vec::new();
    for n in 0..(history_size as u64 + 5) {
        ids.push(a.broker.publish(message(&room, n)).await.unwrap());
    }
    let h = a.broker.history_after(&room, ids[0], 10_000).await.unwrap();
    assert!(h.gap, "messages after ids[0] were trimmed");
    let h = a
        .broker
        .history_after(&room, ids[ids.len() - 3], 10_000)
        .await
        .unwrap();
    assert!(!h.gap);
    assert_eq!(h.events.len(), 2);
}

fn keyed(room: &RoomName, n: u64, sender: Option<&str>, key: &str) -> RoomMessage {
    RoomMessage {
        sender_id: sender.map(Arc::from),
        idempotency_key: Some(key.into()),
        ..message(room, n)
    }
}

/// The claim store of brokers that keep idempotency keys beside the log (Kafka): one claimer at
/// a time; a claim whose claimer went away without an outcome is taken over after its lease,
/// as uncertain from where that claimer's record would be.
async fn claims_are_leased_then_taken_over(a: &dyn IdempotencyStore, b: &dyn IdempotencyStore) {
    // Long enough that a loaded machine does not end it between two calls.
    const LEASE_MS: u64 = 1000;
    let terms = |from: u64, lease_ms: u64| ClaimTerms {
        from,
        lease: Duration::from_millis(lease_ms),
        window: Duration::from_secs(60),
    };
    let scope = format!("public:claims|s|k-{}", std::process::id());
    assert_eq!(
        a.claim(&scope, terms(7, LEASE_MS)).await.unwrap(),
        Claim::Fresh
    );
    assert_eq!(
        b.claim(&scope, terms(9, LEASE_MS)).await.unwrap(),
        Claim::InFlight
    );
    tokio::time::sleep(Duration::from_millis(LEASE_MS + 300)).await;
    assert_eq!(
        b.claim(&scope, terms(9, LEASE_MS)).await.unwrap(),
        Claim::Uncertain(7),
        "a lease that ran out is taken over from the first claimer's position"
    );
    assert_eq!(
        a.claim(&scope, terms(7, LEASE_MS)).await.unwrap(),
        Claim::InFlight
    );
    b.uncertain(&scope, 12, Duration::from_secs(60)).await;
    assert_eq!(
        a.claim(&scope, terms(7, LEASE_MS)).await.unwrap(),
        Claim::Uncertain(12)
    );
    let id = MessageId::new(0, 13);
    a.complete(&scope, id, Duration::from_secs(60)).await;
    assert_eq!(
        b.claim(&scope, terms(9, LEASE_MS)).await.unwrap(),
        Claim::Repeat(id)
    );
    let other = format!("{scope}-other");
    assert_eq!(
        a.claim(&other, terms(1, LEASE_MS)).await.unwrap(),
        Claim::Fresh
    );
    a.abandon(&other).await;
    assert_eq!(
        b.claim(&other, terms(1, LEASE_MS)).await.unwrap(),
        Claim::Fresh
    );
}

/// [`claims_are_leased_then_taken_over`] on two stores of a shared backend, once connected.
async fn claims_once_ready<S: Registry + IdempotencyStore>(a: &S, b: &S) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(Registry::is_ready(a) && Registry::is_ready(b)) {
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    claims_are_leased_then_taken_over(a, b).await;
}

#[tokio::test]
async fn claims_are_leased_then_taken_over_in_process() {
    let store = rtgate::broker::idempotency::LocalIdempotency::new(100);
    claims_are_leased_then_taken_over(&store, &store).await;
}

async fn repeated_idempotency_keys_publish_once(a: &Instance, b: &Instance) {
    let room = unique_room("idem");
    let other_room = unique_room("idem-other");
    a.broker.subscribe(&room).await.unwrap();
    b.broker.subscribe(&room).await.unwrap();
    let first = a
        .broker
        .publish(keyed(&room, 1, Some("u1"), "k1"))
        .await
        .unwrap();
    // The same key by the same sender in the same room, through either instance: the first id.
    for inst in [a, b, a] {
        let again = inst
            .broker
            .publish(keyed(&room, 2, Some("u1"), "k1"))
            .await
            .unwrap();
        assert_eq!(again, first, "a repeated key answers the first id");
    }
    // Any other sender, room or key is a new message.
    let other_sender = b
        .broker
        .publish(keyed(&room, 3, Some("u2"), "k1"))
        .await
        .unwrap();
    let server = a.broker.publish(keyed(&room, 4, None, "k1")).await.unwrap();
    let server_again = b.broker.publish(keyed(&room, 5, None, "k1")).await.unwrap();
    assert_eq!(server_again, server, "server broadcasts are scoped too");
    let other_key = a
        .broker
        .publish(keyed(&room, 6, Some("u1"), "k2"))
        .await
        .unwrap();
    let elsewhere = a
        .broker
        .publish(keyed(&other_room, 7, Some("u1"), "k1"))
        .await
        .unwrap();
    let unkeyed = a.broker.publish(message(&room, 8)).await.unwrap();
    let want = vec![first, other_sender, server, other_key, unkeyed];
    let mut sorted = want.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, want, "distinct ids, in publish order");
    let h = a
        .broker
        .history_after(&other_room, MessageId::ZERO, 10)
        .await
        .unwrap();
    assert_eq!(
        h.events.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![elsewhere]
    );
    for inst in [a, b] {
        inst.sink
            .wait("5 deliveries", |s| s.room_ids(&room).len() >= 5)
            .await;
        // Let a stray duplicate arrive if there were one.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            inst.sink.room_ids(&room),
            want,
            "each message once, repeats never"
        );
    }
    let h = b
        .broker
        .history_after(&room, MessageId::ZERO, 100)
        .await
        .unwrap();
    let stored: Vec<MessageId> = h.events.iter().map(|e| e.id).collect();
    assert_eq!(stored, want, "repeats are not stored");
    assert_eq!(
        h.events[0].msg.data.get(),
        r#"{"n":1}"#,
        "the first payload is kept"
    );
}

async fn an_unknown_since_is_a_gap(a: &Instance) {
    let room = unique_room("unknown-since");
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(a.broker.publish(message(&room, n)).await.unwrap());
    }
    let last = ids[2];
    // Ids this history never held: what the broker lost (a restart, a failover), or never had.
    for since in [
        MessageId::new(last.hi, last.lo + 1000),
        MessageId::new(last.hi + 1_000_000, 0),
    ] {
        let h = a.broker.history_after(&room, since, 100).await.unwrap();
        assert!(h.gap, "since {since} is not in the history: a gap");
    }
    let empty = unique_room("unknown-since-empty");
    let h = a.broker.history_after(&empty, last, 100).await.unwrap();
    assert!(
        h.gap && h.events.is_empty(),
        "a since in a room with no history"
    );
    let h = a
        .broker
        .history_after(&empty, MessageId::ZERO, 100)
        .await
        .unwrap();
    assert!(!h.gap, "0-0 asks for everything: no gap in an empty room");
    let h = a.broker.history_after(&room, ids[0], 100).await.unwrap();
    assert!(!h.gap && h.events.len() == 2, "a retained since is no gap");
}

// Needs two separate instances: used by the distributed backends.
async fn direct_reaches_the_users_instance_only(a: &Instance, b: &Instance) {
    let user: Arc<str> = format!("user-{}", rtgate::protocol::now_ms()).into();
    b.broker.subscribe_user(&user).await.unwrap();
    a.broker
        .send_direct(DirectMessage {
            kind: rtgate::broker::DirectKind::Message,
            to: user.clone(),
            data: raw(r#"{"to":"x","hello":true}"#),
            sender_id: "u1".into(),
            ts_ms: rtgate::protocol::now_ms(),
            traceparent: None,
        })
        .await
        .unwrap();
    b.sink
        .wait("direct", |s| {
            s.directs.lock().unwrap().iter().any(|d| d.to == user)
        })
        .await;
    assert!(
        !a.sink.directs.lock().unwrap().iter().any(|d| d.to == user),
        "not delivered where the user has no subscription"
    );
}

async fn presence_is_shared_and_diffed(a: &Instance, b: &Instance) {
    let room = unique_room("presence");
    // As the gateway does for a room's first member: its messages and its presence diffs.
    for inst in [a, b] {
        inst.broker.subscribe(&room).await.unwrap();
        inst.registry.watch(&room).await.unwrap();
    }
    let entry = PresenceEntry {
        user_id: "alice".into(),
        conn_id: "a:1".into(),
        meta: Arc::from(raw(r#"{"status":"online","session_id":"a:1"}"#)),
    };
    let tracked = a.registry.track(&room, entry.clone(), 1000).await.unwrap();
    assert_eq!(tracked, rtgate::broker::Tracked::Added);
    // The same connection again: its entry is replaced, not added.
    let again = a.registry.track(&room, entry, 1000).await.unwrap();
    assert_eq!(again, rtgate::broker::Tracked::Replaced);
    for inst in [a, b] {
        inst.sink
            .wait("join diff", |s| {
                s.presence
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|d| d.room == room && d.joins.iter().any(|j| &*j.user_id == "alice"))
            })
            .await;
    }
    let state = b.registry.presence(&room).await.unwrap();
    assert_eq!(state.len(), 1);
    assert_eq!(&*state[0].conn_id, "a:1");
    a.registry.untrack(&room, &"a:1".into()).await.unwrap();
    b.sink
        .wait("leave diff", |s| {
            s.presence
                .lock()
                .unwrap()
                .iter()
                .any(|d| d.room == room && d.leaves.iter().any(|j| &*j.conn_id == "a:1"))
        })
        .await;
    assert!(b.registry.presence(&room).await.unwrap().is_empty());
}

/// An instance that stops heartbeating is reaped by the next heartbeat of another: its presence
/// is removed and reported (for `presence_leave` webhooks). Both were built with a 1 s
/// heartbeat TTL.
async fn a_dead_instances_presence_is_reaped_and_reported(a: &Instance, b: &Instance) {
    let info = |inst: &Instance| InstanceInfo {
        id: inst.id.clone(),
        address: "127.0.0.1:1".into(),
        started_at: "2026-01-01T00:00:00.000Z".into(),
        connections: 1,
        version: "test".into(),
    };
    a.registry.heartbeat(&info(a)).await.unwrap();
    b.registry.heartbeat(&info(b)).await.unwrap();
    let room = unique_room("reaped");
    let entry = PresenceEntry {
        user_id: "bea".into(),
        conn_id: format!("{}:1", b.id).into(),
        meta: Arc::from(raw(&format!(r#"{{"session_id":"{}:1"}}"#, b.id))),
    };
    b.registry.track(&room, entry.clone(), 1000).await.unwrap();
    // b stops; a's heartbeats find it dead once its TTL passed.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let reaped = loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let reaped = a.registry.heartbeat(&info(a)).await.unwrap();
        if !reaped.left.is_empty() || std::time::Instant::now() > deadline {
            break reaped;
        }
    };
    assert_eq!(reaped.left.len(), 1, "{reaped:?}");
    let (left_room, left) = &reaped.left[0];
    assert_eq!(left_room, &room);
    assert_eq!((&*left.user_id, &*left.conn_id), ("bea", &*entry.conn_id));
    assert!(a.registry.presence(&room).await.unwrap().is_empty());
    assert!(
        a.registry
            .heartbeat(&info(a))
            .await
            .unwrap()
            .left
            .is_empty(),
        "reported once"
    );
}

async fn heartbeats_list_instances(a: &Instance) {
    let me = InstanceInfo {
        id: "conf-a".into(),
        address: "127.0.0.1:1".into(),
        started_at: "2026-01-01T00:00:00.000Z".into(),
        connections: 3,
        version: "test".into(),
    };
    a.registry.heartbeat(&me).await.unwrap();
    let list = a.registry.instances().await.unwrap();
    assert!(list.iter().any(|i| i.id == "conf-a" && i.connections == 3));
    assert!(a.broker.is_ready() && a.registry.is_ready());
}

/// The occupancy index: exactly one first-in and one last-out edge per room or user, counts
/// summed over the live instances, rooms by name from a cursor. `b` is a second instance, or
/// `None` when both names stand for one process.
async fn occupancy_counts_edges_and_rooms(a: &Instance, b: Option<&Instance>) {
    for inst in std::iter::once(a).chain(b) {
        let me = InstanceInfo {
            id: inst.id.clone(),
            address: "127.0.0.1:1".into(),
            started_at: "2026-01-01T00:00:00.000Z".into(),
            connections: 0,
            version: "test".into(),
        };
        inst.registry.heartbeat(&me).await.unwrap();
    }
    let room = unique_room("occ");
    let next: RoomName = format!("{room}-z").into();
    let r = Occupant::Room(room.clone());
    let reg = &a.registry;
    assert_eq!(
        reg.set_local_count(&r, 2).await.unwrap(),
        Some(Edge::Occupied)
    );
    assert_eq!(reg.set_local_count(&r, 3).await.unwrap(), None);
    if let Some(b) = b {
        assert_eq!(b.registry.set_local_count(&r, 1).await.unwrap(), None);
        assert_eq!(a.registry.count(&r).await.unwrap(), 4);
        assert_eq!(b.registry.set_local_count(&r, 0).await.unwrap(), None);
    }
    assert_eq!(reg.count(&r).await.unwrap(), 3);
    let n = Occupant::Room(next.clone());
    assert_eq!(
        std::iter::once(a)
            .chain(b)
            .last()
            .unwrap()
            .registry
            .set_local_count(&n, 1)
            .await
            .unwrap(),
        Some(Edge::Occupied)
    );
    let before: String = room.chars().take(room.len() - 1).collect();
    let listed = reg.rooms(&before, 1000).await.unwrap();
    let ours: Vec<(String, u64)> = listed
        .iter()
        .filter(|(r, _)| r.starts_with(&*room))
        .map(|(r, c)| (r.to_string(), *c))
        .collect();
    assert_eq!(ours, [(room.to_string(), 3), (next.to_string(), 1)]);
    let after = reg.rooms(&room, 1).await.unwrap();
    assert_eq!(after.first().map(|(r, _)| r.clone()), Some(next.clone()));
    let u = Occupant::User(format!("occ-user-{}", rtgate::protocol::now_ms()).into());
    assert_eq!(
        reg.set_local_count(&u, 1).await.unwrap(),
        Some(Edge::Occupied)
    );
    assert_eq!(reg.count(&u).await.unwrap(), 1);
    assert_eq!(
        reg.set_local_count(&u, 0).await.unwrap(),
        Some(Edge::Vacated)
    );
    assert_eq!(reg.count(&u).await.unwrap(), 0);
    assert_eq!(
        reg.set_local_count(&r, 0).await.unwrap(),
        Some(Edge::Vacated)
    );
    assert_eq!(reg.count(&r).await.unwrap(), 0);
    assert!(
        !reg.rooms("", 10_000)
            .await
            .unwrap()
            .iter()
            .any(|(x, _)| *x == room)
    );
}

// ---- backends --------------------------------------------------------------------------------

mod memory {
    use super::*;
    use rtgate::broker::MemoryBroker;

    const HISTORY: usize = 20;

    /// One process, one broker: both "instances" are the same broker delivering to a fan-out
    /// sink, which is what a single instance sees.
    fn pair() -> (Instance, Instance) {
        let sink_a = Arc::new(Recording::default());
        let sink_b = Arc::new(Recording::default());
        let fan = Arc::new(FanOut(vec![sink_a.clone(), sink_b.clone()]));
        let memory = Arc::new(MemoryBroker::new(fan, HISTORY));
        (
            Instance {
                id: "mem".into(),
                broker: memory.clone(),
                registry: memory.clone(),
                sink: sink_a,
            },
            Instance {
                id: "mem".into(),
                broker: memory.clone(),
                registry: memory,
                sink: sink_b,
            },
        )
    }

    struct FanOut(Vec<Arc<Recording>>);
    impl Deliver for FanOut {
        fn room_event(&self, e: Arc<RoomEvent>) {
            self.0.iter().for_each(|s| s.room_event(e.clone()));
        }
        fn direct(&self, m: Arc<DirectMessage>) {
            self.0.iter().for_each(|s| s.direct(m.clone()));
        }
        fn presence(&self, d: Arc<PresenceDiff>) {
            self.0.iter().for_each(|s| s.presence(d.clone()));
        }
    }

    #[tokio::test]
    async fn publish_reaches_subscribers_in_order_once() {
        let (a, b) = pair();
        super::publish_reaches_subscribers_in_order_once(&a, &b).await;
    }

    #[tokio::test]
    async fn unsubscribed_rooms_are_not_delivered() {
        let (a, b) = pair();
        // One broker: unsubscribing affects both sinks, which the case tolerates.
        super::unsubscribed_rooms_are_not_delivered(&a, &b).await;
    }

    #[tokio::test]
    async fn history_replays_after_an_id() {
        let (a, b) = pair();
        super::history_replays_after_an_id(&a, &b).await;
    }

    #[tokio::test]
    async fn trimmed_history_is_a_gap() {
        let (a, _) = pair();
        super::trimmed_history_is_a_gap(&a, HISTORY).await;
    }

    #[tokio::test]
    async fn repeated_idempotency_keys_publish_once() {
        let (a, b) = pair();
        super::repeated_idempotency_keys_publish_once(&a, &b).await;
    }

    #[tokio::test]
    async fn an_unknown_since_is_a_gap() {
        let (a, _) = pair();
        super::an_unknown_since_is_a_gap(&a).await;
    }

    #[tokio::test]
    async fn presence_is_shared_and_diffed() {
        let (a, b) = pair();
        super::presence_is_shared_and_diffed(&a, &b).await;
    }

    #[tokio::test]
    async fn occupancy_counts_edges_and_rooms() {
        let (a, _) = pair();
        super::occupancy_counts_edges_and_rooms(&a, None).await;
    }

    #[tokio::test]
    async fn heartbeats_list_instances() {
        let (a, _) = pair();
        super::heartbeats_list_instances(&a).await;
    }

    #[tokio::test]
    async fn direct_is_delivered_to_subscribed_users() {
        let (a, b) = pair();
        let user: Arc<str> = "solo".into();
        b.broker.subscribe_user(&user).await.unwrap();
        a.broker
            .send_direct(DirectMessage {
                kind: rtgate::broker::DirectKind::Message,
                to: user.clone(),
                data: raw(r#"{"to":"solo"}"#),
                sender_id: "u1".into(),
                ts_ms: 0,
                traceparent: None,
            })
            .await
            .unwrap();
        b.sink
            .wait("direct", |s| s.directs.lock().unwrap().len() == 1)
            .await;
    }
}

mod redis {
    use super::*;
    use crate::common::redis::{RedisServer, require_redis};
    use rtgate::broker::RedisBroker;
    use rtgate::config::RedisConfig;

    const HISTORY: u64 = 20;

    /// Two instances (two brokers, two sinks) on one real Redis.
    async fn pair(server: &RedisServer) -> (Instance, Instance) {
        pair_with_ttl(server, Duration::from_secs(15)).await
    }

    async fn pair_with_ttl(server: &RedisServer, heartbeat_ttl: Duration) -> (Instance, Instance) {
        let make = |id: &str| {
            let sink = Arc::new(Recording::default());
            let cfg = RedisConfig {
                url: server.url(),
                stream_maxlen: HISTORY,
                ..RedisConfig::default()
            };
            let redis = Arc::new(RedisBroker::start(
                cfg,
                &rtgate::config::BrokerConfig::default(),
                heartbeat_ttl,
                id.into(),
                sink.clone(),
            ));
            Instance {
                id: id.to_string(),
                broker: redis.clone(),
                registry: redis,
                sink,
            }
        };
        let (a, b) = (make("conf-a"), make("conf-b"));
        for inst in [&a, &b] {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !inst.broker.is_ready() {
                assert!(std::time::Instant::now() < deadline, "broker never ready");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        (a, b)
    }

    macro_rules! redis_case {
        ($name:ident, |$a:ident, $b:ident| $body:expr) => {
            #[tokio::test]
            async fn $name() {
                if !require_redis() {
                    return;
                }
                let server = RedisServer::start_standalone().await;
                let ($a, $b) = pair(&server).await;
                let _ = &$b;
                $body.await;
            }
        };
    }

    redis_case!(publish_reaches_subscribers_in_order_once, |a, b| {
        super::publish_reaches_subscribers_in_order_once(&a, &b)
    });
    redis_case!(unsubscribed_rooms_are_not_delivered, |a, b| {
        super::unsubscribed_rooms_are_not_delivered(&a, &b)
    });
    redis_case!(history_replays_after_an_id, |a, b| {
        super::history_replays_after_an_id(&a, &b)
    });
    redis_case!(presence_is_shared_and_diffed, |a, b| {
        super::presence_is_shared_and_diffed(&a, &b)
    });
    #[tokio::test]
    async fn a_dead_instances_presence_is_reaped_and_reported() {
        if !require_redis() {
            return;
        }
        let server = RedisServer::start_standalone().await;
        let (a, b) = pair_with_ttl(&server, Duration::from_secs(1)).await;
        super::a_dead_instances_presence_is_reaped_and_reported(&a, &b).await;
    }

    redis_case!(heartbeats_list_instances, |a, b| {
        super::heartbeats_list_instances(&a)
    });
    redis_case!(direct_reaches_the_users_instance_only, |a, b| {
        super::direct_reaches_the_users_instance_only(&a, &b)
    });
    redis_case!(repeated_idempotency_keys_publish_once, |a, b| {
        super::repeated_idempotency_keys_publish_once(&a, &b)
    });
    redis_case!(an_unknown_since_is_a_gap, |a, b| {
        super::an_unknown_since_is_a_gap(&a)
    });
    redis_case!(occupancy_counts_edges_and_rooms, |a, b| {
        super::occupancy_counts_edges_and_rooms(&a, Some(&b))
    });

    #[tokio::test]
    async fn claims_are_leased_then_taken_over() {
        if !require_redis() {
            return;
        }
        let server = RedisServer::start_standalone().await;
        let store = |id: &str| {
            RedisBroker::start(
                RedisConfig {
                    url: server.url(),
                    ..RedisConfig::default()
                },
                &rtgate::config::BrokerConfig::default(),
                Duration::from_secs(15),
                id.into(),
                Arc::new(Recording::default()),
            )
            .presence_only()
        };
        let (a, b) = (store("claim-a"), store("claim-b"));
        super::claims_once_ready(&a, &b).await;
    }

    #[tokio::test]
    async fn trimmed_history_is_a_gap() {
        if !require_redis() {
            return;
        }
        let server = RedisServer::start_standalone().await;
        let (a, _b) = pair(&server).await;
        super::trimmed_history_is_a_gap(&a, HISTORY as usize).await;
    }
}

mod cluster {
    use super::*;
    use crate::common::redis::{ClusterTopology, require_redis};
    use rtgate::broker::ClusterBroker;
    use rtgate::config::RedisConfig;

    const HISTORY: u64 = 20;

    /// Two instances (two brokers, two sinks) on one real Redis Cluster (3 masters, each with
    /// a replica: publishes wait for `WAIT 1`).
    async fn pair(topo: &ClusterTopology, n: usize) -> (Instance, Instance) {
        pair_with_ttl(topo, n, Duration::from_secs(15)).await
    }

    async fn pair_with_ttl(
        topo: &ClusterTopology,
        n: usize,
        heartbeat_ttl: Duration,
    ) -> (Instance, Instance) {
        let make = |id: String| {
            let sink = Arc::new(Recording::default());
            let cfg = RedisConfig {
                cluster_nodes: topo.seed_addrs(),
                stream_maxlen: HISTORY,
                ..RedisConfig::default()
            };
            let cluster = Arc::new(ClusterBroker::start(
                cfg,
                &rtgate::config::BrokerConfig::default(),
                heartbeat_ttl,
                id.clone().into(),
                sink.clone(),
            ));
            Instance {
                id: id.to_string(),
                broker: cluster.clone(),
                registry: cluster,
                sink,
            }
        };
        let (a, b) = (make(format!("cl-a{n}")), make(format!("cl-b{n}")));
        for inst in [&a, &b] {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !inst.broker.is_ready() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "cluster broker never ready"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        (a, b)
    }

    /// Every case on one cluster (starting one takes seconds), each with fresh instances.
    #[tokio::test]
    async fn every_case_passes_on_redis_cluster() {
        if !require_redis() {
            return;
        }
        let topo = ClusterTopology::start().await;
        let (a, b) = pair(&topo, 1).await;
        super::publish_reaches_subscribers_in_order_once(&a, &b).await;
        let (a, b) = pair(&topo, 2).await;
        super::unsubscribed_rooms_are_not_delivered(&a, &b).await;
        let (a, b) = pair(&topo, 3).await;
        super::history_replays_after_an_id(&a, &b).await;
        let (a, b) = pair(&topo, 4).await;
        super::presence_is_shared_and_diffed(&a, &b).await;
        let (a, _b) = pair(&topo, 5).await;
        super::heartbeats_list_instances(&a).await;
        let (a, b) = pair(&topo, 6).await;
        super::direct_reaches_the_users_instance_only(&a, &b).await;
        let (a, b) = pair(&topo, 7).await;
        super::repeated_idempotency_keys_publish_once(&a, &b).await;
        let (a, _b) = pair(&topo, 8).await;
        super::an_unknown_since_is_a_gap(&a).await;
        let (a, _b) = pair(&topo, 9).await;
        super::trimmed_history_is_a_gap(&a, HISTORY as usize).await;
        let (a, b) = pair(&topo, 10).await;
        super::occupancy_counts_edges_and_rooms(&a, Some(&b)).await;
        let (a, b) = pair_with_ttl(&topo, 11, Duration::from_secs(1)).await;
        super::a_dead_instances_presence_is_reaped_and_reported(&a, &b).await;
        let store = |id: &str| {
            ClusterBroker::start(
                RedisConfig {
                    cluster_nodes: topo.seed_addrs(),
                    ..RedisConfig::default()
                },
                &rtgate::config::BrokerConfig::default(),
                Duration::from_secs(15),
                id.into(),
                Arc::new(Recording::default()),
            )
            .presence_only()
        };
        let (a, b) = (store("cl-claim-a"), store("cl-claim-b"));
        super::claims_once_ready(&a, &b).await;
    }
}

mod kafka {
    use super::*;
    use crate::common::kafka::{KafkaServer, require_kafka};
    use crate::common::redis::{RedisServer, require_redis};
    use rtgate::broker::{KafkaBroker, ProbeTiming, RedisBroker};
    use rtgate::config::{KafkaConfig, RedisConfig};

    /// Two instances on one Kafka; presence and heartbeats through one Redis, as configured in
    /// production.
    async fn pair(kafka: &KafkaServer, redis: &RedisServer) -> (Instance, Instance) {
        let make = |id: &str| {
            let sink = Arc::new(Recording::default());
            let side = Arc::new(
                RedisBroker::start(
                    RedisConfig {
                        url: redis.url(),
                        ..RedisConfig::default()
                    },
                    &rtgate::config::BrokerConfig::default(),
                    Duration::from_secs(15),
                    id.into(),
                    sink.clone(),
                )
                .presence_only(),
            );
            let cfg = KafkaConfig {
                brokers: vec![kafka.addr()],
                // The test broker mis-reports the high watermark for multi-record batches.
                properties: [("batch.num.messages".to_string(), "1".to_string())].into(),
                ..KafkaConfig::default()
            };
            let broker: Arc<dyn Broker> = Arc::new(
                KafkaBroker::start(cfg, id.into(), ProbeTiming::default(), sink.clone())
                    .unwrap()
                    .with_idempotency(side.clone(), Duration::from_secs(300)),
            );
            Instance {
                id: id.to_string(),
                broker,
                registry: side,
                sink,
            }
        };
        let (a, b) = (make("kconf-a"), make("kconf-b"));
        for inst in [&a, &b] {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !(inst.broker.is_ready() && inst.registry.is_ready()) {
                assert!(std::time::Instant::now() < deadline, "broker never ready");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        (a, b)
    }

    macro_rules! kafka_case {
        ($name:ident, |$a:ident, $b:ident| $body:expr) => {
            #[tokio::test]
            async fn $name() {
                if !require_kafka() || !require_redis() {
                    return;
                }
                let kafka = KafkaServer::start().await;
                let redis = RedisServer::start_standalone().await;
                let ($a, $b) = pair(&kafka, &redis).await;
                let _ = &$b;
                $body.await;
            }
        };
    }

    kafka_case!(publish_reaches_subscribers_in_order_once, |a, b| {
        super::publish_reaches_subscribers_in_order_once(&a, &b)
    });
    kafka_case!(unsubscribed_rooms_are_not_delivered, |a, b| {
        super::unsubscribed_rooms_are_not_delivered(&a, &b)
    });
    kafka_case!(history_replays_after_an_id, |a, b| {
        super::history_replays_after_an_id(&a, &b)
    });
    kafka_case!(repeated_idempotency_keys_publish_once, |a, b| {
        super::repeated_idempotency_keys_publish_once(&a, &b)
    });
    kafka_case!(an_unknown_since_is_a_gap, |a, b| {
        super::an_unknown_since_is_a_gap(&a)
    });
    kafka_case!(presence_is_shared_and_diffed, |a, b| {
        super::presence_is_shared_and_diffed(&a, &b)
    });
    kafka_case!(heartbeats_list_instances, |a, b| {
        super::heartbeats_list_instances(&a)
    });
    kafka_case!(occupancy_counts_edges_and_rooms, |a, b| {
        super::occupancy_counts_edges_and_rooms(&a, Some(&b))
    });
}
