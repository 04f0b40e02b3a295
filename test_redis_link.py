"""redis_link.py on its own: the RESP encoding, the `redis://` URL, the hello,
and a `Link` against a fake Redis on loopback (a socket this test writes
replies to) and a fake host whose clock moves only when told. The room
over a real Redis is test_cluster.py.
"""

from __future__ import annotations

import logging
import select
import socket
from collections.abc import Callable, Iterator
from selectors import EVENT_READ, EVENT_WRITE
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chat import ChatServer
from conftest import TIMEOUT, FakeClock, free_port
from host import Member
from room import ConfigurationError

hiredis = pytest.importorskip("hiredis")
import cluster  # noqa: E402  (needs hiredis)
import redis_link  # noqa: E402
from redis_link import LOST, Link, RedisAddress  # noqa: E402

# --- Encoding, the URL, the hello -------------------------------------------


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=6))
def test_a_command_is_a_resp_array_redis_reads_back(args: list[bytes]) -> None:
    """encode_command: any arguments, binary included, parse back as the same list."""
    encoded = redis_link.encode_command(*args)
    reader = hiredis.Reader()
    reader.feed(encoded)
    assert reader.gets() == args
    assert reader.gets() is False  # nothing left over


def test_a_command_is_encoded_as_bulk_strings() -> None:
    """encode_command: an array header, then each argument as "$<length>"."""
    assert redis_link.encode_command(b"GET", b"k\r\n") == b"*2\r\n$3\r\nGET\r\n$3\r\nk\r\n\r\n"


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis://", RedisAddress("127.0.0.1", 6379, 0, None, None)),
        ("redis://cache:7000/3", RedisAddress("cache", 7000, 3, None, None)),
        ("redis://:s%40cret@h/0", RedisAddress("h", 6379, 0, None, "s@cret")),
        ("redis://bob:pw@[::1]:6380", RedisAddress("::1", 6380, 0, "bob", "pw")),
    ],
)
def test_a_redis_url_is_parsed(url: str, address: RedisAddress) -> None:
    """parse_redis_url: host, port, database and credentials, with their defaults."""
    assert redis_link.parse_redis_url(url) == address


def test_a_redis_address_prints_with_brackets_around_ipv6() -> None:
    """RedisAddress in a log line: host:port/db, an IPv6 host in brackets."""
    assert str(RedisAddress("::1", 6380, 2, None, "pw")) == "[::1]:6380/2"
    assert str(RedisAddress("cache", 6379, 0, None, None)) == "cache:6379/0"


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://localhost:6379", "must start with redis://"),
        ("redis://h/0?x=1", "no query or fragment"),
        ("redis://h:99999/0", "from 1 to 65535"),
        ("redis://h/zero", "the database must be a number"),
    ],
)
def test_a_bad_redis_url_is_a_configuration_error(url: str, words: str) -> None:
    """parse_redis_url: a URL it cannot use is a ConfigurationError naming the URL and why."""
    with pytest.raises(ConfigurationError) as raised:
        redis_link.parse_redis_url(url)
    assert words in str(raised.value) and repr(url) in str(raised.value)


def test_the_hello_says_auth_and_select_as_the_url_asks() -> None:
    """hello_commands: AUTH (with the user, if any) when there is a password; SELECT for db > 0."""
    assert redis_link.hello_commands(RedisAddress("h", 1, 0, None, None)) == []
    assert redis_link.hello_commands(RedisAddress("h", 1, 2, "bob", "pw")) == [
        (b"AUTH", b"bob", b"pw"),
        (b"SELECT", b"2"),
    ]
    assert redis_link.hello_commands(RedisAddress("h", 1, 0, None, "")) == [(b"AUTH", b"")]


# --- A Link against a fake Redis ----------------------------------------------


