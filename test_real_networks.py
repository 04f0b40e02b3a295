"""PROTOCOL.md, "Real networks": dead peers, unregistered connections,
per-address limits, the total output budget and stalled output.

Three ways of holding time here, none of them sleep-and-hope:
- a fake clock: an in-process `ChatServer(..., clock=fake)` driven by
  `run_once` in the test thread (`Pumped` clients), the clock moved by hand;
- a reply: `PING` is answered `ERROR Unrecognised command.`, which proves
  everything sent before it was processed;
- a poll with a deadline, for what only the kernel decides (a dead peer).

Dead peers need a network that can fail: each such test makes two network
namespaces joined by a veth pair, with the server in one and the clients in
the other; a client "vanishes" by a blackhole route for its source address,
so the server gets neither FIN nor RST and its next hop still answers ARP.
Sockets are made inside a namespace by a short-lived thread that enters it
(setns applies to one thread; a socket keeps the namespace it was made in).
Traffic goes only to loopback and to addresses inside those namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, TypeVar

import pytest

import chat
from chat import ChatServer
from conftest import (
    HERE,
    NAME_REQUIRED,
    NAME_TAKEN,
    SYNC,
    SYNC_REPLY,
    TIMED_OUT_WAITING,
    TIMEOUT,
    TOO_MANY_FROM_ADDRESS,
    Client,
    FakeClock,
    Pumped,
    StderrReader,
    in_process,
    launch,
    poll,
    raise_fd_limit,
    receive,
    start_server,
    turns,
)

# The keepalive the dead-peer tests run with, and the contract's bound for it.
KEEPALIVE: Final = 1
DEAD_PEER_BOUND: Final = 4 * KEEPALIVE + 10


class SockClient(Client):
    """A conftest Client around a socket made elsewhere (another source
    address, another namespace, a small receive buffer)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.buffer = b""


def client_from(address: tuple[str, int], source: str) -> SockClient:
    """A client whose connection comes from `source` (e.g. 127.0.0.2)."""
    return SockClient(
        socket.create_connection(address, timeout=TIMEOUT, source_address=(source, 0))
    )


def server_side(client: Pumped) -> chat.Connection:
    """The server's side of a Pumped client's connection."""
    return connection_of(client.server, client.sock.getsockname()[1])


def connections(server: ChatServer) -> list[chat.Connection]:
    return server.view.connections()


def connection_of(server: ChatServer, client_port: int) -> chat.Connection:
    for conn in connections(server):
        if conn.peer.endswith(f":{client_port}"):
            return conn
    raise AssertionError(f"no connection from port {client_port}")


# --- network namespaces -------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET: Final = 0x40000000


T = TypeVar("T")


def in_netns(netns: str, make: Callable[[], T]) -> T:
    """`make()` run by a thread inside network namespace `netns`."""
    made: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns {netns}: {os.strerror(code)}")
            finally:
                os.close(fd)
            made.append(make())
        except BaseException as error:
            failed.append(error)

    thread = threading.Thread(target=run, name=f"in-{netns}")
    thread.start()
    thread.join(TIMEOUT)
    if failed:
        raise failed[0]
    return made[0]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=TIMEOUT)


@dataclass
class Network:
    """Two namespaces joined by a veth pair: the server's, holding
    SERVER_ADDRESS, and the clients', holding CLIENT_ADDRESSES."""

    server_ns: str
    client_ns: str
    SERVER_ADDRESS = "10.250.0.1"
    CLIENT_ADDRESSES = ("10.250.0.2", "10.250.0.3", "10.250.0.4", "10.250.0.5")

    def client_socket(self, source: str) -> socket.socket:
        def make() -> socket.socket:
            sock = socket.socket()
            sock.bind((source, 0))
            return sock

        return in_netns(self.client_ns, make)

    def client(self, port: int, source: str) -> SockClient:
        sock = self.client_socket(source)
        sock.settimeout(TIMEOUT)
        sock.connect((self.SERVER_ADDRESS, port))
        return SockClient(sock)

    def local_client(self, port: int) -> SockClient:
        """A client in the server's namespace (over its loopback)."""
        sock = in_netns(self.server_ns, socket.socket)
        sock.settimeout(TIMEOUT)
        sock.connect((self.SERVER_ADDRESS, port))
        return SockClient(sock)

    def vanish(self, source: str) -> None:
        """From now on nothing leaves the clients' namespace from `source`,
        not even a FIN or RST: as if that laptop's lid were closed."""
        table = str(100 + self.CLIENT_ADDRESSES.index(source))
        _ip("-n", self.client_ns, "route", "add", "blackhole", "default", "table", table)
        _ip("-n", self.client_ns, "rule", "add", "from", source, "table", table, "pref", table)


