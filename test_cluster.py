"""Cluster mode (PROTOCOL.md, "Cluster mode") against a real redis-server.

Each test starts its own redis-server on a free port (no persistence) and two
or three `chat.py --redis ...` processes (conftest's `launch`, on port 0).
Every read has a timeout; what crosses servers is awaited with `poll` and a
deadline, never with a fixed sleep. The contract's lines come from
conftest's table, not from protocol.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from chat import ChatServer
from conftest import (
    HERE,
    NAME_HAS_SPACES,
    NAME_REQUIRED,
    NAME_TAKEN,
    SERVICE_UNAVAILABLE,
    TIMEOUT,
    Client,
    ServerProcess,
    free_port,
    launch,
    poll,
    run_chat,
    username,
)

hiredis = pytest.importorskip("hiredis")
import cluster as cluster_module  # noqa: E402  (needs hiredis)

REDIS_SERVER = shutil.which("redis-server")
# CI installs redis-server (.ci/run): there, a missing one is a failure.
if REDIS_SERVER is None:
    if os.environ.get("CI"):
        pytest.fail("redis-server is missing", pytrace=False)
    pytest.skip("redis-server is not installed", allow_module_level=True)

# How long anything that crosses servers (or waits for a lease) may take.
DEADLINE = 15.0
NO_PERSISTENCE = ("--save", "", "--appendonly", "no")
# The short lease the tests use, so that expiry is quick to observe.
LEASE_MS = 1500


class Redis:
    """A redis-server child process on a fixed port, restartable."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", *NO_PERSISTENCE],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def answers() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"redis-server exited with {self.process.returncode}")
            try:
                return bool(self.command(b"PING") == b"PONG")
            except OSError:
                return False

        poll("redis-server to start", answers)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(TIMEOUT)
        self.process = None

    def command(self, *args: bytes) -> Any:
        """One command on a fresh connection; its reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as sock:
            sock.sendall(cluster_module.encode_command(*args))
            reader = hiredis.Reader()
            while (reply := reader.gets()) is False:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("redis closed the connection")
                reader.feed(data)
            return reply


@pytest.fixture
def redis() -> Iterator[Redis]:
    server = Redis()
    server.start()
    yield server
    server.stop()


class Cluster:
    """chat.py processes sharing one Redis; all killed at the end."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.servers = contextlib.ExitStack()
        self.probes = 0

    def spawn(self, *args: str, port: int = 0, ready: bool = True) -> ServerProcess:
        server = self.servers.enter_context(
            launch("--redis", self.redis.url, "--lease-ms", str(LEASE_MS), *args, port=port)
        )
        if ready:
            self.wait_ready(server)
        return server

    def wait_ready(self, server: ServerProcess) -> None:
        """Until the server is subscribed: a USERNAME is accepted."""
        self.probes += 1
        probe = f"probe{self.probes}"

        def accepts() -> bool:
            with Client(server.address) as client:
                client.send(f"USERNAME {probe}\n".encode())
                lines = client.sync()
                assert lines in ([], [SERVICE_UNAVAILABLE]), lines
                return lines == []

        poll("the server to reach Redis", accepts, DEADLINE)

    def client(self, server: ServerProcess, name: str | None = None) -> Client:
        client = server.client()
        if name is not None:
            client.register(name)
        return client

    def readers(self) -> int:
        """How many servers read the room's stream now (blocked in XREAD)."""
        clients = self.redis.command(b"CLIENT", b"LIST").decode()
        return sum(" cmd=xread " in f" {line} " for line in clients.splitlines())

    def close(self) -> None:
        """Close every client and kill every server."""
        self.servers.close()


@pytest.fixture
def cluster(redis: Redis) -> Iterator[Cluster]:
    running = Cluster(redis)
    yield running
    running.close()


def take(client: Client, name: str) -> list[bytes]:
    """Send USERNAME; the replies to it."""
    client.send(username(name))
    return client.sync()


def wait_until_free(client: Client, name: str) -> None:
    """Poll USERNAME until the name is given (it was freed elsewhere)."""

    def given() -> bool:
        lines = take(client, name)
        assert lines in ([], [NAME_TAKEN]), lines
        return lines == []

    poll(f"{name!r} to be free", given, DEADLINE)


# --- messages ------------------------------------------------------------


