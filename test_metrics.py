"""metrics.py: the Prometheus text (`render`), the HTTP answers
(`response_for`), the label values, and the metrics port of the real
server (PROTOCOL.md, "Monitoring"), over real sockets, with the fake clock
for deadlines.

The scrapes that cannot be locked out (v3): with 50 clients that send
half a request and wait and a few that send garbage, a good `GET /metrics`
is answered at once; those tests freeze time with a FakeClock, so no
request deadline ever fires (an answer cannot come from a slot freed by a
deadline), and one runs the real program on the real clock.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Final

import pytest

import chat
import metrics
from conftest import (
    SERVER_FULL,
    SYNC_REPLY,
    TIMEOUT,
    FakeClock,
    Pumped,
    RunningServer,
    ServerProcess,
    in_process,
    launch,
    poll,
    receive,
    require_tool,
    send_line,
    start_server,
    turns,
)


def scrape(address: tuple[str, int], request: bytes = b"GET /metrics HTTP/1.1\r\n\r\n") -> bytes:
    """One HTTP request on a new connection (a scrape of the metrics port
    unless told); everything until the server closes."""
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


METRIC_LINE: Final = re.compile(
    r'^([a-z_]+)(?:\{(?:reason|transport)="([a-z_]+)"\})? (\d+(?:\.\d+)?)$'
)


def parse_metrics(answer: bytes) -> dict[str, float]:
    """The samples of a Prometheus text answer, by `name` or `name{label}`
    (the value of its one label: a reason or a transport); fails unless
    every metric has HELP and TYPE lines before its samples."""
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Type: text/plain; version=0.0.4" in head
    samples: dict[str, float] = {}
    described: dict[str, set[str]] = {}
    for line in body.decode().splitlines():
        if line.startswith("# "):
            kind, name, _ = line[2:].split(" ", 2)
            described.setdefault(name, set()).add(kind)
            continue
        found = METRIC_LINE.match(line)
        assert found, f"not a sample line: {line!r}"
        name, reason, value = found.groups()
        assert described.get(name) == {"HELP", "TYPE"}, f"{name} has no HELP and TYPE"
        samples[f"{name}{{{reason}}}" if reason else name] = float(value)
    return samples


CONTRACT_METRICS: Final = (
    "chat_connections_open{tcp}",  # by transport: v3
    "chat_connections_open{tls}",
    "chat_connections_open{websocket}",
    "chat_members",
    "chat_connections_accepted_total{tcp}",
    "chat_connections_accepted_total{tls}",
    "chat_connections_accepted_total{websocket}",
    "chat_messages_total",
    "chat_deliveries_total",
    "chat_bytes_sent_total",
    "chat_unsent_bytes",
    "chat_throttled_seconds_total",  # v3
)
# Spelled from PROTOCOL.md, not taken from metrics.py, so that a label
# missing or misspelled there fails here.
DISCONNECTION_REASONS: Final = (
    "client_closed",
    "reset",
    "slow_consumer",
    "memory_budget",
    "timed_out",
    "registration_timeout",
    "per_address",
    "server_full",
    "tls_handshake",
    "server_shutdown",
    "internal_error",
    "protocol_error",  # v3
)


# ============================================================================
# render, response_for and the label values: no sockets
# ============================================================================


def test_render_writes_help_and_type_then_each_sample() -> None:
    """render: per metric # HELP and # TYPE, then its samples; whole numbers
    without a decimal point, others as Python writes them; one "\\n" after
    every line."""
    answer = metrics.render(
        [
            metrics.gauge("chat_members", "Connections that have a name now.", 3.0),
            metrics.counter("chat_ratio", "A fraction.", 0.25),
            metrics.labelled("chat_things_total", "Things.", "reason", [("a", 1), ("b", 0)]),
        ]
    )
    assert answer == (
        b"# HELP chat_members Connections that have a name now.\n"
        b"# TYPE chat_members gauge\n"
        b"chat_members 3\n"
        b"# HELP chat_ratio A fraction.\n"
        b"# TYPE chat_ratio counter\n"
        b"chat_ratio 0.25\n"
        b"# HELP chat_things_total Things.\n"
        b"# TYPE chat_things_total counter\n"
        b'chat_things_total{reason="a"} 1\n'
        b'chat_things_total{reason="b"} 0\n'
    )


def test_render_escapes_label_values() -> None:
    """render: a label value's backslash, newline and double quote are
    escaped as the text format says, so one sample stays one line."""
    answer = metrics.render(
        [metrics.labelled("chat_odd_total", "Odd labels.", "why", [('a\\b\n"c"', 2)])]
    )
    assert answer.splitlines()[-1] == b'chat_odd_total{why="a\\\\b\\n\\"c\\""} 2'


def test_every_close_reason_and_refusal_is_a_label_value() -> None:
    """chat_metrics: chat_disconnections_total has one sample per reason of
    the contract, in its order, and chat_connections_refused_total one per
    refusal, each read from the counts (zero when none happened)."""
    assert metrics.DISCONNECTION_REASONS == DISCONNECTION_REASONS
    stats = metrics.Stats(accepted=5, messages=4, deliveries=3, bytes_sent=2)
    stats.accepted_by_transport.update(tcp=3, tls=1, websocket=1)
    stats.disconnections["reset"] = 7
    stats.refused["per_address"] = 1
    open_now = {"tcp": 4, "websocket": 2}
    families = {
        metric.name: metric
        for metric in metrics.chat_metrics(stats, open_by_transport=open_now, members=1, unsent=9)
    }
    closes = families["chat_disconnections_total"].samples
    assert [labels for labels, _ in closes] == [{"reason": r} for r in DISCONNECTION_REASONS]
    assert dict((labels["reason"], value) for labels, value in closes)["reset"] == 7
    assert sum(value for _, value in closes) == 7
    refusals = families["chat_connections_refused_total"].samples
    assert refusals == (({"reason": "server_full"}, 0), ({"reason": "per_address"}, 1))
    plain = {
        f"{name}{{{next(iter(labels.values()))}}}" if labels else name: value
        for name, family in families.items()
        for labels, value in family.samples
    }
    assert {name: plain[name] for name in CONTRACT_METRICS} == {
        "chat_connections_open{tcp}": 4,
        "chat_connections_open{tls}": 0,
        "chat_connections_open{websocket}": 2,
        "chat_members": 1,
        "chat_connections_accepted_total{tcp}": 3,
        "chat_connections_accepted_total{tls}": 1,
        "chat_connections_accepted_total{websocket}": 1,
        "chat_messages_total": 4,
        "chat_deliveries_total": 3,
        "chat_bytes_sent_total": 2,
        "chat_unsent_bytes": 9,
        "chat_throttled_seconds_total": 0,
    }


def one_metric() -> list[metrics.Metric]:
    return [metrics.gauge("chat_members", "Connections that have a name now.", 1)]


def never_asked() -> list[metrics.Metric]:
    raise AssertionError("the metrics were read for a request that gets none")


@pytest.mark.parametrize(
    "request_line",
    [b"GET /metrics HTTP/1.1", b"GET /metrics?name=chat HTTP/1.0", b"GET /metrics"],
)
def test_response_for_get_metrics_is_the_rendered_text(request_line: bytes) -> None:
    """response_for: GET /metrics (any query, any HTTP/1.x, or none) is a
    200 with the text format's content type, its exact length, and
    Connection: close."""
    body = metrics.render(one_metric())
    assert (
        metrics.response_for(request_line, one_metric)
        == (
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(body)
        )
        + body
    )


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET / HTTP/1.1",
        b"GET /metrics/ HTTP/1.1",
        b"GET /METRICS HTTP/1.1",
        b"HEAD /metrics HTTP/1.1",
        b"POST /metrics HTTP/1.1",
        b"get /metrics HTTP/1.1",
        b"",
        b"\xff\xfe garbage",
    ],
)
def test_response_for_anything_else_is_a_404_without_reading_the_metrics(
    request_line: bytes,
) -> None:
    """response_for: any other request, or none that parses, is a 404 that
    says where the metrics are, and never reads the server's counts."""
    body = b"Not found: the metrics are at GET /metrics\n"
    assert (
        metrics.response_for(request_line, never_asked)
        == (
            b"HTTP/1.1 404 Not Found\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(body)
        )
        + body
    )


