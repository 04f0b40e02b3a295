"""The web port over real sockets: PROTOCOL.md, "People in a web browser".

A WebSocket member is a client of the room like a TCP one. These tests
speak to it with `websockets` (a real client library, pinned in
requirements-dev.txt) where a browser's view matters, and with frames
spelled by hand (conftest.LinesOverWebSocket, client_frame) where the
test needs what no library sends: a bad frame, a pong that never comes,
a reader that stops reading. Time is driven with FakeClock where a
deadline is tested (the request's, the ping's, the register timeout).
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, cast

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test
from websockets.asyncio.client import ClientConnection as AsyncClientConnection
from websockets.asyncio.client import connect as connect_async
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

import chat
import web
from chat_testing import ChatMachine, Peer, machine_settings
from conftest import (
    LINE_TOO_LONG,
    MAX_LINE,
    MESSAGE_EMPTY,
    MESSAGE_INVALID,
    NAME_EMPTY,
    NAME_HAS_SPACES,
    NAME_INVALID,
    NAME_REQUIRED,
    NAME_TAKEN,
    NAME_TOO_LONG,
    SERVER_FULL,
    SYNC_REPLY,
    TIMED_OUT_WAITING,
    TIMEOUT,
    TOO_MANY_FROM_ADDRESS,
    UNRECOGNISED,
    WS_BINARY,
    WS_CLOSE,
    WS_CONTINUATION,
    WS_PING,
    WS_PONG,
    WS_TEXT,
    Client,
    FakeClock,
    Netcat,
    Pumped,
    RunningServer,
    TLSFiles,
    WebSocketClient,
    certificate_der,
    client_context,
    client_frame,
    close_payload,
    launch,
    poll,
    receive,
    server_frame,
    start_server,
    upgrade_request,
)
from test_metrics import parse_metrics, scrape
from tls import TLSConfig
from webport import MAX_TURNED_AWAY, WebConfig

PAGE_REQUEST: Final = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
SYNC_TEXT: Final = "PING"
# Close codes, RFC 6455 7.4.1, typed here.
GOING_AWAY: Final = 1001
PROTOCOL_ERROR: Final = 1002
INVALID_DATA: Final = 1007
POLICY_VIOLATION: Final = 1008
MESSAGE_TOO_BIG: Final = 1009


# --- helpers -------------------------------------------------------------------


@pytest.fixture
def webbed() -> Iterator[RunningServer]:
    running = start_server(web=WebConfig(0))
    yield running
    running.stop()


def web_address(running: RunningServer) -> tuple[str, int]:
    address = running.server.web_address
    assert address is not None
    return ("127.0.0.1", address[1])


def url(running: RunningServer, scheme: str = "ws") -> str:
    return f"{scheme}://127.0.0.1:{web_address(running)[1]}/chat"


def ws_client(running: RunningServer, **options: object) -> WebSocketClient:
    client = WebSocketClient(web_address(running), **options)  # type: ignore[arg-type]
    running.clients.append(client)
    return client


def ws_member(running: RunningServer, name: str) -> WebSocketClient:
    client = ws_client(running)
    client.register(name)
    return client


class Browser:
    """The `websockets` library's client, used as the page uses WebSocket:
    one text message per line sent, one per line received."""

    def __init__(self, address: str, **options: Any) -> None:
        self.ws: ClientConnection = connect(
            address, open_timeout=TIMEOUT, close_timeout=TIMEOUT, legacy=True, **options
        )

    def send(self, text: str) -> None:
        self.ws.send(text)

    def message(self) -> str:
        return cast(str, self.ws.recv(timeout=TIMEOUT))

    def sync(self) -> list[str]:
        """Send PING; every message before its reply."""
        self.send(SYNC_TEXT)
        seen = []
        while (message := self.message()) != SYNC_REPLY.decode():
            seen.append(message)
        return seen

    def register(self, name: str) -> None:
        self.send(f"USERNAME {name}")
        assert self.sync() == []

    def close(self) -> None:
        self.ws.close()


def expect_closed_with(client: WebSocketClient, code: int, lines: list[bytes]) -> None:
    """`client` receives `lines`, then a close frame with `code`, then the end."""
    assert client.read_to_eof() == b"".join(line + b"\n" for line in lines)
    assert client.ws.closed
    assert client.ws.close_code == code


# --- the room over WebSocket -------------------------------------------------


def test_seed_session_one_over_websocket(webbed: RunningServer) -> None:
    """README session one from a browser: a refused USERNAME, an unknown command."""
    mia = Browser(url(webbed))
    mia.send("USERNAME mia")
    mia.send("SEND Hello, world!")
    mia.send("USERNAME not valid")
    assert mia.message() == NAME_HAS_SPACES.decode()
    mia.send("NOT_A_COMMAND test")
    assert mia.message() == UNRECOGNISED.decode()
    assert mia.sync() == []
    mia.close()


def test_seed_session_two_over_websocket(webbed: RunningServer) -> None:
    """README session two between two browsers: no sender gets its own."""
    teixe, jeff = Browser(url(webbed)), Browser(url(webbed))
    teixe.register("teixe")
    jeff.register("jeff")
    teixe.send("SEND hi")
    assert teixe.sync() == []
    assert jeff.message() == "RECEIVE teixe hi"
    jeff.send("SEND bye")
    assert jeff.sync() == []
    assert teixe.message() == "RECEIVE jeff bye"
    assert teixe.sync() == jeff.sync() == []
    teixe.close()
    jeff.close()


def test_a_browser_and_nc_chat_both_ways(webbed: RunningServer) -> None:
    """A WebSocket user and a real nc user in one room, both ways."""
    browser = Browser(url(webbed))
    browser.register("web")
    nc = Netcat(webbed.address[1])
    try:
        nc.type(b"USERNAME terminal\n")
        assert nc.sync() == []
        browser.send("SEND hello from the browser")
        assert browser.sync() == []
        assert nc.sync() == [receive("web", "hello from the browser")]
        nc.type(b"SEND hello from nc\r\n")
        assert nc.sync() == []
        assert browser.message() == "RECEIVE terminal hello from nc"
        assert nc.finish().endswith(SYNC_REPLY + b"\n")
    finally:
        nc.kill()
        browser.close()


def test_every_error_line_over_websocket(webbed: RunningServer) -> None:
    """Every ERROR line of the contract comes back as one text message."""
    bob = ws_member(webbed, "bob")
    alice = ws_client(webbed)
    for line, error in (
        (b"SEND hi", NAME_REQUIRED),
        (b"USERNAME", NAME_EMPTY),
        (b"USERNAME \xff", NAME_INVALID),
        (b"USERNAME a b", NAME_HAS_SPACES),
        (b"USERNAME \x1b", NAME_INVALID),
        (b"USERNAME " + b"x" * 33, NAME_TOO_LONG),
        (b"USERNAME BOB", NAME_TAKEN),
        (b"send hi", UNRECOGNISED),
        (b"x" * (MAX_LINE + 1), LINE_TOO_LONG),
    ):
        alice.send(line + b"\n")
        assert alice.line() == error, line
    alice.register("alice")
    for line, error in ((b"SEND  ", MESSAGE_EMPTY), (b"SEND \x07", MESSAGE_INVALID)):
        alice.send(line + b"\n")
        assert alice.line() == error
    assert alice.sync() == [] and bob.sync() == []


def test_a_binary_message_gets_the_protocol_s_own_answers(webbed: RunningServer) -> None:
    """A binary message is the bytes of a line: invalid UTF-8 is answered, not closed."""
    client = ws_client(webbed)
    client.ws.send_frames(client_frame(WS_BINARY, b"USERNAME \xc3\x28"))
    assert client.line() == NAME_INVALID
    client.ws.send_frames(client_frame(WS_BINARY, b"USERNAME ok"))
    assert client.sync() == []


def test_a_message_with_several_lines_is_several_lines(webbed: RunningServer) -> None:
    """A message holding "\\n" is several lines, each with TCP's rules (a final "\\r" dropped)."""
    bob = ws_member(webbed, "bob")
    alice = ws_client(webbed)
    alice.ws.send_frames(client_frame(WS_TEXT, b"USERNAME alice\r\nSEND one\n\nSEND two\r"))
    assert alice.sync() == []
    assert bob.sync() == [receive("alice", "one"), receive("alice", "two")]


