"""A line-protocol chat server: one thread, one selectors reactor.

    python3 chat.py 8080        then, in two terminals: nc localhost 8080

PROTOCOL.md is the contract. protocol.py knows what a line means, room.py
knows who holds which name and what the turn says to whom, and this
module, the reactor, moves bytes and keeps time. Beside them, tls.py is
TLS as a transport, metrics.py renders the counts for GET /metrics, and
cluster.py (imported only with --redis) is the room over Redis. One turn
of the loop (`ChatServer.run_once`):

1. select: wait for readable and writable sockets until the next timer is
   due, without waiting at all while some connection still has received
   lines to process.
2. read: at most one recv of READ_SIZE bytes per ready connection, split
   into lines (protocol.receive: telnet commands out, then split_lines) and
   queued on the connection. A connection with a large backlog is not read
   until it shrinks. New connections come in through the `Door`, which
   applies --max-clients and --max-per-address.
3. timers: run the callbacks that are due (the accept pause, register
   timeouts, the check for stalled output, TLS handshake deadlines, metrics
   requests' deadlines, cluster mode's renewals and retries), from one heap
   read against one clock.
4. process: up to LINES_PER_TURN queued lines per connection, round robin,
   each parsed by protocol.parse_line and handed to the room: `publish` for
   an accepted SEND, `set_name` for a valid USERNAME. Answers go to the
   connection's write buffer, or in their place in the room's batch.
5. flush: the room's batch is joined into one bytes object and sent as it
   is to every member (one send each), except the few that need their own
   copy (`room.Batch.copy_for`). Whatever the kernel does not take goes to
   that connection's write buffer, counted in the `Outbox`, and write
   interest is registered only while such a buffer is not empty. A
   connection whose buffer passes the output limit is closed as a slow
   consumer; over the total output budget, the largest buffers go first.
6. close: connections that reached end of input, once their lines are
   processed and their output flushed; then the room ends its turn.

Nothing is ever sent to one connection in the middle of handling another,
and no connection is closed in the middle of a broadcast. A connection's
bytes go through its `sock` (the transport: `recv`, `send`, `close`); the
room and the batch never see a socket.

`ChatServer` is the loop: it selects, dispatches what is ready, processes
lines and closes connections. The other steps have an object each: `Door`
lets connections in (the limits, the register timeout), `Reader` reads,
`Timers` keeps the heap, and `Writer` sends, with an `Outbox` that counts
unsent output against the budget.

TLS (`--tls-port`): a second listener in the same loop and room. A TLS
connection's `sock` is a tls.TLSTransport, so reading and the broadcast go
through the same calls; the little more it needs (the handshake's
deadline, writing ciphertext the kernel has not taken, reading input
already decrypted that select cannot see, and the SIGHUP reload of the
certificate) is the `TLSPort`'s.

Cluster mode (`--redis URL`) swaps the room for `cluster.RedisRoom`, which
is imported only then; the reactor does not know which room it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import heapq
import ipaddress
import itertools
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import partial
from itertools import accumulate
from selectors import EVENT_READ, EVENT_WRITE, DefaultSelector
from types import FrameType
from typing import Any, Final, NoReturn, Protocol, cast

import activation
import config
import protocol
from host import CLOSE_REASONS, Host, Member
from metrics import Metric, MetricsServer, Stats, chat_metrics
from protocol import BadSend, Blank, Reply, Send, SetName
from room import NO_KEYS, Batch, ConfigurationError, LocalRoom, Room
from tls import TLSConfig, TLSConfigError, TLSTransport, error_detail, load_context

PORT = 8080

DEFAULT_MAX_CLIENTS: Final = 10_000
# PROTOCOL.md, "Limits and failures": unsent output above this closes the
# connection as a slow consumer.
DEFAULT_OUTPUT_LIMIT: Final = 1 << 20
# One recv per ready connection per turn, of at most this much: a flooder
# gets the same share of a turn as everybody else.
READ_SIZE: Final = 64 * 1024
# Lines processed per connection per turn. A 64 KiB read holds up to 64 Ki
# lines; processing them all while 1,000 members wait would stall the room.
LINES_PER_TURN: Final = 512
# Once this many bytes of RECEIVE lines are batched, the turn stops
# processing and flushes, so neither the batch nor a turn grows without
# bound when many connections send at once.
BATCH_BYTES: Final = 256 * 1024
# Reads of unprocessed input before closing a connection (see _discard_input).
DISCARD_READS: Final = 16
# Connections accepted per turn, so a connection storm cannot starve the
# clients already connected.
ACCEPTS_PER_TURN: Final = 512
# How long to stop accepting after running out of file descriptors: the
# listener stays readable meanwhile, so retrying at once would spin.
ACCEPT_PAUSE: Final = 0.1
# Errors of accept() that mean "out of descriptors or memory", not "this
# one connection failed".
_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# PROTOCOL.md, "Real networks".
# Dead peers: keepalive probes after this long idle (--keepalive), and the
# bound on unacknowledged output with keepalive off.
DEFAULT_KEEPALIVE: Final = 30
UNACKED_LIMIT_WITHOUT_KEEPALIVE: Final = 120
MAX_KEEPALIVE: Final = 32767
# Unregistered connections are told TIMED_OUT_WAITING and closed after this.
DEFAULT_REGISTER_TIMEOUT: Final = 60
DEFAULT_MAX_PER_ADDRESS: Final = 64
# All connections' unsent output together (--output-budget).
DEFAULT_OUTPUT_BUDGET: Final = 256 << 20
# The kernel's send buffer of every connection, fixed so that a client that
# never reads costs at most the output limit plus this. Linux doubles what
# is asked for (for its bookkeeping): this gives 256 KiB.
SEND_BUFFER: Final = 128 * 1024
# Unsent output that has not shrunk for this long closes the connection as a
# slow consumer; checked every STALL_CHECK seconds while anyone has some.
STALL_TIMEOUT: Final = 60.0
STALL_CHECK: Final = 5.0
# Exempt from --max-per-address: the machine itself (tests, benchmarks, a
# local proxy). Other loopback addresses count.
_UNCOUNTED_HOSTS: Final = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})

log = logging.getLogger("chat")

Clock = Callable[[], float]
RoomFactory = Callable[[Host], Room]


class Transport(Protocol):
    """Where a connection's bytes are read and written: a plain socket is
    one as it is. Errors are those of socket: BlockingIOError means later,
    any other OSError ends the connection."""

    def fileno(self) -> int: ...
    def recv(self, size: int, /) -> bytes: ...
    def send(self, data: bytes | bytearray | memoryview, /) -> int: ...
    def close(self) -> None: ...


class Connection:
    """One client: its transport, its buffers and its place in the room."""

    __slots__ = (
        "sock",
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
        "waiting",
        "address_key",
        "telnet",
        "tls",
    )

    def __init__(self, sock: Transport, peer: str, address_key: str | None = None) -> None:
        self.sock = sock
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
        self.wants_write = False  # registered for EVENT_WRITE
        self.at_eof = False  # the client sent end of input
        self.closed = False
        # Held by the room (its USERNAME awaits Redis), so its later lines
        # wait too: not read meanwhile, and off the busy list.
        self.waiting = False
        self.tls: TLSTransport | None = None  # `sock` too, on the TLS port

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


class Timer:
    """One callback on the reactor's heap; `cancel` keeps it from running."""

    __slots__ = ("callback", "cancelled", "_timers")

    def __init__(self, callback: Callable[[], None], timers: Timers) -> None:
        self.callback = callback
        self.cancelled = False
        self._timers: Timers | None = timers  # None once out of the heap

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            if self._timers is not None:
                self._timers.cancelled_one()