def test_two_users_on_two_servers_talk(cluster: Cluster) -> None:
    """A SEND accepted by one server reaches every other member on every server."""
    one, two = cluster.spawn(), cluster.spawn()
    alice = cluster.client(one)
    # A USERNAME waits for Redis, and the lines after it wait with it: the
    # SEND is not refused for lack of a name.
    alice.send(b"USERNAME alice\nSEND hi bob\n")
    assert alice.sync() == []
    bob = cluster.client(two, "bob")
    carol = cluster.client(one, "carol")  # on alice's server
    alice.send(b"SEND hello\n")
    assert bob.line() == b"RECEIVE alice hello"
    assert carol.line() == b"RECEIVE alice hello"
    bob.send(b"SEND hi alice\n")
    assert alice.line() == b"RECEIVE bob hi alice"  # not her own before it
    assert carol.line() == b"RECEIVE bob hi alice"
    assert alice.sync() == [] and bob.sync() == [] and carol.sync() == []
    # Without a name: nothing received, and the usual error.
    nobody = cluster.client(two)
    nobody.send(b"SEND hi\n")
    assert nobody.sync() == [NAME_REQUIRED]


def test_lines_after_a_username_wait_for_it_in_order(cluster: Cluster) -> None:
    """A connection's lines behind a USERNAME that waits for Redis keep their order."""
    one, two = cluster.spawn(), cluster.spawn()
    bob = cluster.client(two, "bob")
    carol = cluster.client(one)
    # More lines than a turn processes, all behind a USERNAME that waits for
    # Redis, in one packet.
    count = 1200
    carol.send(b"USERNAME carol\n" + b"".join(b"SEND m%d\n" % k for k in range(count)))
    assert bob.lines(count) == [b"RECEIVE carol m%d" % k for k in range(count)]
    assert carol.sync() == []


def test_one_global_order_across_servers(cluster: Cluster) -> None:
    """All recipients on all servers see one global order; no sender gets its own."""
    servers = [cluster.spawn() for _ in range(3)]
    # Two senders per server: a server publishes a turn's messages together,
    # and must still leave each sender out of its own.
    senders = [cluster.client(servers[i % 3], f"sender{i}") for i in range(6)]
    listeners = [cluster.client(server, f"listener{i}") for i, server in enumerate(servers)]
    count = 150
    for i, sender in enumerate(senders):  # all at once: the servers race
        sender.send(b"".join(b"SEND m%d-%d\n" % (i, k) for k in range(count)))
    seen = [listener.lines(len(senders) * count) for listener in listeners]
    assert seen[0] == seen[1] == seen[2]
    for i in range(len(senders)):
        mine = [line for line in seen[0] if line.startswith(b"RECEIVE sender%d " % i)]
        assert mine == [b"RECEIVE sender%d m%d-%d" % (i, i, k) for k in range(count)]
    for i, sender in enumerate(senders):
        others = [line for line in seen[0] if not line.startswith(b"RECEIVE sender%d " % i)]
        assert sender.lines(len(others)) == others
        assert sender.sync() == []
    for listener in listeners:
        assert listener.sync() == []


def test_megabytes_across_servers_arrive_whole(cluster: Cluster) -> None:
    """Every accepted message reaches every member on every server, megabytes of them."""
    # Room to spare for a test process that reads slowly on a busy machine:
    # this test is about Redis and the subscription losing nothing.
    servers = [cluster.spawn("--output-limit", str(64 << 20)) for _ in range(3)]
    sender = cluster.client(servers[0], "sender")
    readers = [cluster.client(server, f"reader{i}") for i, server in enumerate(servers)]
    count, size = 3000, 2000  # 6 MB of messages, 18 MB delivered
    lines = [b"SEND %05d-%s" % (k, b"x" * (size - 6)) for k in range(count)]
    expected = [b"RECEIVE sender " + line[5:] for line in lines]
    received: list[list[bytes] | BaseException] = [[] for _ in readers]

    def read(index: int) -> None:
        try:
            received[index] = readers[index].lines(count)
        except BaseException as error:  # reported by the main thread
            received[index] = error

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(readers))]
    for thread in threads:
        thread.start()
    sender.send(b"\n".join(lines) + b"\n")
    for thread in threads:
        thread.join(DEADLINE * 2)
        assert not thread.is_alive()
    for got in received:
        assert not isinstance(got, BaseException), got
        assert got == expected
    assert sender.sync() == []


# --- names ---------------------------------------------------------------