@pytest.fixture
def network() -> Iterator[Network]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for network namespaces")
    token = f"{os.getpid() % 0x10000:04x}{secrets.token_hex(2)}"
    net = Network(server_ns=f"chat-s-{token}", client_ns=f"chat-c-{token}")
    made: list[str] = []
    try:
        for netns in (net.server_ns, net.client_ns):
            _ip("netns", "add", netns)
            made.append(netns)
        server_if, client_if = f"vs{token}", f"vc{token}"
        _ip("link", "add", server_if, "type", "veth", "peer", "name", client_if)
        _ip("link", "set", server_if, "netns", net.server_ns)
        _ip("link", "set", client_if, "netns", net.client_ns)
        _ip("-n", net.server_ns, "addr", "add", f"{net.SERVER_ADDRESS}/29", "dev", server_if)
        for address in net.CLIENT_ADDRESSES:
            _ip("-n", net.client_ns, "addr", "add", f"{address}/29", "dev", client_if)
        for netns, interface in ((net.server_ns, server_if), (net.client_ns, client_if)):
            _ip("-n", netns, "link", "set", "lo", "up")
            _ip("-n", netns, "link", "set", interface, "up")
    except subprocess.CalledProcessError as error:
        for netns in made:
            subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)
        pytest.skip(f"cannot make network namespaces: {error.stderr.decode().strip()}")
    try:
        yield net
    finally:
        # Deleting a namespace deletes the veth end inside it, and so the pair.
        for netns in made:
            subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)


@dataclass
class NetnsServer:
    process: subprocess.Popen[bytes]
    log: StderrReader
    port: int

    def keepalive_probes(self) -> int:
        """TcpExt TCPKeepAlive of the server's namespace: probes sent."""
        with open(f"/proc/{self.process.pid}/net/netstat") as stats:
            lines = stats.read().splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=True):
            if names.startswith("TcpExt:"):
                return int(dict(zip(names.split(), values.split(), strict=True))["TCPKeepAlive"])
        raise AssertionError("no TcpExt line")


LISTENING: Final = re.compile(r"listening on \S*:(\d+)\s*$", re.MULTILINE)


