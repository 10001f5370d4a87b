//! Who may use a room: `[[rooms.rules]]` by name prefix (the longest match wins), then the
//! built-in `public:` and `private:<user>` rules, then `rooms.policy`. A rule with
//! `policy = "hook"` asks the app's backend: rtgate POSTs `{"user_id", "room", "claims"}` to
//! its `authorize_url`; 200 allows (a body `{"meta": {...}}` gives presence meta defaults),
//! 403 denies, anything else or a timeout is `unavailable`. Answers are cached per user and
//! room for `rooms.authorize_cache`, so a hook room's messages do not each ask again.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::Identity;
use crate::config::{RoomPolicy, RoomsConfig, RulePolicy};
use crate::telemetry::metric;

/// Why a room was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Denied {
    #[error("no access to room `{0}`")]
    Forbidden(String),
    #[error("the room's authorization endpoint did not answer: {0}")]
    Unavailable(String),
}

/// What the rules alone decide.
pub enum Verdict<'a> {
    Allowed,
    /// Ask the backend at this URL.
    Hook(&'a str),
}

/// What the backend allowed: optional presence meta defaults (a JSON object).
pub type Allowed = Option<Arc<RawValue>>;

struct Rule {
    prefix: String,
    policy: RulePolicy,
    url: String,
}

type CacheKey = (Arc<str>, Arc<str>);

#[derive(Default)]
struct Cache {
    answers: HashMap<CacheKey, (Instant, Result<Allowed, ()>)>,
    /// Insertion order, for forgetting the oldest at the bound.
    order: VecDeque<CacheKey>,
}

pub struct RoomAccess {
    /// Longest prefix first.
    rules: Vec<Rule>,
    fallback: RoomPolicy,
    /// `rooms.authorize_url`, for `rooms.policy = "hook"`.
    fallback_url: String,
    client: reqwest::Client,
    cache_ttl: Duration,
    cache_max: usize,
    cache: Mutex<Cache>,
    /// Presence meta defaults from the backend are held to the client's own limits
    /// (`ws.max_presence_bytes`, `ws.max_json_depth`); the answer body is read no further.
    max_meta_bytes: usize,
    max_meta_depth: usize,
}

#[derive(Deserialize)]
struct HookAnswer {
    #[serde(default)]
    meta: Option<Box<RawValue>>,
}

impl RoomAccess {
    pub fn new(cfg: &RoomsConfig) -> anyhow::Result<Self> {
        let mut rules: Vec<Rule> = cfg
            .rules
            .iter()
            .map(|r| Rule {
                prefix: r.prefix.clone(),
                policy: r.policy,
                url: if r.authorize_url.is_empty() {
                    cfg.authorize_url.clone()
                } else {
                    r.authorize_url.clone()
                },
            })
            .collect();
        // The defaults, after whatever the operator wrote for the same prefixes.
        for (prefix, policy) in [
            ("public:", RulePolicy::Public),
            ("private:", RulePolicy::Owner),
        ] {
            if !rules.iter().any(|r| r.prefix == prefix) {
                rules.push(Rule {
                    prefix: prefix.into(),
                    policy,
                    url: String::new(),
                });
            }
        }
        rules.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        let client = reqwest::Client::builder()
            .timeout(cfg.authorize_timeout)
            .build()?;
        Ok(Self {
            rules,
            fallback: cfg.policy,
            fallback_url: cfg.authorize_url.clone(),
            client,
            cache_ttl: cfg.authorize_cache,
            cache_max: cfg.authorize_cache_max,
            cache: Mutex::default(),
            max_meta_bytes: crate::config::WsConfig::default().max_presence_bytes,
            max_meta_depth: crate::config::WsConfig::default().max_json_depth,
        })
    }

    /// The limits of presence meta (`ws.max_presence_bytes`, `ws.max_json_depth`).
    pub fn with_meta_limits(mut self, max_bytes: usize, max_depth: usize) -> Self {
        self.max_meta_bytes = max_bytes;
        self.max_meta_depth = max_depth;
        self
    }

