"""The Lua scripts cluster mode runs in Redis, by their SHA1 (EVALSHA): a
name taken or renewed (CLAIM) and freed (RELEASE), and a turn stored,
fenced on its senders' names (APPEND). cluster.py's docstring says how the
room uses them; each script's comment says what it is given and returns.
"""

from __future__ import annotations

import hashlib
from typing import Final

# Shared by the scripts that change something: whether Redis's clock is past
# the request's deadline (ms, Redis's clock; "0": none).
_LATE: Final = b"""\
local function late(deadline)
  if deadline == '0' then return false end
  local now = redis.call('TIME')
  return tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(deadline)
end
"""
# Take every key of a name, or renew them, all or none. ARGV: owner, lease
# (ms), deadline. 1 if this owner holds them all now; 0 (nothing changed) if
# another owner holds one; -1 if too late.
CLAIM: Final = (
    _LATE
    + b"""\
if late(ARGV[3]) then return -1 end
for _, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  if holder and holder ~= ARGV[1] then return 0 end
end
for _, key in ipairs(KEYS) do redis.call('SET', key, ARGV[1], 'PX', ARGV[2]) end
return 1"""
)
# Delete the keys this owner still holds.
RELEASE: Final = b"""\
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 0"""
# Store one turn's messages, fenced. KEYS: the stream, its head, then every
# sender's name keys, sender after sender. ARGV: deadline, lease, KEEP, the
# entry, then for each sender its owner and its number of keys. Returns the
# new entry's ID; or the senders (numbered from 1) that do not own their
# name, and stores nothing; or -1 if too late. A key whose lease ran out
# and that nobody took is taken again: the name is still nobody else's.
APPEND: Final = (
    _LATE
    + b"""\
if late(ARGV[1]) then return -1 end
local lost, first = {}, 3
for i = 5, #ARGV, 2 do
  local last = first + tonumber(ARGV[i + 1]) - 1
  local free = {}
  for k = first, last do
    local holder = redis.call('GET', KEYS[k])
    if not holder then
      free[#free + 1] = KEYS[k]
    elseif holder ~= ARGV[i] then
      lost[#lost + 1] = (i - 3) / 2
      free = {}
      break
    end
  end
  for _, key in ipairs(free) do redis.call('SET', key, ARGV[i], 'PX', ARGV[2]) end
  first = last + 1
end
if #lost > 0 then return lost end
local prev = redis.call('GET', KEYS[2]) or '0-0'
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'p', prev, 'm', ARGV[4])
redis.call('SET', KEYS[2], id)
return id"""
)
SCRIPTS: Final = (CLAIM, RELEASE, APPEND)


def _sha(script: bytes) -> bytes:
    return hashlib.sha1(script).hexdigest().encode()


CLAIM_SHA: Final = _sha(CLAIM)
RELEASE_SHA: Final = _sha(RELEASE)
APPEND_SHA: Final = _sha(APPEND)
