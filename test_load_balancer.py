"""Behind a load balancer (PROTOCOL.md, v3): --proxy-protocol, at the door.

In-process servers turned by the test (a FakeClock drives the timeouts)
take connections from 127.0.0.9, the trusted "balancer", whose headers
are built here from the spec; then a real HAProxy (haproxy_testing.py)
sits in front of `python chat.py`, on the plain and the TLS port, with
clients from 127.0.0.2 and up.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import socket
import ssl
import struct
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import chat
import metrics
from chat_testing import seed_session_one, seed_session_two
from conftest import (
    NAME_EMPTY,
    SERVER_FULL,
    SYNC,
    SYNC_REPLY,
    TIMED_OUT_WAITING,
    TIMEOUT,
    TOO_MANY_FROM_ADDRESS,
    UNRECOGNISED,
    Client,
    FakeClock,
    Pumped,
    TLSClient,
    TLSFiles,
    client_context,
    launch,
    poll,
    receive,
    run_chat,
    send_line,
    username,
)
from haproxy_testing import connect_from, running_haproxy
from tls import TLSConfig
from webport import WebConfig

BALANCER = "127.0.0.9"
TRUSTED = [ipaddress.ip_network(f"{BALANCER}/32")]
# PROTOCOL.md: "with none within the register timeout (10 s when that is off)".
HEADER_TIMEOUT = 10.0
# doc/proxy-protocol.txt, 2.2, typed from the spec.
SIGNATURE = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"


def v1(source: str, source_port: int) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 {source_port} 8080\r\n".encode()


def v2(source: str, source_port: int) -> bytes:
    block = socket.inet_aton(source) + socket.inet_aton("127.0.0.1")
    block += struct.pack("!HH", source_port, 8080)
    return SIGNATURE + b"\x21\x11" + struct.pack("!H", len(block)) + block


V2_LOCAL = SIGNATURE + b"\x20\x00\x00\x00"
HEADERS = pytest.mark.parametrize("header", [v1, v2], ids=["v1", "v2"])
Make = Callable[..., chat.ChatServer]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make(clock: FakeClock) -> Iterator[Make]:
    """ChatServers on the fake clock that trust BALANCER; closed at the end."""
    made: list[chat.ChatServer] = []

    def make_server(**options: Any) -> chat.ChatServer:
        server = chat.ChatServer("127.0.0.1", 0, clock=clock, proxy_networks=TRUSTED, **options)
        made.append(server)
        return server

    yield make_server
    for server in made:
        server.close()


def bound_to(source: str) -> Callable[[], socket.socket]:
    """A factory of sockets that connect from `source`."""

    def make_socket() -> socket.socket:
        sock = socket.socket()
        sock.bind((source, 0))
        return sock

    return make_socket


def from_balancer(server: chat.ChatServer) -> Pumped:
    return Pumped(server, make=bound_to(BALANCER))


def turn_until(server: chat.ChatServer, done: Callable[[], bool], what: str) -> None:
    """Turn the server's loop until `done`; fail after TIMEOUT of real time."""
    deadline = time.monotonic() + TIMEOUT
    while not done():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        server.run_once(max_wait=0.005)


def peers(server: chat.ChatServer) -> list[str]:
    return sorted(conn.peer for conn in server.view.connections())


# --- the header names the client ---------------------------------------------------


@HEADERS
def test_the_header_address_counts_for_the_per_address_limit_and_the_log(
    make: Make, caplog: pytest.LogCaptureFixture, header: Callable[[str, int], bytes]
) -> None:
    """A trusted balancer's connections count under the clients' addresses
    from their headers: a second from one client is refused with the
    contract's line, another client's is not, and the log names each."""
    caplog.set_level(logging.INFO, logger="chat")
    server = make(max_per_address=1)
    alice = from_balancer(server)
    alice.send(header("127.0.0.2", 5002) + username("alice"))
    assert alice.sync() == []
    twin = from_balancer(server)
    twin.send(header("127.0.0.2", 5003))
    assert twin.read_to_eof() == TOO_MANY_FROM_ADDRESS + b"\n"
    other = from_balancer(server)
    other.send(header("127.0.0.3", 5004))
    assert other.sync() == []
    assert peers(server) == ["127.0.0.2:5002", "127.0.0.3:5004"]
    assert "127.0.0.2:5002 'alice'> connected" not in caplog.text  # named after it came in
    assert re.search(r"127\.0\.0\.2:5002> connected through 127\.0\.0\.9:\d+", caplog.text)
    assert "refused 127.0.0.2:5003 through 127.0.0.9:" in caplog.text
    assert server.stats.refused["per_address"] == 1


