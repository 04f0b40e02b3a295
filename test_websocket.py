"""Tests for websocket.py, the WebSocket frames without I/O.

RFC 6455 and PROTOCOL.md's "People in a web browser" are the oracle, and
wsproto is the independent implementation: what it writes as a client the
codec reads, and what the codec writes wsproto reads. Frames it would never
write (unmasked, reserved bits, odd lengths) are spelled by `frame` below,
which masks byte by byte rather than as the codec does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import pairwise
from typing import Final

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Pong, TextMessage
from wsproto.events import Event as WsprotoEvent
from wsproto.events import Ping as WsprotoPing
from wsproto.events import Pong as WsprotoPong

import websocket
from websocket import Close, Event, Failure, FrameReader, Message, Ping

MIB: Final = 1024 * 1024  # PROTOCOL.md: a message longer than 1 MiB closes (1009)
MASK: Final = b"\x37\xfa\x21\x3d"
# RFC 6455's opcodes, typed again here.
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length_bytes: int | None = None,
    declared: int | None = None,
    mask: bytes = MASK,
) -> bytes:
    """A client frame spelled by hand: `length_bytes` 0, 2 or 8 forces a
    length encoding (None: the shortest), `declared` a length that is not
    the payload's."""
    length = len(payload) if declared is None else declared
    if length_bytes is None:
        length_bytes = 0 if length < 126 else 2 if length < 65536 else 8
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    mask_bit = 0x80 if masked else 0
    if length_bytes == 0:
        head = bytes((first, mask_bit | length))
    else:
        marker = 126 if length_bytes == 2 else 127
        head = bytes((first, mask_bit | marker)) + length.to_bytes(length_bytes, "big")
    if not masked:
        return head + payload
    return head + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


def read(data: bytes, cuts: list[int] | None = None) -> list[Event]:
    """What a new FrameReader makes of `data`, given whole or cut at `cuts`."""
    reader = FrameReader()
    if cuts is None:
        return reader.receive(data)
    events: list[Event] = []
    for start, end in pairwise([0, *sorted(cuts), len(data)]):
        events += reader.receive(data[start:end])
    return events


def read_bytewise(data: bytes) -> list[Event]:
    return read(data, list(range(len(data))))


# --- What wsproto writes as a client, and the events it stands for ----------


@dataclass(frozen=True)
class Written:
    data: bytes
    events: list[Event]


control_payloads = st.binary(max_size=125)
closes = st.one_of(
    st.none(),
    st.tuples(
        st.sampled_from([1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4999]),
        st.text(max_size=30),
    ),
)


@st.composite
def client_streams(draw: st.DrawFn) -> Written:
    """Messages (fragmented, with pings and pongs between their fragments),
    lone pings and pongs, and maybe a close, as wsproto sends them."""
    client = Connection(ConnectionType.CLIENT)
    data = bytearray()
    events: list[Event] = []

    def control() -> None:
        payload = draw(control_payloads)
        if draw(st.booleans()):
            data.extend(client.send(WsprotoPing(payload)))
            events.append(Ping(payload))
        else:
            data.extend(client.send(WsprotoPong(payload)))
            events.append(websocket.Pong(payload))

    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            control()
            continue
        text = draw(st.booleans())
        count = draw(st.integers(1, 4))
        whole = bytearray()
        for index in range(count):
            last = index == count - 1
            if text:
                chunk = draw(st.text(max_size=200))
                data.extend(client.send(TextMessage(chunk, message_finished=last)))
                whole.extend(chunk.encode())
            else:
                raw = draw(st.binary(max_size=200))
                data.extend(client.send(BytesMessage(raw, message_finished=last)))
                whole.extend(raw)
            for _ in range(0 if last else draw(st.integers(0, 2))):
                control()
        events.append(Message(bytes(whole), text))
    close = draw(closes)
    if close is not None:
        data.extend(client.send(CloseConnection(close[0], close[1])))
        events.append(Close(close[0], close[1]))
    return Written(bytes(data), events)


@given(client_streams())
def test_reads_what_wsproto_writes(written: Written) -> None:
    """Every message, fragment, ping, pong and close wsproto sends is read as it was meant."""
    assert read(written.data) == written.events


@given(client_streams(), st.binary(max_size=40), st.data())
def test_any_chunking_gives_the_same_events(
    written: Written, tail: bytes, data: st.DataObject
) -> None:
    """Cut anywhere, a stream (good, or ending in garbage) gives the same events."""
    stream = written.data + tail
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    assert read(stream, cuts) == read(stream)