@contextlib.contextmanager
def serve_in(network: Network, *args: str) -> Iterator[NetnsServer]:
    process = subprocess.Popen(
        [
            *("ip", "netns", "exec", network.server_ns),
            *(sys.executable, str(HERE / "chat.py"), "0"),
            *("--host", network.SERVER_ADDRESS, *args),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    log = StderrReader(process.stderr)
    try:
        found: list[re.Match[str]] = []

        def started() -> bool:
            match = LISTENING.search(log.text())
            if match:
                found.append(match)
            assert process.poll() is None, f"chat.py exited: {log.text()}"
            return bool(match)

        poll("the server's 'listening on' line", started)
        yield NetnsServer(process, log, int(found[0].group(1)))
    finally:
        process.kill()  # `ip netns exec` execs: this is chat.py itself
        process.wait(TIMEOUT)


def disconnect_line(log: StderrReader, client: Client) -> str | None:
    """The server's log line for this client's disconnection, if any yet."""
    host, port = client.sock.getsockname()[:2]
    for line in log.text().splitlines():
        if f" {host}:{port}>" in line and "disconnected" in line:
            return line
    return None


# --- Dead peers -------------------------------------------------------------


def test_vanished_quiet_peer_is_timed_out_and_its_name_freed(network: Network) -> None:
    """Dead peers: a quiet peer that vanishes is timed out within 4 x SECONDS + 10 s, name freed."""
    with serve_in(network, "--keepalive", str(KEEPALIVE)) as server:
        alice = network.client(server.port, network.CLIENT_ADDRESSES[0])
        alice.register("alice")
        network.vanish(network.CLIENT_ADDRESSES[0])
        took = poll(
            "the vanished client to be disconnected",
            lambda: disconnect_line(server.log, alice) is not None,
            DEAD_PEER_BOUND + 5,
        )
        assert took <= DEAD_PEER_BOUND
        assert "disconnected: timed out" in str(disconnect_line(server.log, alice))
        with network.local_client(server.port) as again:
            again.register("alice")
        alice.close()


def test_vanished_busy_peer_is_timed_out_and_its_name_freed(network: Network) -> None:
    """Dead peers: a busy vanished peer is timed out within 4 x SECONDS + 10 s, name freed."""
    with serve_in(network, "--keepalive", str(KEEPALIVE)) as server:
        alice = network.client(server.port, network.CLIENT_ADDRESSES[0])
        alice.register("alice")
        bob = network.local_client(server.port)
        bob.register("bob")
        network.vanish(network.CLIENT_ADDRESSES[0])
        start = time.monotonic()
        sent = 0
        # Keep output in flight to alice, so keepalive (idle only) never probes.
        while disconnect_line(server.log, alice) is None:
            assert time.monotonic() - start < DEAD_PEER_BOUND + 5, "never disconnected"
            bob.send(f"SEND still there? {sent}\n".encode())
            assert bob.sync() == []
            sent += 1
            time.sleep(0.05)  # the pace of the conversation, not a wait for an event
        assert time.monotonic() - start <= DEAD_PEER_BOUND
        assert sent > 10  # it was busy all along
        assert "disconnected: timed out" in str(disconnect_line(server.log, alice))
        bob.send(b"USERNAME alice\n")
        assert bob.sync() == []
        alice.close()
        bob.close()


def test_connected_silent_peer_is_not_disconnected(network: Network) -> None:
    """Dead peers: a person who is connected but silent is never disconnected for that."""
    with serve_in(network, "--keepalive", str(KEEPALIVE)) as server:
        quiet = network.client(server.port, network.CLIENT_ADDRESSES[1])
        quiet.register("quiet")
        probes = server.keepalive_probes()
        # Several keepalive periods, counted by the probes the server sent:
        # enough for three unanswered ones to have closed it.
        poll("four keepalive probes", lambda: server.keepalive_probes() >= probes + 4, 15)
        assert quiet.sync() == []
        assert disconnect_line(server.log, quiet) is None
        with network.local_client(server.port) as other:
            other.send(b"USERNAME quiet\n")
            assert other.sync() == [NAME_TAKEN]
            other.register("other")
            other.send(b"SEND you there?\n")
            assert other.sync() == []
        assert quiet.sync() == [receive("other", "you there?")]
        quiet.close()


def test_timed_out_peer_is_counted(network: Network) -> None:
    """Dead peers (monitoring): a vanished peer counts as timed_out; its name is freed."""
    server = in_netns(
        network.server_ns,
        lambda: ChatServer(network.SERVER_ADDRESS, 0, keepalive=KEEPALIVE),
    )
    port = server.address[1]
    try:
        alice = Pumped(
            server,
            make=lambda: network.client_socket(network.CLIENT_ADDRESSES[2]),
            address=(network.SERVER_ADDRESS, port),
        )
        alice.register("alice")
        assert server.member_count == 1
        network.vanish(network.CLIENT_ADDRESSES[2])
        deadline = time.monotonic() + DEAD_PEER_BOUND
        while not server.stats.disconnections["timed_out"]:
            assert time.monotonic() < deadline, "the vanished peer was not noticed in time"
            server.run_once(max_wait=0.05)
        assert server.stats.disconnections == {"timed_out": 1}
        assert server.member_count == 0
        alice.close()
    finally:
        server.close()


# The options every accepted socket inherits (tune_for_clients), read back.
def _socket_options(sock: socket.socket) -> dict[str, int]:
    def tcp(option: int) -> int:
        return sock.getsockopt(socket.IPPROTO_TCP, option)

    return {
        "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "idle": tcp(socket.TCP_KEEPIDLE),
        "interval": tcp(socket.TCP_KEEPINTVL),
        "count": tcp(socket.TCP_KEEPCNT),
        "user_timeout_ms": tcp(socket.TCP_USER_TIMEOUT),
        "sndbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
    }


def _accepted_socket_options(**options: object) -> dict[str, int]:
    with in_process(**options) as server:
        client = Pumped(server)
        client.sync()
        (conn,) = connections(server)
        assert isinstance(conn.sock, socket.socket)
        client.close()
        return _socket_options(conn.sock)


@pytest.mark.parametrize("seconds", [1, 2, 7, 30, 100])
def test_keepalive_options_keep_the_dead_peer_bound(seconds: int) -> None:
    """Dead peers: first probe after SECONDS idle; a dead peer closed within 4 x SECONDS + 10 s."""
    found = _accepted_socket_options(keepalive=seconds)
    bound = 4 * seconds + 10
    assert found["keepalive"] == 1
    assert found["idle"] == seconds
    # Quiet: the first probe after `idle`, then `count` unanswered probes.
    assert found["idle"] + found["count"] * found["interval"] <= bound
    # Busy (no probes while output is unacknowledged): TCP_USER_TIMEOUT.
    assert 0 < found["user_timeout_ms"] <= bound * 1000


def test_default_keepalive_never_more_than_130_seconds() -> None:
    """Dead peers: default --keepalive 30, about a minute, never more than 130 s."""
    found = _accepted_socket_options()
    assert found["idle"] == 30
    assert found["idle"] + found["count"] * found["interval"] <= 130
    assert found["user_timeout_ms"] <= 130_000


def test_keepalive_off_keeps_the_120_second_bound_on_unacknowledged_data() -> None:
    """Dead peers: --keepalive 0: keepalive off, unacknowledged data bounded at 120 s."""
    found = _accepted_socket_options(keepalive=0)
    assert found["keepalive"] == 0
    assert found["user_timeout_ms"] == 120_000


def test_keepalive_out_of_range_is_a_clear_option_error() -> None:
    """The program: a bad option (--keepalive too large): one clear line, non-zero exit."""
    done = subprocess.run(
        [sys.executable, str(HERE / "chat.py"), "0", "--host", "127.0.0.1", "--keepalive", "40000"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode != 0
    assert len(done.stderr.splitlines()) == 1
    assert "--keepalive" in done.stderr


_SS_TIMER: Final = re.compile(r"timer:\((\w+),([^,]*),(\d+)\)")


def _ss_timers(port: int) -> list[tuple[str, str]]:
    """(kind, remaining) of the timer ss shows on each established
    server-side socket of `port` (kind "" when it shows none)."""
    shown = subprocess.run(
        ["ss", "-tnoeH", "state", "established", f"( sport = :{port} )"],
        check=True,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    ).stdout
    return [
        (match.group(1), match.group(2)) if (match := _SS_TIMER.search(row)) else ("", "")
        for row in shown.splitlines()
    ]


def _seconds(remaining: str) -> float:
    """ss's timer text (e.g. '29sec', '1min4sec', '950ms') in seconds."""
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)(min|sec|ms)", remaining):
        total += float(number) * {"min": 60, "sec": 1, "ms": 0.001}[unit]
    return total


def _settled_ss_timer(port: int, kind: str) -> tuple[str, str]:
    """The one server-side socket's timer once it is `kind`: until the
    client's (delayed) ACK of the last reply arrives it is the retransmit
    timer ("on"), and a probe connection may linger a moment."""
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2)")
    found: list[list[tuple[str, str]]] = []

    def settled() -> bool:
        found.append(_ss_timers(port))
        return len(found[-1]) == 1 and found[-1][0][0] == kind

    with contextlib.suppress(AssertionError):
        poll(f"a {kind or 'missing'} timer", settled, 2.0)
    assert len(found[-1]) == 1, found[-1]
    return found[-1][0]


@pytest.mark.parametrize(
    ("args", "idle"), [((), 30), (("--keepalive", "5"), 5)], ids=["default", "5s"]
)
def test_ss_shows_a_keepalive_timer_on_accepted_sockets(args: tuple[str, ...], idle: int) -> None:
    """Dead peers: TCP keepalive is on for every connection, first probe after SECONDS idle."""
    with launch(*args) as server:
        try:
            with Client(server.address) as client:
                client.register("alice")
                kind, remaining = _settled_ss_timer(server.port, "keepalive")
                assert kind == "keepalive"
                assert 0 < _seconds(remaining) <= idle
        finally:
            server.process.terminate()
            server.stderr_text()


def test_ss_shows_no_keepalive_timer_with_keepalive_off() -> None:
    """Dead peers: --keepalive 0 turns keepalive off."""
    with launch("--keepalive", "0") as server:
        try:
            with Client(server.address) as client:
                client.register("alice")
                assert _settled_ss_timer(server.port, "") == ("", "")
        finally:
            server.process.terminate()
            server.stderr_text()


# --- Unregistered connections ---------------------------------------------


def test_unregistered_connection_is_timed_out_however_active() -> None:
    """Unregistered: no name within 60 s: told Timed out waiting, closed, however active."""
    clock = FakeClock()
    with in_process(clock=clock, register_timeout=60) as server:
        start = clock.now
        idle = Pumped(server)
        assert idle.sync() == []  # accepted at `start`
        busy = Pumped(server)
        assert busy.sync() == []
        member = Pumped(server)
        member.register("member")
        for _ in range(6):  # 0, 10, ..., 50 s: busy all along
            # A USERNAME refused as taken is a name asked for, not a name.
            busy.send(b"SEND hello\nUSERNAME\nUSERNAME a b\nUSERNAME member\n")
            assert busy.sync() == [
                NAME_REQUIRED,
                b"ERROR Username cannot be empty.",
                b"ERROR Username contains empty spaces.",
                NAME_TAKEN,
            ]
            clock.advance(10)
        clock.now = start + 59.5
        assert busy.sync() == []
        assert idle.sync() == []
        clock.now = start + 60
        assert busy.read_to_eof() == TIMED_OUT_WAITING + b"\n"
        assert idle.read_to_eof() == TIMED_OUT_WAITING + b"\n"
        assert not busy.reset and not idle.reset
        assert server.stats.disconnections == {"registration_timeout": 2}
        clock.advance(10_000)
        assert member.sync() == []
        assert server.member_count == 1


def test_unregistered_connection_sending_a_burst_is_told_and_closed_cleanly() -> None:
    """Unregistered: told Timed out waiting and closed, however active (its input unread)."""
    clock = FakeClock()
    with in_process(clock=clock, register_timeout=60) as server:
        start = clock.now
        busy = Pumped(server)
        assert busy.sync() == []
        # More than the server reads in a turn is in flight when time is up.
        burst = memoryview(b"x\n" * 200_000)
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while sent < len(burst):
                sent += busy.sock.send(burst[sent:])
        assert sent > chat.READ_SIZE
        clock.now = start + 60
        assert busy.read_to_eof() == TIMED_OUT_WAITING + b"\n"
        assert not busy.reset, "closed with a reset, which can destroy the line in flight"


def test_registered_connection_is_never_timed_out() -> None:
    """Unregistered: a connection that took a name in time is never timed out."""
    clock = FakeClock()
    with in_process(clock=clock, register_timeout=60) as server:
        start = clock.now
        late = Pumped(server)
        assert late.sync() == []
        clock.now = start + 59
        late.register("late")
        for seconds in (60, 61, 120, 3600, 100_000):
            clock.now = start + seconds
            assert late.sync() == []
        # A rejected rename later does not restart anything either.
        late.send(b"USERNAME \n")
        assert late.sync() == [b"ERROR Username cannot be empty."]
        clock.advance(1000)
        assert late.sync() == []
        assert server.stats.disconnections == {}


def test_a_connection_closed_in_time_leaves_no_register_timeout_behind() -> None:
    """Unregistered: a connection that closes before its deadline takes its timer with it."""
    clock = FakeClock()
    with in_process(clock=clock, register_timeout=60) as server:
        client = Pumped(server)
        assert client.sync() == []
        client.close()
        turns(server, lambda: not server.open_count, what="the close to be noticed")
        # The reply to PING started the stall check: it runs and finds nothing.
        clock.advance(chat.STALL_CHECK)
        server.run_once(max_wait=0)
        # Left behind, the timer would keep the connection until the deadline.
        assert server.view.next_timer_due() is None


def test_register_timeout_zero_never_closes() -> None:
    """Unregistered connections: --register-timeout 0 means never."""
    clock = FakeClock()
    with in_process(clock=clock, register_timeout=0) as server:
        client = Pumped(server)
        assert client.sync() == []
        for _ in range(3):
            clock.advance(1_000_000)
            assert client.sync() == []
        assert not client.eof
        assert server.stats.disconnections == {}


def test_register_timeout_in_real_time() -> None:
    """Unregistered: --register-timeout 1 (real time): told and closed after 1 s; members stay."""
    with launch("--register-timeout", "1") as server:
        try:
            start = time.monotonic()
            nameless = Client(server.address)
            member = Client(server.address)
            member.register("member")
            replies: list[bytes] = []
            while True:  # active all along: a PING every 50 ms
                assert time.monotonic() - start < TIMEOUT, "never timed out"
                try:
                    nameless.send(SYNC)
                    replies.append(nameless.line())
                except (EOFError, ConnectionError):
                    break
                time.sleep(0.05)  # the client's typing pace
            elapsed = time.monotonic() - start
            assert replies[-1] == TIMED_OUT_WAITING
            assert set(replies[:-1]) == {SYNC_REPLY}
            assert 1.0 <= elapsed < TIMEOUT
            assert member.sync() == []
            nameless.close()
            member.close()
            server.process.terminate()
            assert "disconnected: no USERNAME in time" in server.stderr_text()
        finally:
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait()


# --- Per address ------------------------------------------------------------


def test_per_address_limit_counts_other_loopback_addresses() -> None:
    """Per address: N at once; one more is told and closed; 127.0.0.1 exempt, 127.0.0.2+ count."""
    with launch("--max-per-address", "3") as server:
        clients: list[Client] = []
        try:
            for index in range(3):
                clients.append(client_from(server.address, "127.0.0.2"))
                clients[-1].register(f"two{index}")
            with client_from(server.address, "127.0.0.2") as fourth:
                assert fourth.read_to_eof() == TOO_MANY_FROM_ADDRESS + b"\n"
            for index in range(3):
                clients.append(client_from(server.address, "127.0.0.3"))
                clients[-1].register(f"three{index}")
            for index in range(10):  # the machine itself: no limit
                clients.append(client_from(server.address, "127.0.0.1"))
                clients[-1].register(f"one{index}")
            for client in clients:
                assert client.sync() == []

            # The count is released when one closes.
            clients.pop(0).close()
            deadline = time.monotonic() + TIMEOUT
            while True:
                again = client_from(server.address, "127.0.0.2")
                again.send(SYNC)
                try:
                    first = again.line()
                except (EOFError, ConnectionError):
                    first = b""
                if first == SYNC_REPLY:
                    clients.append(again)
                    break
                assert first == TOO_MANY_FROM_ADDRESS
                again.close()
                assert time.monotonic() < deadline, "the closed connection was never uncounted"
                time.sleep(0.02)  # polling pace
            with client_from(server.address, "127.0.0.2") as over:
                assert over.read_to_eof() == TOO_MANY_FROM_ADDRESS + b"\n"
        finally:
            for client in clients:
                client.close()
            server.process.terminate()
            log = server.stderr_text()
    refused = [line for line in log.splitlines() if "refused" in line]
    assert len(refused) >= 2
    assert all("refused 127.0.0.2:" in line for line in refused)


def test_per_address_limit_zero_means_no_limit() -> None:
    """Per address: --max-per-address 0 = no limit."""
    with contextlib.ExitStack() as stack:
        running = start_server(max_per_address=0)
        stack.callback(running.stop)
        clients = [
            stack.enter_context(client_from(running.address, "127.0.0.2")) for _ in range(80)
        ]
        for client in clients:
            assert client.sync() == []
        assert running.server.stats.refused == {}


def test_per_address_refusals_are_counted() -> None:
    """Per address (monitoring): a refusal counts as refused and disconnected per_address."""
    running = start_server(max_per_address=2)
    try:
        first = client_from(running.address, "127.0.0.2")
        second = client_from(running.address, "127.0.0.2")
        assert first.sync() == second.sync() == []
        with client_from(running.address, "127.0.0.2") as third:
            assert third.read_to_eof() == TOO_MANY_FROM_ADDRESS + b"\n"
        stats = running.server.stats
        assert stats.refused == {"per_address": 1}
        assert stats.disconnections == {"per_address": 1}
        assert stats.accepted == 2
        first.close()
        second.close()
    finally:
        running.stop()


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff", True),
        ("2001:db8:1:2::1", "2001:db8:1:3::1", False),
        ("fe80::1%eth0", "fe80::2%eth1", True),
        ("::ffff:192.0.2.7", "192.0.2.7", True),
        ("192.0.2.7", "192.0.2.8", False),
        ("127.0.0.2", "127.0.0.3", False),
    ],
)
def test_address_key_ipv6_counts_by_slash_64(one: str, other: str, same: bool) -> None:
    """Per address: an IPv6 client counts by its /64 network; IPv4 by its address."""
    key = chat.address_key(one)
    assert key is not None
    assert (key == chat.address_key(other)) is same


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "::ffff:127.0.0.1"])
def test_address_key_machine_itself_is_not_counted(host: str) -> None:
    """Per address: connections from 127.0.0.1 and ::1 are not counted."""
    assert chat.address_key(host) is None


