"""One flooder costs nobody their connection (PROTOCOL.md, "Limits and
failures" and "Flood control").

Backpressure: a sender is not read faster than the members that are
reading can drain, so a burst of input (a flooder's backlog, piled up in
the kernel while the server was busy) cannot push an honest reader over
the output limit; a member that stops reading holds nobody back for
longer than output.PROGRESS_WINDOW and is closed as a slow consumer as
before.

Every test drives one in-process server with a fake clock: time moves
only when a test says so, and a reader reads only as much as the test lets
it, so "slow but reading" is exact, not a matter of machine load.
"""

from __future__ import annotations

import contextlib
import selectors
import time
from collections.abc import Iterator

import pytest

import chat
import output
from conftest import TIMEOUT, FakeClock, Pumped, receive, send_line
from connection import Connection
from fakes import FakeTransport
from output import Outbox

# Small limits keep the bursts small: the rule does not depend on the size.
OUTPUT_LIMIT = 64 * 1024
LINE = b"x" * 1000  # a 1 KiB flood line, as in the load


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(clock: FakeClock) -> Iterator[chat.ChatServer]:
    server = chat.ChatServer("127.0.0.1", 0, output_limit=OUTPUT_LIMIT, clock=clock)
    try:
        yield server
    finally:
        server.close()


def flood(count: int) -> bytes:
    return b"".join(send_line(b"%d " % number + LINE) for number in range(count))


def flood_received(count: int) -> bytes:
    return b"".join(receive("flooder", b"%d " % number + LINE) + b"\n" for number in range(count))


def member(server: chat.ChatServer, name: str, rcvbuf: int | None = None) -> Pumped:
    client = Pumped(server, rcvbuf=rcvbuf)
    client.register(name)
    return client


def feed(
    server: chat.ChatServer,
    clock: FakeClock,
    flooder: Pumped,
    data: bytes,
    reader: Pumped,
    until: bytes,
    read_per_turn: int,
) -> None:
    """The flooder hands the kernel what it takes of `data` (its backlog
    piles up there, as when the server was busy), while `reader` reads at
    most `read_per_turn` bytes a turn, a millisecond of fake time apart,
    until it has `until` or is closed."""
    view = memoryview(data)
    deadline = time.monotonic() + 4 * TIMEOUT
    while not reader.eof and len(reader.buffer) < len(until):
        assert time.monotonic() < deadline, "gave up: the flood did not get through"
        while view:
            try:
                view = view[flooder.sock.send(view) :]
            except BlockingIOError:
                break
        server.run_once(max_wait=0.001)
        reader.take_available(read_per_turn)
        clock.advance(0.001)


def test_a_slow_but_reading_member_survives_a_burst(
    server: chat.ChatServer, clock: FakeClock
) -> None:
    """Backpressure: a member that reads a little every turn gets a 1 MiB burst
    (16 x its output limit) whole and in order, and is never closed."""
    reader = member(server, "reader", rcvbuf=4096)
    flooder = member(server, "flooder")
    count = 1024
    expected = flood_received(count)
    feed(server, clock, flooder, flood(count), reader, expected, read_per_turn=4096)
    assert not reader.eof, f"closed after {len(reader.buffer)} of {len(expected)} bytes"
    assert reader.buffer == expected
    assert server.open_count == 2


def test_a_member_that_stops_reading_holds_nobody_back(
    server: chat.ChatServer, clock: FakeClock
) -> None:
    """Backpressure: a member that never reads is closed as a slow consumer
    (it cannot hold the room back past the progress window), while a reading
    member beside it gets the whole burst."""
    stuck = member(server, "stuck", rcvbuf=4096)
    reader = member(server, "reader", rcvbuf=4096)
    flooder = member(server, "flooder")
    count = 1024
    expected = flood_received(count)
    started = clock.now
    feed(server, clock, flooder, flood(count), reader, expected, read_per_turn=64 * 1024)
    assert reader.buffer == expected
    assert server.open_count == 2  # the stuck member is gone
    taken = stuck.read_to_eof()  # what its kernel buffers held: the start, no gap
    assert 0 < len(taken) < len(expected)
    assert expected.startswith(taken)
    # The room waited for it at most one progress window, not per line.
    assert clock.now - started < 2 * output.PROGRESS_WINDOW + 1


