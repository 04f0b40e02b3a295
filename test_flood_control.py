"""Flood control (PROTOCOL.md, "Flood control (v3)"): --send-rate and
--send-burst. The bucket's arithmetic (flood.py) property-tested; the
reactor's throttle driven turn by turn in this thread with a FakeClock
(conftest.Pumped), so every count is checked at an instant the test
chooses; the options, the settings file and SIGHUP; and one real-clock
run of chat.py.

A sender is slowed, never answered for it: what a throttled connection
sent waits, so the tests count RECEIVE lines at a reader, and prove that
nothing more arrived with a PING the reader answers (everything the
server could process before it was).
"""

from __future__ import annotations

import logging
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from selectors import EVENT_READ
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

import chat
import config
import flood
from conftest import (
    MESSAGE_EMPTY,
    NAME_HAS_SPACES,
    NAME_REQUIRED,
    TIMED_OUT_WAITING,
    TIMEOUT,
    UNRECOGNISED,
    FakeClock,
    Pumped,
    launch,
    poll,
    receive,
    receives,
    sends,
)
from connection import TOKEN, Connection, Kind
from fakes import Parts
from host import Host, Member
from output import STALL_CHECK
from reactor import ChatServer
from room import LocalRoom
from test_metrics import answer_while_turning

THROTTLED_LOG = "sends faster than --send-rate"


# --- the bucket (flood.py) ------------------------------------------------------------

rates = st.one_of(
    st.sampled_from([0.001, 0.1, 0.3, 1.0, 2.0, 3.0, 7.0, 1000.0]),
    st.floats(min_value=flood.MIN_RATE, max_value=flood.MAX_RATE),
)


def tokens_at(next_token: float, now: float, terms: flood.SendRate) -> tuple[int, float]:
    """How many tokens a bucket gives at `now`, one after another; the
    bucket after."""
    taken = 0
    while (after := flood.take(next_token, now, terms)) is not None:
        next_token = after
        taken += 1
    return taken, next_token


@given(rates, st.integers(min_value=1, max_value=50), st.floats(min_value=0, max_value=1e7))
def test_a_full_bucket_gives_its_burst_and_then_one_token_per_interval(
    rate: float, burst: int, start: float
) -> None:
    """flood.take: a full bucket gives `burst` tokens at once, the next one
    1/N s later and not before, then N per second to the token."""
    terms = flood.send_rate(rate, burst)
    assert terms is not None
    taken, bucket = tokens_at(flood.FULL, start, terms)
    assert taken == burst
    # The token is there at the very time `take` refused until (when the
    # reactor's timer brings the connection back), or the loop would spin.
    assert flood.take(bucket, bucket, terms) is not None
    # Not a moment before it is due: SLACK, and the clock's own rounding.
    early = 2 * flood.SLACK
    assert tokens_at(bucket, start + 1 / rate - early, terms)[0] == 0
    now = start
    for steps in (1, 1, 3):
        # Three tokens exactly where three are due, even at 1/3 s each.
        now = start + (round((now - start) * rate) + steps) / rate
        got, bucket = tokens_at(bucket, now, terms)
        assert got == min(steps, burst)


@given(rates, st.integers(min_value=1, max_value=50))
def test_a_bucket_left_alone_refills_to_its_burst_and_no_more(rate: float, burst: int) -> None:
    """flood.take: however long a connection is quiet, it gets `burst` tokens back, not more."""
    terms = flood.send_rate(rate, burst)
    assert terms is not None
    _, bucket = tokens_at(flood.FULL, 1000.0, terms)
    later = 1000.0 + 100 * burst / rate
    assert tokens_at(bucket, later, terms)[0] == burst


def test_the_default_burst_is_ten_seconds_rounded_up() -> None:
    """flood: --send-burst defaults to 10 x N rounded up, at least 1; a rate of 0 is off."""
    assert [flood.default_burst(rate) for rate in (2, 0.25, 0.001, 1.05)] == [20, 3, 1, 11]
    assert flood.send_rate(0.0, 5) is None
    default = flood.send_rate(0.5)
    assert default is not None
    assert tokens_at(flood.FULL, 0.0, default)[0] == 5


