"""Property tests for protocol.py, the sans-I/O half of the chat server.

PROTOCOL.md is the oracle. Every error line below is typed again from the
contract rather than imported from protocol.py, so a typo in a constant
fails here instead of being compared with itself.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from itertools import pairwise
from typing import Final

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import protocol
from protocol import (
    BadSend,
    Blank,
    Command,
    Reply,
    Send,
    SetName,
    format_receive,
    parse_line,
    split_lines,
)

# --- The contract's lines and limits, typed from PROTOCOL.md ---------------

LINE_TOO_LONG = b"ERROR Line too long.\n"
NAME_EMPTY = b"ERROR Username cannot be empty.\n"
NAME_INVALID = b"ERROR Username contains invalid characters.\n"
NAME_HAS_SPACES = b"ERROR Username contains empty spaces.\n"
NAME_TOO_LONG = b"ERROR Username is too long.\n"
NAME_TAKEN = b"ERROR Username already in use.\n"
NAME_REQUIRED = b"ERROR You must set a username first.\n"
MESSAGE_EMPTY = b"ERROR Message cannot be empty.\n"
MESSAGE_INVALID = b"ERROR Message contains invalid characters.\n"
UNRECOGNISED = b"ERROR Unrecognised command.\n"
SERVER_FULL = b"ERROR Server is full.\n"

# The replies parse_line can give on its own: the others (name taken, no
# name yet, server full) depend on the room, which parse_line never sees.
STATELESS_REPLIES = frozenset(
    {LINE_TOO_LONG, NAME_EMPTY, NAME_INVALID, NAME_HAS_SPACES, NAME_TOO_LONG, UNRECOGNISED}
)
SEND_REPLIES = frozenset({MESSAGE_EMPTY, MESSAGE_INVALID})

MAX_LINE = 4096  # bytes, not counting "\r\n" or "\n"
MAX_NAME = 32  # code points

# str.isspace() is true exactly for Unicode category Zs and the bidi classes
# WS, B and S, all of which lie in these categories; the exhaustive test
# below checks that, so the whitespace strategy can reach every such
# character without filtering all of Unicode.
WHITESPACE_CATEGORIES: Final = ("Zs", "Zl", "Zp", "Cc")

# --- Strategies -----------------------------------------------------------

whitespace_chars = st.characters(categories=WHITESPACE_CATEGORIES).filter(str.isspace)

# Cc/Cf characters that are not also whitespace, so that a name holding one
# fails on the control/format row and not on the earlier whitespace row.
control_or_format_chars = st.characters(categories=("Cc", "Cf")).filter(
    lambda char: not char.isspace()
)

# A message may hold TAB but no other Cc; anything else can be whitespace.
message_control_chars = st.characters(categories=["Cc"], exclude_characters="\t")

# Characters a name may hold: no whitespace (Zs/Zl/Zp; the rest of
# isspace() is Cc), no Cc/Cf, no surrogates (not encodable in UTF-8).
name_chars = st.characters(codec="utf-8", exclude_categories=("Cc", "Cf", "Cs", "Zs", "Zl", "Zp"))

# Byte sequences that are invalid UTF-8 wherever they are put: a lead byte
# that never starts a sequence, an overlong form, a surrogate, a code point
# past U+10FFFF, or a stray continuation byte (none of the others leaves a
# sequence open for it to complete).
INVALID_UTF8 = (
    b"\xff",
    b"\xfe",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\x80",
)
invalid_utf8 = st.sampled_from(INVALID_UTF8)

valid_names = st.text(name_chars, min_size=1, max_size=MAX_NAME)

# Pieces that scripts and emoji need, among them format characters (Cf).
MESSAGE_FRAGMENTS = ("\t", " ", "\u200d", "\u200b", "\ufeff", "\u00ad", "👩\u200d💻", "é", "中")
message_texts = (
    st.lists(
        st.one_of(
            st.characters(codec="utf-8", exclude_categories=["Cc"]),
            st.sampled_from(MESSAGE_FRAGMENTS),
        ),
        min_size=1,
        max_size=40,
    )
    .map("".join)
    .filter(lambda text: not text.isspace())
)
valid_messages = message_texts.map(str.encode)

# Bytes that matter to framing and decoding, and runs around the line limit.
FRAMING_TOKENS = (b"\r", b"\n", b"\r\n", b"a", b"\x00", b"\xff", b" ", b"SEND x")
long_runs = st.builds(
    lambda length, fill: fill * length,
    st.integers(MAX_LINE - 2, MAX_LINE + 3),
    st.sampled_from([b"x", b"\r"]),
)
# A whole line around the limit, with each way of ending it (or none yet).
lines_near_limit = st.builds(
    lambda length, end: b"\n" + b"x" * length + end,
    st.sampled_from([MAX_LINE, MAX_LINE + 1, MAX_LINE - 1, MAX_LINE + 2]),
    st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\r\n", b""]),
)
stream_segments = st.one_of(
    st.sampled_from(FRAMING_TOKENS),
    st.sampled_from(FRAMING_TOKENS),  # twice: mostly small, sometimes long
    st.binary(max_size=8),
    long_runs,
    lines_near_limit,
)
streams = st.lists(stream_segments, max_size=16).map(b"".join)


@st.composite
def chunked_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A stream and one way of cutting it into chunks (empty ones too).

    Random cut points rarely land on a given byte, so sometimes every "\\r"
    is cut off from what follows it: that is what splits "\\r\\n" across two
    reads.
    """
    stream = draw(streams)
    cuts = set(draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    if draw(st.booleans()):
        cuts.update(index + 1 for index, byte in enumerate(stream) if byte == ord("\r"))
    bounds = [0, *sorted(cuts), len(stream)]
    chunks = [stream[start:end] for start, end in pairwise(bounds)]
    return stream, chunks


@st.composite
def near_miss_verbs(draw: st.DrawFn) -> bytes:
    """A verb that looks like USERNAME or SEND but is not exactly either."""
    verb = bytearray(draw(st.sampled_from([b"USERNAME", b"SEND"])))
    flips = draw(st.lists(st.integers(0, len(verb) - 1), max_size=3))
    for index in flips:
        verb[index] = ord(bytes([verb[index]]).swapcase())
    junk = st.binary(max_size=3).filter(lambda part: b" " not in part)
    return draw(junk) + bytes(verb) + draw(junk)


any_lines = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda verb, rest: verb + rest,
        st.sampled_from([b"USERNAME", b"USERNAME ", b"SEND", b"SEND ", b"send "]),
        st.binary(max_size=64),
    ),
    st.builds(
        lambda head, fill, length: head + fill * length,
        st.sampled_from([b"", b"SEND ", b"USERNAME "]),
        st.sampled_from([b"x", b"\xff", b"\r", b"\x00", b" "]),
        st.integers(MAX_LINE - 12, MAX_LINE + 100),
    ),
)


