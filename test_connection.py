"""connection.py without sockets: the Outbox's counts, the Writer's
broadcast and budget, the Reader's framing, and the Schedule that owns
every connection's place in the turns, against fakes.py's transport and
selector."""

from __future__ import annotations

from itertools import accumulate
from selectors import EVENT_READ, EVENT_WRITE

import pytest

from connection import HANDSHAKE, LINES_PER_TURN, REGISTRATION, Connection, Kind
from fakes import FakeTransport, Parts
from output import STALL_CHECK, STALL_TIMEOUT, Outbox


def line(text: str, size: int = 0) -> bytes:
    """A RECEIVE line of `size` bytes (at least the text's)."""
    body = f"RECEIVE x {text}".encode()
    return body + b"." * max(0, size - len(body) - 1) + b"\n"


def unsent(conn: Connection) -> bytes:
    """What `conn` has queued and the kernel has not taken."""
    return b"" if conn.out is None else bytes(conn.out)


# --- the write path -------------------------------------------------------


def test_a_member_shed_mid_broadcast_gets_nothing_more() -> None:
    """Writer: a member whose backlog is dropped for the budget during a
    broadcast, before the loop reaches it, gets none of the turn's lines
    (no gap in what it sees) and is closed for the budget."""
    parts = Parts(output_budget=6000)
    stuck, _ = parts.member("stuck", window=0)  # reached first: backs up
    backlogged, behind = parts.member("behind")  # reached second, shed by then
    parts.writer.queue(backlogged, b"y" * 5000)  # fits the budget alone
    turn = line("hello", 1000)
    parts.room.batch.add_foreign(turn)
    parts.writer.flush(parts.room)
    assert behind.received == b""  # not this turn's lines after a gap
    assert behind.sends == 0
    assert parts.closed == [(backlogged, "memory_budget")]
    assert unsent(stuck) == turn and not stuck.closed


def test_every_member_gets_the_same_bytes_object_in_one_send() -> None:
    """Writer: the turn's lines are joined once; every member with nothing
    queued gets that one object, in one send."""
    parts = Parts()
    seen: list[object] = []

    class Recording(FakeTransport):
        def send(self, data: bytes | bytearray | memoryview, /) -> int:
            seen.append(data)
            return super().send(data)

    members = []
    for name in ("ann", "bob", "cy"):
        conn, _ = parts.member(name)
        conn.sock = Recording()
        members.append(conn)
    parts.room.batch.add_foreign(line("one"))
    parts.room.batch.add_foreign(line("two"))
    parts.writer.flush(parts.room)
    assert len(seen) == 3 and all(data is seen[0] for data in seen)
    assert seen[0] == line("one") + line("two")
    assert parts.stats.bytes_sent == 3 * len(line("one") + line("two"))


def test_a_backed_up_member_is_watched_for_writing_until_it_drains() -> None:
    """Writer: what the kernel does not take is queued, the member watched
    for writing; once sent, writing is no longer watched."""
    parts = Parts()
    conn, transport = parts.member("ann", window=10)
    parts.room.batch.add_foreign(line("hello", 100))
    parts.writer.flush(parts.room)
    assert unsent(conn) == line("hello", 100)[10:]
    assert parts.schedule.events(conn) == EVENT_READ | EVENT_WRITE
    assert parts.writer.outbox.total == 90
    transport.window = 1000
    parts.schedule.flush_later(conn)  # what a writable event does
    parts.writer.flush(parts.room)
    assert conn.out is None and parts.writer.outbox.total == 0
    assert parts.schedule.events(conn) == EVENT_READ
    assert bytes(transport.received) == line("hello", 100)


def test_a_member_over_the_output_limit_is_closed_as_a_slow_consumer() -> None:
    """Writer: unsent output over --output-limit closes the member."""
    parts = Parts(output_limit=500)
    conn, _ = parts.member("ann", window=0)
    parts.room.batch.add_foreign(line("big", 501))
    parts.writer.flush(parts.room)
    assert parts.closed == [(conn, "slow_consumer")]
    assert parts.writer.outbox.total == 0 and not parts.writer.outbox


