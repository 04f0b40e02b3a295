"""The write path, step 5 of a turn: the room's batch to every member, in
one send each, and what each connection has queued; the `Outbox` that
counts unsent output against --output-budget; the slow consumers closed
for it; and backpressure, which holds the room's input back while a
member that is reading is over the high water mark (PROGRESS_WINDOW).
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable, Collection
from itertools import accumulate
from typing import Final, NamedTuple, cast

from connection import Close, Connection, Schedule, error_reason
from host import watch_writes_while
from metrics import Stats
from room import Batch, Room
from timers import Timer, Timers

# PROTOCOL.md, "Limits and failures": unsent output above this closes the
# connection as a slow consumer.
DEFAULT_OUTPUT_LIMIT: Final = 1 << 20
# All connections' unsent output together (--output-budget).
DEFAULT_OUTPUT_BUDGET: Final = 256 << 20
# Unsent output that has not shrunk for this long closes the connection as a
# slow consumer; checked every STALL_CHECK seconds while anyone has some.
STALL_TIMEOUT: Final = 60.0
STALL_CHECK: Final = 5.0
# Once this many bytes of RECEIVE lines are batched (or an eighth of the
# output limit, if less), the turn stops processing and flushes, so neither
# the batch nor a turn grows without bound when many connections send at
# once, and one turn cannot take a reader from under the high water mark
# (PROGRESS_WINDOW, below) to over the output limit.
BATCH_BYTES: Final = 256 * 1024


def high_water(output_limit: int) -> int:
    """Backpressure's mark (PROGRESS_WINDOW), for this output limit: six
    turns' worth (`turn_bytes`) under the limit, so that a member that reads
    has six turns to show it before it is cut."""
    return output_limit // 4


def turn_bytes(output_limit: int) -> int:
    """What one turn may batch, for this output limit."""
    return max(4096, min(BATCH_BYTES, output_limit // 8))


# Backpressure (PROTOCOL.md, "Limits and failures": one flooder costs
# nobody their connection): while a member that is reading holds more than
# a quarter of the output limit unsent (the high water mark), the room reads
# and processes no input, so no sender is read faster than the readers
# drain. A member counts as reading for PROGRESS_WINDOW seconds: when it
# passes the mark, if the kernel took an eighth of the mark of its output
# since it began to queue, some of it lately; and again for every such step
# it drains while over the mark. One that stopped, or that
# lets a few bytes through now and then (a full window that the kernel
# opens a crack), holds nobody back for longer, and is closed by the
# slow-consumer rules as before.
PROGRESS_WINDOW: Final = 0.2

log = logging.getLogger("chat")


class Outbox:
    """Every connection's unsent output, counted where it is queued and where
    the kernel takes it: the total, against --output-budget, and since when
    each connection's output has not shrunk. Only connections that have
    output are ever looked at, and only when the budget is passed or a
    stall check is due."""

    def __init__(self, budget: int, high_water: int) -> None:
        self.budget = budget
        self.high_water = high_water  # see PROGRESS_WINDOW
        self.total = 0  # unsent bytes
        # Memory the buffers hold, which the budget bounds: a bytearray
        # keeps room to grow, and keeps its size when its front is sent,
        # until it is half empty; counted as unsent bytes only, 2,000 slow
        # consumers held a fifth more than the budget.
        self.held = 0
        self._shrank_at: dict[Connection, float] = {}
        # The connections over the high water mark: how much each had
        # unsent when it last earned a window, and until when it counts as
        # reading; the windows that are open on a heap, earliest first,
        # whose stale entries go when they come up. Only connections over
        # the mark are ever looked at, and only when their output moves.
        self._over_mark: dict[Connection, tuple[int, float]] = {}
        # Bytes the kernel took of each queue since it formed.
        self._drained: dict[Connection, int] = {}
        self._windows: list[tuple[float, int, Connection]] = []
        self._order = itertools.count()

    def __bool__(self) -> bool:
        return bool(self._shrank_at)

    def holding_back_until(self, now: float) -> float | None:
        """While a member that is reading is over the high water mark: until
        when it counts as reading at the latest (it may drain sooner); else
        None."""
        windows = self._windows
        over_mark = self._over_mark
        while windows:
            until, _, conn = windows[0]
            if until > now and conn in over_mark and over_mark[conn][1] == until:
                return until
            heapq.heappop(windows)  # lapsed, or replaced, or under the mark
        return None

    @property
    def progress_step(self) -> int:
        """What a member must drain to count as reading (PROGRESS_WINDOW)."""
        return max(1, self.high_water // 8)

    def _open_window(self, conn: Connection, unsent: int, until: float, now: float) -> None:
        """`conn` is over the mark with `unsent` bytes, reading until `until`
        (none of it if that is not after `now`)."""
        self._over_mark[conn] = (unsent, until)
        if until > now:
            heapq.heappush(self._windows, (until, next(self._order), conn))

    def queue(self, conn: Connection, data: bytes | memoryview, now: float) -> None:
        """Output for `conn`, behind what it has unsent already."""
        out = conn.out
        if out is None:
            out = conn.out = bytearray(data)
            self._shrank_at[conn] = now
            self.held += out.__sizeof__()
        else:
            before = out.__sizeof__()
            out += data
            self.held += out.__sizeof__() - before
            if len(out) > self.high_water and conn not in self._over_mark:
                # Reading as of the last time its output shrank, if it has
                # drained a step since it began to queue: a client that
                # stopped reading passes the mark with nothing drained but
                # the cracks its kernel opens now and then.
                reading = self._drained.get(conn, 0) >= self.progress_step
                until = self._shrank_at[conn] + PROGRESS_WINDOW if reading else now
                self._open_window(conn, len(out), until, now)
        self.total += len(data)

    def took(self, conn: Connection, sent: int, now: float) -> None:
        """The kernel took `sent` bytes of `conn`'s output."""
        out = conn.out
        if out is not None and sent:
            before = out.__sizeof__()
            del out[:sent]  # bytearray drops a prefix without moving the rest
            self.held += out.__sizeof__() - before
            self.total -= sent
            self._shrank_at[conn] = now
            self._drained[conn] = self._drained.get(conn, 0) + sent
            over_mark = self._over_mark.get(conn)
            if over_mark is None:
                return
            if len(out) <= self.high_water:
                del self._over_mark[conn]
            elif len(out) <= over_mark[0] - self.progress_step:
                self._open_window(conn, len(out), now + PROGRESS_WINDOW, now)  # it reads

    def drop(self, conn: Connection) -> None:
        """`conn`'s output is gone (sent, or its connection closing)."""
        if conn.out is not None:
            self.total -= len(conn.out)
            self.held -= conn.out.__sizeof__()
            conn.out = None  # and its memory with it
            del self._shrank_at[conn]
            self._over_mark.pop(conn, None)
            self._drained.pop(conn, None)

    @property
    def over_budget(self) -> bool:
        return self.held > self.budget

    def shed(self) -> list[Connection]:
        """Drop the output of the connections holding the most, largest
        first, until the rest fits the budget; those connections."""
        largest_first = sorted(self._shrank_at, key=lambda conn: len(conn.out or b""), reverse=True)
        shed = []
        for conn in largest_first:
            if self.held <= self.budget:
                break
            self.drop(conn)
            shed.append(conn)
        return shed

    def stalled(self, now: float, after: float) -> list[Connection]:
        """Connections whose output has not shrunk for `after` seconds."""
        return [conn for conn, when in self._shrank_at.items() if now - when >= after]


