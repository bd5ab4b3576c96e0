"""The Lua scripts of the Redis connector (each one round trip, atomic), and key names."""

from __future__ import annotations

import hashlib

CLAIM_COUNT = 1000

# --- Lua scripts: each is one round trip and atomic -------------------------------------------

# KEYS: stream, fence; ARGV: group, token.  Create the group (id 0: entries sent before the
# pipeline existed are served too) and take the partition unless a newer token holds it.
_START = """
pcall(redis.call, 'XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
local cur = redis.call('GET', KEYS[2])
if cur and tonumber(cur) > tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
return 1
"""

# KEYS: stream, fence; ARGV: group, consumer, token, cursor, count.  Take over up to count
# pending entries of other consumers (min-idle 0: the controller already decided that their
# runners are gone); return -1 when revoked, else {next cursor, number taken}.
_CLAIM = """
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return -1 end
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[4], 'COUNT', ARGV[5], 'JUSTID')
return {r[1], #r[2]}
"""

# Messages travel packed (see :func:`pack_messages`): one string holds, per message, a big-endian
# uint32 length and the bytes; a message over BIG_MESSAGE bytes is a separate argument or reply
# element instead (length 0xFFFFFFFE: "the next one"), so that Lua never copies large
# payloads while a pure-Python RESP parser reads thousands of small ones as one string.

# KEYS: stream, fence; ARGV: group, consumer, token, count, id ('>' for new entries, else
# the id after which to re-read this consumer's pending entries).  Returns -1 when another
# runner owns the partition, else {packed, big...} where packed holds per entry the lengths
# of id, data (0xFFFFFFFF: the entry was deleted meanwhile) and meta as three uint32, the id,
# the meta (the entry's other fields: per field a uint32 length and the name, a uint32 length
# and the value; empty for daskinfer's own entries) and the data unless it is big; an entry
# without a 'd' field has empty data.
_READ = """
local f = redis.call('GET', KEYS[2])
if not f then
  redis.call('SET', KEYS[2], ARGV[3])
  pcall(redis.call, 'XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
elseif f ~= ARGV[3] then
  return -1
end
local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[4], 'STREAMS', KEYS[1], ARGV[5])
if not r then return {} end
local parts, out = {}, {''}
for i, e in ipairs(r[1][2]) do
  local fv = e[2]
  if fv then
    local d, m = nil, {}
    for j = 1, #fv, 2 do
      if fv[j] == 'd' and not d then
        d = fv[j + 1]
      else
        m[#m + 1] = struct.pack('>I4', #fv[j]) .. fv[j] .. struct.pack('>I4', #fv[j + 1]) .. fv[j + 1]
      end
    end
    d = d or ''
    local meta = table.concat(m)
    if #d > BIG then
      parts[i] = struct.pack('>I4I4I4', #e[1], 4294967294, #meta) .. e[1] .. meta
      out[#out + 1] = d
    else
      parts[i] = struct.pack('>I4I4I4', #e[1], #d, #meta) .. e[1] .. meta .. d
    end
  else
    parts[i] = struct.pack('>I4I4I4', #e[1], 4294967295, 0) .. e[1]
  end
end
out[1] = table.concat(parts)
return out
"""

# KEYS: stream; ARGV: id (exclusive) to read after, count, id below which to delete ('': none).
# Delete what the client has delivered, then return {last id, packed, big...} (packed holds
# per entry a uint32 length and the data unless it is big), or {} when there is nothing new.
_FETCH = """
if ARGV[3] ~= '' then redis.call('XTRIM', KEYS[1], 'MINID', ARGV[3]) end
local r = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
local n = #r
if n == 0 then return {} end
local parts, out = {}, {r[n][1], ''}
for i, e in ipairs(r) do
  local fv = e[2]
  local d = ''
  for j = 1, #fv, 2 do
    if fv[j] == 'd' then d = fv[j + 1] break end
  end
  if #d > BIG then
    parts[i] = struct.pack('>I4', 4294967294)
    out[#out + 1] = d
  else
    parts[i] = struct.pack('>I4', #d) .. d
  end
end
out[2] = table.concat(parts)
return out
"""

# KEYS: stream, fence; ARGV: group, consumer, token, cursor, count.  Take over up to count
# pending entries of other consumers (min-idle 0: the controller already decided that their
# runners are gone); return -1 when revoked, else {next cursor, number taken}.
_CLAIM = """
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return -1 end
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[4], 'COUNT', ARGV[5], 'JUSTID')
return {r[1], #r[2]}
"""

# Lua: call fn(message) for the messages packed in ARGV[a] (big ones follow it); return the
# index of the argument after them.  fn returns false to stop early.
_UNPACK_LUA = """
local function each(a, nbig, fn)
  local buf, b = ARGV[a], a + 1
  local pos, n = 1, #buf
  while pos <= n do
    local len = struct.unpack('>I4', buf, pos)
    pos = pos + 4
    local d
    if len == 4294967294 then
      d = ARGV[b]
      b = b + 1
    else
      d = string.sub(buf, pos, pos + len - 1)
      pos = pos + len
    end
    if fn(d) == false then break end
  end
  return a + 1 + nbig
end
"""

