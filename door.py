"""The door: where connections come in, and the limits on who may.

`Door` accepts from the listeners (`open_listener`, with the options
`tune_for_clients` sets for every accepted socket), refuses connections
over --max-clients and --max-per-address (`address_key`), pauses
accepting when the process runs out of file descriptors, and starts each
connection's --register-timeout. The `TLSPort` is the TLS listener, and
`TLSKind` what its connections' transport (tls.TLSTransport) tells the
loop: a new kind of transport comes in here, with its listener and its
`Kind`, and the read path, the write path and the room stay as they are
(webport.py's web port is one). A listener may `turn_away` the
connections the door refuses, to tell them why in their own terms.

Behind a load balancer (--proxy-protocol): a connection from a trusted
network stays at the door (`Arriving`) until its PROXY header is read
(proxy_header.parse_header), on every listener alike; only then is it let
in, under the client's address the header gives, as if that client had
connected itself. What came after the header is handed to the connection
as its first bytes (`AfterHeader`), so the read path and the transports
(TLS included: the handshake starts after the header) never see a header.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from selectors import EVENT_READ, BaseSelector
from typing import Final, cast

import protocol
from connection import (
    HANDSHAKE,
    READ_SIZE,
    REGISTRATION,
    Close,
    Connection,
    Kind,
    Schedule,
    Transport,
)
from host import CLOSE_REASONS
from metrics import Stats
from proxy_header import (
    DEFAULT_HEADER_TIMEOUT,
    Incomplete,
    Malformed,
    Network,
    parse_header,
    trusted,
)
from timers import Timer, Timers
from tls import TLSConfig, TLSConfigError, TLSTransport, error_detail, load_context

DEFAULT_MAX_CLIENTS: Final = 10_000
DEFAULT_MAX_PER_ADDRESS: Final = 64
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
# The kernel's send buffer of every connection, fixed so that a client that
# never reads costs at most the output limit plus this. Linux doubles what
# is asked for (for its bookkeeping): this gives 256 KiB.
SEND_BUFFER: Final = 128 * 1024
# Exempt from --max-per-address: the machine itself (tests, benchmarks, a
# local proxy). Other loopback addresses count.
_UNCOUNTED_HOSTS: Final = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})

log = logging.getLogger("chat")


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
        # Off again when a reload turns it off (ChatServer.apply_limits).
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
        unacked = UNACKED_LIMIT_WITHOUT_KEEPALIVE
    # In milliseconds. With keepalive on, Linux also uses it to end probing.
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, unacked * 1000)


def listening_socket(
    listener: socket.socket | None,
    host: str | None,
    port: int,
    *,
    keepalive: int,
    reuse_port: bool,
) -> socket.socket:
    """`listener` if one is given (socket activation), else a new one on
    `port`; either way tuned for the clients it will accept."""
    if listener is None:
        listener = open_listener(host, port, reuse_port=reuse_port)
    tune_for_clients(listener, keepalive)
    return listener


def listener_address(listener: socket.socket | None) -> tuple[str, int] | None:
    """Where `listener` listens (its real port, for port 0), if it exists."""
    if listener is None:
        return None
    host, port = listener.getsockname()[:2]
    return host, port


def reloaded_context(cert: str, key: str, what: str) -> ssl.SSLContext | None:
    """The certificate and key read again (SIGHUP), for new connections;
    None, logged, if they cannot be: the old ones stay in use. `what` names
    the port's certificate in the log."""
    try:
        context = load_context(cert, key)
    except TLSConfigError as error:
        log.error("cannot reload the %s: %s; keeping the old one", what, error)
        return None
    log.info("reloaded the %s %s and key %s", what, cert, key)
    return context


# What a socket let in becomes: its socket (or the socket with the bytes
# that came after a PROXY header, AfterHeader), its peer's address for
# the logs, and the key --max-per-address counts it under.
Admit = Callable[[Transport, str, str | None], Connection]


# What a socket refused at the door becomes instead of being closed at
# once: its socket and the ERROR line that says why (the web port answers
# in HTTP's terms first).
TurnAway = Callable[[Transport, bytes], None]


class Listener:
    """Selector tag of a listening socket: what to do with the connections
    it lets in, whether a refusal may be told to them in plain text (not on
    the TLS port: the client would read it as a broken record), and who
    tells it instead of the door, if anyone (`turn_away`)."""

    __slots__ = ("sock", "admit", "plain", "turn_away")

    def __init__(
        self, sock: socket.socket, admit: Admit, plain: bool, turn_away: TurnAway | None = None
    ) -> None:
        self.sock = sock
        self.admit = admit
        self.plain = plain
        self.turn_away = turn_away


