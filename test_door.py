"""door.py without sockets: the limits on who comes in, the register
timeout, the pause when descriptors run out, and the TLS port's
handshake deadline, against fakes.py's listener and selector."""

from __future__ import annotations

import errno
import ssl
from collections.abc import Callable
from selectors import EVENT_READ
from typing import cast

import pytest

from conftest import SERVER_FULL
from connection import HANDSHAKE, REGISTRATION, Connection
from door import ACCEPT_PAUSE, TLS, Door, TLSPort
from fakes import FakeListener, Parts
from tls import TLSConfig, TLSTransport


class Entrance:
    """A Door over Parts' schedule, with one plain listener; `expired`
    records the connections whose register timeout ran out."""

    def __init__(
        self, *, max_clients: int = 100, max_per_address: int = 2, register_timeout: float = 0
    ) -> None:
        self.parts = Parts()
        self.expired: list[Connection] = []
        self.door = Door(
            self.parts.selector,
            self.parts.schedule,
            self.parts.timers,
            self.parts.stats,
            self.expired.append,
            max_clients=max_clients,
            max_per_address=max_per_address,
            register_timeout=register_timeout,
        )
        self.listener = FakeListener()
        self.door.open(self.listener)  # type: ignore[arg-type]

    def let_in(self) -> list[Connection]:
        """Accept what waits (as a readable listener does); the connections."""
        self.door.accept(self.door.listeners[0])
        return self.parts.connections()


def test_over_max_clients_a_client_is_told_the_server_is_full() -> None:
    """Door: past --max-clients a connection is refused with the contract's line and closed."""
    entrance = Entrance(max_clients=2, max_per_address=0)
    transports = [entrance.listener.arrive(port=40000 + i) for i in range(3)]
    assert len(entrance.let_in()) == 2
    assert entrance.door.open_count == 2
    assert bytes(transports[2].received) == SERVER_FULL + b"\n" and transports[2].closed
    assert not transports[0].closed and transports[0].received == b""
    assert entrance.parts.stats.refused["server_full"] == 1


def test_over_max_per_address_a_client_is_refused_until_one_leaves() -> None:
    """Door: --max-per-address counts per address; the machine itself is not counted; a
    connection that leaves frees its place."""
    entrance = Entrance(max_per_address=2)
    for port in range(3):
        entrance.listener.arrive("198.51.100.7", 40000 + port)
    for port in range(3):
        entrance.listener.arrive("127.0.0.1", 50000 + port)
    admitted = entrance.let_in()
    assert len(admitted) == 5  # 2 from 198.51.100.7, 3 from loopback
    assert entrance.parts.stats.refused["per_address"] == 1
    entrance.door.left(admitted[0])
    late = entrance.listener.arrive("198.51.100.7", 40009)
    assert len(entrance.let_in()) == 6 and not late.closed


def test_a_refusal_on_a_listener_that_is_not_plain_says_nothing() -> None:
    """Door: a refusal on the TLS port is not told in plain text."""
    entrance = Entrance(max_clients=1)
    tls_listener = FakeListener()
    entrance.door.open(tls_listener, plain=False)  # type: ignore[arg-type]
    entrance.listener.arrive()
    late = tls_listener.arrive(port=40001)
    entrance.let_in()
    entrance.door.accept(entrance.door.listeners[1])
    assert late.closed and late.received == b""


def test_the_register_timeout_expires_unless_a_name_is_taken() -> None:
    """Door: a connection without a name after --register-timeout is handed
    to `expired`; one that took a name is not."""
    entrance = Entrance(register_timeout=60)
    entrance.listener.arrive(port=1)
    entrance.listener.arrive(port=2)
    named, nameless = entrance.let_in()
    schedule = entrance.parts.schedule
    assert schedule.timers_of(named) == [REGISTRATION]
    named.name = "ann"
    entrance.door.named(named)
    assert schedule.timers_of(named) == []
    entrance.parts.clock.advance(59.9)
    entrance.parts.timers.run_due()
    assert entrance.expired == []
    entrance.parts.clock.advance(0.1)
    entrance.parts.timers.run_due()
    assert entrance.expired == [nameless]


def test_running_out_of_descriptors_pauses_accepting_for_accept_pause() -> None:
    """Door: EMFILE unwatches the listeners for ACCEPT_PAUSE, then they are watched again."""
    entrance = Entrance()
    entrance.listener.errors.append(OSError(errno.EMFILE, "Too many open files"))
    entrance.listener.arrive()
    assert entrance.let_in() == []
    selector = entrance.parts.selector
    assert entrance.listener.fd not in selector.get_map()
    entrance.parts.clock.advance(ACCEPT_PAUSE)
    entrance.parts.timers.run_due()
    assert selector.get_map()[entrance.listener.fd].events == EVENT_READ
    assert len(entrance.let_in()) == 1


# --- the TLS port ----------------------------------------------------------


def tls_entrance() -> tuple[Entrance, Callable[[], Connection]]:
    """An Entrance with a TLS listener; a function that lets one client in on it."""
    entrance = Entrance()
    config = TLSConfig(0, "unused.pem", "unused.key", handshake_timeout=10.0)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    port = TLSPort(config, context, entrance.parts.schedule, entrance.parts.close)
    tls_listener = FakeListener()
    entrance.door.open(tls_listener, port.admit, plain=False)  # type: ignore[arg-type]

    def arrive() -> Connection:
        tls_listener.arrive()
        entrance.door.accept(entrance.door.listeners[1])
        (conn,) = [conn for conn in entrance.parts.connections() if conn.kind is TLS]
        return conn

    return entrance, arrive


def test_a_tls_handshake_not_finished_in_time_closes_the_connection() -> None:
    """TLSPort: the handshake has its deadline; past it, the connection closes."""
    entrance, arrive = tls_entrance()
    conn = arrive()
    assert isinstance(conn.sock, TLSTransport)
    assert entrance.parts.schedule.timers_of(conn) == [HANDSHAKE]
    entrance.parts.clock.advance(10.0)
    entrance.parts.timers.run_due()
    assert entrance.parts.closed == [(conn, "tls_handshake")]


def test_closing_a_connection_cancels_its_handshake_deadline() -> None:
    """TLSPort: a connection closed during its handshake leaves no timer behind."""
    entrance, arrive = tls_entrance()
    conn = arrive()
    entrance.parts.close(conn, "client_closed")
    assert entrance.parts.timers.next_due() is None
    entrance.parts.clock.advance(10.0)
    entrance.parts.timers.run_due()
    assert entrance.parts.closed == [(conn, "client_closed")]


@pytest.mark.parametrize("established", [False, True])
def test_tls_output_waits_for_the_handshake(established: bool) -> None:
    """TLSKind: a TLS connection is ready for output once its handshake is done."""
    _, arrive = tls_entrance()
    conn = arrive()
    transport = cast(TLSTransport, conn.sock)
    transport.established = established
    assert TLS.ready(conn) is established
