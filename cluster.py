"""Cluster mode: several chat.py processes serving one room through Redis.

chat.py imports this module only when it is started with --redis; it needs
the `hiredis` package (requirements-cluster.txt), whose `Reader` parses
Redis's replies without doing any I/O. Commands are encoded here.

The contract is PROTOCOL.md, "Cluster mode" and "What 'accepted' means in
cluster mode". How it is kept:

- Messages are a Redis Stream, `chat:<room>:messages`. The SENDs a server
  accepts in one loop turn are appended together, as one entry, by one
  script (APPEND) at the end of the turn, and not delivered at once. Every
  server, the sender's included, reads the stream with XREAD BLOCK from the
  last entry it delivered, on a connection of its own, and delivers what it
  reads, so every server delivers in the stream's order; after an outage,
  a pause or a slow patch it carries on exactly where it was. An entry is
  "<server id>:<id>,<id>,...\\n" then the RECEIVE lines, one connection id
  per line: the origin server splits it to leave each sender out; every
  other server hands the lines on as one piece.
- Accepted means stored. A connection that published is held (`Host.hold`)
  until Redis answers the APPEND: its later lines wait, so an answer to one
  of its SENDs (`ERROR Service unavailable.`, or the name lost) comes in
  that SEND's place.
- History. Each entry also holds the ID of the entry before it ("p"), kept
  in `chat:<room>:head`. A reader whose last entry is not the new entry's
  "p" has a gap: the entries it missed were trimmed away (the stream keeps
  at least KEEP entries, MAXLEN ~), and it closes its members' connections;
  or Redis lost them (restarted without persistence), and it logs that.
- Names. A name is held under every key `room.name_keys` gives,
  `chat:<room>:name:<key>`, each holding its owner ("<server id>:<connection
  id>") with a lease, renewed every third of it (CLAIM, all keys or none).
  APPEND checks, in the same step as it stores, that every sender still
  owns its name's keys (fencing): a server whose leases ran out while it was
  paused or cut off cannot send on a name another server gave away since;
  that sender is told `ERROR Username already in use.` and has no name.
- Deadlines. Every request has one (--redis-timeout), checked on the
  reactor's timers; a TIME heartbeat runs every half of it and the reader
  blocks for half of it, so a hung, paused or partitioned Redis is an
  outage within about 1.5 x the timeout. Scripts that change something
  carry their deadline in Redis's clock (its offset from ours measured by
  the heartbeat, never overestimated), so a request that timed out here but
  reaches Redis later (a paused Redis reading its backlog) is refused there.
- Outages. On any failure both sockets are closed, every request waiting
  for an answer is answered `ERROR Service unavailable.` (a SEND, a
  USERNAME) or dropped, and reconnecting starts: at once after Redis closed
  a working link, else after a capped back-off with jitter. One log line
  when it starts, one when it ends. Once back, every local name is claimed
  again; a name another server took meanwhile is lost, and its user told.
- Start. `room_factory` asks Redis, blocking and bounded, everything the
  room will need (AUTH, SELECT, the scripts, the keys): a Redis that answers
  but refuses is a ConfigurationError, and the server does not start; one
  that does not answer is an outage like any other.

Two sockets, because a connection blocked in XREAD answers nothing else.
Both are non-blocking and sit in the server's selector; nothing here blocks
after the start.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import random
import socket
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import partial
from selectors import EVENT_READ, EVENT_WRITE
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import hiredis

import protocol
from host import Host, Member, Timer
from metrics import Metric, counter, gauge
from protocol import SetName
from room import FORMS, ConfigurationError, LocalRoom, Room, name_keys

log = logging.getLogger("chat")

# Reconnecting: the first retry after about this long (at once after Redis
# closed a working link), then twice as long each time, up to the cap; each
# wait is drawn between half of it and all of it, so that servers that lost
# Redis together do not come back in step.
BACKOFF_FIRST: Final = 0.05
BACKOFF_MAX: Final = 2.0
# PROTOCOL.md: every request to Redis has a deadline (--redis-timeout).
DEFAULT_TIMEOUT: Final = 2.0
# A script's deadline in Redis's clock comes this share of the timeout
# before ours, so that an answer sent just in time still arrives in time.
DEADLINE_MARGIN: Final = 0.25
# PROTOCOL.md: Redis keeps at least the last 100,000 messages; an entry is a
# turn of one server, one message or more.
KEEP: Final = 100_000
# Entries per XREAD. An entry is at most about chat.BATCH_BYTES, so a reply
# stays within some 16 MiB, the parser's memory.
READ_COUNT: Final = 64
# Entries relayed into one turn's batch, in bytes, as chat.BATCH_BYTES: a
# reader catching up delivers in turns of the usual size.
RELAY_BYTES: Final = 256 * 1024
# Bytes read from one Redis socket per loop turn at most. The reader carries
# every message of the room, so it gets a larger share of a turn.
READER_BUDGET: Final = 1 << 20
COMMAND_BUDGET: Final = 256 * 1024
RECV_SIZE: Final = 256 * 1024
# Commands Redis has not taken yet, above which the link counts as broken:
# memory stays bounded when Redis stops reading, and SENDs are refused
# rather than piled up.
MAX_UNSENT: Final = 16 << 20
# Error replies that mean "not now" rather than "never": at start they are
# an outage, not a configuration error.
_TRANSIENT: Final = (b"LOADING", b"BUSY", b"MASTERDOWN", b"TRYAGAIN", b"CLUSTERDOWN")

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
# An ID after every entry: XREAD from it answers at once, with nothing.
_LAST_POSSIBLE_ID: Final = b"18446744073709551615-18446744073709551615"
_FIRST_ID: Final = b"0-0"


FORM_TAGS: Final = tuple(form.encode() for form in FORMS)


class _Lost:
    """What a waiting request's callback gets when the connection is lost."""