# --- parse_line: totality and the error lines ------------------------------


@given(any_lines)
@example(b"")
@example(b"\r")
@example(b"\x00")
@example(b"\xff" * 10_000)
@example(b"SEND " + b"\xff")
@example(b"USERNAME \xed\xa0\x80")
@example(b"SEND " + b"x" * (MAX_LINE - 5))
@example(b"SEND " + b"x" * (MAX_LINE - 4))
def test_parse_line_is_total(line: bytes) -> None:
    """Any bytes, however long or broken, yield exactly one command."""
    command = parse_line(line)
    assert isinstance(command, Blank | Reply | SetName | Send | BadSend)


@given(any_lines)
@example(b"PING")
@example(b"USERNAME")
@example(b"SEND")
@example(b"SEND \x1b")
@example(b"USERNAME a b")
@example(b"USERNAME " + b"x" * (MAX_NAME + 1))
def test_every_error_line_is_a_contract_line(line: bytes) -> None:
    """Nothing outside the contract ever goes back to a client."""
    command = parse_line(line)
    if isinstance(command, Reply):
        assert command.line in STATELESS_REPLIES
    if isinstance(command, BadSend):
        assert command.line in SEND_REPLIES
    if isinstance(command, Reply | BadSend):
        assert command.line.count(b"\n") == 1
        assert command.line.endswith(b"\n")