class FakeHost:
    """What a Link asks of the reactor: a clock that moves when told, timers
    run by `advance`, and the watched sockets (the test calls the handler)."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.timers: list[tuple[float, Callable[[], None], list[bool]]] = []
        self.watched: dict[object, int] = {}

    def now(self) -> float:
        return self.clock.now

    def call_at(self, when: float, callback: Callable[[], None]) -> Any:
        cancelled = [False]
        self.timers.append((when, callback, cancelled))

        class Handle:
            def cancel(self) -> None:
                cancelled[0] = True

        return Handle()

    def advance(self, seconds: float) -> None:
        """Move the clock and run the timers due, in order (one set for
        later by one of them waits for the next `advance`, as for the next
        loop turn)."""
        self.clock.advance(seconds)
        due = sorted((t for t in self.timers if t[0] <= self.clock.now), key=lambda t: t[0])
        for timer in due:
            self.timers.remove(timer)
            _, callback, cancelled = timer
            if not cancelled[0]:
                callback()

    def reply(self, member: Member, line: bytes) -> None: ...
    def hold(self, member: Member) -> None: ...
    def resume(self, member: Member) -> None: ...
    def disconnect(self, member: Member, detail: str) -> None: ...

    def watch(self, sock: object, events: int, handler: Callable[[int], None]) -> None:
        self.watched[sock] = events

    def unwatch(self, sock: object) -> None:
        self.watched.pop(sock, None)


class Failures:
    """The link's `fail` calls, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, reason: str, *, closed_by_redis: bool = False) -> None:
        self.calls.append((reason, closed_by_redis))


@pytest.fixture
def linked() -> Iterator[tuple[Link, socket.socket, FakeHost, Failures]]:
    """A Link connected to a fake Redis (the returned socket), its host and
    its failures; the link has sent nothing yet."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        host = FakeHost()
        failures = Failures()
        link = Link(socket.AF_INET, listener.getsockname(), host, budget=1 << 16, fail=failures)
        listener.settimeout(TIMEOUT)
        redis, _ = listener.accept()
    redis.settimeout(TIMEOUT)
    with redis:
        assert select.select([], [link.sock], [], TIMEOUT)[1]
        link.on_event(EVENT_WRITE)  # connected
        assert link.connected
        yield link, redis, host, failures
        if not link.closed:
            link.close()


def answer(link: Link, redis: socket.socket, expected: bytes, replies: bytes) -> None:
    """The fake Redis reads what the link sent (`expected`), answers
    `replies`, and the link reads them."""
    link.send()
    got = b""
    while len(got) < len(expected):
        got += redis.recv(65536)
    assert got == expected
    redis.sendall(replies)
    assert select.select([link.sock], [], [], TIMEOUT)[0]
    link.on_event(EVENT_READ)


def test_replies_answer_requests_in_order(linked: Any) -> None:
    """Link: each reply goes to its request's callback, in order (a None callback skipped)."""
    link, redis, _, failures = linked
    got: list[Any] = []
    link.request(got.append, redis_link.encode_command(b"PING"), 2.0)
    link.request(None, redis_link.encode_command(b"DEL", b"k"), 2.0)
    link.request(got.append, redis_link.encode_command(b"GET", b"k"), 2.0)
    expected = b"".join(
        redis_link.encode_command(*c) for c in ((b"PING",), (b"DEL", b"k"), (b"GET", b"k"))
    )
    answer(link, redis, expected, b"+PONG\r\n:1\r\n$1\r\nv\r\n")
    assert got == [b"PONG", b"v"] and not link.waiting
    assert failures.calls == []


