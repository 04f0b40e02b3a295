"""Shared test helpers: Hypothesis profiles, an in-process server, a
subprocess server, and a line client whose every read has a timeout."""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

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
    max_examples=int(os.environ.get("SOAK_EXAMPLES", "20000")),
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
    """A port no socket holds now, chosen below the kernel's ephemeral range
    so that no client socket of the tests (thousands of them) can take it
    before the server binds it."""
    low, _ = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(100):
        port = random.randrange(max(1024, low - 12_000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


class StderrReader(threading.Thread):
    """Reads a child's stderr as it comes: the server logs every connection,
    so a test with hundreds of them would otherwise fill the 64 KiB pipe and
    block the server on a log write. Also lets a test wait for a log line."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(name="stderr-reader", daemon=True)
        self.fd = stream.fileno()
        self.chunks: list[bytes] = []
        self.lock = threading.Lock()
        self.start()

    def run(self) -> None:
        # os.read, not the buffered stream: it returns what is there now.
        while chunk := os.read(self.fd, 65536):
            with self.lock:
                self.chunks.append(chunk)

    def text(self) -> str:
        with self.lock:
            return b"".join(self.chunks).decode("utf-8", "replace")

    def wait_for(self, needle: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting for {needle!r} in the server's log")
            time.sleep(0.01)


@dataclass
class ServerProcess:
    """`python chat.py PORT ...` as a child process."""

    process: subprocess.Popen[bytes]
    port: int
    stderr: StderrReader

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def stderr_text(self) -> str:
        """Stop the process if needed; everything it wrote to stderr."""
        try:
            self.process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.stderr.join(TIMEOUT)
        return self.stderr.text()


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
    assert process.stderr is not None
    running = ServerProcess(process, port, StderrReader(process.stderr))
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
        except OSError:
            pass
        else:
            if process.poll() is None:
                return running
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"chat.py did not start: {running.stderr_text()}")
        time.sleep(0.05)


@pytest.fixture
def server_process() -> Iterator[ServerProcess]:
    running = spawn_server()
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.communicate()