LOST: Final = _Lost()
_INCOMPLETE: Final = object()  # hiredis.Reader.gets(): no complete reply yet

Callback = Callable[[Any], None]


def encode_command(*args: bytes) -> bytes:
    """A command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class RedisAddress:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """`redis://[[user]:password@]host[:port][/db]`; ConfigurationError if not."""
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ConfigurationError(f"invalid --redis URL {url!r}: must start with redis://")
    if parts.query or parts.fragment:
        raise ConfigurationError(f"invalid --redis URL {url!r}: no query or fragment allowed")
    try:
        port = parts.port or 6379
    except ValueError:  # urllib's words: "Port out of range 0-65535"
        raise ConfigurationError(
            f"invalid --redis URL {url!r}: the port must be a number from 1 to 65535"
        ) from None
    path = parts.path.lstrip("/")
    if path and not path.isdigit():
        raise ConfigurationError(
            f"invalid --redis URL {url!r}: the database must be a number, not {path!r}"
        )
    return RedisAddress(
        host=parts.hostname or "127.0.0.1",
        port=port,
        db=int(path) if path else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def room_factory(
    url: str, *, room: str, lease_ms: int, timeout: float = DEFAULT_TIMEOUT
) -> Callable[[Host], Room]:
    """What the reactor calls to build the room of cluster mode. The URL is
    parsed, its host resolved and Redis asked whether it accepts the
    configuration (blocking, once, each step within `timeout`), here: a bad
    one is a ConfigurationError before any port is bound."""
    redis = parse_redis_url(url)
    try:
        family, _, _, _, address = socket.getaddrinfo(
            redis.host, redis.port, type=socket.SOCK_STREAM
        )[0]
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigurationError(
            f"cannot resolve the Redis host {redis.host!r}: {reason}"
        ) from None
    check_configuration(redis, family, address, room=room, timeout=timeout)

    def build(host: Host) -> Room:
        return RedisRoom(
            host, redis, family, address, room=room, lease_ms=lease_ms, timeout=timeout
        )

    return build


def _hello(redis: RedisAddress) -> list[tuple[bytes, ...]]:
    """What every connection says first: AUTH and SELECT, as the URL asks."""
    hello: list[tuple[bytes, ...]] = []
    if redis.password is not None:
        user = (redis.username.encode(),) if redis.username else ()
        hello.append((b"AUTH", *user, redis.password.encode()))
    if redis.db:
        hello.append((b"SELECT", b"%d" % redis.db))
    return hello


def check_configuration(
    redis: RedisAddress, family: int, address: Any, *, room: str, timeout: float
) -> None:
    """Ask Redis for everything the room will use (AUTH, SELECT, loading and
    running the scripts, reading the stream and its head) and raise
    ConfigurationError if it refuses any, or does not speak Redis's protocol.
    A Redis that cannot be reached, or answers "not now" (LOADING), is an
    outage, which the room logs and rides out: return."""
    stream, head = (f"chat:{room}:messages".encode(), f"chat:{room}:head".encode())
    commands = _hello(redis)
    commands += [(b"SCRIPT", b"LOAD", script) for script in SCRIPTS]
    commands += [
        (b"EVALSHA", CLAIM_SHA, b"0", b"check", b"1", b"0"),  # no keys: changes nothing
        (b"XREAD", b"COUNT", b"1", b"STREAMS", stream, _LAST_POSSIBLE_ID),
        (b"GET", head),
        (b"TIME",),
    ]
    replies: list[Any] = []
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(address)
            sock.sendall(b"".join(encode_command(*command) for command in commands))
            reader = hiredis.Reader(notEnoughData=_INCOMPLETE)
            while len(replies) < len(commands):
                reply = reader.gets()
                if reply is not _INCOMPLETE:
                    replies.append(reply)
                    continue
                data = sock.recv(RECV_SIZE)
                if not data:
                    raise ConnectionError("Redis closed the connection")
                reader.feed(data)
    except OSError:
        return  # unreachable: the room says so, and keeps trying
    except hiredis.ProtocolError:
        raise ConfigurationError(
            f"{redis} does not answer like a Redis server (check --redis)"
        ) from None
    for command, reply in zip(commands, replies, strict=True):
        if isinstance(reply, hiredis.ReplyError):
            text = str(reply)
            if text.encode().startswith(_TRANSIENT):
                return
            what = b" ".join(command[:2] if command[0] == b"SCRIPT" else command[:1]).decode()
            raise ConfigurationError(f"Redis at {redis} refused {what}: {text}")


def _describe(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


def _id_key(entry_id: bytes) -> tuple[int, int]:
    """A stream entry's ID ("<ms>-<seq>"), to compare IDs in order."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or b"0")


