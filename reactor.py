"""The reactor: one thread, one selectors loop, one turn at a time.

`ChatServer.run_once` is one turn: select (not waiting while the
`Schedule` has work: lines to process, input select cannot see, unless
the room holds its input back for the readers to drain), read
(connection.Reader) and let in (door.Door), run the timers that are due
(timers.Timers), process the round's lines (processing.Processor), flush
(output.Writer), and close what the turn finished. `ChatServer`
is also the `Host` the room and the metrics ask for time, replies and
holds, and `ServerView` what a test may read of it. `Wakeup` wakes the
loop from a signal handler or another thread.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from selectors import EVENT_READ, EVENT_WRITE, DefaultSelector
from typing import Final

import protocol
from connection import READ_SIZE, Connection, Reader, Schedule, Transport, as_connection
from door import (
    DEFAULT_KEEPALIVE,
    DEFAULT_MAX_CLIENTS,
    DEFAULT_MAX_PER_ADDRESS,
    DEFAULT_REGISTER_TIMEOUT,
    Door,
    Listener,
    TLSPort,
    listening_socket,
)
from host import CLOSE_REASONS, Host, Member
from metrics import Metric, MetricsServer, Stats, chat_metrics
from output import DEFAULT_OUTPUT_BUDGET, DEFAULT_OUTPUT_LIMIT, Writer
from processing import FloodControl, Processor
from proxy_header import Network
from room import LocalRoom, Room
from timers import Clock, Timer, Timers
from tls import TLSConfig, load_context
from webport import WebConfig, WebPort
from websocket import frame_lines, frame_offsets

# chat.PORT, which the command line offers (a test holds them equal).
DEFAULT_PORT: Final = 8080
# Reads of unprocessed input before closing a connection (see _discard_input).
DISCARD_READS: Final = 16

log = logging.getLogger("chat")

RoomFactory = Callable[[Host], Room]


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
    adds a TLS listener on the same host (see `tls_address`), and `web` the
    web port (`web_address`: the page and WebSocket members, webport.py);
    TLSConfigError if a certificate and key cannot be loaded. `sockets` are
    listening sockets made already (by socket activation, or to name the
    port that is taken), by what they serve: "chat", "tls", "web",
    "metrics"; the server
    listens on those instead of binding its own. `on_reload` runs in the
    loop after `reload_tls` (SIGHUP) asks, before the certificate is
    reloaded. A connection from one of `proxy_networks` (--proxy-protocol)
    must begin with a PROXY header, whose client address is then its own
    (door.Door). `send_rate`, `send_burst`: processing.FloodControl's."""

    def __init__(
        self,
        host: str | None = None,
        port: int = DEFAULT_PORT,
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
        web: WebConfig | None = None,
        room: RoomFactory = LocalRoom,
        clock: Clock = time.monotonic,
        sockets: Mapping[str, socket.socket] | None = None,
        on_reload: Callable[[], None] | None = None,
        proxy_networks: Sequence[Network] = (),
        send_rate: float = 0.0,
        send_burst: int | None = None,
    ) -> None:
        # First, so that a bad certificate fails before anything is bound.
        tls_context = None if tls is None else load_context(tls.cert, tls.key)
        web_context = None
        if web is not None and web.cert is not None and web.key is not None:
            web_context = load_context(web.cert, web.key)
        self.stats = Stats()
        self._clock = clock
        self._timers = Timers(clock)
        self._selector = DefaultSelector()
        self._schedule = Schedule(self._selector, self._timers)
        self._writer = Writer(
            self._schedule,
            self._timers,
            self.stats,
            self._close,
            output_limit=output_limit,
            output_budget=output_budget,
        )
        self._reader = Reader(self._schedule, self._writer.send_later, self._close)
        self._door = Door(
            self._selector,
            self._schedule,
            self._timers,
            self.stats,
            self._registration_expired,
            max_clients=max_clients,
            max_per_address=max_per_address,
            register_timeout=register_timeout,
            proxy_networks=proxy_networks,
        )
        sockets = {} if sockets is None else sockets

        def listen(name: str, port: int) -> socket.socket:
            """The socket systemd passed as `name`, else a new one on `port`."""
            return listening_socket(
                sockets.get(name), host, port, keepalive=keepalive, reuse_port=reuse_port
            )

        self._listener = listen("chat", port)
        self._door.open(self._listener)
        flood_control = FloodControl(
            self._schedule, self._timers, self.stats, send_rate, send_burst
        )
        self._processor = Processor(
            self._schedule,
            self._writer,
            self.stats,
            self.reply,
            self._door.named,
            self._close,
            flood_control,
        )
        self._flood = flood_control
        self._wakeup = Wakeup(self._selector)
        self._stopping = False
        self._reload_requested = False  # SIGHUP: reload_tls
        self._on_reload = on_reload
        self._tls: TLSPort | None = None
        self._web: WebPort | None = None
        self.metrics: MetricsServer | None = None
        try:
            if tls is not None and tls_context is not None:
                self._tls = TLSPort(tls, tls_context, self._schedule, self._close)
                self._tls.open(self._door, listen("tls", tls.port))
            if web is not None:
                self._web = WebPort(
                    web,
                    web_context,
                    self._schedule,
                    self._timers,
                    self._close,
                    wire=self._writer.add_wire(frame_lines, frame_offsets),
                    keepalive=keepalive,
                    watch=self.watch,
                    unwatch=self.unwatch,
                )
                self._web.open(self._door, listen("web", web.port))
            self._room: Room = room(self)
            self._processor.room = self._room
            if metrics_address is not None:
                self.metrics = MetricsServer(
                    self, metrics_address, self._metrics, listener=sockets.get("metrics")
                )
        except BaseException:
            self.close()
            raise
        self.view = ServerView(self)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def tls_address(self) -> tuple[str, int] | None:
        """The TLS listener's address (its real port), if there is one."""
        return None if self._tls is None else self._tls.address

    @property
    def web_address(self) -> tuple[str, int] | None:
        """The web listener's address (its real port), if there is one."""
        return None if self._web is None else self._web.address

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
            open_by_transport=self._door.open_by_transport,
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
        send_rate: float | None = None,
        send_burst: int | None = None,
    ) -> None:
        """New limits for what comes next (a reload, in the loop); None leaves
        one as it is. See Door.apply_limits, Writer's and FloodControl.apply."""
        self._door.apply_limits(max_clients, max_per_address, register_timeout, keepalive)
        self._writer.apply_limits(output_limit, output_budget)
        self._flood.apply(send_rate, send_burst)
        if self._web is not None and keepalive is not None:
            self._web.keepalive = keepalive  # for the pings from now on

    def run_once(self, max_wait: float | None = None) -> None:
        """One turn: select, read, timers, process, flush, close. Waits at
        most `max_wait` seconds for something to happen (None: until the
        next timer, or for ever)."""
        events = self._selector.select(self._select_timeout(max_wait))
        self._timers.tick()
        schedule = self._schedule
        holding_back = self._writer.outbox.holding_back_until(self._timers.turn_time) is not None
        schedule.hold_back_input(holding_back)
        read, writable = self._reader.read, schedule.flush_later
        for key, mask in events:
            tag = key.data
            if isinstance(tag, Connection):
                if mask & EVENT_READ:
                    read(tag)
                if mask & EVENT_WRITE:
                    writable(tag)
            elif isinstance(tag, Listener):
                self._door.accept(tag)
            elif tag is self._wakeup:
                self._woken()
            else:
                self._run_handler(tag, mask)
        if not holding_back:
            self._reader.read_unseen_input()
        self._timers.run_due()
        if not holding_back:
            self._processor.process_round()
        self._writer.flush(self._room)
        for conn, reason in schedule.take_closing():
            self._close(conn, reason)
        self._room.end_turn()

    def _run_handler(self, handler: Callable[[int], None], mask: int) -> None:
        """A socket of the room's, the metrics' or the door's own (a PROXY
        header on its way) is ready. A bug there must not take every
        connection down with the loop."""
        try:
            handler(mask)
        except Exception:
            log.exception("internal error in the handler of a socket of the room")

    def _select_timeout(self, max_wait: float | None) -> float | None:
        due = self._timers.next_due()
        held_until = self._writer.outbox.holding_back_until(self._clock())
        if held_until is not None:  # input waits for the readers' writes or the lapse
            due = held_until if due is None else min(due, held_until)
        elif self._schedule.has_work():
            return 0
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
            if self._web is not None:
                self._web.reload()
            web_tls = self._web is not None and self._web.config.tls
            if self._tls is None and not web_tls and self._on_reload is None:
                log.warning("SIGHUP ignored: there is no TLS port, so no certificate to reload")

    def close(self) -> None:
        """Close every connection and the listener. Idempotent."""
        selector_map = self._selector.get_map()
        if selector_map is None:  # closed already
            return
        for key in list(selector_map.values()):
            if isinstance(key.data, Connection):
                self._close(key.data, "server_shutdown")
        for conn in self._schedule.held() + self._schedule.throttled():
            self._close(conn, "server_shutdown")
        if hasattr(self, "_room"):
            self._room.close()  # after the closes above queued their releases
        if self.metrics is not None:
            self.metrics.close()
        if self._web is not None:
            self._web.close()
        self._door.close()
        self._wakeup.close(self._selector)
        self._selector.close()

    # --- what the room may ask (room.Host) ----------------------------------

    def now(self) -> float:
        """The clock as it reads now (the turn's deadlines count from
        `Timers.turn_time`, read once as the turn began)."""
        return self._clock()

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        return self._timers.call_at(when, callback)

    def reply(self, member: Member, line: bytes) -> None:
        conn = as_connection(member)
        if not conn.closed and not self._room.batch.reply(conn, line):
            self._writer.send_later(conn, line)

    def hold(self, member: Member) -> None:
        # Its read interest stays until it is readable (Reader.read): in
        # cluster mode every sender is held until Redis stores its turn, and
        # dropping and restoring it each time cost two epoll_ctl per sender
        # per turn. `resume` restores it only if it was dropped.
        self._schedule.hold(as_connection(member))

    def resume(self, member: Member) -> None:
        conn = as_connection(member)
        schedule = self._schedule
        schedule.release(conn)
        if not conn.closed:
            self._door.named(conn)
            schedule.watch(conn)
            schedule.has_lines(conn)
            if conn.kind.holds_input(conn):
                schedule.holds_input(conn)  # was not read while held

    def disconnect(self, member: Member, detail: str) -> None:
        conn = as_connection(member)
        if conn.closed or self._schedule.closing(conn):
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
        self._writer.send_later(conn, protocol.TIMED_OUT_WAITING)  # framed by its kind
        self._finish(conn, "registration_timeout")

    def _finish(self, conn: Connection, reason: str) -> None:
        """Process nothing more from `conn`, and close it at the end of the
        turn, once its output is flushed."""
        schedule = self._schedule
        schedule.flush_later(conn)
        conn.at_eof = True  # read no more
        conn.lines = None
        schedule.take_turn(conn)
        schedule.close_later(conn, reason)

    # --- closing --------------------------------------------------------

    def _close(self, conn: Connection, reason: str, detail: str = "") -> None:
        """Close `conn` now and free its name. Safe to call twice. `reason`
        is one of CLOSE_REASONS."""
        if conn.closed:
            return
        conn.closed = True
        self._room.leave(conn)
        self.stats.throttled_seconds += self._schedule.forget(
            conn
        )  # a wait, timers too  # and its timers with it
        self._writer.outbox.drop(conn)
        self._door.left(conn)
        self.stats.disconnections[reason] += 1
        words = CLOSE_REASONS[reason]
        log.info("%r disconnected: %s", conn, f"{words} ({detail})" if detail else words)
        conn.kind.closing(conn, reason)
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