@given(client_streams(), st.binary(max_size=40), st.data())
def test_a_reader_between_frames_is_as_good_as_a_new_one(
    written: Written, tail: bytes, data: st.DataObject
) -> None:
    """between_frames: wherever it says so, a new FrameReader in its place reads
    the rest the same (a server drops idle readers); never after the end."""
    stream = written.data + tail
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    reader = FrameReader()
    assert reader.between_frames
    events: list[Event] = []
    for start, end in pairwise([0, *cuts, len(stream)]):
        events += reader.receive(stream[start:end])
        if reader.between_frames:
            reader = FrameReader()
    assert events == read(stream)
    if events and isinstance(events[-1], (Close, Failure)):
        assert not reader.between_frames  # nothing more is read: kept


# Short frames as a busy client sends them, text that may not be UTF-8 among
# them, and pings: what receive_handled's fast path takes.
short_frames = st.lists(
    st.tuples(
        st.sampled_from([TEXT, BINARY, PING]),
        st.one_of(st.text(max_size=40).map(str.encode), st.binary(max_size=125)),
        st.binary(min_size=4, max_size=4),
    ),
    max_size=12,
).map(lambda frames: b"".join(frame(op, payload, mask=mask) for op, payload, mask in frames))


@given(
    st.one_of(short_frames, client_streams().map(lambda written: written.data)),
    st.binary(max_size=40),
    st.data(),
)
def test_receive_handled_is_handle_of_receive(
    stream_head: bytes, tail: bytes, data: st.DataObject
) -> None:
    """receive_handled (the server's fast path) gives, read by read, the same
    lines, replies and end as handle(receive(...)), however the stream is cut,
    invalid UTF-8 and garbage included."""
    stream = stream_head + tail
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    fast, slow = FrameReader(), FrameReader()
    for start, end in pairwise([0, *cuts, len(stream)]):
        chunk = stream[start:end]
        assert fast.receive_handled(chunk) == websocket.handle(slow.receive(chunk))


def test_receive_handled_stops_at_text_that_is_not_utf8() -> None:
    """receive_handled: in a run of short messages, text that is not UTF-8
    ends the reading (1007) after the lines before it, as handle(receive())."""
    stream = frame(TEXT, b"ok") + frame(TEXT, b"\xff") + frame(TEXT, b"late")
    handled = FrameReader().receive_handled(stream)
    assert handled == websocket.handle(FrameReader().receive(stream))
    assert handled.data == b"ok\n"
    assert handled.end == Failure(websocket.INVALID_DATA, "text message not UTF-8")


def test_receive_handled_agrees_however_a_stream_is_cut_once_or_twice() -> None:
    """receive_handled against handle(receive()), the stream cut once
    anywhere, and twice (the second cut every 7 bytes after the first):
    short frames of each kind, the longest short one, a 16-bit one, a ping,
    a fragmented message with a ping inside, and frames cut by the read's
    edge."""
    stream = b"".join(
        [
            frame(TEXT, b"a"),
            frame(BINARY, b"b"),
            frame(TEXT, b""),
            frame(TEXT, b"x" * 125),
            frame(TEXT, b"y" * 126),
            frame(PING, b"p"),
            frame(TEXT, b"frag", fin=False),
            frame(PING, b""),
            frame(CONTINUATION, b"ment"),
            frame(TEXT, "caf\u00e9".encode()),
            frame(TEXT, b"c"),
        ]
    )
    expected = websocket.handle(FrameReader().receive(stream))
    assert (
        expected.data
        == b"a\nb\n\n" + b"x" * 125 + b"\n" + b"y" * 126 + "\nfragment\ncaf\u00e9\nc\n".encode()
    )
    for first in range(len(stream) + 1):
        for second in [first, *range(first, len(stream) + 1, 7)]:
            fast, slow = FrameReader(), FrameReader()
            for start, end in pairwise([0, first, second, len(stream)]):
                chunk = stream[start:end]
                assert fast.receive_handled(chunk) == websocket.handle(slow.receive(chunk)), (
                    first,
                    second,
                )


