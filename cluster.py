"""Cluster mode: several chat.py processes serving one room through Redis.

chat.py imports this module only when it is started with --redis; it needs
the `hiredis` package (requirements-cluster.txt), through redis_link.py,
the link to Redis (the URL, commands, a socket, deadlines), which only this
module imports. This one is the room.

The contract is PROTOCOL.md, "Cluster mode" and "What 'accepted' means in
cluster mode". How it is kept:

- Messages are a Redis Stream, `chat:<room>:messages`. The SENDs a server
  accepts in one loop turn are appended together, as one entry, by one
  script (APPEND) at the end of the turn, and not delivered at once. Every
  server, the sender's included, reads the stream with XREAD BLOCK from the
  last entry it delivered, on a connection of its own, and delivers what it
  reads, so every server delivers in the stream's order; after an outage,
  a pause or a slow patch it carries on exactly where it was. An entry is
  "<server id>:<id>,<id>,...\\n" then the RECEIVE lines, one connection id
  per line: the origin server splits it to leave each sender out; every
  other server hands the lines on as one piece.
- Accepted means stored. A connection that published is held (`Host.hold`)
  until Redis answers the APPEND: its later lines wait, so an answer to one
  of its SENDs (`ERROR Service unavailable.`, or the name lost) comes in
  that SEND's place.
- History. Each entry also holds the ID of the entry before it ("p"), kept
  in `chat:<room>:head`. A reader whose last entry is not the new entry's
  "p" has a gap: the entries it missed were trimmed away (the stream keeps
  at least KEEP entries, MAXLEN ~), and it closes its members' connections;
  or Redis lost them (restarted without persistence), and it logs that.
- Names. A name is held under every key `room.name_keys` gives,
  `chat:<room>:name:<key>`, each holding its owner ("<server id>:<connection
  id>") with a lease, renewed every third of it (CLAIM, all keys or none).
  APPEND checks, in the same step as it stores, that every sender still
  owns its name's keys (fencing): a server whose leases ran out while it was
  paused or cut off cannot send on a name another server gave away since;
  that sender is told `ERROR Username already in use.` and has no name.
- Deadlines. Every request has one (--redis-timeout), checked on the
  reactor's timers; a TIME heartbeat runs every half of it and the reader
  blocks for half of it, so a hung, paused or partitioned Redis is an
  outage within about 1.5 x the timeout. Scripts that change something
  carry their deadline in Redis's clock (its offset from ours measured by
  the heartbeat, never overestimated), so a request that timed out here but
  reaches Redis later (a paused Redis reading its backlog) is refused there.
- Outages. On any failure both sockets are closed, every request waiting
  for an answer is answered `ERROR Service unavailable.` (a SEND, a
  USERNAME) or dropped, and reconnecting starts: at once after Redis closed
  a working link, else after a capped back-off with jitter. One log line
  when it starts, one when it ends. Once back, every local name is claimed
  again; a name another server took meanwhile is lost, and its user told.
- Start. `room_factory` asks Redis, blocking and bounded, everything the
  room will need (AUTH, SELECT, the scripts, the keys): a Redis that answers
  but refuses is a ConfigurationError, and the server does not start; one
  that does not answer is an outage like any other.

Two sockets, because a connection blocked in XREAD answers nothing else.
Both are non-blocking and sit in the server's selector; nothing here blocks
after the start. `RedisRoom` is four parts, one job each: the `Session`
(redis_link.py: the links' life, connecting, up, failing, the back-off,
the heartbeat and Redis's clock), the `NameLeases` (claim, renew, release,
a name lost), the `StreamWriter` (a turn stored, its senders answered) and
the `StreamReader` (the stream read and relayed, a gap noticed). The
scripts are in redis_scripts.py.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

import protocol
from host import Host, Member, Timer
from metrics import Metric, counter, gauge
from protocol import SetName
from redis_link import (
    LOST,
    Callback,
    RedisAddress,
    ReplyError,
    Session,
    check_configuration,
    encode_command,
    parse_redis_url,
)
from redis_scripts import APPEND_SHA, CLAIM_SHA, RELEASE_SHA, SCRIPTS
from room import FORMS, ConfigurationError, LocalRoom, Room, name_keys

log = logging.getLogger("chat")

# PROTOCOL.md: Redis keeps at least the last 100,000 messages; an entry is a
# turn of one server, one message or more.
KEEP: Final = 100_000
# Entries per XREAD. An entry is at most about chat.BATCH_BYTES, so a reply
# stays within some 16 MiB, the parser's memory.
READ_COUNT: Final = 64
# Entries relayed into one turn's batch, in bytes, as chat.BATCH_BYTES: a
# reader catching up delivers in turns of the usual size.
RELAY_BYTES: Final = 256 * 1024

# An ID after every entry: XREAD from it answers at once, with nothing.
_LAST_POSSIBLE_ID: Final = b"18446744073709551615-18446744073709551615"
_FIRST_ID: Final = b"0-0"


FORM_TAGS: Final = tuple(form.encode() for form in FORMS)


@dataclass(frozen=True, slots=True)
class RoomKeys:
    """A room's keys in Redis: its stream, the stream's head, and the prefix
    of its names' keys."""

    stream: bytes
    head: bytes
    name_prefix: bytes

    @classmethod
    def of(cls, room: str) -> RoomKeys:
        return cls(
            f"chat:{room}:messages".encode(),
            f"chat:{room}:head".encode(),
            f"chat:{room}:name:".encode(),
        )


