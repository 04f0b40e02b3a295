"""What every test file shares: the contract's lines, typed from PROTOCOL.md;
one way to wait (`poll`); the test clients; the servers, on a thread
(`start_server`, the `server` fixture), turned by the test itself
(`in_process`, `turns`, `Pumped`, with a `FakeClock`) or as a `python
chat.py` child (`launch`); and the Hypothesis profiles. The rest of the
shared machinery is in chat_testing.py.

Every blocking read or connect gives up after TIMEOUT; nothing waits on
the clock for an event it could observe instead.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import random
import re
import resource
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import IO, Any, Final, cast

import pytest
from hypothesis import HealthCheck, settings

from chat import ChatServer

HERE = Path(__file__).resolve().parent
# Every blocking read or connect in the tests gives up after this long.
TIMEOUT: Final = 5.0

# --- The contract's lines, typed from PROTOCOL.md ---------------------------
#
# Every line the server may send but RECEIVE, without its "\n". Typed here,
# never imported from protocol.py, so that a typo there fails the tests
# instead of being compared with itself.

LINE_TOO_LONG: Final = b"ERROR Line too long."
NAME_EMPTY: Final = b"ERROR Username cannot be empty."
NAME_INVALID: Final = b"ERROR Username contains invalid characters."
NAME_HAS_SPACES: Final = b"ERROR Username contains empty spaces."
NAME_TOO_LONG: Final = b"ERROR Username is too long."
NAME_TAKEN: Final = b"ERROR Username already in use."
NAME_REQUIRED: Final = b"ERROR You must set a username first."
MESSAGE_EMPTY: Final = b"ERROR Message cannot be empty."
MESSAGE_INVALID: Final = b"ERROR Message contains invalid characters."
UNRECOGNISED: Final = b"ERROR Unrecognised command."
SERVER_FULL: Final = b"ERROR Server is full."
SERVICE_UNAVAILABLE: Final = b"ERROR Service unavailable."  # cluster mode
TIMED_OUT_WAITING: Final = b"ERROR Timed out waiting for USERNAME."
TOO_MANY_FROM_ADDRESS: Final = b"ERROR Too many connections from your address."
ERRORS: Final = frozenset(
    {
        LINE_TOO_LONG,
        NAME_EMPTY,
        NAME_INVALID,
        NAME_HAS_SPACES,
        NAME_TOO_LONG,
        NAME_TAKEN,
        NAME_REQUIRED,
        MESSAGE_EMPTY,
        MESSAGE_INVALID,
        UNRECOGNISED,
        SERVER_FULL,
        SERVICE_UNAVAILABLE,
        TIMED_OUT_WAITING,
        TOO_MANY_FROM_ADDRESS,
    }
)

MAX_LINE: Final = 4096  # bytes, not counting "\r\n" or "\n"
MAX_NAME: Final = 32  # code points

# The startup log line, "listening on HOST:PORT" (an IPv6 HOST in brackets).
LISTENING: Final = re.compile(
    r"listening on \[?([^\]\s]*)\]?:(\d+)(?: \([^)]*\))?\s*$", re.MULTILINE
)
# With --tls-port, the next one: "listening for TLS on HOST:PORT".
LISTENING_TLS: Final = re.compile(
    r"listening for TLS on \[?([^\]\s]*)\]?:(\d+)(?: \([^)]*\))?\s*$", re.MULTILINE
)

# The line a client sends to learn that everything it sent before has been
# processed: the server answers each connection's lines in order, and an
# unknown command's reply proves every line before it was processed.
SYNC: Final = b"PING\n"
SYNC_REPLY: Final = UNRECOGNISED


def username(name: str | bytes, end: bytes = b"\n") -> bytes:
    """The line `USERNAME <name>`, ended with `end`."""
    raw = name.encode() if isinstance(name, str) else name
    return b"USERNAME " + raw + end


def send_line(message: str | bytes, end: bytes = b"\n") -> bytes:
    """The line `SEND <message>`, ended with `end`."""
    raw = message.encode() if isinstance(message, str) else message
    return b"SEND " + raw + end


def sends(messages: list[bytes]) -> bytes:
    """One SEND line for each message, together."""
    return b"".join(send_line(message) for message in messages)


def receive(name: str, message: str | bytes) -> bytes:
    """A RECEIVE line as a client sees it, without its "\\n"."""
    raw = message.encode() if isinstance(message, str) else message
    return b"RECEIVE " + name.encode() + b" " + raw


def receives(name: str, messages: list[bytes]) -> list[bytes]:
    return [receive(name, message) for message in messages]


# --- Waiting -----------------------------------------------------------------


def require_tool(found: str | None, missing: str, *, module: bool = False) -> str:
    """`found` (a program's path, say), or: the test is skipped for want of
    `missing`, or fails in CI, which installs everything the tests use
    (.ci/run). `module`: the whole test module is skipped."""
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{missing} is missing", pytrace=False)
        pytest.skip(f"{missing} is not installed", allow_module_level=module)
    return found


def poll(what: str, check: Callable[[], bool], timeout: float = TIMEOUT) -> float:
    """Call `check` until it is true; fail after `timeout` seconds; how long
    it took. For what a test cannot sync on (a name freed by a reset, a log
    line, Redis, the kernel noticing a dead peer)."""
    start = time.monotonic()
    pace = 0.001  # doubling to 20 ms: quick for what comes at once, cheap for the rest
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"gave up after {timeout} s waiting for {what}")
        time.sleep(pace)
        pace = min(2 * pace, 0.02)
    return time.monotonic() - start


# --- Hypothesis profiles -------------------------------------------------------
#
# "ci" is the fixed budget CI runs (derandomized, so a failure reproduces; no
# deadline, since real sockets on a noisy 2-core machine have no reliable
# timing); "soak" is for long local runs; "dev" is a quick randomized run.

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


# --- Test clients ----------------------------------------------------------------


class FakeClock:
    """What a ChatServer's timers read in a test that drives time itself
    (`ChatServer(clock=...)`, then `run_once`): it moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- An in-process server driven from the test thread (with a FakeClock) -----


@contextlib.contextmanager
def in_process(**options: Any) -> Iterator[ChatServer]:
    """A ChatServer on port 0 of 127.0.0.1 that runs only when the test
    turns its loop (`run_once`, `turns`, a `Pumped` client); closed when the
    block ends. `options` are ChatServer's keyword arguments."""
    server = ChatServer("127.0.0.1", 0, **options)
    try:
        yield server
    finally:
        server.close()


def turns(
    server: ChatServer,
    until: Callable[[], bool],
    count: int | None = None,
    *,
    what: str = "the awaited event",
    each: Callable[[], object] | None = None,
) -> bool:
    """Turn `server`'s loop in this thread (`run_once`; a fake clock stands
    still) until `until()`, calling `each` after every turn: by default for
    up to TIMEOUT of real time, then fail saying `what`; or for at most
    `count` turns, and say whether it came true (for what must not happen)."""
    deadline = time.monotonic() + TIMEOUT
    done = 0
    while not until():
        if done == count:
            return False
        assert count is not None or time.monotonic() < deadline, f"gave up waiting for {what}"
        server.run_once(max_wait=0.01)
        if each is not None:
            each()
        done += 1
    return True


class Pumped:
    """A client of a ChatServer that runs in this very thread: every wait
    turns the server's loop (`run_once`) until the awaited bytes arrive,
    bounded by TIMEOUT of real time."""

    def __init__(
        self,
        server: ChatServer,
        *,
        rcvbuf: int | None = None,
        make: Callable[[], socket.socket] = socket.socket,
        address: tuple[str, int] | None = None,
    ) -> None:
        self.server = server
        sock = make()
        if rcvbuf is not None:  # before connecting: the window scale is set then
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(TIMEOUT)
        # The kernel completes the handshake before the server accepts.
        sock.connect(address or ("127.0.0.1", server.address[1]))
        sock.setblocking(False)
        self.sock = sock
        self.buffer = b""
        self.eof = False
        self.reset = False

    def pump(self) -> None:
        self.server.run_once(max_wait=0.005)
        self.take_available()

    def take_available(self, limit: int = 1 << 30) -> int:
        """Read what the kernel holds now (at most about `limit` bytes)."""
        taken = 0
        while not self.eof and taken < limit:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                break
            except ConnectionResetError:
                self.eof = self.reset = True
                break
            if not chunk:
                self.eof = True
                break
            self.buffer += chunk
            taken += len(chunk)
        return taken

    def pump_until(self, done: Callable[[], bool], what: str) -> None:
        """`turns` of the server, reading what arrives after each."""
        turns(self.server, done, what=what, each=self.take_available)

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + TIMEOUT
        while view:
            try:
                view = view[self.sock.send(view) :]
            except BlockingIOError:
                assert time.monotonic() < deadline, "the server stopped reading"
                self.server.run_once(max_wait=0.005)

    def sync(self) -> list[bytes]:
        """Send PING; every line before its reply."""
        self.send(SYNC)
        marker = SYNC_REPLY + b"\n"
        self.pump_until(lambda: marker in self.buffer or self.eof, "the reply to PING")
        assert marker in self.buffer, f"closed before the reply to PING: {self.buffer!r}"
        before, _, self.buffer = self.buffer.partition(marker)
        return before.split(b"\n")[:-1]

    def register(self, name: str) -> None:
        self.send(f"USERNAME {name}\n".encode())
        assert self.sync() == []

    def read_to_eof(self) -> bytes:
        self.pump_until(lambda: self.eof, "the server to close the connection")
        data, self.buffer = self.buffer, b""
        return data

    def close(self) -> None:
        self.sock.close()


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

    def exactly(self, size: int) -> bytes:
        """The next `size` bytes, through the line buffer; each recv is
        bounded by the socket's timeout."""
        data = self.buffer
        while len(data) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed after {data!r}")
            data += chunk
        self.buffer = data[size:]
        return data[:size]

    def sync(self) -> list[bytes]:
        """Send SYNC and return every line that came before its reply."""
        self.send(SYNC)
        return self.until(SYNC_REPLY)

    def sync_unrecognised(self) -> list[bytes]:
        """Like `sync`, for tests that expect `ERROR Unrecognised command.`
        (the reply to SYNC): syncs with a bare `USERNAME`, which is refused
        as empty and changes nothing, and returns every line before its reply."""
        self.send(b"USERNAME\n")
        return self.until(NAME_EMPTY)

    def until(self, last: bytes) -> list[bytes]:
        """The lines before `last` (which is consumed too)."""
        seen = []
        while (line := self.line()) != last:
            seen.append(line)
        return seen

    def register(self, name: str) -> None:
        """Take `name`, and fail unless the server accepted it silently."""
        self.send(username(name))
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

    def half_close(self) -> bytes:
        """Send end of input; return everything until the server closes."""
        self.sock.shutdown(socket.SHUT_WR)
        return self.read_to_eof()

    def reset(self) -> None:
        """Close with an RST instead of a FIN: SO_LINGER on, with a zero
        timeout. (struct linger is two ints, l_onoff and l_linger; a non-zero
        l_linger would be an ordinary close that waits, with a FIN.)"""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SmallWindowClient(Client):
    """A client with a small receive buffer (4 KiB), so that what it does not
    read piles up on the server's side, not in its own kernel buffer. The
    option must be set before connecting (it fixes the window scale), so
    this does not call Client.__init__, which connects at once."""

    def __init__(self, address: tuple[str, int], receive_buffer: int = 4096) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            sock.settimeout(TIMEOUT)
            sock.connect(address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.buffer = b""


def nc_path() -> str:
    path = shutil.which("nc")
    assert path is not None, "nc (netcat-openbsd) is required: apt-get install netcat-openbsd"
    return path


class Netcat:
    """`nc -N 127.0.0.1 PORT` (or another `command`, such as `ncat --ssl`),
    typed into through a pipe; its stdout is read by a thread, and every
    wait for it has a deadline."""

    def __init__(self, port: int, command: list[str] | None = None) -> None:
        self.process = subprocess.Popen(
            command or [nc_path(), "-N", "127.0.0.1", str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.output = b""
        self.seen = 0  # how much of `output` sync has consumed
        self.closed = False
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while chunk := os.read(fd, 65536):
            with self.changed:
                self.output += chunk
                self.changed.notify_all()
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def type(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def sync(self) -> list[bytes]:
        """Type PING; the lines nc printed before the reply."""
        self.type(SYNC)
        marker = SYNC_REPLY + b"\n"
        with self.changed:
            found = self.changed.wait_for(
                lambda: marker in self.output[self.seen :] or self.closed, TIMEOUT
            )
            assert found and marker in self.output[self.seen :], self.output
            end = self.output.index(marker, self.seen)
            lines = self.output[self.seen : end].split(b"\n")[:-1]
            self.seen = end + len(marker)
        return lines

    def finish(self) -> bytes:
        """Close nc's stdin (-N sends end of input); all it printed."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(TIMEOUT)
        self.reader.join(TIMEOUT)
        assert self.closed
        assert self.process.returncode == 0
        return self.output

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(TIMEOUT)
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


# --- The server in the test process ----------------------------------------------


class OpensClients:
    """What both server handles offer a test: clients of the server, closed
    with it. Needs `address` and `clients`."""

    clients: list[Client]

    @property
    def address(self) -> tuple[str, int]:
        raise NotImplementedError

    def client(self) -> Client:
        client = Client(self.address)
        self.clients.append(client)
        return client

    def small_window_client(self) -> Client:
        client = SmallWindowClient(self.address)
        self.clients.append(client)
        return client

    def member(self, name: str) -> Client:
        """A new client that has taken `name`. Its sync reply also proves
        the server's loop is running."""
        client = self.client()
        client.register(name)
        return client


@dataclass
class RunningServer(OpensClients):
    """A ChatServer serving on a background thread of the test process."""

    server: ChatServer
    thread: threading.Thread
    clients: list[Client] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.server.address[1])

    def tls_client(self, receive_buffer: int | None = None) -> TLSClient:
        """A client of the TLS port (the server was started with `tls`)."""
        address = self.server.tls_address
        assert address is not None, "no TLS port"
        client = TLSClient(("127.0.0.1", address[1]), receive_buffer=receive_buffer)
        self.clients.append(client)
        return client

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        self.server.stop()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the server did not stop"


def start_server(host: str | None = "127.0.0.1", **options: Any) -> RunningServer:
    """A ChatServer on port 0 of `host` (None: every interface), serving on
    a thread; `options` are ChatServer's keyword arguments."""
    server = ChatServer(host, 0, **options)
    thread = threading.Thread(target=server.serve_forever, name="chat-server", daemon=True)
    thread.start()
    return RunningServer(server, thread)


@pytest.fixture
def server() -> Iterator[RunningServer]:
    running = start_server()
    yield running
    running.stop()


# --- chat.py as a child process ----------------------------------------------------


class StderrReader(threading.Thread):
    """Reads a child's stderr as it comes: the server logs every connection,
    so a test with hundreds of them would otherwise fill the 64 KiB pipe and
    block the server on a log write."""

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


@dataclass
class ServerProcess(OpensClients):
    """`python chat.py ...` as a child process, its drained stderr, and the
    clients a test opened through it (closed when `launch` ends)."""

    process: subprocess.Popen[bytes]
    port: int
    log: StderrReader
    clients: list[Client] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def tls_port(self) -> int:
        """The TLS port, from the startup log (launched with --tls-port)."""
        # Logged right after the line `launch` waited for.
        poll("the TLS port in the log", lambda: LISTENING_TLS.search(self.log.text()) is not None)
        found = LISTENING_TLS.search(self.log.text())
        assert found is not None
        return int(found[2])

    def tls_client(self) -> TLSClient:
        client = TLSClient(("127.0.0.1", self.tls_port))
        self.clients.append(client)
        return client

    def stderr_text(self) -> str:
        """Wait for the process to end (kill it after TIMEOUT); everything
        it wrote to stderr."""
        try:
            self.process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.join(TIMEOUT)
        return self.log.text()

    def finish(self, signum: int = signal.SIGTERM) -> str:
        """Stop the server as an operator would (SIGTERM by default) and
        return its stderr, after checking that it exited 0 without a
        traceback."""
        self.process.send_signal(signum)
        returncode = self.process.wait(TIMEOUT)
        self.log.join(TIMEOUT)
        text = self.log.text()
        assert returncode == 0, text
        assert "Traceback" not in text, text
        return text

    # What /proc says about the process.

    def cpu_seconds(self) -> float:
        """User + system CPU time, from /proc/<pid>/stat."""
        with open(f"/proc/{self.pid}/stat") as stat:
            # The command name (field 2) may hold spaces; it ends at the last ")".
            fields = stat.read().rpartition(")")[2].split()
        # fields[0] is field 3 (state), so utime (14) and stime (15) are 11 and 12.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def status_kib(self, key: str) -> int:
        """A "kB" line of /proc/<pid>/status, such as VmRSS or VmHWM."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name == key:
                    return int(value.split()[0])
        raise KeyError(key)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


def _hides_info(args: tuple[str, ...]) -> bool:
    """Whether `args` set a log level above INFO, which hides the startup
    line."""
    levels = [value for option, value in pairwise(args) if option == "--log-level"]
    levels += [arg.partition("=")[2] for arg in args if arg.startswith("--log-level=")]
    return bool(levels) and levels[-1].upper() in ("WARNING", "ERROR")


def listening_ports(pid: int) -> list[int]:
    """The ports of the listening TCP sockets process `pid` holds, from
    /proc: its descriptors name socket inodes, /proc/<pid>/net/tcp{,6} their
    ports (state 0A is LISTEN)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    ports = []
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    ports.append(int(fields[1].rpartition(":")[2], 16))
    return ports


def _listening_port(pid: int) -> int | None:
    """The port of a listening TCP socket that process `pid` holds."""
    ports = listening_ports(pid)
    return ports[0] if ports else None


@contextlib.contextmanager
def launch(
    *args: str,
    port: int = 0,
    host: str | None = "127.0.0.1",
    preexec: Callable[[], None] | None = None,
) -> Iterator[ServerProcess]:
    """`python chat.py PORT --host HOST ARGS...` (no --host when `host` is
    None), once it is listening; killed when the block ends, and its stderr
    printed if the block failed.

    The port is 0 and the real one is read from the startup log line, so
    no other process can take it in between (tests here open thousands of
    connections, and other test runs share the machine). Only a test of
    --reuse-port passes a `port`: the one another server already holds.
    Where a log level above INFO hides that line, the port is read from the
    process's listening socket in /proc instead."""
    host_args = [] if host is None else ["--host", host]
    process = subprocess.Popen(
        [sys.executable, str(HERE / "chat.py"), str(port), *host_args, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=preexec,
    )
    assert process.stderr is not None
    log = StderrReader(process.stderr)
    served: ServerProcess | None = None
    failed = False
    try:
        found: list[int] = []
        hides_info = _hides_info(args)

        def listening() -> bool:
            if hides_info:
                real = _listening_port(process.pid)
            else:
                line = LISTENING.search(log.text())
                real = None if line is None else int(line[2])
            if real is not None:
                found.append(real)
            return real is not None or process.poll() is not None

        poll("chat.py to listen", listening)
        assert found and process.poll() is None, f"chat.py did not start: {log.text()}"
        served = ServerProcess(process, found[0], log)
        yield served
    except BaseException:
        failed = True
        raise
    finally:
        for client in [] if served is None else served.clients:
            client.close()
        if process.poll() is None:
            process.kill()
        process.wait(TIMEOUT)
        log.join(TIMEOUT)
        if failed:  # pytest shows this with the failure
            print("--- the server's stderr (last 20,000 characters) ---")
            print(log.text()[-20_000:])


def run_chat(*args: str) -> subprocess.CompletedProcess[bytes]:
    """`python chat.py ARGS...` run to completion, for command lines that
    must not serve (--help, bad options)."""
    return subprocess.run(
        [sys.executable, str(HERE / "chat.py"), *args],
        capture_output=True,
        timeout=3 * TIMEOUT,
        check=False,
    )


def free_port() -> int:
    """A port no socket holds now, chosen below the kernel's ephemeral range
    so that no client socket of the tests (thousands of them) can take it
    before it is bound. Only for redis-server, which cannot report a port 0
    (for chat.py, `launch` binds port 0)."""
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


def raise_fd_limit(needed: int) -> None:
    """Let this process hold `needed` descriptors (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# --- TLS -----------------------------------------------------------------------------
#
# Certificates are made at test time, once per session, with the openssl
# command: P-256 keys (quick to make), for the name localhost and 127.0.0.1.


@dataclass(frozen=True)
class TLSFiles:
    """Two certificates with their keys (the second, to replace the first)."""

    cert: Path
    key: Path
    other_cert: Path
    other_key: Path


def make_certificate(directory: Path, stem: str) -> tuple[Path, Path]:
    """A self-signed certificate and its key, `stem`.pem and `stem`.key."""
    cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-subj", f"/CN=localhost/O={stem}",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=3 * TIMEOUT,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = make_certificate(directory, "first")
    other_cert, other_key = make_certificate(directory, "second")
    TLSClient.trusted = [cert, other_cert]
    return TLSFiles(cert, key, other_cert, other_key)


def client_context(*trusted: Path) -> ssl.SSLContext:
    """A client's context that trusts `trusted` (none: verifies nothing)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if trusted:
        for cert in trusted:
            context.load_verify_locations(cert)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class TLSClient(Client):
    """A Client over TLS (an ssl.SSLSocket, blocking with a timeout), which
    verifies the server's certificate against the session's test
    certificates (the `tls_files` fixture sets `trusted`)."""

    trusted: list[Path] = []  # noqa: RUF012 (set once per session)

    def __init__(
        self,
        address: tuple[str, int],
        timeout: float = TIMEOUT,
        receive_buffer: int | None = None,
    ) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if receive_buffer is not None:  # before connecting: it fixes the window scale
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            raw.settimeout(timeout)
            raw.connect(address)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = client_context(*self.trusted).wrap_socket(raw, server_hostname="localhost")
        except BaseException:
            raw.close()
            raise
        self.buffer = b""

    def peer_certificate(self) -> bytes:
        """The server's certificate, DER."""
        assert isinstance(self.sock, ssl.SSLSocket)
        der = self.sock.getpeercert(binary_form=True)
        assert der is not None
        return der

    def read_to_eof(self) -> bytes:
        data = self.buffer
        self.buffer = b""
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
        except (ConnectionResetError, ssl.SSLZeroReturnError, ssl.SSLEOFError):
            pass
        return data

    def half_close(self) -> bytes:
        """End of input as a TLS client can say it and still read the
        answers: a TCP half-close, without close_notify (after sending
        close_notify, OpenSSL refuses the peer's data: "application data
        after close notify"); then everything until the server closes.
        SSLSocket.shutdown would drop the TLS layer first, hence the plain
        socket's method."""
        socket.socket.shutdown(self.sock, socket.SHUT_WR)
        return self.read_to_eof()


def certificate_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


# --- A WebSocket client, frames spelled here from RFC 6455 ---------------------

# Opcodes (RFC 6455, 5.2).
WS_CONTINUATION: Final = 0x0
WS_TEXT: Final = 0x1
WS_BINARY: Final = 0x2
WS_CLOSE: Final = 0x8
WS_PING: Final = 0x9
WS_PONG: Final = 0xA


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True
) -> bytes:
    """One frame as a client sends it: masked with a random key (unless
    `masked` is False, which RFC 6455 forbids), `rsv` in bits 4-6."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    size = len(payload)
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head = bytes((first, mask_bit | size))
    elif size < 1 << 16:
        head = bytes((first, mask_bit | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((first, mask_bit | 127)) + size.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = os.urandom(4)
    stream = (key * (size // 4 + 1))[:size]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(size, "big")
    return head + key + body


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


def server_frame(buffer: bytes) -> tuple[int, bytes, int] | None:
    """The first whole frame a server sent in `buffer`: its opcode, its
    payload and its size; None while it is incomplete. Fails on a masked
    frame or a fragment: the server sends neither."""
    if len(buffer) < 2:
        return None
    first, second = buffer[0], buffer[1]
    assert first & 0x80 and not first & 0x70, f"fragment or reserved bits: {buffer[:2]!r}"
    assert not second & 0x80, "a masked server frame"
    size, start = second & 0x7F, 2
    if size == 126:
        if len(buffer) < 4:
            return None
        size, start = int.from_bytes(buffer[2:4], "big"), 4
    elif size == 127:
        if len(buffer) < 10:
            return None
        size, start = int.from_bytes(buffer[2:10], "big"), 10
    if len(buffer) < start + size:
        return None
    return first & 0x0F, buffer[start : start + size], start + size


def upgrade_request(
    path: str = "/chat", key: bytes = b"dGhlIHNhbXBsZSBub25jZQ==", extra: bytes = b""
) -> bytes:
    """A browser's handshake request (RFC 6455, 4.1), with `extra` header lines."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n".encode()
        + b"Sec-WebSocket-Key: "
        + key
        + b"\r\n"
        + extra
        + b"\r\n"
    )


def accept_for(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for `key`, computed here (RFC 6455, 4.2.2)."""
    digest = hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    return base64.b64encode(digest)


class LinesOverWebSocket:
    """A WebSocket connection that looks like a socket of lines to `Client`:
    `sendall` sends each whole line as one binary message, without its
    "\\n" (an unfinished line waits for the rest); `recv` returns each
    message the server sends as a "\\n"-ended line, answers pings, and
    returns b"" after the server's close frame (its code in `close_code`);
    `shutdown(SHUT_WR)` is the client's side of the closing handshake,
    after the unfinished line, if any, as the last message."""

    def __init__(
        self,
        address: tuple[str, int],
        timeout: float = TIMEOUT,
        *,
        context: ssl.SSLContext | None = None,
        receive_buffer: int | None = None,
        source: str | None = None,
        extra: bytes = b"",
    ) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:  # before connecting: it fixes the window scale
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        if source is not None:
            raw.bind((source, 0))
        raw.settimeout(timeout)
        raw.connect(address)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.raw = raw if context is None else context.wrap_socket(raw, server_hostname="localhost")
        key = base64.b64encode(os.urandom(16))
        self.raw.sendall(upgrade_request(key=key, extra=extra))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.raw.recv(4096)
            if not chunk:
                raise EOFError(f"closed during the handshake: {head!r}")
            head += chunk
        head, _, self.incoming = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert b"\r\nSec-WebSocket-Accept: " + accept_for(key) in head, head
        self.unfinished = b""
        self.close_code: int | None = None
        self.closed = False  # the server's close frame has come

    def sendall(self, data: bytes) -> None:
        *lines, self.unfinished = (self.unfinished + data).split(b"\n")
        if lines:
            self.raw.sendall(b"".join(client_frame(WS_BINARY, line) for line in lines))

    def send_frames(self, frames: bytes) -> None:
        self.raw.sendall(frames)

    def frame(self) -> tuple[int, bytes] | None:
        """The server's next frame; None at the end of the stream."""
        while (found := server_frame(self.incoming)) is None:
            chunk = self.raw.recv(65536)
            if not chunk:
                assert not self.incoming, f"closed inside a frame: {self.incoming!r}"
                return None
            self.incoming += chunk
        opcode, payload, size = found
        self.incoming = self.incoming[size:]
        return opcode, payload

    def recv(self, size: int) -> bytes:
        while not self.closed:
            found = self.frame()
            if found is None:
                return b""
            opcode, payload = found
            if opcode in (WS_TEXT, WS_BINARY):
                return payload + b"\n"
            if opcode == WS_PING:
                self.raw.sendall(client_frame(WS_PONG, payload))
            elif opcode == WS_CLOSE:
                self.closed = True
                self.close_code = int.from_bytes(payload[:2], "big") if payload else None
        return b""

    def shutdown(self, how: int) -> None:
        last = client_frame(WS_BINARY, self.unfinished) if self.unfinished else b""
        self.unfinished = b""
        self.raw.sendall(last + client_frame(WS_CLOSE, close_payload(1000)))

    def setsockopt(self, level: int, option: int, value: bytes) -> None:
        self.raw.setsockopt(level, option, value)

    def settimeout(self, timeout: float | None) -> None:
        self.raw.settimeout(timeout)

    def close(self) -> None:
        self.raw.close()


class WebSocketClient(Client):
    """A Client whose lines travel as WebSocket messages (LinesOverWebSocket)."""

    def __init__(self, address: tuple[str, int], timeout: float = TIMEOUT, **options: Any) -> None:
        self.ws = LinesOverWebSocket(address, timeout, **options)
        # Client asks only for the calls LinesOverWebSocket has.
        self.sock = cast(socket.socket, self.ws)
        self.buffer = b""

    def half_close(self) -> bytes:
        """The closing handshake; everything until the server's close frame,
        after which the server closes the connection."""
        self.ws.shutdown(socket.SHUT_WR)
        data = self.read_to_eof()
        assert self.ws.closed, "no close frame"
        assert self.ws.raw.recv(1) == b"", "the server did not close after its close frame"
        return data
