-- relay365's shared quota ledger: one mailbox's sliding windows in Redis, decided
-- atomically on the server's clock. Loaded with SCRIPT LOAD and run with EVALSHA by
-- src/quota/redis/script.rs, which documents the keys, the arguments and the answers;
-- the rules are those of src/quota/window.rs (an entry stamped s counts against a
-- window of hold h while s <= now < s + h; a reservation is recorded before the send and
-- never given back, it expires), and the tests run both on the same cases.
--
-- KEYS: T (zset of entries by stamp), C (the same entries by running recipient count),
--       M (hash: total = running count, seq = waiter tickets, fu/fr = freeze end/reason),
--       Q (zset of waiting reservers by ticket), W (hash: waiter -> "want:deadline").
-- An entry is the member "<cum, 16 digits>:<stamp ms>:<recipients>:<host>". Stamps are
-- non-decreasing in cum order (a writer stamps max(its stamp, the last)), so T and C
-- hold the entries in the same order and a window's sum is one subtraction.

local T, C, M, Q, W = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local mode, id, host = ARGV[1], ARGV[2], ARGV[3]
local lead, wanted = tonumber(ARGV[4]), tonumber(ARGV[5])
local mcount, mhold = tonumber(ARGV[6]), tonumber(ARGV[7])
local rcount, rhold = tonumber(ARGV[8]), tonumber(ARGV[9])
local cap, maxr, retention = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
-- A waiter that does not come back this long after the moment it was told is dropped
-- from the line, so a host that died holds the others up once, briefly.
local GRACE = 2000

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function fmt(x) return string.format('%.0f', x) end

local function parse(m)
  local cum, ms, r, h = string.match(m, '^(%d+):(%d+):(%d+):(.*)$')
  return tonumber(cum), tonumber(ms), tonumber(r), h
end

local function last_entry()
  return redis.call('ZRANGE', T, -1, -1)[1]
end

-- The first entry still counting against a window of `hold`, if any.
local function first_in(hold)
  return redis.call('ZRANGEBYSCORE', T, '(' .. fmt(now - hold), '+inf', 'LIMIT', 0, 1)[1]
end

-- Recipients counting against a window of `hold`, and the running count before them.
local function sum_in(hold)
  local f = first_in(hold)
  if not f then return 0, nil end
  local cf, _, rf = parse(f)
  local cl = parse(last_entry())
  return cl - (cf - rf), cf - rf
end

local function count_in(hold)
  return redis.call('ZCOUNT', T, '(' .. fmt(now - hold), '+inf')
end

-- When one more transaction fits the message window with `extra` waiters ahead
-- (window::message_free_at for extra = 0).
local function msg_free_at(extra)
  local n = count_in(mhold)
  if n + extra < mcount then return now end
  local k = mcount - extra
  if k <= 0 then return now + mhold end
  local e = redis.call('ZRANGE', T, -k, -k)[1]
  if not e then return now end
  local _, ms = parse(e)
  return ms + mhold
end

-- When `want` more recipients fit the recipient window less the reserve
-- (window::recipients_free_at; `want` includes what the waiters ahead want).
local function rcpt_free_at(want)
  local sum, base = sum_in(rhold)
  if sum + want <= cap then return now end
  if not base then return now + rhold end
  local e = redis.call('ZRANGEBYSCORE', C, fmt(base + sum + want - cap), '+inf', 'LIMIT', 0, 1)[1]
  if not e then return now + rhold end
  local _, ms = parse(e)
  return ms + rhold
end

local function keep()
  for _, k in ipairs({T, C, M, Q, W}) do
    redis.call('PEXPIRE', k, fmt(retention + 86400000))
  end
end

-- Drops the entries that have left every window (window::drop_expired).
local function prune()
  redis.call('ZREMRANGEBYSCORE', T, '-inf', fmt(now - retention))
  local f = redis.call('ZRANGE', T, 0, 0)[1]
  if f then
    local cf = parse(f)
    redis.call('ZREMRANGEBYSCORE', C, '-inf', '(' .. fmt(cf))
  else
    redis.call('DEL', C)
  end
end

-- Records a transaction stamped no earlier than the last; returns the stamp.
local function append(stamp, r, who)
  local last = redis.call('ZRANGE', T, -1, -1, 'WITHSCORES')
  if last[2] and tonumber(last[2]) > stamp then stamp = tonumber(last[2]) end
  local cum = redis.call('HINCRBY', M, 'total', r)
  local m = string.format('%016.0f:%.0f:%d:%s', cum, stamp, r, who)
  redis.call('ZADD', T, fmt(stamp), m)
  redis.call('ZADD', C, fmt(cum), m)
  keep()
  return stamp
end

local function freeze_until()
  return tonumber(redis.call('HGET', M, 'fu') or '0')
end

local function state()
  local fu = freeze_until()
  local fr = redis.call('HGET', M, 'fr') or ''
  if fu <= now then fu, fr = 0, '' end
  local rsum = sum_in(rhold)
  return {count_in(mhold), rsum, fu, fr, tonumber(redis.call('HGET', M, 'total') or '0')}