def room_factory(url: str, *, room: str, lease_ms: int, timeout: float) -> Callable[[Host], Room]:
    """What the reactor calls to build the room of cluster mode. The URL is
    parsed, its host resolved and Redis asked whether it accepts the
    configuration (blocking, once, each step within `timeout`), here: a bad
    one is a ConfigurationError before any port is bound."""
    redis = parse_redis_url(url)
    try:
        family, _, _, _, address = socket.getaddrinfo(
            redis.host, redis.port, type=socket.SOCK_STREAM
        )[0]
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigurationError(
            f"cannot resolve the Redis host {redis.host!r}: {reason}"
        ) from None
    keys = RoomKeys.of(room)
    # Everything the room will use: the scripts loaded and run, the stream
    # and its head read.
    check_configuration(
        redis,
        family,
        address,
        [
            *((b"SCRIPT", b"LOAD", script) for script in SCRIPTS),
            (b"EVALSHA", CLAIM_SHA, b"0", b"check", b"1", b"0"),  # no keys: changes nothing
            (b"XREAD", b"COUNT", b"1", b"STREAMS", keys.stream, _LAST_POSSIBLE_ID),
            (b"GET", keys.head),
            (b"TIME",),
        ],
        timeout=timeout,
    )

    def build(host: Host) -> Room:
        return RedisRoom(
            host, redis, family, address, room=room, lease_ms=lease_ms, timeout=timeout
        )

    return build