@pytest.mark.parametrize(
    "payloads",
    [
        [b"ends in zero\x00", b"next"],
        [b"\x00" * 6, b"", b"\x00" * 13],
        [b"", b"\x00", b"\x00\x00"],
        [b"caf\xc3\xa9", b"\x00\x00\x00\x00\x00\x00x"],
    ],
)
def test_receive_handled_keeps_zero_bytes(payloads: list[bytes]) -> None:
    """receive_handled, with a mask of zero bytes: payloads of zero bytes,
    at either end or six in a row, come out whole, each a line."""
    stream = b"".join(frame(BINARY, payload, mask=bytes(4)) for payload in payloads)
    handled = FrameReader().receive_handled(stream)
    assert handled == websocket.handle(FrameReader().receive(stream))
    assert handled.data == b"".join(payload + b"\n" for payload in payloads)


@pytest.mark.parametrize(
    "long_frame",
    [
        frame(TEXT, b"x" * 125),
        frame(TEXT, b"y" * 126),
        frame(TEXT, b"z" * 127),
        frame(TEXT, b"w" * 300),
        frame(TEXT, b"short, in 16 bits", length_bytes=2),
        frame(TEXT, b"short, in 64 bits", length_bytes=8),
    ],
)
def test_receive_handled_reads_longer_frames_between_short_ones(long_frame: bytes) -> None:
    """receive_handled: a frame of 125 bytes is the longest its fast path
    takes; one with a 16- or 64-bit length, between short ones, is read
    whole the long way, and the short ones after it the fast way again."""
    stream = frame(TEXT, b"before") + long_frame + frame(TEXT, b"after")
    handled = FrameReader().receive_handled(stream)
    assert handled == websocket.handle(FrameReader().receive(stream))
    assert handled.data.startswith(b"before\n")
    assert handled.data.endswith(b"\nafter\n")
    assert handled.data.count(b"\n") == 3


@pytest.mark.parametrize(
    "bad_frame",
    [
        frame(TEXT, b"unmasked", masked=False),
        frame(TEXT, b"u" * 126, masked=False),
        frame(TEXT, b"v" * 70_000, masked=False),
        frame(TEXT, b"reserved bit", rsv=4),
        frame(0x3, b"unknown opcode"),
    ],
)
def test_receive_handled_fails_on_a_bad_frame_after_short_ones(bad_frame: bytes) -> None:
    """receive_handled: a frame its fast path must not take (unmasked, in
    any length encoding; a reserved bit; an unknown opcode) ends the
    reading as receive does, after the lines before it."""
    stream = frame(TEXT, b"before") + bad_frame + frame(TEXT, b"never")
    handled = FrameReader().receive_handled(stream)
    assert handled == websocket.handle(FrameReader().receive(stream))
    assert handled.data == b"before\n"
    assert isinstance(handled.end, Failure)
    assert handled.end.code == websocket.PROTOCOL_ERROR


def test_between_frames_is_false_inside_a_frame_and_a_message() -> None:
    """between_frames: false with half a header, half a payload, or a message's
    first fragment read; true again once the message is whole."""
    reader = FrameReader()
    whole = frame(websocket.TEXT, b"hello")
    reader.receive(whole[:1])
    assert not reader.between_frames
    reader.receive(whole[1:8])
    assert not reader.between_frames
    reader.receive(whole[8:])
    assert reader.between_frames
    reader.receive(frame(websocket.TEXT, b"frag", fin=False))
    assert not reader.between_frames
    assert reader.receive(frame(websocket.CONTINUATION, b"ment")) == [Message(b"fragment", True)]
    assert reader.between_frames


@pytest.mark.parametrize("mask", [MASK, b"\x81\x85\x82\x00", b"\x82\xff\x81\x81"])
def test_every_cut_of_short_messages_gives_the_same_events(mask: bytes) -> None:
    """Cut once anywhere, even where a mask byte looks like a frame start, the events agree."""
    stream = b"".join(
        frame(opcode, payload, mask=mask)
        for opcode, payload in [(TEXT, b"hi"), (BINARY, b"\x81\x81"), (TEXT, b""), (PING, b"p")]
    )
    expected = [Message(b"hi", True), Message(b"\x81\x81", False), Message(b"", True), Ping(b"p")]
    for cut in range(len(stream) + 1):
        assert read(stream, [cut]) == expected, cut


@given(client_streams())
def test_one_byte_at_a_time_gives_the_same_events(written: Written) -> None:
    """Fed one byte per read, wsproto's frames still give their events."""
    assert read_bytewise(written.data) == written.events


