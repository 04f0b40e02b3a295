"""The web port: people in a web browser, members of the room.

PROTOCOL.md, "People in a web browser". A connection to the web port is
one `WebTransport`: first HTTP (web.py reads the request and says what it
gets: the page, an error, or the WebSocket upgrade), then, once upgraded,
WebSocket frames (websocket.py) in both directions. To the loop it is a
transport like tls.TLSTransport, with its `WebKind`: `recv` hands out the
messages as lines ("\\n"-ended, for TCP's line rules), `send` takes the
room's output framed already (the turn's lines once per turn for every
WebSocket member, through Writer.add_wire; replies through `Kind.frame`),
and its own frames (pongs, pings, the HTTP answer, the close) wait in a
small buffer of its own, never in the middle of a frame of the room's.
With --web-tls it speaks over a tls.TLSTransport instead of the socket.

`WebPort` is the listener and what its connections need beyond a TCP
one: the request's deadline, the ping of an idle WebSocket and the
dead-peer close, the close frame on the server's own close, and the
connections the door turns away, which are answered in HTTP's terms (a
503 for the page, or an upgrade, the ERROR line as a text message and a
close with 1008) by a handler of their own, never members of the room.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from selectors import EVENT_READ, EVENT_WRITE
from typing import Final, cast

import web
import websocket
from connection import READ_SIZE, Close, Connection, Kind, Schedule, Transport
from door import Door, listener_address, reloaded_context
from timers import Timer, Timers
from tls import TLSTransport, error_detail

# A connection's timer, by what it times (see Schedule.start_timer); the
# keepalive is the port's own (WebPort._check_idle), one timer for all.
REQUEST: Final = "request"  # the HTTP request's deadline (web.REQUEST_TIMEOUT)
# Connections turned away by the door and still being answered, at most:
# each one more closes the oldest, so that clients over the limits cannot
# hold descriptors the limits are there to save.
MAX_TURNED_AWAY: Final = 64
# The close code the server sends when it closes a WebSocket itself, by
# the reason it closes it for; none for a peer that is gone.
CLOSE_CODES: Final = {
    "client_closed": websocket.NORMAL_CLOSURE,
    "slow_consumer": websocket.POLICY_VIOLATION,
    "memory_budget": websocket.POLICY_VIOLATION,
    "registration_timeout": websocket.POLICY_VIOLATION,
    "per_address": websocket.POLICY_VIOLATION,
    "server_full": websocket.POLICY_VIOLATION,
    "server_shutdown": websocket.GOING_AWAY,
    "internal_error": 1011,  # RFC 6455 7.4.1: an unexpected condition
}

log = logging.getLogger("chat")


@dataclass(frozen=True, slots=True)
class WebConfig:
    """The web listener: its port (0 picks a free one), the origins whose
    pages may open a WebSocket (--web-origin; none: any), and with
    --web-tls the certificate and key files (PEM)."""

    port: int
    origins: tuple[str, ...] = ()
    cert: str | None = None
    key: str | None = None
    request_timeout: float = web.REQUEST_TIMEOUT

    @property
    def tls(self) -> bool:
        return self.cert is not None and self.key is not None


def frame_reply(data: bytes) -> bytes:
    """Output for one WebSocket member (whole lines, "\\n"-ended), one
    text message per line: what `Kind.frame` is for a WebSocket."""
    lines = data.split(b"\n")
    last = lines.pop()
    framed = [line + b"\n" for line in lines]
    if last:  # never, for the protocol's lines; kept rather than lost
        framed.append(last + b"\n")
    return websocket.frame_lines(framed)


class WebTransport:
    """One connection to the web port, as a connection.Transport: HTTP
    until the upgrade, WebSocket after. `recv` gives lines ("\\n"-ended
    input for the line splitter) or raises BlockingIOError while there are
    none (a request still arriving, half a frame); after the HTTP answer
    to anything but an upgrade, the client's close frame or a protocol
    error (`failure`), it says end of input, once the lines before it are
    handed out. `send` takes the room's framed output. Errors are a
    socket's."""

    __slots__ = (
        "raw",
        "port",
        "conn",
        "request",
        "upgraded",
        "reader",
        "control",
        "mid_frame",
        "final",
        "failure",
        "eof_pending",
        "answered",
        "closing",
        "refusal",
        "heard_at",
    )

    def __init__(self, raw: Transport, port: WebPort, refusal: bytes | None = None) -> None:
        self.raw = raw  # the socket, or a TLSTransport over it (--web-tls)
        self.port = port  # its origins and clock, shared by every connection
        # Its connection, once admitted (not for one turned away): what
        # `notify` tells the port about.
        self.conn: Connection | None = None
        self.request = b""  # the HTTP request so far
        self.upgraded = False
        # Only while a frame is arriving: an idle member holds none.
        self.reader: websocket.FrameReader | None = None
        # Frames and HTTP of the transport's own, waiting for the kernel.
        self.control = b""
        # The kernel took only part of the room's last output: the stream
        # is inside a frame, whose rest (in the connection's `out`) must
        # come before any frame of the transport's own.
        self.mid_frame = False
        self.final: bytes | None = None  # the close frame to end with
        self.failure: websocket.Failure | None = None  # the client broke RFC 6455
        self.eof_pending = False  # its close or failure: end of input next recv
        self.answered = False  # an HTTP answer that ends the connection is queued
        self.closing = False  # the server is closing it: input is only drained
        # The ERROR line of a connection over the door's limits (turned away).
        self.refusal = refusal
        self.heard_at = 0.0  # when the client last sent anything, once upgraded
        if isinstance(raw, TLSTransport):
            raw.notify = self.notify

    def notify(self) -> None:
        """`upgraded`, `wants_write` or `holds_input` changed: the port
        tells the loop."""
        if self.conn is not None:
            self.port.changed(self.conn, self)

    def fileno(self) -> int:
        return self.raw.fileno()

    def raw_socket(self) -> socket.socket:
        """The socket under the transport (and under TLS, if any)."""
        raw = self.raw
        # A Transport may also be door.AfterHeader (a socket behind a PROXY
        # header): it is watched by its file descriptor as the socket is.
        return cast(socket.socket, raw.raw if isinstance(raw, TLSTransport) else raw)

    @property
    def wants_write(self) -> bool:
        """Output of its own for the kernel, that may go now."""
        if self.control and not self.mid_frame:
            return True
        return isinstance(self.raw, TLSTransport) and self.raw.wants_write

    @property
    def holds_input(self) -> bool:
        """Input taken from the kernel and not handed out yet."""
        if self.eof_pending:
            return True
        return isinstance(self.raw, TLSTransport) and self.raw.holds_input

    # --- reading --------------------------------------------------------

    def recv(self, size: int, /) -> bytes:
        if self.eof_pending:
            self.eof_pending = False
            return b""
        if self.closing or self.answered:
            return self.raw.recv(size)  # drained before the close, or ignored
        data = self.raw.recv(size)
        if not data:
            return b""  # the end of input, in HTTP as in WebSocket
        if not self.upgraded:
            return self._read_request(data)
        return self._read_frames(data)

    def _read_request(self, data: bytes) -> bytes:
        self.request += data
        parsed = web.parse_request(self.request)
        if isinstance(parsed, web.Incomplete):
            raise BlockingIOError("HTTP request not complete yet")
        rest = b""
        if isinstance(parsed, web.Request):
            rest = self.request[parsed.size :]
            answer = web.respond(parsed, self.port.config.origins, self.refusal is not None)
        else:
            answer = parsed
        self.request = b""
        if isinstance(answer, web.Respond):
            return self._answer(answer.response)
        if self.refusal is not None:  # told in its own terms: PROTOCOL.md
            line = self.refusal.removesuffix(b"\n")
            close = websocket.close_frame(websocket.POLICY_VIOLATION)
            return self._answer(answer.response + websocket.text_frame(line) + close)
        self.upgraded = True
        self.port.heard(self)
        self._queue(answer.response)
        self.notify()  # upgraded
        if rest:
            return self._read_frames(rest)
        raise BlockingIOError("no WebSocket message yet")

    def _answer(self, response: bytes) -> bytes:
        """Queue an HTTP answer that ends the connection: the end of input."""
        self.answered = True
        self._queue(response)
        return b""

    def _read_frames(self, data: bytes) -> bytes:
        reader = self.reader or websocket.FrameReader()
        self.port.heard(self)
        handled = reader.receive_handled(data)
        self.reader = None if reader.between_frames else reader
        replies, end = handled.replies, handled.end
        if end is not None:
            # Its close frame goes last, after the answers to the lines
            # before it (`close`), not with the pongs.
            if isinstance(end, websocket.Close):
                self.final = websocket.close_frame(end.code)
            else:
                self.final = websocket.close_frame(end.code, end.reason)
                self.failure = end
            self.eof_pending = True
            replies = replies.removesuffix(self.final)
        if replies:
            self._queue(replies)
        if end is not None:
            self.notify()  # holds input: the end, next time
        if handled.data:
            return handled.data
        if end is not None:
            self.eof_pending = False
            return b""  # nothing before it: the end now
        raise BlockingIOError("no whole WebSocket message yet")

    # --- writing --------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview, /) -> int:
        """Send the room's output, behind the transport's own; nothing
        before the upgrade."""
        if not self.upgraded or self.closing:
            raise BlockingIOError("not a WebSocket (yet)")
        # Inside a frame, its rest goes first; else the transport's own do.
        if self.control and not self.mid_frame and not self._flush_control():
            raise BlockingIOError("frames of the transport's own waiting")
        sent = self.raw.send(data)
        self.mid_frame = sent < len(data)
        if self.control and not self.mid_frame:
            self._flush_control()  # the pongs queued meanwhile
        return sent

    def ping(self) -> None:
        self._queue(websocket.ping_frame())

    def flush(self) -> None:
        """The socket is writable: send the transport's own output."""
        had = self.wants_write
        if self.control:
            self._flush_control()
        elif isinstance(self.raw, TLSTransport):
            self.raw.flush()
        if had != self.wants_write:
            self.notify()

    def _queue(self, frames: bytes) -> None:
        had = self.wants_write
        self.control += frames
        self._flush_control()
        if had != self.wants_write:
            self.notify()

    def _flush_control(self) -> bool:
        """Send the transport's own output, unless the stream is inside a
        frame of the room's; True once all of it is gone."""
        if self.mid_frame:
            return False
        if self.control:
            try:
                sent = self.raw.send(self.control)
            except (BlockingIOError, InterruptedError):
                return False
            self.control = self.control[sent:]
        return not self.control

    # --- closing --------------------------------------------------------

    def closing_for(self, reason: str) -> None:
        """The server closes the connection for `reason` (one of
        CLOSE_REASONS): a WebSocket is told with a close frame, if it has
        not been already and the stream is not inside a frame."""
        self.closing = True
        self.port.forget_quiet(self)
        if self.upgraded and self.final is None and reason in CLOSE_CODES:
            self.final = websocket.close_frame(CLOSE_CODES[reason])

    def close(self) -> None:
        """Send what is left of the transport's own output and the close
        frame, if the kernel takes them at once; then close."""
        self.closing = True
        if self.final is not None and not self.mid_frame:
            self.control += self.final
            self.final = None
        if self.control:
            with contextlib.suppress(OSError):
                self._flush_control()
        self.raw.close()