def v2_inet6(source: str, source_port: int) -> bytes:
    block = socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(socket.AF_INET6, "::1")
    block += struct.pack("!HH", source_port, 8080)
    return SIGNATURE + b"\x21\x21" + struct.pack("!H", len(block)) + block


@pytest.mark.parametrize(
    "header",
    [
        lambda source, port: f"PROXY TCP6 {source} ::1 {port} 8080\r\n".encode(),
        v2_inet6,
    ],
    ids=["v1", "v2"],
)
def test_an_ipv6_client_counts_by_its_64_through_a_dual_stack_listener(
    clock: FakeClock, header: Callable[[str, int], bytes]
) -> None:
    """On a dual-stack listener, the IPv4 balancer (seen as ::ffff:127.0.0.9)
    is trusted, and an IPv6 client of its header counts by its /64."""
    server = chat.ChatServer(None, 0, clock=clock, proxy_networks=TRUSTED, max_per_address=1)
    try:
        first = from_balancer(server)
        first.send(header("2001:db8:1:2::5", 5005))
        assert first.sync() == []
        assert peers(server) == ["[2001:db8:1:2::5]:5005"]
        neighbour = from_balancer(server)
        neighbour.send(header("2001:db8:1:2:ffff::6", 5006))  # the same /64
        assert neighbour.read_to_eof() == TOO_MANY_FROM_ADDRESS + b"\n"
        elsewhere = from_balancer(server)
        elsewhere.send(header("2001:db8:1:3::5", 5007))
        assert elsewhere.sync() == []
    finally:
        server.close()


@pytest.mark.parametrize("header", [b"PROXY UNKNOWN\r\n", V2_LOCAL], ids=["unknown", "local"])
def test_unknown_and_local_headers_keep_the_balancers_address(make: Make, header: bytes) -> None:
    """PROXY UNKNOWN and a v2 LOCAL header: the connection is the balancer's own."""
    server = make()
    client = from_balancer(server)
    client.send(header + username("bal"))
    assert client.sync() == []
    (peer,) = peers(server)
    assert peer == f"{BALANCER}:{client.sock.getsockname()[1]}"


def test_an_untrusted_connection_is_never_parsed_for_a_header(make: Make) -> None:
    """A `PROXY ...` line from an address not in --proxy-protocol is an
    unrecognised command, and the connection keeps its own address."""
    server = make(max_per_address=1)
    client = Pumped(server, make=bound_to("127.0.0.2"))
    client.send(v1("127.0.0.5", 5005) + b"USERNAME\n")  # refused as empty: a sync
    answers = UNRECOGNISED + b"\n" + NAME_EMPTY + b"\n"
    client.pump_until(lambda: len(client.buffer) >= len(answers), "the answers")
    assert client.buffer == answers
    (peer,) = peers(server)
    assert peer == f"127.0.0.2:{client.sock.getsockname()[1]}"
    twin = Pumped(server, make=bound_to("127.0.0.2"))  # counted under its own address
    assert twin.read_to_eof() == TOO_MANY_FROM_ADDRESS + b"\n"


# --- any chunking; what follows the header ------------------------------------------


@HEADERS
def test_a_header_one_byte_at_a_time_works(make: Make, header: Callable[[str, int], bytes]) -> None:
    """A header that arrives one byte per read is read to its end; until
    then the connection is not let in."""
    server = make()
    client = from_balancer(server)
    data = header("127.0.0.2", 5002)
    for byte in data[:-1]:
        client.send(bytes([byte]))
        server.run_once(max_wait=0.005)
        assert server.view.connections() == []
    assert server.open_count == 1  # counted from the accept: --max-clients
    client.send(data[-1:])
    turn_until(server, lambda: server.view.connections() != [], "the header's last byte")
    client.send(username("alice"))
    assert client.sync() == []
    assert peers(server) == ["127.0.0.2:5002"]