@pytest.mark.parametrize("host", ["127.0.0.2", "::ffff:127.0.0.2", "127.255.255.254"])
def test_address_key_other_loopback_addresses_are_counted(host: str) -> None:
    """Per address: other loopback addresses, 127.0.0.2 and up, are counted."""
    assert chat.address_key(host) == host.removeprefix("::ffff:")


def test_per_address_ipv6_clients_count_by_their_slash_64() -> None:
    """Per address: an IPv6 client counts by its /64 network (real IPv6, own namespace)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for a network namespace")
    netns = f"chat-v6-{os.getpid() % 0x10000:04x}{secrets.token_hex(2)}"
    prefix = f"fd{secrets.token_hex(1)}:{secrets.token_hex(2)}:{secrets.token_hex(2)}"
    server_address = f"{prefix}:1::1"
    same_64 = [f"{prefix}:1::2", f"{prefix}:1::3", f"{prefix}:1:abcd::4"]
    other_64 = f"{prefix}:2::2"
    _ip("netns", "add", netns)
    try:
        _ip("-n", netns, "link", "set", "lo", "up")
        for address in [server_address, *same_64, other_64]:
            _ip("-n", netns, "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad")
        server = in_netns(
            netns,
            lambda: ChatServer(server_address, 0, max_per_address=2),
        )
        port = server.address[1]

        def from_(source: str) -> Pumped:
            def make() -> socket.socket:
                sock = socket.socket(socket.AF_INET6)
                sock.bind((source, 0))
                return sock

            return Pumped(
                server, make=lambda: in_netns(netns, make), address=(server_address, port)
            )

        try:
            first, second = from_(same_64[0]), from_(same_64[1])
            assert first.sync() == second.sync() == []
            third = from_(same_64[2])  # another address, the same /64
            assert third.read_to_eof() == TOO_MANY_FROM_ADDRESS + b"\n"
            elsewhere = from_(other_64)
            assert elsewhere.sync() == []
            assert server.stats.refused == {"per_address": 1}
            for client in (first, second, third, elsewhere):
                client.close()
        finally:
            server.close()
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)


# --- Total memory -----------------------------------------------------------


def test_send_buffer_is_fixed() -> None:
    """Total memory: the kernel's send buffer is a fixed SO_SNDBUF of at most 256 KiB."""
    found = _accepted_socket_options()
    assert found["sndbuf"] == 2 * chat.SEND_BUFFER  # Linux doubles what is asked
    assert found["sndbuf"] <= 256 * 1024


