"""Monitoring: `GET /metrics` in the Prometheus text format (0.0.4).

PROTOCOL.md, "Monitoring". The server counts events where they happen
(`Stats`, below); this module only renders a snapshot of those counts and
serves it over a minimal HTTP/1.x, in the reactor's own loop, with the same
care as chat connections: each request is read in a bounded buffer, has a
deadline, and is answered and closed. A slow or broken HTTP client costs
one small buffer until its deadline, and never a turn of the chat; nor can
such clients keep a good scrape out: when every slot is taken, the oldest
one gives its slot to the newcomer, and a request is answered in the very
turn its last byte is read.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from selectors import EVENT_READ, EVENT_WRITE
from typing import Final

from host import CLOSE_REASONS, REFUSAL_REASONS, Host, Timer, watch_writes_while

log = logging.getLogger("chat")

# A request line and headers larger than this are no scrape: answered 404.
MAX_REQUEST_BYTES: Final = 8192
# How long one HTTP client may take to send its request and read the answer.
REQUEST_DEADLINE: Final = 5.0
# HTTP clients at once; each one more closes the oldest, so scrapes cannot
# pile up, and clients that never finish their request cannot hold the
# port: a monitoring system's scrape, newer than them, gets a slot.
MAX_SCRAPERS: Final = 16


# The label values of chat_disconnections_total, in the contract's order.
DISCONNECTION_REASONS: Final = tuple(CLOSE_REASONS)
# The label values of the counts per transport (connection.Kind.transport).
TRANSPORTS: Final = ("tcp", "tls", "websocket")


@dataclass
class Stats:
    """What the server counts, incremented where each event happens."""

    accepted: int = 0
    # The same, by transport (Kind.transport): chat_connections_accepted_total.
    accepted_by_transport: Counter[str] = field(default_factory=Counter)
    messages: int = 0  # SENDs accepted
    deliveries: int = 0  # RECEIVE lines handed to members
    bytes_sent: int = 0
    # Waits for a token (--send-rate), summed: counted as each one ends.
    throttled_seconds: float = 0.0
    refused: Counter[str] = field(default_factory=Counter)
    disconnections: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric family: its samples are (labels, value) pairs."""

    name: str
    kind: str  # "gauge" or "counter"
    help: str
    samples: tuple[tuple[dict[str, str], float], ...]


def gauge(name: str, help: str, value: float) -> Metric:
    return Metric(name, "gauge", help, (({}, value),))


def counter(name: str, help: str, value: float) -> Metric:
    return Metric(name, "counter", help, (({}, value),))


def labelled(
    name: str, help: str, label: str, values: Iterable[tuple[str, float]], kind: str = "counter"
) -> Metric:
    """A counter (or `kind`) with one label, one sample per label value."""
    return Metric(name, kind, help, tuple(({label: key}, value) for key, value in values))