# ============================================================================
# The metrics port of the real server
# ============================================================================


@pytest.fixture
def monitored() -> Iterator[RunningServer]:
    running = start_server(metrics_address=("127.0.0.1", 0), max_clients=3)
    yield running
    running.stop()


def metrics_of(running: RunningServer) -> dict[str, float]:
    assert running.server.metrics is not None
    return parse_metrics(scrape(running.server.metrics.address))


def test_metrics_has_every_metric_of_the_contract(monitored: RunningServer) -> None:
    """Monitoring: GET /metrics lists every metric, with # HELP and # TYPE."""
    samples = metrics_of(monitored)
    for name in CONTRACT_METRICS:
        assert name in samples
    for reason in ("server_full", "per_address"):
        assert samples[f"chat_connections_refused_total{{{reason}}}"] == 0
    for reason in DISCONNECTION_REASONS:
        assert samples[f"chat_disconnections_total{{{reason}}}"] == 0
    assert "chat_redis_up" not in samples  # cluster mode only


def test_metrics_count_what_happens(monitored: RunningServer) -> None:
    """Monitoring: connections, members, messages, deliveries, bytes and
    disconnections are counted where they happen."""
    alice, bob = monitored.member("alice"), monitored.member("bob")
    anonymous = monitored.client()
    alice.send(send_line("one") + send_line("two"))
    assert alice.sync() == []
    assert bob.sync() == [receive("alice", "one"), receive("alice", "two")]
    refused = monitored.client()  # the fourth: over max_clients
    assert refused.read_to_eof() == SERVER_FULL + b"\n"
    anonymous.close()
    poll(
        "the closed connection to be counted",
        lambda: metrics_of(monitored)["chat_connections_open{tcp}"] == 2,
    )
    samples = metrics_of(monitored)
    assert samples["chat_members"] == 2
    assert samples["chat_connections_accepted_total{tcp}"] == 3
    assert samples["chat_messages_total"] == 2
    assert samples["chat_deliveries_total"] == 2  # each to bob only
    # Four replies to PING (two syncs each), two RECEIVE lines, the refusal.
    replies = 4 * len(SYNC_REPLY + b"\n")
    lines = len(receive("alice", "one") + receive("alice", "two")) + 2
    assert samples["chat_bytes_sent_total"] == replies + lines + len(SERVER_FULL + b"\n")
    assert samples["chat_unsent_bytes"] == 0
    assert samples["chat_connections_refused_total{server_full}"] == 1
    assert samples["chat_disconnections_total{server_full}"] == 1
    assert samples["chat_disconnections_total{client_closed}"] == 1