@HEADERS
def test_bytes_after_the_header_in_the_same_read_are_the_clients_first(
    make: Make, header: Callable[[str, int], bytes]
) -> None:
    """Lines sent with the header in one piece are the client's first lines."""
    server = make()
    alice, bob = from_balancer(server), from_balancer(server)
    bob.send(header("127.0.0.3", 5003) + username("bob"))
    assert bob.sync() == []
    alice.send(header("127.0.0.2", 5002) + username("alice") + send_line("hi") + b"PING\n")
    marker = UNRECOGNISED + b"\n"
    alice.pump_until(lambda: marker in alice.buffer, "alice's first lines answered")
    assert alice.buffer == marker
    assert bob.sync() == [receive("alice", "hi")]


def test_on_the_tls_port_the_header_comes_in_clear_and_the_handshake_after_it(
    make: Make, tls_files: TLSFiles
) -> None:
    """On the TLS port the header is read in clear; the ClientHello sent
    with it in one piece starts the handshake, and the client is named by
    the header."""
    server = make(tls=TLSConfig(0, str(tls_files.cert), str(tls_files.key)))
    assert server.tls_address is not None
    raw = bound_to(BALANCER)()
    raw.settimeout(TIMEOUT)
    raw.connect(("127.0.0.1", server.tls_address[1]))
    raw.setblocking(False)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    raw.sendall(v2("127.0.0.2", 5002) + outgoing.read())

    def turn() -> None:
        """One turn of the server; what it sent, to the client's TLS."""
        server.run_once(max_wait=0.005)
        with contextlib.suppress(BlockingIOError):
            incoming.write(raw.recv(65536))
        if outgoing.pending:
            raw.sendall(outgoing.read())

    deadline = time.monotonic() + TIMEOUT
    answer = b""
    try:
        while True:
            assert time.monotonic() < deadline, "gave up waiting for the handshake"
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                turn()
        tls.write(username("alice") + SYNC)
        raw.sendall(outgoing.read())
        while not answer.endswith(b"\n"):
            assert time.monotonic() < deadline, f"gave up waiting for the answer: {answer!r}"
            turn()
            with contextlib.suppress(ssl.SSLWantReadError):
                answer += tls.read(65536)
    finally:
        raw.close()
    assert answer == SYNC_REPLY + b"\n"
    assert peers(server) == ["127.0.0.2:5002"]


# --- closed without a reply ------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "reason"),
    [
        (b"USERNAME alice\n", "not a PROXY protocol header"),
        (b"PROXY TCP4 127.0.0.2 127.0.0.1 5002 8080\n", "PROXY v1: a line feed without"),
        (b"PROXY TCP4 127.0.0.256", "PROXY v1: '127.0.0.256' is no TCP4 address"),
        (SIGNATURE + b"\x31", "PROXY v2: version 3"),
    ],
    ids=["a line", "lf", "address", "version"],
)
def test_a_malformed_header_closes_without_a_reply(
    make: Make, caplog: pytest.LogCaptureFixture, sent: bytes, reason: str
) -> None:
    """A trusted connection whose first bytes can be no header is closed, unanswered, logged."""
    caplog.set_level(logging.INFO, logger="chat")
    server = make()
    client = from_balancer(server)
    client.send(sent)
    assert client.read_to_eof() == b""
    assert server.open_count == 0 and server.stats.accepted == 0
    assert server.stats.disconnections["protocol_error"] == 1
    samples = metrics.render(
        metrics.chat_metrics(server.stats, open_by_transport={}, members=0, unsent=0)
    )
    assert b'chat_disconnections_total{reason="protocol_error"} 1\n' in samples
    assert f"disconnected before its PROXY header: protocol error ({reason}" in caplog.text