class Timers:
    """Deadlines on one heap, read from one clock. Cancelled timers stay in
    the heap until they come up, unless they are over half of it."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()  # equal deadlines run in call order
        self._cancelled = 0
        self.now = clock()  # the turn's time (`tick`), for what a turn queues

    def tick(self) -> None:
        """A turn begins: read the clock once for everything it does."""
        self.now = self.clock()

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(callback, self)
        heapq.heappush(self._heap, (when, next(self._order), timer))
        return timer

    def cancelled_one(self) -> None:
        """A timer in the heap was cancelled: past half of the heap, they go."""
        self._cancelled += 1
        if self._cancelled > 64 and self._cancelled > len(self._heap) // 2:
            self._heap = [entry for entry in self._heap if not entry[2].cancelled]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def next_due(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
            self._cancelled -= 1
        return heap[0][0] if heap else None

    def run_due(self) -> None:
        """Run every timer due by now (but none that these add for now)."""
        heap = self._heap
        now = self.clock()
        due: list[Timer] = []
        while heap and heap[0][0] <= now:
            timer = heapq.heappop(heap)[2]
            if timer.cancelled:
                self._cancelled -= 1
            else:
                timer._timers = None
                due.append(timer)
        for timer in due:
            if not timer.cancelled:
                timer.cancelled = True  # it ran: cancelling it now is a no-op
                timer.callback()


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


def error_reason(conn: Connection, error: OSError) -> tuple[str, str]:
    """Why an error of `conn`'s transport closes it: one of CLOSE_REASONS,
    and the detail for the log."""
    if conn.tls is not None and not conn.tls.established:
        return "tls_handshake", error_detail(error)
    if error.errno == errno.ETIMEDOUT:  # keepalive or TCP_USER_TIMEOUT
        return "timed_out", ""
    return "reset", error.strerror or str(error)


def watch_connection(selector: DefaultSelector, conn: Connection) -> None:
    """Watch `conn` for what it needs now: reading, unless the room holds
    it (its input would pile up, and a readable socket nobody reads would
    make select spin); writing, while output is left."""
    events = 0 if conn.waiting else EVENT_READ
    if conn.wants_write:
        events |= EVENT_WRITE
    tls = conn.tls
    if tls is not None:
        if not tls.established:
            events &= ~EVENT_WRITE  # output waits for the handshake: for reads
        if tls.wants_write:
            events |= EVENT_WRITE  # ciphertext left, whatever `out` holds
    if not events:
        with contextlib.suppress(KeyError):
            selector.unregister(conn.sock)
        return
    try:
        selector.modify(conn.sock, events, conn)
    except KeyError:  # unregistered while it waited
        selector.register(conn.sock, events, conn)


# Closes a connection now: reason (one of CLOSE_REASONS) and detail.
Close = Callable[[Connection, str, str], None]


class Reader:
    """The read path, step 2 of a turn: at most one recv of READ_SIZE bytes
    per ready connection, framed into lines queued on it (protocol.receive
    takes telnet commands out, and their answers go out at once), and the
    connections with lines to process, in round-robin order (`busy`). A
    connection with a large backlog is not read until it shrinks; one whose
    transport holds input that select cannot see (TLS, decrypted already)
    is read again next turn without waiting (`again`): only those, never a
    scan of every connection."""

    def __init__(self, selector: DefaultSelector, writer: Writer, close: Close) -> None:
        self.busy: dict[Connection, None] = {}
        self.again: dict[Connection, None] = {}
        self._selector = selector
        self._writer = writer
        self._close = close

    def read(self, conn: Connection) -> None:
        if conn.waiting:
            # Held by the room: its input waits in the kernel. Read interest
            # is dropped now that there is some, not at every hold (see
            # ChatServer.hold).
            watch_connection(self._selector, conn)
            return
        if conn.closed or conn.at_eof or conn.backlog() > LINES_PER_TURN:
            return  # its backlog is processed first: it is on the busy list
        try:
            data = conn.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._close(conn, *error_reason(conn, error))
            return
        if data:
            lines, conn.partial, conn.discarding, conn.telnet, replies = protocol.receive(
                data, conn.partial, conn.discarding, conn.telnet
            )
            if replies:
                # Telnet's answers (WILL TIMING-MARK after Ctrl-C) are not
                # lines of the protocol: they go out at once.
                self._writer.send_later(conn, replies)
            if not lines:
                return
            conn.enqueue_lines(lines)
        else:
            conn.at_eof = True
            if conn.partial:  # a final line without "\n" is still a line
                conn.enqueue_lines([conn.partial])
                conn.partial = b""
        self.busy[conn] = None

    def read_again(self) -> None:
        again = list(self.again)
        self.again.clear()
        for conn in again:
            if conn.closed or conn.waiting:
                continue  # a held one is put back by `resume`
            self.read(conn)
            # Still holding: its backlog was too long to read this turn.
            if conn.tls is not None and conn.tls.holds_input and not conn.closed:
                self.again[conn] = None


class Writer:
    """The write path, step 5 of a turn: the room's batch to every member,
    one send each; output queued for one connection (`send_later`), sent
    at the end of the turn behind what it has unsent already; write
    interest while, and only while, something is left; and the slow
    consumers closed for it: over --output-limit, over --output-budget
    (the largest first), or with output that stopped moving."""

    def __init__(
        self,
        selector: DefaultSelector,
        timers: Timers,
        stats: Stats,
        close: Close,
        *,
        output_limit: int,
        output_budget: int,
    ) -> None:
        self.output_limit = output_limit
        self.outbox = Outbox(output_budget)
        # Connections to send to at the end of the turn.
        self.dirty: set[Connection] = set()
        self._selector = selector
        self._timers = timers
        self._stats = stats
        self._close = close
        self._stall_check: Timer | None = None

    def send_later(self, conn: Connection, data: bytes) -> None:
        """Output for `conn`, sent at the end of this turn."""
        self.queue(conn, data)
        self.dirty.add(conn)

    def queue(self, conn: Connection, data: bytes | memoryview) -> None:
        """Output for `conn` behind what it has unsent already."""
        now = self._timers.now
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
        for conn in self.dirty:
            if not conn.closed and conn.out:
                self._send_buffered(conn)
            elif conn.tls is not None and not conn.closed:
                self._flush_tls(conn)  # writable: ciphertext left from before
        self.dirty.clear()
        if self.outbox.over_budget:
            for conn in self._over_budget():
                self._close(conn, "memory_budget", "")

    def _deliver(self, batch: Batch, members: Collection[Connection]) -> None:
        """Hand the turn's batch to every member, in one send each where the
        member has nothing queued already."""
        shared = b"".join(batch.lines)
        needs_own_copy = batch.needs_own_copy()
        offsets: list[int] = []
        if needs_own_copy:
            offsets = list(accumulate(map(len, batch.lines), initial=0))
        shared_view = memoryview(shared)
        dirty = self.dirty
        self._count_deliveries(batch, len(members))
        backed_up: list[Connection] = []
        # Over the budget mid-broadcast: these are dropped now (their output
        # with them) and closed after it, as the room must not change during it.
        shed: set[Connection] = set()
        failed: dict[Connection, OSError] = {}
        outbox = self.outbox
        sent_total = 0
        for conn in members:
            data = shared
            if conn in needs_own_copy:
                data = batch.copy_for(conn, shared_view, offsets)
                if not data:
                    continue
            if conn.out:
                self.queue(conn, data)  # behind what is queued; sent by flush
                dirty.add(conn)
            else:
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
                if conn in shed:
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
        self.outbox.took(conn, sent, self._timers.now)
        self._stats.bytes_sent += sent
        self._settle(conn)

    def _flush_tls(self, conn: Connection) -> None:
        assert conn.tls is not None
        try:
            conn.tls.flush()
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
        wants_write = unsent > 0
        if wants_write != conn.wants_write:
            conn.wants_write = wants_write
            watch_connection(self._selector, conn)

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


def format_peer(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = str(address[0]), address[1]
        host = host.removeprefix("::ffff:")  # an IPv4 client of a dual-stack socket
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)


def address_key(host: str) -> str | None:
    """What --max-per-address counts a client under: its IPv4 address, or
    its IPv6 /64 network (one subscriber's share, typically); None for the
    machine itself."""
    if host in _UNCOUNTED_HOSTS:
        return None
    host = host.removeprefix("::ffff:")
    if ":" not in host:
        return host
    network = ipaddress.IPv6Network((host.partition("%")[0], 64), strict=False)
    return str(network)


def open_listener(
    host: str | None, port: int, backlog: int = 4096, *, reuse_port: bool = False
) -> socket.socket:
    """A non-blocking listening socket: dual-stack IPv6 + IPv4 when `host` is
    None and the system allows it, else on `host` (a name or an address).
    `reuse_port` sets SO_REUSEPORT, so that several processes can share the
    port and the kernel spreads new connections over them."""
    if host is None:
        if socket.has_dualstack_ipv6():
            sock = socket.create_server(
                ("", port),
                family=socket.AF_INET6,
                dualstack_ipv6=True,
                backlog=backlog,
                reuse_port=reuse_port,
            )
        else:
            sock = socket.create_server(("", port), backlog=backlog, reuse_port=reuse_port)
    else:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.create_server(address, family=family, backlog=backlog, reuse_port=reuse_port)
    sock.setblocking(False)
    return sock


def tune_for_clients(listener: socket.socket, keepalive: int) -> None:
    """Options every accepted socket inherits from the listener (Linux), so
    that accepting costs no extra system call: no Nagle (the server
    coalesces its writes itself), a fixed send buffer, and dead peers
    noticed (PROTOCOL.md, "Real networks"): keepalive probes after
    `keepalive` seconds idle, and a bound on unacknowledged output."""
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    if keepalive:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive)
        # Three probes a third of the idle time apart: a dead peer is closed
        # about 2 x `keepalive` after it last spoke.
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, keepalive // 3))
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        unacked = 2 * keepalive
    else:
        # Off again when a reload turns it off (apply_limits).
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
        unacked = UNACKED_LIMIT_WITHOUT_KEEPALIVE
    # In milliseconds. With keepalive on, Linux also uses it to end probing.
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, unacked * 1000)


# What a socket let in becomes: its socket, its peer's address for the
# logs, and the key --max-per-address counts it under.
Admit = Callable[[socket.socket, str, str | None], Connection]


class _Listener:
    """Selector tag of a listening socket: what to do with the connections
    it lets in, and whether a refusal may be told to them in plain text
    (not on the TLS port: the client would read it as a broken record)."""

    __slots__ = ("sock", "admit", "plain")

    def __init__(self, sock: socket.socket, admit: Admit, plain: bool) -> None:
        self.sock = sock
        self.admit = admit
        self.plain = plain


class Door:
    """Where connections come in: accepting from the listeners, refusing
    those over the limits (--max-clients, --max-per-address), pausing when
    the process runs out of file descriptors, and timing how long each one
    takes to choose a name (--register-timeout): `expired` is told of
    those that take too long."""

    def __init__(
        self,
        selector: DefaultSelector,
        timers: Timers,
        stats: Stats,
        expired: Callable[[Connection], None],
        *,
        max_clients: int,
        max_per_address: int,
        register_timeout: float,
    ) -> None:
        self.max_clients = max_clients
        self.max_per_address = max_per_address
        self.register_timeout = register_timeout
        self.open_count = 0
        self._selector = selector
        self._timers = timers
        self._stats = stats
        self._expired = expired
        self._listeners: list[_Listener] = []
        self._per_address: dict[str, int] = {}
        # Connections without a name yet, and their --register-timeout.
        self._registering: dict[Connection, Timer] = {}
        self._paused = False
        self._failing = False  # out of fds since the last good accept

    def open(self, sock: socket.socket, admit: Admit = Connection, *, plain: bool = True) -> None:
        """Accept from `sock`; `admit` makes each socket let in a connection."""
        listener = _Listener(sock, admit, plain)
        self._listeners.append(listener)
        self._selector.register(sock, EVENT_READ, listener)

    def accept(self, listener: _Listener) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, address = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in _RESOURCE_ERRNOS:
                    self._pause(error)
                    return
                # ECONNABORTED and the like: that one client gave up.
                log.debug("accept failed: %s", error)
                continue
            if self._failing:
                self._failing = False
                log.warning("accepting connections again")
            self._let_in(sock, address, listener)

    def named(self, conn: Connection) -> None:
        """`conn` has a name, if its USERNAME was taken: its register
        timeout ends."""
        if conn.name is not None:
            self._end_timeout(conn)

    def left(self, conn: Connection) -> None:
        """`conn` has closed."""
        self._end_timeout(conn)
        self.open_count -= 1
        key = conn.address_key
        if key is not None:
            count = self._per_address[key] - 1
            if count:
                self._per_address[key] = count
            else:
                del self._per_address[key]

    def close(self) -> None:
        for listener in self._listeners:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(listener.sock)
            listener.sock.close()
        self._listeners.clear()

    def _let_in(self, sock: socket.socket, address: tuple[str, int], listener: _Listener) -> None:
        sock.setblocking(False)
        peer = format_peer(address)
        key = address_key(address[0])
        if self.open_count >= self.max_clients:
            log.warning("refused %s: server is full (limit %d)", peer, self.max_clients)
            self._refuse(sock, protocol.SERVER_FULL if listener.plain else b"", "server_full")
            return
        if key is not None:
            count = self._per_address.get(key, 0)
            if self.max_per_address and count >= self.max_per_address:
                log.warning(
                    "refused %s: %d connections from %s already (limit %d)",
                    peer,
                    count,
                    key,
                    self.max_per_address,
                )
                line = protocol.TOO_MANY_FROM_ADDRESS if listener.plain else b""
                self._refuse(sock, line, "per_address")
                return
            self._per_address[key] = count + 1
        self.open_count += 1
        self._stats.accepted += 1
        conn = listener.admit(sock, peer, key)
        self._selector.register(conn.sock, EVENT_READ, conn)
        if self.register_timeout:
            when = self._timers.now + self.register_timeout
            self._registering[conn] = self._timers.call_at(when, partial(self._expire, conn))
        log.info("%r connected%s", conn, "" if conn.tls is None else " on the TLS port")

    def _expire(self, conn: Connection) -> None:
        if self._registering.pop(conn, None) is not None and not conn.closed:
            self._expired(conn)

    def _end_timeout(self, conn: Connection) -> None:
        timer = self._registering.pop(conn, None)
        if timer is not None:
            timer.cancel()

    def _refuse(self, sock: socket.socket, line: bytes, reason: str) -> None:
        self._stats.refused[reason] += 1
        self._stats.disconnections[reason] += 1
        try:
            if line:
                self._stats.bytes_sent += sock.send(line)
            # Unread input would turn close() into a reset that can destroy
            # the reply in flight; drop what already arrived.
            sock.recv(READ_SIZE)
        except OSError:
            pass
        sock.close()

    def _pause(self, error: OSError) -> None:
        if not self._failing:  # once per episode, not every retry
            self._failing = True
            log.error(
                "cannot accept connections: %s; retrying every %.1fs",
                error.strerror,
                ACCEPT_PAUSE,
            )
        if not self._paused:
            self._paused = True
            for listener in self._listeners:
                self._selector.unregister(listener.sock)
            self._timers.call_at(self._timers.clock() + ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        self._paused = False
        for listener in self._listeners:
            if listener.sock.fileno() >= 0:
                self._selector.register(listener.sock, EVENT_READ, listener)


class TLSPort:
    """The TLS listener (--tls-port), and what its connections need beyond
    a plain one: the handshake's deadline, writing when the transport has
    ciphertext the kernel has not taken, reading again when it holds input
    already decrypted (which select cannot see), and reloading the
    certificate. Reading, the broadcast and closing treat a TLS
    connection's transport as a socket."""

    def __init__(
        self,
        config: TLSConfig,
        context: ssl.SSLContext,
        selector: DefaultSelector,
        timers: Timers,
        reader: Reader,
        writer: Writer,
        close: Close,
    ) -> None:
        self.config = config
        self.listener: socket.socket | None = None
        self._context = context
        self._selector = selector
        self._timers = timers
        self._reader = reader
        self._writer = writer
        self._close = close
        # Connections still in their handshake, and its deadline.
        self._handshakes: dict[Connection, Timer] = {}

    def open(
        self,
        door: Door,
        host: str | None,
        *,
        keepalive: int,
        reuse_port: bool,
        listener: socket.socket | None = None,
    ) -> None:
        """Listen on `listener` if one is given (socket activation), else
        bind the configured port."""
        if listener is None:
            listener = open_listener(host, self.config.port, reuse_port=reuse_port)
        self.listener = listener
        tune_for_clients(self.listener, keepalive)
        door.open(self.listener, self._admit, plain=False)

    @property
    def address(self) -> tuple[str, int] | None:
        if self.listener is None:
            return None
        host, port = self.listener.getsockname()[:2]
        return host, port

    def reload(self) -> None:
        """Load the certificate and key again, for new connections; on an
        error, log it and keep the old ones."""
        config = self.config
        try:
            context = load_context(config.cert, config.key)
        except TLSConfigError as error:
            log.error("cannot reload the TLS certificate: %s; keeping the old one", error)
            return
        self._context = context  # connections already open keep theirs
        log.info("reloaded the TLS certificate %s and key %s", config.cert, config.key)

    def _admit(self, sock: socket.socket, peer: str, key: str | None) -> Connection:
        transport = TLSTransport(sock, self._context)
        conn = Connection(transport, peer, key)
        conn.tls = transport
        transport.notify = partial(self._changed, conn)
        when = self._timers.now + self.config.handshake_timeout
        # The register timeout starts now as well: it includes the handshake.
        self._handshakes[conn] = self._timers.call_at(when, partial(self._expired, conn))
        return conn

    def _changed(self, conn: Connection) -> None:
        """`conn`'s transport changed what it waits for or holds."""
        tls = conn.tls
        if tls is None or conn.closed:
            return
        if tls.established:
            timer = self._handshakes.pop(conn, None)
            if timer is not None:
                timer.cancel()
                log.debug("%r: TLS handshake done (%s)", conn, tls.version())
                if conn.out:  # queued while the handshake went on
                    self._writer.dirty.add(conn)
        if tls.holds_input:
            self._reader.again[conn] = None
        watch_connection(self._selector, conn)

    def _expired(self, conn: Connection) -> None:
        if self._handshakes.pop(conn, None) is not None and not conn.closed:
            timeout = self.config.handshake_timeout
            self._close(conn, "tls_handshake", f"not finished within {timeout:g} s")


class Wakeup:
    """Wakes the loop from a signal handler or another thread: `wake`
    writes a byte to a socket pair whose other end is in the selector."""

    def __init__(self, selector: DefaultSelector) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        selector.register(self._reader, EVENT_READ, self)

    def wake(self) -> None:
        # Full means a wake-up is already pending; closed means we are done.
        with contextlib.suppress(OSError):
            self._writer.send(b"\0")

    def drain(self) -> None:
        try:
            while self._reader.recv(4096):
                pass
        except OSError:  # drained (BlockingIOError) or closed
            pass

    def close(self, selector: DefaultSelector) -> None:
        for sock in (self._reader, self._writer):
            if sock.fileno() >= 0:
                with contextlib.suppress(KeyError, ValueError):
                    selector.unregister(sock)
                sock.close()


class ChatServer:
    """The reactor. Binds in the constructor (port 0 picks a free port, see
    `address`); `serve_forever` runs until `stop`, which is safe to call
    from another thread or a signal handler. `room` builds the room it
    serves (default: `LocalRoom`, one server's room); `clock` is what its
    timers read (a test passes a fake one and calls `run_once`). `tls`
    adds a TLS listener on the same host (see `tls_address`); TLSConfigError
    if its certificate and key cannot be loaded. `sockets` are listening
    sockets made already (by socket activation, or to name the port that
    is taken), by what they serve: "chat", "tls", "metrics"; the server
    listens on those instead of binding its own. `on_reload` runs in the
    loop after `reload_tls` (SIGHUP) asks, before the certificate is
    reloaded."""

    def __init__(
        self,
        host: str | None = None,
        port: int = PORT,
        *,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        max_per_address: int = DEFAULT_MAX_PER_ADDRESS,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        output_budget: int = DEFAULT_OUTPUT_BUDGET,
        keepalive: int = DEFAULT_KEEPALIVE,
        register_timeout: float = DEFAULT_REGISTER_TIMEOUT,
        reuse_port: bool = False,
        metrics_address: tuple[str, int] | None = None,
        tls: TLSConfig | None = None,
        room: RoomFactory = LocalRoom,
        clock: Clock = time.monotonic,
        sockets: Mapping[str, socket.socket] | None = None,
        on_reload: Callable[[], None] | None = None,
    ) -> None:
        # First, so that a bad certificate fails before anything is bound.
        tls_context = None if tls is None else load_context(tls.cert, tls.key)
        self.stats = Stats()
        self._clock = clock
        self._timers = Timers(clock)
        self._selector = DefaultSelector()
        self._writer = Writer(
            self._selector,
            self._timers,
            self.stats,
            self._close,
            output_limit=output_limit,
            output_budget=output_budget,
        )
        self._reader = Reader(self._selector, self._writer, self._close)
        self._door = Door(
            self._selector,
            self._timers,
            self.stats,
            self._registration_expired,
            max_clients=max_clients,
            max_per_address=max_per_address,
            register_timeout=register_timeout,
        )
        sockets = {} if sockets is None else sockets
        made = sockets.get("chat")
        self._listener = open_listener(host, port, reuse_port=reuse_port) if made is None else made
        tune_for_clients(self._listener, keepalive)
        self._door.open(self._listener)
        self._wakeup = Wakeup(self._selector)
        self._stopping = False
        self._reload_requested = False  # SIGHUP: reload_tls
        self._on_reload = on_reload
        # Connections to close once the turn's output is flushed, and why.
        self._finished: dict[Connection, str] = {}
        # Connections the room holds (in no other list, maybe not in the
        # selector either): closed too at shutdown.
        self._held: set[Connection] = set()
        self._tls: TLSPort | None = None
        self.metrics: MetricsServer | None = None
        try:
            if tls is not None and tls_context is not None:
                self._tls = TLSPort(
                    tls,
                    tls_context,
                    self._selector,
                    self._timers,
                    self._reader,
                    self._writer,
                    self._close,
                )
                self._tls.open(
                    self._door,
                    host,
                    keepalive=keepalive,
                    reuse_port=reuse_port,
                    listener=sockets.get("tls"),
                )
            self._room: Room = room(self)
            if metrics_address is not None:
                self.metrics = MetricsServer(
                    self, metrics_address, self._metrics, listener=sockets.get("metrics")
                )
        except BaseException:
            self.close()
            raise

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def tls_address(self) -> tuple[str, int] | None:
        """The TLS listener's address (its real port), if there is one."""
        return None if self._tls is None else self._tls.address

    @property
    def open_count(self) -> int:
        return self._door.open_count

    @property
    def unsent(self) -> int:
        """All connections' unsent output together."""
        return self._writer.outbox.total

    @property
    def member_count(self) -> int:
        return len(self._room.members)

    def _metrics(self) -> list[Metric]:
        return chat_metrics(
            self.stats,
            open_count=self._door.open_count,
            members=len(self._room.members),
            unsent=self.unsent,
            extra=self._room.metrics(),
        )

    # --- the loop -------------------------------------------------------

    def serve_forever(self) -> None:
        try:
            while not self._stopping:
                self.run_once()
        finally:
            self.close()

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.wake()

    def reload_tls(self) -> None:
        """Reload the certificate and key for new connections, in the loop
        (safe from a signal handler or another thread: this only wakes it)."""
        self._reload_requested = True
        self._wakeup.wake()

    def apply_limits(
        self,
        *,
        max_clients: int | None = None,
        max_per_address: int | None = None,
        register_timeout: float | None = None,
        output_limit: int | None = None,
        output_budget: int | None = None,
        keepalive: int | None = None,
    ) -> None:
        """New limits, for what comes next (a reload of the settings; in the
        loop): connections let in from now on count against the new
        --max-clients and --max-per-address and get the new register
        timeout and keepalive; the output limit and budget apply from the
        next write. Connections already open keep their timers and
        keepalive. None leaves a limit as it is."""
        door, writer = self._door, self._writer
        if max_clients is not None:
            door.max_clients = max_clients
        if max_per_address is not None:
            door.max_per_address = max_per_address
        if register_timeout is not None:
            door.register_timeout = register_timeout
        if output_limit is not None:
            writer.output_limit = output_limit
        if output_budget is not None:
            writer.outbox.budget = output_budget
        if keepalive is not None:
            # Accepted sockets inherit these from their listener.
            tune_for_clients(self._listener, keepalive)
            if self._tls is not None and self._tls.listener is not None:
                tune_for_clients(self._tls.listener, keepalive)

    def run_once(self, max_wait: float | None = None) -> None:
        """One turn: select, read, timers, process, flush, close. Waits at
        most `max_wait` seconds for something to happen (None: until the
        next timer, or for ever)."""
        events = self._selector.select(self._select_timeout(max_wait))
        self._timers.tick()
        reader = self._reader
        read, writable = reader.read, self._writer.dirty.add
        for key, mask in events:
            tag = key.data
            if isinstance(tag, Connection):
                if mask & EVENT_READ:
                    read(tag)
                if mask & EVENT_WRITE:
                    writable(tag)
            elif isinstance(tag, _Listener):
                self._door.accept(tag)
            elif tag is self._wakeup:
                self._woken()
            else:
                self._run_handler(tag, mask)
        if reader.again:
            reader.read_again()
        self._timers.run_due()
        self._process_backlogs()
        self._writer.flush(self._room)
        for conn, reason in self._finished.items():
            self._close(conn, reason)
        self._finished.clear()
        self._room.end_turn()

    def _run_handler(self, handler: Callable[[int], None], mask: int) -> None:
        """A socket of the room's or the metrics' own is ready. A bug there
        must not take every connection down with the loop."""
        try:
            handler(mask)
        except Exception:
            log.exception("internal error in the handler of a socket of the room")

    def _select_timeout(self, max_wait: float | None) -> float | None:
        if self._reader.busy or self._reader.again:
            return 0
        due = self._timers.next_due()
        if due is None:
            return max_wait
        timeout = max(0.0, due - self._clock())
        return timeout if max_wait is None else min(timeout, max_wait)

    def _woken(self) -> None:
        self._wakeup.drain()
        if self._reload_requested:
            self._reload_requested = False
            if self._on_reload is not None:
                try:
                    self._on_reload()
                except Exception:  # a bug there must not stop the loop
                    log.exception("internal error reloading the settings")
            if self._tls is not None:
                self._tls.reload()
            elif self._on_reload is None:
                log.warning("SIGHUP ignored: there is no TLS port, so no certificate to reload")

    def close(self) -> None:
        """Close every connection and the listener. Idempotent."""
        selector_map = self._selector.get_map()
        if selector_map is None:  # closed already
            return
        for key in list(selector_map.values()):
            if isinstance(key.data, Connection):
                self._close(key.data, "server_shutdown")
        for conn in list(self._held):
            self._close(conn, "server_shutdown")
        if hasattr(self, "_room"):
            self._room.close()  # after the closes above queued their releases
        if self.metrics is not None:
            self.metrics.close()
        self._door.close()
        self._wakeup.close(self._selector)
        self._selector.close()

    # --- what the room may ask (room.Host) ----------------------------------

    def now(self) -> float:
        return self._clock()

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        return self._timers.call_at(when, callback)

    def reply(self, member: Member, line: bytes) -> None:
        conn = cast(Connection, member)
        if not conn.closed and not self._room.batch.reply(conn, line):
            self._writer.send_later(conn, line)

    def hold(self, member: Member) -> None:
        # Its read interest stays until it is readable (Reader.read): in
        # cluster mode every sender is held until Redis stores its turn, and
        # dropping and restoring it each time cost two epoll_ctl per sender
        # per turn. `resume` restores it only if it was dropped.
        conn = cast(Connection, member)
        conn.waiting = True
        self._held.add(conn)

    def resume(self, member: Member) -> None:
        conn = cast(Connection, member)
        conn.waiting = False
        self._held.discard(conn)
        if not conn.closed:
            self._door.named(conn)
            watch_connection(self._selector, conn)
            self._reader.busy[conn] = None
            if conn.tls is not None and conn.tls.holds_input:
                self._reader.again[conn] = None  # was not read while held

    def disconnect(self, member: Member, detail: str) -> None:
        conn = cast(Connection, member)
        if conn.closed or conn in self._finished:
            return
        log.warning("%r: closing it as a slow consumer: %s", conn, detail)
        self._finish(conn, "slow_consumer")

    def watch(self, sock: object, events: int, handler: Callable[[int], None]) -> None:
        try:
            self._selector.modify(sock, events, handler)  # type: ignore[arg-type]
        except KeyError:
            self._selector.register(sock, events, handler)  # type: ignore[arg-type]

    def unwatch(self, sock: object) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)  # type: ignore[arg-type]

    # --- finishing -----------------------------------------------------

    def _registration_expired(self, conn: Connection) -> None:
        self._writer.queue(conn, protocol.TIMED_OUT_WAITING)
        self._finish(conn, "registration_timeout")

    def _finish(self, conn: Connection, reason: str) -> None:
        """Process nothing more from `conn`, and close it at the end of the
        turn, once its output is flushed."""
        self._writer.dirty.add(conn)
        conn.at_eof = True  # read no more
        conn.lines = None
        self._reader.busy.pop(conn, None)
        self._finished[conn] = reason

    # --- reading and processing ------------------------------------------

    def _process_backlogs(self) -> None:
        busy = self._reader.busy
        room = self._room
        for conn in list(busy):
            if room.turn_size() >= BATCH_BYTES:
                break  # the rest wait for the next turn, in the same order
            del busy[conn]
            if conn.closed:
                continue
            try:
                self._process_lines(conn)
            except Exception:
                # A bug, not an input: protocol.parse_line never raises. Lose
                # this one client, not the room.
                log.exception("%r: internal error while processing its input", conn)
                self._close(conn, "internal_error")
                continue
            if conn.waiting:
                continue  # for the room's answer; `resume` puts it back in line
            if conn.backlog():
                busy[conn] = None  # to the back of the queue
            elif conn.at_eof:
                self._finished.setdefault(conn, "client_closed")

    def _process_lines(self, conn: Connection) -> None:
        lines = conn.lines
        if lines is None:
            return
        start = conn.next_line
        end = min(len(lines), start + LINES_PER_TURN)
        parse_line = protocol.parse_line
        publish = self._room.publish
        published = 0
        for index in range(start, end):
            command = parse_line(lines[index])
            # The common case first: a valid message from a member.
            if type(command) is Send and conn.name is not None:
                # protocol.format_receive, with the name part made once.
                publish(conn, conn.receive_prefix + command.message + b"\n")
                published += 1
                continue
            if conn.waiting:
                # Held by the room after a SEND (cluster mode: until Redis
                # stores it): later SENDs join it, anything else waits, so
                # an answer to that SEND comes in its place. Checked here,
                # off the path of a SEND, so it costs one server nothing.
                end = index
                break
            match command:
                case Blank():
                    pass
                case Reply(line):
                    self.reply(conn, line)
                case SetName():
                    self._room.set_name(conn, command)
                    if conn.waiting:  # held by the room: the rest waits with it
                        end = index + 1
                        break
                    self._door.named(conn)
                case Send():
                    self.reply(conn, protocol.NAME_REQUIRED)
                case BadSend(line):
                    self.reply(conn, line if conn.name is not None else protocol.NAME_REQUIRED)
        self.stats.messages += published
        if end == len(lines):
            conn.lines = None
            conn.next_line = 0
        else:
            conn.next_line = end

    # --- closing --------------------------------------------------------

    def _close(self, conn: Connection, reason: str, detail: str = "") -> None:
        """Close `conn` now and free its name. Safe to call twice. `reason`
        is one of CLOSE_REASONS."""
        if conn.closed:
            return
        conn.closed = True
        self._room.leave(conn)
        self._held.discard(conn)
        self._writer.outbox.drop(conn)
        self._door.left(conn)
        self.stats.disconnections[reason] += 1
        words = CLOSE_REASONS[reason]
        log.info("%r disconnected: %s", conn, f"{words} ({detail})" if detail else words)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        if reason not in ("reset", "timed_out"):
            _discard_input(conn.sock)
        conn.sock.close()
        conn.lines = None