def transport_of(conn: Connection) -> WebTransport:
    return cast(WebTransport, conn.sock)


class WebKind(Kind):
    """A web port connection's transport, a WebTransport, as the loop sees
    it: room output waits for the upgrade; its input is lines already (no
    telnet); its replies are framed as text messages; it has frames of its
    own for the kernel, and input select cannot see (the end, after a
    close frame or a protocol error)."""

    arrival = " on the web port"
    telnet = False
    transport = "websocket"

    def __init__(self) -> None:
        # An instance attribute: a function as a class attribute would be
        # bound as a method.
        self.frame = frame_reply

    def ready(self, conn: Connection) -> bool:
        return transport_of(conn).upgraded

    def failed_before_ready(self, conn: Connection, error: OSError) -> tuple[str, str]:
        raw = transport_of(conn).raw
        if isinstance(raw, TLSTransport) and not raw.established:
            return "tls_handshake", error_detail(error)
        return "reset", error.strerror or str(error)

    def pending_output(self, conn: Connection) -> bool:
        return transport_of(conn).wants_write

    def holds_input(self, conn: Connection) -> bool:
        return transport_of(conn).holds_input

    def flush(self, conn: Connection) -> None:
        transport_of(conn).flush()

    def end_reason(self, conn: Connection) -> str:
        return "client_closed" if transport_of(conn).failure is None else "protocol_error"

    def closing(self, conn: Connection, reason: str) -> None:
        transport_of(conn).closing_for(reason)