# --- the wait, in the Schedule (fakes.Parts: no sockets) -------------------------------


def test_the_schedule_keeps_a_wait_for_a_token() -> None:
    """Schedule: a throttled connection is watched for nothing, has its token's
    timer, says whether it waited before, and its wait is timed to its end or close."""
    parts = Parts()
    conn, _ = parts.connect()
    schedule = parts.schedule
    assert schedule.events(conn) == EVENT_READ
    assert schedule.throttle(conn, parts.clock.now + 1, lambda: None)  # its first wait
    assert schedule.throttled() == [conn] and schedule.is_throttled(conn)
    assert schedule.events(conn) == 0 and schedule.timers_of(conn) == [TOKEN]
    assert not schedule.has_work()
    parts.clock.advance(0.25)
    assert schedule.unthrottle(conn) == 0.25
    assert schedule.throttled() == [] and schedule.timers_of(conn) == []
    assert schedule.unthrottle(conn) == 0.0  # not waiting
    assert not schedule.throttle(conn, parts.clock.now + 1, lambda: None)  # not its first
    parts.clock.advance(2.0)
    assert schedule.forget(conn) == 2.0
    assert schedule.throttled() == [] and schedule.timers_of(conn) == []
    assert parts.timers.next_due() is None


def test_a_throttled_connection_holding_unseen_input_is_not_read() -> None:
    """Reader: input its transport holds (TLS, decrypted already) is not read
    while the connection waits for a token, nor does it keep the loop busy."""

    class Holding(Kind):
        def holds_input(self, conn: Connection) -> bool:
            return True

    parts = Parts()
    conn, transport = parts.member("ann")
    conn.kind = Holding()
    transport.incoming.append(b"SEND more\n")
    schedule = parts.schedule
    schedule.throttle(conn, parts.clock.now + 1, lambda: None)
    schedule.holds_input(conn)
    parts.reader.read_unseen_input()
    assert transport.incoming == [b"SEND more\n"] and conn.backlog() == 0
    assert not schedule.has_work()


# --- the throttle, turn by turn on a fake clock --------------------------------------


class Room:
    """A server with flood control on a fake clock, and three members:
    `ann` floods, `bob` reads, `cat` chats."""

    def __init__(self, rate: float, burst: int | None, **options: object) -> None:
        self.clock = FakeClock()
        self.server = ChatServer(
            "127.0.0.1",
            0,
            clock=self.clock,
            register_timeout=0,
            send_rate=rate,
            send_burst=burst,
            **options,  # type: ignore[arg-type]
        )
        self.bob = self.member("bob")
        self.ann = self.member("ann")
        self.cat = self.member("cat")
        self.received: list[bytes] = []

    def member(self, name: str) -> Pumped:
        client = Pumped(self.server)
        client.register(name)
        return client

    def conn(self, client: Pumped) -> Connection:
        """The server's end of `client`."""
        port = client.sock.getsockname()[1]
        for conn in self.server.view.connections() + self.server.view.throttled():
            if isinstance(conn.sock, socket.socket) and conn.sock.getpeername()[1] == port:
                return conn
        raise AssertionError("no such connection")

    def throttle(self, client: Pumped, data: bytes) -> Connection:
        """`client` sends `data`, which runs out of tokens: the loop turns
        until it waits."""
        conn = self.conn(client)
        client.send(data)
        client.pump_until(lambda: self.server.view.throttled() == [conn], "the throttle")
        return conn

    def bob_gets(self, count: int) -> list[bytes]:
        """Turn the loop until bob has `count` more lines; then check with
        a PING that no more came; those lines."""
        bob = self.bob
        bob.pump_until(lambda: bob.buffer.count(b"\n") >= count, f"{count} lines at bob")
        lines = bob.sync()
        assert len(lines) == count, lines
        self.received += lines
        return lines

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def irc() -> Iterator[Room]:
    """The contract's example: --send-rate 2 --send-burst 5."""
    room = Room(2, 5)
    yield room
    room.close()