class _Link:
    """One non-blocking connection to Redis: the socket, a reply parser, the
    output not sent yet, and the requests waiting for an answer, in order,
    each with its deadline; one timer watches the oldest. Watched for writing
    while connecting and while output is left, like a client connection."""

    __slots__ = (
        "sock",
        "reader",
        "out",
        "connected",
        "wants_write",
        "waiting",
        "closed",
        "_host",
        "_handler",
        "_budget",
        "_fail",
        "_deadline",
    )

    def __init__(
        self,
        family: int,
        address: Any,
        host: Host,
        *,
        budget: int,
        fail: Callable[[str, bool], None],
    ) -> None:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            error = sock.connect_ex(address)
            if error not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                raise OSError(error, os.strerror(error))
            host.watch(sock, EVENT_READ | EVENT_WRITE, self.on_event)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.reader = hiredis.Reader(notEnoughData=_INCOMPLETE)
        self.out = bytearray()
        self.connected = False
        self.wants_write = True
        self.waiting: deque[tuple[float, Callback | None]] = deque()
        self.closed = False
        self._host = host
        self._budget = budget
        self._fail = fail
        self._deadline: Timer | None = None

    def request(self, callback: Callback | None, command: bytes, timeout: float) -> None:
        """Queue an encoded command; `callback` gets its reply, or LOST.
        Unanswered after `timeout` seconds, the link fails."""
        self.out += command
        self.waiting.append((self._host.now() + timeout, callback))
        if self._deadline is None:
            self._deadline = self._host.call_at(self.waiting[0][0], self._check_deadline)

    def _check_deadline(self) -> None:
        self._deadline = None
        if self.connected and self.waiting and self.waiting[0][0] <= self._host.now():
            # Read what has arrived first: after a pause of this process
            # (SIGSTOP), select may report nothing although the answer is
            # there (CPython's epoll, interrupted past its timeout, returns
            # no events), and timers then run before the sockets are read.
            self.on_event(EVENT_READ)
        if self.closed or not self.waiting or self._deadline is not None:
            return
        due = self.waiting[0][0]
        if due <= self._host.now():
            self._fail("no answer within the deadline (--redis-timeout)", False)
        else:
            self._deadline = self._host.call_at(due, self._check_deadline)

    def send(self) -> None:
        """Send what the kernel takes of `out`; OSError if the link broke."""
        if self.out and self.connected:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            del self.out[:sent]
        wants_write = bool(self.out) or not self.connected
        if wants_write != self.wants_write:
            self.wants_write = wants_write
            events = EVENT_READ | EVENT_WRITE if wants_write else EVENT_READ
            self._host.watch(self.sock, events, self.on_event)

    def on_event(self, mask: int) -> None:
        """The socket is ready: connect, send, read, and answer the waiting
        requests in order."""
        if self.closed:
            return
        try:
            if not self.connected:
                error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, os.strerror(error))
                self.connected = True
            if mask & EVENT_WRITE:
                self.send()
            if mask & EVENT_READ:
                self._receive()
            waiting = self.waiting
            gets = self.reader.gets
            while (reply := gets()) is not _INCOMPLETE:
                callback = waiting.popleft()[1]
                if callback is not None:
                    callback(reply)
                    if self.closed:
                        return  # the callback lost the link
        except (ConnectionResetError, BrokenPipeError, EOFError) as error:
            # Redis closed a link that worked (a restart, CLIENT KILL).
            self._fail(str(error) or type(error).__name__, True)
        except (OSError, hiredis.ProtocolError, IndexError) as error:
            # IndexError: an answer to nothing we asked, so not Redis.
            self._fail(_describe(error) if isinstance(error, OSError) else repr(error), False)

    def _receive(self) -> None:
        """Feed the parser up to the link's budget; EOFError on end of stream."""
        budget = self._budget
        while budget > 0:
            try:
                data = self.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                raise EOFError("Redis closed the connection")
            self.reader.feed(data)
            if len(data) < RECV_SIZE:
                return
            budget -= len(data)

    def close(self) -> list[Callback]:
        """Close; the callbacks still waiting, to be told LOST."""
        self.closed = True
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._host.unwatch(self.sock)
        self.sock.close()
        waiting = [callback for _, callback in self.waiting if callback is not None]
        self.waiting.clear()
        return waiting