@pytest.mark.parametrize(
    ("register_timeout", "sent", "limit"),
    [(0, b"", HEADER_TIMEOUT), (0, b"PROXY TCP4 127.0", HEADER_TIMEOUT), (5, SIGNATURE, 5.0)],
    ids=["nothing, no register timeout", "half, no register timeout", "half, register timeout"],
)
def test_no_header_within_the_register_timeout_closes_without_a_reply(
    make: Make, clock: FakeClock, register_timeout: int, sent: bytes, limit: float
) -> None:
    """A trusted connection without a whole header within the register
    timeout (10 s when that is off) is closed, unanswered."""
    server = make(register_timeout=register_timeout)
    client = from_balancer(server)
    client.send(sent)
    turn_until(server, lambda: server.open_count == 1, "the balancer's connection")
    server.run_once(max_wait=0.005)  # whatever was sent is read
    clock.advance(limit - 0.001)
    server.run_once(max_wait=0)
    client.take_available()
    assert not client.eof and server.open_count == 1
    clock.advance(0.001)
    assert client.read_to_eof() == b""
    assert server.open_count == 0
    assert server.stats.disconnections["registration_timeout"] == 1


def test_the_register_timeout_counts_from_the_accept(make: Make, clock: FakeClock) -> None:
    """The time a header takes is part of --register-timeout."""
    server = make(register_timeout=5)
    client = from_balancer(server)
    turn_until(server, lambda: server.open_count == 1, "the balancer's connection")
    clock.advance(3)
    client.send(v1("127.0.0.2", 5002))
    assert client.sync() == []
    clock.advance(1.999)
    assert client.sync() == []
    clock.advance(0.001)
    assert client.read_to_eof() == TIMED_OUT_WAITING + b"\n"


def test_max_clients_counts_a_connection_whose_header_has_not_come(make: Make) -> None:
    """--max-clients counts the balancer's connection from the accept."""
    server = make(max_clients=1)
    balancer = from_balancer(server)
    turn_until(server, lambda: server.open_count == 1, "the balancer's connection")
    late = Pumped(server)
    assert late.read_to_eof() == SERVER_FULL + b"\n"
    balancer.take_available()
    assert not balancer.eof


def test_closing_the_server_closes_connections_waiting_for_their_header(
    make: Make, clock: FakeClock
) -> None:
    """Shutdown closes a connection whose header has not come, and its deadline goes with it."""
    server = make()
    client = from_balancer(server)
    turn_until(server, lambda: server.open_count == 1, "the balancer's connection")
    server.close()
    client.sock.setblocking(True)
    client.sock.settimeout(5)
    assert client.sock.recv(10) == b""
    assert server.stats.disconnections["server_shutdown"] == 1


# --- the option, on the command line and in the file ----------------------------------


def test_proxy_protocol_repeats_on_the_command_line_and_is_an_array_in_the_file(
    tmp_path: Path,
) -> None:
    """--proxy-protocol CIDR repeats; in --config it is an array of networks;
    the command line wins; a bad network is one line naming the file."""
    path = tmp_path / "chat.toml"
    path.write_text('proxy-protocol = ["10.0.0.0/8", "fd00::/8"]\n')
    networks = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]
    assert chat.parse_args(["--config", str(path)]).proxy_protocol == networks
    given = ["--proxy-protocol", "192.0.2.1", "--proxy-protocol", "198.51.100.0/24"]
    assert chat.parse_args([*given, "--config", str(path)]).proxy_protocol == [
        ipaddress.ip_network("192.0.2.1/32"),
        ipaddress.ip_network("198.51.100.0/24"),
    ]
    assert chat.parse_args([]).proxy_protocol is None
    path.write_text('port = 0\nproxy-protocol = ["10.0.0.1/8"]\n')
    result = run_chat("--config", str(path))
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        f"chat.py: error: {path}, line 2: proxy-protocol: invalid network '10.0.0.1/8': "
        "it has host bits set (the network is 10.0.0.0/8)"
    ]
    path.write_text('proxy-protocol = "10.0.0.0/8"\n')
    assert (
        "must be an array of strings, not the string"
        in run_chat("--config", str(path)).stderr.decode()
    )


# --- a real HAProxy in front of chat.py ------------------------------------------------