class ServerView:
    """What a test may read of a running server, without reaching into
    its parts: nothing here changes it."""

    def __init__(self, server: ChatServer) -> None:
        self._server = server

    @property
    def listeners(self) -> list[Listener]:
        """The door's listeners, the plain one first."""
        return self._server._door.listeners

    @property
    def tls_listener(self) -> socket.socket | None:
        tls = self._server._tls
        return None if tls is None else tls.listener

    @property
    def room(self) -> Room:
        return self._server._room

    def connections(self) -> list[Connection]:
        """The connections the selector watches (a held one may be out)."""
        selector_map = self._server._selector.get_map()
        if selector_map is None:
            return []
        return [key.data for key in selector_map.values() if isinstance(key.data, Connection)]

    def held(self) -> list[Connection]:
        """The connections the room holds."""
        return self._server._schedule.held()

    def throttled(self) -> list[Connection]:
        """The connections waiting for a token (--send-rate)."""
        return self._server._schedule.throttled()

    def closing(self, conn: Connection) -> bool:
        """Whether `conn` is to close at the end of the turn."""
        return self._server._schedule.closing(conn)

    def events(self, conn: Connection) -> int:
        """What the selector watches `conn` for: EVENT_READ, EVENT_WRITE, 0."""
        return self._server._schedule.events(conn)

    def timers_of(self, conn: Connection) -> list[str]:
        """What `conn`'s pending timers time (connection.REGISTRATION...)."""
        return self._server._schedule.timers_of(conn)

    def next_timer_due(self) -> float | None:
        """When the first pending timer is due, on the server's clock."""
        return self._server._timers.next_due()

    def select_timeout(self) -> float | None:
        """How long the next turn's select would wait, at most."""
        return self._server._select_timeout(None)

    def ready_now(self) -> list[tuple[object, int]]:
        """What select reports ready without waiting: (tag, events) pairs."""
        return [(key.data, mask) for key, mask in self._server._selector.select(0)]
