"""The chat protocol without I/O: one line in, one command out, bytes back.

Everything here is a pure function of its arguments. The server (chat.py)
owns the sockets, the buffers and the room; this module only knows what a
line means and how the server's own lines are spelled. The texts and limits
are those of PROTOCOL.md, each defined once.

`parse_line` is total: for any bytes it returns exactly one command and never
raises, which test_protocol.py checks with Hypothesis.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NamedTuple

# PROTOCOL.md, "Transport and framing": the longest line, not counting its
# "\r\n" or "\n". Longer lines are answered once with LINE_TOO_LONG.
MAX_LINE_BYTES: Final = 4096
# PROTOCOL.md, "USERNAME": counted in code points, not bytes.
MAX_NAME_CHARS: Final = 32


def format_error(text: str) -> bytes:
    """The line the server sends for an error: ``ERROR <text>\\n``."""
    return b"ERROR " + text.encode() + b"\n"


def receive_prefix(name: str) -> bytes:
    """What every RECEIVE line from `name` starts with. The server makes it
    once per name, not once per message."""
    return b"RECEIVE " + name.encode() + b" "


def format_receive(name: str, message: bytes) -> bytes:
    """The line every other member gets for an accepted SEND; `message` is
    relayed byte for byte."""
    return receive_prefix(name) + message + b"\n"


# Every error line of the contract, spelled exactly as in PROTOCOL.md.
LINE_TOO_LONG: Final = format_error("Line too long.")
NAME_EMPTY: Final = format_error("Username cannot be empty.")
NAME_INVALID: Final = format_error("Username contains invalid characters.")
NAME_HAS_SPACES: Final = format_error("Username contains empty spaces.")
NAME_TOO_LONG: Final = format_error("Username is too long.")
NAME_TAKEN: Final = format_error("Username already in use.")
NAME_REQUIRED: Final = format_error("You must set a username first.")
MESSAGE_EMPTY: Final = format_error("Message cannot be empty.")
MESSAGE_INVALID: Final = format_error("Message contains invalid characters.")
UNRECOGNISED: Final = format_error("Unrecognised command.")
SERVER_FULL: Final = format_error("Server is full.")
# PROTOCOL.md, "Real networks (v2)".
TOO_MANY_FROM_ADDRESS: Final = format_error("Too many connections from your address.")
TIMED_OUT_WAITING: Final = format_error("Timed out waiting for USERNAME.")
# Cluster mode only: the server cannot reach Redis just now.
SERVICE_UNAVAILABLE: Final = format_error("Service unavailable.")


@dataclass(frozen=True, slots=True)
class Blank:
    """An empty line: ignored, no reply."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A line whose answer does not depend on any state: just send `line`."""

    line: bytes


@dataclass(frozen=True, slots=True)
class SetName:
    """A valid USERNAME; only its uniqueness is left for the room to check."""

    name: str  # as the user typed it: this is what others see
    key: str  # what uniqueness compares: NFKC, then casefold


@dataclass(frozen=True, slots=True)
class Send:
    """A SEND whose message is valid, to relay if the sender has a name."""

    message: bytes


@dataclass(frozen=True, slots=True)
class BadSend:
    """A SEND whose message must be refused with `line`.

    It stays a SEND because a connection without a name is told that first,
    whatever its message.
    """

    line: bytes


Command = Blank | Reply | SetName | Send | BadSend

BLANK: Final = Blank()
_UNRECOGNISED_REPLY: Final = Reply(UNRECOGNISED)
_LINE_TOO_LONG_REPLY: Final = Reply(LINE_TOO_LONG)

# Python's re documents \s in str patterns as Unicode whitespace, and CPython
# implements it with the same predicate as str.isspace(); test_protocol.py
# checks the two agree on every code point.
_WHITESPACE: Final = re.compile(r"\s")
# Unicode category Cc is exactly U+0000-U+001F and U+007F-U+009F (C0, DEL,
# C1); TAB (U+0009) is the one control a message may hold.
_MESSAGE_CONTROL: Final = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_NAME_REFUSED_CATEGORIES: Final = frozenset({"Cc", "Cf"})