def _discard_input(sock: Transport) -> None:
    """Read and drop what the client sent and the server will not process:
    closing a socket with unread input makes the kernel send a reset instead
    of the end of the stream, and that can destroy the last lines in flight
    (an ERROR that says why). Bounded: a client that keeps sending may still
    get its reset, after those lines."""
    try:
        for _ in range(DISCARD_READS):
            if not sock.recv(READ_SIZE):
                return
    except OSError:  # nothing left (BlockingIOError), or the peer is gone
        pass


# --- the command line ----------------------------------------------------
# Builds the objects and runs them; nothing above depends on it.

# Cluster mode: PROTOCOL.md, "a server that dies without cleaning up frees
# its names within 30 s". The holder renews its leases every third of this.
DEFAULT_LEASE_MS: Final = 30_000
MIN_LEASE_MS: Final = 300
DEFAULT_ROOM: Final = "chat"
# PROTOCOL.md: every request to Redis has a deadline (default 2 s). Under
# 0.05 s an ordinary hiccup would count as an outage.
DEFAULT_REDIS_TIMEOUT: Final = 2.0
MIN_REDIS_TIMEOUT: Final = 0.05
MAX_REDIS_TIMEOUT: Final = 60.0


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: not a number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {port}: must be 0 to 65535")
    return port


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number, `minimum` or more."""

    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}: a whole number") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {number}")
        return number

    return parse


_positive = _at_least(1)
_whole = _at_least(0)  # 0 turns the limit off


def _keepalive(text: str) -> int:
    seconds = _whole(text)
    # Linux's bound on TCP_KEEPIDLE (about 9 hours).
    if seconds > MAX_KEEPALIVE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_KEEPALIVE}, not {seconds}")
    return seconds


def _lease_ms(text: str) -> int:
    lease = _positive(text)
    # Renewed every third of it: much shorter, and renewing is all it does.
    if lease < MIN_LEASE_MS:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_LEASE_MS}, not {lease}")
    return lease


def _redis_timeout(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not MIN_REDIS_TIMEOUT <= seconds <= MAX_REDIS_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"must be {MIN_REDIS_TIMEOUT:g} to {MAX_REDIS_TIMEOUT:g} seconds, not {text}"
        )
    return seconds


def _room(text: str) -> str:
    if not text or not text.isprintable() or any(char.isspace() for char in text):
        raise argparse.ArgumentTypeError(f"invalid room {text!r}: printable, no spaces")
    return text


_LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"invalid level {text!r}: choose from {', '.join(_LOG_LEVELS)}"
        )
    return level


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser; also the table of the settings file's
    keys and their checks (config.setting_table)."""
    parser = _Parser(
        prog="chat.py",
        description="A line-protocol chat server. Connect with: nc localhost PORT",
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="read settings from FILE, a TOML file of these options by the same names "
        "(port = 8080, max-clients = 100, reuse-port = true); options given here win; "
        "SIGHUP reads it again (see chat.example.toml)",
    )
    parser.add_argument(
        "port",
        nargs="?",
        type=_port,
        default=PORT,
        metavar="PORT",
        help=f"TCP port to listen on; 0 picks a free one (default: {PORT})",
    )
    parser.add_argument(
        "--host",
        default=None,
        help="address or name to listen on (default: every interface, IPv6 and IPv4)",
    )
    parser.add_argument(
        "--max-clients",
        type=_positive,
        default=DEFAULT_MAX_CLIENTS,
        metavar="N",
        help="connections over N are told 'ERROR Server is full.' and closed "
        f"(default: {DEFAULT_MAX_CLIENTS})",
    )
    parser.add_argument(
        "--output-limit",
        type=_positive,
        default=DEFAULT_OUTPUT_LIMIT,
        metavar="BYTES",
        help="a client with more than BYTES of output it has not read is "
        f"disconnected as a slow consumer (default: {DEFAULT_OUTPUT_LIMIT}, 1 MiB)",
    )
    internet = parser.add_argument_group(
        "real networks",
        "limits for a server on the open internet (0 turns --keepalive, --register-timeout "
        "and --max-per-address off)",
    )
    internet.add_argument(
        "--output-budget",
        type=_positive,
        default=DEFAULT_OUTPUT_BUDGET,
        metavar="BYTES",
        help="all clients' unread output together; over it, the clients holding the "
        f"most are disconnected as slow consumers (default: {DEFAULT_OUTPUT_BUDGET}, 256 MiB)",
    )
    internet.add_argument(
        "--keepalive",
        type=_keepalive,
        default=DEFAULT_KEEPALIVE,
        metavar="SECONDS",
        help="probe a client that has been quiet this long, so that one that vanished "
        "(network cut, laptop closed) is disconnected after about 2 x SECONDS (at most "
        "4 x SECONDS + 10 s); 0: no "
        f"probes, and unacknowledged output gives up after {UNACKED_LIMIT_WITHOUT_KEEPALIVE} s "
        f"(default: {DEFAULT_KEEPALIVE})",
    )
    internet.add_argument(
        "--register-timeout",
        type=_whole,
        default=DEFAULT_REGISTER_TIMEOUT,
        metavar="SECONDS",
        help="a connection without a name after SECONDS is told 'ERROR Timed out waiting "
        f"for USERNAME.' and closed (default: {DEFAULT_REGISTER_TIMEOUT})",
    )
    internet.add_argument(
        "--max-per-address",
        type=_whole,
        default=DEFAULT_MAX_PER_ADDRESS,
        metavar="N",
        help="connections over N from one address (IPv6: one /64) are told 'ERROR Too many "
        "connections from your address.' and closed; 127.0.0.1 and ::1 are not counted "
        f"(default: {DEFAULT_MAX_PER_ADDRESS})",
    )
    tls = parser.add_argument_group(
        "TLS",
        "a TLS listener (TLS 1.2 or newer) beside the plain one, on the same --host, "
        "serving the same room; SIGHUP reloads the certificate and key for new connections",
    )
    tls.add_argument(
        "--tls-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="also listen for TLS on PORT; 0 picks a free one (default: no TLS)",
    )
    tls.add_argument(
        "--tls-cert",
        default=None,
        metavar="FILE",
        help="with --tls-port: the certificate (and chain) in PEM",
    )
    tls.add_argument(
        "--tls-key",
        default=None,
        metavar="FILE",
        help="with --tls-port: its private key in PEM, without a passphrase",
    )
    parser.add_argument(
        "--log-level",
        type=_log_level,
        default="INFO",
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR, in any case (default: INFO)",
    )
    parser.add_argument(
        "--log-name",
        default=None,
        metavar="NAME",
        help="start every log line with [NAME], to tell servers apart in one log "
        "(default: none; with --redis, the port it listens on)",
    )
    parser.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="with --metrics-port: the address to serve them on (default: 127.0.0.1)",
    )
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="set SO_REUSEPORT, so that several servers on one machine can share "
        "the port (with --redis, to use every core)",
    )
    cluster = parser.add_argument_group(
        "cluster mode",
        "several servers, on one machine or many, serving one room through Redis "
        "(needs the hiredis package: pip install -r requirements-cluster.txt)",
    )
    cluster.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help="join the cluster of every server using this Redis, e.g. "
        "redis://127.0.0.1:6379/0 (default: none, a single server)",
    )
    cluster.add_argument(
        "--room",
        type=_room,
        default=DEFAULT_ROOM,
        metavar="NAME",
        help="with --redis: servers with the same Redis and NAME share one room "
        f"(default: {DEFAULT_ROOM})",
    )
    cluster.add_argument(
        "--lease-ms",
        type=_lease_ms,
        default=DEFAULT_LEASE_MS,
        metavar="MS",
        help="with --redis: how long a name stays taken in Redis after its server "
        f"stops renewing it, e.g. because it died; at least {MIN_LEASE_MS} "
        f"(default: {DEFAULT_LEASE_MS})",
    )
    cluster.add_argument(
        "--redis-timeout",
        type=_redis_timeout,
        default=DEFAULT_REDIS_TIMEOUT,
        metavar="SECONDS",
        help="with --redis: every request to Redis must be answered within SECONDS; "
        "if one is not, Redis counts as unreachable and SENDs waiting for it get "
        f"'ERROR Service unavailable.'; {MIN_REDIS_TIMEOUT:g} to {MAX_REDIS_TIMEOUT:g} "
        f"(default: {DEFAULT_REDIS_TIMEOUT:g})",
    )
    return parser