class Wire(NamedTuple):
    """A wire format of the turn's lines (Writer.add_wire)."""

    frame_lines: Callable[[list[bytes]], bytes]
    frame_offsets: Callable[[list[bytes]], list[int]]


def _line_offsets(lines: list[bytes]) -> list[int]:
    """Where each line starts in the lines joined, and where the last ends."""
    return list(accumulate(map(len, lines), initial=0))


class Writer:
    """The write path, step 5 of a turn: the room's batch to every member,
    one send each; output queued for one connection (`send_later`), sent
    at the end of the turn behind what it has unsent already; write
    interest while, and only while, something is left; and the slow
    consumers closed for it: over --output-limit, over --output-budget
    (the largest first), or with output that stopped moving.

    The turn's lines go out in each wire format once (`add_wire`): joined
    as they are for plain and TLS members, or framed by a transport that
    frames them otherwise; every member of one format gets the same bytes
    object."""

    def __init__(
        self,
        schedule: Schedule,
        timers: Timers,
        stats: Stats,
        close: Close,
        *,
        output_limit: int,
        output_budget: int,
    ) -> None:
        self.output_limit = output_limit
        self.outbox = Outbox(output_budget, high_water(output_limit))
        # What one turn may batch (see BATCH_BYTES).
        self.turn_bytes = turn_bytes(output_limit)
        self._schedule = schedule
        self._timers = timers
        self._stats = stats
        self._close = close
        self._stall_check: Timer | None = None
        # The wire formats: how each makes the turn's bytes from its lines,
        # and where each line starts in them (for a member's own copy).
        self._wires: list[Wire] = [Wire(b"".join, _line_offsets)]

    def add_wire(
        self,
        frame_lines: Callable[[list[bytes]], bytes],
        frame_offsets: Callable[[list[bytes]], list[int]],
    ) -> int:
        """A wire format: `frame_lines` makes the turn's bytes from its
        lines, once per turn, and `frame_offsets` where each line starts in
        them (and where the last ends); the index for `Connection.wire`."""
        self._wires.append(Wire(frame_lines, frame_offsets))
        return len(self._wires) - 1

    def apply_limits(self, output_limit: int | None, output_budget: int | None) -> None:
        """New limits (None: unchanged), from the next write on."""
        if output_limit is not None:
            self.output_limit = output_limit
            self.outbox.high_water = high_water(output_limit)
            self.turn_bytes = turn_bytes(output_limit)
        if output_budget is not None:
            self.outbox.budget = output_budget

    def send_later(self, conn: Connection, data: bytes) -> None:
        """Output for `conn` (whole lines), sent at the end of this turn."""
        frame = conn.kind.frame
        self.queue(conn, data if frame is None else frame(data))
        self._schedule.flush_later(conn)

    def queue(self, conn: Connection, data: bytes | memoryview) -> None:
        """Output for `conn` behind what it has unsent already, on the wire."""
        now = self._timers.turn_time
        self.outbox.queue(conn, data, now)
        if self._stall_check is None:
            self._stall_check = self._timers.call_at(now + STALL_CHECK, self._close_stalled)

    def flush(self, room: Room) -> None:
        """The turn's output: the batch to the members, then every
        connection with output of its own."""
        batch = room.batch
        if batch.lines:
            self._deliver(batch, cast("Collection[Connection]", room.members))
            batch.clear()
        for conn in self._schedule.take_flush():
            if conn.closed:
                continue
            if conn.out:
                self._send_buffered(conn)
            else:
                self._flush_transport(conn)  # writable: its own output left
        if self.outbox.over_budget:
            for conn in self._over_budget():
                self._close(conn, "memory_budget", "")

    def _deliver(self, batch: Batch, members: Collection[Connection]) -> None:
        """Hand the turn's batch to every member, in one send each where the
        member has nothing queued already."""
        lines = batch.lines
        wires = self._wires
        # Each wire format's bytes for the turn, made when its first member
        # needs them: a web port nobody uses costs the turn nothing.
        framed: list[bytes | None] = [None] * len(wires)
        needs_own_copy = batch.needs_own_copy()
        # Per wire format, made when a member of it first needs its own copy:
        # the turn's bytes as a view, and where each line starts in them.
        cut_from: dict[int, tuple[memoryview, list[int]]] = {}
        flush_later = self._schedule.flush_later
        self._count_deliveries(batch, len(members))
        backed_up: list[Connection] = []
        # Over the budget mid-broadcast: these are dropped now (their output
        # with them) and closed after it, as the room must not change during
        # it; meanwhile they get nothing more: a client never sees a gap.
        shed: set[Connection] = set()
        failed: dict[Connection, OSError] = {}
        outbox = self.outbox
        sent_total = 0
        for conn in members:
            data = framed[conn.wire]
            if data is None:
                data = framed[conn.wire] = wires[conn.wire].frame_lines(lines)
            if conn in needs_own_copy:
                wire = conn.wire
                if wire not in cut_from:
                    cut_from[wire] = (memoryview(data), wires[wire].frame_offsets(lines))
                data = batch.copy_for(conn, *cut_from[wire], conn.kind.frame)
                if not data:
                    continue
            if conn.out:
                self.queue(conn, data)  # behind what is queued; sent by flush
                flush_later(conn)
            else:
                if shed and conn in shed:
                    continue  # its backlog is gone: no lines after a gap
                try:
                    sent = conn.sock.send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as error:
                    # Closed after the loop, for this error: the kernel
                    # reports it once (a dead peer's ETIMEDOUT), and any
                    # later call would only say EPIPE.
                    failed[conn] = error
                    continue
                sent_total += sent
                if sent == len(data):
                    continue
                self.queue(conn, memoryview(data)[sent:])
                backed_up.append(conn)
            if outbox.over_budget:
                shed.update(self._over_budget())
        self._stats.bytes_sent += sent_total
        # Not during the loop above: closing a slow consumer changes the room.
        for conn in shed:
            self._close(conn, "memory_budget", "")
        for conn, failure in failed.items():
            self._close(conn, *error_reason(conn, failure))
        for conn in backed_up:
            if not conn.closed:
                self._settle(conn)

    def _count_deliveries(self, batch: Batch, members: int) -> None:
        """RECEIVE lines the batch hands to members: every line to every
        member, but none of its own, nor any before it joined."""
        count = len(batch.lines) * members
        count -= sum(len(own) for sender, own in batch.own.items() if not sender.closed)
        count -= sum(batch.joined_at.values())
        self._stats.deliveries += count

    def _send_buffered(self, conn: Connection) -> None:
        """One send of what `conn` has queued."""
        out = conn.out
        if out is None:
            return
        try:
            sent = conn.sock.send(out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as error:
            self._close(conn, *error_reason(conn, error))
            return
        self.outbox.took(conn, sent, self._timers.turn_time)
        self._stats.bytes_sent += sent
        self._settle(conn)

    def _flush_transport(self, conn: Connection) -> None:
        try:
            conn.kind.flush(conn)
        except OSError as error:
            self._close(conn, *error_reason(conn, error))

    def _settle(self, conn: Connection) -> None:
        """After a send: close `conn` as a slow consumer if what it left
        unsent is over the limit, else watch for writability while (and
        only while) something is left."""
        unsent = 0 if conn.out is None else len(conn.out)
        if unsent > self.output_limit:
            log.warning(
                "%r is a slow consumer: %d bytes unsent (limit %d); closing it",
                conn,
                unsent,
                self.output_limit,
            )
            self._close(conn, "slow_consumer", "")
            return
        if not unsent:
            self.outbox.drop(conn)
        watch_writes_while(conn, unsent > 0, self._schedule.watch)

    def _over_budget(self) -> list[Connection]:
        """Over --output-budget: the connections to close, their output
        dropped already."""
        log.warning(
            "%d bytes of output buffers in all, over the output budget of %d: closing "
            "the largest slow consumers",
            self.outbox.held,
            self.outbox.budget,
        )
        return self.outbox.shed()

    def _close_stalled(self) -> None:
        """Timer: close the connections whose unsent output has not shrunk
        for STALL_TIMEOUT."""
        now = self._timers.clock()
        for conn in self.outbox.stalled(now, STALL_TIMEOUT):
            log.warning("%r is a slow consumer: no output taken for %g s", conn, STALL_TIMEOUT)
            self._close(conn, "slow_consumer", "")
        self._stall_check = None
        if self.outbox:
            self._stall_check = self._timers.call_at(now + STALL_CHECK, self._close_stalled)