def test_output_that_stops_moving_is_closed_after_the_stall_timeout() -> None:
    """Writer: output that has not shrunk for STALL_TIMEOUT closes its
    connection, checked every STALL_CHECK; output that moves is kept."""
    parts = Parts()
    stuck, _ = parts.member("stuck", window=0)
    moving, moving_transport = parts.member("moving", window=0)
    parts.writer.send_later(stuck, b"x\n")
    parts.writer.send_later(moving, b"x\n" * 100)
    parts.writer.flush(parts.room)
    checks = int(STALL_TIMEOUT / STALL_CHECK)
    for _ in range(checks):
        parts.clock.advance(STALL_CHECK)
        parts.timers.tick()
        moving_transport.window = 1  # takes a byte a check
        parts.schedule.flush_later(moving)
        parts.writer.flush(parts.room)
        parts.timers.run_due()
    assert parts.closed == [(stuck, "slow_consumer")]
    assert not moving.closed


def test_replies_are_framed_by_the_transports_kind() -> None:
    """Writer: output for one connection goes through its kind's `frame`,
    and so does an answer in its place in a member's own copy of the turn
    (whose lines are cut from the turn on the member's wire)."""

    class Bracketed(Kind):
        def frame(self, data: bytes) -> bytes:
            return b"[" + data + b"]"

    parts = Parts()
    conn, transport = parts.member("ann")
    conn.kind = Bracketed()
    parts.writer.send_later(conn, b"ERROR x\n")
    parts.writer.flush(parts.room)
    assert bytes(transport.received) == b"[ERROR x\n]"
    parts.room.batch.add_foreign(line("a"))
    parts.room.batch.reply(conn, b"OK\n")  # in its place: its own copy
    parts.room.batch.add_foreign(line("b"))
    parts.writer.flush(parts.room)
    assert bytes(transport.received) == b"[ERROR x\n]" + line("a") + b"[OK\n]" + line("b")


def test_a_second_wire_format_is_made_once_per_turn() -> None:
    """Writer: a wire format added by a transport frames the turn's lines
    once; its members get those bytes, the others the lines joined."""
    parts = Parts()
    framed: list[list[bytes]] = []

    def frame_lines(lines: list[bytes]) -> bytes:
        framed.append(list(lines))
        return b"".join(b"<" + line + b">" for line in lines)

    def frame_offsets(lines: list[bytes]) -> list[int]:
        return list(accumulate((len(line) + 2 for line in lines), initial=0))

    wire = parts.writer.add_wire(frame_lines, frame_offsets)
    _, plain_transport = parts.member("ann")
    others = [parts.member(name) for name in ("bob", "cy")]
    for conn, _ in others:
        conn.wire = wire
    parts.room.batch.add_foreign(line("a"))
    parts.writer.flush(parts.room)
    assert framed == [[line("a")]]
    assert bytes(plain_transport.received) == line("a")
    for _, transport in others:
        assert bytes(transport.received) == b"<" + line("a") + b">"


def test_a_wire_format_without_members_is_not_made() -> None:
    """Writer: while no member is on a wire format (a web port nobody
    uses), the turn's lines are never framed for it."""
    parts = Parts()
    framed: list[list[bytes]] = []

    def frame_lines(lines: list[bytes]) -> bytes:
        framed.append(list(lines))
        return b"".join(lines)

    parts.writer.add_wire(frame_lines, lambda lines: list(accumulate(map(len, lines), initial=0)))
    _, transport = parts.member("ann")
    parts.room.batch.add_foreign(line("a"))
    parts.writer.flush(parts.room)
    assert bytes(transport.received) == line("a")
    assert framed == []


# --- the outbox ------------------------------------------------------------


def test_the_outbox_counts_what_is_queued_taken_and_dropped() -> None:
    """Outbox: the total and the memory held follow queue, took and drop."""
    outbox = Outbox(budget=1 << 20, high_water=1 << 19)
    conn = Connection(FakeTransport(), "peer")
    outbox.queue(conn, b"abcdef", now=1.0)
    outbox.queue(conn, memoryview(b"gh"), now=2.0)
    assert outbox.total == 8 and unsent(conn) == b"abcdefgh"
    assert conn.out is not None and outbox.held == conn.out.__sizeof__()
    outbox.took(conn, 3, now=3.0)
    assert outbox.total == 5 and unsent(conn) == b"defgh"
    assert conn.out is not None and outbox.held == conn.out.__sizeof__()
    assert outbox.stalled(now=4.0, after=1.0) == [conn]
    assert outbox.stalled(now=3.5, after=1.0) == []  # shrank at 3.0
    outbox.drop(conn)
    assert outbox.total == 0 and outbox.held == 0 and conn.out is None and not outbox