def name_key(name: str) -> str:
    """The form in which two names are compared: `Teixe` == `ＴＥＩＸＥ`."""
    return unicodedata.normalize("NFKC", name).casefold()


def check_name(raw: bytes) -> SetName | Reply:
    """Validate a USERNAME argument in the contract's order of checks."""
    if not raw:
        return Reply(NAME_EMPTY)
    try:
        name = raw.decode()
    except UnicodeDecodeError:
        return Reply(NAME_INVALID)
    if _WHITESPACE.search(name):
        return Reply(NAME_HAS_SPACES)
    # isprintable() is False for every Cc and Cf character (and for some
    # others), so the per-character look-up runs only on unusual names.
    if not name.isprintable() and any(
        unicodedata.category(char) in _NAME_REFUSED_CATEGORIES for char in name
    ):
        return Reply(NAME_INVALID)
    if len(name) > MAX_NAME_CHARS:
        return Reply(NAME_TOO_LONG)
    return SetName(name, name_key(name))


def check_message(raw: bytes) -> Send | BadSend:
    """Validate a SEND argument in the contract's order of checks."""
    if not raw:
        return BadSend(MESSAGE_EMPTY)
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return BadSend(MESSAGE_INVALID)
    if text.isspace():
        return BadSend(MESSAGE_EMPTY)
    if _MESSAGE_CONTROL.search(text):
        return BadSend(MESSAGE_INVALID)
    return Send(raw)


class LineSplit(NamedTuple):
    """What `split_lines` found, and the state to hand it next time."""

    lines: list[bytes]  # complete lines, terminators removed, in order
    partial: bytes  # the unterminated tail, at most MAX_LINE_BYTES + 1 bytes
    discarding: bool  # True while skipping an over-long line up to its "\n"


def split_lines(data: bytes, partial: bytes = b"", discarding: bool = False) -> LineSplit:
    """Split newly received `data` into lines, given the previous call's
    `partial` and `discarding`.

    Only `data` is searched for "\n", so a stream costs time linear in its
    length however it is chunked. One "\r" before each "\n" is dropped. A
    line that outgrows MAX_LINE_BYTES before its "\n" arrives is reported
    once, as a line of MAX_LINE_BYTES + 1 bytes that `parse_line` answers
    with LINE_TOO_LONG; the rest of it is dropped as it arrives, so no more
    than MAX_LINE_BYTES + 1 bytes of it are ever held.
    """
    if discarding:
        end = data.find(b"\n")
        if end < 0:
            return LineSplit([], b"", True)
        data = data[end + 1 :]
    lines = data.split(b"\n")
    tail = lines.pop()
    if partial:
        if lines:
            lines[0] = partial + lines[0]
        else:
            tail = partial + tail
    if b"\r" in data or partial.endswith(b"\r"):
        lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    # A tail of MAX_LINE_BYTES + 1 may still be a valid line whose last byte
    # is the "\r" of a "\r\n" split across packets; one more byte cannot.
    if len(tail) > MAX_LINE_BYTES + 1:
        lines.append(tail[: MAX_LINE_BYTES + 1])
        return LineSplit(lines, b"", True)
    return LineSplit(lines, tail, False)


_PARSERS: Final[dict[bytes, Callable[[bytes], Command]]] = {
    b"USERNAME": check_name,
    b"SEND": check_message,
}


def parse_line(line: bytes) -> Command:
    """Turn one line (its "\\n" and the "\\r" before it already removed) into
    a command. Never raises."""
    if not line:
        return BLANK
    if len(line) > MAX_LINE_BYTES:
        return _LINE_TOO_LONG_REPLY
    verb, _, argument = line.partition(b" ")
    parser = _PARSERS.get(verb)
    if parser is None:
        return _UNRECOGNISED_REPLY
    return parser(argument)
