"""Fakes for the socket-free tests of the reactor's parts (test_connection,
test_door, test_reactor): a transport that takes what its window allows,
a selector that only remembers what it was asked to watch, a listening
socket that hands out queued peers, and a `Parts` that wires a
`Schedule`, `Writer` and `Reader` together over them the way `ChatServer`
does, with a close that only records."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from selectors import BaseSelector, SelectorKey
from typing import Any

from conftest import FakeClock
from connection import Connection, Reader, Schedule
from metrics import Stats
from output import Writer
from protocol import SetName, check_name
from room import LocalRoom, name_keys
from timers import Timers

_descriptors = itertools.count(1000)


class FakeTransport:
    """A connection's transport without a socket: `send` takes at most
    `window` bytes in all (then raises BlockingIOError), and what it took
    is in `received`; `recv` hands out `incoming`, one item per call."""

    def __init__(self, window: int = 1 << 30) -> None:
        self.fd = next(_descriptors)
        self.window = window
        self.received = bytearray()
        self.sends = 0
        self.incoming: list[bytes | OSError] = []
        self.closed = False

    def fileno(self) -> int:
        return -1 if self.closed else self.fd

    def recv(self, size: int, /) -> bytes:
        if not self.incoming:
            raise BlockingIOError("nothing yet")
        item = self.incoming.pop(0)
        if isinstance(item, OSError):
            raise item
        return item[:size]

    def send(self, data: bytes | bytearray | memoryview, /) -> int:
        self.sends += 1
        if not self.window:
            raise BlockingIOError("the kernel is full")
        taken = min(len(data), self.window)
        self.received += bytes(data[:taken])
        self.window -= taken
        return taken

    def setblocking(self, flag: bool) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class FakeListener:
    """A listening socket without a socket: `accept` hands out `waiting`
    (transport and peer address), raising `errors` first, then
    BlockingIOError."""

    def __init__(self) -> None:
        self.fd = next(_descriptors)
        self.waiting: list[tuple[FakeTransport, tuple[str, int]]] = []
        self.errors: list[OSError] = []
        self.closed = False

    def fileno(self) -> int:
        return -1 if self.closed else self.fd

    def accept(self) -> tuple[FakeTransport, tuple[str, int]]:
        if self.errors:
            raise self.errors.pop(0)
        if not self.waiting:
            raise BlockingIOError("nobody waiting")
        return self.waiting.pop(0)

    def arrive(self, host: str = "192.0.2.1", port: int = 40000) -> FakeTransport:
        """A client connects from `host`: its transport, once accepted."""
        transport = FakeTransport()
        self.waiting.append((transport, (host, port)))
        return transport

    def close(self) -> None:
        self.closed = True


class _Map(Mapping[Any, SelectorKey]):
    def __init__(self, keys: dict[int, SelectorKey]) -> None:
        self._keys = keys

    def __getitem__(self, fileobj: Any) -> SelectorKey:
        return self._keys[fileobj if isinstance(fileobj, int) else fileobj.fileno()]

    def __iter__(self) -> Any:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class FakeSelector(BaseSelector):
    """A selector that remembers what it watches and never waits: `select`
    reports `ready` (set by the test), then nothing."""

    def __init__(self) -> None:
        self._keys: dict[int, SelectorKey] = {}
        self.ready: list[tuple[SelectorKey, int]] = []
        self.changes = 0  # register, modify and unregister calls: epoll_ctl

    def register(self, fileobj: Any, events: int, data: Any = None) -> SelectorKey:
        fd = fileobj.fileno()
        if fd in self._keys:
            raise KeyError(f"{fileobj!r} is registered already")
        self.changes += 1
        key = SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: Any) -> SelectorKey:
        self.changes += 1
        return self._keys.pop(fileobj.fileno())

    def modify(self, fileobj: Any, events: int, data: Any = None) -> SelectorKey:
        fd = fileobj.fileno()
        if fd not in self._keys:
            raise KeyError(f"{fileobj!r} is not registered")
        self.changes += 1
        key = SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def select(self, timeout: float | None = None) -> list[tuple[SelectorKey, int]]:
        ready, self.ready = self.ready, []
        return ready

    def get_map(self) -> Mapping[Any, SelectorKey]:
        return _Map(self._keys)


class FakeHost:
    """The little of room.Host a LocalRoom asks in these tests: replies."""

    def __init__(self) -> None:
        self.replies: list[tuple[object, bytes]] = []

    def reply(self, member: object, line: bytes) -> None:
        self.replies.append((member, line))


class Parts:
    """A Schedule, Writer and Reader wired as ChatServer wires them, over a
    FakeSelector and a FakeClock, serving a LocalRoom; `closed` records
    every close (connection, reason), which does what ChatServer._close
    does to the parts."""

    def __init__(self, *, output_limit: int = 1 << 20, output_budget: int = 1 << 28) -> None:
        self.clock = FakeClock()
        self.timers = Timers(self.clock)
        self.selector = FakeSelector()
        self.schedule = Schedule(self.selector, self.timers)
        self.stats = Stats()
        self.closed: list[tuple[Connection, str]] = []
        self.writer = Writer(
            self.schedule,
            self.timers,
            self.stats,
            self.close,
            output_limit=output_limit,
            output_budget=output_budget,
        )
        self.reader = Reader(self.schedule, self.writer.send_later, self.close)
        self.room = LocalRoom(FakeHost())  # type: ignore[arg-type]

    def close(self, conn: Connection, reason: str, detail: str = "") -> None:
        if conn.closed:
            return
        conn.closed = True
        self.room.leave(conn)
        self.schedule.forget(conn)
        self.writer.outbox.drop(conn)
        self.closed.append((conn, reason))
        conn.sock.close()

    def connections(self) -> list[Connection]:
        """The connections the selector watches, in the order they came."""
        return [
            key.data for key in self.selector.get_map().values() if isinstance(key.data, Connection)
        ]

    def connect(self, window: int = 1 << 30) -> tuple[Connection, FakeTransport]:
        """A connection let in, watched for reading, over a FakeTransport."""
        transport = FakeTransport(window)
        conn = Connection(transport, f"peer:{transport.fd}")
        self.schedule.watch_new(conn)
        return conn, transport

    def member(self, name: str, window: int = 1 << 30) -> tuple[Connection, FakeTransport]:
        """A connection that holds `name` in the room."""
        conn, transport = self.connect(window)
        command = check_name(name.encode())
        assert isinstance(command, SetName)
        self.room.take(conn, command.name, name_keys(command))
        return conn, transport
