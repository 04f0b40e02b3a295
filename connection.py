"""A connection and its I/O: what the loop does with one client's bytes.

`Connection` is one client: its transport, its buffers and its place in
the room. Its transport is a plain socket as it is, or an object with the
same four calls (tls.TLSTransport); what the loop must know beyond those
calls its `Kind` says (ready for output yet? output or input of its own
that select cannot see? telnet? framing?), one object per kind of
transport, so the read path, the write path and the room never branch
on the kind, and adding one touches only the transport and the door.

`Schedule` is the one owner of every connection's place in the turns:
lines to process (round robin), input select cannot see, output to flush
this turn, a close pending with its reason, a hold by the room, a wait
for a token (flood control), what the selector watches, and the
connection's timers, which `forget` cancels when it closes. The others
ask it; none keeps a list of its own.

`Reader` is the read path (step 2 of a turn), `Writer` the write path
(step 5) with the `Outbox` that counts unsent output against the budget.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable, Collection
from functools import partial
from itertools import accumulate
from selectors import EVENT_READ, EVENT_WRITE, BaseSelector
from typing import Final, Protocol, cast

import flood
import protocol
from host import Member, watch_writes_while
from metrics import Stats
from room import NO_KEYS, Batch, Room
from timers import Timer, Timers

# PROTOCOL.md, "Limits and failures": unsent output above this closes the
# connection as a slow consumer.
DEFAULT_OUTPUT_LIMIT: Final = 1 << 20
# All connections' unsent output together (--output-budget).
DEFAULT_OUTPUT_BUDGET: Final = 256 << 20
# One recv per ready connection per turn, of at most this much: a flooder
# gets the same share of a turn as everybody else.
READ_SIZE: Final = 64 * 1024
# Lines processed per connection per turn. A 64 KiB read holds up to 64 Ki
# lines; processing them all while 1,000 members wait would stall the room.
LINES_PER_TURN: Final = 512
# Unsent output that has not shrunk for this long closes the connection as a
# slow consumer; checked every STALL_CHECK seconds while anyone has some.
STALL_TIMEOUT: Final = 60.0
STALL_CHECK: Final = 5.0

log = logging.getLogger("chat")


class Transport(Protocol):
    """Where a connection's bytes are read and written: a plain socket is
    one as it is. Errors are those of socket: BlockingIOError means later,
    any other OSError ends the connection."""

    def fileno(self) -> int: ...
    def recv(self, size: int, /) -> bytes: ...
    def send(self, data: bytes | bytearray | memoryview, /) -> int: ...
    def close(self) -> None: ...


class Kind:
    """A kind of transport, as the loop sees it: this one is a plain
    socket's (the transport is the socket, which needs nothing more), and
    a transport that needs more subclasses it. One object per kind, shared
    by its connections: asking it costs no object per connection."""

    # How its connections appear in the log line of their arrival.
    arrival = ""
    # Whether protocol.receive looks for telnet commands in its input (no,
    # for a transport whose `recv` hands out lines already).
    telnet = True
    # Frames output queued for one connection (replies, telnet answers, a
    # member's own copy of the turn): None for bytes as they are.
    frame: Callable[[bytes], bytes] | None = None

    def ready(self, conn: Connection) -> bool:
        """Whether output may be sent (a handshake first, for some)."""
        return True

    def failed_before_ready(self, conn: Connection, error: OSError) -> tuple[str, str]:
        """Why an error before `ready` closes it: a close reason and detail."""
        return "reset", error.strerror or str(error)

    def pending_output(self, conn: Connection) -> bool:
        """Whether the transport has output of its own for the kernel."""
        return False

    def holds_input(self, conn: Connection) -> bool:
        """Whether the transport holds input select cannot see."""
        return False

    def flush(self, conn: Connection) -> None:
        """The socket is writable: send the transport's own output."""


PLAIN: Final = Kind()
# The index in `Writer`'s wire formats of the turn's lines joined as they are.
PLAIN_WIRE: Final = 0