def numbered(count: int, first: int = 0) -> list[bytes]:
    return [b"%04d" % number for number in range(first, first + count)]


def test_the_burst_goes_at_once_and_the_next_token_after_one_interval(irc: Room) -> None:
    """Flood control: 5 SENDs at once, the sixth 1/N s later, not a moment before."""
    irc.throttle(irc.ann, sends(numbered(8)))
    assert irc.bob_gets(5) == receives("ann", numbered(5))
    irc.advance(0.499)
    assert irc.bob_gets(0) == []
    irc.advance(0.001)
    assert irc.bob_gets(1) == receives("ann", numbered(1, 5))


def test_the_bucket_refills_at_n_per_second_to_the_token() -> None:
    """Flood control: N tokens a second, exactly: 4 after 1 s, 10 after 2.5 s (rate 4)."""
    room = Room(4, 10)
    try:
        room.throttle(room.ann, sends(numbered(40)))
        assert room.bob_gets(10) == receives("ann", numbered(10))
        room.advance(1.0)
        assert room.bob_gets(4) == receives("ann", numbered(4, 10))
        room.advance(2.5)
        assert room.bob_gets(10) == receives("ann", numbered(10, 14))
    finally:
        room.close()


def test_a_quiet_connection_gets_its_burst_back_and_no_more(irc: Room) -> None:
    """Flood control: after a long pause the bucket is full again: 5, not one per 0.5 s."""
    irc.throttle(irc.ann, sends(numbered(5)) + sends(numbered(20, 100)))
    irc.bob_gets(5)
    irc.advance(1000.0)
    assert irc.bob_gets(5) == receives("ann", numbered(5, 100))


def test_a_throttled_connection_still_receives(irc: Room) -> None:
    """Flood control: a waiting connection gets everything sent to it, at once."""
    conn = irc.throttle(irc.ann, sends(numbered(6)))
    irc.cat.send(sends([b"to you", b"and again"]))
    ann = irc.ann
    expected = b"".join(line + b"\n" for line in receives("cat", [b"to you", b"and again"]))
    ann.pump_until(lambda: expected in ann.buffer, "cat's lines at ann")
    assert ann.buffer == expected
    assert irc.server.view.throttled() == [conn]  # still waiting, still open


def test_lines_wait_in_order_behind_a_waiting_send_and_only_sends_cost_tokens() -> None:
    """Flood control: USERNAME, unknown commands and blank lines cost nothing and
    are answered at once, until a SEND with no token, behind which they wait in order."""
    room = Room(1, 1)
    try:
        lines = [
            b"SEND a",
            b"USERNAME ann2",
            b"PING",
            b"",
            b"send lower",
            b"SEND b",
            b"USERNAME a b",
            b"SEND c",
            b"PING",
        ]
        room.throttle(room.ann, b"\n".join(lines) + b"\n")
        ann = room.ann
        ann.pump_until(lambda: ann.buffer.count(b"\n") == 2, "two answers")
        assert ann.buffer == 2 * (UNRECOGNISED + b"\n")
        assert room.bob_gets(1) == [receive("ann", "a")]
        room.advance(1.0)
        assert room.bob_gets(1) == [receive("ann2", "b")]
        ann.pump_until(lambda: ann.buffer.count(b"\n") == 3, "the next answer")
        assert ann.buffer.endswith(NAME_HAS_SPACES + b"\n")
        room.advance(1.0)
        assert room.bob_gets(1) == [receive("ann2", "c")]
        ann.pump_until(lambda: ann.buffer.count(b"\n") == 4, "the last answer")
        assert ann.buffer.endswith(UNRECOGNISED + b"\n")
        assert room.server.view.throttled() == []
    finally:
        room.close()


