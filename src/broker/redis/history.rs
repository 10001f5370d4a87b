//! Reading a room's history from its stream, and confirming a read is replicated.

use super::*;

/// Stream entries of `room` after `after`, the newest `limit`, oldest first; `gap` when some
/// entry after `after` was trimmed or expired.
/// `key_room` is the room as its keys spell it (`{<room>}` on Redis Cluster).
pub(super) async fn read_history<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    room: &RoomName,
    key_room: &str,
    after: MessageId,
    limit: usize,
    cfg: &RedisConfig,
) -> Result<History, RedisError> {
    let key = names::stream(key_room);
    let mut pipe = redis::pipe();
    pipe.cmd("EXISTS").arg(&key);
    pipe.cmd("GET").arg(names::trimmed(key_room));
    pipe.cmd("XREVRANGE")
        .arg(&key)
        .arg("+")
        .arg(format!("({after}"))
        .arg("COUNT")
        .arg(limit + 1);
    // Whether `after` itself is still stored: if it is neither stored nor the newest trimmed
    // id, the history it belonged to is gone (Redis lost its data, a failover lost writes).
    pipe.cmd("XRANGE")
        .arg(&key)
        .arg(after.to_string())
        .arg(after.to_string());
    let (exists, trimmed, entries, itself): (bool, Option<String>, Vec<Value>, Vec<Value>) =
        pipe.query_async(conn).await?;
    let mut events = parse_entries(room, &entries);
    events.reverse();
    let mut gap = false;
    if events.len() > limit {
        events.drain(..events.len() - limit);
        gap = true;
    }
    let trimmed = trimmed.and_then(|t| t.parse::<MessageId>().ok());
    if let Some(trimmed) = trimmed {
        gap |= trimmed > after;
    }
    let known = after == MessageId::ZERO || !itself.is_empty() || trimmed == Some(after);
    gap |= !known;
    if !exists && after != MessageId::ZERO {
        // The whole stream expired: a `since` older than the TTL may have missed messages.
        let ttl_ms = cfg.stream_ttl.as_millis() as u64;
        gap |= after.hi + ttl_ms < crate::protocol::now_ms();
    }
    Ok(History {
        events: events.into_iter().map(Arc::new).collect(),
        gap,
    })
}

/// Each XRANGE/XREVRANGE entry's id and payload (`[[id, [field, value, ...]], ...]`, the
/// payload in field `m`); a malformed entry is skipped and counted.
fn stream_payloads(entries: &[Value]) -> Vec<(MessageId, String)> {
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(parts) = entry else { continue };
        let (Some(id), Some(Value::Array(fields))) = (parts.first(), parts.get(1)) else {
            continue;
        };
        let Ok(id) = redis::from_redis_value_ref::<String>(id) else {
            continue;
        };
        let Ok(id) = id.parse::<MessageId>() else {
            continue;
        };
        let payload = fields.chunks(2).find_map(|kv| {
            let name: String = redis::from_redis_value_ref(&kv[0]).ok()?;
            (name == "m")
                .then(|| redis::from_redis_value_ref::<String>(kv.get(1)?).ok())
                .flatten()
        });
        match payload {
            Some(p) => out.push((id, p)),
            None => wire::skip_bad_payload("redis", "stream entry", &"no payload field"),
        }
    }
    out
}

/// A room stream's entries as events.
pub(super) fn parse_entries(room: &RoomName, entries: &[Value]) -> Vec<RoomEvent> {
    stream_payloads(entries)
        .into_iter()
        .filter_map(
            |(id, p)| match wire::decode_message(p.as_bytes(), Some(room), Some(id)) {
                Ok(event) => Some(event),
                Err(e) => {
                    wire::skip_bad_payload("redis", "stream entry", &e);
                    None
                }
            },
        )
        .collect()
}

/// A user's direct stream entries, with their ids.
pub(super) fn parse_directs(entries: &[Value]) -> Vec<(MessageId, DirectMessage)> {
    stream_payloads(entries)
        .into_iter()
        .filter_map(|(id, p)| match wire::decode_direct(p.as_bytes()) {
            Ok(msg) => Some((id, msg)),
            Err(e) => {
                wire::skip_bad_payload("redis", "direct stream entry", &e);
                None
            }
        })
        .collect()
}

/// With replicas to wait for, confirms that what was just read from `master` is on
/// `min_replicas_ack` replicas: a write made after the read, then `WAIT` for it. Replication is
/// one ordered stream, so a replica that has the write has every entry the read returned.
/// Without this, a master frozen through a failover and then resumed (before it is demoted)
/// could hand out entries stored after the new master took over, which no failover keeps.
/// Returns whether the replicas confirmed in time.
pub(super) async fn confirm_read(
    shared: &Shared,
    master: &mut MultiplexedConnection,
) -> Result<bool, RedisError> {
    let min_acks = shared.min_acks.load(Ordering::Relaxed);
    if min_acks == 0 {
        return Ok(true);
    }
    let ttl_ms = shared.cfg.wait_timeout.as_millis().max(1000) as u64;
    let (_, acked): (Value, i64) = redis::pipe()
        .cmd("SET")
        .arg(names::confirm_key(&shared.instance_id))
        .arg(1)
        .arg("PX")
        .arg(ttl_ms)
        .cmd("WAIT")
        .arg(min_acks)
        .arg(shared.cfg.wait_timeout.as_millis() as u64)
        .query_async(master)
        .await?;
    if acked < i64::from(min_acks) {
        tracing::warn!(
            acked,
            min_acks,
            "history read not confirmed by the replicas"
        );
    }
    Ok(acked >= i64::from(min_acks))
}
