"""A link to Redis for the reactor: commands encoded here, replies parsed by
`hiredis.Reader` (which does no I/O), one non-blocking socket in the
server's selector.

It knows Redis, not the room: the `redis://` URL, the RESP encoding of a
command, the blocking check at start that Redis accepts what the room will
ask; `Link`, which sends requests, answers each in order or with LOST, and
fails on a deadline or a broken socket; and `Session`, the life of a
room's two links (connecting, up, failing, the back-off, the heartbeat and
Redis's clock). cluster.py, the only module that imports this one (chat.py
imports cluster.py only with --redis), keeps the room.

A reply is handed to its request's callback after the link's own error
handling is done: an exception in a callback is the room's bug, logged as
an internal error, never taken for Redis failing.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import socket
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from selectors import EVENT_READ, EVENT_WRITE
from typing import Any, Final, Protocol
from urllib.parse import unquote, urlsplit

import hiredis
from hiredis import ReplyError

from host import Host, Timer, watch_writes_while
from room import ConfigurationError

__all__ = [
    "BACKOFF_FIRST",
    "BACKOFF_MAX",
    "LOST",
    "Callback",
    "Link",
    "RedisAddress",
    "ReplyError",
    "Session",
    "check_configuration",
    "describe",
    "encode_command",
    "hello_commands",
    "parse_redis_url",
]

log = logging.getLogger("chat")

# Reconnecting: the first retry after about this long (at once after Redis
# closed a working link), then twice as long each time, up to the cap; each
# wait is drawn between half of it and all of it, so that servers that lost
# Redis together do not come back in step.
BACKOFF_FIRST: Final = 0.05
BACKOFF_MAX: Final = 2.0
# A script's deadline in Redis's clock comes this share of the timeout
# before ours, so that an answer sent just in time still arrives in time.
DEADLINE_MARGIN: Final = 0.25
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


class _Lost:
    """What a waiting request's callback gets when the connection is lost."""


LOST: Final = _Lost()
_INCOMPLETE: Final = object()  # hiredis.Reader.gets(): no complete reply yet

Callback = Callable[[Any], None]


class Fail(Protocol):
    """What a link calls when it breaks: `closed_by_redis` when Redis closed
    a link that worked (a restart, CLIENT KILL), else it failed to connect,
    answer or make sense."""

    def __call__(self, reason: str, *, closed_by_redis: bool = False) -> None: ...


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


def hello_commands(redis: RedisAddress) -> list[tuple[bytes, ...]]:
    """What every connection says first: AUTH and SELECT, as the URL asks."""
    hello: list[tuple[bytes, ...]] = []
    if redis.password is not None:
        user = (redis.username.encode(),) if redis.username else ()
        hello.append((b"AUTH", *user, redis.password.encode()))
    if redis.db:
        hello.append((b"SELECT", b"%d" % redis.db))
    return hello


def check_configuration(
    redis: RedisAddress,
    family: int,
    address: Any,
    commands: Sequence[tuple[bytes, ...]],
    *,
    timeout: float,
) -> None:
    """Ask Redis `commands` after the hello (blocking, each step within
    `timeout`) and raise ConfigurationError if it refuses any, or does not
    speak Redis's protocol. A Redis that cannot be reached, or answers "not
    now" (LOADING), is an outage, which the room logs and rides out: return."""
    commands = [*hello_commands(redis), *commands]
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
        if isinstance(reply, ReplyError):
            text = str(reply)
            if text.encode().startswith(_TRANSIENT):
                return
            raise ConfigurationError(f"Redis at {redis} refused {_name(command)}: {text}")


def _name(command: tuple[bytes, ...]) -> str:
    """A command as an error message names it: "GET", "SCRIPT LOAD"."""
    return b" ".join(command[:2] if command[0] == b"SCRIPT" else command[:1]).decode()


def describe(error: OSError) -> str:
    """An OSError in the words of a log line."""
    return error.strerror or str(error) or type(error).__name__