@given(st.binary(max_size=300), st.data())
def test_any_bytes_are_events_and_nothing_follows_the_end(
    garbage: bytes, data: st.DataObject
) -> None:
    """Random bytes never raise; a Close or Failure is the last event ever."""
    reader = FrameReader()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(garbage)), max_size=6)))
    events: list[Event] = []
    for start, end in pairwise([0, *cuts, len(garbage)]):
        events += reader.receive(garbage[start:end])
    for event in events[:-1]:
        assert not isinstance(event, Close | Failure)
    if events and isinstance(events[-1], Close | Failure):
        assert reader.receive(frame(PING, b"after")) == []


# --- What the codec writes, read by wsproto as a client ---------------------


def wsproto_reads(data: bytes) -> list[WsprotoEvent]:
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(data)
    return list(client.events())


lines = st.lists(
    st.text(st.characters(codec="utf-8", exclude_characters="\n"), max_size=300).map(
        lambda text: text.encode() + b"\n"
    ),
    max_size=20,
)


@given(lines)
def test_frame_lines_is_one_text_message_per_line_for_wsproto(turn: list[bytes]) -> None:
    """wsproto reads frame_lines' output as the lines, each without its "\\n"."""
    events = wsproto_reads(websocket.frame_lines(turn))
    assert events == [
        TextMessage(line[:-1].decode(), frame_finished=True, message_finished=True) for line in turn
    ]


@given(lines)
def test_frame_offsets_cut_the_framed_turn_into_each_lines_frame(turn: list[bytes]) -> None:
    """frame_offsets: the framed turn cut at its offsets is each line framed
    alone, so a member's own copy is cut from the turn, never framed again."""
    framed = websocket.frame_lines(turn)
    offsets = websocket.frame_offsets(turn)
    assert len(offsets) == len(turn) + 1 and offsets[-1] == len(framed)
    for index, line in enumerate(turn):
        assert framed[offsets[index] : offsets[index + 1]] == websocket.frame_lines([line])


@pytest.mark.parametrize("size", [0, 1, 124, 125, 126, 127, 65535, 65536, 70000])
def test_frame_offsets_at_every_length_encoding(size: int) -> None:
    """frame_offsets: a line's frame ends where frame_lines ends it, at every
    length encoding's boundary."""
    turn = [b"x" * size + b"\n", b"ok\n"]
    assert websocket.frame_offsets(turn)[1] == len(websocket.frame_lines(turn[:1]))


@pytest.mark.parametrize("size", [0, 1, 124, 125, 126, 127, 65535, 65536, 70000])
def test_frame_lines_at_every_length_encoding(size: int) -> None:
    """Lines whose payload is at each length boundary are framed as RFC 6455 says."""
    line = b"x" * size + b"\n"
    framed = websocket.frame_lines([line, b"ok\n"])
    header = 2 if size < 126 else 4 if size < 65536 else 10
    assert framed[0] == 0x81
    assert framed[header : header + size] == b"x" * size
    assert framed[header + size :] == b"\x81\x02ok"
    assert wsproto_reads(framed) == [TextMessage("x" * size), TextMessage("ok")]


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_text_frame_header_at_the_length_boundaries(size: int, header: bytes) -> None:
    """text_frame uses the shortest length encoding, unmasked."""
    assert websocket.text_frame(b"y" * size) == header + b"y" * size


def test_frame_lines_of_nothing_is_nothing() -> None:
    """An empty turn frames to no bytes."""
    assert websocket.frame_lines([]) == b""


def test_frame_lines_frames_a_line_without_its_newline() -> None:
    """Byte for byte: two lines are two unmasked FIN text frames."""
    assert websocket.frame_lines([b"RECEIVE a hi\n", b"\n"]) == (
        b"\x81\x0cRECEIVE a hi" + b"\x81\x00"
    )


@given(
    st.sampled_from([1000, 1001, 1002, 1007, 1008, 1009, 1011, 4000]),
    st.text(max_size=200),
)
def test_close_frame_is_read_by_wsproto_and_fits_a_control_frame(code: int, reason: str) -> None:
    """close_frame's code and reason (cut at a character's edge to 123 bytes) reach wsproto."""
    data = websocket.close_frame(code, reason)
    assert len(data) <= 2 + 125
    [event] = wsproto_reads(data)
    assert isinstance(event, CloseConnection)
    assert event.code == code
    fits = ""
    for character in reason:
        if len((fits + character).encode()) > 123:
            break
        fits += character
    assert event.reason == fits


