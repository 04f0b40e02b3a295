"""What the reactor offers the modules it runs, and nothing else: the
`Host` a room asks for time, timers, replies and holds; the `Member` a
room sees of a connection; a `Timer` to cancel; and the one list of the
reasons a connection closes, from which the logs take their words and the
metrics their label values.

It imports nothing of the server's, so room.py, metrics.py and cluster.py
can all import it without any of them importing another back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol, TypeVar


class Member(Protocol):
    """A connection, as the room sees it. The room is the only writer of
    `name`, `keys` and `receive_prefix`."""

    name: str | None  # as typed; None until the first accepted USERNAME
    # Every form under which the room holds the name (see room.name_keys);
    # empty while there is no name.
    keys: tuple[str, ...]
    receive_prefix: bytes  # b"RECEIVE <name> ", made once per name
    closed: bool


class Timer(Protocol):
    def cancel(self) -> None: ...


class Host(Protocol):
    """What a room may ask of the reactor that runs it."""

    def now(self) -> float:
        """The reactor's clock (time.monotonic, or a test's fake clock)."""
        ...

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Run `callback` once the clock reaches `when`, unless cancelled."""
        ...

    def reply(self, member: Member, line: bytes) -> None:
        """Answer `member`, in its place among the turn's lines."""
        ...

    def hold(self, member: Member) -> None:
        """Stop processing `member`'s lines (its USERNAME waits for an
        answer; in cluster mode, its SENDs too) until `resume`. Lines after
        SENDs held this way are still processed if they are SENDs too."""
        ...

    def resume(self, member: Member) -> None: ...

    def disconnect(self, member: Member, detail: str) -> None:
        """Close `member` at the end of the turn, once its output is flushed,
        as a slow consumer (cluster mode: its server fell behind); `detail`
        says why in the log."""
        ...

    def watch(self, sock: object, events: int, handler: Callable[[int], None]) -> None:
        """Watch a socket of the room's own (Redis) for `events`;
        `handler(mask)` runs when it is ready."""
        ...

    def unwatch(self, sock: object) -> None: ...


class WritesWatched(Protocol):
    """Something whose socket is watched for writing while `wants_write`."""

    wants_write: bool


Watched = TypeVar("Watched", bound=WritesWatched)


def watch_writes_while(watched: Watched, unsent: bool, rewatch: Callable[[Watched], None]) -> None:
    """Watch for writing while, and only while, bytes remain: after a send,
    `unsent` says whether any are left; when that is not what is watched
    already, `wants_write` takes it and `rewatch(watched)` changes the
    selector (an epoll_ctl, so only on a change: a writable socket nobody
    writes to would make select spin, and re-asking every send would cost
    a system call each)."""
    if unsent != watched.wants_write:
        watched.wants_write = unsent
        rewatch(watched)


# Why a connection was closed, in the contract's order: the label of
# chat_disconnections_total, and the words of the log line.
CLOSE_REASONS: Final = {
    "client_closed": "client closed the connection",
    "reset": "connection reset",
    "slow_consumer": "slow consumer",
    "memory_budget": "slow consumer: over the total output budget",
    "timed_out": "timed out: the peer stopped answering",
    "registration_timeout": "no USERNAME in time",
    "per_address": "too many connections from its address",
    "server_full": "server is full",
    "tls_handshake": "TLS handshake failed",
    "server_shutdown": "server shutting down",
    "internal_error": "internal error",
    # (v3) A peer that broke its protocol: a malformed PROXY header, or a
    # WebSocket breaking RFC 6455.
    "protocol_error": "protocol error",
}
# Why a connection was refused at the door: the label of
# chat_connections_refused_total (each is a close reason too).
REFUSAL_REASONS: Final = ("server_full", "per_address")