def test_a_long_line_inside_a_message_is_answered_and_the_rest_goes_on(
    webbed: RunningServer,
) -> None:
    """A line over 4096 bytes in a message gets ERROR Line too long.; the next line works."""
    bob = ws_member(webbed, "bob")
    alice = ws_member(webbed, "alice")
    payload = b"SEND " + b"x" * MAX_LINE + b"\nSEND fine"
    alice.ws.send_frames(client_frame(WS_TEXT, payload))
    assert alice.line() == LINE_TOO_LONG
    assert alice.sync() == []
    assert bob.sync() == [receive("alice", "fine")]
    longest = b"SEND " + b"y" * (MAX_LINE - 5)  # exactly at the limit
    alice.ws.send_frames(client_frame(WS_TEXT, longest + b"\r"))
    assert alice.sync() == []
    assert bob.sync() == [receive("alice", b"y" * (MAX_LINE - 5))]


def test_fragments_and_a_ping_between_them(webbed: RunningServer) -> None:
    """A fragmented message is one line; a ping between its fragments is answered."""
    bob = ws_member(webbed, "bob")
    alice = ws_member(webbed, "alice")
    alice.ws.send_frames(
        client_frame(WS_TEXT, b"SEND fra", fin=False)
        + client_frame(WS_PING, b"tick")
        + client_frame(WS_CONTINUATION, b"gments")
    )
    assert alice.ws.frame() == (WS_PONG, b"tick")
    assert bob.sync() == [receive("alice", "fragments")]