@pytest.mark.parametrize(
    ("reason", "kept"),
    [("x" * 200, "x" * 123), ("é" * 100, "é" * 61), ("x" + "€" * 41, "x" + "€" * 40)],
)
def test_close_frame_cuts_a_long_reason_at_a_characters_edge(reason: str, kept: str) -> None:
    """A reason past 123 bytes is cut to the characters that fit whole."""
    payload = b"\x03\xe8" + kept.encode()
    assert websocket.close_frame(1000, reason) == bytes((0x88, len(payload))) + payload


def test_control_frames_are_cut_to_125_bytes() -> None:
    """ping_frame and pong_frame send at most 125 bytes of their payload."""
    assert websocket.ping_frame(b"p" * 200) == b"\x89\x7d" + b"p" * 125
    assert websocket.pong_frame(b"p" * 200) == b"\x8a\x7d" + b"p" * 125


def test_close_frame_without_a_code_is_empty() -> None:
    """close_frame(None) is the empty close that answers a Close without a code."""
    assert websocket.close_frame(None) == b"\x88\x00"


@given(st.binary(max_size=200))
def test_ping_and_pong_frames_are_read_by_wsproto(payload: bytes) -> None:
    """ping_frame and pong_frame carry the payload, cut to 125 bytes."""
    [ping, pong] = wsproto_reads(websocket.ping_frame(payload) + websocket.pong_frame(payload))
    assert isinstance(ping, WsprotoPing)
    assert isinstance(pong, Pong)
    assert ping.payload == pong.payload == payload[:125]


# --- Edge cases, frame by frame ---------------------------------------------


def failure(code: int, data: bytes) -> None:
    """`data` read whole and byte by byte ends in a Failure with `code`."""
    for events in (read(data), read_bytewise(data)):
        assert isinstance(events[-1], Failure), events
        assert events[-1].code == code


@pytest.mark.parametrize(
    ("opcode", "expected"),
    [
        (TEXT, Message(b"hi", True)),
        (BINARY, Message(b"hi", False)),
        (CLOSE, Close(1000, "")),
        (PING, Ping(b"hi")),
        (PONG, websocket.Pong(b"hi")),
    ],
)
def test_every_known_opcode(opcode: int, expected: Event) -> None:
    """Text, binary, close, ping and pong frames give their events."""
    payload = b"\x03\xe8" if opcode == CLOSE else b"hi"
    assert read(frame(opcode, payload)) == [expected]


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcodes_fail_with_1002(opcode: int) -> None:
    """The reserved opcodes close the connection with 1002."""
    failure(1002, frame(opcode, b"hi"))


def test_continuation_without_a_message_fails_with_1002() -> None:
    """A continuation frame with no fragmented message open is 1002."""
    failure(1002, frame(CONTINUATION, b"hi"))


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_a_new_message_inside_a_fragmented_one_fails_with_1002(opcode: int) -> None:
    """A text or binary frame while a fragmented message is open is 1002."""
    failure(1002, frame(TEXT, b"a", fin=False) + frame(opcode, b"b"))


@pytest.mark.parametrize("rsv", [1, 2, 4])
def test_reserved_bits_fail_with_1002(rsv: int) -> None:
    """RSV1, RSV2 or RSV3 set (no extension is negotiated) is 1002."""
    failure(1002, frame(TEXT, b"hi", rsv=rsv))


@pytest.mark.parametrize("opcode", [TEXT, PING, CLOSE])
def test_unmasked_client_frames_fail_with_1002(opcode: int) -> None:
    """A client frame without a mask is 1002, known from its second byte."""
    failure(1002, frame(opcode, b"\x03\xe8", masked=False))
    assert isinstance(read(frame(opcode, b"\x03\xe8", masked=False)[:2])[0], Failure)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 100_000])
@pytest.mark.parametrize("length_bytes", [None, 2, 8])
def test_every_length_encoding(size: int, length_bytes: int | None) -> None:
    """Payloads at each boundary, in the shortest or a longer encoding, read whole."""
    if length_bytes == 2 and size >= 65536:
        return
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    data = frame(BINARY, payload, length_bytes=length_bytes)
    assert read(data) == [Message(payload, False)]
    assert read(data, list(range(0, len(data), 7))) == [Message(payload, False)]