@pytest.mark.parametrize(
    ("constant", "line"),
    [
        (protocol.LINE_TOO_LONG, LINE_TOO_LONG),
        (protocol.NAME_EMPTY, NAME_EMPTY),
        (protocol.NAME_INVALID, NAME_INVALID),
        (protocol.NAME_HAS_SPACES, NAME_HAS_SPACES),
        (protocol.NAME_TOO_LONG, NAME_TOO_LONG),
        (protocol.NAME_TAKEN, NAME_TAKEN),
        (protocol.NAME_REQUIRED, NAME_REQUIRED),
        (protocol.MESSAGE_EMPTY, MESSAGE_EMPTY),
        (protocol.MESSAGE_INVALID, MESSAGE_INVALID),
        (protocol.UNRECOGNISED, UNRECOGNISED),
        (protocol.SERVER_FULL, SERVER_FULL),
    ],
)
def test_error_constants_are_spelled_as_in_the_contract(constant: bytes, line: bytes) -> None:
    """chat.py sends the room-dependent errors itself from these constants,
    so they are checked too, not only the ones parse_line returns."""
    assert constant == line


# --- Commands -------------------------------------------------------------


@given(near_miss_verbs(), st.binary(max_size=32))
@example(b"send", b"hi")
@example(b"SENDhi", b"")
@example(b"USERNAMEx", b"y")
@example(b"SEND\thi", b"")
@example(b"", b"SEND hi")
@example(b"Username", b"bob")
def test_verb_is_text_before_first_space_and_case_sensitive(verb: bytes, rest: bytes) -> None:
    """Only the exact verbs are commands; a lookalike is unrecognised
    whatever follows it."""
    line = verb + b" " + rest if rest else verb
    if verb in (b"USERNAME", b"SEND"):
        return  # the flips and junk happened to rebuild a real verb
    assert parse_line(line) == Reply(UNRECOGNISED)


@given(st.binary(min_size=1, max_size=MAX_LINE))
@example(b"\xff\xfe\x00\r")
@example(b"PING")
def test_random_bytes_are_unrecognised(line: bytes) -> None:
    """A line whose first word is not a verb is unrecognised (unless it is
    too long, which it cannot be here)."""
    if line.partition(b" ")[0] in (b"USERNAME", b"SEND"):
        return  # not random enough: covered by the USERNAME and SEND tests
    assert parse_line(line) == Reply(UNRECOGNISED)


@pytest.mark.parametrize(
    ("line", "command"),
    [
        (b"", Blank()),
        (b"USERNAME", Reply(NAME_EMPTY)),
        (b"USERNAME ", Reply(NAME_EMPTY)),
        (b"SEND", BadSend(MESSAGE_EMPTY)),
        (b"SEND ", BadSend(MESSAGE_EMPTY)),
    ],
)
def test_missing_argument(line: bytes, command: Command) -> None:
    """With no space the argument is empty, as it is after a lone space."""
    assert parse_line(line) == command


# --- USERNAME -------------------------------------------------------------


@dataclass(frozen=True)
class NameCase:
    """A USERNAME argument built to fail a chosen set of rows at once."""

    raw: bytes
    invalid_utf8: bool
    whitespace: bool
    control: bool
    too_long: bool


@st.composite
def name_cases(draw: st.DrawFn) -> NameCase:
    invalid = draw(st.booleans())
    whitespace = draw(st.booleans())
    control = draw(st.booleans())
    too_long = draw(st.booleans())
    pieces: list[str | bytes] = []
    if invalid:
        pieces += draw(st.lists(invalid_utf8, min_size=1, max_size=3))
    if whitespace:
        pieces += draw(st.lists(whitespace_chars, min_size=1, max_size=3))
    if control:
        pieces += draw(st.lists(control_or_format_chars, min_size=1, max_size=3))
    special_chars = sum(isinstance(piece, str) for piece in pieces)
    if too_long:
        fillers = draw(st.integers(max(0, MAX_NAME + 1 - special_chars), MAX_NAME + 8))
    else:
        fillers = draw(st.integers(0, MAX_NAME - special_chars))
    pieces += draw(st.lists(name_chars, min_size=fillers, max_size=fillers))
    ordered = draw(st.permutations(pieces))
    raw = b"".join(piece.encode() if isinstance(piece, str) else piece for piece in ordered)
    return NameCase(raw, invalid, whitespace, control, too_long)