def test_a_refused_send_takes_a_token_too() -> None:
    """Flood control: a SEND answered with an ERROR takes its token, as an accepted one does."""
    room = Room(1, 1)
    try:
        ann = room.ann
        room.throttle(ann, b"SEND \nSEND x\n")
        ann.pump_until(lambda: b"\n" in ann.buffer, "the ERROR")
        assert ann.buffer == MESSAGE_EMPTY + b"\n"
        assert room.bob_gets(0) == []
        room.advance(1.0)
        assert room.bob_gets(1) == [receive("ann", "x")]
    finally:
        room.close()


def test_a_throttled_connection_is_neither_watched_for_input_nor_busy(irc: Room) -> None:
    """Flood control: no busy loop: a waiting connection's unread input wakes
    no select, and the loop sleeps until its token is due."""
    conn = irc.throttle(irc.ann, sends(numbered(6)))
    irc.ann.send(sends(numbered(3, 6)))  # more, into the kernel
    assert not irc.server.view.events(conn) & EVENT_READ
    assert all(tag is not conn for tag, _ in irc.server.view.ready_now())
    assert irc.server.view.select_timeout() == pytest.approx(0.5, abs=2 * flood.SLACK)
    assert irc.server.view.timers_of(conn) == [TOKEN]
    assert irc.bob_gets(5) == receives("ann", numbered(5))
    for _ in range(5):
        irc.server.run_once(max_wait=0)
    assert conn.backlog() == 1  # the rest is not read
    irc.advance(0.5)
    assert irc.bob_gets(1) == receives("ann", numbered(1, 5))
    irc.advance(1.5)  # read once its token came
    assert irc.bob_gets(3) == receives("ann", numbered(3, 6))


def test_a_throttled_connection_closed_takes_its_timer_and_wait_with_it() -> None:
    """Flood control: a waiting connection that is closed (by the register
    timeout) leaves no timer behind; its wait so far is counted."""
    clock = FakeClock()
    server = ChatServer("127.0.0.1", 0, clock=clock, register_timeout=10, send_rate=0.01)
    try:
        anonymous = Pumped(server)
        anonymous.send(b"SEND one\nSEND two\n")
        anonymous.pump_until(lambda: server.view.throttled() != [], "the throttle")
        (conn,) = server.view.throttled()
        assert sorted(server.view.timers_of(conn)) == ["registration", TOKEN]
        clock.advance(10)
        assert anonymous.read_to_eof() == NAME_REQUIRED + b"\n" + TIMED_OUT_WAITING + b"\n"
        assert conn.closed
        assert server.view.timers_of(conn) == []
        clock.advance(STALL_CHECK)  # the check of its output, the last timer
        server.run_once(max_wait=0)
        assert server.view.next_timer_due() is None
        assert server.view.throttled() == []
        assert server.stats.throttled_seconds == 10
    finally:
        server.close()


def test_a_throttled_connection_is_closed_at_shutdown(irc: Room) -> None:
    """Flood control: a waiting connection, out of the selector, is closed with the server."""
    conn = irc.throttle(irc.ann, sends(numbered(6)))
    irc.advance(2.0)  # due, but no turn ran: still waiting
    irc.server.close()
    assert conn.closed
    assert irc.server.stats.disconnections["server_shutdown"] == 3
    assert irc.server.stats.throttled_seconds == 2.0


def test_end_of_input_while_throttled_is_seen_after_the_lines_before_it(irc: Room) -> None:
    """Flood control: a client that sends and closes its side: every line is
    processed at the rate, a last one without a newline too, then it is closed."""
    ann = irc.ann
    conn = irc.throttle(ann, sends(numbered(6)) + b"SEND last")
    ann.sock.shutdown(socket.SHUT_WR)
    assert irc.bob_gets(5) == receives("ann", numbered(5))
    irc.advance(0.5)
    assert irc.bob_gets(1) == [receive("ann", numbered(1, 5)[0])]
    assert not conn.closed
    irc.advance(0.5)
    assert irc.bob_gets(1) == [receive("ann", "last")]
    assert ann.read_to_eof() == b""
    assert irc.server.stats.disconnections["client_closed"] == 1