def test_metrics_other_requests_get_404(monitored: RunningServer) -> None:
    """Monitoring: any other request gets a 404; a bad one does not touch the chat."""
    assert monitored.server.metrics is not None
    address = monitored.server.metrics.address
    alice = monitored.member("alice")
    for request in (
        b"GET / HTTP/1.1\r\n\r\n",
        b"POST /metrics HTTP/1.1\r\n\r\n",
        b"\xff\xfe garbage\n\n",
        b"GET /metrics" + b"x" * 10_000,  # no end of head within the bound
    ):
        assert scrape(address, request).startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert alice.sync() == []


def test_a_slow_metrics_client_is_dropped_at_its_deadline_and_never_blocks_the_chat() -> None:
    """Monitoring: a slow HTTP client never affects the chat; it is closed
    at its deadline (on the reactor's clock)."""
    clock = FakeClock()
    with in_process(clock=clock, metrics_address=("127.0.0.1", 0)) as server:
        assert server.metrics is not None
        with socket.create_connection(server.metrics.address, timeout=TIMEOUT) as slow:
            slow.sendall(b"GET /metr")  # and nothing more
            client = Pumped(server)
            assert client.sync() == []  # the chat goes on meanwhile
            clock.advance(metrics.REQUEST_DEADLINE)
            server.run_once(max_wait=0)
            slow.settimeout(TIMEOUT)
            assert slow.recv(100) == b""  # closed, unanswered


def test_a_request_head_in_pieces_is_answered_once_whole() -> None:
    """MetricsServer: a request head that comes in pieces waits in its
    bounded buffer until its blank line, then is answered once; a head
    longer than MAX_REQUEST_BYTES without one is answered 404 at once."""
    with in_process(metrics_address=("127.0.0.1", 0)) as server:
        assert server.metrics is not None
        address = server.metrics.address
        with socket.create_connection(address, timeout=TIMEOUT) as scraper:
            scraper.setblocking(False)
            for piece in (b"GET /met", b"rics HTTP/1.1\r\n", b"Host: x\r\n"):
                scraper.sendall(piece)
                turns(server, lambda: False, 5)
                with pytest.raises(BlockingIOError):
                    scraper.recv(100)  # nothing until the head is whole
            scraper.sendall(b"\r\n")
            answer = b""

            def answered() -> bool:
                nonlocal answer
                with contextlib.suppress(BlockingIOError):
                    while chunk := scraper.recv(65536):
                        answer += chunk
                    return True  # closed after the answer
                return False

            turns(server, answered, what="the answer")
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"\r\n\r\n# HELP chat_connections_open " in answer
        with socket.create_connection(address, timeout=TIMEOUT) as flooder:
            flooder.sendall(b"GET /metrics" + b"x" * metrics.MAX_REQUEST_BYTES)
            flooder.setblocking(False)
            reply = b""

            def refused() -> bool:
                nonlocal reply
                with contextlib.suppress(BlockingIOError):
                    while chunk := flooder.recv(65536):
                        reply += chunk
                    return True
                return False

            turns(server, refused, what="the 404")
            assert reply.startswith(b"HTTP/1.1 404 Not Found\r\n")


