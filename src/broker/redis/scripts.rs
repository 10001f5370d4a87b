//! The Lua scripts: each runs atomically on the master.

/// Checks the idempotency key, stores, trims, expires and (with `publish_now`) publishes, in one
/// step. The live copy carries the stream id, so the live id and the history id are the same,
/// and the id stored before it (`prev`), so a subscriber that missed a live copy notices and
/// reads it from the stream. Trimming is exact and remembers the newest id it removed, so a
/// `since` older than the history is reported as a gap.
/// A repeated idempotency key stores nothing and answers the first id, with that entry's live
/// copy while it is retained (publishing it again is harmless: subscribers drop ids they had).
/// KEYS: stream, channel, trimmed-id key[, idempotency key].
/// ARGV: maxlen, ttl ms, payload, publish_now (1 or 0), idempotency window ms.
/// Returns {id, live copy or '' once published, 1 if a repeat else 0}.
pub(super) const PUBLISH_SCRIPT: &str = r#"
if KEYS[4] then
  local first = redis.call('GET', KEYS[4])
  if first then
    local live = ''
    local e = redis.call('XRANGE', KEYS[1], first, first)
    if #e > 0 then
      -- With the id stored before it, as every live copy: a subscriber that missed that one
      -- reads it from the stream first.
      local prev = '0-0'
      local before = redis.call('XREVRANGE', KEYS[1], '(' .. first, '-', 'COUNT', 1)
      if #before > 0 then prev = before[1][1] end
      local f = e[1][2]
      for i = 1, #f, 2 do
        if f[i] == 'm' then live = '{"id":"' .. first .. '","prev":"' .. prev .. '",' .. string.sub(f[i + 1], 2) end
      end
    end
    if live ~= '' and ARGV[4] == '1' then
      redis.call('PUBLISH', KEYS[2], live)
      live = ''
    end
    return {first, live, 1}
  end
end
local maxlen = tonumber(ARGV[1])
local over = redis.call('XLEN', KEYS[1]) - maxlen + 1
if over > 0 then
  local gone = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', over)
  redis.call('SET', KEYS[3], gone[#gone][1], 'PX', ARGV[2])
end
local prev = '0-0'
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then prev = last[1][1] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', maxlen, '*', 'm', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if KEYS[4] then redis.call('SET', KEYS[4], id, 'PX', ARGV[5]) end
-- The live copy is the stored JSON with the stream ids in front.
local live = '{"id":"' .. id .. '","prev":"' .. prev .. '",' .. string.sub(ARGV[3], 2)
if ARGV[4] == '1' then
  redis.call('PUBLISH', KEYS[2], live)
  return {id, '', 0}
end
return {id, live, 0}
"#;

/// A direct message: kept in the user's short stream, then published with its id in front.
/// KEYS: the user's direct stream, the user's channel. ARGV: maxlen, TTL ms, payload.
pub(super) const DIRECT_SCRIPT: &str = r#"
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'm', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', KEYS[2], '{"id":"' .. id .. '",' .. string.sub(ARGV[3], 2))
return id
"#;

/// The self-probe: a write and a publish, so that a node that can no longer take writes (a
/// demoted master) fails it like one whose subscription went deaf.
/// KEYS: probe key, probe channel. ARGV: sequence number, ttl ms.
pub(super) const PROBE_SCRIPT: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('PUBLISH', KEYS[2], ARGV[1])
";

/// Adds or replaces a connection's presence and announces the diff on the room channel, unless
/// the room holds ARGV[4] other entries already (then returns 0). Returns 1 when added, 2 when
/// replaced.
/// KEYS: presence hash, instance index, room channel. ARGV: conn id, entry JSON, index member,
/// most entries.
pub(super) const TRACK_SCRIPT: &str = r#"
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
local leaves = ''
if old then leaves = old end
redis.call('PUBLISH', KEYS[3], '{"type":"presence_diff","data":{"joins":[' .. ARGV[2] .. '],"leaves":[' .. leaves .. ']}}')
if old then return 2 end
return 1
"#;

/// Removes a connection's presence, if any, and announces the diff.
pub(super) const UNTRACK_SCRIPT: &str = r#"
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
if not old then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('PUBLISH', KEYS[3], '{"type":"presence_diff","data":{"joins":[],"leaves":[' .. old .. ']}}')
return 1
"#;

/// Records a heartbeat by the server's clock and returns the ids whose heartbeat expired.
/// KEYS: instance set, instance info key. ARGV: id, ttl ms, info JSON.
pub(super) const HEARTBEAT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
";

/// Live instances' info, by the server's clock.
pub(super) const INSTANCES_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
local out = {}
for _, id in ipairs(ids) do
  local info = redis.call('GET', 'rt:instances:' .. id)
  if info then table.insert(out, info) end
end
return out
";

/// Removes a dead instance's presence (once, whoever gets there first) and announces leaves.
/// Returns nothing if another instance got there first, else `reaped` then each removed
/// entry's room and entry.
pub(super) const REAP_SCRIPT: &str = r#"
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return {} end
local out = {'reaped'}
local index = 'rt:presence-of:' .. ARGV[1]
for _, member in ipairs(redis.call('SMEMBERS', index)) do
  local nl = string.find(member, '\n', 1, true)
  local room = string.sub(member, 1, nl - 1)
  local conn = string.sub(member, nl + 1)
  local hash = 'rt:presence:' .. room
  local old = redis.call('HGET', hash, conn)
  if old then
    redis.call('HDEL', hash, conn)
    redis.call('PUBLISH', 'rt:room:' .. room, '{"type":"presence_diff","data":{"joins":[],"leaves":[' .. old .. ']}}')
    table.insert(out, room)
    table.insert(out, old)
  end
end
redis.call('DEL', index)
return out
"#;
