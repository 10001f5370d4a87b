//! Idempotent publish: a repeat of the same key by the same sender in the same room, within the
//! window, is answered with the first message's id and publishes nothing.
//!
//! The Redis broker checks and records keys inside its publish script. The memory broker and the
//! Kafka broker use an [`IdempotencyStore`]: this process's [`LocalIdempotency`], or Redis when
//! the Kafka broker has a Redis side.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{BrokerError, MessageId, RoomMessage};

/// Longest idempotency key, in bytes.
pub const MAX_KEY_LEN: usize = 64;

/// What an idempotency key must be, for error messages.
pub const KEY_RULE: &str = "idempotency_key is 1 to 64 bytes of [A-Za-z0-9_.:-]";

pub fn valid_key(key: &str) -> bool {
    (1..=MAX_KEY_LEN).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// The key's scope as one string: room, sender (or the server) and key. Unambiguous because a
/// room name has no `|`, the sender is length-prefixed and the key comes last.
pub fn scope(msg: &RoomMessage) -> Option<String> {
    let key = msg.idempotency_key.as_deref()?;
    Some(match &msg.sender_id {
        Some(sender) => format!("{}|u{}:{sender}|{key}", msg.room, sender.len()),
        None => format!("{}|s|{key}", msg.room),
    })
}

/// What a claim on a scoped key found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// First use: publish, then [`IdempotencyStore::complete`] or [`IdempotencyStore::abandon`].
    Fresh,
    /// Published before with this id.
    Repeat(MessageId),
    /// A publish with this key is still under way (its claim's lease runs); the caller may
    /// retry.
    InFlight,
    /// An earlier publish with this key failed with its outcome unknown (a timeout after the
    /// record left): it may be stored at or after this broker position. The claim is now the
    /// caller's, as for [`Claim::Fresh`], and it must look there before publishing again.
    /// Also what a claim whose lease ran out turns into: its claimer went away (its process
    /// died) without an outcome, and its record may be stored from the position it claimed
    /// with.
    Uncertain(u64),
}

impl Claim {
    pub fn in_flight_error() -> BrokerError {
        BrokerError::Unavailable("a publish with this idempotency_key is in flight".into())
    }
}

#[async_trait::async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `scope` for one publish. The claim holds for `lease` (longer than the claimer's
    /// bounded search and produce), then a claim of the same key takes it over as
    /// [`Claim::Uncertain`] from `from`: where the claimer's record would be at the earliest.
    async fn claim(&self, scope: &str, claim: ClaimTerms) -> Result<Claim, BrokerError>;
    async fn complete(&self, scope: &str, id: MessageId, window: Duration);
    /// The publish failed: a retry may publish.
    async fn abandon(&self, scope: &str);
    /// The publish failed but may have been stored at or after position `from`: the next
    /// claim gets [`Claim::Uncertain`].
    async fn uncertain(&self, scope: &str, from: u64, window: Duration);
}

/// How a claim is made: see [`IdempotencyStore::claim`].
#[derive(Debug, Clone, Copy)]
pub struct ClaimTerms {
    /// Where the claimer's record would be at the earliest.
    pub from: u64,
    /// How long the claim holds without an outcome.
    pub lease: Duration,
    /// How long the key is remembered.
    pub window: Duration,
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    /// Claimed until the lease ends; the claimer's record would be at `from` at the earliest.
    Pending {
        lease_until: Instant,
        from: u64,
    },
    Done(MessageId),
    Uncertain(u64),
}

#[derive(Default)]
struct Keys {
    slots: HashMap<Arc<str>, (Slot, Instant)>,
    /// Keys by expiry (oldest first), to expire and to evict beyond the bound.
    order: VecDeque<(Instant, Arc<str>)>,
}

/// Keys remembered by this process only, bounded in count.
pub struct LocalIdempotency {
    max_keys: usize,
    keys: Mutex<Keys>,
}

impl LocalIdempotency {
    pub fn new(max_keys: usize) -> Self {
        Self {
            max_keys: max_keys.max(1),
            keys: Mutex::default(),
        }
    }

    /// The id a live key maps to, if any (synchronous, for callers holding their own lock).
    pub fn lookup(&self, scope: &str) -> Option<MessageId> {
        let mut keys = self.keys.lock();
        expire(&mut keys, Instant::now());
        match keys.slots.get(scope) {
            Some((Slot::Done(id), _)) => Some(*id),
            _ => None,
        }
    }

    pub fn record(&self, scope: &str, id: MessageId, window: Duration) {
        self.set(scope, Slot::Done(id), window);
    }

    fn set(&self, scope: &str, slot: Slot, window: Duration) {
        let mut keys = self.keys.lock();
        self.set_locked(&mut keys, scope, slot, window);
    }

    fn set_locked(&self, keys: &mut Keys, scope: &str, slot: Slot, window: Duration) {
        let now = Instant::now();
        let until = now + window;
        expire(keys, now);
        let scope: Arc<str> = Arc::from(scope);
        keys.slots.insert(scope.clone(), (slot, until));
        keys.order.push_back((until, scope));
        // Each key has at most three entries in `order` (pending, uncertain, done): all stay
        // bounded.
        while keys.slots.len() > self.max_keys || keys.order.len() > 3 * self.max_keys {
            let Some((until, oldest)) = keys.order.pop_front() else {
                break;
            };
            if keys.slots.get(&oldest).is_some_and(|(_, u)| *u == until) {
                keys.slots.remove(&oldest);
                // A repeat of this key could now publish again: make that visible.
                crate::telemetry::metric::idempotency_eviction();
            }
        }
    }
}

