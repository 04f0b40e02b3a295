"""reactor.py: what the loop does with the Schedule's answers, driven
turn by turn in this thread (conftest.Pumped, a FakeClock) on loopback,
and read through `ChatServer.view`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from conftest import NAME_HAS_SPACES, TIMEOUT, FakeClock, Pumped, TLSFiles
from connection import HANDSHAKE, Connection
from host import Host, Member
from protocol import SetName
from reactor import ChatServer
from room import LocalRoom
from tls import TLSConfig


@pytest.fixture
def clocked() -> Iterator[ChatServer]:
    server = ChatServer("127.0.0.1", 0, clock=FakeClock(), register_timeout=0)
    yield server
    server.close()


def only(server: ChatServer) -> Connection:
    (conn,) = server.view.connections()
    return conn


def turn_until(server: ChatServer, what: str, done: Callable[[], bool]) -> None:
    """Turn the loop until `done()`, for at most TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not done():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        server.run_once(max_wait=0.005)


def test_closing_a_connection_mid_handshake_cancels_its_deadline(tls_files: TLSFiles) -> None:
    """Reactor: a TLS connection that goes away during its handshake takes
    its handshake deadline with it: no timer is left."""
    config = TLSConfig(0, str(tls_files.cert), str(tls_files.key))
    server = ChatServer("127.0.0.1", 0, tls=config, clock=FakeClock(), register_timeout=0)
    try:
        tls_address = server.tls_address
        assert tls_address is not None
        client = Pumped(server, address=("127.0.0.1", tls_address[1]))
        turn_until(server, "the connection", lambda: server.open_count == 1)
        assert server.view.timers_of(only(server)) == [HANDSHAKE]
        client.close()
        turn_until(server, "the close", lambda: server.open_count == 0)
        assert server.view.next_timer_due() is None
    finally:
        server.close()


def test_a_held_connection_is_closed_at_shutdown(clocked: ChatServer) -> None:
    """Reactor: a connection the room holds is closed with the server."""
    client = Pumped(clocked)
    client.register("ann")
    conn = only(clocked)
    clocked.hold(conn)
    assert clocked.view.held() == [conn]
    clocked.close()
    client.sock.settimeout(TIMEOUT)
    assert client.sock.recv(100) == b""
    assert conn.closed and clocked.view.held() == []


class HoldingRoom(LocalRoom):
    """A LocalRoom that holds every member asking for a name, as cluster
    mode does while Redis answers; `answer` gives it the name and resumes it."""

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.asking: list[tuple[Member, SetName]] = []

    def set_name(self, member: Member, command: SetName) -> None:
        self.asking.append((member, command))
        self.host.hold(member)

    def answer(self) -> None:
        for member, command in self.asking:
            super().set_name(member, command)
            self.host.resume(member)
        self.asking.clear()


def test_lines_after_a_held_command_wait_and_are_processed_on_resume() -> None:
    """Reactor: lines behind a command the room holds wait, unread into the
    round; `resume` puts the connection back in it, and they are processed
    without any new input."""
    server = ChatServer("127.0.0.1", 0, clock=FakeClock(), register_timeout=0, room=HoldingRoom)
    try:
        room = server.view.room
        assert isinstance(room, HoldingRoom)
        client = Pumped(server)
        client.send(b"USERNAME ann\nUSERNAME a b\n")
        turn_until(server, "the hold", lambda: len(server.view.held()) == 1)
        (conn,) = server.view.held()
        for _ in range(20):
            server.run_once(max_wait=0.005)
        assert client.take_available() == 0 and conn.backlog() == 1
        room.answer()
        assert server.view.held() == []
        client.pump_until(lambda: b"\n" in client.buffer, "the answer to the second line")
        assert client.buffer == NAME_HAS_SPACES + b"\n"
    finally:
        server.close()


def test_disconnect_closes_at_the_end_of_the_turn_after_the_output(
    clocked: ChatServer,
) -> None:
    """Reactor: a member disconnected by the room gets what was queued for
    it this turn, then the end of the stream."""
    client = Pumped(clocked)
    client.register("ann")
    conn = only(clocked)
    clocked.reply(conn, b"ERROR Bye.\n")
    clocked.disconnect(conn, "a test")
    assert clocked.view.closing(conn)
    clocked.run_once(max_wait=0)
    assert conn.closed and not clocked.view.closing(conn)
    assert client.read_to_eof() == b"ERROR Bye.\n"


def test_the_view_reads_without_changing(clocked: ChatServer) -> None:
    """ServerView: the listener, the connections and the select timeout, read twice alike."""
    assert clocked.view.listeners[0].sock.getsockname()[1] == clocked.address[1]
    assert clocked.view.tls_listener is None
    assert clocked.view.connections() == []
    assert clocked.view.select_timeout() is None  # nothing due: select waits
    assert clocked.view.select_timeout() is None
    assert clocked.view.ready_now() == []