@given(name_cases())
@example(NameCase(b"", False, False, False, False))
@example(NameCase(b"\xff \x1b" + b"x" * 40, True, True, True, True))
@example(NameCase("a\u00a0\u200b".encode() + b"y" * 40, False, True, True, True))
@example(NameCase("\u200b".encode() + b"y" * 40, False, False, True, True))
@example(NameCase(b"\x1c", False, True, False, False))
def test_username_first_failing_row_wins(case: NameCase) -> None:
    """PROTOCOL.md lists the USERNAME checks in order; a name failing
    several gets the reply of the first."""
    if case.invalid_utf8:  # the generator's promise, checked
        with pytest.raises(UnicodeDecodeError):
            case.raw.decode()
    if not case.raw:
        expected: Command = Reply(NAME_EMPTY)
    elif case.invalid_utf8:
        expected = Reply(NAME_INVALID)
    elif case.whitespace:
        expected = Reply(NAME_HAS_SPACES)
    elif case.control:
        expected = Reply(NAME_INVALID)
    elif case.too_long:
        expected = Reply(NAME_TOO_LONG)
    else:
        name = case.raw.decode()
        expected = SetName(name, unicodedata.normalize("NFKC", name).casefold())
    assert parse_line(b"USERNAME " + case.raw) == expected


@given(valid_names, whitespace_chars, st.integers(0, MAX_NAME))
@example("bob", "\u00a0", 3)
@example("bob", "\u3000", 0)
@example("bob", "\u2028", 1)
@example("bob", "\x1c", 1)
@example("bob", "\x85", 1)
@example("bob", "\t", 1)
def test_username_with_any_whitespace_has_empty_spaces(
    name: str, space: str, position: int
) -> None:
    """Whitespace is whatever str.isspace() says, not only ASCII space;
    \\x1c and \\x85 are Cc as well, but the whitespace row comes first."""
    spaced = name[:position] + space + name[position:]
    assert parse_line(b"USERNAME " + spaced.encode()) == Reply(NAME_HAS_SPACES)


@given(valid_names, control_or_format_chars, st.integers(0, MAX_NAME))
@example("bob", "\x1b", 0)
@example("bob", "\u200b", 1)
@example("bob", "\ufeff", 3)
@example("bob", "\u200d", 2)
@example("bob", "\x00", 1)
@example("bob", "\x7f", 1)
def test_username_with_control_or_format_is_invalid(name: str, char: str, position: int) -> None:
    """Cc and Cf characters (escapes, zero-width ones) are refused in names,
    where they would let one user pass for another."""
    marked = name[:position] + char + name[position:]
    assert parse_line(b"USERNAME " + marked.encode()) == Reply(NAME_INVALID)


@given(valid_names)
@example("x" * MAX_NAME)
@example("é" * MAX_NAME)
@example("😀" * MAX_NAME)
@example("ＴＥＩＸＥ")
@example("Teixe")
@example("ß")
def test_valid_username_is_set_as_typed(name: str) -> None:
    """The displayed name is exactly what was typed; uniqueness compares
    the NFKC-normalised, casefolded form."""
    key = unicodedata.normalize("NFKC", name).casefold()
    assert parse_line(b"USERNAME " + name.encode()) == SetName(name, key)


@pytest.mark.parametrize("char", ["x", "é", "中", "😀"])
def test_username_length_counts_code_points(char: str) -> None:
    """32 code points are fine and 33 are too long, however many bytes
    each takes."""
    assert parse_line(b"USERNAME " + (char * MAX_NAME).encode()) == SetName(
        char * MAX_NAME, unicodedata.normalize("NFKC", char * MAX_NAME).casefold()
    )
    assert parse_line(b"USERNAME " + (char * (MAX_NAME + 1)).encode()) == Reply(NAME_TOO_LONG)


def test_fullwidth_and_case_variants_share_a_key() -> None:
    """The contract's own example: Teixe, TEIXE and ｔｅｉｘｅ are one name."""
    keys = set()
    for name in ("Teixe", "TEIXE", "ｔｅｉｘｅ"):
        command = parse_line(b"USERNAME " + name.encode())
        assert isinstance(command, SetName)
        assert command.name == name
        keys.add(command.key)
    assert keys == {"teixe"}


# --- Whitespace and control regexes, on every code point -------------------


ALL_CODE_POINTS = range(0x110000)


def test_whitespace_regex_agrees_with_isspace_everywhere() -> None:
    """protocol._WHITESPACE relies on re's \\s and str.isspace() sharing one
    predicate in CPython; check it rather than trust it."""
    everything = "".join(map(chr, ALL_CODE_POINTS))
    by_regex = {match.start() for match in protocol._WHITESPACE.finditer(everything)}
    by_isspace = {index for index, char in enumerate(everything) if char.isspace()}
    assert by_regex == by_isspace
    # The whitespace strategy above draws only from these categories.
    assert {unicodedata.category(chr(index)) for index in by_isspace} <= set(WHITESPACE_CATEGORIES)


