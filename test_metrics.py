"""metrics.py's MetricsServer under clients that never finish: a good
`GET /metrics` is answered at once, whatever slow or broken HTTP clients
hold the port (PROTOCOL.md, "Monitoring", v3).

The in-process tests freeze time with a FakeClock, so no request deadline
ever fires: an answer there cannot have come from a slot freed by a
deadline. The child-process test runs the real program on the real clock.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Iterator

import pytest

import chat
import metrics
from conftest import TIMEOUT, FakeClock, Pumped, ServerProcess, launch, poll

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
