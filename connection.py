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

`Reader` is the read path (step 2 of a turn); output.py has the write
path (step 5).
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable
from selectors import EVENT_READ, EVENT_WRITE, BaseSelector
from typing import Final, Protocol, cast

import flood
import protocol
from host import Member
from room import NO_KEYS
from timers import Timer, Timers

# One recv per ready connection per turn, of at most this much: a flooder
# gets the same share of a turn as everybody else.
READ_SIZE: Final = 64 * 1024
# Lines processed per connection per turn. A 64 KiB read holds up to 64 Ki
# lines; processing them all while 1,000 members wait would stall the room.
LINES_PER_TURN: Final = 512
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
    # Its connections' label in the metrics (chat_connections_open{transport}).
    transport = "tcp"
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

    def end_reason(self, conn: Connection) -> str:
        """Why its end of input closes it, once its lines are processed."""
        return "client_closed"

    def closing(self, conn: Connection, reason: str) -> None:
        """The server closes `conn` for `reason` (one of CLOSE_REASONS), its
        output flushed: a last word of the transport's own goes with `close`."""


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


class _Deadline:
    """A connection's timer's callback: out of the Schedule's list, then run.
    A small object rather than a partial: every idle WebSocket member holds
    one (its keepalive), and this is half the size."""

    __slots__ = ("deadlines", "conn", "callback")

    def __init__(
        self, deadlines: dict[Connection, Timer], conn: Connection, callback: Callable[[], None]
    ) -> None:
        self.deadlines = deadlines
        self.conn = conn
        self.callback = callback

    def __call__(self) -> None:
        del self.deadlines[self.conn]
        self.callback()


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
        # While the room holds its input back (backpressure), the
        # connections found readable meanwhile, not watched for reading
        # until `read_again`, so that select does not spin on them.
        self.holding_back = False
        self._not_read: dict[Connection, None] = {}
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

    # --- backpressure ----------------------------------------------------

    def hold_back(self, conn: Connection) -> None:
        """`conn` is readable while the room holds input back: not read, and
        not watched for reading until `read_again`."""
        self._not_read[conn] = None
        self.watch(conn)

    def hold_back_input(self, holding: bool) -> None:
        """Whether the room holds its input back this turn."""
        if holding and not self.holding_back:
            self.holding_back = True
        elif not holding and self.holding_back:
            self.read_again()

    def read_again(self) -> None:
        """The room takes input again: watch for it where it was held back."""
        self.holding_back = False
        not_read = list(self._not_read)
        self._not_read.clear()
        for conn in not_read:
            self.watch(conn)

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
        it, it waits for a token, or the room holds its input back (its input
        would pile up, and a readable socket nobody reads would make select
        spin); writing, while output is left (and may be sent)."""
        events = EVENT_READ
        if conn in self._held or conn in self._throttled or conn in self._not_read:
            events = 0
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
        deadlines[conn] = self._timers.call_at(when, _Deadline(deadlines, conn, callback))

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
        self._not_read.pop(conn, None)
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

    def __init__(
        self, schedule: Schedule, send_later: Callable[[Connection, bytes], None], close: Close
    ) -> None:
        self._schedule = schedule
        self._send_later = send_later
        self._close = close

    def read(self, conn: Connection) -> None:
        schedule = self._schedule
        if schedule.is_held(conn):
            # Held by the room: its input waits in the kernel. Read interest
            # is dropped now that there is some, not at every hold (see
            # ChatServer.hold).
            schedule.watch(conn)
            return
        if schedule.holding_back and not conn.closed:
            schedule.hold_back(conn)  # readable, unread: select must not spin on it
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
                    self._send_later(conn, replies)
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


def as_connection(member: Member) -> Connection:
    """The connection a room's member is (the reactor's members are)."""
    return cast(Connection, member)