def _id_key(entry_id: bytes) -> tuple[int, int]:
    """A stream entry's ID ("<ms>-<seq>"), to compare IDs in order."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or b"0")


class NameLeases:
    """This server's names as leases in Redis, held under every key of a
    name (all or none), renewed every third of the lease; and the id by
    which Redis knows each connection, in lease owners ("<server>:<id>")
    and in entries. The names themselves are kept, as in one server, in the
    LocalRoom."""

    def __init__(
        self, host: Host, local: LocalRoom, session: Session, keys: RoomKeys, *, lease_ms: int
    ) -> None:
        self._host = host
        self._local = local
        self._session = session
        self._key_prefix = keys.name_prefix
        self.lease = b"%d" % lease_ms
        self._renew_every = lease_ms / 3000
        self._renewal: Timer | None = None
        # This process in owners and payloads: random, so a restarted server
        # never passes for its former self.
        self.server_tag = os.urandom(8).hex().encode() + b":"
        self._next_id = 0
        self._id: dict[Member, bytes] = {}  # b"<id>", decimal
        self._by_id: dict[bytes, Member] = {}

    def id_of(self, member: Member) -> bytes:
        conn_id = self._id.get(member)
        if conn_id is None:
            self._next_id += 1
            conn_id = b"%d" % self._next_id
            self._id[member] = conn_id
            self._by_id[conn_id] = member
        return conn_id

    def member(self, conn_id: bytes) -> Member | None:
        """The member of this server with that id, if still there."""
        return self._by_id.get(conn_id)

    def redis_keys(self, keys: tuple[str, ...]) -> list[bytes]:
        """A name's keys in Redis, `chat:<room>:name:<form>:<key>`, one per
        room.FORMS (none for a connection without a name)."""
        prefix = self._key_prefix
        return [
            b"%s%s:%s" % (prefix, form, key.encode())
            for form, key in zip(FORM_TAGS, keys, strict=False)
        ]

    def set_name(self, member: Member, command: SetName) -> None:
        """room.Room.set_name: a name another server may hold is claimed in
        Redis, and `member` held until Redis answers."""
        host = self._host
        if not self._session.available:
            host.reply(member, protocol.SERVICE_UNAVAILABLE)
            return
        keys = name_keys(command)
        if self._local.holder(keys, member) is not None:
            host.reply(member, protocol.NAME_TAKEN)
            return
        if keys == member.keys:
            # Its own name in another spelling: it holds every key already.
            self._local.take(member, command.name, keys)
            return
        host.hold(member)
        owner = self.server_tag + self.id_of(member)
        redis_keys = self.redis_keys(keys)

        def claimed(reply: Any) -> None:
            if reply == 1:
                if member.closed:  # meanwhile
                    self._release(redis_keys, owner)
                else:
                    dropped = [key for key in self.redis_keys(member.keys) if key not in redis_keys]
                    if dropped:
                        self._release(dropped, owner)
                    self._local.take(member, command.name, keys)
            elif reply == 0:
                host.reply(member, protocol.NAME_TAKEN)
            else:  # LOST, too late (-1), or an error reply
                if isinstance(reply, ReplyError):
                    log.error("Redis refused to claim a name: %s", reply)
                host.reply(member, protocol.SERVICE_UNAVAILABLE)
            host.resume(member)

        self._claim(claimed, redis_keys, owner)

    def leave(self, member: Member) -> None:
        """`member` is closing: free its name in Redis (if Redis is there; if
        not, the lease runs out)."""
        conn_id = self._id.get(member)
        if conn_id is None:
            return
        self.release(member)
        del self._id[member], self._by_id[conn_id]
        self._local.leave(member)

    def release(self, member: Member) -> None:
        """Free `member`'s name in Redis, if it has one (and Redis is there;
        if not, the lease runs out)."""
        conn_id = self._id.get(member)
        if conn_id is not None and member.name is not None:
            self._release(self.redis_keys(member.keys), self.server_tag + conn_id)

    def lose(self, member: Member) -> bool:
        """Redis says another connection holds `member`'s name now: it has
        no name any more, and is told so; whether it had one to lose."""
        if member.name is None or member.closed:
            return False
        log.info("%r lost the name %r: another server holds it now", member, member.name)
        self._local.drop_name(member)
        self._host.reply(member, protocol.NAME_TAKEN)
        return True

    def renew_all(self) -> None:
        """Renew (or, after an outage, take again) every local name; a name
        another server holds now is lost. Due again in a third of the lease."""
        self._renewal = self._host.call_at(self._host.now() + self._renew_every, self.renew_all)
        for member in list(self._local.members):
            self._renew(member)

    def stop(self) -> None:
        """No more renewals until `renew_all` (Redis is down, or closing)."""
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None

    def _renew(self, member: Member) -> None:
        keys = member.keys

        def renewed(reply: Any) -> None:
            if reply == 0 and member.keys == keys:
                self.lose(member)
            elif isinstance(reply, ReplyError):
                log.error("Redis refused to renew a name: %s", reply)

        self._claim(renewed, self.redis_keys(keys), self.server_tag + self.id_of(member))

    def _claim(self, callback: Callback, redis_keys: list[bytes], owner: bytes) -> None:
        session = self._session
        count = b"%d" % len(redis_keys)
        command = encode_command(
            b"EVALSHA", CLAIM_SHA, count, *redis_keys, owner, self.lease, session.redis_deadline()
        )
        if not session.ask(callback, command):
            callback(LOST)

    def _release(self, redis_keys: list[bytes], owner: bytes) -> None:
        if self._session.available:
            count = b"%d" % len(redis_keys)
            command = encode_command(b"EVALSHA", RELEASE_SHA, count, *redis_keys, owner)
            self._session.ask(None, command)


@dataclass(slots=True)
class _Turn:
    """One turn's accepted SENDs, as one entry: the RECEIVE lines, the id of
    each line's sender, and the senders (held until Redis answers)."""

    lines: list[bytes] = field(default_factory=list)
    ids: list[bytes] = field(default_factory=list)
    senders: dict[Member, bytes] = field(default_factory=dict)

    def without(self, gone: Collection[bytes]) -> _Turn:
        kept = [(line, i) for line, i in zip(self.lines, self.ids, strict=True) if i not in gone]
        senders = {member: i for member, i in self.senders.items() if i not in gone}
        return _Turn([line for line, _ in kept], [i for _, i in kept], senders)


