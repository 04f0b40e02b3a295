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
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from selectors import EVENT_READ
from typing import Any

import pytest

import protocol
from chat import ChatServer, Connection
from conftest import (
    HERE,
    NAME_HAS_SPACES,
    NAME_REQUIRED,
    NAME_TAKEN,
    SERVICE_UNAVAILABLE,
    SYNC,
    SYNC_REPLY,
    TIMEOUT,
    Client,
    FakeClock,
    Pumped,
    ServerProcess,
    WebSocketClient,
    free_port,
    in_process,
    launch,
    poll,
    require_tool,
    run_chat,
    sends,
    turns,
    username,
)
from room import FORMS, name_keys

hiredis = pytest.importorskip("hiredis")
import cluster as cluster_module  # noqa: E402  (needs hiredis)
import redis_link  # noqa: E402

REDIS_SERVER = require_tool(shutil.which("redis-server"), "redis-server", module=True)

# How long anything that crosses servers (or waits for a lease) may take.
DEADLINE = 15.0
NO_PERSISTENCE = ("--save", "", "--appendonly", "no")
# The short lease the tests use, so that expiry is quick to observe.
LEASE_MS = 1500


class Redis:
    """A redis-server child process on a fixed port, restartable; `options`
    replace NO_PERSISTENCE (persistence on, a password)."""

    def __init__(self, *options: str) -> None:
        self.port = free_port()
        self.options = options or NO_PERSISTENCE
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", *self.options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def answers() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"redis-server exited with {self.process.returncode}")
            try:
                return bool(self.command(b"PING") == b"PONG")  # not LOADING
            except OSError:
                return False

        poll("redis-server to start", answers)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(TIMEOUT)
        self.process = None

    def command(self, *args: bytes) -> Any:
        """One command on a fresh connection (after AUTH, if the options set
        a password); its reply."""
        options = list(self.options)
        hello = b""
        if "--requirepass" in options:
            password = options[options.index("--requirepass") + 1].encode()
            hello = redis_link.encode_command(b"AUTH", password)
        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as sock:
            sock.sendall(hello + redis_link.encode_command(*args))
            reader = hiredis.Reader()
            replies: list[Any] = []
            while len(replies) < (2 if hello else 1):
                if (reply := reader.gets()) is not False:
                    replies.append(reply)
                    continue
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("redis closed the connection")
                reader.feed(data)
            return replies[-1]


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

    def spawn(
        self, *args: str, port: int = 0, ready: bool = True, url: str | None = None
    ) -> ServerProcess:
        """A server of the cluster; `url` (a proxy's) instead of Redis's own."""
        redis_url = self.redis.url if url is None else url
        server = self.servers.enter_context(
            launch("--redis", redis_url, "--lease-ms", str(LEASE_MS), *args, port=port)
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


def redis_keys(name: str, room: str = "chat") -> list[bytes]:
    """The Redis keys that hold `name`'s lease: one per form (room.name_keys)."""
    command = protocol.check_name(name.encode())
    assert isinstance(command, protocol.SetName)
    return [
        f"chat:{room}:name:{form}:{key}".encode()
        for form, key in zip(FORMS, name_keys(command), strict=True)
    ]


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


def test_websocket_members_are_members_across_servers(cluster: Cluster) -> None:
    """People in a web browser: a WebSocket member on one server and TCP
    members on another chat both ways, and names stay unique across servers
    and transports (cluster mode holds for WebSocket members as for TCP ones)."""
    web_port = free_port()
    one, two = cluster.spawn("--web-port", str(web_port)), cluster.spawn()
    browser = WebSocketClient(("127.0.0.1", web_port))
    browser.register("webby")
    bob = cluster.client(two, "bob")
    browser.send(b"SEND hi from a browser\n")
    assert bob.line() == b"RECEIVE webby hi from a browser"
    bob.send(b"SEND hi back\n")
    assert browser.line() == b"RECEIVE bob hi back"
    assert browser.sync() == [] and bob.sync() == []
    other = WebSocketClient(("127.0.0.1", web_port))
    other.send(b"USERNAME BOB\n")
    assert other.sync() == [NAME_TAKEN]
    carol = cluster.client(one, "carol")  # on the browser's server, over TCP
    browser.send(b"SEND and carol\n")
    assert carol.line() == b"RECEIVE webby and carol"
    assert bob.line() == b"RECEIVE webby and carol"
    for client in (browser, other):
        client.close()


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


def test_lookalike_names_are_unique_across_servers(cluster: Cluster) -> None:
    """Names that look the same (v2) are one name across the cluster, until the holder leaves."""
    # The holders' server has a lease far longer than the test: only their
    # leaving frees the names, every form of them, at once.
    one, two = cluster.spawn("--lease-ms", "600000"), cluster.spawn()
    greek = "\u03a4\u0395\u0399\u03a7\u0395"  # ΤΕΙΧΕ: looks like TEIXE as typed
    cyrillic = "t\u0435ixe"  # looks like teixe, TEIXE's key
    holder = cluster.client(one, "TEIXE")
    other = cluster.client(two)
    for attempt in (greek, cyrillic):
        assert take(other, attempt) == [NAME_TAKEN], attempt
    # Refused, so the next line is processed without a name.
    other.send(username(greek) + b"SEND hi\n")
    assert other.sync() == [NAME_TAKEN, NAME_REQUIRED]
    # Another of the contract's pairs: Bob held on one, Greek Βοb tried on two.
    third = cluster.client(one, "Bob")
    assert take(cluster.client(two), "\u0392\u03bfb") == [NAME_TAKEN]  # Greek Βοb
    # When the holder leaves, every form is free for every server.
    holder.close()
    wait_until_free(other, greek)
    assert take(cluster.client(one), cyrillic) == []  # the other form went with it
    third.close()
    wait_until_free(cluster.client(two), "\u0392\u03bfb")


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
    assert cluster.redis.command(b"DEL", *redis_keys("alice")) == 3
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
    keys = cluster.redis.command(b"KEYS", b"chat:chat:name:key:user*")
    owners = {cluster.redis.command(b"GET", key).split(b":")[0] for key in keys}
    assert len(keys) == 16 and len(owners) == 2


def test_command_line(redis: Redis) -> None:
    """The cluster options: --help, a bad --redis URL, no extra import without --redis."""
    usage = run_chat("--help").stdout.decode()
    options = ("--redis URL", "--room NAME", "--reuse-port", "--lease-ms MS")
    for option in (*options, "--redis-timeout SECONDS"):
        assert option in usage
    bad = run_chat("0", "--redis", "http://localhost:6379")
    assert bad.returncode == 2
    assert bad.stderr.decode().count("\n") == 1 and "redis://" in bad.stderr.decode()
    bad = run_chat("0", "--redis", redis.url, "--redis-timeout", "0")
    assert bad.returncode == 2 and "--redis-timeout" in bad.stderr.decode()
    # Single-server mode imports neither cluster.py nor hiredis.
    probe = (
        "import sys, chat; chat.ChatServer('127.0.0.1', 0).close(); "
        "print(sorted({'cluster', 'redis_link', 'hiredis'} & set(sys.modules)))"
    )
    imported = subprocess.run(
        [sys.executable, "-c", probe], cwd=HERE, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert imported.stdout.strip() == "[]", imported.stderr


# --- faults, with a history checker ------------------------------------------
#
# PROTOCOL.md, "What 'accepted' means in cluster mode". Senders send
# numbered messages, each followed by SYNC, so that every SEND's fate is
# known: no reply (accepted) or an ERROR in its place. Listeners only read.
# Afterwards `check_history`: one global order, nothing accepted lost for
# those connected throughout, nothing twice, each sender's own order.

# Short deadlines, so that each fault is an outage quickly. The lease
# (LEASE_MS) is three times the timeout.
REDIS_TIMEOUT = "0.5"
FAULT_ARGS = ("--redis-timeout", REDIS_TIMEOUT)
# A sender's pause between messages: some hundreds a second, all together,
# on a 2-core machine that also runs Redis and the servers.
PACE = 0.004


class Sender(threading.Thread):
    """Sends `<name>-<k>` for k = 0, 1, ..., each with SYNC, until stopped;
    records each SEND's answer and every RECEIVE in between."""

    def __init__(self, client: Client, name: str) -> None:
        super().__init__(name=f"sender-{name}", daemon=True)
        self.client = client
        self.name = name
        self.results: list[tuple[bytes, bytes | None]] = []  # message, its ERROR
        self.received: list[bytes] = []
        self.lost_name = False
        self.failure: BaseException | None = None
        self.stopping = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            k = 0
            while not self.stopping.is_set():
                message = f"{self.name}-{k}".encode()
                self.client.send(b"SEND " + message + b"\n" + SYNC)
                errors: list[bytes] = []
                for line in self.client.until(SYNC_REPLY):
                    (self.received if line.startswith(b"RECEIVE ") else errors).append(line)
                assert errors in ([], [SERVICE_UNAVAILABLE]), errors
                self.results.append((message, errors[0] if errors else None))
                k += 1
                self.stopping.wait(PACE)
        except BaseException as error:  # reported by the test's thread
            self.failure = error

    def accepted(self) -> list[bytes]:
        return [message for message, error in self.results if error is None]

    def refused(self) -> list[bytes]:
        return [message for message, error in self.results if error is not None]

    def count(self, refused: bool = False) -> int:
        return len(self.refused() if refused else self.accepted())

    def stop(self) -> None:
        self.stopping.set()
        self.join(DEADLINE)
        assert not self.is_alive() and self.failure is None, self.failure


class Listener(threading.Thread):
    """Reads every line, until stopped."""

    def __init__(self, client: Client) -> None:
        super().__init__(name="listener", daemon=True)
        self.client = client
        self.lines: list[bytes] = []
        self.closed = False
        self.stopping = threading.Event()
        client.sock.settimeout(0.1)
        self.start()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.lines.append(self.client.line())
            except TimeoutError:
                continue
            except (EOFError, OSError):
                self.closed = True
                return

    def messages(self) -> set[bytes]:
        return {line.split(b" ", 2)[2] for line in list(self.lines)}

    def stop(self) -> None:
        self.stopping.set()
        self.join(DEADLINE)


def run_senders(senders: list[Sender], at_least: int) -> None:
    """Until every sender has had `at_least` more messages accepted."""
    targets = [sender.count() + at_least for sender in senders]
    poll(
        f"{at_least} more messages accepted from each sender",
        lambda: all(s.count() >= t or s.failure for s, t in zip(senders, targets, strict=True)),
        DEADLINE,
    )


def check_history(senders: list[Sender], listeners: list[Listener]) -> list[bytes]:
    """Stop the senders, wait until every listener has every accepted
    message, and check the history; the global order, as RECEIVE lines."""
    for sender in senders:
        sender.stop()
    accepted = {message for sender in senders for message in sender.accepted()}
    poll(
        "every accepted message to reach every listener",
        lambda: all(accepted <= listener.messages() for listener in listeners),
        DEADLINE,
    )
    for listener in listeners:
        listener.client.send(SYNC)  # nothing else is on its way: all arrived
        poll("the listener's sync", lambda: SYNC_REPLY in listener.lines, DEADLINE)  # noqa: B023
        listener.stop()
        assert not listener.closed
    order = [line for line in listeners[0].lines if line != SYNC_REPLY]
    assert all(line.startswith(b"RECEIVE ") for line in order), order
    assert len(set(order)) == len(order), "a message delivered twice"
    for listener in listeners[1:]:  # one global order
        assert [line for line in listener.lines if line != SYNC_REPLY] == order
    for sender in senders:
        prefix = f"RECEIVE {sender.name} {sender.name}-".encode()
        mine = [int(line[len(prefix) :]) for line in order if line.startswith(prefix)]
        assert mine == sorted(mine), f"{sender.name}'s order"
        # The sender saw everyone else's, in the same order: all of them,
        # once it has read the rest.
        others = [line for line in order if not line.startswith(prefix)]
        seen = sender.received + sender.client.sync()
        assert seen == others[: len(seen)]
        # A SEND answered ERROR was not stored, unless Redis stored it just
        # as the link broke: at most one per sender per fault.
        delivered = {line.split(b" ", 2)[2] for line in order}
        assert len(set(sender.refused()) & delivered) <= 1
    return order


def fault_cluster(
    cluster: Cluster, servers: int = 2, url: str | None = None
) -> tuple[list[ServerProcess], list[Sender], list[Listener]]:
    """`servers` servers (the first through `url`, if given), each with a
    sender and a listener."""
    spawned = [cluster.spawn(*FAULT_ARGS, url=url if i == 0 else None) for i in range(servers)]
    # Everyone registered before anyone sends.
    clients = [cluster.client(server, f"s{i}") for i, server in enumerate(spawned)]
    listeners = [Listener(cluster.client(server, f"l{i}")) for i, server in enumerate(spawned)]
    senders = [Sender(client, f"s{i}") for i, client in enumerate(clients)]
    run_senders(senders, 20)
    return spawned, senders, listeners


def test_redis_killed_and_restarted_with_persistence_loses_nothing(tmp_path: Path) -> None:
    """With Redis persistence on, nothing accepted is lost across a Redis restart."""
    # "always": written before Redis answers. With the default "everysec",
    # Redis may answer while an fsync runs and write later, so a SIGKILL can
    # lose what it had confirmed (seen in CI).
    redis = Redis(
        "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir", str(tmp_path)
    )
    redis.start()
    cluster = Cluster(redis)
    try:
        servers, senders, listeners = fault_cluster(cluster)
        for _ in range(2):
            assert redis.process is not None
            redis.process.send_signal(signal.SIGKILL)
            redis.process.wait(TIMEOUT)
            redis.start()  # loads its append-only file
            run_senders(senders, 20)
        order = check_history(senders, listeners)
        assert len(order) >= 2 * 60
        for server in servers:
            assert "Redis lost" not in server.log.text()
    finally:
        cluster.close()
        redis.stop()


def test_redis_restarted_without_persistence_logs_what_was_lost(cluster: Cluster) -> None:
    """With Redis persistence off, what Redis lost is logged by every server."""
    servers, senders, listeners = fault_cluster(cluster)
    cluster.redis.stop()  # SIGKILL
    cluster.redis.start()  # empty
    run_senders(senders, 20)
    check_history(senders, listeners)
    for server in servers:
        poll("the loss to be logged", lambda: "Redis lost" in server.log.text())  # noqa: B023


def test_a_paused_redis_is_an_outage_within_the_deadline(cluster: Cluster) -> None:
    """A Redis that stops answering is an outage once a deadline passes; nothing accepted lost."""
    servers, senders, listeners = fault_cluster(cluster)
    assert cluster.redis.process is not None
    refused = [sender.count(refused=True) for sender in senders]
    cluster.redis.process.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        # A SEND waits at most the timeout; a heartbeat notices a quiet link
        # within half of it more. Generous for a busy machine, still far
        # below a lease renewal's 30 s.
        poll(
            "every sender to be refused",
            lambda: all(s.count(refused=True) > r for s, r in zip(senders, refused, strict=True)),
            DEADLINE,
        )
        assert time.monotonic() - stopped < 3 * float(REDIS_TIMEOUT) + 1.0
        poll(
            "the outage to be logged",
            lambda: all("cannot reach Redis" in server.log.text() for server in servers),
        )
        time.sleep(1.0)  # longer than the lease: Redis's clock moves on while it is stopped
    finally:
        cluster.redis.process.send_signal(signal.SIGCONT)
    run_senders(senders, 20)
    check_history(senders, listeners)


def test_a_server_paused_past_its_lease_cannot_send_on_a_name_given_away(cluster: Cluster) -> None:
    """Names are fenced: no two connections send under one name; the one that lost it is told."""
    one, two = cluster.spawn(*FAULT_ARGS), cluster.spawn(*FAULT_ARGS)
    alice = cluster.client(one, "alice")
    listener = cluster.client(two, "listener")
    os.kill(one.pid, signal.SIGSTOP)
    try:
        # Queued in the kernel while her server is stopped.
        alice.send(b"".join(b"SEND old-%d\n" % k for k in range(50)))
        newcomer = cluster.client(two)
        wait_until_free(newcomer, "alice")  # her lease ran out
        newcomer.send(b"SEND new-1\n")
        assert listener.line() == b"RECEIVE alice new-1"
    finally:
        os.kill(one.pid, signal.SIGCONT)
    # The renewal and the queued SENDs both find the name taken: told once,
    # every SEND refused, none stored.
    lines = alice.sync()
    # Her server may deliver the stream's new entry before it learns that
    # the name is gone: until then she is still a member there.
    if lines[:1] == [b"RECEIVE alice new-1"]:
        lines = lines[1:]
    assert lines in (
        [NAME_TAKEN] + [NAME_REQUIRED] * 49,
        [NAME_TAKEN] + [NAME_REQUIRED] * 50,
    ), lines
    newcomer.send(b"SEND new-2\n")
    assert listener.line() == b"RECEIVE alice new-2"
    assert listener.sync() == []
    assert take(alice, "alice") == [NAME_TAKEN]


class Proxy:
    """A TCP proxy to Redis in the test process, on 127.0.0.1: `stall` stops
    forwarding, both ways and for new connections too, as a network cut
    does; `heal` forwards again what was held."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="proxy", daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=TIMEOUT)
            except OSError:
                return
            upstream.settimeout(None)
            self.sockets += (client, upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self.flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def stall(self) -> None:
        self.flowing.clear()

    def heal(self) -> None:
        self.flowing.set()

    def close(self) -> None:
        self.flowing.set()
        self.listener.close()
        for sock in self.sockets:
            sock.close()


def test_a_server_cut_from_redis_delivers_what_it_missed(cluster: Cluster) -> None:
    """A server cut from Redis: unavailable within the deadline, then all it missed, in order."""
    proxy = Proxy(cluster.redis.port)
    try:
        servers, senders, listeners = fault_cluster(cluster, servers=2, url=proxy.url)
        cut, connected = senders
        refused = cut.count(refused=True)
        proxy.stall()
        stalled = time.monotonic()
        poll("the cut server to refuse", lambda: cut.count(refused=True) > refused, DEADLINE)
        assert time.monotonic() - stalled < 3 * float(REDIS_TIMEOUT) + 1.0
        # The other server's users carry on meanwhile, past the lease.
        run_senders([connected], 200)
        proxy.heal()  # what the cut server sent before it gave up arrives late
        run_senders(senders, 20)
        order = check_history(senders, listeners)
        during = [line for line in order if line.startswith(b"RECEIVE s1 ")]
        assert len(during) >= 220
        log = servers[0].log.text()
        assert log.count("cannot reach Redis") == 1 and "is back after" in log
    finally:
        proxy.close()


def test_a_server_that_fell_behind_delivers_everything_in_order(cluster: Cluster) -> None:
    """A server that fell behind delivers all it missed in order; a slow reader: all, or closed."""
    one = cluster.spawn(*FAULT_ARGS)
    two = cluster.spawn(*FAULT_ARGS, "--output-limit", str(64 << 20))
    sender = cluster.client(one, "sender")
    reader = cluster.client(two, "reader")
    slow = two.small_window_client()  # reads nothing until the end
    slow.register("slow")
    count, size = 3000, 2000  # 6 MB: as a pub/sub subscriber, far past Redis's 8 MB/60 s soft limit
    lines = [b"SEND %05d-%s" % (k, b"x" * (size - 6)) for k in range(count)]
    expected = [b"RECEIVE sender " + line[5:] for line in lines]
    os.kill(two.pid, signal.SIGSTOP)  # falls behind, shorter than its lease
    try:
        sender.send(b"\n".join(lines) + b"\n")
        assert sender.sync() == []  # all stored
    finally:
        os.kill(two.pid, signal.SIGCONT)
    assert reader.lines(count) == expected
    assert reader.sync() == []
    # The slow reader got a prefix, in order, then was closed; or everything.
    received: list[bytes] = []
    with contextlib.suppress(EOFError, ConnectionResetError):
        while len(received) < count:
            received.append(slow.line())
    assert received == expected[: len(received)]
    if len(received) < count:
        poll("the slow reader's close to be logged", lambda: "slow consumer" in two.log.text())


def test_a_server_behind_the_kept_history_closes_its_members(cluster: Cluster) -> None:
    """A server further behind than Redis keeps closes its members' connections (logged)."""
    one, two = cluster.spawn(*FAULT_ARGS), cluster.spawn(*FAULT_ARGS)
    sender = cluster.client(one, "sender")
    reader = cluster.client(two, "reader")
    lurker = cluster.client(two)  # no name: not a member, stays
    os.kill(two.pid, signal.SIGSTOP)
    try:
        # A read the stopped server had waiting in Redis may be answered
        # with this one (it is then in its socket already); not with more.
        sender.send(b"SEND first\n")
        assert sender.sync() == []
        sender.send(sends([b"m%d" % k for k in range(10)]))
        assert sender.sync() == []
        # As if far more had come since than Redis keeps.
        assert cluster.redis.command(b"XTRIM", b"chat:chat:messages", b"MAXLEN", b"0") >= 1
        sender.send(b"SEND after the gap\n")
        assert sender.sync() == []
    finally:
        os.kill(two.pid, signal.SIGCONT)
    # Closed, having seen nothing after the gap.
    assert reader.read_to_eof() in (b"", b"RECEIVE sender first\n")
    poll("the close to be logged", lambda: "fell behind" in two.log.text())
    assert lurker.sync() == []
    assert take(lurker, "reader") == []  # its name was freed


def test_a_wrong_password_or_database_exits_at_start() -> None:
    """A Redis that refuses the configuration: the server exits at start, one clear line."""
    redis = Redis(*NO_PERSISTENCE, "--requirepass", "secret")
    redis.start()
    plain = Redis()  # no password at all
    plain.start()
    try:
        base = f"127.0.0.1:{redis.port}"
        for url, words in (
            (f"redis://:wrong@{base}/0", "WRONGPASS"),
            (f"redis://{base}/0", "NOAUTH"),
            (f"redis://:secret@{base}/99", "SELECT"),
            (f"redis://:secret@127.0.0.1:{plain.port}/0", "AUTH"),
        ):
            result = run_chat("0", "--redis", url)
            stderr = result.stderr.decode()
            assert result.returncode == 2, stderr
            assert stderr.count("\n") == 1 and words in stderr, stderr
        with launch() as chat:  # not a Redis at all
            result = run_chat("0", "--redis", f"redis://127.0.0.1:{chat.port}/0")
            stderr = result.stderr.decode()
            assert result.returncode == 2 and stderr.count("\n") == 1, stderr
            assert "does not answer like a Redis" in stderr
    finally:
        redis.stop()
        plain.stop()


# --- Timers on the reactor's clock (a fake one) -----------------------------


def test_leases_are_renewed_every_third_of_the_lease(redis: Redis) -> None:
    """Cluster mode: names are leases renewed every third of --lease-ms,
    on the reactor's clock; a renewal extends the lease in Redis."""
    clock = FakeClock()
    # The timeout puts the heartbeat (half of it) after the renewals.
    room = cluster_module.room_factory(redis.url, room="chat", lease_ms=3000, timeout=5.0)
    with in_process(clock=clock, room=room) as server:
        alice = Pumped(server)

        def taken() -> bool:
            # Until the room's first round trip to Redis, a name is answered
            # ERROR Service unavailable.: ask again until the room is up.
            alice.send(username("alice"))
            reply = alice.sync()
            assert reply in ([], [SERVICE_UNAVAILABLE]), reply
            return reply == []

        turns(server, taken, what="the room to take a name")
        key = redis_keys("alice")[0]
        assert 0 < redis.command(b"PTTL", key) <= 3000
        # The renewal is due a third of the lease after connecting.
        assert server.view.next_timer_due() == pytest.approx(clock.now + 1.0)
        redis.command(b"PEXPIRE", key, b"100000")
        clock.advance(1.0)
        renewed = turns(server, lambda: 0 < redis.command(b"PTTL", key) <= 3000)
        assert renewed  # to the lease
        assert server.view.next_timer_due() == pytest.approx(clock.now + 1.0)
        alice.close()


def fake_clock_server(
    redis: Redis, timeout: float, **options: Any
) -> tuple[ChatServer, FakeClock, cluster_module.RedisRoom]:
    """A ChatServer in cluster mode on a fake clock, up; and its room.
    `options` are ChatServer's."""
    clock = FakeClock()
    factory = cluster_module.room_factory(redis.url, room="chat", lease_ms=30_000, timeout=timeout)
    server = ChatServer("127.0.0.1", 0, clock=clock, room=factory, **options)
    room = server.view.room
    assert isinstance(room, cluster_module.RedisRoom)
    assert turns(server, lambda: room.available, 200)
    return server, clock, room


def answer(client: socket.socket) -> bytes:
    client.settimeout(0.001)
    with contextlib.suppress(TimeoutError):
        return client.recv(4096)
    return b""


class Replies:
    """What the server has sent a plain client so far, gathered as turns go by."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.got = b""

    def complete(self) -> bool:
        """Take what has come; whether it ends with a whole line."""
        self.got += answer(self.client)
        return self.got.endswith(b"\n")


@contextlib.contextmanager
def alice_with_redis_paused(
    server: ChatServer, redis: Redis
) -> Iterator[tuple[socket.socket, Replies]]:
    """A client of `server` named alice, then Redis paused (CLIENT PAUSE, for
    10 s): what she sends next waits on Redis."""
    with socket.create_connection(server.address, timeout=TIMEOUT) as client:
        client.sendall(b"USERNAME alice\nPING\n")
        replies = Replies(client)
        assert turns(server, replies.complete) and replies.got == SYNC_REPLY + b"\n"
        replies.got = b""
        assert redis.command(b"CLIENT", b"PAUSE", b"10000", b"ALL") == b"OK"
        yield client, replies


def test_a_held_sender_is_not_read_and_not_watched_once_it_has_input(redis: Redis) -> None:
    """Cluster mode: a sender held until Redis stores its turn keeps its read
    interest (no epoll_ctl per hold) until input arrives; that input is not
    read, and the connection is no longer watched for reading (select would
    spin on it), until it is resumed."""
    timeout = 2.0
    server, clock, _ = fake_clock_server(redis, timeout)

    def watched_for_reading(conn: Connection) -> bool:
        return bool(server.view.events(conn) & EVENT_READ)

    try:
        with alice_with_redis_paused(server, redis) as (client, replies):
            client.sendall(b"SEND hello\n")
            assert turns(server, lambda: len(server.view.held()) == 1)
            (conn,) = server.view.held()
            assert watched_for_reading(conn)  # held, but no input yet
            client.sendall(b"PING\n")
            assert turns(server, lambda: not watched_for_reading(conn))
            assert conn.backlog() == 0 and conn.partial == b""  # left in the kernel
            assert not turns(server, replies.complete, 30)
            wait = server.view.select_timeout()
            assert wait is not None and wait > 0  # select waits for the next timer
            clock.advance(timeout)
            assert turns(server, lambda: replies.complete() and replies.got.count(b"\n") == 2)
            assert replies.got == SERVICE_UNAVAILABLE + b"\n" + SYNC_REPLY + b"\n"
            assert watched_for_reading(conn) and not server.view.held()
    finally:
        server.close()


def test_a_send_not_stored_within_the_deadline_is_answered_unavailable(redis: Redis) -> None:
    """Cluster mode: a SEND Redis did not confirm within the deadline is
    answered ERROR Service unavailable., in its place, at the deadline on
    the reactor's clock, and the later lines wait for it."""
    timeout = 2.0
    server, clock, room = fake_clock_server(redis, timeout)
    try:
        with alice_with_redis_paused(server, redis) as (client, replies):
            client.sendall(b"SEND hello\nPING\n")
            assert not turns(server, replies.complete, 30)  # held: the PING waits too
            clock.advance(timeout - 0.01)
            assert not turns(server, replies.complete, 30)
            clock.advance(0.01)
            assert turns(server, lambda: replies.complete() and replies.got.count(b"\n") == 2)
            assert replies.got == SERVICE_UNAVAILABLE + b"\n" + SYNC_REPLY + b"\n"
            assert not room.available
    finally:
        server.close()


def test_the_first_retry_after_redis_closed_a_working_link_is_at_once(redis: Redis) -> None:
    """Cluster mode: after Redis closed a working link, the first retry is at
    once; the next ones back off (BACKOFF_FIRST, jittered)."""
    server, clock, room = fake_clock_server(redis, 2.0)
    try:
        assert redis.command(b"CLIENT", b"KILL", b"TYPE", b"normal") >= 2
        assert turns(server, lambda: not room.available)
        # Back without the clock moving at all: the retry was due at once.
        assert turns(server, lambda: room.available)
        redis.stop()
        # At once again, refused this time: then the back-off.
        assert turns(server, lambda: not room.available)
        assert turns(server, lambda: room._session._retry is not None)
        due = server.view.next_timer_due()
        assert due is not None
        first = redis_link.BACKOFF_FIRST
        assert first / 2 <= due - clock.now <= first
    finally:
        server.close()


def test_a_heartbeat_runs_every_half_timeout_and_notices_a_hung_redis(redis: Redis) -> None:
    """Cluster mode: while idle, a heartbeat asks Redis every half of
    --redis-timeout, so a hung Redis is an outage within 1.5 x the timeout."""
    timeout = 4.0
    server, clock, room = fake_clock_server(redis, timeout)

    def heartbeats() -> int:
        stats = redis.command(b"INFO", b"commandstats").decode()
        line = next(line for line in stats.splitlines() if line.startswith("cmdstat_time:"))
        return int(line.split("calls=")[1].split(",")[0])

    try:
        before = heartbeats()
        clock.advance(timeout / 2 - 0.01)
        turns(server, lambda: False, 20)
        assert heartbeats() == before
        clock.advance(0.01)
        assert turns(server, lambda: heartbeats() == before + 1)
        assert redis.command(b"CLIENT", b"PAUSE", b"20000", b"ALL") == b"OK"
        clock.advance(timeout / 2)  # the next heartbeat, never answered
        assert not turns(server, lambda: not room.available, 20)
        clock.advance(timeout)  # its deadline (the reader's too, by now)
        assert turns(server, lambda: not room.available)
    finally:
        server.close()


def test_a_throttled_sender_waits_for_its_tokens_and_redis_alike(redis: Redis) -> None:
    """Cluster mode with --send-rate 2 --send-burst 2: a sender's SENDs are
    stored at the rate (its connection held for Redis and throttled by
    turns), none lost, in order, and its later lines wait behind them."""
    server, clock, _ = fake_clock_server(redis, 30.0, send_rate=2, send_burst=2)
    try:
        alice, bob = Pumped(server), Pumped(server)
        alice.register("alice")
        bob.register("bob")

        def bob_has(count: int) -> bool:
            bob.pump()
            return bob.buffer.count(b"\n") == count

        alice.send(sends([b"one", b"two", b"three", b"four"]) + SYNC)
        assert turns(server, lambda: bob_has(2))
        assert turns(server, lambda: server.view.throttled() != [])
        assert not turns(server, lambda: bob_has(3), 30)
        clock.advance(0.5)
        assert turns(server, lambda: bob_has(3))
        assert alice.buffer == b""  # its PING waits behind "four"
        clock.advance(0.5)
        alice.pump_until(lambda: SYNC_REPLY in alice.buffer, "the reply to PING")
        assert bob.sync() == [
            b"RECEIVE alice " + word for word in (b"one", b"two", b"three", b"four")
        ]
        assert alice.buffer == SYNC_REPLY + b"\n"
        assert server.stats.throttled_seconds == 1.0  # 0.5 s for each of two tokens
    finally:
        server.close()