def test_the_contracts_example_1000_sends_at_2_per_second_after_5(irc: Room) -> None:
    """Flood control, the contract's example: 1,000 SENDs piped at once with
    --send-rate 2 --send-burst 5: 5 at once, then 2 a second, all in order,
    while another member chats with no added delay."""
    messages = numbered(1000)
    irc.throttle(irc.ann, sends(messages))
    assert irc.bob_gets(5) == receives("ann", messages[:5])
    delivered = 5
    bob = irc.bob
    for step in range(1, 996):  # 0.5 s each: 497.5 s in all
        irc.advance(0.5)
        bob.pump_until(lambda: bob.buffer.count(b"\n") == 1, "the next line")
        line, _, bob.buffer = bob.buffer.partition(b"\n")
        irc.received.append(line)
        delivered += 1
        if step % 100 == 0:
            irc.cat.send(b"SEND between\n")  # no clock advance: served at once
            assert irc.bob_gets(1) == [receive("cat", "between")]
            irc.received.pop()
            assert irc.bob_gets(0) == []  # and ann is still at the rate
    assert delivered == 1000
    assert irc.received == receives("ann", messages)
    assert irc.server.view.throttled() == []


def test_nobody_else_waits_while_one_connection_is_throttled(irc: Room) -> None:
    """Flood control: while ann waits with 1,000 lines, cat's SENDs reach bob in the same turn."""
    irc.throttle(irc.ann, sends(numbered(1000)))
    irc.bob_gets(5)
    irc.cat.send(sends([b"one", b"two", b"three"]))
    assert irc.bob_gets(3) == receives("cat", [b"one", b"two", b"three"])


class StoringRoom(LocalRoom):
    """A LocalRoom that holds a member after its SEND until `store` (as
    cluster mode does until Redis has stored it)."""

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.storing: list[Member] = []
        self.publish = self.publish_and_hold

    def publish_and_hold(self, member: Member, line: bytes) -> None:
        self.batch.publish(member, line)
        if member not in self.storing:
            self.storing.append(member)
            self.host.hold(member)

    def store(self) -> None:
        for member in self.storing:
            self.host.resume(member)
        self.storing.clear()


def test_a_connection_held_by_the_room_and_throttled_waits_for_both() -> None:
    """Flood control with a room that holds senders (cluster mode): a SEND
    with no token waits for it whether or not the hold ends first, in
    order, and its wait is counted from its start."""
    room = Room(1, 1, room=StoringRoom)
    try:
        storing = room.server.view.room
        assert isinstance(storing, StoringRoom)
        conn = room.throttle(room.ann, sends([b"a", b"b", b"c"]))
        assert room.server.view.held() == [conn]
        assert room.bob_gets(1) == [receive("ann", "a")]
        room.advance(0.5)
        storing.store()  # the hold ends first: b still has no token
        assert room.bob_gets(0) == []
        assert room.server.view.throttled() == [conn]
        room.advance(0.5)
        assert room.bob_gets(1) == [receive("ann", "b")]  # joined while held again
        assert room.server.stats.throttled_seconds == 1.0
        room.advance(1.0)  # held for b, yet c goes with its token, as SENDs join a hold
        assert room.bob_gets(1) == [receive("ann", "c")]
        storing.store()
        assert room.server.view.held() == room.server.view.throttled() == []
    finally:
        room.close()