class Connection:
    """One client: its transport, its buffers and its place in the room."""

    __slots__ = (
        "sock",
        "kind",
        "wire",
        "peer",
        "name",
        "keys",
        "receive_prefix",
        "partial",
        "discarding",
        "lines",
        "next_line",
        "out",
        "wants_write",
        "at_eof",
        "closed",
        "address_key",
        "telnet",
        "next_token",
    )

    def __init__(
        self,
        sock: Transport,
        peer: str,
        address_key: str | None = None,
        kind: Kind = PLAIN,
        wire: int = PLAIN_WIRE,
    ) -> None:
        self.sock = sock
        self.kind = kind
        # Which of the turn's wire formats it gets (see Writer.add_wire).
        self.wire = wire
        self.peer = peer
        # What --max-per-address counts it under; None if not counted.
        self.address_key = address_key
        # The room's (room.Member): the name, its keys, its RECEIVE prefix.
        self.name: str | None = None
        self.keys = NO_KEYS
        self.receive_prefix = b""
        # Framing state, as protocol.receive hands it back; `telnet` stays
        # None unless the client speaks telnet (sends an IAC byte).
        self.partial = b""
        self.discarding = False
        self.telnet: protocol.TelnetState | None = None
        # Received lines not processed yet: lines[next_line:]. None rather
        # than an empty list, and `out` None rather than an empty bytearray,
        # to keep idle connections small: 10,000 of them are expected.
        self.lines: list[bytes] | None = None
        self.next_line = 0
        self.out: bytearray | None = None  # output the kernel has not taken yet
        self.wants_write = False  # registered for EVENT_WRITE for `out`
        self.at_eof = False  # the client sent end of input
        self.closed = False
        # Its token bucket (flood.take) under --send-rate: when its next
        # SEND may go. The shared FULL until it sends, so that it costs no
        # object, with flood control off or on.
        self.next_token = flood.FULL

    def backlog(self) -> int:
        return 0 if self.lines is None else len(self.lines) - self.next_line

    def enqueue_lines(self, lines: list[bytes]) -> None:
        if self.lines is None:
            self.lines = lines
        else:
            self.lines = self.lines[self.next_line :] + lines
            self.next_line = 0

    def __repr__(self) -> str:
        who = f" {self.name!r}" if self.name is not None else ""
        return f"<fd {self.sock.fileno()} {self.peer}{who}>"


def error_reason(conn: Connection, error: OSError) -> tuple[str, str]:
    """Why an error of `conn`'s transport closes it: one of CLOSE_REASONS,
    and the detail for the log."""
    if not conn.kind.ready(conn):
        return conn.kind.failed_before_ready(conn, error)
    if error.errno == errno.ETIMEDOUT:  # keepalive or TCP_USER_TIMEOUT
        return "timed_out", ""
    return "reset", error.strerror or str(error)


# Closes a connection now: reason (one of CLOSE_REASONS) and detail.
Close = Callable[[Connection, str, str], None]

# A connection's timers, by what they time: one of each at most.
REGISTRATION: Final = "registration"  # --register-timeout
HANDSHAKE: Final = "handshake"  # a TLS handshake's deadline
TOKEN: Final = "token"  # a throttled connection's next token (--send-rate)