TLS_TOGETHER: Final = "--tls-port, --tls-cert and --tls-key go together: give all three"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, and the settings file it names (--config) for
    every option it does not give."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        table = config.setting_table(parser)
        from_file = config.read_settings(args.config, table)
        if isinstance(from_file, config.ConfigProblem):
            parser.error(from_file.message)
        given = config.given_on_command_line(build_parser(), argv)
        args = argparse.Namespace(**config.merge(table, from_file, given) | {"config": args.config})
    tls = [args.tls_port is not None, args.tls_cert is not None, args.tls_key is not None]
    # A certificate and key without a port are checked once it is known
    # whether systemd passed a TLS socket (_passed_sockets).
    if any(tls) and not all(tls) and tls != [False, True, True]:
        parser.error(TLS_TOGETHER)
    return args


def _cluster_room(args: argparse.Namespace) -> RoomFactory:
    """The room of cluster mode; ConfigurationError if it cannot be set up."""
    try:
        import cluster  # needs hiredis: cluster mode only
    except ImportError as error:
        raise ConfigurationError(
            f"--redis needs the hiredis package ({error}); pip install -r requirements-cluster.txt"
        ) from None
    return cluster.room_factory(
        args.redis, room=args.room, lease_ms=args.lease_ms, timeout=args.redis_timeout
    )