def test_waits_are_counted_and_the_first_one_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Flood control: chat_throttled_seconds_total sums the waits (HELP and
    TYPE too); a connection's first wait is logged once at INFO, not every one."""
    room = Room(2, 5, metrics_address=("127.0.0.1", 0))
    try:
        with caplog.at_level(logging.INFO, logger="chat"):
            room.throttle(room.ann, sends(numbered(8)))
            room.bob_gets(5)
            room.advance(0.75)
            room.bob_gets(1)  # waited 0.75 s
            room.advance(0.25)  # 0.25 s more, then its token
            room.bob_gets(1)
        assert room.server.stats.throttled_seconds == 1.0
        logged = [record for record in caplog.records if THROTTLED_LOG in record.getMessage()]
        assert len(logged) == 1 and logged[0].levelno == logging.INFO
        body = scrape(room.server)
        assert "# HELP chat_throttled_seconds_total " in body
        assert "# TYPE chat_throttled_seconds_total counter" in body
        assert re.search(r"^chat_throttled_seconds_total 1$", body, re.MULTILINE)
    finally:
        room.close()


def scrape(server: ChatServer) -> str:
    """GET /metrics from an in-process server, turning its loop meanwhile."""
    assert server.metrics is not None
    with socket.create_connection(server.metrics.address, timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        sock.setblocking(False)
        return answer_while_turning(server, sock).decode()


def test_flood_control_is_off_by_default() -> None:
    """Flood control: with no --send-rate, 1,000 SENDs at once all go at once."""
    room = Room(0, None)
    try:
        room.ann.send(sends(numbered(1000)))
        assert room.bob_gets(1000) == receives("ann", numbered(1000))
        assert room.server.view.throttled() == []
    finally:
        room.close()


def test_apply_limits_changes_the_rate_of_open_connections() -> None:
    """SIGHUP: a new send rate holds for open connections from their next
    SEND; turned off, a waiting connection goes on at once."""
    room = Room(0, None)
    try:
        room.server.apply_limits(send_rate=1.0, send_burst=2)
        room.throttle(room.ann, sends(numbered(6)))
        assert room.bob_gets(2) == receives("ann", numbered(2))
        room.server.apply_limits(send_burst=3)  # the rate stays
        room.advance(1.0)
        assert room.bob_gets(1) == receives("ann", numbered(1, 2))
        conn = room.conn(room.ann)
        room.server.apply_limits(send_rate=0.0)
        assert room.server.view.timers_of(conn) == []  # its token is not awaited any more
        assert room.bob_gets(3) == receives("ann", numbered(3, 3))
        assert room.server.view.throttled() == []
    finally:
        room.close()


# --- the options, the settings file, SIGHUP -------------------------------------------


def table() -> dict[str, config.Setting]:
    return config.setting_table(chat.build_parser())


def test_the_options_take_a_rate_and_a_whole_burst() -> None:
    """--send-rate takes decimals, 0 (off, the default); --send-burst a whole number >= 1."""
    args = chat.parse_args([])
    assert (args.send_rate, args.send_burst) == (0.0, None)
    args = chat.parse_args(["--send-rate", "0.5", "--send-burst", "3"])
    assert (args.send_rate, args.send_burst) == (0.5, 3)
    for bad in (["--send-rate", "-1"], ["--send-rate", "nan"], ["--send-rate", "inf"]):
        with pytest.raises(SystemExit):
            chat.parse_args(bad)
    for bad in (["--send-burst", "0"], ["--send-burst", "1.5"], ["--send-burst", "9999999"]):
        with pytest.raises(SystemExit):
            chat.parse_args(bad)


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("send-rate = -2\n", ["line 1", "send-rate", "0 (no limit)"]),
        ('\nsend-rate = "fast"\n', ["line 2", "send-rate", "a number"]),
        ("send-burst = 0\n", ["line 1", "send-burst", "at least 1"]),
        ("send-burst = 2.5\n", ["line 1", "send-burst", "whole number"]),
    ],
)
def test_a_bad_rate_or_burst_in_the_file_is_named(text: str, mentions: list[str]) -> None:
    """--config: a bad send-rate or send-burst is one line naming the key and its line."""
    found = config.parse_settings(text, "chat.toml", table())
    assert isinstance(found, config.ConfigProblem), found
    for mention in mentions:
        assert mention in found.message