def test_the_outbox_sheds_the_largest_first_until_under_budget() -> None:
    """Outbox: over the budget, the largest buffers are dropped first, and
    no more than needed."""
    outbox = Outbox(budget=3000, high_water=1 << 19)
    small, middle, large = (Connection(FakeTransport(), "p") for _ in range(3))
    outbox.queue(small, b"s" * 500, now=0)
    outbox.queue(large, b"l" * 2000, now=0)
    outbox.queue(middle, b"m" * 1000, now=0)
    assert outbox.over_budget
    assert outbox.shed() == [large]
    assert not outbox.over_budget
    assert small.out is not None and middle.out is not None and large.out is None


# --- the read path ---------------------------------------------------------


def test_a_read_queues_lines_and_puts_the_connection_in_the_round() -> None:
    """Reader: a read is split into lines, queued, and its connection
    joins the round; a partial line waits for its end."""
    parts = Parts()
    conn, transport = parts.connect()
    transport.incoming.append(b"USERNAME ann\nSEND hi\nSEND par")
    parts.reader.read(conn)
    assert conn.lines == [b"USERNAME ann", b"SEND hi"] and conn.partial == b"SEND par"
    assert parts.schedule.round() == [conn]


def test_telnet_is_only_for_kinds_that_speak_it() -> None:
    """Reader: telnet commands are taken out (and answered) only for a kind
    with `telnet`; another kind's input is split into lines as it is."""

    class LinesAlready(Kind):
        telnet = False

    parts = Parts()
    telnet, telnet_transport = parts.connect()
    other, other_transport = parts.connect()
    other.kind = LinesAlready()
    data = b"PING\xff\xfd\x06\n"  # IAC DO TIMING-MARK inside a line
    telnet_transport.incoming.append(data)
    other_transport.incoming.append(data)
    parts.reader.read(telnet)
    parts.reader.read(other)
    assert telnet.lines == [b"PING"] and telnet.out  # answered: WILL TIMING-MARK
    assert other.lines == [b"PING\xff\xfd\x06"] and other.out is None


def test_a_long_backlog_is_not_read_until_it_shrinks() -> None:
    """Reader: a connection with more than LINES_PER_TURN lines waiting is
    not read (its input waits in the kernel)."""
    parts = Parts()
    conn, transport = parts.connect()
    transport.incoming.append(b"PING\n" * (LINES_PER_TURN + 1))
    transport.incoming.append(b"MORE\n")
    parts.reader.read(conn)
    parts.reader.read(conn)
    assert transport.incoming == [b"MORE\n"]


def test_a_transport_error_closes_the_connection_with_its_reason() -> None:
    """Reader: an error of the transport closes it: reset, or timed out."""
    parts = Parts()
    reset, reset_transport = parts.connect()
    dead, dead_transport = parts.connect()
    reset_transport.incoming.append(ConnectionResetError(104, "Connection reset by peer"))
    dead_transport.incoming.append(TimeoutError(110, "Connection timed out"))
    parts.reader.read(reset)
    parts.reader.read(dead)
    assert parts.closed == [(reset, "reset"), (dead, "timed_out")]


# --- the schedule ------------------------------------------------------------


def test_forget_takes_a_connection_out_of_everything_and_cancels_its_timers() -> None:
    """Schedule: closing a connection leaves it in no list, not watched,
    and every timer it had cancelled (none runs later)."""
    parts = Parts()
    schedule = parts.schedule
    conn, _ = parts.connect()
    ran: list[str] = []
    schedule.start_timer(conn, REGISTRATION, 5, lambda: ran.append("registration"))
    schedule.start_timer(conn, HANDSHAKE, 1, lambda: ran.append("handshake"))
    schedule.has_lines(conn)
    schedule.holds_input(conn)
    schedule.flush_later(conn)
    schedule.close_later(conn, "client_closed")
    schedule.hold(conn)
    assert sorted(schedule.timers_of(conn)) == [HANDSHAKE, REGISTRATION]
    schedule.forget(conn)
    assert schedule.round() == [] and not schedule.has_work()
    assert schedule.take_unseen_input() == [] and schedule.take_flush() == []
    assert schedule.take_closing() == [] and schedule.held() == []
    assert schedule.events(conn) == 0 and schedule.timers_of(conn) == []
    parts.clock.advance(10)
    parts.timers.run_due()
    assert ran == []
    assert parts.timers.next_due() is None