def test_names_are_unique_across_servers(cluster: Cluster) -> None:
    """Names are unique across the cluster (same comparison); renames free at once."""
    one, two = cluster.spawn(), cluster.spawn()
    teixe = cluster.client(one, "Teixe")
    other = cluster.client(two)
    for variant in ("Teixe", "teixe", "TEIXE", "ｔｅｉｘｅ"):
        assert take(other, variant) == [NAME_TAKEN]
    # Refused, so the next line is processed without a name.
    other.send("USERNAME ＴＥＩＸＥ\nSEND hi\n".encode())
    assert other.sync() == [NAME_TAKEN, NAME_REQUIRED]
    # A rename frees the old name, for every server.
    assert take(teixe, "jeff") == []
    wait_until_free(other, "teixe")
    assert take(teixe, "TEIXE") == [NAME_TAKEN]
    assert take(cluster.client(one), "JEFF") == [NAME_TAKEN]
    # A disconnection frees it too.
    teixe.close()
    wait_until_free(other, "jeff")
    # Changing only the case of one's own name needs nobody's leave.
    assert take(other, "Jeff") == []


def test_a_stopped_server_frees_its_names_at_once(cluster: Cluster) -> None:
    """A server that stops cleanly frees its names at once, for every server."""
    # A lease far longer than the wait below: only a release frees the name.
    one, two = cluster.spawn("--lease-ms", "600000"), cluster.spawn()
    cluster.client(one, "alice")
    one.process.terminate()
    assert one.process.wait(TIMEOUT) == 0
    wait_until_free(cluster.client(two), "alice")


def test_a_killed_servers_names_are_freed_within_the_lease(cluster: Cluster) -> None:
    """A server that dies without cleaning up frees its names within the lease."""
    one, two = cluster.spawn(), cluster.spawn()
    cluster.client(one, "alice")
    bob = cluster.client(two)
    assert take(bob, "alice") == [NAME_TAKEN]
    one.process.kill()  # no chance to release anything
    one.process.wait(TIMEOUT)
    # Still held (no renewal will come): LEASE_MS, polled, bounded.
    wait_until_free(bob, "alice")
    assert bob.sync() == []


# --- outages -------------------------------------------------------------


def test_redis_outage_keeps_connections_and_recovers(cluster: Cluster) -> None:
    """Without Redis: connections stay, Service unavailable, logged once, back by itself."""
    one, two = cluster.spawn(), cluster.spawn()
    alice = cluster.client(one, "alice")
    bob = cluster.client(two, "bob")
    newcomer = cluster.client(two)
    cluster.redis.stop()

    def refused(client: Client) -> Callable[[], bool]:
        def check() -> bool:
            client.send(b"SEND are you there\n")
            lines = client.sync()
            assert lines in ([], [SERVICE_UNAVAILABLE]), lines
            return lines == [SERVICE_UNAVAILABLE]

        return check

    poll("alice's server to notice the outage", refused(alice), DEADLINE)
    poll("bob's server to notice the outage", refused(bob), DEADLINE)
    assert take(alice, "alice2") == [SERVICE_UNAVAILABLE]
    assert take(newcomer, "carol") == [SERVICE_UNAVAILABLE]
    newcomer.send(b"SEND hi\nUSERNAME a b\n")  # what needs no Redis works
    assert newcomer.sync() == [NAME_REQUIRED, NAME_HAS_SPACES]

    cluster.redis.start()  # same port, empty: every lease is gone

    def flows() -> bool:
        alice.send(b"SEND back\n")
        lines = alice.sync()
        assert lines in ([], [SERVICE_UNAVAILABLE]), lines
        return lines == []

    poll("alice's server to reconnect", flows, DEADLINE)
    # Bob may have missed the messages alice sent before his server was
    # back; the first one he gets after that is hers.
    poll("bob's server to reconnect", lambda: take(newcomer, "carol") == [], DEADLINE)
    alice.send(b"SEND after\n")
    for client in (bob, newcomer):
        while (line := client.line()) != b"RECEIVE alice after":
            assert line == b"RECEIVE alice back", line
    # Each server claimed its names again when Redis came back.
    assert take(cluster.client(two), "ALICE") == [NAME_TAKEN]
    assert take(cluster.client(one), "bob") == [NAME_TAKEN]
    # The outage was logged once per server, not once per retry.
    for server in (one, two):
        server.process.terminate()
        log = server.stderr_text()
        assert log.count("cannot reach Redis") == 1, log
        assert log.count("is back after") == 1, log