/// Drops keys whose window passed. `order` may hold stale entries for keys set again later;
/// they are skipped by comparing the expiry.
fn expire(keys: &mut Keys, now: Instant) {
    while let Some((until, _)) = keys.order.front() {
        if *until > now {
            break;
        }
        let (until, scope) = keys.order.pop_front().expect("front exists");
        if keys.slots.get(&scope).is_some_and(|(_, u)| *u == until) {
            keys.slots.remove(&scope);
        }
    }
}

#[async_trait::async_trait]
impl IdempotencyStore for LocalIdempotency {
    async fn claim(&self, scope: &str, claim: ClaimTerms) -> Result<Claim, BrokerError> {
        let now = Instant::now();
        let mut keys = self.keys.lock();
        expire(&mut keys, now);
        let (answer, from) = match keys.slots.get(scope) {
            Some((Slot::Done(id), _)) => return Ok(Claim::Repeat(*id)),
            Some((Slot::Pending { lease_until, .. }, _)) if *lease_until > now => {
                return Ok(Claim::InFlight);
            }
            // Its claimer went away without an outcome: look where its record would be.
            Some((Slot::Pending { from, .. }, _)) | Some((Slot::Uncertain(from), _)) => {
                (Claim::Uncertain(*from), *from)
            }
            None => (Claim::Fresh, claim.from),
        };
        let pending = Slot::Pending {
            lease_until: now + claim.lease,
            from,
        };
        self.set_locked(&mut keys, scope, pending, claim.window);
        Ok(answer)
    }

    async fn complete(&self, scope: &str, id: MessageId, window: Duration) {
        self.set(scope, Slot::Done(id), window);
    }

    async fn abandon(&self, scope: &str) {
        self.keys.lock().slots.remove(scope);
    }

    async fn uncertain(&self, scope: &str, from: u64, window: Duration) {
        self.set(scope, Slot::Uncertain(from), window);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_rule() {
        assert!(valid_key("a"));
        assert!(valid_key("client-1:42_x.y"));
        assert!(valid_key(&"k".repeat(64)));
        assert!(!valid_key(""));
        assert!(!valid_key(&"k".repeat(65)));
        assert!(!valid_key("has space"));
        assert!(!valid_key("pipe|"));
        assert!(!valid_key("é"));
    }

    fn terms(from: u64) -> ClaimTerms {
        ClaimTerms {
            from,
            lease: Duration::from_secs(30),
            window: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn a_claim_whose_lease_ran_out_is_taken_over_as_uncertain() {
        let store = LocalIdempotency::new(10);
        let short = ClaimTerms {
            // Long enough that a loaded machine does not end it between two calls.
            lease: Duration::from_millis(500),
            ..terms(7)
        };
        assert_eq!(store.claim("r|s|k", short).await.unwrap(), Claim::Fresh);
        assert_eq!(
            store.claim("r|s|k", terms(9)).await.unwrap(),
            Claim::InFlight
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
        // From where the first claimer's record would be, not the taker's own position.
        assert_eq!(
            store.claim("r|s|k", short).await.unwrap(),
            Claim::Uncertain(7)
        );
        assert_eq!(
            store.claim("r|s|k", terms(9)).await.unwrap(),
            Claim::InFlight
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(
            store.claim("r|s|k", terms(9)).await.unwrap(),
            Claim::Uncertain(7)
        );
    }

    #[tokio::test]
    async fn a_claim_is_fresh_then_in_flight_then_a_repeat() {
        let store = LocalIdempotency::new(10);
        let w = Duration::from_secs(60);
        let t = terms(0);
        assert_eq!(store.claim("r|s|k", t).await.unwrap(), Claim::Fresh);
        assert_eq!(store.claim("r|s|k", t).await.unwrap(), Claim::InFlight);
        store.complete("r|s|k", MessageId::new(5, 1), w).await;
        assert_eq!(
            store.claim("r|s|k", t).await.unwrap(),
            Claim::Repeat(MessageId::new(5, 1))
        );
        assert_eq!(store.claim("r|s|other", t).await.unwrap(), Claim::Fresh);
        store.abandon("r|s|other").await;
        assert_eq!(store.claim("r|s|other", t).await.unwrap(), Claim::Fresh);
    }

    #[tokio::test]
    async fn an_uncertain_outcome_is_handed_to_one_claim_at_a_time() {
        let store = LocalIdempotency::new(10);
        let w = Duration::from_secs(60);
        let t = terms(0);
        assert_eq!(store.claim("r|s|k", t).await.unwrap(), Claim::Fresh);
        store.uncertain("r|s|k", 41, w).await;
        assert_eq!(store.claim("r|s|k", t).await.unwrap(), Claim::Uncertain(41));
        assert_eq!(store.claim("r|s|k", t).await.unwrap(), Claim::InFlight);
        store.complete("r|s|k", MessageId::new(0, 42), w).await;
        assert_eq!(
            store.claim("r|s|k", t).await.unwrap(),
            Claim::Repeat(MessageId::new(0, 42))
        );
    }

    #[tokio::test]
    async fn keys_expire_after_the_window_and_the_count_is_bounded() {
        let store = LocalIdempotency::new(3);
        store.record("a", MessageId::new(1, 0), Duration::from_millis(20));
        assert_eq!(store.lookup("a"), Some(MessageId::new(1, 0)));
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(store.lookup("a"), None);
        for (i, k) in ["b", "c", "d", "e"].iter().enumerate() {
            store.record(k, MessageId::new(i as u64, 0), Duration::from_secs(60));
        }
        assert_eq!(store.lookup("b"), None, "the oldest key is evicted");
        assert_eq!(store.lookup("e"), Some(MessageId::new(3, 0)));
        assert_eq!(store.keys.lock().slots.len(), 3);
    }
}