class Link:
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
        "_budget",
        "_fail",
        "_deadline",
    )

    def __init__(self, family: int, address: Any, host: Host, *, budget: int, fail: Fail) -> None:
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
            self._fail("no answer within the deadline (--redis-timeout)")
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
        # Writable also means "connected" while a connect is under way.
        watch_writes_while(self, bool(self.out) or not self.connected, Link._rewatch)

    def _rewatch(self) -> None:
        events = EVENT_READ | EVENT_WRITE if self.wants_write else EVENT_READ
        self._host.watch(self.sock, events, self.on_event)

    def on_event(self, mask: int) -> None:
        """The socket is ready: connect, send, read; then answer the waiting
        requests in order, outside the handling of the link's own errors."""
        if self.closed:
            return
        replies: list[Any] = []
        failure: tuple[str, bool] | None = None
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
            gets = self.reader.gets
            while (reply := gets()) is not _INCOMPLETE:
                replies.append(reply)
        except (ConnectionResetError, BrokenPipeError, EOFError) as error:
            # Redis closed a link that worked (a restart, CLIENT KILL).
            failure = (str(error) or type(error).__name__, True)
        except (OSError, hiredis.ProtocolError) as error:
            failure = (describe(error) if isinstance(error, OSError) else repr(error), False)
        # The replies parsed before a protocol error are still answers.
        if self._dispatch(replies) and failure is not None:
            self._fail(failure[0], closed_by_redis=failure[1])

    def _dispatch(self, replies: list[Any]) -> bool:
        """Hand each reply to its request's callback, in order; whether the
        link is still open afterwards."""
        waiting = self.waiting
        for reply in replies:
            if not waiting:
                # An answer to nothing we asked, so not Redis.
                self._fail(f"an answer to no request: {reply!r:.100}")
                return False
            callback = waiting.popleft()[1]
            if callback is None:
                continue
            try:
                callback(reply)
            except Exception:
                # The room's bug, not Redis's: the link stays up and in step.
                log.exception("internal error in the callback of a Redis reply")
            if self.closed:
                return False  # the callback lost the link
        return True

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


