"""Cluster mode: several chat.py processes serving one room through Redis.

chat.py imports this module only when it is started with --redis; it needs
the `hiredis` package (requirements-cluster.txt), whose `Reader` parses
Redis's replies without doing any I/O. Commands are encoded here.

The contract is PROTOCOL.md, "Cluster mode". How it is kept:

- Messages. The SENDs a server accepts in one loop turn are PUBLISHed to
  the room's channel together, in one message, at the end of the turn, and
  not delivered at once. Every server, the sender's included, delivers what
  comes back through its subscription, so every server delivers in Redis's
  order. A message is "<server id>:<id>,<id>,...\n" then the RECEIVE lines,
  one connection id per line: the origin server splits it to leave each
  sender out; every other server hands the lines on as one piece, without
  looking at each, which keeps the work every server does for every
  message small.
- Names. A name is a key, `chat:<room>:name:<name_key>`, holding its owner
  ("<server id>:<connection id>") with a lease: `SET key owner NX PX lease`.
  The holder renews its leases every third of the lease, in one pipeline;
  release and renewal compare the owner first (small Lua scripts), so a
  server never frees or extends a name another server holds. While a
  connection's USERNAME waits for Redis, its later lines wait too.
- Outages. On any error the two sockets are closed, every command waiting
  for an answer is answered `ERROR Service unavailable.` (a USERNAME) or
  dropped, and reconnecting starts with a capped back-off. One log line
  when it starts, one when it ends. Once back, every local name is claimed
  again; a name another server took meanwhile is lost, and its user told.

Two sockets, because a subscribed Redis connection accepts no other
commands. Both are non-blocking and sit in the server's selector; nothing
here blocks, except resolving Redis's host name once, at start.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from selectors import EVENT_READ, EVENT_WRITE
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import hiredis

import protocol
from metrics import Metric, counter, gauge
from protocol import SetName
from room import ConfigurationError, Host, LocalRoom, Member, Room, Timer, name_keys

log = logging.getLogger("chat")

# Reconnecting: the first retry after this long, then twice as long each
# time, up to the cap, so a restarted Redis is found within a couple of
# seconds without a server hammering a dead one.
BACKOFF_FIRST: Final = 0.05
BACKOFF_MAX: Final = 2.0
# Connecting (TCP, AUTH, SELECT, SUBSCRIBE) must be done within this long.
CONNECT_TIMEOUT: Final = 5.0
# Bytes read from one Redis socket per loop turn at most. The subscription
# carries every message of the room, and Redis closes a subscriber that falls
# 32 MiB behind (client-output-buffer-limit pubsub), so it gets a larger
# share of a turn than one client does.
SUBSCRIPTION_BUDGET: Final = 1 << 20
COMMAND_BUDGET: Final = 256 * 1024
RECV_SIZE: Final = 256 * 1024
# Commands Redis has not taken yet, above which the link counts as broken:
# memory stays bounded when Redis stops reading, and SENDs are refused
# rather than piled up.
MAX_UNSENT: Final = 16 << 20

# Take every key of a name, or renew them, all or none: 1 if this owner
# holds them all now, 0 (and nothing changed) if another owner holds one.
CLAIM: Final = b"""\
for _, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  if holder and holder ~= ARGV[1] then return 0 end
end
for _, key in ipairs(KEYS) do redis.call('SET', key, ARGV[1], 'PX', ARGV[2]) end
return 1"""
# Delete the keys this owner still holds.
RELEASE: Final = b"""\
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 0"""


class _Lost:
    """What a waiting command's callback gets when the connection is lost."""


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


def room_factory(url: str, *, room: str, lease_ms: int) -> Callable[[Host], Room]:
    """What the reactor calls to build the room of cluster mode. The URL is
    parsed, and its host resolved (blocking, once), here: a bad one is a
    ConfigurationError before any port is bound."""
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

    def build(host: Host) -> Room:
        return RedisRoom(host, redis, family, address, room=room, lease_ms=lease_ms)

    return build


