"""The machinery the tests share beside conftest.py's lines, clients and
servers: stand-ins for what the room and the server talk to, written once
and imported by the test files that need them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from host import Member
from room import NO_KEYS, LocalRoom

# --- The room without a server: a fake host and fake members -----------------


@dataclass(eq=False)  # hashed by identity, as connections are
class FakeMember:
    label: str
    name: str | None = None
    keys: tuple[str, ...] = NO_KEYS
    receive_prefix: bytes = b""
    closed: bool = False


@dataclass
class FakeTimer:
    when: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeHost:
    """The reactor, as the room sees it: replies that the batch does not
    keep go straight to `direct`; holds and timers are recorded."""

    room: LocalRoom | None = None
    direct: dict[Member, bytes] = field(default_factory=dict)
    held: set[Member] = field(default_factory=set)
    timers: list[FakeTimer] = field(default_factory=list)
    clock: float = 0.0

    def now(self) -> float:
        return self.clock

    def call_at(self, when: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(when, callback)
        self.timers.append(timer)
        return timer

    def reply(self, member: Member, line: bytes) -> None:
        assert self.room is not None
        if not self.room.batch.reply(member, line):
            self.direct[member] = self.direct.get(member, b"") + line

    def hold(self, member: Member) -> None:
        self.held.add(member)

    def resume(self, member: Member) -> None:
        self.held.discard(member)

    def disconnect(self, member: Member, detail: str) -> None:
        raise AssertionError("a LocalRoom never falls behind")

    def watch(self, sock: object, events: int, handler: Callable[[int], None]) -> None:
        raise AssertionError("a LocalRoom has no sockets")

    def unwatch(self, sock: object) -> None:
        raise AssertionError("a LocalRoom has no sockets")


def make_room() -> tuple[LocalRoom, FakeHost]:
    host = FakeHost()
    room = LocalRoom(host)
    host.room = room
    return room, host