def _warn_about_unused_options(args: argparse.Namespace) -> None:
    if args.redis is None:
        unused = [
            option
            for option, value, default in (
                ("--room", args.room, DEFAULT_ROOM),
                ("--lease-ms", args.lease_ms, DEFAULT_LEASE_MS),
                ("--redis-timeout", args.redis_timeout, DEFAULT_REDIS_TIMEOUT),
            )
            if value != default
        ]
        if unused:
            verb = "matters" if len(unused) == 1 else "matter"
            log.warning("%s only %s with --redis: ignored", ", ".join(unused), verb)
        if args.reuse_port:
            log.warning(
                "--reuse-port without --redis: servers sharing the port do not share a room"
            )


def _describe_listener(host: str | None, address: tuple[str, int]) -> str:
    where = format_peer((address[0] or "*", address[1]))
    if host is None and address[0] == "::":
        return f"{where} (every address, IPv6 and IPv4)"
    if ":" in address[0]:
        return f"{where} (IPv6 only)"
    return where


def _log_format(name: str | None) -> str:
    # No % formatting of the name: it is the user's text.
    tag = f"[{name.replace('%', '%%')}] " if name else ""
    return "%(asctime)s %(levelname)s " + tag + "%(message)s"


# glibc's mallopt parameter for the size from which blocks are mmapped.
_M_MMAP_THRESHOLD: Final = -3
# Blocks of this size or more get their own mapping, which goes back to the
# system when they are freed. Left to itself, glibc raises its threshold to
# the size of every large block freed (up to 32 MiB), so slow consumers'
# growing buffers come from the heap and fragment it: 2,000 of them under
# the default output budget of 256 MiB peaked at 365 MiB of memory, and
# 300 MiB stayed after they were closed. Just above READ_SIZE, so that
# reads stay on the heap.
MMAP_THRESHOLD: Final = READ_SIZE + 4096