def _describe(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


class _RedisSocket:
    """One non-blocking connection to Redis: the socket, a reply parser and
    the output not sent yet. Watched for writing while connecting and while
    output is left, like a client connection."""

    __slots__ = ("sock", "reader", "out", "connected", "wants_write", "_host", "_handler")

    def __init__(
        self,
        family: int,
        address: Any,
        host: Host,
        handler: Callable[[int], None],
    ) -> None:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            error = sock.connect_ex(address)
            if error not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                raise OSError(error, os.strerror(error))
            host.watch(sock, EVENT_READ | EVENT_WRITE, handler)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.reader = hiredis.Reader(notEnoughData=_INCOMPLETE)
        self.out = bytearray()
        self.connected = False
        self.wants_write = True
        self._host = host
        self._handler = handler

    def finish_connect(self) -> None:
        """After the first event: connected, or OSError."""
        error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
        self.connected = True

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
            self._host.watch(self.sock, events, self._handler)

    def receive(self, budget: int) -> None:
        """Feed the parser up to `budget` bytes; OSError on end of stream."""
        while budget > 0:
            try:
                data = self.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                raise ConnectionError("Redis closed the connection")
            self.reader.feed(data)
            if len(data) < RECV_SIZE:
                return
            budget -= len(data)

    def close(self) -> None:
        self._host.unwatch(self.sock)
        self.sock.close()


class RedisRoom:
    """A room shared through Redis (room.Room): names are leases in Redis,
    messages go through its pub/sub channel. The names of this server's own
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
    ) -> None:
        self._host = host
        self._local = LocalRoom(host)
        self.batch = self._local.batch
        self.publish: Callable[[Member, bytes], None] = self._publish
        self._published = 0  # bytes published this turn
        self._redis = redis
        self._family = family
        self._address = address
        self._channel = f"chat:{room}".encode()
        self._key_prefix = f"chat:{room}:name:".encode()
        self._lease = b"%d" % lease_ms
        self._renew_every = lease_ms / 3000
        # encode_command(b"PUBLISH", channel, payload) without its last
        # argument, made once: publishing is the hot path.
        self._publish_head = encode_command(b"PUBLISH", self._channel).replace(b"*2", b"*3", 1)
        # This process in owners and payloads: random, so a restarted server
        # never passes for its former self.
        self._server_tag = os.urandom(8).hex().encode() + b":"
        # Connections of this server as Redis knows them: an id each, in
        # lease owners ("<server>:<id>") and in published payloads.
        self._next_id = 0
        self._id: dict[Member, bytes] = {}  # b"<id>", decimal
        self._by_id: dict[bytes, Member] = {}
        # This turn's accepted SENDs, published together by `end_turn`.
        self._outgoing: list[bytes] = []
        self._outgoing_ids: list[bytes] = []

        self.available = False  # connected, subscribed: USERNAME and SEND work
        self._cmd: _RedisSocket | None = None
        self._sub: _RedisSocket | None = None
        self._cmd_ready = False
        self._sub_ready = False
        # One entry per command sent on `_cmd` and not answered yet, in order.
        self._waiting: deque[Callback | None] = deque()
        self._down_since: float | None = None  # logged once per outage
        self._backoff = BACKOFF_FIRST
        # At most one of each is pending: reconnect, give up connecting, renew.
        self._retry: Timer | None = None
        self._connect_deadline: Timer | None = None
        self._renewal: Timer | None = None
        self._renewal_answered = True
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
        and back to every server."""
        if not self.available:
            self._host.reply(member, protocol.SERVICE_UNAVAILABLE)
            return
        self._outgoing.append(line)
        self._outgoing_ids.append(self._id_of(member))
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
        if all(key in member.keys for key in keys):
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
                    dropped = [key for key in member.keys if key not in keys]
                    if dropped:
                        self._release(self._redis_keys(tuple(dropped)), owner)
                    self._local.take(member, command.name, keys)
            elif reply == 0:
                host.reply(member, protocol.NAME_TAKEN)
            else:  # LOST, or an error reply
                if reply is not LOST:
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
        if self._outgoing:
            self._publish_turn()
        for link in (self._cmd, self._sub):
            if link is not None and link.out:
                try:
                    link.send()
                except OSError as error:
                    self._fail(_describe(error))
                    return
                if len(link.out) > MAX_UNSENT:
                    self._fail(f"Redis is not reading: {len(link.out)} bytes unsent")
                    return

    def metrics(self) -> list[Metric]:
        return [
            gauge("chat_redis_up", "1 while Redis answers, else 0.", int(self.available)),
            counter("chat_redis_outages_total", "Times Redis became unreachable.", self._outages),
        ]

    def close(self) -> None:
        """Server shutdown: one last try to send (the closed connections'
        releases), then close."""
        for timer in (self._retry, self._connect_deadline, self._renewal):
            if timer is not None:
                timer.cancel()
        for link in (self._cmd, self._sub):
            if link is not None:
                with contextlib.suppress(OSError):
                    link.send()
                link.close()
        self._cmd = self._sub = None
        self.available = False

    # --- names and messages ------------------------------------------------------

    def _publish_turn(self) -> None:
        payload = b"".join(
            (self._server_tag, b",".join(self._outgoing_ids), b"\n", *self._outgoing)
        )
        self._outgoing = []
        self._outgoing_ids = []
        cmd = self._cmd
        if cmd is not None:
            cmd.out += b"%s$%d\r\n%s\r\n" % (self._publish_head, len(payload), payload)
            self._waiting.append(None)

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
        return [self._key_prefix + key.encode() for key in keys]

    def _claim(self, callback: Callback, redis_keys: list[bytes], owner: bytes) -> None:
        count = b"%d" % len(redis_keys)
        self._command(callback, b"EVAL", CLAIM, count, *redis_keys, owner, self._lease)

    def _release(self, redis_keys: list[bytes], owner: bytes) -> None:
        if self.available:
            count = b"%d" % len(redis_keys)
            self._command(None, b"EVAL", RELEASE, count, *redis_keys, owner)

    def _renew_all(self) -> None:
        """Renew (or, after an outage, take again) every local name, in one
        pipeline; a name another server holds now is lost. Due again in a
        third of the lease; Redis must have answered by then."""
        self._renewal = None
        if not self._renewal_answered:
            self._fail(f"no answer within {self._renew_every:g} s")
            return
        for member in list(self._local.members):
            self._renew(member)
        self._renewal_answered = False

        def answered(reply: Any) -> None:
            if reply is not LOST:
                self._renewal_answered = True

        self._command(answered, b"PING")
        self._renewal = self._host.call_at(self._host.now() + self._renew_every, self._renew_all)

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

    # --- the link ------------------------------------------------------------

    def _command(self, callback: Callback | None, *args: bytes) -> None:
        cmd = self._cmd
        if cmd is None:
            if callback is not None:
                callback(LOST)
            return
        cmd.out += encode_command(*args)
        self._waiting.append(callback)

    def _connect(self) -> None:
        self._retry = None
        try:
            self._cmd = _RedisSocket(self._family, self._address, self._host, self._on_cmd)
            self._sub = _RedisSocket(self._family, self._address, self._host, self._on_sub)
        except OSError as error:
            self._fail(_describe(error))
            return
        host = self._host
        self._connect_deadline = host.call_at(host.now() + CONNECT_TIMEOUT, self._connect_timed_out)
        redis = self._redis
        hello: list[tuple[bytes, ...]] = []
        if redis.password is not None:
            user = (redis.username.encode(),) if redis.username else ()
            hello.append((b"AUTH", *user, redis.password.encode()))
        for command in hello:
            self._sub.out += encode_command(*command)
        self._sub.out += encode_command(b"SUBSCRIBE", self._channel)
        if redis.db:
            hello.append((b"SELECT", b"%d" % redis.db))
        for command in hello:
            self._command(self._expect_ok(command[0]), *command)

        def ready(reply: Any) -> None:
            if reply is not LOST:
                self._cmd_ready = True
                self._up()

        self._command(ready, b"PING")

    def _connect_timed_out(self) -> None:
        self._connect_deadline = None
        self._fail(f"no answer within {CONNECT_TIMEOUT:g} s")

    def _expect_ok(self, what: bytes) -> Callback:
        def check(reply: Any) -> None:
            if isinstance(reply, hiredis.ReplyError):
                self._fail(f"{what.decode()} refused: {reply}")

        return check

    def _up(self) -> None:
        if not (self._cmd_ready and self._sub_ready) or self.available:
            return
        self.available = True
        self._was_up = True
        if self._connect_deadline is not None:
            self._connect_deadline.cancel()
            self._connect_deadline = None
        self._backoff = BACKOFF_FIRST
        if self._down_since is None:
            log.info("connected to Redis at %s", self._redis)
        else:
            log.warning(
                "Redis at %s is back after %.1f s; claiming this server's names again",
                self._redis,
                self._host.now() - self._down_since,
            )
            self._down_since = None
        self._renewal_answered = True
        self._renew_all()

    def _fail(self, reason: str) -> None:
        """Lose the link: close both sockets, answer what waited, retry later."""
        for link in (self._cmd, self._sub):
            if link is not None:
                link.close()
        self._cmd = self._sub = None
        self.available = self._cmd_ready = self._sub_ready = False
        for timer in (self._connect_deadline, self._renewal):
            if timer is not None:
                timer.cancel()
        self._connect_deadline = self._renewal = None
        self._outgoing = []
        self._outgoing_ids = []
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
            self._retry = self._host.call_at(now + self._backoff, self._connect)
            self._backoff = min(2 * self._backoff, BACKOFF_MAX)
        waiting, self._waiting = self._waiting, deque()
        for callback in waiting:
            if callback is not None:
                callback(LOST)

    def _on_cmd(self, mask: int) -> None:
        cmd = self._cmd
        if cmd is None:
            return
        try:
            if not cmd.connected:
                cmd.finish_connect()
            if mask & EVENT_WRITE:
                cmd.send()
            if mask & EVENT_READ:
                cmd.receive(COMMAND_BUDGET)
            waiting = self._waiting
            gets = cmd.reader.gets
            while (reply := gets()) is not _INCOMPLETE:
                callback = waiting.popleft()
                if callback is not None:
                    callback(reply)
                    if self._cmd is not cmd:
                        return  # the callback lost the link
        except (OSError, hiredis.ProtocolError, IndexError) as error:
            # IndexError: an answer to nothing we asked, so not Redis.
            self._fail(_describe(error) if isinstance(error, OSError) else repr(error))

    def _on_sub(self, mask: int) -> None:
        sub = self._sub
        if sub is None:
            return
        try:
            if not sub.connected:
                sub.finish_connect()
            if mask & EVENT_WRITE:
                sub.send()
            if mask & EVENT_READ:
                sub.receive(SUBSCRIPTION_BUDGET)
            gets = sub.reader.gets
            relay = self._relay
            while (reply := gets()) is not _INCOMPLETE:
                if type(reply) is list and len(reply) == 3:
                    if reply[0] == b"message":
                        relay(reply[2])
                    elif reply[0] == b"subscribe":
                        self._sub_ready = True
                        self._up()
                elif isinstance(reply, hiredis.ReplyError):
                    self._fail(f"SUBSCRIBE refused: {reply}")
                    return
        except (OSError, hiredis.ProtocolError) as error:
            self._fail(_describe(error) if isinstance(error, OSError) else repr(error))

    def _relay(self, payload: bytes) -> None:
        """One published turn, "<server>:<id>,<id>,...\\n" and a RECEIVE line
        per id: into this turn's batch, for every member but its senders."""
        newline = payload.find(b"\n")
        body = payload[newline + 1 :]
        # The channel is the cluster's own; still, only whole RECEIVE lines
        # may ever reach a client.
        if newline < 0 or not body.startswith(b"RECEIVE ") or not body.endswith(b"\n"):
            log.debug("ignored a malformed message on %r", self._channel)
            return
        tag = self._server_tag
        batch = self.batch
        if not payload.startswith(tag):
            batch.add_foreign(body)  # from another server: one piece
            return
        ids = payload[len(tag) : newline].split(b",")
        lines = body.split(b"\n")
        lines.pop()  # the empty rest after the last "\n"
        if len(ids) != len(lines):
            log.debug("ignored a malformed message on %r", self._channel)
            return
        by_id = self._by_id
        for conn_id, line in zip(ids, lines, strict=True):
            sender = by_id.get(conn_id)
            if sender is None:  # gone meanwhile
                batch.add_foreign(line + b"\n")
            else:
                batch.publish(sender, line + b"\n")