class StreamWriter:
    """The stream's write path: the SENDs a turn accepts are gathered into
    the turn in flight and stored as one entry at the end of the turn, by
    APPEND, fenced on the senders' names; each sender is held until Redis
    answers, then resumed, or answered in its SENDs' places."""

    def __init__(
        self,
        host: Host,
        session: Session,
        names: NameLeases,
        reader: StreamReader,
        keys: RoomKeys,
    ) -> None:
        self._host = host
        self._session = session
        self._names = names
        self._reader = reader
        self._stream = keys.stream
        self._head = keys.head
        self._keep = b"%d" % KEEP
        self._turn = _Turn()
        self.published = 0  # bytes published this turn

    def publish(self, member: Member, line: bytes) -> None:
        """An accepted SEND's RECEIVE line: to Redis at the end of the turn,
        and back to every server. The sender waits for Redis's answer."""
        if not self._session.available:
            self._host.reply(member, protocol.SERVICE_UNAVAILABLE)
            return
        turn = self._turn
        conn_id = turn.senders.get(member)
        if conn_id is None:
            conn_id = turn.senders[member] = self._names.id_of(member)
            self._host.hold(member)
        turn.lines.append(line)
        turn.ids.append(conn_id)
        self.published += len(line)

    def end_turn(self) -> None:
        """Store the turn's SENDs, if any."""
        self.published = 0
        if self._turn.lines:
            self._store(self._take_turn())

    def refuse_turn(self) -> None:
        """Redis is gone: the turn's SENDs, not sent yet, are answered so."""
        if self._turn.lines:
            self._refuse(self._take_turn(), protocol.SERVICE_UNAVAILABLE)

    def _take_turn(self) -> _Turn:
        turn, self._turn = self._turn, _Turn()
        return turn

    def _store(self, turn: _Turn) -> None:
        # A sender closed since it published has nobody to tell and no name
        # to send on; one without a name any more is told so.
        gone = [(m, i) for m, i in turn.senders.items() if m.closed or m.name is None]
        if gone:
            for member, conn_id in gone:
                self._answer(member, turn.ids.count(conn_id), protocol.NAME_REQUIRED)
            turn = turn.without({conn_id for _, conn_id in gone})
            if not turn.lines:
                return
        self._send(turn)

    def _send(self, turn: _Turn) -> None:
        names = self._names
        keys: list[bytes] = []
        owners: list[bytes] = []
        for member, conn_id in turn.senders.items():
            keys += names.redis_keys(member.keys)
            owners += (names.server_tag + conn_id, b"%d" % len(member.keys))
        entry = b"".join((names.server_tag, b",".join(turn.ids), b"\n", *turn.lines))
        command = encode_command(
            b"EVALSHA",
            APPEND_SHA,
            b"%d" % (2 + len(keys)),
            self._stream,
            self._head,
            *keys,
            self._session.redis_deadline(),
            names.lease,
            self._keep,
            entry,
            *owners,
        )
        if not self._session.ask(partial(self._stored, turn), command):
            self._refuse(turn, protocol.SERVICE_UNAVAILABLE)

    def _stored(self, turn: _Turn, reply: Any) -> None:
        """Redis's answer to a turn's APPEND."""
        if type(reply) is bytes:  # the entry's ID: accepted
            self._reader.stored(reply, len(turn.lines))
            for member in turn.senders:
                self._host.resume(member)
        elif type(reply) is list:  # these senders (from 1) lost their names
            senders = list(turn.senders.items())
            lost = [senders[index - 1] for index in reply]
            for member, conn_id in lost:
                messages = turn.ids.count(conn_id)
                if self._names.lose(member):
                    messages -= 1  # its first SEND was answered that
                # The rest as from a connection without a name.
                self._answer(member, messages, protocol.NAME_REQUIRED)
            rest = turn.without({conn_id for _, conn_id in lost})
            if rest.lines:
                self._send(rest)  # the others, still held, in one entry
        else:  # LOST, too late (-1), or an error reply
            if isinstance(reply, ReplyError):
                log.error("Redis refused to store messages: %s", reply)
            self._refuse(turn, protocol.SERVICE_UNAVAILABLE)
            if isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT"):
                self._session.fail(
                    "the scripts are gone (SCRIPT FLUSH?): loading them again",
                    closed_by_redis=True,
                )

    def _refuse(self, turn: _Turn, line: bytes) -> None:
        """Answer each of the turn's SENDs `line`, in its place."""
        for member, conn_id in turn.senders.items():
            self._answer(member, turn.ids.count(conn_id), line)

    def _answer(self, member: Member, count: int, line: bytes) -> None:
        host = self._host
        for _ in range(count):
            host.reply(member, line)
        host.resume(member)