class Arriving:
    """A connection from a trusted balancer whose PROXY header has not all
    come yet: its socket, the balancer's address, the listener it came in
    by, the bytes so far, when it was accepted, and its deadline."""

    __slots__ = ("sock", "peer", "balancer", "listener", "data", "accepted_at", "deadline")

    def __init__(
        self,
        sock: socket.socket,
        balancer: tuple[str, int],
        listener: Listener,
        accepted_at: float,
    ) -> None:
        self.sock = sock
        self.balancer = balancer
        self.peer = format_peer(balancer)
        self.listener = listener
        self.data = b""
        self.accepted_at = accepted_at
        self.deadline: Timer | None = None


class AfterHeader:
    """A socket as a connection.Transport whose first read hands out what
    came after the PROXY header in the door's read: the client's first
    bytes (lines, or a TLS ClientHello). They are at most one read of
    READ_SIZE, as the Reader's (and a TLS transport's first) read is, so
    none stay behind where select cannot see them. Once they are out,
    `recv` is the socket's own, as `send` always is: no extra call on any
    later read or write."""

    __slots__ = ("sock", "_first", "recv", "send", "fileno", "close")

    def __init__(self, sock: socket.socket, first: bytes) -> None:
        self.sock = sock
        self._first = first
        self.recv: Callable[[int], bytes] = self._replay
        self.send: Callable[[bytes | bytearray | memoryview], int] = sock.send
        self.fileno: Callable[[], int] = sock.fileno
        self.close: Callable[[], None] = sock.close

    def _replay(self, size: int, /) -> bytes:
        first, self._first = self._first[:size], self._first[size:]
        if not self._first:
            self.recv = self.sock.recv
        return first