end

-- Live waiters ahead of ticket `mine` (all of them if nil): how many, and the
-- recipients they want. Waiters past their deadline leave the line here.
local function ahead(mine)
  local all = redis.call('ZRANGE', Q, 0, -1, 'WITHSCORES')
  local n, r = 0, 0
  for i = 1, #all, 2 do
    local wid, ticket = all[i], tonumber(all[i + 1])
    local v = redis.call('HGET', W, wid)
    local want, deadline = 0, 0
    if v then
      local a, b = string.match(v, '^(%d+):(%d+)$')
      want, deadline = tonumber(a) or 0, tonumber(b) or 0
    end
    if deadline < now then
      redis.call('ZREM', Q, wid)
      redis.call('HDEL', W, wid)
    elseif wid ~= id and (mine == nil or ticket < mine) then
      n, r = n + 1, r + want
    end
  end
  return n, r
end

local function answer(kind, value)
  local s = state()
  return {kind, fmt(value), fmt(now), s[1], s[2], fmt(s[3]), s[4], s[5]}
end

if mode == 'reserve' then
  prune()
  local mine = redis.call('ZSCORE', Q, id)
  if mine then mine = tonumber(mine) else mine = nil end
  local an, ar = ahead(mine)
  local at = math.max(now, freeze_until())
  if mcount > 0 then at = math.max(at, msg_free_at(an)) end
  local room = maxr
  if rcount > 0 then
    local sum = sum_in(rhold)
    room = math.min(maxr, cap - sum - ar)
    if room < 1 then at = math.max(at, rcpt_free_at(ar + 1)) end
  end
  if at <= now and room >= 1 then
    local n = math.min(room, wanted)
    append(now + lead, n, host)
    redis.call('ZREM', Q, id)
    redis.call('HDEL', W, id)
    return answer(1, n)
  end
  at = math.max(at, now + 1)
  if not mine then
    redis.call('ZADD', Q, redis.call('HINCRBY', M, 'seq', 1), id)
  end
  redis.call('HSET', W, id, math.min(wanted, maxr) .. ':' .. fmt(at + GRACE))
  keep()
  return answer(0, at)
elseif mode == 'add' then
  -- ARGV[13]: recipients; ARGV[14]: the stamp (server clock), or '' for now.
  local r = tonumber(ARGV[13])
  local stamp = tonumber(ARGV[14]) or now
  prune()
  return answer(1, append(stamp, r, host))
elseif mode == 'usage' then
  prune()
  local s = answer(0, 0)
  local mnext, rnext = 0, 0
  if mcount > 0 then mnext = msg_free_at(0) end
  if rcount > 0 then rnext = rcpt_free_at(1) end
  table.insert(s, fmt(mnext))
  table.insert(s, fmt(rnext))
  -- Each host's share: messages in the message window, recipients in the recipient one.
  local per, order = {}, {}
  local function slot(h)
    if not per[h] then per[h] = {0, 0}; table.insert(order, h) end
    return per[h]
  end
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', T, '(' .. fmt(now - rhold), '+inf')) do
    local _, _, r, h = parse(m)
    local p = slot(h)
    p[2] = p[2] + r
  end
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', T, '(' .. fmt(now - mhold), '+inf')) do
    local _, _, _, h = parse(m)
    local p = slot(h)
    p[1] = p[1] + 1
  end
  local waiting = redis.call('ZCARD', Q)
  table.insert(s, waiting)
  for _, h in ipairs(order) do
    table.insert(s, h)
    table.insert(s, per[h][1])
    table.insert(s, per[h][2])
  end
  return s
elseif mode == 'until' then
  -- When the server's recipient quota has room again after a quota reply
  -- (Ledger::quota_reply_until); rcount/rhold are the default rate's when off.
  prune()
  local sum, base = sum_in(rhold)
  local at = now + rhold
  if cap > 0 and sum >= rcount and base then
    local e = redis.call('ZRANGEBYSCORE', C, fmt(base + sum - rcount + 1), '+inf', 'LIMIT', 0, 1)[1]
    if e then
      local _, ms = parse(e)
      at = ms + rhold
    end
  end
  return answer(0, math.max(at, now))
elseif mode == 'freeze' then
  -- ARGV[13]: the end (server clock); ARGV[14]: the reason. Only ever extends.
  local until_ms = tonumber(ARGV[13])
  if until_ms > freeze_until() then
    redis.call('HSET', M, 'fu', fmt(until_ms), 'fr', ARGV[14])
    keep()
  end
  return answer(0, 0)
elseif mode == 'thaw' then
  redis.call('HDEL', M, 'fu', 'fr')
  return answer(0, 0)
elseif mode == 'state' then
  return answer(0, 0)
end
return redis.error_reply('relay365 ledger script: unknown mode ' .. tostring(mode))