# KEYS: stream, fence, topic streams...; ARGV: group, token, ids to acknowledge (separated by
# spaces), then per topic: approximate maxlen (0: none), create the stream ('1') or only
# append to an existing one ('0': a reply stream whose client left gets nothing), more
# fields of each entry after 'd' (name and value, each ending in a newline; '': none),
# number of big messages, packed messages, the big ones.  A topic may come several times
# (runs of messages with other fields).  Writes the results and then acknowledges and
# deletes the processed inbox entries, atomically: both happen or neither.  Returns -1 when
# another runner owns the partition (nothing written), else the (1-based) numbers of the
# topics that were not there.  The entries are acknowledged first: if none of them was still
# pending, an earlier run already wrote their results and nothing is written again (an
# idempotent outbox, also when a reply was lost and the call retried).
_DELIVER = (
    _UNPACK_LUA
    + """
local f = redis.call('GET', KEYS[2])
if f and f ~= ARGV[2] then return -1 end
local ids = {}
for id in string.gmatch(ARGV[3], '%S+') do ids[#ids + 1] = id end
local acked = 0
for i = 1, #ids, 1000 do
  acked = acked + redis.call('XACK', KEYS[1], ARGV[1], unpack(ids, i, math.min(i + 999, #ids)))
end
-- none of these entries was pending any more: their results were written by an earlier
-- run of this script (whose reply was lost); writing them again would duplicate answers
if #ids > 0 and acked == 0 then return {} end
local missing = {}
local a = 4
for k = 1, #KEYS - 2 do
  local key, maxlen, create, nbig = KEYS[k + 2], ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 3])
  local more = {}
  for s in string.gmatch(ARGV[a + 2], '([^\\n]*)\\n') do more[#more + 1] = s end
  local kind = redis.call('TYPE', key)['ok']
  if (create == '0' and kind == 'none') or (kind ~= 'none' and kind ~= 'stream') then
    -- a reply stream that is gone, or a key that is not a stream: its results are dropped (and
    -- counted), never a failure after the acknowledgement above
    missing[#missing + 1] = k
    a = a + 5 + nbig
  elseif maxlen == '0' then
    a = each(a + 4, nbig, function(d) redis.call('XADD', key, '*', 'd', d, unpack(more)) end)
  else
    a = each(a + 4, nbig, function(d) redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 'd', d, unpack(more)) end)
  end
end
for i = 1, #ids, 1000 do
  redis.call('XDEL', KEYS[1], unpack(ids, i, math.min(i + 999, #ids)))
end
return missing
"""
)

# KEYS: stream, sends hash; ARGV: bound, client, seq, ttl, messages, number of big ones, packed, big...
# A client's sends to one partition stream carry consecutive seqs and may be in flight at once; the
# hash records per client the last send that is all in (``{client}:s``) and how many messages of
# the next one are (``{client}:n``), so that sends land in seq order whatever order they arrive in,
# and a send made again after a lost reply adds nothing twice.  Appends what fits under the bound.
# Returns {status, messages of this send in now}: status -1: it was all in already; -2: an earlier
# send of this client is not all in yet (make this one again after it); 0: appended what fit.
_PUT_SEQ = (
    _UNPACK_LUA
    + """
local cs, cn = ARGV[2] .. ':s', ARGV[2] .. ':n'
local st = redis.call('HMGET', KEYS[2], cs, cn)
local last, done = tonumber(st[1] or '-1'), tonumber(st[2] or '0')
local seq = tonumber(ARGV[3])
if seq <= last then return {-1, 0} end
if seq ~= last + 1 then return {-2, 0} end
local room = tonumber(ARGV[1]) - redis.call('XLEN', KEYS[1])
local i, total = 0, 0
each(7, tonumber(ARGV[6]), function(d)
  i = i + 1
  if i > done then
    if room <= 0 then return false end
    redis.call('XADD', KEYS[1], '*', 'd', d)
    room = room - 1
  end
  total = i
  return true
end)
if total == tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[2], cs, seq, cn, 0)
else
  redis.call('HSET', KEYS[2], cn, total)
end
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {0, total}
"""
)

# KEYS: sends hash; ARGV: client, seq.  Give up on send ``seq`` (its requests failed): the next may land.
_PUT_SKIP = """
local cs = ARGV[1] .. ':s'
if tonumber(redis.call('HGET', KEYS[1], cs) or '-1') < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], cs, ARGV[2], ARGV[1] .. ':n', 0)
end
return 1
"""

# KEYS: stream.  Create an empty stream unless it exists.
_ENSURE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XADD', KEYS[1], 'MAXLEN', '0', '*', 'd', '')
end
return redis.call('XLEN', KEYS[1])
"""

BIG_MESSAGE = 8192  # bytes: larger messages are not packed (Lua would copy them)
SCRIPTS = {
    "start": _START,
    "claim": _CLAIM,
    "read": _READ,
    "fetch": _FETCH,
    "deliver": _DELIVER,
    "put_seq": _PUT_SEQ,
    "put_skip": _PUT_SKIP,
    "ensure": _ENSURE,
}
SCRIPTS = {name: src.replace("BIG", str(BIG_MESSAGE)) for name, src in SCRIPTS.items()}
SCRIPT_SHAS = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in SCRIPTS.items()}


def inbox_stream(inbox: str, partition: int) -> str:
    """Name of the stream of inbox partition ``partition``."""
    return f"{inbox}:{partition}"


def meta_key(inbox: str) -> str:
    """Name of the hash that records an inbox's partitions and deployment generations."""
    return f"{inbox}:meta"


def sends_key(inbox: str, partition: int) -> str:
    """Name of the hash that orders the clients' sends to inbox partition ``partition`` (see ``put_seq``)."""
    return f"{inbox}:{partition}:sends"


def fence_key(inbox: str, partition: int, group: str) -> str:
    """Name of the key that holds the fencing token of ``group``'s runner of ``partition``."""
    return f"{inbox}:{partition}:fence:{group}"