def test_a_redis_that_stops_answering_counts_as_an_outage(cluster: Cluster) -> None:
    """A Redis that stops answering counts as an outage once a deadline passes."""
    one, two = cluster.spawn(), cluster.spawn()
    alice = cluster.client(one, "alice")
    bob = cluster.client(two, "bob")
    # Redis keeps its connections but answers no command for 4 s. A server
    # renews every LEASE_MS / 3 and gives up when a renewal goes unanswered
    # until the next one is due.
    assert cluster.redis.command(b"CLIENT", b"PAUSE", b"4000", b"ALL") == b"OK"

    def refused() -> bool:
        alice.send(b"SEND anyone?\n")
        lines = alice.sync()
        assert lines in ([], [SERVICE_UNAVAILABLE]), lines
        return lines == [SERVICE_UNAVAILABLE]

    poll("alice's server to give up on Redis", refused, DEADLINE)

    def flows() -> bool:
        alice.send(b"SEND back\n")
        lines = alice.sync()
        assert lines in ([], [SERVICE_UNAVAILABLE]), lines
        return lines == []

    poll("alice's server to reconnect", flows, DEADLINE)
    poll(
        "bob's server to be back",
        lambda: take(cluster.client(two), "ALICE") == [NAME_TAKEN],
        DEADLINE,
    )
    alice.send(b"SEND after\n")
    while (line := bob.line()) != b"RECEIVE alice after":
        assert line in (b"RECEIVE alice anyone?", b"RECEIVE alice back"), line


def test_a_name_given_away_during_an_outage_is_lost(cluster: Cluster) -> None:
    """A name given away during an outage is lost: Username already in use, no name."""
    one, two = cluster.spawn(), cluster.spawn()
    alice = cluster.client(one, "alice")
    bob = cluster.client(two, "bob")
    # As if alice's server had been cut off long enough for her lease to
    # run out, and bob's server had given the name to bob meanwhile.
    assert cluster.redis.command(b"DEL", b"chat:chat:name:alice") == 1
    assert take(bob, "alice") == []
    # Both servers lose their link; on return each claims its names again.
    # Two links per server; the test's own connection is spared (SKIPME).
    assert cluster.redis.command(b"CLIENT", b"KILL", b"TYPE", b"normal") >= 4
    assert alice.line() == NAME_TAKEN  # told, unprompted
    alice.send(b"SEND still me?\n")
    assert alice.sync() == [NAME_REQUIRED]
    assert take(alice, "alice") == [NAME_TAKEN]
    # Bob kept it: wait until his server is back, then talk.
    assert take(alice, "alice3") == []
    poll("bob's server to reconnect", lambda: take(bob, "Alice") == [], DEADLINE)
    bob.send(b"SEND mine now\n")
    assert alice.line() == b"RECEIVE Alice mine now"


def test_a_server_started_before_redis_connects_by_itself(redis: Redis) -> None:
    """A server started before Redis answers Service unavailable, then connects itself."""
    redis.stop()
    running = Cluster(redis)
    try:
        server = running.spawn(ready=False)
        client = running.client(server)
        assert take(client, "early") == [SERVICE_UNAVAILABLE]
        redis.start()
        running.wait_ready(server)
        assert take(client, "early") == []
    finally:
        running.close()


def test_rooms_on_one_redis_are_apart(cluster: Cluster) -> None:
    """Servers with one Redis but another --room serve another room."""
    one, two = cluster.spawn("--room", "red"), cluster.spawn("--room", "blue")
    alice, carol = cluster.client(one, "same"), cluster.client(one, "carol")
    bob, dave = cluster.client(two, "same"), cluster.client(two, "dave")  # no clash
    alice.send(b"SEND in red\n")
    assert carol.line() == b"RECEIVE same in red"
    # Published before dave's line, so it would come first if it crossed.
    dave.send(b"SEND in blue\n")
    assert bob.line() == b"RECEIVE dave in blue"
    assert alice.sync() == [] and carol.sync() == []


# --- the program ---------------------------------------------------------


def test_servers_share_one_port_with_reuse_port(cluster: Cluster) -> None:
    """--reuse-port lets several servers on one machine share one port."""
    first = cluster.spawn("--reuse-port")
    second = cluster.spawn("--reuse-port", port=first.port, ready=False)
    # The second binds before it reads the room: once two readers wait in
    # XREAD, both servers listen.
    poll("the second server to read the room", lambda: cluster.readers() == 2, DEADLINE)
    assert second.process.poll() is None
    clients = [cluster.client(first) for _ in range(16)]  # either server
    for i, client in enumerate(clients):
        # The second server may still be connecting to Redis.
        poll("a name", lambda: take(client, f"user{i}") == [], DEADLINE)  # noqa: B023
    clients[0].send(b"SEND everyone\n")
    for client in clients[1:]:
        assert client.line() == b"RECEIVE user0 everyone"
    # Both servers got some: the owners of the names name two servers. (16
    # connections all on one of two servers: a chance of 1 in 32,768.)
    keys = cluster.redis.command(b"KEYS", b"chat:chat:name:user*")
    owners = {cluster.redis.command(b"GET", key).split(b":")[0] for key in keys}
    assert len(keys) == 16 and len(owners) == 2