def test_message_control_regex_is_exactly_cc_without_tab() -> None:
    """Messages refuse Cc except TAB; the regex hard-codes the Cc ranges."""
    everything = "".join(map(chr, ALL_CODE_POINTS))
    by_regex = {match.start() for match in protocol._MESSAGE_CONTROL.finditer(everything)}
    cc = {index for index, char in enumerate(everything) if unicodedata.category(char) == "Cc"}
    assert by_regex == cc - {ord("\t")}


# --- SEND -----------------------------------------------------------------


@given(st.text(whitespace_chars, max_size=8))
@example("")
@example(" ")
@example("\t")
@example("\x1c")
@example("\x85")
@example("\u3000\u2028")
def test_blank_message_is_empty(text: str) -> None:
    """Nothing or only whitespace is empty, even a character (\\x1c, \\x85)
    that is also a control: the empty row comes first."""
    assert parse_line(b"SEND " + text.encode()) == BadSend(MESSAGE_EMPTY)


@given(st.text(max_size=8), invalid_utf8, st.text(max_size=8))
@example(" ", b"\xff", "")
@example("", b"\x80", "\t")
@example("hi ", b"\xed\xa0\x80", " there")
def test_message_with_invalid_utf8_is_invalid(before: str, bad: bytes, after: str) -> None:
    """Invalid UTF-8 is refused, even around whitespace only: such a message
    is not 'valid UTF-8 for which isspace() is true'."""
    raw = before.encode("utf-8", "surrogatepass") + bad + after.encode("utf-8", "surrogatepass")
    assert parse_line(b"SEND " + raw) == BadSend(MESSAGE_INVALID)


@given(st.text(max_size=8), message_control_chars, st.text(max_size=8))
@example("", "\x1b", "[31mred")
@example("a", "\r", "b")
@example("", "\x00", "")
@example("hi", "\x7f", "")
@example("", "\x85", "x")
@example("x", "\x1c", "")
@example("\t", "\x9b", "2J")
def test_message_with_control_is_invalid(before: str, control: str, after: str) -> None:
    """A control character other than TAB is refused, so that no client can
    put escape sequences on another user's terminal."""
    text = before + control + after
    if text.isspace():
        return  # e.g. "\x1c" alone: empty, covered by test_blank_message_is_empty
    raw = text.encode("utf-8", "surrogatepass")
    assert parse_line(b"SEND " + raw) == BadSend(MESSAGE_INVALID)


@given(valid_messages)
@example(b"hi")
@example(b"  leading spaces")
@example(b"a\tb")
@example(b"\thi")
@example("👩\u200d💻".encode())
@example("\u200d".encode())
@example("\ufeff hi".encode())
@example(b"x " * 10)
def test_valid_message_is_relayed_byte_for_byte(message: bytes) -> None:
    """TAB, spaces anywhere and format characters (ZWJ inside emoji) are
    allowed, and the argument is kept exactly as sent."""
    assert parse_line(b"SEND " + message) == Send(message)


# --- RECEIVE --------------------------------------------------------------


@given(valid_names, valid_messages)
@example("bob", b"  hi\tthere ")
@example("ｔｅｉｘｅ", "👩\u200d💻 ok".encode())
def test_receive_line_round_trips(name: str, message: bytes) -> None:
    """What SetName and Send accept comes out as one clean RECEIVE line,
    from which a client recovers both parts by splitting on spaces."""
    assert parse_line(b"USERNAME " + name.encode()) == SetName(
        name, unicodedata.normalize("NFKC", name).casefold()
    )
    assert parse_line(b"SEND " + message) == Send(message)

    line = format_receive(name, message)
    assert line == b"RECEIVE " + name.encode() + b" " + message + b"\n"

    verb, _, rest = line[:-1].partition(b" ")
    got_name, _, got_message = rest.partition(b" ")
    assert verb == b"RECEIVE"
    assert got_name.decode() == name
    assert got_message == message

    text = line.decode()
    assert text.count("\n") == 1
    assert text.endswith("\n")
    assert [char for char in text[:-1] if unicodedata.category(char) == "Cc" and char != "\t"] == []


# --- Line length ----------------------------------------------------------


