"""Fault tests of the real server: running out of file descriptors, slow
consumers, signals with output queued, connection churn, huge lines, floods,
a thousand members, resets in the middle of a broadcast.

Most run chat.py as a child process, so that its CPU time, memory and file
descriptors can be read from /proc and its stderr checked for tracebacks.
Every read has a timeout; where the server must notice something on its own,
the test polls with a deadline.
"""

from __future__ import annotations

import contextlib
import operator
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import IO

import pytest

from conftest import HERE, SYNC, SYNC_REPLY, TIMEOUT, Client, ServerProcess

# --- helpers for the fault tests -------------------------------------------

_LINE_TOO_LONG = b"ERROR Line too long."
_NAME_TAKEN = b"ERROR Username already in use."


class _StderrLog:
    """Drains a child's stderr on a thread. The server logs every connection,
    so a test with hundreds of them would fill the 64 KiB pipe and block the
    server on a log write; draining also lets a test wait for a log line."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._fd = stream.fileno()
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._drain, name="stderr-drain", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        # os.read, not the buffered stream: it returns what is there now.
        while chunk := os.read(self._fd, 65536):
            with self._lock:
                self._chunks.append(chunk)

    def text(self) -> str:
        with self._lock:
            return b"".join(self._chunks).decode("utf-8", "replace")

    def wait_for(self, needle: str, timeout: float = TIMEOUT) -> None:
        _poll(lambda: needle in self.text(), timeout, f"{needle!r} in the server's log")

    def join(self) -> None:
        self._thread.join(TIMEOUT)


@dataclass
class _Served:
    """chat.py as a child process, its drained stderr, and the clients a
    test opened (closed when the test ends, whatever happens)."""

    proc: ServerProcess
    log: _StderrLog
    clients: list[Client] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.process.pid

    @property
    def address(self) -> tuple[str, int]:
        return self.proc.address

    def client(self) -> Client:
        client = Client(self.address)
        self.clients.append(client)
        return client

    def small_window_client(self) -> Client:
        client = _SmallWindowClient(self.address)
        self.clients.append(client)
        return client

    def finish(self, signum: int = signal.SIGTERM) -> str:
        """Stop the server as an operator would and return its stderr, after
        checking that it exited 0 without a traceback."""
        self.proc.process.send_signal(signum)
        returncode = self.proc.process.wait(TIMEOUT)
        self.log.join()
        text = self.log.text()
        assert returncode == 0, text
        assert "Traceback" not in text, text
        return text


_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


@contextlib.contextmanager
def _serve(*args: str, preexec: Callable[[], None] | None = None) -> Iterator[_Served]:
    """chat.py on port 0, its real port read from its startup log line.

    Not conftest.spawn_server: a port picked free and then bound by the
    child can be taken in between (tests here open thousands of connections,
    and other test runs share the machine), and its connect probe would then
    reach whatever holds the port. Port 0 cannot race, and the log line
    comes after the signal handlers are installed."""
    process = subprocess.Popen(
        [sys.executable, str(HERE / "chat.py"), "0", "--host", "127.0.0.1", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=preexec,
    )
    assert process.stderr is not None
    log = _StderrLog(process.stderr)
    served: _Served | None = None
    failed = False
    try:
        _poll(
            lambda: _LISTENING.search(log.text()) is not None or process.poll() is not None,
            TIMEOUT,
            "the server to start",
        )
        found = _LISTENING.search(log.text())
        assert found is not None, f"chat.py did not start: {log.text()}"
        served = _Served(ServerProcess(process, int(found[1])), log)
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
        log.join()
        if failed:  # pytest shows this with the failure
            print("--- the server's stderr (last 20,000 characters) ---")
            print(log.text()[-20_000:])


class _SmallWindowClient(Client):
    """A client with a 4 KiB receive buffer, so that what it does not read
    piles up on the server's side, not in its own kernel buffer. The option
    must be set before connecting (it fixes the window scale), so this does
    not call Client.__init__, which connects at once."""

    def __init__(self, address: tuple[str, int], receive_buffer: int = 4096) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            sock.settimeout(TIMEOUT)
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.buffer = b""


def _reset(client: Client) -> None:
    """Close with an RST: SO_LINGER on with a zero timeout. (struct linger is
    two ints, l_onoff and l_linger; a non-zero l_linger would be an ordinary
    close that waits, with a FIN.)"""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sock.close()


def _poll(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until `condition()` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout}s waiting for {what}")
        time.sleep(0.01)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid`, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name (field 2) may hold spaces; it ends at the last ")".
        fields = stat.read().rpartition(")")[2].split()
    # fields[0] is field 3 (state), so utime (14) and stime (15) are 11 and 12.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_kib(pid: int, key: str) -> int:
    """A "kB" line of /proc/<pid>/status, such as VmRSS or VmHWM."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0])
    raise KeyError(key)


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _raise_fd_limit(needed: int) -> None:
    """Let this process hold `needed` descriptors (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _sends(messages: list[bytes]) -> bytes:
    return b"".join(b"SEND " + message + b"\n" for message in messages)


def _receives(name: str, messages: list[bytes]) -> list[bytes]:
    prefix = b"RECEIVE " + name.encode() + b" "
    return [prefix + message for message in messages]


def _timed_sync(client: Client) -> tuple[list[bytes], float]:
    start = time.monotonic()
    lines = client.sync()
    return lines, time.monotonic() - start


# --- running out of file descriptors ---------------------------------------

# Low enough that 100 extra connections exhaust it, high enough for Python.
_FD_LIMIT = 64


def _limit_fds() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_FD_LIMIT, hard))


def test_fd_exhaustion_does_not_spin_and_service_continues() -> None:
    with _serve(preexec=_limit_fds) as server:
        alice = server.client()
        alice.register("alice")
        bob = server.client()
        bob.register("bob")
        extra: list[socket.socket] = []
        try:
            # The kernel completes these handshakes whether or not the server
            # can accept them; the ones past its limit wait in the backlog.
            for _ in range(100):
                extra.append(socket.create_connection(server.address, timeout=TIMEOUT))
            server.log.wait_for("Too many open files")

            for turn in range(3):
                alice.send(f"SEND while out of descriptors {turn}\n".encode())
                assert alice.sync() == []
                assert bob.sync() == [f"RECEIVE alice while out of descriptors {turn}".encode()]
                bob.send(f"SEND still here {turn}\n".encode())
                assert bob.sync() == []
                assert alice.sync() == [f"RECEIVE bob still here {turn}".encode()]

            # The listener stays readable while the backlog is not empty: a
            # server that retried accept() at once would burn a whole core.
            cpu_before = _cpu_seconds(server.pid)
            wall_before = time.monotonic()
            time.sleep(1.0)  # the quiet second being measured, not a wait
            cpu = _cpu_seconds(server.pid) - cpu_before
            wall = time.monotonic() - wall_before
            assert cpu < 0.2, f"the server used {cpu:.2f}s of CPU in {wall:.2f}s while idle"
        finally:
            for sock in extra:
                sock.close()

        # The server must notice the closes, free the descriptors and accept
        # again by itself.
        deadline = time.monotonic() + 10
        while True:
            carol = server.client()
            try:
                carol.register("carol")
                break
            except (OSError, EOFError):
                carol.close()
                if time.monotonic() > deadline:
                    raise
        carol.send(b"SEND back to normal\n")
        assert carol.sync() == []
        assert alice.sync() == [b"RECEIVE carol back to normal"]
        assert bob.sync() == [b"RECEIVE carol back to normal"]
        alice.send(b"SEND welcome\n")
        assert alice.sync() == []
        assert carol.sync() == [b"RECEIVE alice welcome"]
        assert bob.sync() == [b"RECEIVE alice welcome"]

        log = server.finish()
        assert "cannot accept connections: Too many open files" in log


# --- slow consumers ---------------------------------------------------------


def test_slow_consumer_is_dropped_without_slowing_the_others() -> None:
    with _serve() as server:  # the default output limit, 1 MiB
        slow = server.small_window_client()
        slow.register("slow")
        alice = server.client()
        alice.register("alice")
        bob = server.client()
        bob.register("bob")
        prober = server.client()

        filler = b"x" * 4000
        stream: list[bytes] = []  # every RECEIVE line the slow client was owed
        sync_times: list[float] = []
        # The kernel holds a few MB for a client that does not read (the
        # server's send buffer grows to ~2.8 MB on loopback) before the
        # server's own 1 MiB limit even starts to fill: 256 KiB a round, up
        # to 64 rounds.
        for turn in range(64):
            messages = [f"{turn}-{index} ".encode() + filler for index in range(64)]
            alice.send(_sends(messages))
            lines, elapsed = _timed_sync(alice)
            assert lines == []
            sync_times.append(elapsed)
            lines, elapsed = _timed_sync(bob)
            assert lines == _receives("alice", messages)
            sync_times.append(elapsed)
            stream += lines
            prober.send(b"USERNAME slow\n")
            reply = prober.sync()
            if reply == []:
                break  # the prober holds the slow client's name now
            assert reply == [_NAME_TAKEN]
        else:
            pytest.fail("the slow client was never disconnected")
        assert max(sync_times) < 2.0, f"slowest sync {max(sync_times):.2f}s"

        # The prober took the name, so it is a member and gets messages.
        alice.send(b"SEND after\n")
        assert alice.sync() == []
        assert bob.sync() == [b"RECEIVE alice after"]
        assert prober.sync() == [b"RECEIVE alice after"]

        # What the slow client gets before the end is a prefix of what it
        # was owed, cut where the server gave up on it.
        received = slow.read_to_eof()
        owed = b"".join(line + b"\n" for line in stream)
        assert owed.startswith(received)
        assert len(received) < len(owed)

        assert "slow consumer" in server.finish()


def test_many_slow_consumers_and_several_senders_keep_one_order() -> None:
    output_limit = 256 * 1024
    with _serve("--output-limit", str(output_limit)) as server:
        slow = [server.small_window_client() for _ in range(10)]
        for index, client in enumerate(slow):
            client.register(f"slow{index}")
        healthy = [server.client() for _ in range(40)]
        for index, client in enumerate(healthy):
            client.register(f"h{index}")
        senders = 4
        filler = b"y" * 2000
        per_burst = 32
        seen: list[list[bytes]] = [[] for _ in healthy]

        def burst(sender: int, turn: int) -> None:
            messages = [f"{sender}-{turn}-{index} ".encode() + filler for index in range(per_burst)]
            healthy[sender].send(_sends(messages))
            seen[sender] += healthy[sender].sync()

        # Rounds of 256 KiB, from all senders at once. A healthy client's
        # kernel buffers take a whole round, so reading once a round keeps
        # it far from the limit; a slow one passes ~2.8 MB of kernel buffer
        # plus the limit after a dozen rounds. The rounds go on until a
        # prober can take every slow client's name: a free name it takes,
        # one it already holds (it renames itself through the free ones) is
        # no error either. It is a member once it holds one, so its sync
        # returns RECEIVE lines too.
        prober = server.client()
        probe = b"".join(f"USERNAME slow{index}\n".encode() for index in range(len(slow)))
        rounds = 0
        with ThreadPoolExecutor(senders) as pool:
            while True:
                assert rounds < 40, "the slow clients were never all disconnected"
                futures = [pool.submit(burst, sender, rounds) for sender in range(senders)]
                for future in futures:
                    future.result(timeout=30)
                for index in range(senders, len(healthy)):
                    seen[index] += healthy[index].sync()
                rounds += 1
                prober.send(probe)
                refused = [line for line in prober.sync() if line.startswith(b"ERROR")]
                if not refused:
                    break
                assert set(refused) == {_NAME_TAKEN}
        for index, client in enumerate(healthy):
            seen[index] += client.sync()

        order = seen[senders]  # a member that sent nothing saw everything
        assert len(order) == rounds * senders * per_burst
        for index in range(senders, len(healthy)):
            assert seen[index] == order, f"h{index} saw another order"
        for sender in range(senders):
            own = f"RECEIVE h{sender} ".encode()
            assert seen[sender] == [line for line in order if not line.startswith(own)]
            # ...and each sender's messages kept the order it sent them in.
            assert [line for line in order if line.startswith(own)] == [
                own + f"{sender}-{turn}-{index} ".encode() + filler
                for turn in range(rounds)
                for index in range(per_burst)
            ]

        owed = b"".join(line + b"\n" for line in order)
        for client in slow:
            received = client.read_to_eof()
            assert owed.startswith(received)
            assert len(received) < len(owed)
        assert "slow consumer" in server.log.text()
        server.finish()


# --- signals ----------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_at_once_with_output_queued(signum: signal.Signals) -> None:
    # 8 MiB so that the non-readers, owed 5 MB each, stay connected with
    # output queued in the server (the kernel takes ~2.8 MB of it).
    with _serve("--output-limit", str(8 << 20)) as server:
        stuck = [server.small_window_client() for _ in range(5)]
        for index, client in enumerate(stuck):
            client.register(f"stuck{index}")
        sender = server.client()
        sender.register("sender")
        idle = [server.client() for _ in range(44)]  # 50 connections in all
        messages = [f"{index} ".encode() + b"z" * 4000 for index in range(1250)]
        sender.send(_sends(messages))
        assert sender.sync() == []
        for client in idle:
            assert client.sync() == []

        start = time.monotonic()
        server.proc.process.send_signal(signum)
        returncode = server.proc.process.wait(TIMEOUT)
        elapsed = time.monotonic() - start
        assert returncode == 0
        assert elapsed < 1.0, f"exited {elapsed:.2f}s after the signal"

        # The port is free at once, with the old connections still draining:
        # bound as the server binds it (SO_REUSEADDR).
        with socket.socket() as again:
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(server.address)
            again.listen()

        owed = b"".join(line + b"\n" for line in _receives("sender", messages))
        for client in stuck:
            assert owed.startswith(client.read_to_eof())
        for client in [sender, *idle]:
            assert client.read_to_eof() == b""

        server.log.join()
        log = server.log.text()
        assert "Traceback" not in log, log
        # They were still connected, output queued, when the signal came.
        assert "slow consumer" not in log


# --- connection churn -------------------------------------------------------


def test_connect_reset_cycles_leak_no_descriptors() -> None:
    with _serve() as server:
        watcher = server.client()
        watcher.register("watcher")
        baseline = _fd_count(server.pid)
        names: list[str] = []

        def cycle(index: int, kind: str) -> None:
            client = Client(server.address)
            try:
                if kind.startswith("register"):
                    names.append(f"cycle{index}")
                    client.send(f"USERNAME cycle{index}\n".encode())
                    # A member now: earlier cycles' messages may reach it.
                    assert all(line.startswith(b"RECEIVE cycle") for line in client.sync())
                elif kind.startswith("pipeline"):
                    # A name, a message to the watcher and an unterminated
                    # line, likely still unprocessed when the connection goes.
                    names.append(f"cycle{index}")
                    lines = f"USERNAME cycle{index}\nSEND bye {index}\n".encode()
                    # A reply left unread would turn close() into an RST, so
                    # only the reset variant asks for one.
                    if kind.endswith("reset"):
                        lines += SYNC
                    client.send(lines + b"SEND par")
                if kind.endswith("reset"):
                    _reset(client)
            finally:
                client.close()

        kinds = ["reset", "register-reset", "pipeline-reset", "pipeline-close", "close"]
        cycles = 335  # 201 resets, 134 closes
        for index in range(cycles):
            cycle(index, kinds[index % len(kinds)])

        received: list[bytes] = []

        def settled() -> bool:
            received.extend(watcher.sync())
            return _fd_count(server.pid) == baseline

        _poll(settled, 10, f"the server to get back to {baseline} descriptors")
        received.extend(watcher.sync())  # what came with the last close
        # A closed connection's final line without "\n" is still a line; a
        # reset one's lines may or may not have been read before the RST,
        # but its unterminated line never is one.
        for index, kind in enumerate(kinds[i % len(kinds)] for i in range(cycles)):
            bye = f"RECEIVE cycle{index} bye {index}".encode()
            final = f"RECEIVE cycle{index} par".encode()
            if kind == "pipeline-close":
                assert received.count(bye) == received.count(final) == 1
                assert received.index(bye) < received.index(final)
            else:
                assert final not in received
        assert all(re.fullmatch(rb"RECEIVE cycle\d+ (bye \d+|par)", line) for line in received)

        # Every name used is free again: taking each in turn renames one
        # connection through all of them.
        checker = server.client()
        checker.send(b"".join(f"USERNAME {name}\n".encode() for name in names))
        assert checker.sync() == []
        server.finish()


# --- huge lines ---------------------------------------------------------------


def test_ten_megabyte_line_is_refused_once_in_bounded_memory() -> None:
    with _serve() as server:
        client = server.client()
        assert client.sync() == []
        # VmHWM is the peak: a buffer that grew and was freed still shows.
        peak_before = _status_kib(server.pid, "VmHWM")
        rss_before = _status_kib(server.pid, "VmRSS")
        piece = b"x" * 65536
        for _ in range(160):  # 10 MiB, no "\n"
            client.send(piece)
        client.send(b"\n")
        assert client.sync() == [_LINE_TOO_LONG]
        peak_growth = _status_kib(server.pid, "VmHWM") - peak_before
        rss_growth = _status_kib(server.pid, "VmRSS") - rss_before
        assert peak_growth < 4096, f"peak memory grew by {peak_growth} KiB"
        assert rss_growth < 4096, f"memory grew by {rss_growth} KiB"
        # The line after it is a line like any other.
        client.register("after")
        server.finish()


def test_megabytes_of_blank_lines_cost_linear_time() -> None:
    with _serve() as server:
        client = server.client()
        assert client.sync() == []
        cpu_before = _cpu_seconds(server.pid)
        start = time.monotonic()
        client.send(b"\n" * (4 << 20))
        assert client.sync() == []  # no reply to any blank line
        elapsed = time.monotonic() - start
        cpu = _cpu_seconds(server.pid) - cpu_before
        # Both take ~0.8 s on an idle 2-core machine; anything quadratic in
        # 4 Mi lines would take hours. The server's CPU time is the sharp
        # measure: other processes on the machine barely change it, whereas
        # the wall time reached 4.1 s with two busy loops and two other runs
        # of this file beside it.
        assert cpu < 3.0, f"4 Mi blank lines took {cpu:.2f}s of the server's CPU"
        assert elapsed < 10.0, f"4 Mi blank lines took {elapsed:.2f}s"
        server.finish()


# --- floods -------------------------------------------------------------------


class _Reader(threading.Thread):
    """Reads one connection until `stop`, handing `on_match` the first group
    of every line that matches `pattern` and discarding the rest (all of it
    when `pattern` is None)."""

    def __init__(
        self,
        client: Client,
        pattern: bytes | None,
        on_match: Callable[[bytes], None],
        stop: threading.Event,
    ) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.pattern = None if pattern is None else re.compile(pattern, re.MULTILINE)
        self.on_match = on_match
        self.stop = stop
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            # Short, so the thread sees `stop` soon; sends on this socket
            # are small and are not affected in practice.
            self.client.sock.settimeout(0.2)
            tail = b""
            while not self.stop.is_set():
                try:
                    chunk = self.client.sock.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    raise EOFError("the server closed the connection")
                if self.pattern is None:
                    continue
                data = tail + chunk
                end = data.rfind(b"\n") + 1
                tail = data[end:]
                for match in self.pattern.finditer(data, 0, end):
                    self.on_match(match.group(1))
        except BaseException as error:
            self.error = error


class _Flooder(threading.Thread):
    """Sends `block` again and again until `stop` or `limit` seconds."""

    def __init__(self, client: Client, block: bytes, stop: threading.Event, limit: float) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.block = block
        self.stop = stop
        self.deadline = time.monotonic() + limit
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                self.client.sock.sendall(self.block)
                self.sent += len(self.block)
        except BaseException as error:
            self.error = error


@pytest.mark.parametrize("flood", ["unknown-commands", "valid-sends"])
def test_flooder_does_not_starve_a_conversation(flood: str) -> None:
    with _serve() as server:
        alice = server.client()
        alice.register("alice")
        bob = server.client()
        bob.register("bob")
        flooder = server.client()
        if flood == "valid-sends":
            # Alice and Bob get the whole flood and must read it all.
            flooder.register("flooder")
            line = b"SEND " + b"f" * 100 + b"\n"
        else:
            # Only the flooder gets answers: one error a line.
            line = b"FLOOD " + b"f" * 100 + b"\n"

        stop = threading.Event()
        pongs: list[int] = []
        pong_arrived = threading.Condition()

        def on_ping(number: bytes) -> None:
            bob.send(b"SEND pong " + number + b"\n")

        def on_pong(number: bytes) -> None:
            with pong_arrived:
                pongs.append(int(number))
                pong_arrived.notify()

        threads: list[_Reader | _Flooder] = [
            _Reader(alice, rb"^RECEIVE bob pong (\d+)$", on_pong, stop),
            _Reader(bob, rb"^RECEIVE alice ping (\d+)$", on_ping, stop),
            _Reader(flooder, None, lambda _: None, stop),
        ]
        flood_thread = _Flooder(flooder, line * 2048, stop, limit=20)
        threads.append(flood_thread)
        try:
            for thread in threads:
                thread.start()
            _poll(lambda: flood_thread.sent >= 1 << 20, TIMEOUT, "the flood to start")
            flooded_before = flood_thread.sent
            round_trips: list[float] = []
            for number in range(20):
                start = time.monotonic()
                alice.send(f"SEND ping {number}\n".encode())
                with pong_arrived:
                    arrived = pong_arrived.wait_for(
                        partial(operator.contains, pongs, number), TIMEOUT
                    )
                assert arrived, f"no pong {number}; errors: {[t.error for t in threads]}"
                round_trips.append(time.monotonic() - start)
                time.sleep(0.05)  # a conversation, not a benchmark
            flooded = flood_thread.sent - flooded_before
        finally:
            stop.set()
            for thread in threads:
                thread.join(TIMEOUT)
        assert [thread.error for thread in threads] == [None] * len(threads)
        assert pongs == list(range(20))
        # The flood really ran alongside the whole conversation.
        assert flooded >= 1 << 20, f"only {flooded} bytes flooded"
        assert max(round_trips) < 1.5, f"round trips {sorted(round_trips)[-3:]}"
        server.finish()


# --- many clients ---------------------------------------------------------------


def test_thousand_registered_clients_all_receive_a_broadcast() -> None:
    count = 1000
    _raise_fd_limit(count + 200)  # the sockets here; the server inherits it too
    with _serve() as server:
        clients = [server.client() for _ in range(count)]
        # Pipelined: every client's name and sync are sent before any reply
        # is read.
        for index, client in enumerate(clients):
            client.send(f"USERNAME user{index}\n".encode() + SYNC)
        for client in clients:
            assert client.until(SYNC_REPLY) == []
        clients[0].send(b"SEND hello, everyone\n")
        assert clients[0].sync() == []
        for client in clients[1:]:
            assert client.line() == b"RECEIVE user0 hello, everyone"
        for client in clients:
            client.send(SYNC)
        for client in clients:
            assert client.until(SYNC_REPLY) == []
        server.finish()


def test_resets_in_the_middle_of_a_broadcast_spare_the_others() -> None:
    # A limit no survivor can reach: they are read only after the burst.
    with _serve("--output-limit", str(16 << 20)) as server:
        sender = server.client()
        sender.register("sender")
        members = [server.client() for _ in range(60)]
        for index, client in enumerate(members):
            client.register(f"m{index}")
        victims = members[::3]
        survivors = [client for client in members if client not in victims]
        messages = [f"{index} ".encode() + b"w" * 200 for index in range(4000)]
        chunk = len(messages) // len(victims)
        # Each victim resets, with output unread, while the server is still
        # working through the burst and sending to it.
        for number, victim in enumerate(victims):
            sender.send(_sends(messages[number * chunk : (number + 1) * chunk]))
            _reset(victim)
        assert sender.sync() == []
        expected = _receives("sender", messages)
        for client in survivors:
            assert client.sync() == expected
        # Still serving: a newcomer takes a victim's name and talks.
        newcomer = server.client()
        newcomer.register("m0")
        newcomer.send(b"SEND still up\n")
        assert newcomer.sync() == []
        assert sender.sync() == [b"RECEIVE m0 still up"]
        for client in survivors:
            assert client.sync() == [b"RECEIVE m0 still up"]
        server.finish()