def test_command_line(redis: Redis) -> None:
    """The cluster options: --help, a bad --redis URL, no extra import without --redis."""
    usage = run_chat("--help").stdout.decode()
    for option in ("--redis URL", "--room NAME", "--reuse-port", "--lease-ms MS"):
        assert option in usage
    bad = run_chat("0", "--redis", "http://localhost:6379")
    assert bad.returncode == 2
    assert bad.stderr.decode().count("\n") == 1 and "redis://" in bad.stderr.decode()
    # Single-server mode imports neither cluster.py nor hiredis.
    probe = (
        "import sys, chat; chat.ChatServer('127.0.0.1', 0).close(); "
        "print(sorted({'cluster', 'hiredis'} & set(sys.modules)))"
    )
    imported = subprocess.run(
        [sys.executable, "-c", probe], cwd=HERE, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert imported.stdout.strip() == "[]", imported.stderr


# --- Timers on the reactor's clock (a fake one) -----------------------------


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_redis_back_off_doubles_up_to_its_cap_with_jitter() -> None:
    """Cluster mode: reconnecting to an unreachable Redis backs off from
    BACKOFF_FIRST, doubling to BACKOFF_MAX, each wait drawn from its upper
    half (jitter), on the reactor's clock."""
    clock = FakeClock()
    url = f"redis://127.0.0.1:{free_port()}/0"  # nobody listens there
    timeout = 5.0  # a request's deadline, told apart from the waits below
    room = cluster_module.room_factory(url, room="chat", lease_ms=3000, timeout=timeout)
    server = ChatServer("127.0.0.1", 0, clock=clock, room=room)
    try:
        waits = []
        for _ in range(10):
            # The refused connect shows as an event; its _fail sets the retry.
            for _ in range(50):
                server.run_once(max_wait=0.1)
                due = server._timers.next_due()
                if due is not None and due - clock.now != timeout:
                    break
            due = server._timers.next_due()
            assert due is not None
            waits.append(due - clock.now)
            clock.advance(due - clock.now)
        caps = [
            min(cluster_module.BACKOFF_FIRST * 2**i, cluster_module.BACKOFF_MAX) for i in range(10)
        ]
        assert caps[:7] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
        for wait, cap in zip(waits, caps, strict=True):
            assert cap / 2 <= wait <= cap
        assert len({round(wait / cap, 6) for wait, cap in zip(waits, caps, strict=True)}) > 1
    finally:
        server.close()


def test_leases_are_renewed_every_third_of_the_lease(redis: Redis) -> None:
    """Cluster mode: names are leases renewed every third of --lease-ms,
    on the reactor's clock; a renewal extends the lease in Redis."""
    clock = FakeClock()
    # The timeout puts the heartbeat (half of it) after the renewals.
    room = cluster_module.room_factory(redis.url, room="chat", lease_ms=3000, timeout=5.0)
    server = ChatServer("127.0.0.1", 0, clock=clock, room=room)
    try:
        with socket.create_connection(server.address, timeout=TIMEOUT) as client:
            client.sendall(b"USERNAME alice\nPING\n")
            reply = b""
            for _ in range(100):
                server.run_once(max_wait=0.05)
                client.settimeout(0.001)
                with contextlib.suppress(TimeoutError):
                    reply += client.recv(100)
                if reply:
                    break
            assert reply == b"ERROR Unrecognised command.\n"
            key = b"chat:chat:name:alice"
            assert 0 < redis.command(b"PTTL", key) <= 3000
            # The renewal is due a third of the lease after connecting.
            assert server._timers.next_due() == pytest.approx(clock.now + 1.0)
            redis.command(b"PEXPIRE", key, b"100000")
            clock.advance(1.0)
            for _ in range(20):
                server.run_once(max_wait=0.05)
            assert 0 < redis.command(b"PTTL", key) <= 3000  # renewed to the lease
            assert server._timers.next_due() == pytest.approx(clock.now + 1.0)
    finally:
        server.close()