def test_a_metrics_client_is_closed_exactly_at_its_deadline() -> None:
    """MetricsServer: an unfinished request is kept until REQUEST_DEADLINE
    on the reactor's clock, and closed unanswered then, not before."""
    clock = FakeClock()
    with in_process(clock=clock, metrics_address=("127.0.0.1", 0)) as server:
        assert server.metrics is not None
        with socket.create_connection(server.metrics.address, timeout=TIMEOUT) as slow:
            slow.sendall(b"GET /metrics HTTP/1.1\r\n")  # and no blank line
            slow.setblocking(False)
            turns(server, lambda: False, 5)  # accepted and read
            clock.advance(metrics.REQUEST_DEADLINE - 0.01)
            turns(server, lambda: False, 5)
            with pytest.raises(BlockingIOError):
                slow.recv(100)  # still open, still unanswered
            clock.advance(0.01)
            closed: list[bytes] = []

            def at_end() -> bool:
                with contextlib.suppress(BlockingIOError):
                    closed.append(slow.recv(100))
                return bool(closed)

            turns(server, at_end, what="the close at the deadline")
            assert closed == [b""]


def test_metrics_with_curl_as_in_the_readme() -> None:
    """Monitoring: `--metrics-port` on 127.0.0.1 by default, read with curl."""
    curl = require_tool(shutil.which("curl"), "curl")
    with launch("--metrics-port", "0") as running:
        running.member("alice")
        found = poll_log(running, re.compile(r"metrics at http://127\.0\.0\.1:(\d+)/metrics"))
        result = subprocess.run(
            [curl, "-s", "-i", f"http://127.0.0.1:{found.group(1)}/metrics"],
            capture_output=True,
            timeout=TIMEOUT,
        )
    samples = parse_metrics(result.stdout)
    assert samples["chat_members"] == 1


def poll_log(running: ServerProcess, pattern: re.Pattern[str]) -> re.Match[str]:
    """Wait for a line matching `pattern` in the server's log."""
    found: list[re.Match[str]] = []

    def seen() -> bool:
        match = pattern.search(running.log.text())
        if match:
            found.append(match)
        return match is not None

    poll(f"{pattern.pattern!r} in the log", seen)
    return found[0]


# --- Scrapes that cannot be locked out (v3) ---------------------------------


GOOD_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n"
HALF_REQUEST = b"GET /metr"
# What a bad client may send and then wait: binary, a head far over the
# bound (never ended), headers that are empty, an empty line alone.
GARBAGE = (
    bytes(range(256)) * 4,
    b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"a" * 100_000,
    b"GET /metrics HTTP/1.1\r\n:\r\nX-Empty:\r\n",
    b"\r\n",
)
METRICS_AT = re.compile(r"metrics at http://127\.0\.0\.1:(\d+)/metrics")


@pytest.fixture
def frozen() -> Iterator[tuple[chat.ChatServer, FakeClock]]:
    """A server with a metrics port, turned by the test, its clock frozen."""
    clock = FakeClock()
    server = chat.ChatServer("127.0.0.1", 0, clock=clock, metrics_address=("127.0.0.1", 0))
    try:
        yield server, clock
    finally:
        server.close()


def metrics_address(server: chat.ChatServer) -> tuple[str, int]:
    assert server.metrics is not None
    return server.metrics.address


def open_waiting(address: tuple[str, int], first: bytes) -> socket.socket:
    """An HTTP client that sends `first` (as much as the server takes now)
    and then waits."""
    sock = socket.create_connection(address, timeout=TIMEOUT)
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        sock.send(first)
    return sock