def test_a_64_bit_length_with_its_top_bit_set_fails_with_1002() -> None:
    """RFC 6455 5.2: the most significant bit of a 64-bit length must be 0."""
    failure(1002, frame(BINARY, length_bytes=8, declared=1 << 63))


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
def test_control_frames_hold_at_most_125_bytes(opcode: int) -> None:
    """A control frame of 125 bytes is read; one of 126 is 1002 from its header alone."""
    payload = b"\x03\xe8" + b"r" * 123
    assert not isinstance(read(frame(opcode, payload))[0], Failure)
    too_long = frame(opcode, payload + b"r")
    failure(1002, too_long)
    assert isinstance(read(too_long[:2])[0], Failure)


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
def test_fragmented_control_frames_fail_with_1002(opcode: int) -> None:
    """A control frame without FIN is 1002."""
    failure(1002, frame(opcode, b"\x03\xe8", fin=False))


def test_control_frames_between_fragments_are_delivered() -> None:
    """Pings and pongs between a message's fragments come out, in order, before it."""
    data = (
        frame(TEXT, b"ab", fin=False)
        + frame(PING, b"1")
        + frame(CONTINUATION, b"cd", fin=False)
        + frame(PONG, b"2")
        + frame(PING, b"3")
        + frame(CONTINUATION, b"ef")
        + frame(BINARY, b"gh", fin=False)
        + frame(PING, b"4")
        + frame(CONTINUATION, b"")
    )
    expected = [
        Ping(b"1"),
        websocket.Pong(b"2"),
        Ping(b"3"),
        Message(b"abcdef", True),
        Ping(b"4"),
        Message(b"gh", False),
    ]
    assert read(data) == read_bytewise(data) == expected


def test_a_close_between_fragments_ends_the_reading() -> None:
    """A close inside a fragmented message is a Close; the message is never given."""
    data = frame(TEXT, b"ab", fin=False) + frame(CLOSE, b"\x03\xe8") + frame(CONTINUATION, b"c")
    assert read(data) == [Close(1000, "")]


def test_utf8_split_across_fragments_is_one_text_message() -> None:
    """A character whose bytes fall in two (or four) fragments is still valid text."""
    text = "é€𝄞".encode()
    for cut in range(len(text) + 1):
        data = frame(TEXT, text[:cut], fin=False) + frame(CONTINUATION, text[cut:])
        assert read(data) == [Message(text, True)]
    pieces = [frame(CONTINUATION, bytes([byte]), fin=False) for byte in text[1:]]
    data = frame(TEXT, text[:1], fin=False) + b"".join(pieces) + frame(CONTINUATION, b"")
    assert read_bytewise(data) == [Message(text, True)]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (b"\xce\xba\xf4", b"\x90\x80\x80"),  # past U+10FFFF, cut after its first byte
        (b"ok\xed", b"\xa0\x80"),  # a UTF-16 surrogate, cut after its first byte
        (b"ok\xe0", b"\x80\x80"),  # an overlong encoding
        (b"ok", b"\xff"),  # never in UTF-8
        (b"\xc3", b"("),  # a lead byte without its continuation
    ],
)
def test_invalid_utf8_across_fragments_fails_with_1007_at_once(first: bytes, second: bytes) -> None:
    """Invalid UTF-8 split across fragments is 1007 as soon as it is certain, before FIN."""
    data = frame(TEXT, first, fin=False) + frame(CONTINUATION, second, fin=False)
    failure(1007, data)
    for events in (read(data), read_bytewise(data)):
        assert events == [events[-1]]
    assert read(frame(TEXT, first, fin=False)) == []


def test_invalid_utf8_fails_before_its_frame_is_whole() -> None:
    """A bad sequence at the start of a long text frame is 1007 without waiting for the rest."""
    data = frame(TEXT, b"\xed\xa0\x80" + b"x" * 1000)
    [event] = read(data[: 2 + 2 + 4 + 2])
    assert event == Failure(1007, event.reason)  # type: ignore[union-attr]