def test_the_file_sets_the_rate_and_the_burst() -> None:
    """--config: send-rate (an integer is a fine rate) and send-burst, as the options read them."""
    found = config.parse_settings("send-rate = 2\nsend-burst = 5\n", "chat.toml", table())
    assert found == {"send_rate": 2.0, "send_burst": 5}
    assert "send-rate" in config.LIVE_SETTINGS and "send-burst" in config.LIVE_SETTINGS


class Recorder:
    """Stands for the running server: records what a reload applies."""

    def __init__(self) -> None:
        self.applied: list[dict[str, object]] = []

    def apply_limits(self, **limits: object) -> None:
        self.applied.append(limits)


def test_a_reload_applies_the_rate_with_its_burst_worked_out(tmp_path: Path) -> None:
    """SIGHUP: a changed rate goes to the server with the burst in force: the
    file's, or 10 x the new rate once the file no longer sets one."""
    path = tmp_path / "chat.toml"
    path.write_text("send-rate = 2\nsend-burst = 5\n")
    argv = ["--config", str(path)]
    args = chat.parse_args(argv)
    recorder = Recorder()
    given = config.given_on_command_line(chat.build_parser(), argv)
    reload = chat._reloader(args, given, lambda: cast(ChatServer, recorder))
    path.write_text("send-rate = 3\nsend-burst = 5\n")
    reload()
    path.write_text("send-rate = 3\n")
    reload()
    path.write_text("send-rate = 0.25\n")
    reload()
    assert recorder.applied == [
        {"send_rate": 3.0, "send_burst": 5},
        {"send_rate": 3.0, "send_burst": 30},
        {"send_rate": 0.25, "send_burst": 3},
    ]


def test_sighup_turns_flood_control_on(tmp_path: Path) -> None:
    """SIGHUP: send-rate and send-burst from the re-read file throttle the
    connections already open."""
    path = tmp_path / "chat.toml"
    path.write_text("send-rate = 0\n")
    with launch("--config", str(path)) as server:
        ann, bob = server.member("ann"), server.member("bob")
        path.write_text("send-rate = 0.001\nsend-burst = 2\n")
        before = server.log.text().count("reloaded the settings")
        server.process.send_signal(signal.SIGHUP)
        poll("the reload", lambda: server.log.text().count("reloaded the settings") > before)
        ann.send(sends([b"one", b"two", b"three"]) + b"PING\n")
        assert bob.lines(2) == receives("ann", [b"one", b"two"])
        poll("the throttle in the log", lambda: THROTTLED_LOG in server.log.text())
        assert bob.sync() == []  # the third waits 1,000 s, with ann's PING behind it
        server.finish()


def test_send_burst_without_a_rate_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """--send-burst without --send-rate: ignored, and the log says so."""
    with caplog.at_level(logging.WARNING, logger="chat"):
        chat._warn_about_unused_options(chat.parse_args(["--send-burst", "5"]), False)
        chat._warn_about_unused_options(
            chat.parse_args(["--send-burst", "5", "--send-rate", "1"]), False
        )
    assert caplog.text.count("--send-burst only matters with --send-rate") == 1


def test_chat_py_throttles_at_the_rate_and_loses_nothing() -> None:
    """Flood control, end to end: chat.py --send-rate 50 --send-burst 5 gets
    30 SENDs piped at once through to the room, all of them, in order."""
    with launch("--send-rate", "50", "--send-burst", "5") as server:
        ann, bob = server.member("ann"), server.member("bob")
        messages = numbered(30)
        started = time.monotonic()
        ann.send(sends(messages))
        assert bob.lines(30) == receives("ann", messages)
        # 25 after the burst at 50 a second: half a second at least.
        assert time.monotonic() - started >= 25 / 50 - 0.02
        assert ann.sync() == [] and bob.sync() == []
        assert server.log.text().count(THROTTLED_LOG) == 1
        server.finish()