def test_frames_cut_across_reads_are_the_same_line(webbed: RunningServer) -> None:
    """A frame a byte at a time, each byte read on its own, is the same line."""
    bob = ws_member(webbed, "bob")
    alice = ws_member(webbed, "alice")
    frames = client_frame(WS_TEXT, b"SEND slow", fin=False) + client_frame(
        WS_CONTINUATION, b"ly" * 100
    )
    for index in range(len(frames) - 1):
        alice.ws.send_frames(frames[index : index + 1])
        assert bob.sync() == []  # turns go by while alice's frame trickles in
    alice.ws.send_frames(frames[-1:])
    assert alice.sync() == []  # her message is processed (bob's sync proves nothing of hers)
    assert bob.sync() == [receive("alice", b"slow" + b"ly" * 100)]


def test_a_client_ping_is_answered_with_its_payload(webbed: RunningServer) -> None:
    """Ping/pong: the library's ping gets its pong."""
    browser = Browser(url(webbed))
    assert browser.ws.ping(b"are you there").wait(TIMEOUT)
    browser.close()


# --- limits --------------------------------------------------------------------


def test_over_max_clients_a_websocket_is_told_and_closed_with_1008() -> None:
    """Server full: a WebSocket is upgraded, sent ERROR Server is full., closed
    with 1008; a TCP client is refused as ever; the page gets a 503."""
    running = start_server(web=WebConfig(0), max_clients=1)
    try:
        ws_member(running, "first")
        late = ws_client(running)
        expect_closed_with(late, POLICY_VIOLATION, [SERVER_FULL])
        assert running.client().read_to_eof() == SERVER_FULL + b"\n"
        page = scrape(web_address(running), PAGE_REQUEST)
        assert page.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert running.server.stats.refused["server_full"] == 3
        browser = Browser(url(running))  # a library sees the same
        assert browser.message() == SERVER_FULL.decode()
        with pytest.raises(ConnectionClosed) as closed:
            browser.message()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == POLICY_VIOLATION
    finally:
        running.stop()


def test_over_max_per_address_a_websocket_is_told_and_closed_with_1008() -> None:
    """Per address: one more WebSocket from 127.0.0.2 is told why and closed
    with 1008; the web port counts with the TCP port."""
    running = start_server(web=WebConfig(0), max_per_address=2)
    try:
        ws_client(running, source="127.0.0.2").register("one")
        tcp = Client.__new__(Client)
        tcp.sock = socket.create_connection(running.address, TIMEOUT, ("127.0.0.2", 0))
        tcp.buffer = b""
        running.clients.append(tcp)
        tcp.register("two")
        late = ws_client(running, source="127.0.0.2")
        expect_closed_with(late, POLICY_VIOLATION, [TOO_MANY_FROM_ADDRESS])
        ws_client(running).register("local")  # 127.0.0.1 is not counted
    finally:
        running.stop()


def test_a_turned_away_client_that_never_asks_is_closed_at_the_deadline() -> None:
    """A connection over the limit that sends no request is closed after
    web.REQUEST_TIMEOUT, and never costs the room anything."""
    clock = FakeClock()
    server = chat.ChatServer("127.0.0.1", 0, clock=clock, web=WebConfig(0), max_clients=1)
    try:
        address = server.web_address
        assert address is not None
        member = Pumped(server)
        member.register("member")
        silent = Pumped(server, address=("127.0.0.1", address[1]))
        member.sync()  # accepted and turned away meanwhile
        clock.advance(web.REQUEST_TIMEOUT - 0.5)
        server.run_once(max_wait=0)
        assert silent.take_available() == 0 and not silent.eof
        clock.advance(0.5)
        assert silent.read_to_eof() == b""
        assert member.sync() == []
    finally:
        server.close()


