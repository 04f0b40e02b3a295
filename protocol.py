"""The chat protocol without I/O: one line in, one command out, bytes back.

Everything here is a pure function of its arguments. The server (chat.py)
owns the sockets, the buffers and the room; this module only knows what a
line means and how the server's own lines are spelled. The texts and limits
are those of PROTOCOL.md, each defined once.

`parse_line` is total: for any bytes it returns exactly one command and never
raises, which test_protocol.py checks with Hypothesis. So is `receive`, which
takes telnet commands out of what a connection sent and splits the rest into
lines.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NamedTuple

from confusables_table import CONFUSABLES

# PROTOCOL.md, "Lines": the longest line, not counting its
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
# PROTOCOL.md, "Real networks".
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
    key: str  # NFKC, then casefold: name_key(name)
    skeleton: str  # what the name looks like: skeleton(name)
    key_skeleton: str  # what the key looks like: skeleton(key)


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
_MARK_CATEGORIES: Final = frozenset({"Mn", "Mc", "Me"})

# Default_Ignorable_Code_Point, from DerivedCoreProperties.txt of Unicode
# 14.0.0, the version of Python 3.11's unicodedata (unidata_version), which
# has no such property. Most are Cf, refused a row earlier; what this adds
# are the fillers and selectors that are letters or marks (U+115F, U+3164,
# U+034F, U+FE0F, ...) and unassigned code points reserved as ignorable.
# test_protocol.py checks the file's total (4174) and categories.
DEFAULT_IGNORABLE: Final = (
    (0x00AD, 0x00AD),  # Cf SOFT HYPHEN
    (0x034F, 0x034F),  # Mn COMBINING GRAPHEME JOINER
    (0x061C, 0x061C),  # Cf ARABIC LETTER MARK
    (0x115F, 0x1160),  # Lo HANGUL CHOSEONG FILLER..HANGUL JUNGSEONG FILLER
    (0x17B4, 0x17B5),  # Mn KHMER VOWEL INHERENT AQ..KHMER VOWEL INHERENT AA
    (0x180B, 0x180D),  # Mn MONGOLIAN FREE VARIATION SELECTOR ONE..THREE
    (0x180E, 0x180E),  # Cf MONGOLIAN VOWEL SEPARATOR
    (0x180F, 0x180F),  # Mn MONGOLIAN FREE VARIATION SELECTOR FOUR
    (0x200B, 0x200F),  # Cf ZERO WIDTH SPACE..RIGHT-TO-LEFT MARK
    (0x202A, 0x202E),  # Cf LEFT-TO-RIGHT EMBEDDING..RIGHT-TO-LEFT OVERRIDE
    (0x2060, 0x2064),  # Cf WORD JOINER..INVISIBLE PLUS
    (0x2065, 0x2065),  # Cn <reserved-2065>
    (0x2066, 0x206F),  # Cf LEFT-TO-RIGHT ISOLATE..NOMINAL DIGIT SHAPES
    (0x3164, 0x3164),  # Lo HANGUL FILLER
    (0xFE00, 0xFE0F),  # Mn VARIATION SELECTOR-1..VARIATION SELECTOR-16
    (0xFEFF, 0xFEFF),  # Cf ZERO WIDTH NO-BREAK SPACE
    (0xFFA0, 0xFFA0),  # Lo HALFWIDTH HANGUL FILLER
    (0xFFF0, 0xFFF8),  # Cn <reserved-FFF0>..<reserved-FFF8>
    (0x1BCA0, 0x1BCA3),  # Cf SHORTHAND FORMAT LETTER OVERLAP..SHORTHAND FORMAT UP STEP
    (0x1D173, 0x1D17A),  # Cf MUSICAL SYMBOL BEGIN BEAM..MUSICAL SYMBOL END PHRASE
    (0xE0000, 0xE0000),  # Cn <reserved-E0000>
    (0xE0001, 0xE0001),  # Cf LANGUAGE TAG
    (0xE0002, 0xE001F),  # Cn <reserved-E0002>..<reserved-E001F>
    (0xE0020, 0xE007F),  # Cf TAG SPACE..CANCEL TAG
    (0xE0080, 0xE00FF),  # Cn <reserved-E0080>..<reserved-E00FF>
    (0xE0100, 0xE01EF),  # Mn VARIATION SELECTOR-17..VARIATION SELECTOR-256
    (0xE01F0, 0xE0FFF),  # Cn <reserved-E01F0>..<reserved-E0FFF>
)
# PROTOCOL.md's characters that show nothing: those, and U+2800 BRAILLE
# PATTERN BLANK (a symbol, So, that renders as a blank cell).
_INVISIBLE: Final = re.compile(
    "[" + "".join(f"\\U{low:08x}-\\U{high:08x}" for low, high in DEFAULT_IGNORABLE) + "\u2800]"
)

# confusables.txt keyed by code point, as str.translate wants it, with an
# entry for every ASCII character too: str.translate pays for each miss with
# a KeyError, and names are mostly ASCII (this halves skeleton's time).
_PROTOTYPES: Final = {point: chr(point) for point in range(128)} | {
    ord(source): target for source, target in CONFUSABLES.items()
}


def name_key(name: str) -> str:
    """The form in which two names are compared: `Teixe` == `ＴＥＩＸＥ`."""
    return unicodedata.normalize("NFKC", name).casefold()


def skeleton(text: str) -> str:
    """What `text` looks like (UTS #39, section 4): NFD, each character
    replaced by its confusables.txt prototype, NFD again."""
    if text.isascii():
        # NFD leaves ASCII unchanged, and the prototypes of ASCII characters
        # too (they hold only ASCII, "º" and "₀"); test_protocol.py checks.
        return text.translate(_PROTOTYPES)
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", text).translate(_PROTOTYPES))


def same_name(a: SetName, b: SetName) -> bool:
    """Whether PROTOCOL.md counts `a` and `b` as one name: equal keys, or
    equal skeletons of the names as typed, or of their keys."""
    return a.key == b.key or a.skeleton == b.skeleton or a.key_skeleton == b.key_skeleton


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
    # ASCII holds no default-ignorable (the first is U+00AD), no U+2800 and
    # no mark, so the common name skips both look-ups.
    if not name.isascii() and (
        _INVISIBLE.search(name) or unicodedata.category(name[0]) in _MARK_CATEGORIES
    ):
        return Reply(NAME_INVALID)
    if len(name) > MAX_NAME_CHARS:
        return Reply(NAME_TOO_LONG)
    key = name_key(name)
    return SetName(name, key, skeleton(name), skeleton(key))


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


# Telnet (RFC 854), as PROTOCOL.md's "Telnet" has it. IAC is 0xFF,
# which UTF-8 never uses, so a netcat user can never send one by accident.
IAC: Final = 0xFF
_DONT: Final = 0xFE
_DO: Final = 0xFD
_WONT: Final = 0xFC
_WILL: Final = 0xFB
_SB: Final = 0xFA  # subnegotiation begins
_AO: Final = 0xF5  # abort output
_IP: Final = 0xF4  # interrupt process: what telnet sends for Ctrl-C
_SE: Final = 0xF0  # subnegotiation ends
_TIMING_MARK: Final = 6  # RFC 860; telnet sends IAC DO TIMING-MARK after IAC IP
_WILL_TIMING_MARK: Final = bytes((IAC, _WILL, _TIMING_MARK))
# Bit `option` of TelnetState.refused stands for DO option, and bit
# _WILL_BITS + option for WILL option (an option is one byte, 0-255).
_WILL_BITS: Final = 256

# TelnetState.pending: the part of a command received so far. Inside a
# subnegotiation only the state is kept, never its bytes.
_AFTER_IAC: Final = bytes((IAC,))
_AFTER_VERB: Final = {verb: bytes((IAC, verb)) for verb in (_DO, _DONT, _WILL, _WONT)}
_IN_SB: Final = bytes((IAC, _SB))
_IN_SB_AFTER_IAC: Final = bytes((IAC, _SB, IAC))


# Once the commands are out, framing is split_lines' own, byte for byte, as
# for netcat. Telnet's Enter is CR LF (RFC 854's end of line; every option
# refused keeps the client in its line-by-line default, which sends CR LF).
# CR NUL is RFC 854's bare carriage return, which ends no line: it stays
# data, as from netcat, and a line holding it is refused (a control
# character) by the command rules. PROTOCOL.md drops one "\r" before "\n",
# nothing more.


@dataclass(frozen=True, slots=True)
class TelnetState:
    """What `receive` keeps between reads for a connection that sent IAC.

    Never the default value: `receive` returns None instead, as for a
    connection that never sent IAC, so an idle connection keeps nothing.
    """

    pending: bytes = b""  # an unfinished command: IAC, IAC + verb, in IAC SB (+ IAC)
    refused: int = 0  # bit set: (verb, option) already refused, see _WILL_BITS


class Received(NamedTuple):
    """What `receive` made of one read, and the state to hand it next time.

    `replies` are telnet's answers, not lines of the protocol. chat.py sends
    them at once, ahead of the answers to `lines`: after Ctrl-C, telnet then
    shows those answers too rather than discarding them (RFC 860 would let
    a server flush them; nobody is served by losing an error line).
    """

    lines: list[bytes]  # complete lines, as split_lines gives them
    partial: bytes  # as split_lines
    discarding: bool  # as split_lines
    telnet: TelnetState | None  # None: nothing to remember (always, without IAC)
    replies: bytes  # telnet answers to send back; b"" unless the client sent IAC


def receive(
    data: bytes,
    partial: bytes = b"",
    discarding: bool = False,
    telnet: TelnetState | None = None,
) -> Received:
    """Take telnet commands out of newly received `data`, split the rest into
    lines, and say what to answer; the other arguments are what the previous
    call returned (the defaults for a new connection).

    The result does not depend on how the stream was cut into reads. Input
    without 0xFF from a connection that never sent one is only split_lines.
    """
    if telnet is None and b"\xff" not in data:
        lines, partial, discarding = split_lines(data, partial, discarding)
        return Received(lines, partial, discarding, None, b"")
    if telnet is not None and not telnet.pending and b"\xff" not in data:
        lines, partial, discarding = split_lines(data, partial, discarding)
        return Received(lines, partial, discarding, telnet, b"")
    return _receive_telnet(data, partial, discarding, telnet)


def _receive_telnet(
    data: bytes, partial: bytes, discarding: bool, telnet: TelnetState | None
) -> Received:
    pending, refused = (b"", 0) if telnet is None else (telnet.pending, telnet.refused)
    lines: list[bytes] = []
    text: list[bytes] = []  # the bytes between commands, since the last IP or AO
    replies = bytearray()
    index, end = 0, len(data)
    while index < end:
        if not pending or pending == _IN_SB:
            # Text, or a subnegotiation's bytes: skip to the next IAC at C speed.
            found = data.find(b"\xff", index)
            stop = end if found < 0 else found
            if not pending:
                text.append(data[index:stop])
            if found < 0:
                break
            pending = _IN_SB_AFTER_IAC if pending else _AFTER_IAC
            index = found + 1
            continue
        byte = data[index]
        index += 1
        if pending == _IN_SB_AFTER_IAC:
            # Only IAC SE ends it; IAC IAC is an escaped 0xFF, and PROTOCOL.md
            # skips "whatever bytes" are inside, so any other pair is skipped too.
            pending = b"" if byte == _SE else _IN_SB
        elif pending == _AFTER_IAC:
            pending = _AFTER_VERB.get(byte, b"")
            if byte == _SB:
                pending = _IN_SB
            elif byte in (_IP, _AO):
                # Drop the unfinished line: split what came before the command,
                # then forget the tail. If that tail had grown past what
                # split_lines holds, it was answered as too long first, as
                # always; a line being discarded for its length ends here
                # too. Either way the next byte starts a fresh line.
                lines += split_lines(b"".join(text), partial, discarding).lines
                text.clear()
                partial, discarding = b"", False
            # Anything else after IAC (NOP, AYT, EC, EL, GA, BRK, DM, IAC
            # itself, or a byte no RFC defines) is a whole two-byte command:
            # dropped, the byte included.
        else:
            # IAC verb option. The option byte may be 0xFF too (EXOPL, RFC 861).
            verb = pending[1]
            pending = b""
            if verb == _DO and byte == _TIMING_MARK:
                replies += _WILL_TIMING_MARK
            elif verb in (_DO, _WILL):
                bit = 1 << (byte if verb == _DO else _WILL_BITS + byte)
                if not refused & bit:
                    refused |= bit
                    replies += bytes((IAC, _WONT if verb == _DO else _DONT, byte))
            # DONT and WONT ask for what is already so: no answer (RFC 854).
    lines_after, partial, discarding = split_lines(b"".join(text), partial, discarding)
    lines += lines_after
    if telnet is None or (pending, refused) != (telnet.pending, telnet.refused):
        telnet = TelnetState(pending, refused) if pending or refused else None
    return Received(lines, partial, discarding, telnet, bytes(replies))


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