def test_holding_back_input_leaves_select_nothing_to_spin_on(
    server: chat.ChatServer, clock: FakeClock
) -> None:
    """Backpressure: while a reading member is over the high water mark, a
    sender with input waiting is not watched for reading (a readable socket
    nobody reads would make select spin), select waits although the sender
    has lines left, and reading resumes once the member drains."""
    reader = member(server, "reader", rcvbuf=4096)
    flooder = member(server, "flooder")
    sender = server_end(server, flooder)
    count = 2048
    pending = memoryview(flood(count))
    for _ in range(10_000):
        with contextlib.suppress(BlockingIOError):
            pending = pending[flooder.sock.send(pending) :]
        server.run_once(max_wait=0.001)
        reader.take_available(1024)  # reading, more slowly than the flood
        if server.view.events(sender) == 0:
            break
    else:
        raise AssertionError("the sender was never held back")
    assert sender.backlog() > 0  # lines left to process: the round is not empty
    assert all(tag is not sender for tag, _ in server.view.ready_now())
    timeout = server.view.select_timeout()
    assert timeout is not None and timeout > 0
    feed(server, clock, flooder, bytes(pending), reader, flood_received(count), 1 << 20)
    assert reader.buffer == flood_received(count)
    assert server.view.events(sender) == selectors.EVENT_READ


def server_end(server: chat.ChatServer, client: Pumped) -> Connection:
    """The server's connection of `client`."""
    port = client.sock.getsockname()[1]
    for conn in server.view.connections():
        if conn.peer.endswith(f":{port}"):
            return conn
    raise AssertionError("no such connection")


def test_the_old_way_loses_the_reader_without_backpressure(
    server: chat.ChatServer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The burst above is a real threat: with the progress window at zero (no
    backpressure) the same slow reader is closed as a slow consumer."""
    monkeypatch.setattr(output, "PROGRESS_WINDOW", 0.0)
    reader = member(server, "reader", rcvbuf=4096)
    flooder = member(server, "flooder")
    count = 1024
    feed(server, clock, flooder, flood(count), reader, flood_received(count), 4096)
    assert reader.eof
    assert len(reader.buffer) < len(flood_received(count))


# --- The rule itself, without sockets (output.Outbox) ------------------------


def test_a_member_over_the_mark_holds_input_back_while_it_drains() -> None:
    """Backpressure: a member that drained a step's worth since its output
    began to queue holds the room's input back when it passes the high water
    mark, for a window from when its output last shrank, and for another each
    time it drains a step more; a trickle earns nothing; under the mark it
    holds nothing."""
    mark = 64_000
    outbox = Outbox(budget=1 << 30, high_water=mark)
    step = outbox.progress_step
    reader = Connection(FakeTransport(), "reader")
    window = output.PROGRESS_WINDOW
    outbox.queue(reader, b"x" * mark, now=10.0)
    outbox.took(reader, step, now=10.05)  # it reads
    outbox.queue(reader, b"x" * step, now=10.06)
    assert outbox.holding_back_until(10.06) is None  # at the mark, not over it
    outbox.queue(reader, b"x" * 2 * step, now=10.1)
    assert outbox.holding_back_until(10.1) == 10.05 + window  # shrank last at 10.05
    outbox.took(reader, step - 1, now=10.12)  # not quite a step
    assert outbox.holding_back_until(10.12) == 10.05 + window
    outbox.took(reader, 1, now=10.15)  # a step in all: a new window
    assert outbox.holding_back_until(10.15) == 10.15 + window
    outbox.took(reader, 10, now=10.16)  # a trickle earns nothing
    assert outbox.holding_back_until(10.16) == 10.15 + window
    assert outbox.holding_back_until(10.15 + window) is None  # lapsed: it stopped
    outbox.took(reader, step, now=10.5)  # under the mark again
    assert outbox.holding_back_until(10.5) is None
    outbox.queue(reader, b"x" * step, now=10.6)  # over it, having shrunk at 10.5
    assert outbox.holding_back_until(10.6) == 10.5 + window


def test_a_member_that_only_trickles_over_the_mark_holds_nothing_back() -> None:
    """Backpressure: a member that passed the mark with nothing drained (it
    stopped reading) holds nothing back, nor when the kernel then takes a
    crack of its output now and then."""
    outbox = Outbox(budget=1 << 30, high_water=64_000)
    stuck = Connection(FakeTransport(), "stuck")
    outbox.queue(stuck, b"x" * 60_000, now=0.0)
    outbox.queue(stuck, b"x" * 10_000, now=0.01)
    assert outbox.holding_back_until(0.01) is None
    for turn in range(1, 10):
        outbox.took(stuck, 4096, now=0.01 * turn)  # the kernel opens a crack
        assert outbox.holding_back_until(0.01 * turn) is None


def test_a_member_that_never_drained_holds_nothing_back() -> None:
    """Backpressure: a member whose output last shrank more than a window ago
    (a client that stopped reading) holds nothing back when it passes the
    mark, nor as its output keeps growing."""
    outbox = Outbox(budget=1 << 30, high_water=1000)
    stuck = Connection(FakeTransport(), "stuck")
    outbox.queue(stuck, b"x" * 500, now=0.0)
    for turn in range(1, 50):
        outbox.queue(stuck, b"x" * 500, now=turn * 1.0)
        assert outbox.holding_back_until(turn * 1.0) is None