def test_turned_away_clients_are_bounded_the_oldest_goes() -> None:
    """Over the limit, at most webport.MAX_TURNED_AWAY wait for their answer:
    one more closes the oldest."""
    running = start_server(web=WebConfig(0), max_clients=1)
    waiting: list[socket.socket] = []
    try:
        running.member("member")
        for _ in range(MAX_TURNED_AWAY + 1):
            waiting.append(socket.create_connection(web_address(running), timeout=TIMEOUT))
            assert running.client().read_to_eof() == SERVER_FULL + b"\n"
        assert waiting[0].recv(100) == b""
        waiting[1].setblocking(False)
        with pytest.raises(BlockingIOError):
            waiting[1].recv(100)
    finally:
        for sock in waiting:
            sock.close()
        running.stop()


# --- HTTP ------------------------------------------------------------------------


def test_the_page_is_served_at_the_root(webbed: RunningServer) -> None:
    """GET / is the page: 200, HTML, its CSP; and the connection is freed."""
    answer = scrape(web_address(webbed), PAGE_REQUEST)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Type: text/html; charset=utf-8" in head
    assert b"\r\nContent-Security-Policy: default-src 'none'" in head
    assert body == web.PAGE
    poll("the page's connection to be closed", lambda: webbed.server.open_count == 0)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"\x16\x03\x01 garbage\r\n\r\n", b"400 Bad Request"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * web.MAX_HEAD_BYTES + b"\r\n\r\n", b"431 "),
        (b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n", b"404 Not Found"),
        (upgrade_request().replace(b"Version: 13", b"Version: 8"), b"426 Upgrade Required"),
        (upgrade_request(key=b"short"), b"400 Bad Request"),
    ],
)
def test_bad_requests_get_their_status(
    webbed: RunningServer, request_bytes: bytes, status: bytes
) -> None:
    """Garbage 400, a huge head 431, elsewhere 404, another version 426, a bad key 400."""
    answer = scrape(web_address(webbed), request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:100]
    if status.startswith(b"426"):
        assert b"\r\nSec-WebSocket-Version: 13\r\n" in answer
    alice = webbed.member("alice")  # the chat goes on
    assert alice.sync() == []


def test_a_request_that_never_finishes_is_closed_at_10_seconds() -> None:
    """A request not finished within 10 s is closed (the fake clock), not before."""
    clock = FakeClock()
    server = chat.ChatServer("127.0.0.1", 0, clock=clock, web=WebConfig(0))
    try:
        address = server.web_address
        assert address is not None
        slow = Pumped(server, address=("127.0.0.1", address[1]))
        slow.send(b"GET / HTTP/1.1\r\nHost: loc")
        member = Pumped(server)
        member.register("member")
        clock.advance(web.REQUEST_TIMEOUT - 0.01)
        assert member.sync() == []
        assert slow.take_available() == 0 and not slow.eof
        assert server.open_count == 2
        clock.advance(0.01)
        assert slow.read_to_eof() == b""
        assert server.stats.disconnections["timed_out"] == 1
    finally:
        server.close()


def test_the_origin_check() -> None:
    """--web-origin: another page's origin gets a 403; the allowed one, any
    case, and a client without Origin are let in."""
    running = start_server(web=WebConfig(0, origins=("https://chat.example.org",)))
    try:
        with pytest.raises(InvalidStatus) as refused:
            Browser(url(running), origin=Origin("https://evil.example"))
        assert refused.value.response.status_code == 403
        for name, origin in (
            ("one", "https://chat.example.org"),
            ("two", "HTTPS://Chat.Example.ORG"),
        ):
            Browser(url(running), origin=Origin(origin)).register(name)
        ws_client(running).register("no-origin")
    finally:
        running.stop()


def test_any_origin_by_default(webbed: RunningServer) -> None:
    """Without --web-origin any page may open a WebSocket."""
    Browser(url(webbed), origin=Origin("https://anywhere.example")).register("anyone")


# --- closing ---------------------------------------------------------------------


def test_the_client_closes_lines_before_it_are_processed(webbed: RunningServer) -> None:
    """Closing handshake from the client: the lines before its close frame are
    processed, their replies come, then the server's close frame, then the end."""
    bob = ws_member(webbed, "bob")
    alice = ws_member(webbed, "alice")
    alice.send(b"SEND last words\nWHAT")
    assert alice.half_close() == UNRECOGNISED + b"\n"
    assert alice.ws.close_code == 1000
    assert bob.sync() == [receive("alice", "last words")]
    ws_client(webbed).register("alice")  # the name is free
    assert webbed.server.stats.disconnections["client_closed"] == 1


def test_the_server_closes_on_shutdown_with_1001() -> None:
    """Closing handshake from the server: a stopping server sends 1001 (going away)."""
    running = start_server(web=WebConfig(0))
    member = ws_member(running, "member")
    running.server.stop()
    running.thread.join(TIMEOUT)
    expect_closed_with(member, GOING_AWAY, [])
    running.stop()