@dataclass(slots=True)
class _Turn:
    """One turn's accepted SENDs, as one entry: the RECEIVE lines, the id of
    each line's sender, and the senders (held until Redis answers)."""

    lines: list[bytes]
    ids: list[bytes]
    senders: dict[Member, bytes]

    def without(self, gone: Collection[bytes]) -> _Turn:
        kept = [(line, i) for line, i in zip(self.lines, self.ids, strict=True) if i not in gone]
        senders = {member: i for member, i in self.senders.items() if i not in gone}
        return _Turn([line for line, _ in kept], [i for _, i in kept], senders)


class RedisRoom:
    """A room shared through Redis (room.Room): names are leases in Redis,
    messages an entry per turn in its stream. The names of this server's own
    members are kept, as in one server, in the LocalRoom it wraps."""

    def __init__(
        self,
        host: Host,
        redis: RedisAddress,
        family: int,
        address: Any,
        *,
        room: str,
        lease_ms: int,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._host = host
        self._local = LocalRoom(host)
        self.batch = self._local.batch
        self.publish: Callable[[Member, bytes], None] = self._publish
        self._published = 0  # bytes published this turn
        self._redis = redis
        self._family = family
        self._address = address
        self._timeout = timeout
        self._stream = f"chat:{room}:messages".encode()
        self._head = f"chat:{room}:head".encode()
        self._key_prefix = f"chat:{room}:name:".encode()
        self._lease = b"%d" % lease_ms
        self._renew_every = lease_ms / 3000
        self._keep = b"%d" % KEEP
        block_ms = max(1, round(timeout * 500))
        self._xread_head = (b"XREAD", b"COUNT", b"%d" % READ_COUNT, b"BLOCK", b"%d" % block_ms)
        self._xread_timeout = block_ms / 1000 + timeout
        # This process in owners and payloads: random, so a restarted server
        # never passes for its former self.
        self._server_tag = os.urandom(8).hex().encode() + b":"
        # Connections of this server as Redis knows them: an id each, in
        # lease owners ("<server>:<id>") and in entries.
        self._next_id = 0
        self._id: dict[Member, bytes] = {}  # b"<id>", decimal
        self._by_id: dict[bytes, Member] = {}
        # This turn's accepted SENDs, stored together by `end_turn`: the
        # lines, each line's sender id, and the senders (each held).
        self._lines: list[bytes] = []
        self._line_ids: list[bytes] = []
        self._senders: dict[Member, bytes] = {}

        # Reading: the ID of the last entry read (None before the first
        # connection: then the stream's head), and the entries read but not
        # delivered yet (the next XREAD waits for them).
        self._last_id: bytes | None = None
        self._entries: deque[Any] = deque()
        self._relay_timer: Timer | None = None
        # Entries this server stored and has not read back yet, and how many
        # messages each: what Redis lost of them, if it loses its data.
        self._own: dict[bytes, int] = {}
        # Redis's clock minus ours (ms), from the last heartbeats: each an
        # underestimate (Redis read its clock before we got the answer).
        self._offsets: deque[float] = deque(maxlen=8)

        self.available = False  # both links up: USERNAME and SEND work
        self._cmd: _Link | None = None
        self._reader: _Link | None = None
        self._cmd_ready = False
        self._reader_ready = False
        self._down_since: float | None = None  # logged once per outage
        self._backoff = BACKOFF_FIRST
        # At most one of each is pending: reconnect, renew, heartbeat.
        self._retry: Timer | None = None
        self._renewal: Timer | None = None
        self._heartbeat: Timer | None = None
        self._was_up = False  # an outage is the loss of a link that was up
        self._outages = 0
        log.info("cluster mode: room %r on Redis at %s", room, redis)
        self._connect()

    # --- room.Room -------------------------------------------------------------

    @property
    def members(self) -> Collection[Member]:
        return self._local.members

    def turn_size(self) -> int:
        # Published bytes count against the turn's budget as batched ones
        # do in one server: a turn stops processing once it has produced
        # chat.BATCH_BYTES.
        return self.batch.size + self._published

    def _publish(self, member: Member, line: bytes) -> None:
        """An accepted SEND's RECEIVE line: to Redis at the end of the turn,
        and back to every server. The sender waits for Redis's answer."""
        if not self.available:
            self._host.reply(member, protocol.SERVICE_UNAVAILABLE)
            return
        conn_id = self._senders.get(member)
        if conn_id is None:
            conn_id = self._senders[member] = self._id_of(member)
            self._host.hold(member)
        self._lines.append(line)
        self._line_ids.append(conn_id)
        self._published += len(line)

    def set_name(self, member: Member, command: SetName) -> None:
        host = self._host
        if not self.available:
            host.reply(member, protocol.SERVICE_UNAVAILABLE)
            return
        keys = name_keys(command)
        if self._local.holder(keys, member) is not None:
            host.reply(member, protocol.NAME_TAKEN)
            return
        if keys == member.keys:
            # Its own name in another spelling: it holds every key already.
            self._local.take(member, command.name, keys)
            return
        # Another server may hold it: ask Redis, and hold this member's
        # later lines until it answers.
        host.hold(member)
        owner = self._owner_of(member)
        redis_keys = self._redis_keys(keys)

        def claimed(reply: Any) -> None:
            if reply == 1:
                if member.closed:  # meanwhile
                    self._release(redis_keys, owner)
                else:
                    dropped = [
                        key for key in self._redis_keys(member.keys) if key not in redis_keys
                    ]
                    if dropped:
                        self._release(dropped, owner)
                    self._local.take(member, command.name, keys)
            elif reply == 0:
                host.reply(member, protocol.NAME_TAKEN)
            else:  # LOST, too late (-1), or an error reply
                if isinstance(reply, hiredis.ReplyError):
                    log.error("Redis refused to claim a name: %s", reply)
                host.reply(member, protocol.SERVICE_UNAVAILABLE)
            host.resume(member)

        self._claim(claimed, redis_keys, owner)

    def leave(self, member: Member) -> None:
        """`member` is closing: free its name in Redis (if Redis is there; if
        not, the lease runs out)."""
        conn_id = self._id.pop(member, None)
        if conn_id is None:
            return
        del self._by_id[conn_id]
        if member.name is not None:
            self._release(self._redis_keys(member.keys), self._server_tag + conn_id)
        self._local.leave(member)

    def end_turn(self) -> None:
        """Send what the turn queued for Redis, in one go."""
        self._published = 0
        if self._lines:
            self._store_turn()
        for link in (self._cmd, self._reader):
            if link is not None and link.out:
                try:
                    link.send()
                except OSError as error:
                    self._fail(_describe(error), True)
                    return
                if len(link.out) > MAX_UNSENT:
                    self._fail(f"Redis is not reading: {len(link.out)} bytes unsent", False)
                    return

    def metrics(self) -> list[Metric]:
        return [
            gauge("chat_redis_up", "1 while Redis answers, else 0.", int(self.available)),
            counter("chat_redis_outages_total", "Times Redis became unreachable.", self._outages),
        ]

    def close(self) -> None:
        """Server shutdown: one last try to send (the closed connections'
        releases), then close."""
        for timer in (self._retry, self._renewal, self._heartbeat, self._relay_timer):
            if timer is not None:
                timer.cancel()
        for link in (self._cmd, self._reader):
            if link is not None:
                with contextlib.suppress(OSError):
                    link.send()
                link.close()
        self._cmd = self._reader = None
        self.available = False

    # --- storing messages ------------------------------------------------------

    def _store_turn(self) -> None:
        turn = _Turn(self._lines, self._line_ids, self._senders)
        self._lines = []
        self._line_ids = []
        self._senders = {}
        # A sender closed since it published has nobody to tell and no name
        # to send on; one without a name any more is told so.
        gone = [(m, i) for m, i in turn.senders.items() if m.closed or m.name is None]
        if gone:
            for member, conn_id in gone:
                self._answer(member, turn.ids.count(conn_id), protocol.NAME_REQUIRED)
            turn = turn.without({conn_id for _, conn_id in gone})
            if not turn.lines:
                return
        self._send_turn(turn)

    def _send_turn(self, turn: _Turn) -> None:
        cmd = self._cmd
        if cmd is None:
            self._refuse(turn, protocol.SERVICE_UNAVAILABLE)
            return
        keys: list[bytes] = []
        owners: list[bytes] = []
        for member, conn_id in turn.senders.items():
            keys += self._redis_keys(member.keys)
            owners += (self._server_tag + conn_id, b"%d" % len(member.keys))
        entry = b"".join((self._server_tag, b",".join(turn.ids), b"\n", *turn.lines))
        command = encode_command(
            b"EVALSHA",
            APPEND_SHA,
            b"%d" % (2 + len(keys)),
            self._stream,
            self._head,
            *keys,
            self._redis_deadline(),
            self._lease,
            self._keep,
            entry,
            *owners,
        )
        cmd.request(partial(self._stored, turn), command, self._timeout)

    def _stored(self, turn: _Turn, reply: Any) -> None:
        """Redis's answer to a turn's APPEND."""
        if type(reply) is bytes:  # the entry's ID: accepted
            if self._last_id is None or _id_key(reply) > _id_key(self._last_id):
                self._own[reply] = len(turn.lines)
            for member in turn.senders:
                self._host.resume(member)
        elif type(reply) is list:  # these senders (from 1) lost their names
            senders = list(turn.senders.items())
            lost = [senders[index - 1] for index in reply]
            for member, conn_id in lost:
                self._lose_name(member, turn.ids.count(conn_id))
            rest = turn.without({conn_id for _, conn_id in lost})
            if rest.lines:
                self._send_turn(rest)  # the others, still held, in one entry
        else:  # LOST, too late (-1), or an error reply
            if isinstance(reply, hiredis.ReplyError):
                log.error("Redis refused to store messages: %s", reply)
            self._refuse(turn, protocol.SERVICE_UNAVAILABLE)
            if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
                self._fail("the scripts are gone (SCRIPT FLUSH?): loading them again", True)

    def _refuse(self, turn: _Turn, line: bytes) -> None:
        """Answer each of the turn's SENDs `line`, in its place."""
        for member, conn_id in turn.senders.items():
            self._answer(member, turn.ids.count(conn_id), line)

    def _answer(self, member: Member, count: int, line: bytes) -> None:
        host = self._host
        for _ in range(count):
            host.reply(member, line)
        host.resume(member)

    def _lose_name(self, member: Member, messages: int) -> None:
        """Redis says another connection holds `member`'s name now: its first
        SEND is answered that, the rest as from a connection without a name."""
        if member.name is not None and not member.closed:
            log.info("%r lost the name %r: another server holds it now", member, member.name)
            self._local.drop_name(member)
            self._host.reply(member, protocol.NAME_TAKEN)
            messages -= 1
        self._answer(member, messages, protocol.NAME_REQUIRED)

    def _redis_deadline(self) -> bytes:
        """A request's deadline in Redis's clock (ms), a margin before ours;
        b"0" (none) before the first heartbeat."""
        if not self._offsets:
            return b"0"
        local = self._host.now() + self._timeout * (1 - DEADLINE_MARGIN)
        return b"%d" % (local * 1000 + max(self._offsets))

    # --- names ------------------------------------------------------------------

    def _id_of(self, member: Member) -> bytes:
        conn_id = self._id.get(member)
        if conn_id is None:
            self._next_id += 1
            conn_id = b"%d" % self._next_id
            self._id[member] = conn_id
            self._by_id[conn_id] = member
        return conn_id

    def _owner_of(self, member: Member) -> bytes:
        return self._server_tag + self._id_of(member)

    def _redis_keys(self, keys: tuple[str, ...]) -> list[bytes]:
        """A name's keys in Redis, `chat:<room>:name:<form>:<key>`, one per
        room.FORMS (none for a connection without a name)."""
        prefix = self._key_prefix
        return [
            b"%s%s:%s" % (prefix, form, key.encode())
            for form, key in zip(FORM_TAGS, keys, strict=False)
        ]

    def _claim(self, callback: Callback, redis_keys: list[bytes], owner: bytes) -> None:
        cmd = self._cmd
        if cmd is None:
            callback(LOST)
            return
        count = b"%d" % len(redis_keys)
        deadline = self._redis_deadline()
        command = encode_command(
            b"EVALSHA", CLAIM_SHA, count, *redis_keys, owner, self._lease, deadline
        )
        cmd.request(callback, command, self._timeout)

    def _release(self, redis_keys: list[bytes], owner: bytes) -> None:
        cmd = self._cmd
        if cmd is not None and self.available:
            count = b"%d" % len(redis_keys)
            command = encode_command(b"EVALSHA", RELEASE_SHA, count, *redis_keys, owner)
            cmd.request(None, command, self._timeout)

    def _renew_all(self) -> None:
        """Renew (or, after an outage, take again) every local name; a name
        another server holds now is lost. Due again in a third of the lease."""
        self._renewal = self._host.call_at(self._host.now() + self._renew_every, self._renew_all)
        for member in list(self._local.members):
            self._renew(member)

    def _renew(self, member: Member) -> None:
        keys = member.keys

        def renewed(reply: Any) -> None:
            if reply == 0 and member.keys == keys and not member.closed:
                log.info("%r lost the name %r: another server holds it now", member, member.name)
                self._local.drop_name(member)
                self._host.reply(member, protocol.NAME_TAKEN)
            elif isinstance(reply, hiredis.ReplyError):
                log.error("Redis refused to renew a name: %s", reply)

        self._claim(renewed, self._redis_keys(keys), self._owner_of(member))

    # --- reading the stream ------------------------------------------------------

    def _read_more(self) -> None:
        """Ask for the entries after the last one read (Redis answers at
        once if there are some, else within half the timeout, with none)."""
        reader = self._reader
        if reader is None or self._entries or self._last_id is None:
            return
        command = encode_command(*self._xread_head, b"STREAMS", self._stream, self._last_id)
        reader.request(self._read, command, self._xread_timeout)

    def _read(self, reply: Any) -> None:
        if reply is LOST:
            return
        if reply is None:  # nothing new within BLOCK
            self._read_more()
        elif isinstance(reply, hiredis.ReplyError):
            self._fail(f"XREAD refused: {reply}", False)
        else:
            self._entries.extend(reply[0][1])
            self._relay_entries(RELAY_BYTES)

    def _relay_entries(self, limit: int) -> None:
        """Deliver read entries into this turn's batch, until it holds
        `limit` bytes; the rest in the next turns, then read on."""
        self._relay_timer = None
        entries = self._entries
        batch = self.batch
        relay = self._relay
        while entries and batch.size < limit:
            entry_id, fields = entries.popleft()
            if len(fields) != 4 or fields[0] != b"p" or fields[2] != b"m":
                log.debug("ignored a malformed entry %r", entry_id)
            else:
                if fields[1] != self._last_id:
                    self._gap(fields[1])
                relay(fields[3], entry_id)
            self._last_id = entry_id
        if entries:
            host = self._host
            self._relay_timer = host.call_at(host.now(), partial(self._relay_entries, RELAY_BYTES))
        else:
            self._read_more()

    def _gap(self, previous: bytes) -> None:
        """The entry after the last one read says another came before it."""
        last = self._last_id or _FIRST_ID
        if _id_key(previous) > _id_key(last):
            self._fell_behind(last)
        else:
            self._history_lost(previous)

    def _fell_behind(self, last: bytes) -> None:
        """The entries after `last` were trimmed away before this server read
        them: its members would miss them, so they are closed instead."""
        members = list(self._local.members)
        self._own.clear()  # trimmed too, if not read yet: never read back
        log.error(
            "this server fell behind the room: the messages after %s are no longer in "
            "Redis (it keeps the last %d turns); closing its %d members' connections",
            (last or _FIRST_ID).decode(),
            KEEP,
            len(members),
        )
        for member in members:
            conn_id = self._id.get(member)
            if conn_id is not None:
                self._release(self._redis_keys(member.keys), self._server_tag + conn_id)
            self._local.drop_name(member)
            self._host.disconnect(member, "this server fell behind the room's history in Redis")

    def _history_lost(self, kept: bytes) -> None:
        """Redis has nothing after `kept` (b"0-0": nothing at all) of what it
        had stored: restarted without persistence, or flushed."""
        mine = sum(self._own.values())
        self._own.clear()
        log.error(
            "Redis lost the room's messages after %s (restarted without persistence?); "
            "this server had read up to %s: whatever was stored after that and not read "
            "yet is lost for every server, %d messages accepted by this server among them",
            kept.decode(),
            (self._last_id or _FIRST_ID).decode(),
            mine,
        )

    def _relay(self, payload: bytes, entry_id: bytes) -> None:
        """One stored turn, "<server>:<id>,<id>,...\\n" and a RECEIVE line
        per id: into this turn's batch, for every member but its senders."""
        newline = payload.find(b"\n")
        body = payload[newline + 1 :]
        # The stream is the cluster's own; still, only whole RECEIVE lines
        # may ever reach a client.
        if newline < 0 or not body.startswith(b"RECEIVE ") or not body.endswith(b"\n"):
            log.debug("ignored a malformed entry %r", entry_id)
            return
        tag = self._server_tag
        batch = self.batch
        if not payload.startswith(tag):
            batch.add_foreign(body)  # from another server: one piece
            return
        self._own.pop(entry_id, None)
        ids = payload[len(tag) : newline].split(b",")
        lines = body.split(b"\n")
        lines.pop()  # the empty rest after the last "\n"
        if len(ids) != len(lines):
            log.debug("ignored a malformed entry %r", entry_id)
            return
        by_id = self._by_id
        for conn_id, line in zip(ids, lines, strict=True):
            sender = by_id.get(conn_id)
            if sender is None:  # gone meanwhile
                batch.add_foreign(line + b"\n")
            else:
                batch.publish(sender, line + b"\n")

    # --- the links ---------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        host = self._host
        try:
            self._cmd = _Link(
                self._family, self._address, host, budget=COMMAND_BUDGET, fail=self._fail
            )
            self._reader = _Link(
                self._family, self._address, host, budget=READER_BUDGET, fail=self._fail
            )
        except OSError as error:
            self._fail(_describe(error), False)
            return
        timeout = self._timeout
        for link in (self._cmd, self._reader):
            for command in _hello(self._redis):
                link.request(self._expect_ok(command[0]), encode_command(*command), timeout)
        cmd, reader = self._cmd, self._reader
        for script in SCRIPTS:
            cmd.request(
                self._expect_ok(b"SCRIPT LOAD"), encode_command(b"SCRIPT", b"LOAD", script), timeout
            )
        cmd.request(self._timed, encode_command(b"TIME"), timeout)
        cmd.request(self._got_head, encode_command(b"GET", self._head), timeout)

        def reader_ready(reply: Any) -> None:
            if isinstance(reply, hiredis.ReplyError):  # LOADING, after a restart
                self._fail(f"PING refused: {reply}", False)
            elif reply is not LOST:
                self._reader_ready = True
                self._up()

        reader.request(reader_ready, encode_command(b"PING"), timeout)

    def _expect_ok(self, what: bytes) -> Callback:
        def check(reply: Any) -> None:
            if isinstance(reply, hiredis.ReplyError):
                self._fail(f"{what.decode()} refused: {reply}", False)

        return check

    def _got_head(self, head: Any) -> None:
        """The stream's last ID, at (re)connection: where a first reader
        starts, and whether Redis lost what this server read before."""
        if head is LOST:
            return
        if head is not None and type(head) is not bytes:
            self._fail(f"GET {self._head.decode()} answered {head!r}", False)
            return
        head = head or _FIRST_ID
        if self._last_id is None:
            self._last_id = head
        elif self._last_id != head and _id_key(head) < _id_key(self._last_id):
            self._history_lost(head)
            self._last_id = head  # read on from what Redis has
        self._cmd_ready = True
        self._up()

    def _timed(self, reply: Any) -> None:
        """A TIME answer: Redis's clock minus ours, an underestimate."""
        if type(reply) is list and len(reply) == 2:
            redis_ms = int(reply[0]) * 1000 + int(reply[1]) / 1000
            self._offsets.append(redis_ms - self._host.now() * 1000)

    def _beat(self) -> None:
        """The heartbeat: a cheap request every half of the timeout, so that
        a Redis that stops answering is noticed while all is quiet too."""
        host = self._host
        self._heartbeat = host.call_at(host.now() + self._timeout / 2, self._beat)
        if self._cmd is not None:
            self._cmd.request(self._timed, encode_command(b"TIME"), self._timeout)

    def _up(self) -> None:
        if not (self._cmd_ready and self._reader_ready) or self.available:
            return
        self.available = True
        self._was_up = True
        self._backoff = BACKOFF_FIRST
        if self._down_since is None:
            log.info("connected to Redis at %s", self._redis)
        else:
            log.warning(
                "Redis at %s is back after %.1f s; claiming this server's names again "
                "and delivering what it missed",
                self._redis,
                self._host.now() - self._down_since,
            )
            self._down_since = None
        self._read_more()
        self._renew_all()
        self._beat()

    def _fail(self, reason: str, closed_by_redis: bool) -> None:
        """Lose the link: close both sockets, answer what waited, retry at
        once if Redis closed a link that worked, else after the back-off."""
        was_available = self.available
        waiting: list[Callback] = []
        for link in (self._cmd, self._reader):
            if link is not None:
                waiting += link.close()
        self._cmd = self._reader = None
        self.available = self._cmd_ready = self._reader_ready = False
        for timer in (self._renewal, self._heartbeat):
            if timer is not None:
                timer.cancel()
        self._renewal = self._heartbeat = None
        self._offsets.clear()
        # Entries read stay to be delivered; the next XREAD starts after them.
        if self._relay_timer is not None:
            self._relay_timer.cancel()
        if self._entries:
            self._relay_entries(1 << 62)
        now = self._host.now()
        if self._down_since is None:
            self._down_since = now
            if self._was_up:
                self._outages += 1
            log.error(
                "cannot reach Redis at %s (%s): USERNAME and SEND get "
                "'ERROR Service unavailable.' until it is back; reconnecting",
                self._redis,
                reason,
            )
        else:
            log.debug("reconnecting to Redis failed: %s", reason)
        if self._retry is None:
            if closed_by_redis and was_available:
                delay = 0.0
            else:
                delay = random.uniform(self._backoff / 2, self._backoff)
                self._backoff = min(2 * self._backoff, BACKOFF_MAX)
            self._retry = self._host.call_at(now + delay, self._connect)
        # This turn's SENDs, not sent yet, and every request that waited.
        if self._lines:
            turn = _Turn(self._lines, self._line_ids, self._senders)
            self._lines = []
            self._line_ids = []
            self._senders = {}
            self._refuse(turn, protocol.SERVICE_UNAVAILABLE)
        for callback in waiting:
            callback(LOST)