def test_freed_output_buffers_go_back_to_the_system() -> None:
    """Total memory: chat.py fixes glibc's mmap threshold: freed buffers go back to the system."""
    # In a fresh interpreter, as chat.py's main does it: after one large
    # block is freed, glibc would serve 100 KiB buffers from its heap, and
    # freeing every other one would give nothing back.
    script = """
import os, sys
import chat
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
assert chat.return_large_buffers_to_the_system()
large = bytearray(4 << 20)
del large
buffers = [bytearray(b"x" * (100 * 1024)) for _ in range(400)]
before = rss()
del buffers[::2]
print(before - rss())
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    returned = int(result.stdout)
    assert returned >= 15 << 20, f"{returned} bytes of 20 MiB freed went back to the system"


def test_over_the_budget_the_largest_is_closed_first_until_it_fits() -> None:
    """Total memory: over the budget, the largest are closed first, until it fits."""
    budget = 800 * 1024
    with in_process(output_budget=budget, output_limit=8 << 20) as server:
        alice = Pumped(server)
        alice.register("alice")
        big = Pumped(server, rcvbuf=4096)
        big.register("big")
        chunk = b"".join(f"SEND {index:04} {'x' * 4000}\n".encode() for index in range(16))

        def flood_until(done: Callable[[], bool]) -> None:
            for _ in range(200):
                if done():
                    return
                alice.send(chunk)
                assert alice.sync() == []
            raise AssertionError("flooded without effect")

        flood_until(lambda: len(server_side(big).out or b"") >= 350 * 1024)
        small = Pumped(server, rcvbuf=4096)
        small.register("small")
        small_conn = server_side(small)
        flood_until(lambda: server.stats.disconnections["memory_budget"] > 0)
        assert server.stats.disconnections == {"memory_budget": 1}
        assert big.read_to_eof()  # it was the one closed
        assert not small_conn.closed
        assert 0 < len(small_conn.out or b"") <= server.unsent <= budget
        assert server.member_count == 2
        big.close()
        small.close()


def drain(client: Client) -> None:
    """Read and drop what has arrived, without waiting."""
    client.sock.settimeout(0)
    try:
        while client.sock.recv(1 << 20):
            pass
    except BlockingIOError:
        pass
    finally:
        client.sock.settimeout(TIMEOUT)


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_non_readers_and_a_flood_do_not_stop_a_reading_pair() -> None:
    """Total memory: non-readers and a flooder; a reading pair keeps chatting, all in order."""
    non_readers = 300
    budget = 8 << 20
    raise_fd_limit(2 * non_readers + 200)
    with launch(
        "--output-budget", str(budget), "--output-limit", str(64 << 20), "--max-clients", "1000"
    ) as server:
        clients: list[Client] = []
        try:
            baseline_before = _rss_bytes(server.process.pid)
            for index in range(non_readers):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.settimeout(TIMEOUT)
                sock.connect(server.address)
                silent = SockClient(sock)
                silent.send(f"USERNAME silent{index}\n".encode() + SYNC)
                clients.append(silent)
            for client in clients:
                assert client.until(SYNC_REPLY) == []
            alice, bob, flooder = (Client(server.address) for _ in range(3))
            clients += [alice, bob, flooder]
            for client, name in ((alice, "alice"), (bob, "bob"), (flooder, "flooder")):
                client.register(name)
            baseline = _rss_bytes(server.process.pid)
            # Unsent output is accounted within the budget; in memory it costs
            # more: bytearray growth over-allocates by 1/8, and the buffers of
            # the connections shed are freed in the middle of the heap, where the
            # survivors' larger ones do not fit (about 1.5 x the budget in all,
            # measured with budgets of 2 to 32 MiB). Beside that, one turn's batch
            # (BATCH_BYTES) and reads (READ_SIZE per connection, one flooding):
            # under 1 MiB. Without the budget the limits (300 x 64 MiB) would let
            # it grow by gigabytes; it is checked every round so that such a
            # server fails fast instead.
            rss_bound = 2 * budget + (1 << 20)

            flood_line = "f{:06} " + "x" * 1000
            seen: dict[str, list[bytes]] = {"alice": [], "bob": []}
            floods = rounds = 0
            peak = baseline
            shed_log = "over the total output budget"
            start = time.monotonic()
            # Until most non-readers are shed, and some rounds after that.
            while server.log.text().count(shed_log) < non_readers // 2 or rounds % 20:
                assert time.monotonic() - start < 30, f"only {rounds} rounds in 30 s"
                flooder.send(
                    b"".join(f"SEND {flood_line.format(floods + i)}\n".encode() for i in range(32))
                )
                floods += 32
                alice.send(f"SEND a{rounds}\n".encode())
                bob.send(f"SEND b{rounds}\n".encode())
                seen["alice"] += alice.sync()
                seen["bob"] += bob.sync()
                drain(flooder)  # the flooder reads too, only not in lines
                peak = max(peak, _rss_bytes(server.process.pid))
                assert peak - baseline <= rss_bound, (
                    f"RSS grew by {(peak - baseline) >> 20} MiB over a baseline of "
                    f"{baseline >> 20} MiB (it was {baseline_before >> 20} MiB idle)"
                )
                rounds += 1
            flooder.sync()
            seen["alice"] += alice.sync()
            seen["bob"] += bob.sync()

            floods_owed = [receive("flooder", flood_line.format(i)) for i in range(floods)]
            for reader, other, prefix in (("alice", "bob", "b"), ("bob", "alice", "a")):
                lines = seen[reader]
                from_other = [
                    line for line in lines if line.startswith(f"RECEIVE {other} ".encode())
                ]
                assert from_other == [receive(other, f"{prefix}{r}") for r in range(rounds)]
                assert [
                    line for line in lines if line.startswith(b"RECEIVE flooder ")
                ] == floods_owed
                assert len(lines) == rounds + floods
            for client in (alice, bob):
                assert client.sync() == []  # still connected
            # Before the test's own closes below: only non-readers were closed,
            # each for the budget.
            ours = {f":{client.sock.getsockname()[1]}>" for client in clients}
            disconnected = [
                line
                for line in server.log.text().splitlines()
                if "disconnected" in line and any(port in line for port in ours)
            ]
            assert disconnected
            assert all(shed_log in line for line in disconnected), disconnected
            for client in (alice, bob, flooder):
                port = client.sock.getsockname()[1]
                assert not any(f":{port}>" in line for line in disconnected)
            assert peak - baseline <= rss_bound
        finally:
            for client in clients:
                client.close()
            server.process.terminate()
            server.stderr_text()


def test_replies_count_towards_the_budget() -> None:
    """Total memory: all connections' unsent output together (replies too) is bounded."""
    budget = 400 * 1024
    with in_process(output_budget=budget, output_limit=8 << 20) as server:
        pingers = [Pumped(server, rcvbuf=4096) for _ in range(2)]
        for pinger in pingers:
            assert pinger.sync() == []
        # Each PING is answered, and neither reads its answers.
        pings = SYNC * 4000
        deadline = time.monotonic() + TIMEOUT
        while not server.stats.disconnections:
            assert time.monotonic() < deadline, f"{server.unsent} bytes unsent, none shed"
            for pinger in pingers:
                with contextlib.suppress(BlockingIOError):
                    pinger.sock.send(pings)
            server.run_once(max_wait=0.005)
        assert server.stats.disconnections == {"memory_budget": 1}
        assert server.unsent <= budget