def test_a_client_that_vanishes_frees_its_name(webbed: RunningServer) -> None:
    """A reset WebSocket is dropped, silently, and its name freed."""
    ws_member(webbed, "ghost").reset()
    other = ws_client(webbed)

    def free() -> bool:
        other.send(b"USERNAME ghost\n")
        return other.sync() == []

    poll("the name to be freed", free)


def test_the_library_closes_cleanly(webbed: RunningServer) -> None:
    """The library's close: its close frame is echoed (1000) and the connection ends."""
    browser = Browser(url(webbed))
    browser.register("leaving")
    browser.close()
    assert browser.ws.close_code == 1000
    poll("the close to be counted", lambda: webbed.server.open_count == 0)


# --- protocol errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        (client_frame(WS_TEXT, b"SEND \xff"), INVALID_DATA),
        (client_frame(WS_TEXT, b"SEND hi", masked=False), PROTOCOL_ERROR),
        (client_frame(WS_TEXT, b"SEND hi", rsv=4), PROTOCOL_ERROR),
        (client_frame(0x3, b""), PROTOCOL_ERROR),
        (client_frame(WS_BINARY, b"x" * ((1 << 20) + 1)), MESSAGE_TOO_BIG),
    ],
    ids=["invalid-utf8", "unmasked", "reserved-bits", "unknown-opcode", "over-1MiB"],
)
def test_a_protocol_error_closes_with_its_code(
    webbed: RunningServer, frames: bytes, code: int
) -> None:
    """Invalid UTF-8 in a text message 1007, a broken frame 1002, a message over
    1 MiB 1009: after the lines before it; counted as protocol_error."""
    bob = ws_member(webbed, "bob")
    alice = ws_member(webbed, "alice")
    alice.ws.send_frames(client_frame(WS_TEXT, b"SEND before\nWHAT") + frames)
    expect_closed_with(alice, code, [UNRECOGNISED])
    assert bob.sync() == [receive("alice", "before")]
    poll(
        "the error to be counted", lambda: webbed.server.stats.disconnections["protocol_error"] == 1
    )
    ws_client(webbed).register("alice")


# --- slow readers ------------------------------------------------------------------------


def test_a_websocket_that_stops_reading_is_a_slow_consumer() -> None:
    """A WebSocket member that never reads is closed as a slow consumer; the
    sender and a reading member carry on and see everything."""
    running = start_server(web=WebConfig(0), output_limit=64 * 1024)
    try:
        stuck = ws_client(running, receive_buffer=4096)
        stuck.register("stuck")
        reader = ws_member(running, "reader")
        sender = running.member("sender")
        message = b"m" * 1000
        for _ in range(40):
            sender.send(b"SEND " + message + b"\n" * 1)
            for _ in range(10):
                sender.send(b"SEND " + message + b"\n")
            assert sender.sync() == []
            assert reader.sync() == [receive("sender", message)] * 11
            if running.server.stats.disconnections["slow_consumer"]:
                break
        assert running.server.stats.disconnections["slow_consumer"] == 1
        assert running.server.member_count == 2
    finally:
        running.stop()


def test_a_pong_waits_for_the_frame_the_kernel_took_half_of(webbed: RunningServer) -> None:
    """A ping that arrives while the kernel holds half a frame of the room's
    output is answered after that frame, never inside it: every frame reads."""
    slow = ws_client(webbed, receive_buffer=4096)
    slow.register("slow")
    sender = webbed.member("sender")
    message = b"x" * 3000
    sender.send(b"".join(b"SEND " + message + b"\n" for _ in range(150)))
    assert sender.sync() == []  # the kernel holds what it can; the rest waits
    slow.ws.send_frames(client_frame(WS_PING, b"now") + client_frame(WS_TEXT, b"PING"))
    frames = []
    while (WS_PONG, b"now") not in frames or (WS_TEXT, SYNC_REPLY) not in frames:
        found = slow.ws.frame()
        assert found is not None
        frames.append(found)
    data = [frame for frame in frames if frame[0] == WS_TEXT]
    assert data == [(WS_TEXT, receive("sender", message))] * 150 + [(WS_TEXT, SYNC_REPLY)]
    assert len(frames) == 152


# --- keepalive and the register timeout (fake clock) -------------------------------------