class Schedule:
    """Every connection's place in the loop's turns, in one object: lines
    to process (round robin), input select cannot see, output to flush at
    the end of the turn, a close pending and its reason, a hold by the
    room, a wait for a token, what the selector watches it for, and its
    timers. Only connections in one of those are in its containers, never
    a scan of all; `forget` takes a closing connection out of every one
    and cancels its timers."""

    def __init__(self, selector: BaseSelector, timers: Timers) -> None:
        self._selector = selector
        self._timers = timers
        self._busy: dict[Connection, None] = {}  # insertion order: the round
        self._unseen_input: dict[Connection, None] = {}
        self._to_flush: set[Connection] = set()
        self._closing: dict[Connection, str] = {}
        # Held by the room (its USERNAME awaits Redis), so its later lines
        # wait too: not read meanwhile, and off the busy list. Maybe not in
        # the selector either: closed from here at shutdown.
        self._held: set[Connection] = set()
        # Waiting for a token (flood control), since when: neither read nor
        # processed, off the busy list and maybe out of the selector too;
        # and those that waited once, whose waits are not logged again.
        self._throttled: dict[Connection, float] = {}
        self._waited: set[Connection] = set()
        self._deadlines: dict[str, dict[Connection, Timer]] = {}
        # Bound once: the write path marks every backed-up member with it.
        self.flush_later: Callable[[Connection], None] = self._to_flush.add

    # --- lines to process -------------------------------------------------

    def has_lines(self, conn: Connection) -> None:
        """`conn` has lines to process: in the round, at the back if new."""
        self._busy[conn] = None

    def round(self) -> list[Connection]:
        """The connections with lines to process, in turn order."""
        return list(self._busy)

    def take_turn(self, conn: Connection) -> bool:
        """`conn` is processed now: out of the round (it comes back, at the
        back, through `has_lines`); whether it was in it."""
        return self._busy.pop(conn, 0) is None

    def has_work(self) -> bool:
        """Whether the next turn must not wait in select."""
        return bool(self._busy or self._unseen_input)

    # --- input select cannot see ---------------------------------------------

    def holds_input(self, conn: Connection) -> None:
        """`conn`'s transport holds input: read it next turn without waiting."""
        self._unseen_input[conn] = None

    def take_unseen_input(self) -> list[Connection]:
        unseen = list(self._unseen_input)
        self._unseen_input.clear()
        return unseen

    # --- output --------------------------------------------------------------

    def take_flush(self) -> list[Connection]:
        """The connections to send to now; what is marked meanwhile waits
        for the next flush."""
        to_flush = list(self._to_flush)
        self._to_flush.clear()
        return to_flush

    # --- closing -------------------------------------------------------------

    def close_later(self, conn: Connection, reason: str) -> None:
        """Close `conn` at the end of the turn, for `reason`."""
        self._closing[conn] = reason

    def closing(self, conn: Connection) -> bool:
        return conn in self._closing

    def take_closing(self) -> list[tuple[Connection, str]]:
        closing = list(self._closing.items())
        self._closing.clear()
        return closing

    # --- holds -----------------------------------------------------------

    def hold(self, conn: Connection) -> None:
        self._held.add(conn)

    def release(self, conn: Connection) -> None:
        self._held.discard(conn)

    def is_held(self, conn: Connection) -> bool:
        return conn in self._held

    def held(self) -> list[Connection]:
        return list(self._held)

    # --- waits for a token (flood control) ---------------------------------

    def throttle(self, conn: Connection, until: float, callback: Callable[[], None]) -> bool:
        """`conn` has no token for its next SEND: neither read nor processed
        (its read interest dropped now, so select cannot spin on input
        nobody takes) until `callback` runs at `until`, when the token is
        due; whether this is its first wait."""
        self._throttled.setdefault(conn, self._timers.clock())
        self.watch(conn)
        self.start_timer_at(conn, TOKEN, until, callback)
        if conn in self._waited:
            return False
        self._waited.add(conn)
        return True

    def unthrottle(self, conn: Connection) -> float:
        """`conn` waits no more (its token is due, or it is closing): how
        many seconds it waited, 0 if it was not waiting. The caller puts it
        back in the round and the selector."""
        since = self._throttled.pop(conn, None)
        if since is None:
            return 0.0
        self.cancel_timer(conn, TOKEN)
        return self._timers.clock() - since

    def is_throttled(self, conn: Connection) -> bool:
        return conn in self._throttled

    def throttled(self) -> list[Connection]:
        return list(self._throttled)

    # --- the selector ----------------------------------------------------

    def watch_new(self, conn: Connection) -> None:
        """A connection let in: watched for reading."""
        self._selector.register(conn.sock, EVENT_READ, conn)

    def watch(self, conn: Connection) -> None:
        """Watch `conn` for what it needs now: reading, unless the room holds
        it or it waits for a token (its input would pile up, and a readable
        socket nobody reads would make select spin); writing, while output
        is left (and may be sent)."""
        events = 0 if conn in self._held or conn in self._throttled else EVENT_READ
        kind = conn.kind
        if conn.wants_write and kind.ready(conn):
            events |= EVENT_WRITE
        if kind.pending_output(conn):
            events |= EVENT_WRITE  # the transport's own, whatever `out` holds
        if not events:
            with contextlib.suppress(KeyError):
                self._selector.unregister(conn.sock)
            return
        try:
            self._selector.modify(conn.sock, events, conn)
        except KeyError:  # unregistered while it waited
            self._selector.register(conn.sock, events, conn)

    def events(self, conn: Connection) -> int:
        """What the selector watches `conn` for (0: not watched)."""
        try:
            return self._selector.get_key(conn.sock).events
        except (KeyError, ValueError):
            return 0

    # --- timers ---------------------------------------------------------

    def start_timer(
        self, conn: Connection, purpose: str, delay: float, callback: Callable[[], None]
    ) -> None:
        """Run `callback` `delay` seconds after this turn began, unless
        cancelled or `conn` closes first; one timer per `purpose`."""
        self.start_timer_at(conn, purpose, self._timers.turn_time + delay, callback)

    def start_timer_at(
        self, conn: Connection, purpose: str, when: float, callback: Callable[[], None]
    ) -> None:
        """`start_timer`, at the clock time `when`."""
        deadlines = self._deadlines.setdefault(purpose, {})
        old = deadlines.pop(conn, None)
        if old is not None:
            old.cancel()
        deadlines[conn] = self._timers.call_at(when, partial(self._fire, deadlines, conn, callback))

    def cancel_timer(self, conn: Connection, purpose: str) -> bool:
        """Cancel `conn`'s timer for `purpose`; whether there was one."""
        timer = self._deadlines.get(purpose, {}).pop(conn, None)
        if timer is None:
            return False
        timer.cancel()
        return True

    def timers_of(self, conn: Connection) -> list[str]:
        """The purposes of `conn`'s pending timers."""
        return [purpose for purpose, timers in self._deadlines.items() if conn in timers]

    @staticmethod
    def _fire(
        deadlines: dict[Connection, Timer], conn: Connection, callback: Callable[[], None]
    ) -> None:
        del deadlines[conn]
        callback()

    # --- closing --------------------------------------------------------

    def forget(self, conn: Connection) -> float:
        """`conn` is closing: out of every list, out of the selector, and
        every timer it has cancelled; the seconds it had been waiting for a
        token, if it was (they count as any wait)."""
        waited = self.unthrottle(conn)
        self._busy.pop(conn, None)
        self._unseen_input.pop(conn, None)
        self._to_flush.discard(conn)
        self._closing.pop(conn, None)
        self._held.discard(conn)
        self._waited.discard(conn)
        for deadlines in self._deadlines.values():
            timer = deadlines.pop(conn, None)
            if timer is not None:
                timer.cancel()
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        return waited