def closed(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` (EOF or reset), without waiting."""
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    return True


def answer_while_turning(server: chat.ChatServer, sock: socket.socket) -> bytes:
    """Everything the server sends `sock` until it closes it, turning the
    server's loop meanwhile; fails after TIMEOUT of real time."""
    answer = b""
    deadline = time.monotonic() + TIMEOUT
    while True:
        assert time.monotonic() < deadline, f"no whole answer, only {answer!r}"
        server.run_once(max_wait=0.005)
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            continue
        except ConnectionResetError:
            return answer
        if not chunk:
            return answer
        answer += chunk


def test_a_good_scrape_is_answered_at_once_among_slow_and_bad_clients(
    frozen: tuple[chat.ChatServer, FakeClock],
) -> None:
    """With 50 clients that sent half a request and a few that sent garbage,
    all waiting, a good GET /metrics is answered, and no deadline had to
    pass for it; the chat goes on."""
    server, _ = frozen
    address = metrics_address(server)
    waiting = [open_waiting(address, HALF_REQUEST) for _ in range(50)]
    waiting += [open_waiting(address, garbage) for garbage in GARBAGE]
    try:
        with socket.create_connection(address, timeout=TIMEOUT) as good:
            good.sendall(GOOD_REQUEST)
            good.setblocking(False)
            answer = answer_while_turning(server, good)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
        assert b'\nchat_connections_open{transport="tcp"} 0\n' in answer
        assert Pumped(server).sync() == []
    finally:
        for sock in waiting:
            sock.close()


def test_the_oldest_unfinished_request_makes_room(
    frozen: tuple[chat.ChatServer, FakeClock],
) -> None:
    """When every slot holds an unfinished request, a new client is taken
    and the oldest waiting one is closed, not the newest."""
    server, _ = frozen
    address = metrics_address(server)
    waiting = [open_waiting(address, HALF_REQUEST) for _ in range(metrics.MAX_SCRAPERS + 1)]
    try:
        oldest, *rest = waiting
        deadline = time.monotonic() + TIMEOUT
        while not closed(oldest):
            assert time.monotonic() < deadline, "the oldest request was never closed"
            server.run_once(max_wait=0.005)
        # The newest was accepted last, so all are in by now; a few more
        # turns, and nobody else has been closed.
        assert Pumped(server).sync() == []
        assert not any(closed(sock) for sock in rest)
    finally:
        for sock in waiting:
            sock.close()


def test_a_request_is_answered_in_the_turn_it_completes(
    frozen: tuple[chat.ChatServer, FakeClock],
) -> None:
    """A whole request that is there when the client is accepted is answered
    in that very turn; one that ends later, in the turn that reads its end."""
    server, _ = frozen
    address = metrics_address(server)
    with socket.create_connection(address, timeout=TIMEOUT) as early:
        early.sendall(GOOD_REQUEST)
        server.run_once(max_wait=TIMEOUT)  # the turn that accepts it
        assert early.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
    with socket.create_connection(address, timeout=TIMEOUT) as late:
        late.sendall(GOOD_REQUEST[:-2])
        late.setblocking(False)
        sync = Pumped(server)
        sync.sync()  # a few turns: it has been accepted and read by now
        assert not closed(late)
        late.sendall(GOOD_REQUEST[-2:])
        server.run_once(max_wait=TIMEOUT)  # the turn that reads the end
        late.settimeout(TIMEOUT)
        assert late.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")


def logged_metrics_port(running: ServerProcess) -> int:
    """The metrics port, from the line the program logs at startup."""
    poll("the metrics port in the log", lambda: METRICS_AT.search(running.log.text()) is not None)
    found = METRICS_AT.search(running.log.text())
    assert found is not None
    return int(found[1])


def test_the_program_answers_a_scrape_among_slow_and_bad_clients() -> None:
    """chat.py --metrics-port, on the real clock: with 50 half requests and
    garbage waiting, a good scrape is answered well before their deadline,
    and the chat goes on."""
    with launch("--metrics-port", "0") as running:
        alice = running.member("alice")
        address = ("127.0.0.1", logged_metrics_port(running))
        waiting = [open_waiting(address, HALF_REQUEST) for _ in range(50)]
        waiting += [open_waiting(address, garbage) for garbage in GARBAGE]
        try:
            start = time.monotonic()
            with socket.create_connection(address, timeout=TIMEOUT) as good:
                good.sendall(GOOD_REQUEST)
                answer = b""
                while chunk := good.recv(65536):
                    answer += chunk
            elapsed = time.monotonic() - start
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
            assert b"\nchat_members 1\n" in answer
            assert elapsed < metrics.REQUEST_DEADLINE, "it waited for a deadline"
            assert alice.sync() == []
        finally:
            for sock in waiting:
                sock.close()