@given(
    st.sampled_from([b"", b"SEND ", b"USERNAME ", b"USERNAME", b"PING "]),
    st.sampled_from([b"x", b" ", b"\xff", b"\x00"]),
    st.integers(MAX_LINE + 1, MAX_LINE + 200),
)
@example(b"SEND ", b"x", MAX_LINE + 1)
@example(b"USERNAME ", b"x", MAX_LINE + 1)
def test_over_long_line_is_too_long(head: bytes, fill: bytes, length: int) -> None:
    """Length is checked before the command: an over-long SEND or USERNAME
    gets 'Line too long.', not its own errors."""
    line = (head + fill * length)[:length]
    assert len(line) == length
    assert parse_line(line) == Reply(LINE_TOO_LONG)


@given(st.integers(1, MAX_LINE - len(b"SEND ")))
@example(MAX_LINE - len(b"SEND "))
def test_line_up_to_limit_is_processed(length: int) -> None:
    """4096 bytes is still a line: `SEND ` + 4091 x's is a message."""
    assert parse_line(b"SEND " + b"x" * length) == Send(b"x" * length)


def test_name_line_of_exactly_limit_is_judged_by_name_rules() -> None:
    """At exactly 4096 bytes the USERNAME row applies, not the line limit."""
    line = b"USERNAME " + b"x" * (MAX_LINE - len(b"USERNAME "))
    assert len(line) == MAX_LINE
    assert parse_line(line) == Reply(NAME_TOO_LONG)


# --- split_lines: framing -------------------------------------------------


@dataclass(frozen=True)
class Framed:
    """Everything split_lines produced over a stream, and its final state."""

    lines: list[bytes]
    partial: bytes
    discarding: bool


def feed(chunks: list[bytes]) -> Framed:
    """Hand the chunks to split_lines one at a time, as the server does,
    checking the memory bound after every call."""
    lines: list[bytes] = []
    partial, discarding = b"", False
    for chunk in chunks:
        split = split_lines(chunk, partial, discarding)
        lines += split.lines
        partial, discarding = split.partial, split.discarding
        assert len(partial) <= MAX_LINE + 1
        if discarding:
            assert partial == b""
    return Framed(lines, partial, discarding)


def normalised(lines: list[bytes]) -> list[bytes | None]:
    """An over-long line may come whole or cut short, depending on when its
    "\\n" arrives; what counts is that it is there, once (None)."""
    return [line if len(line) <= MAX_LINE else None for line in lines]


