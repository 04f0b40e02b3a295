"""Shared test helpers: Hypothesis profiles, an in-process server, a
subprocess server, and a line client whose every read has a timeout."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from chat import ChatServer

HERE = Path(__file__).resolve().parent
# Every blocking read or connect in the tests gives up after this long.
TIMEOUT = 5.0
# The line a client sends to learn that everything it sent before has been
# processed: the server answers each connection's lines in order.
SYNC = b"PING\n"
SYNC_REPLY = b"ERROR Unrecognised command."

# Hypothesis: "ci" is the fixed budget CI runs (derandomized, so a failure
# reproduces; no deadline, since real sockets on a noisy 2-core machine
# have no reliable timing); "soak" is for long local runs; "dev" is a
# quick randomized run.
settings.register_profile(
    "ci",
    max_examples=60,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "soak",
    max_examples=20_000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=30,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class Client:
    """A test's end of one connection: send bytes, read whole lines, each
    read bounded by TIMEOUT."""

    def __init__(self, address: tuple[str, int], timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next line, without its "\\n"; fails on EOF or timeout."""
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; unterminated rest: {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def lines(self, count: int) -> list[bytes]:
        return [self.line() for _ in range(count)]

    def sync(self) -> list[bytes]:
        """Send SYNC and return every line that came before its reply."""
        self.send(SYNC)
        return self.until(SYNC_REPLY)

    def until(self, last: bytes) -> list[bytes]:
        """The lines before `last` (which is consumed too)."""
        seen = []
        while (line := self.line()) != last:
            seen.append(line)
        return seen

    def register(self, name: str) -> None:
        """Take `name`, and fail unless the server accepted it silently."""
        self.send(b"USERNAME " + name.encode() + b"\n")
        assert self.sync() == []

    def read_to_eof(self) -> bytes:
        """Everything until the server closes; fails on timeout. A reset
        counts as the end too."""
        data = self.buffer
        self.buffer = b""
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        return data

    def reset(self) -> None:
        """Close with an RST instead of a FIN: SO_LINGER on, with a zero
        timeout (struct linger is two ints, l_onoff and l_linger)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class RunningServer:
    """A ChatServer serving on a background thread of the test process."""

    server: ChatServer
    thread: threading.Thread
    clients: list[Client] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.server.address[1])

    def client(self) -> Client:
        client = Client(self.address)
        self.clients.append(client)
        return client

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        self.server.stop()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the server did not stop"


def start_server(**options: Any) -> RunningServer:
    server = ChatServer("127.0.0.1", 0, **options)
    thread = threading.Thread(target=server.serve_forever, name="chat-server", daemon=True)
    thread.start()
    return RunningServer(server, thread)


@pytest.fixture
def server() -> Iterator[RunningServer]:
    running = start_server()
    yield running
    running.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    """`python chat.py PORT ...` as a child process."""

    process: subprocess.Popen[bytes]
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def stderr_text(self) -> str:
        """Stop the process if needed; everything it wrote to stderr."""
        try:
            _, err = self.process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return err.decode("utf-8", "replace")


def spawn_server(
    *args: str, port: int | None = None, preexec: Callable[[], None] | None = None
) -> ServerProcess:
    """Start chat.py on a free port and wait until it accepts connections."""
    port = free_port() if port is None else port
    process = subprocess.Popen(
        [sys.executable, str(HERE / "chat.py"), str(port), "--host", "127.0.0.1", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=preexec,
    )
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"chat.py did not start: {process.communicate()[1]!r}") from None
            time.sleep(0.05)
    return ServerProcess(process, port)


@pytest.fixture
def server_process() -> Iterator[ServerProcess]:
    running = spawn_server()
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.communicate()