class Reader:
    """The read path, step 2 of a turn: at most one recv of READ_SIZE bytes
    per ready connection, framed into lines queued on it (protocol.receive
    takes telnet commands out, and their answers go out at once), and the
    connection put in the `Schedule`'s round. A connection with a large
    backlog is not read until it shrinks; one whose transport holds input
    that select cannot see (TLS, decrypted already) is read again next turn
    without waiting: only those, never a scan of every connection."""

    def __init__(self, schedule: Schedule, writer: Writer, close: Close) -> None:
        self._schedule = schedule
        self._writer = writer
        self._close = close

    def read(self, conn: Connection) -> None:
        schedule = self._schedule
        if schedule.is_held(conn):
            # Held by the room: its input waits in the kernel. Read interest
            # is dropped now that there is some, not at every hold (see
            # ChatServer.hold).
            schedule.watch(conn)
            return
        if conn.closed or conn.at_eof or conn.backlog() > LINES_PER_TURN:
            return  # its backlog is processed first: it is in the round
        try:
            data = conn.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._close(conn, *error_reason(conn, error))
            return
        if data:
            if conn.kind.telnet:
                lines, conn.partial, conn.discarding, conn.telnet, replies = protocol.receive(
                    data, conn.partial, conn.discarding, conn.telnet
                )
                if replies:
                    # Telnet's answers (WILL TIMING-MARK after Ctrl-C) are not
                    # lines of the protocol: they go out at once.
                    self._writer.send_later(conn, replies)
            else:
                lines, conn.partial, conn.discarding = protocol.split_lines(
                    data, conn.partial, conn.discarding
                )
            if not lines:
                return
            conn.enqueue_lines(lines)
        else:
            conn.at_eof = True
            if conn.partial:  # a final line without "\n" is still a line
                conn.enqueue_lines([conn.partial])
                conn.partial = b""
        schedule.has_lines(conn)

    def read_unseen_input(self) -> None:
        schedule = self._schedule
        for conn in schedule.take_unseen_input():
            if conn.closed or schedule.is_held(conn) or schedule.is_throttled(conn):
                continue  # put back by `resume`, or when its token is due
            self.read(conn)
            # Still holding: its backlog was too long to read this turn.
            if not conn.closed and conn.kind.holds_input(conn):
                schedule.holds_input(conn)