# Unicode's well-formed UTF-8 byte sequences (The Unicode Standard, Table
# 3-7), and each one's proper prefixes: the oracle for "as soon as certain".
_CHARACTER = (
    rb"[\x00-\x7f]|[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]"
    rb"|[\xe1-\xec\xee\xef][\x80-\xbf]{2}|\xed[\x80-\x9f][\x80-\xbf]"
    rb"|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}|\xf4[\x80-\x8f][\x80-\xbf]{2}"
)
_UNFINISHED = (
    rb"[\xc2-\xf4]|\xe0[\xa0-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]|\xed[\x80-\x9f]"
    rb"|\xf0[\x90-\xbf][\x80-\xbf]?|[\xf1-\xf3][\x80-\xbf]{1,2}|\xf4[\x80-\x8f][\x80-\xbf]?"
)
WELL_FORMED_PREFIX: Final = re.compile(rb"(?:" + _CHARACTER + rb")*(?:" + _UNFINISHED + rb")?")

# Text, stray bytes, and the starts that only a later byte can prove wrong.
utf8_pieces = st.lists(
    st.one_of(
        st.text(max_size=3).map(str.encode),
        st.binary(min_size=1, max_size=2),
        st.sampled_from([b"\xed", b"\xed\xa0", b"\xe0", b"\xf4\x90", b"\xf0\x80", b"\xc2"]),
    ),
    min_size=1,
    max_size=8,
)


@given(utf8_pieces, st.lists(st.booleans(), max_size=8))
@example([b"ok\xed\xa0", b"\x80"], [True])  # a surrogate: CPython waits for its third byte
@example([b"\xf4\x90", b"\x80\x80"], [True])  # past U+10FFFF
def test_text_fails_with_1007_at_the_first_fragment_no_text_can_follow(
    pieces: list[bytes], cuts: list[bool]
) -> None:
    """Fragment by fragment, 1007 comes exactly when the bytes so far stop being a UTF-8 prefix."""
    # Fragments are runs of pieces, so they often end right after a piece.
    fragments = [pieces[0]]
    for piece, cut in zip(pieces[1:], cuts + [False] * len(pieces), strict=False):
        if cut:
            fragments.append(piece)
        else:
            fragments[-1] += piece
    text = b"".join(pieces)
    reader = FrameReader()
    for index, fragment in enumerate(fragments):
        last = index == len(fragments) - 1
        events = reader.receive(frame(CONTINUATION if index else TEXT, fragment, fin=last))
        so_far = b"".join(fragments[: index + 1])
        if WELL_FORMED_PREFIX.fullmatch(so_far) is None:
            assert [event.code for event in events if isinstance(event, Failure)] == [1007]
            return
        if not last:
            assert events == []
    try:
        text.decode()
    except UnicodeDecodeError:
        assert [event.code for event in events if isinstance(event, Failure)] == [1007]
    else:
        assert events == [Message(text, True)]


def test_text_ending_inside_a_character_fails_with_1007() -> None:
    """A text message whose last character is unfinished is 1007 at its FIN."""
    failure(1007, frame(TEXT, b"ok\xe2\x82", fin=False) + frame(CONTINUATION, b""))
    failure(1007, frame(TEXT, b"\xf0\x9f"))


def test_binary_messages_are_not_checked_as_utf8() -> None:
    """A binary message may hold any bytes; it is the protocol's to answer them."""
    assert read(frame(BINARY, b"\xff\xed\xa0")) == [Message(b"\xff\xed\xa0", False)]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", Close(None, "")),
        (b"\x03\xe8", Close(1000, "")),
        (b"\x03\xe9going", Close(1001, "going")),
        (b"\x0f\xa0\xc3\xa9", Close(4000, "é")),
        (b"\x03\xe8" + "é".encode() * 61 + b"x", Close(1000, "é" * 61 + "x")),
    ],
)
def test_close_frames(payload: bytes, expected: Close) -> None:
    """A close frame gives its code (None when it has none) and its UTF-8 reason."""
    assert read(frame(CLOSE, payload)) == [expected]


@pytest.mark.parametrize(
    "code",
    [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535],
)
def test_close_codes_that_may_not_be_sent_fail_with_1002(code: int) -> None:
    """Reserved, "no status" and unassigned close codes are 1002."""
    failure(1002, frame(CLOSE, code.to_bytes(2, "big")))


@pytest.mark.parametrize(
    "code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999]
)
def test_close_codes_that_may_be_sent_are_read(code: int) -> None:
    """Every assigned code and the library and application ranges are a Close."""
    assert read(frame(CLOSE, code.to_bytes(2, "big"))) == [Close(code, "")]


