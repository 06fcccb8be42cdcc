"""The Lua scripts of the Redis bus: each runs atomically on the server, in one round trip.

Key layout, under a prefix of ``rustic:bus:<guild_id>:``:

- ``agents``: set of the agents that have subscriptions;
- ``subs:<agent>``: set of an agent's topics; ``topic:<topic>``: set of its agents;
- ``inbox:<agent>``: stream of an agent's deliveries (field ``m``: the message), read by
  the agent's consumer group ``rustic``;
- ``acked:<agent>``: sorted set of the message ids the agent acknowledged, by time;
- ``dead``: hash of dead letters by id, numbered by ``dead:seq``.
"""

from __future__ import annotations

GROUP = "rustic"

# Commits a batch of turns, in order. ARGV: prefix, now, the number of turns, then for
# each turn: agent, entry id and message id of its acknowledgement (all three empty for
# none), the number of publishes and (topic, sender, message id, body) for each, the
# number of dead letters and their records. A subscriber that already acknowledged a
# message id does not get it again. Returns, per turn, a flat list of (agent, message id)
# for each delivery made. The acknowledgement goes first, and XACK cannot fail the script
# (pcall), so that no error can leave a turn's publishes stored without its ack.
COMMIT = """
local prefix, now = ARGV[1], ARGV[2]
local results = {}
local at = 4
for turn = 1, tonumber(ARGV[3]) do
  local agent, entry, handled = ARGV[at], ARGV[at + 1], ARGV[at + 2]
  if agent ~= '' then
    redis.pcall('XACK', prefix .. 'inbox:' .. agent, 'rustic', entry)
    redis.call('ZADD', prefix .. 'acked:' .. agent, now, handled)
  end
  local delivered = {}
  local publishes = tonumber(ARGV[at + 3])
  at = at + 4
  for _ = 1, publishes do
    local topic, sender, id, body = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
    at = at + 4
    for _, target in ipairs(redis.call('SMEMBERS', prefix .. 'topic:' .. topic)) do
      if target ~= sender and not redis.call('ZSCORE', prefix .. 'acked:' .. target, id) then
        redis.call('XADD', prefix .. 'inbox:' .. target, '*', 'm', body)
        delivered[#delivered + 1] = target
        delivered[#delivered + 1] = id
      end
    end
  end
  local dead = tonumber(ARGV[at])
  for n = 1, dead do
    redis.call('HSET', prefix .. 'dead', redis.call('INCR', prefix .. 'dead:seq'), ARGV[at + n])
  end
  at = at + dead + 1
  results[turn] = delivered
end
return results
"""

# ARGV: prefix, agent, then its topics. Replaces the agent's subscriptions.
SUBSCRIBE = """
local prefix, agent = ARGV[1], ARGV[2]
local subs = prefix .. 'subs:' .. agent
for _, topic in ipairs(redis.call('SMEMBERS', subs)) do
  redis.call('SREM', prefix .. 'topic:' .. topic, agent)
end
redis.call('DEL', subs)
for i = 3, #ARGV do
  redis.call('SADD', prefix .. 'topic:' .. ARGV[i], agent)
  redis.call('SADD', subs, ARGV[i])
end
if #ARGV > 2 then
  redis.call('SADD', prefix .. 'agents', agent)
else
  redis.call('SREM', prefix .. 'agents', agent)
end
return #ARGV - 2
"""

# ARGV: prefix, dead letter id, agent, message id, body. Moves one dead letter back into
# its agent's inbox, unless someone else retried it first; the entry's `retry` field tells
# the agent's reader that it comes again on purpose. Returns 1 when it did.
RETRY = """
local prefix, id, agent = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HDEL', prefix .. 'dead', id) == 0 then
  return 0
end
redis.call('ZREM', prefix .. 'acked:' .. agent, ARGV[4])
redis.call('XADD', prefix .. 'inbox:' .. agent, '*', 'm', ARGV[5], 'retry', id)
return 1
"""

# KEYS: an agent's stream and its acknowledged-ids set. ARGV: how many entries and ids to
# keep, the oldest entry time to keep (ms) and the oldest acknowledgement (s). Trims what
# retention lets go, but never an entry not yet handled: nothing at or after the oldest
# pending entry, nothing after the group's last delivered one. Returns the entries trimmed.
PRUNE = """
local stream, acked = KEYS[1], KEYS[2]
local count = tonumber(ARGV[1])
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return {tonumber(ms), tonumber(seq)}
end
local function before(a, b)
  return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2])
end
redis.call('ZREMRANGEBYSCORE', acked, '-inf', '(' .. ARGV[3])
redis.call('ZREMRANGEBYRANK', acked, 0, -(count + 1))
if redis.call('EXISTS', stream) == 0 then
  return 0
end
local safe
for _, group in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  for i = 1, #group, 2 do
    if group[i] == 'last-delivered-id' then
      local next_id = parse(group[i + 1])
      next_id[2] = next_id[2] + 1
      if not safe or before(next_id, safe) then
        safe = next_id
      end
    end
  end
end
if not safe then
  return 0
end
local pending = redis.call('XPENDING', stream, 'rustic')
if pending[2] then
  local oldest = parse(pending[2])
  if before(oldest, safe) then
    safe = oldest
  end
end
local cut = {tonumber(ARGV[2]), 0}
local excess = redis.call('XLEN', stream) - count
if excess > 0 then
  local range = redis.call('XRANGE', stream, '-', '+', 'COUNT', excess + 1)
  local last = parse(range[#range][1])
  if #range <= excess then
    last[2] = last[2] + 1
  end
  if before(cut, last) then
    cut = last
  end
end
if before(safe, cut) then
  cut = safe
end
return redis.call('XTRIM', stream, 'MINID', cut[1] .. '-' .. cut[2])
"""