    /// An allowing answer's `{"meta": {...}}`, if it is one within the limits. The body is
    /// read only up to what such an answer can take: a backend's answer is input too.
    async fn meta_of(&self, mut answer: reqwest::Response) -> Allowed {
        let most = self.max_meta_bytes.saturating_add(64);
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = answer.chunk().await {
            if body.len() + chunk.len() > most {
                tracing::warn!(
                    most,
                    "authorize answer too long: its meta defaults are ignored"
                );
                metric::limit_exceeded("authorize_answer_bytes");
                return None;
            }
            body.extend_from_slice(&chunk);
        }
        let meta = serde_json::from_slice::<HookAnswer>(&body).ok()?.meta?;
        let fits = crate::protocol::is_object(&meta)
            && meta.get().len() <= self.max_meta_bytes
            && !crate::protocol::json_too_deep(meta.get(), self.max_meta_depth);
        if !fits {
            tracing::warn!(
                "authorize answer's meta is not an object within the presence limits: ignored"
            );
            metric::limit_exceeded("authorize_meta");
            return None;
        }
        Some(Arc::from(meta))
    }

    /// What the rules say of `who` in `room` without asking anyone: allowed, refused, or up
    /// to the app's backend ([`Verdict::Hook`]).
    pub fn rule_for(&self, who: &Identity, room: &str) -> Result<Verdict<'_>, Denied> {
        let forbidden = || Denied::Forbidden(room.to_string());
        let Some(rule) = self.rules.iter().find(|r| room.starts_with(&r.prefix)) else {
            return match self.fallback {
                RoomPolicy::Allow => Ok(Verdict::Allowed),
                _ if who.admin => Ok(Verdict::Allowed),
                RoomPolicy::Deny => Err(forbidden()),
                RoomPolicy::Hook => Ok(Verdict::Hook(&self.fallback_url)),
            };
        };
        match rule.policy {
            RulePolicy::Public => Ok(Verdict::Allowed),
            _ if who.admin => Ok(Verdict::Allowed),
            RulePolicy::Admin => Err(forbidden()),
            RulePolicy::Owner if room[rule.prefix.len()..] == *who.user_id => Ok(Verdict::Allowed),
            RulePolicy::Owner => Err(forbidden()),
            RulePolicy::Hook => Ok(Verdict::Hook(&rule.url)),
        }
    }

    /// May `who` use `room`? Hook rooms ask the backend (or the cache).
    pub async fn check(&self, who: &Identity, room: &str) -> Result<Allowed, Denied> {
        match self.rule_for(who, room)? {
            Verdict::Allowed => Ok(None),
            Verdict::Hook(url) => self.ask(url, who, room).await,
        }
    }

    async fn ask(&self, url: &str, who: &Identity, room: &str) -> Result<Allowed, Denied> {
        let key: CacheKey = (who.user_id.clone(), Arc::from(room));
        if let Some(answer) = self.cached(&key) {
            return answer.map_err(|()| Denied::Forbidden(room.to_string()));
        }
        let started = Instant::now();
        let body = json!({
            "user_id": &*who.user_id,
            "room": room,
            "claims": {"sub": &*who.user_id, "exp": who.expires_at, "admin": who.admin},
        });
        let result = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await;
        metric::authorize_latency(started.elapsed());
        let answer = match result {
            Ok(r) if r.status() == reqwest::StatusCode::OK => {
                // A body that is not `{"meta": {...}}` allows without meta defaults.
                let meta = self.meta_of(r).await;
                metric::authorized("allow");
                Ok(meta)
            }
            Ok(r) if r.status() == reqwest::StatusCode::FORBIDDEN => {
                metric::authorized("deny");
                Err(())
            }
            Ok(r) => {
                metric::authorized("error");
                return Err(Denied::Unavailable(format!("it answered {}", r.status())));
            }
            Err(e) => {
                metric::authorized("error");
                let why = if e.is_timeout() {
                    "it timed out (rooms.authorize_timeout)".to_string()
                } else {
                    e.to_string()
                };
                return Err(Denied::Unavailable(why));
            }
        };
        self.remember(key, answer.clone());
        answer.map_err(|()| Denied::Forbidden(room.to_string()))
    }

    fn cached(&self, key: &CacheKey) -> Option<Result<Allowed, ()>> {
        let cache = self.cache.lock();
        let (at, answer) = cache.answers.get(key)?;
        (at.elapsed() < self.cache_ttl).then(|| answer.clone())
    }

    fn remember(&self, key: CacheKey, answer: Result<Allowed, ()>) {
        if self.cache_ttl.is_zero() || self.cache_max == 0 {
            return;
        }
        let mut cache = self.cache.lock();
        if cache
            .answers
            .insert(key.clone(), (Instant::now(), answer))
            .is_none()
        {
            cache.order.push_back(key);
        }
        while cache.answers.len() > self.cache_max {
            let Some(oldest) = cache.order.pop_front() else {
                break;
            };
            cache.answers.remove(&oldest);
        }
        // Expired answers are dropped as the order wraps past them.
        while let Some(front) = cache.order.front() {
            match cache.answers.get(front) {
                Some((at, _)) if at.elapsed() >= self.cache_ttl => {
                    let front = cache.order.pop_front().expect("front exists");
                    cache.answers.remove(&front);
                }
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RoomRule;

    fn who(user: &str, admin: bool) -> Identity {
        Identity {
            user_id: user.into(),
            admin,
            expires_at: u64::MAX,
        }
    }

    #[tokio::test]
    async fn built_in_and_configured_rules() {
        let cfg = RoomsConfig {
            policy: RoomPolicy::Deny,
            rules: vec![
                RoomRule {
                    prefix: "staff:".into(),
                    policy: RulePolicy::Admin,
                    authorize_url: String::new(),
                },
                RoomRule {
                    prefix: "team:".into(),
                    policy: RulePolicy::Owner,
                    authorize_url: String::new(),
                },
                RoomRule {
                    prefix: "public:ro".into(),
                    policy: RulePolicy::Admin,
                    authorize_url: String::new(),
                },
            ],
            ..RoomsConfig::default()
        };
        let access = RoomAccess::new(&cfg).unwrap();
        let ann = who("ann", false);
        assert!(access.check(&ann, "public:lobby").await.is_ok());
        assert!(access.check(&ann, "private:ann").await.is_ok());
        assert!(access.check(&ann, "private:bob").await.is_err());
        assert!(access.check(&ann, "team:ann").await.is_ok());
        assert!(access.check(&ann, "staff:x").await.is_err());
        // The longest prefix wins over `public:`.
        assert!(access.check(&ann, "public:ro-news").await.is_err());
        assert!(access.check(&ann, "other").await.is_err());
        let admin = who("root", true);
        for room in ["staff:x", "private:bob", "other", "public:ro-news"] {
            assert!(access.check(&admin, room).await.is_ok(), "{room}");
        }
    }

    #[test]
    fn rooms_no_rule_matches_may_go_to_the_hook() {
        let cfg = RoomsConfig {
            policy: RoomPolicy::Hook,
            authorize_url: "http://127.0.0.1:9/authorize".into(),
            ..RoomsConfig::default()
        };
        let access = RoomAccess::new(&cfg).unwrap();
        let ann = who("ann", false);
        assert!(matches!(
            access.rule_for(&ann, "team:x"),
            Ok(Verdict::Hook("http://127.0.0.1:9/authorize"))
        ));
        assert!(matches!(
            access.rule_for(&ann, "public:x"),
            Ok(Verdict::Allowed)
        ));
        assert!(matches!(
            access.rule_for(&who("root", true), "team:x"),
            Ok(Verdict::Allowed)
        ));
    }

    #[test]
    fn the_cache_keeps_at_most_its_bound_forgetting_the_oldest() {
        let cfg = RoomsConfig {
            authorize_cache_max: 2,
            ..RoomsConfig::default()
        };
        let access = RoomAccess::new(&cfg).unwrap();
        let key = |r: &str| -> CacheKey { (Arc::from("ann"), Arc::from(r)) };
        for r in ["app:1", "app:2", "app:3"] {
            access.remember(key(r), Ok(None));
        }
        assert_eq!(access.cache.lock().answers.len(), 2);
        assert!(
            access.cached(&key("app:1")).is_none(),
            "the oldest is forgotten"
        );
        assert!(access.cached(&key("app:3")).is_some());
        let off = RoomAccess::new(&RoomsConfig {
            authorize_cache: Duration::ZERO,
            ..RoomsConfig::default()
        })
        .unwrap();
        off.remember(key("app:1"), Err(()));
        assert!(off.cached(&key("app:1")).is_none(), "0s: nothing cached");
    }

    #[tokio::test]
    async fn a_hook_that_cannot_be_reached_is_unavailable_and_not_cached() {
        let cfg = RoomsConfig {
            rules: vec![RoomRule {
                prefix: "app:".into(),
                policy: RulePolicy::Hook,
                authorize_url: "http://127.0.0.1:9/authorize".into(),
            }],
            ..RoomsConfig::default()
        };
        let access = RoomAccess::new(&cfg).unwrap();
        for _ in 0..2 {
            assert!(matches!(
                access.check(&who("ann", false), "app:1").await,
                Err(Denied::Unavailable(_))
            ));
        }
        assert!(access.cache.lock().answers.is_empty());
    }
}