class PumpedWebSocket:
    """A WebSocket client of a ChatServer run by this thread (Pumped)."""

    def __init__(self, server: chat.ChatServer) -> None:
        address = server.web_address
        assert address is not None
        self.pumped = Pumped(server, address=("127.0.0.1", address[1]))
        self.pumped.send(upgrade_request())
        self.pumped.pump_until(lambda: b"\r\n\r\n" in self.pumped.buffer, "the 101")
        head, _, self.pumped.buffer = self.pumped.buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")

    def send(self, opcode: int, payload: bytes) -> None:
        self.pumped.send(client_frame(opcode, payload))

    def frame(self) -> tuple[int, bytes]:
        """The next frame from the server."""
        pumped = self.pumped
        pumped.pump_until(lambda: server_frame(pumped.buffer) is not None or pumped.eof, "a frame")
        found = server_frame(pumped.buffer)
        assert found is not None, f"closed: {pumped.buffer!r}"
        opcode, payload, size = found
        pumped.buffer = pumped.buffer[size:]
        return opcode, payload

    def sync(self) -> list[tuple[int, bytes]]:
        """Send PING; every frame before its reply."""
        self.send(WS_TEXT, b"PING")
        seen = []
        while (frame := self.frame()) != (WS_TEXT, SYNC_REPLY):
            seen.append(frame)
        return seen


def test_an_idle_websocket_is_pinged_and_closed_if_it_never_answers() -> None:
    """Keepalive: quiet for --keepalive seconds, a WebSocket gets a ping; a pong
    keeps it; with no answer for the dead-peer time (2 x keepalive) it is closed
    as timed out."""
    clock = FakeClock()
    server = chat.ChatServer("127.0.0.1", 0, clock=clock, keepalive=30, web=WebConfig(0))
    try:
        client = PumpedWebSocket(server)
        client.send(WS_TEXT, b"USERNAME idle")
        assert client.sync() == []
        clock.advance(29.9)
        server.run_once(max_wait=0)
        assert client.sync() == []  # no ping before its time; this input resets it
        clock.advance(30)
        assert client.frame() == (WS_PING, b"")
        client.send(WS_PONG, b"")
        assert client.sync() == []
        clock.advance(30)
        assert client.frame() == (WS_PING, b"")  # quiet again: pinged again, not closed
        clock.advance(29.9)
        server.run_once(max_wait=0)
        assert server.member_count == 1
        clock.advance(0.1)
        assert client.pumped.read_to_eof() == b""
        assert server.stats.disconnections["timed_out"] == 1
        assert server.member_count == 0
    finally:
        server.close()


def test_idle_websockets_are_pinged_each_at_its_own_time_by_one_timer() -> None:
    """Keepalive: members quiet since different times are pinged, and closed,
    each at its own time, whoever spoke last; the port keeps one timer for
    them all (an idle member holds none of its own)."""
    clock = FakeClock()
    server = chat.ChatServer("127.0.0.1", 0, clock=clock, keepalive=30, web=WebConfig(0))
    try:
        first, second = PumpedWebSocket(server), PumpedWebSocket(server)
        first.send(WS_TEXT, b"USERNAME first")
        assert first.sync() == []
        clock.advance(10)
        second.send(WS_TEXT, b"USERNAME second")
        assert second.sync() == []
        clock.advance(5)
        assert first.sync() == []  # first spoke last now: quiet from 15
        assert all(server.view.timers_of(conn) == [] for conn in server.view.connections())
        clock.advance(25)  # second quiet for 30 s, first for 25
        assert second.frame() == (WS_PING, b"")
        clock.advance(5)  # first quiet for 30 s
        assert first.frame() == (WS_PING, b"")
        first.send(WS_PONG, b"")
        assert first.sync() == []
        clock.advance(25)  # second's dead-peer time: 60 s quiet
        assert second.pumped.read_to_eof() == b""
        assert server.member_count == 1
        assert server.stats.disconnections["timed_out"] == 1
    finally:
        server.close()


def test_a_websocket_without_a_name_is_told_and_closed_with_1008() -> None:
    """Register timeout: from accept; the ERROR line as a text message, then 1008."""
    clock = FakeClock()
    server = chat.ChatServer("127.0.0.1", 0, clock=clock, register_timeout=5, web=WebConfig(0))
    try:
        client = PumpedWebSocket(server)
        clock.advance(5)
        assert client.frame() == (WS_TEXT, TIMED_OUT_WAITING)
        assert client.frame() == (WS_CLOSE, close_payload(POLICY_VIOLATION))
        assert client.pumped.read_to_eof() == b""
    finally:
        server.close()


# --- WSS, metrics, the program ----------------------------------------------------------


