"""Step 4 of a turn: the round's lines, each through protocol.parse_line,
to the room.

`Processor.process_round` takes the connections with lines to process in
the `Schedule`'s round order, up to LINES_PER_TURN lines each, until the
turn's batch holds what one turn may send (`Writer.turn_bytes`): the
rest wait for the next turn, in the same order. An accepted SEND from a
member goes to `room.publish` (the common case first, and the only one
on the hot path); a valid USERNAME to `room.set_name`; every other line
is answered where it stands. A connection the room holds (its USERNAME,
or in cluster mode its SEND, awaits Redis) stops there: its later lines
wait, and `resume` puts it back in the round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import protocol
from connection import LINES_PER_TURN, Close, Connection, Schedule
from host import Member
from metrics import Stats
from output import Writer
from protocol import BadSend, Blank, Reply, Send, SetName
from room import Room

log = logging.getLogger("chat")


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
    ) -> None:
        self.room: Room | None = None
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
            if schedule.is_held(conn):
                continue  # for the room's answer; `resume` puts it back in line
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
        is_held = self._schedule.is_held
        published = 0
        room_left = self._writer.turn_bytes - room.turn_size()
        for index in range(start, end):
            command = parse_line(lines[index])
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
