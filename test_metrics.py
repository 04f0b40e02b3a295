"""metrics.py: the Prometheus text (`render`), the HTTP answers
(`response_for`), the label values, and the metrics port of the real
server (PROTOCOL.md, "Monitoring"), over real sockets, with the fake clock
for deadlines.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from typing import Final

import pytest

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
    send_line,
    start_server,
)


def scrape(address: tuple[str, int], request: bytes = b"GET /metrics HTTP/1.1\r\n\r\n") -> bytes:
    """One HTTP request to the metrics port; the whole answer."""
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


METRIC_LINE: Final = re.compile(r'^([a-z_]+)(?:\{reason="([a-z_]+)"\})? (\d+(?:\.\d+)?)$')


def parse_metrics(answer: bytes) -> dict[str, float]:
    """The samples of a Prometheus text answer, by `name` or `name{reason}`;
    fails unless every metric has HELP and TYPE lines before its samples."""
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
    "chat_connections_open",
    "chat_members",
    "chat_connections_accepted_total",
    "chat_messages_total",
    "chat_deliveries_total",
    "chat_bytes_sent_total",
    "chat_unsent_bytes",
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
)


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
        lambda: metrics_of(monitored)["chat_connections_open"] == 2,
    )
    samples = metrics_of(monitored)
    assert samples["chat_members"] == 2
    assert samples["chat_connections_accepted_total"] == 3
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


def test_metrics_with_curl_as_in_the_readme() -> None:
    """Monitoring: `--metrics-port` on 127.0.0.1 by default, read with curl."""
    curl = shutil.which("curl")
    if curl is None:
        if os.environ.get("CI"):
            pytest.fail("curl is missing")
        pytest.skip("curl is not installed")
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