class ClientFrom(Client):
    """A Client that connects from the local address `source`."""

    def __init__(self, source: str, address: tuple[str, int]) -> None:
        self.sock = connect_from(source, address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""


class TLSClientFrom(TLSClient):
    """A TLSClient that connects from the local address `source`."""

    def __init__(self, source: str, address: tuple[str, int]) -> None:
        raw = connect_from(source, address)
        try:
            self.sock = client_context(*self.trusted).wrap_socket(raw, server_hostname="localhost")
        except BaseException:
            raw.close()
            raise
        self.buffer = b""


@pytest.mark.parametrize("server_options", ["send-proxy", "send-proxy-v2"])
def test_behind_haproxy_the_server_sees_each_real_client(
    tmp_path: Path, tls_files: TLSFiles, server_options: str
) -> None:
    """HAProxy (v1 and v2 headers) in front of the plain port and, passing
    TLS through, the TLS port: both README sessions work end to end, the
    log names each client's own address and port, and --max-per-address 1
    counts each client, across both ports: a second connection from one
    is refused, one from another address is not."""
    tls_args = [
        "--tls-port",
        "0",
        "--tls-cert",
        str(tls_files.cert),
        "--tls-key",
        str(tls_files.key),
    ]
    trust = ["--proxy-protocol", f"{BALANCER}/32", "--max-per-address", "1"]
    with launch(*trust, *tls_args) as chat_py:
        backends = {"plain": ("127.0.0.1", chat_py.port), "tls": ("127.0.0.1", chat_py.tls_port)}
        with (
            running_haproxy(
                backends["plain"], tmp_path, server_options=server_options, source=BALANCER
            ) as plain,
            running_haproxy(
                backends["tls"], tmp_path, server_options=server_options, source=BALANCER
            ) as tls,
        ):
            with ClientFrom("127.0.0.4", plain.address) as first:
                first_port = first.sock.getsockname()[1]
                seed_session_one(first)
            poll(
                "teixe to be freed",
                lambda: f"127.0.0.4:{first_port}> disconnected" in chat_py.log.text(),
            )
            teixe = ClientFrom("127.0.0.2", plain.address)
            jeff = TLSClientFrom("127.0.0.3", tls.address)
            teixe_port, jeff_port = teixe.sock.getsockname()[1], jeff.sock.getsockname()[1]
            try:
                # HAProxy's own address holds both: each counts as its client.
                seed_session_two(teixe, jeff)
                with ClientFrom("127.0.0.2", plain.address) as twin:
                    assert twin.read_to_eof() == TOO_MANY_FROM_ADDRESS + b"\n"
                with ClientFrom("127.0.0.3", tls.address) as twin:  # before any handshake
                    assert twin.read_to_eof() == b""  # the TLS port refuses without a word
                with ClientFrom("127.0.0.4", plain.address) as carol:
                    carol.register("carol")
            finally:
                teixe.close()
                jeff.close()
        log = chat_py.finish()
    version = "v2" if "v2" in server_options else "v1"
    through = rf"through 127\.0\.0\.9:\d+ \(PROXY {version}\)"
    expected = [
        rf"127\.0\.0\.4:{first_port}> connected {through}",
        rf"127\.0\.0\.2:{teixe_port}> connected {through}",
        rf"127\.0\.0\.3:{jeff_port}> connected on the TLS port {through}",
        rf"refused 127\.0\.0\.2:\d+ {through}: 1 connections from 127\.0\.0\.2 ",
        rf"refused 127\.0\.0\.3:\d+ {through}: 1 connections from 127\.0\.0\.3 ",
        "expecting a PROXY protocol header from 127.0.0.9/32",
    ]
    for pattern in expected:
        assert re.search(pattern, log), (pattern, textwrap.shorten(log, 3000))


def test_a_web_page_request_over_the_limit_behind_a_balancer_is_answered_503(
    make: Make,
) -> None:
    """The web port behind a balancer: a client over --max-per-address whose
    page request came in the same read as its PROXY header gets the web
    port's 503, as a direct one would, not a silent close."""
    server = make(max_per_address=1, web=WebConfig(0))
    alice = from_balancer(server)
    alice.send(v1("127.0.0.2", 5002) + username("alice"))
    assert alice.sync() == []
    web_port = server.web_address
    assert web_port is not None
    page = Pumped(server, make=bound_to(BALANCER), address=("127.0.0.1", web_port[1]))
    page.send(v1("127.0.0.2", 5003) + b"GET / HTTP/1.1\r\nHost: chat\r\n\r\n")
    assert page.read_to_eof().startswith(b"HTTP/1.1 503 ")
    assert server.stats.refused["per_address"] == 1