def test_a_close_frame_of_one_byte_fails_with_1002() -> None:
    """A close payload of one byte cannot hold a code: 1002."""
    failure(1002, frame(CLOSE, b"\x03"))


def test_a_close_reason_not_utf8_fails_with_1007() -> None:
    """A close reason that is not UTF-8 is 1007."""
    failure(1007, frame(CLOSE, b"\x03\xe8\xff"))


def test_nothing_is_read_after_a_close() -> None:
    """After the client's close, later bytes, even broken ones, give no events."""
    reader = FrameReader()
    assert reader.receive(frame(CLOSE, b"") + frame(TEXT, b"late")) == [Close(None, "")]
    assert reader.receive(frame(TEXT, b"late") + b"\xff\xff") == []


def test_nothing_is_read_after_a_failure() -> None:
    """After a Failure, the reader has nothing more to say."""
    reader = FrameReader()
    assert reader.receive(frame(TEXT, b"x", masked=False))[0].code == 1002  # type: ignore[union-attr]
    assert reader.receive(frame(TEXT, b"x")) == []


def test_a_message_of_exactly_1_mib_is_read() -> None:
    """1 MiB, in one frame or in fragments with a ping between them, is a message."""
    payload = b"m" * MIB
    assert read(frame(BINARY, payload)) == [Message(payload, False)]
    data = (
        frame(TEXT, payload[: MIB - 10], fin=False)
        + frame(PING, b"p")
        + frame(CONTINUATION, payload[MIB - 10 :])
    )
    assert read(data) == [Ping(b"p"), Message(payload, True)]


def test_a_frame_over_1_mib_fails_with_1009_from_its_header() -> None:
    """A frame announcing 1 MiB + 1 is 1009 before any of its payload arrives."""
    header = frame(BINARY, length_bytes=8, declared=MIB + 1)
    assert [type(event) for event in read(header)] == [Failure]
    assert read(header)[0].code == 1009  # type: ignore[union-attr]


def test_fragments_over_1_mib_together_fail_with_1009_at_the_fragment_that_passes() -> None:
    """Fragments summing past 1 MiB are 1009 at the header of the one that passes it."""
    first = frame(BINARY, b"f" * (MIB - 10), fin=False)
    reader = FrameReader()
    assert reader.receive(first) == []
    passing = frame(CONTINUATION, length_bytes=2, declared=11)
    [event] = reader.receive(passing)
    assert event == Failure(1009, event.reason)  # type: ignore[union-attr]


def test_large_declared_lengths_fail_without_waiting() -> None:
    """The largest 64-bit length a client may announce is refused at once (1009)."""
    failure(1009, frame(TEXT, length_bytes=8, declared=(1 << 63) - 1))


# --- What the server does with them -------------------------------------------


def test_handle_makes_messages_lines_answers_pings_and_ends_on_a_close() -> None:
    """Messages become lines (payload + "\\n"), pings get pongs, a Close its echo and the end."""
    data = (
        frame(TEXT, b"USERNAME a")
        + frame(PING, b"p")
        + frame(BINARY, b"SEND x\nSEND y")
        + frame(PONG, b"")
        + frame(CLOSE, b"\x03\xe9")
    )
    handled = websocket.handle(read(data))
    assert handled.data == b"USERNAME a\nSEND x\nSEND y\n"
    assert handled.replies == b"\x8a\x01p" + b"\x88\x02\x03\xe9"
    assert handled.end == Close(1001, "")


def test_handle_answers_a_close_without_a_code_with_an_empty_one() -> None:
    """A Close without a code is answered by an empty close frame."""
    handled = websocket.handle([Close(None, "")])
    assert handled == websocket.Handled(b"", b"\x88\x00", Close(None, ""))


def test_handle_answers_a_failure_with_its_code() -> None:
    """A Failure ends the connection with a close frame carrying its code, after earlier lines."""
    handled = websocket.handle(read(frame(TEXT, b"hi") + frame(TEXT, b"x", masked=False)))
    assert handled.data == b"hi\n"
    assert handled.replies[:4] == b"\x88" + bytes([handled.replies[1]]) + b"\x03\xea"
    assert isinstance(handled.end, Failure)
    assert handled.end.code == 1002


def test_handle_of_nothing_is_nothing() -> None:
    """No events: no lines, no replies, no end."""
    assert websocket.handle([]) == websocket.Handled(b"", b"", None)