def return_large_buffers_to_the_system() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD (the program does; a
    program that embeds ChatServer decides for itself). Whether it was set:
    False on a C library without mallopt."""
    import ctypes  # only here: nothing else needs it

    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


class _CannotListen(Exception):
    """A port cannot be bound: which one (`where`), and the OSError."""

    def __init__(self, where: str, error: OSError) -> None:
        super().__init__(where, error)
        self.where = where
        self.error = error


def _open_listeners(
    args: argparse.Namespace, passed: dict[str, socket.socket]
) -> dict[str, socket.socket]:
    """The listening sockets the server needs, by what they serve: those
    systemd passed (`passed`), and the others bound here, one at a time,
    so that the port that is taken can be named (_CannotListen)."""
    sockets = dict(passed)
    wanted: list[tuple[str, str, str | None, int]] = [("chat", "port", args.host, args.port)]
    if args.tls_port is not None:
        wanted.append(("tls", "TLS port", args.host, args.tls_port))
    if args.metrics_port is not None:
        wanted.append(("metrics", "metrics port", args.metrics_host, args.metrics_port))
    try:
        for name, what, host, port in wanted:
            if name in sockets:
                continue
            try:
                if name == "metrics" and host is not None:  # one address, not every one
                    family = socket.AF_INET6 if ":" in host else socket.AF_INET
                    sockets[name] = socket.create_server((host, port), family=family)
                    sockets[name].setblocking(False)
                else:
                    sockets[name] = open_listener(host, port, reuse_port=args.reuse_port)
            except OSError as error:
                where = f"{what} {port}" if host is None else f"{what} {port} of {host!r}"
                raise _CannotListen(where, error) from None
    except BaseException:
        for sock in sockets.values():
            sock.close()
        raise
    return sockets


def _os_error_reason(error: OSError) -> str:
    # Not str(error): create_server adds "(while attempting to bind on
    # address ...)", which says it in Python's words.
    if isinstance(error, socket.gaierror) or not error.errno:
        return error.strerror or str(error)  # the resolver's words
    return os.strerror(error.errno)


def _passed_sockets(args: argparse.Namespace) -> dict[str, socket.socket] | str:
    """The sockets systemd passed (socket activation), checked against the
    options; or the one line saying why they cannot be used."""
    passed = activation.take_sockets()
    if isinstance(passed, activation.ActivationProblem):
        return f"chat.py: socket activation: {passed.message}"
    web = passed.pop("web", None)
    if web is not None:
        log.warning(
            "socket activation: this server has no web listener: the socket 'web' is unused"
        )
        web.close()
    if "tls" in passed and (args.tls_cert is None or args.tls_key is None):
        return (
            "chat.py: socket activation: a socket 'tls' was passed: give --tls-cert and --tls-key"
        )
    if "tls" not in passed and args.tls_cert is not None and args.tls_port is None:
        return f"chat.py: error: {TLS_TOGETHER}"
    return passed


def _reloader(
    args: argparse.Namespace,
    given: dict[str, object],
    server: Callable[[], ChatServer | None],
) -> Callable[[], None]:
    """What SIGHUP does in the loop, besides reloading the certificate:
    read the settings file again and apply what can change while running
    (config.LIVE_SETTINGS); `args` is updated to what is in force."""
    path = args.config
    table = config.setting_table(build_parser())

    def reload() -> None:
        running = server()
        from_file = config.read_settings(path, table)
        if isinstance(from_file, config.ConfigProblem):
            log.error(
                "cannot reload the settings: %s; keeping every setting as it was", from_file.message
            )
            return
        found = config.changes(table, vars(args), config.merge(table, from_file, given))
        if found.need_restart:
            log.warning(
                "settings changed in %s take effect only after a restart: %s",
                path,
                ", ".join(found.need_restart),
            )
        live = dict(found.live)
        level = live.pop("log_level", None)
        if isinstance(level, str):
            logging.getLogger().setLevel(level)
        if running is not None and live:
            running.apply_limits(**cast(dict[str, Any], live))
        vars(args).update(found.live)
        if found.live:
            changed = ", ".join(
                f"{dest.replace('_', '-')} = {value}" for dest, value in found.live.items()
            )
            log.info("reloaded the settings in %s: %s", path, changed)
        else:
            log.info("reloaded the settings in %s: no change that applies while running", path)

    return reload


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return_large_buffers_to_the_system()
    log_name = args.log_name
    if log_name is None and args.redis is not None:
        log_name = str(args.port)  # servers of one cluster told apart by port
    logging.basicConfig(level=args.log_level, format=_log_format(log_name), stream=sys.stderr)
    server: ChatServer | None = None
    on_reload = None
    if args.config is not None:
        given = config.given_on_command_line(build_parser(), argv)
        on_reload = _reloader(args, given, lambda: server)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if server is None:  # still starting: nothing to close yet
            raise SystemExit(0)
        server.stop()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        if server is not None:  # still starting: the files were just read
            server.reload_tls()  # only wakes the loop, which does the work

    # Before binding, so a signal at any moment after the port is open
    # ends in the same clean exit (and SIGHUP never kills the server).
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    passed = _passed_sockets(args)
    if isinstance(passed, str):
        print(passed, file=sys.stderr)
        return 2
    try:
        room = LocalRoom if args.redis is None else _cluster_room(args)
        sockets = _open_listeners(args, passed)
        tls_port = args.tls_port
        if "tls" in sockets:
            tls_port = sockets["tls"].getsockname()[1]
        metrics_address = None
        if "metrics" in sockets:
            metrics_address = cast(tuple[str, int], sockets["metrics"].getsockname()[:2])
        server = ChatServer(
            args.host,
            args.port,
            max_clients=args.max_clients,
            max_per_address=args.max_per_address,
            output_limit=args.output_limit,
            output_budget=args.output_budget,
            keepalive=args.keepalive,
            register_timeout=args.register_timeout,
            reuse_port=args.reuse_port,
            metrics_address=metrics_address,
            tls=None if tls_port is None else TLSConfig(tls_port, args.tls_cert, args.tls_key),
            room=room,
            sockets=sockets,
            on_reload=on_reload,
        )
    except ConfigurationError as error:
        print(f"chat.py: {error}", file=sys.stderr)
        return 2
    except TLSConfigError as error:
        print(f"chat.py: cannot load the TLS certificate: {error}", file=sys.stderr)
        return 2
    except _CannotListen as cannot:
        reason = _os_error_reason(cannot.error)
        print(f"chat.py: cannot listen on {cannot.where}: {reason}", file=sys.stderr)
        return 1
    except OSError as error:  # out of descriptors, say
        print(f"chat.py: cannot start: {_os_error_reason(error)}", file=sys.stderr)
        return 1
    if args.log_name is None and args.redis is not None and args.port == 0:
        for handler in logging.getLogger().handlers:  # the port it was given
            handler.setFormatter(logging.Formatter(_log_format(str(server.address[1]))))
    if passed:
        log.info("socket activation: serving the sockets passed in (%s)", ", ".join(passed))
    log.info("listening on %s", _describe_listener(args.host, server.address))
    if server.tls_address is not None:
        log.info("listening for TLS on %s", _describe_listener(args.host, server.tls_address))
    if server.metrics is not None:
        log.info("metrics at http://%s/metrics", format_peer(server.metrics.address))
    _warn_about_unused_options(args)
    server.serve_forever()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