class Session:
    """A room's two links to Redis and their life: connecting (the hello,
    the room's `setup`, each to be answered OK, then its `opening` question,
    whose answer `opened` checks: what is wrong with it, if anything), up
    once both links answered, failing (what waited is told LOST) and
    retrying after a back-off; the heartbeat, and from it Redis's clock, in
    which a script's deadline is written. `up` and `down` tell the room."""

    def __init__(
        self,
        host: Host,
        redis: RedisAddress,
        family: int,
        address: Any,
        *,
        timeout: float,
        setup: Sequence[tuple[bytes, ...]],
        opening: tuple[bytes, ...],
        opened: Callable[[Any], str | None],
        up: Callable[[], None],
        down: Callable[[], None],
    ) -> None:
        self._host = host
        self._redis = redis
        self._family = family
        self._address = address
        self.timeout = timeout
        self._setup = setup
        self._opening = encode_command(*opening)
        self._opened = opened
        self._on_up = up
        self._on_down = down
        self.available = False  # both links up: USERNAME and SEND work
        self.cmd: Link | None = None
        self.reader: Link | None = None  # blocked in XREAD, mostly
        self._cmd_ready = False
        self._reader_ready = False
        # Redis's clock minus ours (ms), from the last heartbeats: each an
        # underestimate (Redis read its clock before we got the answer).
        self._offsets: deque[float] = deque(maxlen=8)
        self._down_since: float | None = None  # logged once per outage
        self._backoff = BACKOFF_FIRST
        # At most one of each is pending: reconnect, heartbeat.
        self._retry: Timer | None = None
        self._heartbeat: Timer | None = None
        self._was_up = False  # an outage is the loss of a link that was up
        self.outages = 0

    def ask(self, callback: Callback | None, command: bytes) -> bool:
        """Queue an encoded command on the command link, within the timeout;
        False if there is no link to queue it on."""
        if self.cmd is None:
            return False
        self.cmd.request(callback, command, self.timeout)
        return True

    def redis_deadline(self) -> bytes:
        """A request's deadline in Redis's clock (ms), a margin before ours;
        b"0" (none) before the first heartbeat."""
        if not self._offsets:
            return b"0"
        local = self._host.now() + self.timeout * (1 - DEADLINE_MARGIN)
        return b"%d" % (local * 1000 + max(self._offsets))

    def connect(self) -> None:
        self._retry = None
        host = self._host
        try:
            self.cmd = Link(
                self._family, self._address, host, budget=COMMAND_BUDGET, fail=self.fail
            )
            self.reader = Link(
                self._family, self._address, host, budget=READER_BUDGET, fail=self.fail
            )
        except OSError as error:
            self.fail(describe(error))
            return
        timeout = self.timeout
        for link in (self.cmd, self.reader):
            for command in hello_commands(self._redis):
                link.request(self._expect_ok(command), encode_command(*command), timeout)
        cmd, reader = self.cmd, self.reader
        for command in self._setup:
            cmd.request(self._expect_ok(command), encode_command(*command), timeout)
        cmd.request(self._timed, encode_command(b"TIME"), timeout)
        cmd.request(self._answered_opening, self._opening, timeout)
        reader.request(self._reader_pinged, encode_command(b"PING"), timeout)

    def _expect_ok(self, command: tuple[bytes, ...]) -> Callback:
        def check(reply: Any) -> None:
            if isinstance(reply, ReplyError):
                self.fail(f"{_name(command)} refused: {reply}")

        return check

    def _answered_opening(self, reply: Any) -> None:
        if reply is LOST:
            return
        problem = self._opened(reply)
        if problem is not None:
            self.fail(problem)
            return
        self._cmd_ready = True
        self._up()

    def _reader_pinged(self, reply: Any) -> None:
        if isinstance(reply, ReplyError):  # LOADING, after a restart
            self.fail(f"PING refused: {reply}")
        elif reply is not LOST:
            self._reader_ready = True
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
        self._heartbeat = host.call_at(host.now() + self.timeout / 2, self._beat)
        self.ask(self._timed, encode_command(b"TIME"))

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
        self._on_up()
        self._beat()

    def fail(self, reason: str, *, closed_by_redis: bool = False) -> None:
        """Lose the link: close both sockets, tell the room, answer what
        waited; retry at once if Redis closed a link that worked, else after
        the back-off."""
        was_available = self.available
        waiting: list[Callback] = []
        for link in (self.cmd, self.reader):
            if link is not None:
                waiting += link.close()
        self.cmd = self.reader = None
        self.available = self._cmd_ready = self._reader_ready = False
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        self._offsets.clear()
        now = self._host.now()
        if self._down_since is None:
            self._down_since = now
            if self._was_up:
                self.outages += 1
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
            self._retry = self._host.call_at(now + delay, self.connect)
        self._on_down()
        for callback in waiting:
            callback(LOST)

    def flush(self) -> None:
        """Send what the turn queued on both links, in one go."""
        for link in (self.cmd, self.reader):
            if link is not None and link.out:
                try:
                    link.send()
                except OSError as error:
                    self.fail(describe(error), closed_by_redis=True)
                    return
                if len(link.out) > MAX_UNSENT:
                    self.fail(f"Redis is not reading: {len(link.out)} bytes unsent")
                    return

    def close(self) -> None:
        """Server shutdown: one last try to send (the closed connections'
        releases), then close."""
        for timer in (self._retry, self._heartbeat):
            if timer is not None:
                timer.cancel()
        for link in (self.cmd, self.reader):
            if link is not None:
                with contextlib.suppress(OSError):
                    link.send()
                link.close()
        self.cmd = self.reader = None
        self.available = False