async def sync_async(ws: AsyncClientConnection) -> list[str]:
    """Browser.sync for the asyncio client: send PING; every message before its reply."""
    await ws.send(SYNC_TEXT)
    seen = []
    while (message := await asyncio.wait_for(ws.recv(), TIMEOUT)) != SYNC_REPLY.decode():
        seen.append(cast(str, message))
    return seen


def test_wss_with_web_tls(tls_files: TLSFiles) -> None:
    """--web-tls: HTTPS and WSS with the TLS certificate; a TLS member and a
    plain one share the room. The WSS member is the websockets library's
    asyncio client: its threaded client (Browser) reads and writes one SSL
    socket from two threads at once, which CPython's ssl module does not
    make safe (it failed a handshake here once, on the client's side)."""
    config = WebConfig(0, cert=str(tls_files.cert), key=str(tls_files.key))
    running = start_server(web=config)
    context = client_context(tls_files.cert, tls_files.other_cert)

    async def secure_member() -> None:
        async with connect_async(
            url(running, "wss"), ssl=context, open_timeout=TIMEOUT, close_timeout=TIMEOUT
        ) as secure:
            await secure.send("USERNAME secure")
            assert await sync_async(secure) == []
            plain = running.member("plain")
            plain.send(b"SEND over TCP\n")
            assert await asyncio.wait_for(secure.recv(), TIMEOUT) == "RECEIVE plain over TCP"
            await secure.send("SEND over WSS")
            assert await sync_async(secure) == []
            assert plain.sync() == [receive("secure", "over WSS")]

    try:
        asyncio.run(secure_member())
        with (
            socket.create_connection(web_address(running), timeout=TIMEOUT) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(PAGE_REQUEST)
            assert tls.recv(100).startswith(b"HTTP/1.1 200 OK\r\n")
        hand_framed = ws_client(running, context=context)
        hand_framed.register("framed")
    finally:
        running.stop()


def test_chat_py_web_tls_without_a_tls_port_and_sighup(tls_files: TLSFiles, tmp_path: Path) -> None:
    """`--web-port 0 --web-tls` with --tls-cert and --tls-key, no --tls-port:
    WSS; SIGHUP reloads the certificate for new connections, open ones carry on."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(tls_files.cert.read_bytes())
    key.write_bytes(tls_files.key.read_bytes())
    context = client_context(tls_files.cert, tls_files.other_cert)
    args = ("--web-port", "0", "--web-tls", "--tls-cert", str(cert), "--tls-key", str(key))
    with launch(*args) as running:
        pattern = re.compile(r"listening for the web \(HTTPS and WSS\) on 127\.0\.0\.1:(\d+):")
        poll("the web port in the log", lambda: pattern.search(running.log.text()) is not None)
        found = pattern.search(running.log.text())
        assert found is not None
        address = ("127.0.0.1", int(found[1]))

        def certificate(client: WebSocketClient) -> bytes:
            raw = client.ws.raw
            assert isinstance(raw, ssl.SSLSocket)
            der = raw.getpeercert(binary_form=True)
            assert der is not None
            return der

        old = WebSocketClient(address, context=context)
        old.register("old")
        assert certificate(old) == certificate_der(tls_files.cert)
        cert.write_bytes(tls_files.other_cert.read_bytes())  # renewed
        key.write_bytes(tls_files.other_key.read_bytes())
        running.process.send_signal(signal.SIGHUP)
        poll("the reload", lambda: "reloaded the web port's certificate" in running.log.text())
        new = WebSocketClient(address, context=context)
        new.register("new")
        assert certificate(new) == certificate_der(tls_files.other_cert)
        old.send(b"SEND still here\n")
        assert old.sync() == []
        assert new.sync() == [receive("old", "still here")]
        old.close()
        new.close()
        log = running.finish()
    assert "SIGHUP ignored" not in log


def test_wss_refuses_a_plain_client(tls_files: TLSFiles) -> None:
    """--web-tls: a plain HTTP client fails the handshake (tls_handshake), the room goes on."""
    config = WebConfig(0, cert=str(tls_files.cert), key=str(tls_files.key))
    running = start_server(web=config)
    try:
        answer = scrape(web_address(running), PAGE_REQUEST)
        assert not answer.startswith(b"HTTP/1.1 200")
        poll(
            "the failed handshake to be counted",
            lambda: running.server.stats.disconnections["tls_handshake"] == 1,
        )
        assert running.member("alive").sync() == []
    finally:
        running.stop()


def test_metrics_by_transport(tls_files: TLSFiles) -> None:
    """Monitoring: connections open and accepted, by transport."""
    running = start_server(
        web=WebConfig(0),
        tls=TLSConfig(0, str(tls_files.cert), str(tls_files.key)),
        metrics_address=("127.0.0.1", 0),
    )
    try:
        running.member("tcp")
        running.tls_client().register("tls")
        ws_member(running, "web1")
        gone = ws_member(running, "web2")
        gone.half_close()
        assert running.server.metrics is not None

        def samples() -> dict[str, float]:
            assert running.server.metrics is not None
            return parse_metrics(scrape(running.server.metrics.address))

        poll("the close to count", lambda: samples()["chat_connections_open{websocket}"] == 1)
        found = samples()
        assert found["chat_connections_open{tcp}"] == 1
        assert found["chat_connections_open{tls}"] == 1
        assert found["chat_connections_accepted_total{tcp}"] == 1
        assert found["chat_connections_accepted_total{tls}"] == 1
        assert found["chat_connections_accepted_total{websocket}"] == 2
        assert found["chat_members"] == 3
    finally:
        running.stop()


def test_chat_py_web_port_with_a_browser_and_nc() -> None:
    """`python chat.py --web-port 0`: the log names the web port; a browser and
    nc chat there."""
    with launch("--web-port", "0") as running:
        pattern = re.compile(r"listening for the web \(HTTP and WebSocket\) on 127\.0\.0\.1:(\d+):")
        poll("the web port in the log", lambda: pattern.search(running.log.text()) is not None)
        found = pattern.search(running.log.text())
        assert found is not None
        browser = Browser(f"ws://127.0.0.1:{found[1]}/chat")
        browser.register("browser")
        nc = Netcat(running.port)
        try:
            nc.type(b"USERNAME nc\nSEND hi browser\n")
            assert nc.sync() == []
            assert browser.message() == "RECEIVE nc hi browser"
            browser.send("SEND hi nc")
            assert browser.sync() == []
            assert nc.sync() == [receive("browser", "hi nc")]
        finally:
            nc.kill()
            browser.close()
        log = running.finish()
    assert "on the web port" in log


def test_chat_py_help_has_the_web_options() -> None:
    """--help explains --web-port, --web-origin and --web-tls; --web-tls needs a certificate."""
    text = chat.build_parser().format_help()
    for option in ("--web-port", "--web-origin", "--web-tls"):
        assert option in text
    with pytest.raises(SystemExit):
        chat.parse_args(["--web-port", "0", "--web-tls"])
    args = chat.parse_args(["--web-origin", "https://a", "--web-origin", "https://b"])
    assert args.web_origin == ["https://a", "https://b"]


# ============================================================================
# The model-based test, with WebSocket members
# ============================================================================


class WebSocketChatMachine(ChatMachine):
    """ChatMachine with every other client a WebSocket on the web port: each
    line one binary message, its half-close the closing handshake."""

    def open_server(self) -> RunningServer:
        return start_server(web=WebConfig(0))

    def open_client(self, ident: int) -> Client:
        if not ident % 2:
            return self.running.client()
        address = self.running.server.web_address
        assert address is not None
        client = WebSocketClient(("127.0.0.1", address[1]))
        self.running.clients.append(client)
        return client

    def unfinished_lines(self, peer: Peer) -> st.SearchStrategy[bytes]:
        lines = super().unfinished_lines(peer)
        if not isinstance(peer.conn, WebSocketClient):
            return lines
        # A message's final "\r" is dropped (PROTOCOL.md); TCP keeps the
        # "\r" of a last line that has no "\n".
        return lines.filter(lambda line: not line.endswith(b"\r"))


def test_state_machine_with_websocket_clients() -> None:
    """People in a web browser: a WebSocket member is a client of the room
    exactly like a TCP one: the room model with every other client on WebSocket."""
    current = machine_settings()
    run_state_machine_as_test(
        WebSocketChatMachine, settings=settings(current, max_examples=min(current.max_examples, 10))
    )


def test_flood_control_slows_a_websocket_member_as_a_tcp_one() -> None:
    """Flood control holds on the web port: 30 SENDs in one message at
    --send-rate 50 --send-burst 5 all reach a TCP member, in order, the last
    no sooner than the rate allows, and the wait is counted."""
    running = start_server(web=WebConfig(0), send_rate=50.0, send_burst=5)
    try:
        ann = ws_member(running, "ann")
        bob = running.member("bob")
        messages = [b"m%d" % number for number in range(30)]
        started = time.monotonic()
        ann.send(b"".join(b"SEND " + message + b"\n" for message in messages))
        assert bob.lines(30) == [receive("ann", message) for message in messages]
        # 25 after the burst at 50 a second: half a second at least.
        assert time.monotonic() - started >= 25 / 50 - 0.02
        assert ann.sync() == []
        assert running.server.stats.throttled_seconds > 0
    finally:
        running.stop()