def test_output_the_kernel_takes_at_once_never_counts_against_the_budget() -> None:
    """Total memory: replies queued in a turn and all sent at its end are not over the budget."""
    budget = 8192
    with in_process(output_budget=budget) as server:
        client = Pumped(server)
        # 500 replies, about 20 KB, queued in one turn: over the budget
        # until the turn sends them, and a reading client takes them all.
        client.send(b"SEND x\n" * 500)
        assert client.sync() == [NAME_REQUIRED] * 500
        assert server.stats.disconnections == {}
        assert server.unsent == 0


def test_stalled_output_in_a_quiet_room_is_closed_too() -> None:
    """Total memory: output stalled for 60 s with nothing new queued meanwhile: closed."""
    clock = FakeClock()
    with in_process(clock=clock) as server:
        alice = Pumped(server)
        alice.register("alice")
        stalled = Pumped(server, rcvbuf=4096)
        stalled.register("stalled")
        stalled_conn = server_side(stalled)
        chunk = b"".join(f"SEND {index:04} {'x' * 4000}\n".encode() for index in range(16))
        for _ in range(8):  # 512 KiB: more than the kernel holds, under the output limit
            alice.send(chunk)
            assert alice.sync() == []
        backed_up = clock.now
        assert len(stalled_conn.out or b"") > 64 * 1024
        # Nobody says anything more: no reply or line queued restarts the
        # check, which must go on by itself.
        steps = 0
        while not stalled_conn.closed:
            steps += 1
            assert steps <= chat.STALL_TIMEOUT / chat.STALL_CHECK + 2
            clock.advance(chat.STALL_CHECK)
            server.run_once(max_wait=0)
        assert chat.STALL_TIMEOUT <= clock.now - backed_up <= chat.STALL_TIMEOUT + chat.STALL_CHECK
        assert server.stats.disconnections == {"slow_consumer": 1}


