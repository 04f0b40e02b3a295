"""The room, without sockets: who holds which name, and what a turn says.

The reactor (reactor.py) moves bytes; this module decides what they mean
for the room. One turn, as the room sees it:

1. The reactor hands over each command: `set_name` for a valid USERNAME,
   `publish` for an accepted SEND from a member. Names are taken, renamed
   and freed in `LocalRoom`, the one table of who holds what.
2. Every accepted SEND becomes one RECEIVE line in the turn's `Batch`, in
   the order processed. Answers to members (`Host.reply`) take their place
   among those lines; a member who takes its first name mid-turn gets only
   what came after (`Batch.join`).
3. At the end of the turn the reactor joins the batch once and gives the
   same bytes to every member, except the few that `Batch.needs_own_copy`
   names, who get `Batch.copy_for`.

A `Room` is what the reactor talks to. `LocalRoom` is the room of one
server. Cluster mode's `cluster.RedisRoom` is the same interface over
Redis, and keeps its local names in a `LocalRoom` it wraps. The room asks
the reactor for the little it needs through `Host`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Final, Protocol

import protocol
from host import Host, Member
from metrics import Metric
from protocol import SetName

log = logging.getLogger("chat")


class ConfigurationError(Exception):
    """The room cannot be set up as configured (cluster mode: a bad Redis
    URL, a host that does not resolve, a refused password). `main` prints
    it as one line and exits non-zero."""


class Room(Protocol):
    """What the reactor calls. `publish` is an attribute, not a method, so
    that the reactor binds it once per turn and calls it directly: it runs
    once per message."""

    batch: Batch
    publish: Callable[[Member, bytes], None]

    @property
    def members(self) -> Collection[Member]:
        """Every member of this server, to deliver the batch to."""
        ...

    def turn_size(self) -> int:
        """Bytes of RECEIVE lines the turn has produced so far."""
        ...

    def set_name(self, member: Member, command: SetName) -> None:
        """A valid USERNAME: take the name, or answer why not. May `hold`
        the member until the answer is known."""
        ...

    def leave(self, member: Member) -> None:
        """`member` is closing: free its name."""
        ...

    def end_turn(self) -> None:
        """The turn is over and delivered (cluster mode: talk to Redis)."""
        ...

    def metrics(self) -> list[Metric]:
        """The room's own metrics, beside the reactor's."""
        ...

    def close(self) -> None: ...


# The forms under which a name is held, in the order of `name_keys`.
FORMS: Final = ("key", "look", "key-look")


def name_keys(command: SetName) -> tuple[str, ...]:
    """Every form under which a name is held, one per FORMS: two names are
    the same when any of their forms are equal (PROTOCOL.md, USERNAME): the
    NFKC+casefold key, or what the name looks like as typed, or what its key
    looks like. A form equal to the name as typed, or to another form,
    shares its string: with 10,000 members, every object per name counts."""
    shared = {command.name: command.name}
    forms = (command.key, command.skeleton, command.key_skeleton)
    return tuple(shared.setdefault(form, form) for form in forms)


class Batch:
    """What the turn said to the room, in the order it was processed.

    Most members get `lines` joined, as they are. A few must get their own
    copy: a sender never gets its own lines; a member who took its first
    name during the turn gets only the lines after that; and a member who was
    answered during the turn gets its answer between the lines processed
    before and after its command, so that every connection sees one order.
    """

    __slots__ = ("joined_at", "lines", "own", "replies", "size")

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.size = 0
        # Each sender's own lines, as indices in `lines`.
        self.own: dict[Member, list[int]] = {}
        # Members new this turn: the index of the first line they may get.
        self.joined_at: dict[Member, int] = {}
        # Answers to members, each with the index of the line it precedes.
        self.replies: dict[Member, list[tuple[int, bytes]]] = {}

    def publish(self, sender: Member, line: bytes) -> None:
        """A RECEIVE line from `sender`, for every member but `sender`."""
        own = self.own.get(sender)
        if own is None:
            self.own[sender] = [len(self.lines)]
        else:
            own.append(len(self.lines))
        self.lines.append(line)
        self.size += len(line)

    def add_foreign(self, line: bytes) -> None:
        """A line every member gets: a message published by another server
        (cluster mode), or by a connection that is gone."""
        self.lines.append(line)
        self.size += len(line)

    def reply(self, member: Member, line: bytes) -> bool:
        """Keep an answer to `member` in its place among the lines, and say
        True; or say False: it may go straight out, ahead of them all."""
        if member.name is None or not self.lines:
            # Not a member (it gets no lines), or nothing to be behind.
            return False
        self.replies.setdefault(member, []).append((len(self.lines), line))
        return True

    def join(self, member: Member) -> None:
        """`member` took its first name: it gets only the lines from now on."""
        if self.lines:
            self.joined_at[member] = len(self.lines)

    def needs_own_copy(self) -> set[Member]:
        return self.own.keys() | self.joined_at.keys() | self.replies.keys()

    def copy_for(
        self,
        member: Member,
        shared: memoryview,
        offsets: list[int],
        frame: Callable[[bytes], bytes] | None = None,
    ) -> bytes:
        """The turn's output for one of `needs_own_copy()`. `shared` is the
        turn's `lines` on the member's wire (joined, or framed once for all);
        `offsets[i]` is where line i starts in it. `frame`, if any, puts an
        answer on that wire."""
        pieces: list[bytes | memoryview] = []
        position = offsets[self.joined_at.get(member, 0)]
        # (index, line): insert `line` before line `index`; (index, None):
        # leave line `index` out. An answer recorded before a member's own
        # line (same index) comes first, as it was processed first.
        edits: list[tuple[int, bytes | None]] = list(self.replies.get(member, ()))
        edits += [(index, None) for index in self.own.get(member, ())]
        edits.sort(key=lambda edit: (edit[0], edit[1] is None))
        for index, reply in edits:
            pieces.append(shared[position : offsets[index]])
            if reply is None:
                position = offsets[index + 1]
            else:
                pieces.append(reply if frame is None else frame(reply))
                position = offsets[index]
        pieces.append(shared[position:])
        return b"".join(pieces)

    def clear(self) -> None:
        self.lines = []
        self.size = 0
        self.own.clear()
        self.joined_at.clear()
        self.replies.clear()


NO_KEYS: Final[tuple[str, ...]] = ()


class LocalRoom:
    """The room of one server: the table of names, and the turn's batch."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.batch = Batch()
        # Bound once: an accepted SEND goes straight into the batch.
        self.publish: Callable[[Member, bytes], None] = self.batch.publish
        # Who holds each form of each name, one table per FORMS; the first
        # holds every member once.
        self._holders: tuple[dict[str, Member], ...] = tuple({} for _ in FORMS)

    @property
    def members(self) -> Collection[Member]:
        return self._holders[0].values()

    def turn_size(self) -> int:
        return self.batch.size

    def holder(self, keys: tuple[str, ...], asking: Member) -> Member | None:
        """Who holds a name with any of `keys`, other than `asking`."""
        for table, key in zip(self._holders, keys, strict=True):
            holder = table.get(key)
            if holder is not None and holder is not asking:
                return holder
        return None

    def set_name(self, member: Member, command: SetName) -> None:
        keys = name_keys(command)
        if self.holder(keys, member) is not None:
            self.host.reply(member, protocol.NAME_TAKEN)
        else:
            self.take(member, command.name, keys)

    def take(self, member: Member, name: str, keys: tuple[str, ...]) -> None:
        """Give `member` the name `name`, held under `keys` (all free)."""
        if member.name is None:
            log.info("%r took the name %r", member, name)
            self.batch.join(member)
        else:
            if member.name != name:
                log.info("%r renamed itself %r", member, name)
            self._release(member, keep=keys)
        for table, key in zip(self._holders, keys, strict=True):
            table[key] = member
        member.name = name
        member.keys = keys
        member.receive_prefix = protocol.receive_prefix(name)

    def drop_name(self, member: Member) -> None:
        """`member` has no name any more (it left, or in cluster mode another
        server holds the name now)."""
        if member.name is None:
            return
        self._release(member, keep=(None,) * len(FORMS))
        member.name = None
        member.keys = NO_KEYS
        member.receive_prefix = b""

    def leave(self, member: Member) -> None:
        self.drop_name(member)

    def end_turn(self) -> None:
        pass

    def metrics(self) -> list[Metric]:
        return []

    def close(self) -> None:
        pass

    def _release(self, member: Member, keep: tuple[str | None, ...]) -> None:
        """Free the forms of `member`'s name that are not kept."""
        for table, key, kept in zip(self._holders, member.keys, keep, strict=True):
            if key != kept and table.get(key) is member:
                del table[key]
