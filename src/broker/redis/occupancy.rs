//! The occupancy index: which instances hold members of a room, or connections of a user, and
//! how many. One hash per room or user (`rt:occupancy:<kind>:<name>`, instance -> count), so
//! the first-in and last-out edges are decided atomically by one script on one key (one slot on
//! a Cluster); one set per instance (`rt:occupied-by:<kind>:<instance>`) of what it holds, so
//! a dead instance's share is removed by whoever reaps it.

use std::collections::{BTreeSet, HashSet};

use redis::aio::ConnectionLike;

use super::*;

/// Sets (or, with 0, removes) one instance's count and says whether the hash went from empty
/// to not (1) or the other way (-1). KEYS: the hash. ARGV: instance, count.
const SET_COUNT: &str = r"
local before = redis.call('HLEN', KEYS[1])
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local after = redis.call('HLEN', KEYS[1])
if before == 0 and after > 0 then return 1 end
if before > 0 and after == 0 then return -1 end
return 0
";

const KINDS: [&str; 2] = ["room", "user"];

/// Key names, with hash tags on a Cluster (the room or user, the instance).
#[derive(Clone, Copy)]
pub(super) struct Keys {
    pub(super) tagged: bool,
}

impl Keys {
    fn wrap(&self, name: &str) -> String {
        if self.tagged {
            format!("{{{name}}}")
        } else {
            name.to_string()
        }
    }

    fn counts(&self, kind: &str, name: &str) -> String {
        format!("rt:occupancy:{kind}:{}", self.wrap(name))
    }

    fn held_by(&self, kind: &str, instance: &str) -> String {
        format!("rt:occupied-by:{kind}:{}", self.wrap(instance))
    }
}

fn valid_name(kind: &str, name: &str) -> bool {
    match kind {
        "room" => crate::protocol::valid_room(name),
        _ => !name.is_empty() && name.len() <= crate::broker::wire::MAX_ID_LEN,
    }
}

pub(super) async fn set_local_count<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: Keys,
    instance: &str,
    who: &Occupant,
    count: usize,
) -> Result<Option<Edge>, RedisError> {
    let edge: i64 = redis::cmd("EVAL")
        .arg(SET_COUNT)
        .arg(1)
        .arg(keys.counts(who.kind(), who.name()))
        .arg(instance)
        .arg(count)
        .query_async(conn)
        .await?;
    let held = keys.held_by(who.kind(), instance);
    let mut cmd = redis::cmd(if count > 0 { "SADD" } else { "SREM" });
    cmd.arg(held)
        .arg(who.name())
        .query_async::<i64>(conn)
        .await?;
    Ok(match edge {
        1 => Some(Edge::Occupied),
        -1 => Some(Edge::Vacated),
        _ => None,
    })
}

/// `who`'s count over the `live` instances (an entry of an instance not yet reaped is left out).
pub(super) async fn count<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: Keys,
    who: &Occupant,
    live: &HashSet<String>,
) -> Result<u64, RedisError> {
    let counts: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.counts(who.kind(), who.name()))
        .query_async(conn)
        .await?;
    Ok(counts
        .iter()
        .filter(|(instance, _)| live.contains(*instance))
        .filter_map(|(_, n)| n.parse::<u64>().ok())
        .fold(0u64, u64::saturating_add))
}

/// Rooms held by the `live` instances, by name, the first `limit` after `after`, with counts.
pub(super) async fn rooms<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: Keys,
    live: &HashSet<String>,
    after: &str,
    limit: usize,
) -> Result<Vec<(RoomName, u64)>, RedisError> {
    // A page of names at a time: memory stays within a page whatever the sets hold. A name
    // whose count is gone (a stale set entry) is skipped and the next page read, so a short
    // page means the last one.
    let mut out = Vec::new();
    let mut cursor = after.to_string();
    while out.len() < limit {
        let mut names = BTreeSet::new();
        for instance in live {
            let held: Vec<String> = redis::cmd("SMEMBERS")
                .arg(keys.held_by("room", instance))
                .query_async(conn)
                .await?;
            for name in held {
                if name > cursor && valid_name("room", &name) {
                    names.insert(name);
                    if names.len() > limit {
                        names.pop_last();
                    }
                }
            }
        }
        let Some(last) = names.last().cloned() else {
            break;
        };
        for name in names {
            if out.len() >= limit {
                break;
            }
            let room = RoomName::from(name);
            let n = count(conn, keys, &Occupant::Room(room.clone()), live).await?;
            if n > 0 {
                out.push((room, n));
            }
        }
        cursor = last;
    }
    Ok(out)
}

/// Removes a dead instance's share of every room and user; returns the rooms it left empty
/// everywhere. Call once per dead instance (whoever removed it from the instance set).
pub(super) async fn reap<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: Keys,
    dead: &str,
) -> Result<Vec<RoomName>, RedisError> {
    let mut vacated = Vec::new();
    for kind in KINDS {
        let held_key = keys.held_by(kind, dead);
        let held: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&held_key)
            .query_async(conn)
            .await?;
        for name in held {
            let edge: i64 = redis::cmd("EVAL")
                .arg(SET_COUNT)
                .arg(1)
                .arg(keys.counts(kind, &name))
                .arg(dead)
                .arg(0)
                .query_async(conn)
                .await?;
            if edge == -1 && kind == "room" && valid_name(kind, &name) {
                vacated.push(RoomName::from(name));
            }
        }
        redis::cmd("DEL")
            .arg(&held_key)
            .query_async::<i64>(conn)
            .await?;
    }
    Ok(vacated)
}