class StreamReader:
    """The stream's read path: XREAD BLOCK from the last entry delivered,
    on the reader link; the entries relayed into the turns' batches a turn's
    worth at a time; a gap told apart (this server fell behind, or Redis
    lost the history)."""

    def __init__(
        self,
        host: Host,
        local: LocalRoom,
        session: Session,
        names: NameLeases,
        keys: RoomKeys,
    ) -> None:
        self._host = host
        self._local = local
        self._batch = local.batch
        self._session = session
        self._names = names
        self._stream = keys.stream
        self._head = keys.head
        block_ms = max(1, round(session.timeout * 500))
        self._xread_head = (b"XREAD", b"COUNT", b"%d" % READ_COUNT, b"BLOCK", b"%d" % block_ms)
        self._xread_timeout = block_ms / 1000 + session.timeout
        # The ID of the last entry read (None before the first connection:
        # then the stream's head), and the entries read but not delivered
        # yet (the next XREAD waits for them).
        self._last_id: bytes | None = None
        self._entries: deque[Any] = deque()
        self._relay_timer: Timer | None = None
        # Entries this server stored and has not read back yet, and how many
        # messages each: what Redis lost of them, if it loses its data.
        self._own: dict[bytes, int] = {}

    def got_head(self, head: Any) -> str | None:
        """The stream's last ID, at (re)connection: where a first reader
        starts, and whether Redis lost what this server read before. What is
        wrong with the answer, if anything."""
        if head is not None and type(head) is not bytes:
            return f"GET {self._head.decode()} answered {head!r}"
        head = head or _FIRST_ID
        if self._last_id is None:
            self._last_id = head
        elif self._last_id != head and _id_key(head) < _id_key(self._last_id):
            self._history_lost(head)
            self._last_id = head  # read on from what Redis has
        return None

    def stored(self, entry_id: bytes, messages: int) -> None:
        """This server stored an entry of `messages` SENDs: it counts as its
        own until read back."""
        if self._last_id is None or _id_key(entry_id) > _id_key(self._last_id):
            self._own[entry_id] = messages

    def read_more(self) -> None:
        """Ask for the entries after the last one read (Redis answers at
        once if there are some, else within half the timeout, with none)."""
        reader = self._session.reader
        if reader is None or self._entries or self._last_id is None:
            return
        command = encode_command(*self._xread_head, b"STREAMS", self._stream, self._last_id)
        reader.request(self._read, command, self._xread_timeout)

    def stop(self) -> None:
        """Redis is gone: entries read stay to be delivered, now; the next
        XREAD starts after them."""
        self.close()
        if self._entries:
            self._relay_entries(1 << 62)

    def close(self) -> None:
        if self._relay_timer is not None:
            self._relay_timer.cancel()
            self._relay_timer = None

    def _read(self, reply: Any) -> None:
        if reply is LOST:
            return
        if reply is None:  # nothing new within BLOCK
            self.read_more()
        elif isinstance(reply, ReplyError):
            self._session.fail(f"XREAD refused: {reply}")
        else:
            self._entries.extend(reply[0][1])
            self._relay_entries(RELAY_BYTES)

    def _relay_entries(self, limit: int) -> None:
        """Deliver read entries into this turn's batch, until it holds
        `limit` bytes; the rest in the next turns, then read on."""
        self._relay_timer = None
        entries = self._entries
        batch = self._batch
        relay = self._relay
        while entries and batch.size < limit:
            entry_id, fields = entries.popleft()
            if len(fields) != 4 or fields[0] != b"p" or fields[2] != b"m":
                log.debug("ignored a malformed entry %r", entry_id)
            else:
                if fields[1] != self._last_id:
                    self._gap(fields[1])
                relay(fields[3], entry_id)
            self._last_id = entry_id
        if entries:
            host = self._host
            self._relay_timer = host.call_at(host.now(), partial(self._relay_entries, RELAY_BYTES))
        else:
            self.read_more()

    def _gap(self, previous: bytes) -> None:
        """The entry after the last one read says another came before it."""
        last = self._last_id or _FIRST_ID
        if _id_key(previous) > _id_key(last):
            self._fell_behind(last)
        else:
            self._history_lost(previous)

    def _fell_behind(self, last: bytes) -> None:
        """The entries after `last` were trimmed away before this server read
        them: its members would miss them, so they are closed instead."""
        members = list(self._local.members)
        self._own.clear()  # trimmed too, if not read yet: never read back
        log.error(
            "this server fell behind the room: the messages after %s are no longer in "
            "Redis (it keeps the last %d turns); closing its %d members' connections",
            (last or _FIRST_ID).decode(),
            KEEP,
            len(members),
        )
        for member in members:
            self._names.release(member)
            self._local.drop_name(member)
            self._host.disconnect(member, "this server fell behind the room's history in Redis")

    def _history_lost(self, kept: bytes) -> None:
        """Redis has nothing after `kept` (b"0-0": nothing at all) of what it
        had stored: restarted without persistence, or flushed."""
        mine = sum(self._own.values())
        self._own.clear()
        log.error(
            "Redis lost the room's messages after %s (restarted without persistence?); "
            "this server had read up to %s: whatever was stored after that and not read "
            "yet is lost for every server, %d messages accepted by this server among them",
            kept.decode(),
            (self._last_id or _FIRST_ID).decode(),
            mine,
        )

    def _relay(self, payload: bytes, entry_id: bytes) -> None:
        """One stored turn, "<server>:<id>,<id>,...\\n" and a RECEIVE line
        per id: into this turn's batch, for every member but its senders."""
        newline = payload.find(b"\n")
        body = payload[newline + 1 :]
        # The stream is the cluster's own; still, only whole RECEIVE lines
        # may ever reach a client.
        if newline < 0 or not body.startswith(b"RECEIVE ") or not body.endswith(b"\n"):
            log.debug("ignored a malformed entry %r", entry_id)
            return
        tag = self._names.server_tag
        batch = self._batch
        if not payload.startswith(tag):
            batch.add_foreign(body)  # from another server: one piece
            return
        self._own.pop(entry_id, None)
        ids = payload[len(tag) : newline].split(b",")
        lines = body.split(b"\n")
        lines.pop()  # the empty rest after the last "\n"
        if len(ids) != len(lines):
            log.debug("ignored a malformed entry %r", entry_id)
            return
        member = self._names.member
        for conn_id, line in zip(ids, lines, strict=True):
            sender = member(conn_id)
            if sender is None:  # gone meanwhile
                batch.add_foreign(line + b"\n")
            else:
                batch.publish(sender, line + b"\n")