def chat_metrics(
    stats: Stats,
    *,
    open_by_transport: Mapping[str, int],
    members: int,
    unsent: int,
    extra: Iterable[Metric] = (),
) -> list[Metric]:
    """Every metric of PROTOCOL.md, "Monitoring", from the server's counts;
    `extra` are the room's own (cluster mode: Redis)."""
    return [
        labelled(
            "chat_connections_open",
            "Client connections open now, by transport.",
            "transport",
            ((transport, open_by_transport.get(transport, 0)) for transport in TRANSPORTS),
            kind="gauge",
        ),
        gauge("chat_members", "Connections that have a name now.", members),
        labelled(
            "chat_connections_accepted_total",
            "Connections accepted (and not refused), by transport.",
            "transport",
            ((transport, stats.accepted_by_transport[transport]) for transport in TRANSPORTS),
        ),
        labelled(
            "chat_connections_refused_total",
            "Connections refused at once, by reason.",
            "reason",
            ((reason, stats.refused[reason]) for reason in REFUSAL_REASONS),
        ),
        labelled(
            "chat_disconnections_total",
            "Connections closed, by reason (refused ones included).",
            "reason",
            ((reason, stats.disconnections[reason]) for reason in DISCONNECTION_REASONS),
        ),
        counter("chat_messages_total", "SEND lines accepted.", stats.messages),
        counter("chat_deliveries_total", "RECEIVE lines handed to members.", stats.deliveries),
        counter("chat_bytes_sent_total", "Bytes sent to clients.", stats.bytes_sent),
        gauge("chat_unsent_bytes", "Output queued for clients and not sent yet.", unsent),
        counter(
            "chat_throttled_seconds_total",
            "Seconds connections spent waiting for a token to send (--send-rate), summed.",
            stats.throttled_seconds,
        ),
        *extra,
    ]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render(metrics: Iterable[Metric]) -> bytes:
    """The text exposition format: HELP and TYPE, then the samples."""
    lines: list[str] = []
    for metric in metrics:
        lines.append(f"# HELP {metric.name} {metric.help}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for labels, value in metric.samples:
            if labels:
                pairs = ",".join(f'{key}="{_escape(text)}"' for key, text in labels.items())
                lines.append(f"{metric.name}{{{pairs}}} {_number(value)}")
            else:
                lines.append(f"{metric.name} {_number(value)}")
    return ("\n".join(lines) + "\n").encode()


def response_for(request: bytes, metrics: Callable[[], Iterable[Metric]]) -> bytes:
    """The whole HTTP answer to a request head (up to its blank line)."""
    method, _, rest = request.partition(b" ")
    target = rest.partition(b" ")[0]
    path = target.partition(b"?")[0]
    if method == b"GET" and path == b"/metrics":
        status = b"200 OK"
        body = render(metrics())
        content_type = b"text/plain; version=0.0.4; charset=utf-8"
    else:
        status = b"404 Not Found"
        body = b"Not found: the metrics are at GET /metrics\n"
        content_type = b"text/plain; charset=utf-8"
    head = b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
    return head % (status, content_type, len(body)) + body


class _Scrape:
    """One HTTP client: its request as it arrives, then the answer going out."""

    __slots__ = ("sock", "request", "answer", "deadline", "wants_write")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.request = b""
        self.answer: memoryview | None = None
        self.deadline: Timer | None = None
        self.wants_write = False  # watched for writing, not reading


class MetricsServer:
    """The HTTP listener of --metrics-port, served by the reactor's loop."""

    def __init__(
        self,
        host: Host,
        address: tuple[str, int],
        metrics: Callable[[], Iterable[Metric]],
        listener: socket.socket | None = None,
    ) -> None:
        """Serves on `listener` if one is given (socket activation), else
        binds `address`."""
        self._host = host
        self._metrics = metrics
        if listener is None:
            family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            listener = socket.create_server(address, family=family)
        self._listener = listener
        self._listener.setblocking(False)
        # In the order they came: the first is the oldest.
        self._scrapes: dict[_Scrape, None] = {}
        host.watch(self._listener, EVENT_READ, self._accept)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    def close(self) -> None:
        for scrape in list(self._scrapes):
            self._finish(scrape)
        self._host.unwatch(self._listener)
        self._listener.close()

    def _accept(self, mask: int) -> None:
        for _ in range(MAX_SCRAPERS):
            try:
                sock, _ = self._listener.accept()
            except OSError:  # none left (BlockingIOError), or out of descriptors
                return
            if len(self._scrapes) >= MAX_SCRAPERS:
                oldest = next(iter(self._scrapes))
                log.debug("metrics: every slot taken, closing the oldest unfinished request")
                self._finish(oldest)
            sock.setblocking(False)
            scrape = _Scrape(sock)
            self._scrapes[scrape] = None
            host = self._host
            scrape.deadline = host.call_at(
                host.now() + REQUEST_DEADLINE, partial(self._finish, scrape)
            )
            host.watch(sock, EVENT_READ, partial(self._ready, scrape))
            # A client sends its request with the handshake: it is often
            # here already, and answered now rather than a turn later.
            self._ready(scrape, EVENT_READ)

    def _ready(self, scrape: _Scrape, events: int) -> None:
        try:
            if scrape.answer is None:
                self._read(scrape)
            if scrape.answer is not None:
                self._write(scrape)
        except OSError:
            self._finish(scrape)

    def _read(self, scrape: _Scrape) -> None:
        try:
            data = scrape.sock.recv(MAX_REQUEST_BYTES)
        except BlockingIOError:
            return
        if not data:
            self._finish(scrape)
            return
        scrape.request += data
        end = scrape.request.find(b"\n\r\n")
        if end < 0:
            end = scrape.request.find(b"\n\n")
        if end < 0 and len(scrape.request) <= MAX_REQUEST_BYTES:
            return  # the rest of the head is still to come
        request_line = scrape.request.partition(b"\n")[0].rstrip(b"\r")
        scrape.answer = memoryview(response_for(request_line, self._metrics))

    def _write(self, scrape: _Scrape) -> None:
        assert scrape.answer is not None
        try:
            sent = scrape.sock.send(scrape.answer)
        except BlockingIOError:
            sent = 0
        scrape.answer = scrape.answer[sent:]
        if not scrape.answer:
            self._finish(scrape)
        else:  # most answers go at once, without an epoll_ctl for writing
            watch_writes_while(scrape, True, self._rewatch)

    def _rewatch(self, scrape: _Scrape) -> None:
        events = EVENT_WRITE if scrape.wants_write else EVENT_READ
        self._host.watch(scrape.sock, events, partial(self._ready, scrape))

    def _finish(self, scrape: _Scrape) -> None:
        if scrape not in self._scrapes:
            return
        del self._scrapes[scrape]
        if scrape.deadline is not None:
            scrape.deadline.cancel()
        self._host.unwatch(scrape.sock)
        with contextlib.suppress(OSError):
            scrape.sock.close()
