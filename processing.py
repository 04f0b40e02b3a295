"""Step 4 of a turn: the round's lines, each through protocol.parse_line,
to the room, at most at the send rate.

`Processor.process_round` takes the connections with lines to process in
the `Schedule`'s round order, up to LINES_PER_TURN lines each, until the
turn's batch holds what one turn may send (`Writer.turn_bytes`): the
rest wait for the next turn, in the same order. An accepted SEND from a
member goes to `room.publish` (the common case first, and the only one
on the hot path); a valid USERNAME to `room.set_name`; every other line
is answered where it stands. A connection the room holds (its USERNAME,
or in cluster mode its SEND, awaits Redis) stops there: its later lines
wait, and `resume` puts it back in the round.

`FloodControl` is --send-rate and --send-burst: a SEND line without a
token (flood.py's bucket) stops its connection there; it is neither read
nor processed until the timer of its next token (fakelag).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Final

import flood
import protocol
from connection import LINES_PER_TURN, Close, Connection, Schedule
from host import Member
from metrics import Stats
from output import Writer
from protocol import BadSend, Blank, Reply, Send, SetName
from room import Room
from timers import Timers

log = logging.getLogger("chat")

# What parse_line makes of a SEND line: each takes a token (--send-rate).
SEND_LINES: Final = frozenset({Send, BadSend})


class FloodControl:
    """Flood control (--send-rate, --send-burst) for the loop: the bucket's
    terms, one for every connection, and a connection's wait for a token,
    from the SEND line that found none to the timer that brings it; the
    wait itself the `Schedule` keeps, like a hold. Nothing is refused or
    answered for it: the sender is slowed (fakelag)."""

    def __init__(
        self, schedule: Schedule, timers: Timers, stats: Stats, rate: float, burst: int | None
    ) -> None:
        self._schedule = schedule
        self._timers = timers
        self._stats = stats
        self._rate = rate
        self._burst = burst  # None: the default, 10 x rate
        # None: off, and the loop asks nothing more of a line.
        self.terms = flood.send_rate(rate, burst)

    def apply(self, rate: float | None, burst: int | None) -> None:
        """A new rate or burst (None: unchanged), for every connection from
        its next SEND on: its bucket is one due time, the terms the
        server's. One waiting for a token looks again at once (with the
        rate off, it goes on)."""
        if rate is None and burst is None:
            return
        self._rate = self._rate if rate is None else rate
        self._burst = self._burst if burst is None else burst
        self.terms = flood.send_rate(self._rate, self._burst)
        for conn in self._schedule.throttled():
            self.token_due(conn)

    def take_token(self, conn: Connection) -> bool:
        """A token for `conn`'s SEND line, accepted or not; False if it has
        none: then it and its lines behind wait, not read meanwhile."""
        terms = self.terms
        if terms is None:
            return True
        next_token = flood.take(conn.next_token, self._timers.turn_time, terms)
        if next_token is not None:
            conn.next_token = next_token
            return True
        if self._schedule.throttle(conn, conn.next_token, partial(self.token_due, conn)):
            log.info(
                "%r sends faster than --send-rate: its input waits for its tokens "
                "(logged once per connection)",
                conn,
            )
        return False

    def token_due(self, conn: Connection) -> None:
        """Timer: `conn`'s next token is due: read and processed again."""
        schedule = self._schedule
        self._stats.throttled_seconds += schedule.unthrottle(conn)
        schedule.watch(conn)
        schedule.has_lines(conn)
        if conn.kind.holds_input(conn):
            schedule.holds_input(conn)  # was not read while it waited


class Processor:
    """Step 4 of a turn (see the module's docstring). `room` is set once
    the room is built (it needs the reactor that owns this)."""

    def __init__(
        self,
        schedule: Schedule,
        writer: Writer,
        stats: Stats,
        reply: Callable[[Member, bytes], None],
        named: Callable[[Connection], None],
        close: Close,
        flood_control: FloodControl,
    ) -> None:
        self.room: Room | None = None
        self._flood = flood_control
        self._schedule = schedule
        self._writer = writer
        self._stats = stats
        self._reply = reply
        self._named = named
        self._close = close

    def process_round(self) -> None:
        """Step 4: the round's connections, each up to LINES_PER_TURN lines,
        until the turn holds `Writer.turn_bytes`."""
        schedule = self._schedule
        room = self.room
        assert room is not None, "no room to process lines for"
        for conn in schedule.round():
            if room.turn_size() >= self._writer.turn_bytes:
                break  # the rest wait for the next turn, in the same order
            if not schedule.take_turn(conn) or conn.closed:
                continue
            try:
                self._process_lines(conn, room)
            except Exception:
                # A bug, not an input: protocol.parse_line never raises. Lose
                # this one client, not the room.
                log.exception("%r: internal error while processing its input", conn)
                self._close(conn, "internal_error", "")
                continue
            if schedule.is_held(conn) or schedule.is_throttled(conn):
                continue  # `resume` puts it back in line, or its token (FloodControl)
            if conn.backlog():
                schedule.has_lines(conn)  # to the back of the round
            elif conn.at_eof and not schedule.closing(conn):
                schedule.close_later(conn, conn.kind.end_reason(conn))

    def _process_lines(self, conn: Connection, room: Room) -> None:
        lines = conn.lines
        if lines is None:
            return
        start = conn.next_line
        end = min(len(lines), start + LINES_PER_TURN)
        parse_line = protocol.parse_line
        publish = room.publish
        is_held, limited = self._schedule.is_held, self._flood.terms is not None
        published = 0
        room_left = self._writer.turn_bytes - room.turn_size()
        for index in range(start, end):
            command = parse_line(lines[index])
            if limited and type(command) in SEND_LINES and not self._flood.take_token(conn):
                end = index  # it waits for a token, and its lines behind it
                break
            # The common case first: a valid message from a member.
            if type(command) is Send and conn.name is not None:
                # protocol.format_receive, with the name part made once.
                publish(conn, conn.receive_prefix + command.message + b"\n")
                published += 1
                room_left -= len(command.message)
                if room_left <= 0:  # the turn is full: the rest next turn
                    end = index + 1
                    break
                continue
            if is_held(conn):
                # Held by the room after a SEND (cluster mode: until Redis
                # stores it): later SENDs join it, anything else waits, so
                # an answer to that SEND comes in its place. Checked here,
                # off the path of a SEND, so it costs one server nothing.
                end = index
                break
            match command:
                case Blank():
                    pass
                case Reply(line):
                    self._reply(conn, line)
                case SetName():
                    room.set_name(conn, command)
                    if is_held(conn):  # held by the room: the rest waits with it
                        end = index + 1
                        break
                    self._named(conn)
                case Send():
                    self._reply(conn, protocol.NAME_REQUIRED)
                case BadSend(line):
                    self._reply(conn, line if conn.name is not None else protocol.NAME_REQUIRED)
        self._stats.messages += published
        if end == len(lines):
            conn.lines = None
            conn.next_line = 0
        else:
            conn.next_line = end