WEB: Final = WebKind()

# Watch a socket of the port's own (the turned-away ones) for `events`, or stop.
Watch = Callable[[object, int, Callable[[int], None]], None]
Unwatch = Callable[[object], None]


class WebPort:
    """The web listener (--web-port), and what its connections need beyond
    a TCP one (see the module's docstring). `wire` is the index of the
    WebSocket framing among the Writer's wire formats."""

    def __init__(
        self,
        config: WebConfig,
        context: ssl.SSLContext | None,
        schedule: Schedule,
        timers: Timers,
        close: Close,
        *,
        wire: int,
        keepalive: int,
        watch: Watch,
        unwatch: Unwatch,
    ) -> None:
        self.config = config
        self.keepalive = keepalive  # seconds of quiet before a ping; 0: none
        self.listener: socket.socket | None = None
        self.timers = timers
        self._context = context
        self._schedule = schedule
        self._close = close
        self._wire = wire
        self._watch = watch
        self._unwatch = unwatch
        # Turned away and being answered, oldest first, with their deadlines.
        self._turned_away: dict[WebTransport, Timer] = {}
        # The WebSocket members by when they were last heard from, oldest
        # first (insertion order): not pinged yet, and pinged. One timer for
        # the port, not one per member: an idle member costs a dict slot.
        self._quiet: dict[WebTransport, None] = {}
        self._pinged: dict[WebTransport, None] = {}
        self._idle_check: Timer | None = None

    def open(self, door: Door, listener: socket.socket) -> None:
        """Let clients in through `door` from `listener`, the web port."""
        self.listener = listener
        door.open(listener, self.admit, turn_away=self.turn_away)

    @property
    def address(self) -> tuple[str, int] | None:
        return listener_address(self.listener)

    def reload(self) -> None:
        """Load the certificate and key again (--web-tls), for new
        connections; on an error, log it and keep the old ones."""
        config = self.config
        if config.cert is None or config.key is None:
            return
        context = reloaded_context(config.cert, config.key, "web port's certificate")
        if context is not None:
            self._context = context  # connections already open keep theirs

    def _transport(self, sock: Transport, refusal: bytes | None = None) -> WebTransport:
        raw: Transport = sock
        if self._context is not None:
            raw = TLSTransport(sock, self._context)
        return WebTransport(raw, self, refusal)

    # --- members -----------------------------------------------------------

    def admit(self, sock: Transport, peer: str, key: str | None) -> Connection:
        """A socket let in on the web port: its connection, request to come."""
        transport = self._transport(sock)
        conn = Connection(transport, peer, key, WEB, self._wire)
        transport.conn = conn
        self._schedule.start_timer(
            conn, REQUEST, self.config.request_timeout, partial(self._request_expired, conn)
        )
        return conn

    def changed(self, conn: Connection, transport: WebTransport) -> None:
        """`conn`'s transport changed what it waits for or holds."""
        if conn.closed:
            return
        schedule = self._schedule
        if transport.upgraded and schedule.cancel_timer(conn, REQUEST):
            log.debug("%r: WebSocket open", conn)
            if conn.out:  # queued before the upgrade
                schedule.flush_later(conn)
        if transport.holds_input:
            schedule.holds_input(conn)
            failure = transport.failure
            if failure is not None:
                log.info(
                    "%r broke RFC 6455 (%s): closing it with %d", conn, failure.reason, failure.code
                )
        schedule.watch(conn)

    def _request_expired(self, conn: Connection) -> None:
        if not conn.closed:
            timeout = self.config.request_timeout
            self._close(conn, "timed_out", f"HTTP request not finished within {timeout:g} s")

    def heard(self, transport: WebTransport) -> None:
        """`transport`'s client sent something (or was just upgraded): quiet
        from now, to the back of the line."""
        transport.heard_at = self.timers.turn_time
        self._pinged.pop(transport, None)
        self._quiet.pop(transport, None)
        self._quiet[transport] = None
        if self._idle_check is None and self.keepalive:
            self._check_idle_in(self.keepalive)

    def forget_quiet(self, transport: WebTransport) -> None:
        """`transport` is closing: out of the line."""
        self._quiet.pop(transport, None)
        self._pinged.pop(transport, None)

    def _check_idle_in(self, delay: float) -> None:
        self._idle_check = self.timers.call_at(self.timers.turn_time + delay, self._check_idle)

    def _check_idle(self) -> None:
        """Timer: the members quiet for --keepalive seconds are pinged; those
        quiet for twice that (the dead-peer time) are closed as timed out.
        Both lines are in the order of `heard_at`: only their fronts are
        looked at."""
        self._idle_check = None
        keepalive = self.keepalive
        if not keepalive:
            return
        now = self.timers.turn_time
        next_check = 0.0
        while self._pinged:
            transport = next(iter(self._pinged))
            idle = now - transport.heard_at
            if idle < 2 * keepalive:
                next_check = 2 * keepalive - idle
                break
            del self._pinged[transport]
            if transport.conn is not None and not transport.conn.closed:
                self._close(transport.conn, "timed_out", "no answer to a WebSocket ping")
        while self._quiet:
            transport = next(iter(self._quiet))
            idle = now - transport.heard_at
            if idle < keepalive:
                wait = keepalive - idle
                next_check = wait if not next_check else min(next_check, wait)
                break
            del self._quiet[transport]
            self._pinged[transport] = None
            transport.ping()
            if not next_check:
                next_check = 2 * keepalive - idle
        if next_check:
            self._check_idle_in(next_check)

    # --- turned away by the door ----------------------------------------------

    def turn_away(self, sock: Transport, line: bytes) -> None:
        """The door refused `sock` for `line`: answer its request in HTTP's
        terms (see web.respond's `full`), then close it; never a member. Its
        request is read at once if it is there already (with a PROXY header,
        it may be in `sock` itself, where select cannot see it)."""
        if len(self._turned_away) >= MAX_TURNED_AWAY:
            self._drop(next(iter(self._turned_away)))
        transport = self._transport(sock, refusal=line)
        timers = self.timers
        deadline = timers.call_at(
            timers.clock() + self.config.request_timeout, partial(self._drop, transport)
        )
        self._turned_away[transport] = deadline
        self._turned_away_ready(transport, EVENT_READ)

    def _turned_away_ready(self, transport: WebTransport, events: int) -> None:
        try:
            if events & EVENT_WRITE:
                transport.flush()
            if events & EVENT_READ and not transport.recv(READ_SIZE) and not transport.answered:
                self._drop(transport)  # it left without a request
                return
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(transport)
            return
        if transport.answered:
            self._drop(transport)  # the answer is small: it goes with the close
            return
        events = EVENT_READ | (EVENT_WRITE if transport.wants_write else 0)
        self._watch(transport.raw_socket(), events, partial(self._turned_away_ready, transport))

    def _drop(self, transport: WebTransport) -> None:
        deadline = self._turned_away.pop(transport, None)
        if deadline is None:
            return
        deadline.cancel()
        self._unwatch(transport.raw_socket())
        transport.closing = True
        with contextlib.suppress(OSError):  # as the reactor's _discard_input
            transport.recv(READ_SIZE)
        transport.close()

    def close(self) -> None:
        for transport in list(self._turned_away):
            self._drop(transport)