class Outbox:
    """Every connection's unsent output, counted where it is queued and where
    the kernel takes it: the total, against --output-budget, and since when
    each connection's output has not shrunk. Only connections that have
    output are ever looked at, and only when the budget is passed or a
    stall check is due."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.total = 0  # unsent bytes
        # Memory the buffers hold, which the budget bounds: a bytearray
        # keeps room to grow, and keeps its size when its front is sent,
        # until it is half empty; counted as unsent bytes only, 2,000 slow
        # consumers held a fifth more than the budget.
        self.held = 0
        self._shrank_at: dict[Connection, float] = {}

    def __bool__(self) -> bool:
        return bool(self._shrank_at)

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

    def drop(self, conn: Connection) -> None:
        """`conn`'s output is gone (sent, or its connection closing)."""
        if conn.out is not None:
            self.total -= len(conn.out)
            self.held -= conn.out.__sizeof__()
            conn.out = None  # and its memory with it
            del self._shrank_at[conn]

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
        self.outbox = Outbox(output_budget)
        self._schedule = schedule
        self._timers = timers
        self._stats = stats
        self._close = close
        self._stall_check: Timer | None = None
        # The wire formats after PLAIN_WIRE: the turn's lines, framed.
        self._framings: list[Callable[[list[bytes]], bytes]] = []

    def add_wire(self, frame_lines: Callable[[list[bytes]], bytes]) -> int:
        """A wire format: `frame_lines` makes the turn's bytes from its
        lines, once per turn; the index for `Connection.wire`."""
        self._framings.append(frame_lines)
        return len(self._framings)

    def apply_limits(self, output_limit: int | None, output_budget: int | None) -> None:
        """New limits (None: unchanged), from the next write on."""
        if output_limit is not None:
            self.output_limit = output_limit
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
        shared = b"".join(batch.lines)
        turn_bytes = [shared]
        for frame_lines in self._framings:
            turn_bytes.append(frame_lines(batch.lines))
        needs_own_copy = batch.needs_own_copy()
        offsets: list[int] = []
        if needs_own_copy:
            offsets = list(accumulate(map(len, batch.lines), initial=0))
        shared_view = memoryview(shared)
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
            data = turn_bytes[conn.wire]
            if conn in needs_own_copy:
                data = batch.copy_for(conn, shared_view, offsets)
                if not data:
                    continue
                frame = conn.kind.frame
                if frame is not None:
                    data = frame(data)
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


def as_connection(member: Member) -> Connection:
    """The connection a room's member is (the reactor's members are)."""
    return cast(Connection, member)