class RedisRoom:
    """A room shared through Redis (room.Room): names are leases in Redis,
    messages an entry per turn in its stream. The names of this server's own
    members are kept, as in one server, in the LocalRoom it wraps; the rest
    is its four parts'."""

    def __init__(
        self,
        host: Host,
        redis: RedisAddress,
        family: int,
        address: Any,
        *,
        room: str,
        lease_ms: int,
        timeout: float,
    ) -> None:
        keys = RoomKeys.of(room)
        self._local = LocalRoom(host)
        self.batch = self._local.batch
        self._session = Session(
            host,
            redis,
            family,
            address,
            timeout=timeout,
            setup=[(b"SCRIPT", b"LOAD", script) for script in SCRIPTS],
            opening=(b"GET", keys.head),
            opened=self._opened,
            up=self._up,
            down=self._down,
        )
        self._names = NameLeases(host, self._local, self._session, keys, lease_ms=lease_ms)
        self._reader = StreamReader(host, self._local, self._session, self._names, keys)
        self._writer = StreamWriter(host, self._session, self._names, self._reader, keys)
        self.publish: Callable[[Member, bytes], None] = self._writer.publish
        log.info("cluster mode: room %r on Redis at %s", room, redis)
        self._session.connect()

    @property
    def available(self) -> bool:
        """Both links up: USERNAME and SEND work."""
        return self._session.available

    # --- room.Room -------------------------------------------------------------

    @property
    def members(self) -> Collection[Member]:
        return self._local.members

    def turn_size(self) -> int:
        # Published bytes count against the turn's budget as batched ones
        # do in one server: a turn stops processing once it has produced
        # chat.BATCH_BYTES.
        return self.batch.size + self._writer.published

    def set_name(self, member: Member, command: SetName) -> None:
        self._names.set_name(member, command)

    def leave(self, member: Member) -> None:
        self._names.leave(member)

    def end_turn(self) -> None:
        """Store what the turn published, and send what it queued for Redis,
        in one go."""
        self._writer.end_turn()
        self._session.flush()

    def metrics(self) -> list[Metric]:
        return [
            gauge("chat_redis_up", "1 while Redis answers, else 0.", int(self.available)),
            counter(
                "chat_redis_outages_total",
                "Times Redis became unreachable.",
                self._session.outages,
            ),
        ]

    def close(self) -> None:
        """Server shutdown: no more timers; the links closed after one last
        try to send."""
        self._names.stop()
        self._reader.close()
        self._session.close()

    # --- the session's news ----------------------------------------------------

    def _opened(self, head: Any) -> str | None:
        return self._reader.got_head(head)

    def _up(self) -> None:
        self._reader.read_more()
        self._names.renew_all()

    def _down(self) -> None:
        # This turn's SENDs, not sent yet, are refused after the entries
        # already read are delivered.
        self._names.stop()
        self._reader.stop()
        self._writer.refuse_turn()