def test_a_callback_that_raises_is_an_internal_error_not_an_outage(
    linked: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Link: a callback raising (IndexError included) is logged as an
    internal error; the link does not fail and the next reply still reaches
    the next callback."""
    link, redis, _, failures = linked

    def buggy(reply: Any) -> None:
        raise IndexError("a bug in the room")

    got: list[Any] = []
    link.request(buggy, redis_link.encode_command(b"PING"), 2.0)
    link.request(got.append, redis_link.encode_command(b"PING"), 2.0)
    with caplog.at_level(logging.ERROR, logger="chat"):
        answer(link, redis, redis_link.encode_command(b"PING") * 2, b"+PONG\r\n+ONE\r\n")
    assert failures.calls == [] and not link.closed
    assert got == [b"ONE"]
    (record,) = caplog.records
    assert "internal error" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is IndexError


def test_an_answer_to_nothing_asked_fails_the_link(linked: Any) -> None:
    """Link: a reply with no request waiting is not Redis: the link fails (not closed by Redis)."""
    link, redis, _, failures = linked
    got: list[Any] = []
    link.request(got.append, redis_link.encode_command(b"PING"), 2.0)
    answer(link, redis, redis_link.encode_command(b"PING"), b"+PONG\r\n+EXTRA\r\n")
    assert got == [b"PONG"]
    assert len(failures.calls) == 1 and failures.calls[0][1] is False
    assert "no request" in failures.calls[0][0]


def test_replies_before_a_protocol_error_are_still_answers(linked: Any) -> None:
    """Link: what parsed before bytes that are not RESP is handed on; then the link fails."""
    link, redis, _, failures = linked
    got: list[Any] = []
    link.request(got.append, redis_link.encode_command(b"PING"), 2.0)
    link.request(got.append, redis_link.encode_command(b"PING"), 2.0)
    answer(link, redis, redis_link.encode_command(b"PING") * 2, b"+PONG\r\n@oops\r\n")
    assert got == [b"PONG"]
    assert len(failures.calls) == 1 and failures.calls[0][1] is False


def test_redis_closing_the_link_is_told_as_closed_by_redis(linked: Any) -> None:
    """Link: end of stream fails the link as closed by Redis; what waited is kept for LOST."""
    link, redis, _, failures = linked
    got: list[Any] = []
    link.request(got.append, redis_link.encode_command(b"PING"), 2.0)
    link.send()
    redis.shutdown(socket.SHUT_WR)
    assert select.select([link.sock], [], [], TIMEOUT)[0]
    link.on_event(EVENT_READ)
    assert failures.calls == [("Redis closed the connection", True)]
    assert got == []
    assert link.close() == [got.append]


def test_a_request_unanswered_by_its_deadline_fails_the_link(linked: Any) -> None:
    """Link: a request unanswered by its deadline (host's clock) fails the link then, not before."""
    link, redis, host, failures = linked
    got: list[Any] = []
    link.request(got.append, redis_link.encode_command(b"PING"), 2.0)
    link.request(got.append, redis_link.encode_command(b"PING"), 3.0)
    answer(link, redis, redis_link.encode_command(b"PING") * 2, b"+ONE\r\n")
    host.advance(1.99)
    assert failures.calls == [] and got == [b"ONE"]
    host.advance(0.01)  # the first was answered: its deadline re-arms for the second
    assert failures.calls == []
    host.advance(0.99)
    assert failures.calls == []
    host.advance(0.01)
    assert failures.calls == [("no answer within the deadline (--redis-timeout)", False)]


def test_a_closed_link_unwatches_and_hands_back_what_waited(linked: Any) -> None:
    """Link.close: unwatched, its deadline cancelled, the waiting callbacks handed back for LOST."""
    link, _, host, failures = linked
    got: list[Any] = []
    link.request(got.append, redis_link.encode_command(b"PING"), 2.0)
    link.request(None, redis_link.encode_command(b"PING"), 2.0)
    waiting = link.close()
    assert waiting == [got.append] and link.sock not in host.watched
    for callback in waiting:
        callback(LOST)
    host.advance(10.0)
    assert failures.calls == [] and got == [LOST]


# --- The session's back-off, on the reactor's clock ---------------------------


def test_redis_back_off_doubles_up_to_its_cap_with_jitter() -> None:
    """Cluster mode: reconnecting to an unreachable Redis backs off from
    BACKOFF_FIRST, doubling to BACKOFF_MAX, each wait drawn from its upper
    half (jitter), on the reactor's clock."""
    clock = FakeClock()
    url = f"redis://127.0.0.1:{free_port()}/0"  # nobody listens there
    timeout = 5.0  # a request's deadline, told apart from the waits below
    room = cluster.room_factory(url, room="chat", lease_ms=3000, timeout=timeout)
    server = ChatServer("127.0.0.1", 0, clock=clock, room=room)
    try:
        waits = []
        for _ in range(10):
            # The refused connect shows as an event; its fail sets the retry.
            for _ in range(50):
                server.run_once(max_wait=0.1)
                due = server.view.next_timer_due()
                if due is not None and due - clock.now != timeout:
                    break
            due = server.view.next_timer_due()
            assert due is not None
            waits.append(due - clock.now)
            clock.advance(due - clock.now)
        caps = [min(redis_link.BACKOFF_FIRST * 2**i, redis_link.BACKOFF_MAX) for i in range(10)]
        assert caps[:7] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
        for wait, cap in zip(waits, caps, strict=True):
            assert cap / 2 <= wait <= cap
        assert len({round(wait / cap, 6) for wait, cap in zip(waits, caps, strict=True)}) > 1
    finally:
        server.close()