def reference_lines(stream: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The framing rules written plainly over the whole stream: each "\\n"
    ends a line, one "\\r" before it is dropped. Returns (raw segment, line)
    pairs and the unterminated rest."""
    found = []
    start = 0
    while (end := stream.find(b"\n", start)) >= 0:
        segment = stream[start:end]
        found.append((segment, segment[:-1] if segment.endswith(b"\r") else segment))
        start = end + 1
    return found, stream[start:]


def surely_too_long(rest: bytes) -> bool:
    """Whether an unterminated line is over-long whatever follows: 4097
    bytes might still be 4096 + the "\\r" of a "\\r\\n"."""
    return len(rest) > MAX_LINE + 1 or (len(rest) == MAX_LINE + 1 and not rest.endswith(b"\r"))


LIMIT_LINE = b"x" * MAX_LINE


@given(chunked_streams())
@example((b"a\r\r\n", [b"a\r", b"\r\n"]))
@example((LIMIT_LINE + b"\r\n", [LIMIT_LINE + b"\r", b"\n"]))
@example((LIMIT_LINE + b"x\r\nok\n", [LIMIT_LINE, b"x\r", b"\nok\n"]))
@example((b"x" * 9000 + b"\nok\r\n", [b"x" * 5000, b"x" * 4000 + b"\n", b"ok\r\n"]))
@example((LIMIT_LINE + b"\r\r\nok\n", [LIMIT_LINE + b"\r", b"\r", b"\nok\n"]))
@example((LIMIT_LINE + b"x", [LIMIT_LINE, b"x"]))
@example((LIMIT_LINE + b"\r", [LIMIT_LINE, b"\r"]))
@settings(max_examples=40)
def test_split_lines_matches_reference_model(case: tuple[bytes, list[bytes]]) -> None:
    """Under any chunking, split_lines gives the model's lines; each
    over-long line appears once, as a prefix of itself longer than 4096
    bytes, and the lines after it are intact."""
    stream, chunks = case
    got = feed(chunks)
    expected, rest = reference_lines(stream)

    assert all(b"\n" not in line for line in got.lines)
    complete = got.lines[: len(expected)]
    assert len(complete) == len(expected)
    for got_line, (segment, line) in zip(complete, expected, strict=True):
        if len(line) <= MAX_LINE:
            assert got_line == line
        else:
            assert len(got_line) > MAX_LINE
            assert segment.startswith(got_line)
            assert parse_line(got_line) == Reply(LINE_TOO_LONG)

    # The unterminated rest is either held as it is, or, once it cannot
    # be a valid line any more, reported as over-long and dropped.
    early = got.lines[len(expected) :]
    if early:
        assert surely_too_long(rest)
        assert len(early) == 1
        assert len(early[0]) > MAX_LINE
        assert rest.startswith(early[0])
        assert parse_line(early[0]) == Reply(LINE_TOO_LONG)
        assert (got.partial, got.discarding) == (b"", True)
    else:
        assert (got.partial, got.discarding) == (rest, False)


@given(chunked_streams())
@example((LIMIT_LINE + b"\r\n", [LIMIT_LINE + b"\r", b"\n"]))
@example((b"x" * 5000 + b"\nok\n", [b"x" * 2500, b"x" * 2500 + b"\nok\n"]))
@settings(max_examples=25)
def test_split_lines_is_independent_of_chunking(case: tuple[bytes, list[bytes]]) -> None:
    """The whole stream at once, the given chunks and one byte at a time
    all give the same lines and the same final state."""
    stream, chunks = case
    whole = feed([stream])
    chunked = feed(chunks)
    bytewise = feed([stream[index : index + 1] for index in range(len(stream))])
    for framed in (chunked, bytewise):
        assert normalised(framed.lines) == normalised(whole.lines)
        assert (framed.partial, framed.discarding) == (whole.partial, whole.discarding)


@pytest.mark.parametrize(
    ("chunks", "lines", "partial"),
    [
        # Only one "\r" is dropped.
        ([b"a\r\r\n"], [b"a\r"], b""),
        ([b"a\r\r", b"\n"], [b"a\r"], b""),
        # A lone "\r" is data.
        ([b"a\rb\n"], [b"a\rb"], b""),
        ([b"a\r", b"b\n"], [b"a\rb"], b""),
        ([b"a\r"], [], b"a\r"),
        ([b"\r"], [], b"\r"),
        # Empty lines are lines (parse_line makes them Blank).
        ([b"\n\r\n"], [b"", b""], b""),
        ([b"\r", b"\n", b"\n"], [b"", b""], b""),
    ],
)
def test_carriage_returns(chunks: list[bytes], lines: list[bytes], partial: bytes) -> None:
    """One "\\r" right before "\\n" belongs to the terminator; any other
    "\\r" is part of the line."""
    assert feed(chunks) == Framed(lines, partial, False)


def test_limit_line_with_split_crlf_is_valid() -> None:
    """A 4096-byte line whose "\\r" and "\\n" arrive in separate reads is
    valid: the 4097-byte partial must not be taken for an over-long line."""
    first = split_lines(LIMIT_LINE + b"\r")
    assert first == protocol.LineSplit([], LIMIT_LINE + b"\r", False)
    second = split_lines(b"\nSEND hi\n", first.partial, first.discarding)
    assert second.lines == [LIMIT_LINE, b"SEND hi"]
    assert [parse_line(line) for line in second.lines] == [Reply(UNRECOGNISED), Send(b"hi")]


@given(st.integers(1, 40_000), st.integers(1, 5000))
@example(MAX_LINE + 2, 1)
@example(100_000, 4097)
@settings(max_examples=20)
def test_over_long_line_is_reported_once_and_memory_stays_bounded(
    excess: int, chunk_size: int
) -> None:
    """However an over-long line is cut, it is answered once, nothing of it
    is held past 4097 bytes, and the next line arrives intact."""
    stream = b"x" * (MAX_LINE + excess) + b"\r\nSEND after\n"
    chunks = [stream[start : start + chunk_size] for start in range(0, len(stream), chunk_size)]
    got = feed(chunks)
    assert [parse_line(line) for line in got.lines] == [Reply(LINE_TOO_LONG), Send(b"after")]
    assert (got.partial, got.discarding) == (b"", False)