class Door:
    """Where connections come in: accepting from the listeners, refusing
    those over the limits (--max-clients, --max-per-address), pausing when
    the process runs out of file descriptors, and timing how long each one
    takes to choose a name (--register-timeout): `expired` is told of
    those that take too long. A connection from `proxy_networks` is let
    in once its PROXY header names the client (see the module's
    docstring); until then it counts towards --max-clients only."""

    def __init__(
        self,
        selector: BaseSelector,
        schedule: Schedule,
        timers: Timers,
        stats: Stats,
        expired: Callable[[Connection], None],
        *,
        max_clients: int,
        max_per_address: int,
        register_timeout: float,
        proxy_networks: Sequence[Network] = (),
    ) -> None:
        self.max_clients = max_clients
        self.max_per_address = max_per_address
        self.register_timeout = register_timeout
        self.open_count = 0
        # Connections let in, by Kind.transport, for
        # chat_connections_open{transport} (open_count also counts those
        # still waiting for a PROXY header).
        self.open_by_transport: Counter[str] = Counter()
        self._selector = selector
        self._schedule = schedule
        self._timers = timers
        self._stats = stats
        self._expired = expired
        self._listeners: list[Listener] = []
        self._per_address: dict[str, int] = {}
        self._paused = False
        self._failing = False  # out of fds since the last good accept
        self._proxy_networks = tuple(proxy_networks)
        self._arriving: dict[Arriving, None] = {}  # headers not read yet

    def open(
        self,
        sock: socket.socket,
        admit: Admit = Connection,
        *,
        plain: bool = True,
        turn_away: TurnAway | None = None,
    ) -> None:
        """Accept from `sock`; `admit` makes each socket let in a connection,
        and `turn_away`, if given, takes each one refused."""
        listener = Listener(sock, admit, plain, turn_away)
        self._listeners.append(listener)
        self._selector.register(sock, EVENT_READ, listener)

    def apply_limits(
        self,
        max_clients: int | None,
        max_per_address: int | None,
        register_timeout: float | None,
        keepalive: int | None,
    ) -> None:
        """New limits (None: unchanged) for the connections let in from now
        on; those already in keep their register timer and keepalive."""
        if max_clients is not None:
            self.max_clients = max_clients
        if max_per_address is not None:
            self.max_per_address = max_per_address
        if register_timeout is not None:
            self.register_timeout = register_timeout
        if keepalive is not None:
            for listener in self._listeners:  # accepted sockets inherit these
                tune_for_clients(listener.sock, keepalive)

    def accept(self, listener: Listener) -> None:
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

    @property
    def listeners(self) -> list[Listener]:
        return list(self._listeners)

    def named(self, conn: Connection) -> None:
        """`conn` has a name, if its USERNAME was taken: its register
        timeout ends."""
        if conn.name is not None:
            self._schedule.cancel_timer(conn, REGISTRATION)

    def left(self, conn: Connection) -> None:
        """`conn` has closed (its timers went with it: Schedule.forget)."""
        self.open_count -= 1
        self.open_by_transport[conn.kind.transport] -= 1
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
        for arriving in list(self._arriving):
            self._turn_away(arriving, "server_shutdown", "")

    def _let_in(self, sock: socket.socket, address: tuple[str, int], listener: Listener) -> None:
        sock.setblocking(False)
        if self.open_count >= self.max_clients:
            peer = format_peer(address)
            log.warning("refused %s: server is full (limit %d)", peer, self.max_clients)
            line = protocol.SERVER_FULL if listener.plain else b""
            self._refuse(sock, line, "server_full", listener.turn_away)
            return
        # Counted from the accept: a balancer's connection holds a
        # descriptor whatever its header will say.
        self.open_count += 1
        accepted_at = self._timers.turn_time
        if self._proxy_networks and trusted(address[0], self._proxy_networks):
            self._await_header(Arriving(sock, address, listener, accepted_at))
            return
        self._admit(sock, address, listener, accepted_at)

    def _admit(
        self,
        sock: socket.socket,
        address: tuple[str, int],
        listener: Listener,
        accepted_at: float,
        *,
        first: bytes = b"",
        via: str = "",
    ) -> None:
        """Let in the client at `address`, unless it is over
        --max-per-address; `first` are bytes of its read already, `via`
        says through which balancer it came, for the log."""
        peer = format_peer(address)
        key = address_key(address[0])
        if key is not None:
            count = self._per_address.get(key, 0)
            if self.max_per_address and count >= self.max_per_address:
                log.warning(
                    "refused %s%s: %d connections from %s already (limit %d)",
                    peer,
                    via,
                    count,
                    key,
                    self.max_per_address,
                )
                self.open_count -= 1
                line = protocol.TOO_MANY_FROM_ADDRESS if listener.plain else b""
                self._refuse(sock, line, "per_address", listener.turn_away, first)
                return
            self._per_address[key] = count + 1
        self._stats.accepted += 1
        conn = listener.admit(AfterHeader(sock, first) if first else sock, peer, key)
        self.open_by_transport[conn.kind.transport] += 1
        self._stats.accepted_by_transport[conn.kind.transport] += 1
        schedule = self._schedule
        schedule.watch_new(conn)
        if first:
            schedule.holds_input(conn)  # read next turn: select cannot see them
        if self.register_timeout:
            # From the accept: a balancer's header is part of that time.
            delay = accepted_at + self.register_timeout - self._timers.turn_time
            schedule.start_timer(conn, REGISTRATION, delay, partial(self._expired, conn))
        log.info("%r connected%s%s", conn, conn.kind.arrival, via)

    # --- behind a load balancer: the PROXY header ---------------------------

    def _await_header(self, arriving: Arriving) -> None:
        """Read `arriving`'s header as it comes, within the register timeout
        (or DEFAULT_HEADER_TIMEOUT without one)."""
        self._arriving[arriving] = None
        timeout = self.register_timeout or DEFAULT_HEADER_TIMEOUT
        arriving.deadline = self._timers.call_at(
            arriving.accepted_at + timeout, partial(self._header_late, arriving, timeout)
        )
        self._selector.register(arriving.sock, EVENT_READ, partial(self._read_header, arriving))
        # A balancer often sends its header with the handshake: it is here
        # already, and the client is let in now rather than a turn later.
        self._read_header(arriving, EVENT_READ)

    def _read_header(self, arriving: Arriving, events: int) -> None:
        """`arriving`'s socket is readable (a handler of the loop's)."""
        if arriving not in self._arriving:
            return  # turned away earlier in this turn
        try:
            data = arriving.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            reason = "timed_out" if error.errno == errno.ETIMEDOUT else "reset"
            self._turn_away(arriving, reason, error.strerror or str(error))
            return
        if not data:
            self._turn_away(arriving, "client_closed", "before the end of its PROXY header")
            return
        arriving.data += data
        parsed = parse_header(arriving.data)
        if isinstance(parsed, Incomplete):
            return
        if isinstance(parsed, Malformed):
            self._turn_away(arriving, "protocol_error", parsed.reason)
            return
        self._forget(arriving)
        # PROXY UNKNOWN, v2 LOCAL and other families: the balancer itself.
        client = arriving.balancer if parsed.source is None else parsed.source
        self._admit(
            arriving.sock,
            client,
            arriving.listener,
            arriving.accepted_at,
            first=arriving.data[parsed.length :],
            via=f" through {arriving.peer} (PROXY v{parsed.version})",
        )

    def _header_late(self, arriving: Arriving, timeout: float) -> None:
        arriving.deadline = None  # it ran
        self._turn_away(arriving, "registration_timeout", f"no PROXY header within {timeout:g} s")

    def _turn_away(self, arriving: Arriving, reason: str, detail: str) -> None:
        """Close `arriving` without a word (a balancer would pass any
        answer on to a client it does not know), for `reason`, one of
        CLOSE_REASONS."""
        self._forget(arriving)
        self.open_count -= 1
        self._stats.disconnections[reason] += 1
        words = CLOSE_REASONS[reason]
        log.info(
            "%s disconnected before its PROXY header: %s",
            arriving.peer,
            f"{words} ({detail})" if detail else words,
        )
        arriving.sock.close()

    def _forget(self, arriving: Arriving) -> None:
        """`arriving` leaves the door's care: out of the selector, its
        deadline cancelled."""
        del self._arriving[arriving]
        if arriving.deadline is not None:
            arriving.deadline.cancel()
            arriving.deadline = None
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(arriving.sock)

    def _refuse(
        self,
        sock: socket.socket,
        line: bytes,
        reason: str,
        turn_away: TurnAway | None,
        first: bytes = b"",
    ) -> None:
        """Refuse `sock` for `reason`, telling it `line` (or letting its
        listener's `turn_away` tell it); `first` are bytes of its input read
        already (after a PROXY header: an HTTP request, on the web port)."""
        self._stats.refused[reason] += 1
        self._stats.disconnections[reason] += 1
        if turn_away is not None:
            turn_away(AfterHeader(sock, first) if first else sock, line)
            return
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
        schedule: Schedule,
        close: Close,
    ) -> None:
        self.config = config
        self.listener: socket.socket | None = None
        self._context = context
        self._schedule = schedule
        self._close = close

    def open(self, door: Door, listener: socket.socket) -> None:
        """Let clients in through `door` from `listener`, the TLS port."""
        self.listener = listener
        door.open(listener, self.admit, plain=False)

    @property
    def address(self) -> tuple[str, int] | None:
        return listener_address(self.listener)

    def reload(self) -> None:
        """Load the certificate and key again, for new connections; on an
        error, log it and keep the old ones."""
        context = reloaded_context(self.config.cert, self.config.key, "TLS certificate")
        if context is not None:
            self._context = context  # connections already open keep theirs

    def admit(self, sock: Transport, peer: str, key: str | None) -> Connection:
        """A socket let in on the TLS port: its connection, handshake to come."""
        transport = TLSTransport(sock, self._context)
        conn = Connection(transport, peer, key, TLS)
        transport.notify = partial(self._changed, conn, transport)
        # The register timeout starts now as well: it includes the handshake.
        self._schedule.start_timer(
            conn, HANDSHAKE, self.config.handshake_timeout, partial(self._expired, conn)
        )
        return conn

    def _changed(self, conn: Connection, tls: TLSTransport) -> None:
        """`conn`'s transport changed what it waits for or holds."""
        if conn.closed:
            return
        schedule = self._schedule
        if tls.established and schedule.cancel_timer(conn, HANDSHAKE):
            log.debug("%r: TLS handshake done (%s)", conn, tls.version())
            if conn.out:  # queued while the handshake went on
                schedule.flush_later(conn)
        if tls.holds_input:
            schedule.holds_input(conn)
        schedule.watch(conn)

    def _expired(self, conn: Connection) -> None:
        if not conn.closed:
            timeout = self.config.handshake_timeout
            self._close(conn, "tls_handshake", f"not finished within {timeout:g} s")


class TLSKind(Kind):
    """A TLS connection's transport, a tls.TLSTransport, as the loop sees
    it: output waits for the handshake; ciphertext the kernel has not
    taken, and input decrypted already, are the transport's own."""

    arrival = " on the TLS port"
    transport = "tls"

    def ready(self, conn: Connection) -> bool:
        return cast(TLSTransport, conn.sock).established

    def failed_before_ready(self, conn: Connection, error: OSError) -> tuple[str, str]:
        return "tls_handshake", error_detail(error)

    def pending_output(self, conn: Connection) -> bool:
        return cast(TLSTransport, conn.sock).wants_write

    def holds_input(self, conn: Connection) -> bool:
        return cast(TLSTransport, conn.sock).holds_input

    def flush(self, conn: Connection) -> None:
        cast(TLSTransport, conn.sock).flush()


TLS: Final = TLSKind()