def test_stalled_output_is_closed_as_a_slow_consumer() -> None:
    """Total memory: unsent output that has not shrunk for 60 s: closed as a slow consumer."""
    clock = FakeClock()
    output_limit = 8 << 20
    with in_process(clock=clock, output_limit=output_limit) as server:
        alice = Pumped(server)
        alice.register("alice")
        stalled = Pumped(server, rcvbuf=4096)
        stalled.register("stalled")
        reading = Pumped(server, rcvbuf=4096)
        reading.register("reading")
        stalled_conn, reading_conn = server_side(stalled), server_side(reading)
        chunk = b"".join(f"SEND {index:04} {'x' * 4000}\n".encode() for index in range(16))
        for _ in range(48):  # 3 MiB each, the kernel holding a few hundred KiB of it
            alice.send(chunk)
            assert alice.sync() == []
        backed_up = clock.now
        assert 1 << 20 < len(stalled_conn.out or b"") < output_limit
        assert 1 << 20 < len(reading_conn.out or b"") < output_limit
        steps = 0
        while not stalled_conn.closed:
            steps += 1
            assert steps <= (chat.STALL_TIMEOUT + chat.STALL_CHECK) / chat.STALL_CHECK
            clock.advance(chat.STALL_CHECK)
            before = len(reading_conn.out or b"")
            # More output for both: growing is not shrinking.
            alice.send(f"SEND tick {steps}\n".encode())
            assert alice.sync() == []
            # The reader takes a little, until the server's queue for it shrinks.
            deadline = time.monotonic() + TIMEOUT
            while len(reading_conn.out or b"") >= before:
                assert time.monotonic() < deadline, "the reader's output never shrank"
                reading.take_available(limit=16 * 1024)
                reading.buffer = b""
                server.run_once(max_wait=0.005)
            server.run_once(max_wait=0)
            if clock.now - backed_up < chat.STALL_TIMEOUT:
                assert not stalled_conn.closed, f"closed after {clock.now - backed_up} s"
        assert clock.now - backed_up <= chat.STALL_TIMEOUT + chat.STALL_CHECK
        assert server.stats.disconnections == {"slow_consumer": 1}
        assert not reading_conn.closed and reading_conn.out
        assert alice.sync() == []
        stalled.read_to_eof()
        assert server.member_count == 2