def test_what_is_taken_from_the_schedule_is_taken_once() -> None:
    """Schedule: the connections to flush, to read again and to close are
    handed out once; marked again meanwhile, they come next time."""
    parts = Parts()
    schedule = parts.schedule
    conn, _ = parts.connect()
    schedule.flush_later(conn)
    schedule.holds_input(conn)
    schedule.close_later(conn, "slow_consumer")
    assert schedule.has_work()
    assert schedule.take_flush() == [conn] and schedule.take_flush() == []
    assert schedule.take_unseen_input() == [conn] and schedule.take_unseen_input() == []
    assert schedule.take_closing() == [(conn, "slow_consumer")] and schedule.take_closing() == []
    assert not schedule.has_work()


def test_a_timer_that_ran_is_no_longer_the_connections() -> None:
    """Schedule: a connection's timer runs once when due, and is then gone."""
    parts = Parts()
    conn, _ = parts.connect()
    ran: list[str] = []
    parts.schedule.start_timer(conn, REGISTRATION, 5, lambda: ran.append("expired"))
    parts.clock.advance(4.9)
    parts.timers.run_due()
    assert ran == [] and parts.schedule.timers_of(conn) == [REGISTRATION]
    parts.clock.advance(0.1)
    parts.timers.run_due()
    assert ran == ["expired"] and parts.schedule.timers_of(conn) == []
    assert not parts.schedule.cancel_timer(conn, REGISTRATION)


def test_the_round_keeps_its_order_and_sends_the_processed_to_the_back() -> None:
    """Schedule: connections with lines are taken in the order they came;
    one put back goes to the back."""
    parts = Parts()
    schedule = parts.schedule
    first, second, third = (parts.connect()[0] for _ in range(3))
    for conn in (first, second, third):
        schedule.has_lines(conn)
    schedule.has_lines(first)  # already in: keeps its place
    assert schedule.round() == [first, second, third]
    assert schedule.take_turn(first) and not schedule.take_turn(first)
    schedule.has_lines(first)
    assert schedule.round() == [second, third, first]


@pytest.mark.parametrize(
    ("held", "wants_write", "events"),
    [
        (False, False, EVENT_READ),
        (False, True, EVENT_READ | EVENT_WRITE),
        (True, True, EVENT_WRITE),
        (True, False, 0),
    ],
)
def test_watch_asks_for_reading_unless_held_and_writing_while_output_is_left(
    held: bool, wants_write: bool, events: int
) -> None:
    """Schedule: a held connection is not watched for reading; one with
    output left is watched for writing; with neither, not at all."""
    parts = Parts()
    conn, _ = parts.connect()
    if held:
        parts.schedule.hold(conn)
    conn.wants_write = wants_write
    parts.schedule.watch(conn)
    assert parts.schedule.events(conn) == events
    parts.schedule.release(conn)
    conn.wants_write = False
    parts.schedule.watch(conn)  # registered again if it was dropped
    assert parts.schedule.events(conn) == EVENT_READ


def test_a_kind_not_ready_for_output_is_not_watched_for_writing() -> None:
    """Schedule: output waits while the kind is not ready (a handshake),
    but the transport's own pending output is always watched for."""

    class Handshaking(Kind):
        pending = False

        def ready(self, conn: Connection) -> bool:
            return False

        def pending_output(self, conn: Connection) -> bool:
            return self.pending

    parts = Parts()
    conn, _ = parts.connect()
    kind = Handshaking()
    conn.kind = kind
    conn.wants_write = True
    parts.schedule.watch(conn)
    assert parts.schedule.events(conn) == EVENT_READ
    kind.pending = True
    parts.schedule.watch(conn)
    assert parts.schedule.events(conn) == EVENT_READ | EVENT_WRITE
