"""WebSocket frames without I/O (RFC 6455, the server's side): bytes in,
events out, bytes back.

A `FrameReader` takes what a client sent, in pieces of any size, and says
what it meant: a whole `Message`, a `Ping`, a `Pong`, the client's `Close`,
or a `Failure`, the protocol broken, with the close code to answer it;
`handle` says what the server does with those events. The writers spell
the server's frames; `frame_lines` frames a whole turn of the room's lines
at once, so that every WebSocket member gets the same bytes. The
handshake is HTTP's, in web.py.

Nothing here raises on what a client sends: every input is events, and a
bad one is a `Failure`, after which the reader has nothing more to say.
PROTOCOL.md, "People in a web browser", has the limits.
"""

from __future__ import annotations

import codecs
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from operator import add
from typing import Final, NamedTuple

# PROTOCOL.md: a message longer than 1 MiB closes the connection (1009).
MAX_MESSAGE_BYTES: Final = 1 << 20
# RFC 6455, 5.5: a control frame's payload is at most 125 bytes.
MAX_CONTROL_BYTES: Final = 125

# Close codes, RFC 6455 section 7.4.1, the ones this server sends.
NORMAL_CLOSURE: Final = 1000
GOING_AWAY: Final = 1001  # the server is shutting down
PROTOCOL_ERROR: Final = 1002
INVALID_DATA: Final = 1007  # a text message that is not UTF-8
POLICY_VIOLATION: Final = 1008  # PROTOCOL.md: over a limit of the door
MESSAGE_TOO_BIG: Final = 1009

# Opcodes, RFC 6455 section 5.2.
CONTINUATION: Final = 0x0
TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA
_KNOWN_OPCODES: Final = frozenset({CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG})

_FIN: Final = 0x80
_FIN_TEXT: Final = _FIN | TEXT
_SHORT_MESSAGE_STARTS: Final = frozenset({_FIN_TEXT, _FIN | BINARY})
_RESERVED: Final = 0x70  # RSV1-3: no extension is ever negotiated
_MASKED: Final = 0x80
_LENGTH_16: Final = 126  # the 7-bit length that says "16-bit length follows"
_LENGTH_64: Final = 127  # ... "64-bit length follows"
# A short masked frame's size is its second byte less this: the mask bit
# off, the 2 bytes of header and 4 of key on.
_SHORT_SIZE_OFFSET: Final = _MASKED - 6


@dataclass(frozen=True, slots=True)
class Message:
    """A whole data message, its fragments joined; `text` for a text
    message (then `payload` is valid UTF-8), else binary."""

    payload: bytes
    text: bool


@dataclass(frozen=True, slots=True)
class Ping:
    """A ping; RFC 6455 asks for a pong with the same payload."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    """A pong: the client is alive."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The client's close frame: `code` None when it gave none (what RFC
    6455 calls 1005, a code no frame may carry). Nothing follows it; RFC
    6455 5.5.1 has the server answer close_frame(code), then close."""

    code: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class Failure:
    """The client broke RFC 6455: answer with close_frame(code, reason)
    and close. Nothing follows it."""

    code: int
    reason: str


Event = Message | Ping | Pong | Close | Failure


def close_code_allowed(code: int) -> bool:
    """Whether a close frame may carry `code` (RFC 6455 7.4 and IANA's
    registry): 1000-1003 and 1007-1014 are assigned, 3000-4999 are for
    libraries and applications. 1004 is reserved; 1005, 1006 and 1015 only
    ever stand for "no frame said"."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _unmask(chunk: bytes, mask: bytes, offset: int) -> bytes:
    """`chunk`, the bytes from `offset` of a payload masked with `mask`,
    unmasked: one XOR of two big integers, fast for any size in Python."""
    size = len(chunk)
    if not size:
        return b""
    shift = offset & 3
    key = (mask[shift:] + mask[:shift]) * (size // 4 + 1)
    unmasked = int.from_bytes(chunk, "little") ^ int.from_bytes(key[:size], "little")
    return unmasked.to_bytes(size, "little")


def _strict_utf8() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")("strict")


class FrameReader:
    """Reads a client's frames, in pieces of any size: `receive(data)` gives
    the events those bytes complete, the same however the stream is cut.

    It is a small object rather than a state value handed back each time,
    because the message gathered so far may reach 1 MiB and a state value
    would copy it at every read: a client trickling bytes would cost the
    server quadratic time. It holds at most one message (MAX_MESSAGE_BYTES,
    checked against each frame's length before its payload arrives), one
    control frame's payload and one frame header.

    Text is checked as UTF-8 as it arrives, across fragments, so a bad
    sequence fails as soon as no continuation could make it valid.
    """

    __slots__ = (
        "_head",
        "_head_size",
        "_opcode",
        "_fin",
        "_mask",
        "_offset",
        "_length",
        "_message",
        "_message_opcode",
        "_utf8",
        "_control",
        "_done",
    )

    def __init__(self) -> None:
        self._head = bytearray()  # the current frame's header, while it arrives
        self._head_size = 0  # its full size, once the first two bytes say it
        self._opcode = -1  # the current frame's, once its header is whole; else -1
        self._fin = False
        self._mask = b""
        self._offset = 0  # payload bytes of the current frame received so far
        self._length = 0  # the current frame's payload length
        self._message = bytearray()  # the data message so far, unmasked
        self._message_opcode = -1  # TEXT or BINARY while a message is open; else -1
        self._utf8: codecs.IncrementalDecoder | None = None  # while a text message is open
        self._control = bytearray()  # the current control frame's payload, unmasked
        self._done = False  # after a Close or a Failure

    @property
    def between_frames(self) -> bool:
        """Whether it holds nothing: no frame or message begun, none ended
        the reading. A reader in this state is the same as a new one, so a
        server may drop it and make one when bytes come (idle connections
        stay small)."""
        return self._opcode < 0 and not self._head and self._message_opcode < 0 and not self._done

    def receive(self, data: bytes) -> list[Event]:
        """The events that `data`, the next bytes from the client, complete
        (the server's hot path, the common case of a read, is
        `receive_handled`)."""
        events: list[Event] = []
        index, end = 0, len(data)
        while index < end and not self._done:
            if self._opcode < 0:
                index = self._read_head(data, index, events)
                if self._opcode < 0 or self._done:
                    continue
                if self._length:
                    continue
            else:
                take = min(self._length - self._offset, end - index)
                failure = self._take_payload(data[index : index + take])
                index += take
                if failure is not None:
                    self._fail(failure, events)
                    continue
                if self._offset < self._length:
                    continue
            self._finish_frame(events)
        return events

    def receive_handled(self, data: bytes) -> Handled:
        """`handle(self.receive(data))`, the server's hot path: runs of whole
        short data messages (a busy client's read is little else) are
        unmasked with one XOR each and go straight to lines, with no event
        made; a frame cut by the read's edge, or of any other kind, is read
        by `receive`, its own bytes only."""
        index, end = 0, len(data)
        data_parts: list[bytes] = []
        replies: list[bytes] = []
        while index < end and not self._done:
            if self.between_frames:
                stop, lines, failure = self._short_run(data, index)
                if stop > index:
                    data_parts += lines
                    index = stop
                    if failure is not None:
                        replies.append(close_frame(failure.code, failure.reason))
                        return Handled(b"".join(data_parts), b"".join(replies), failure)
                    continue
                need = 2  # another kind of frame: its first two bytes, the long way
            elif self._opcode >= 0:
                need = self._length - self._offset  # the rest of the frame under way
            else:
                need = (self._head_size or 2) - len(self._head)  # the rest of a header
            handled = handle(self.receive(data[index : index + need]))
            index += need
            data_parts.append(handled.data)
            replies.append(handled.replies)
            if handled.end is not None:
                return Handled(b"".join(data_parts), b"".join(replies), handled.end)
        return Handled(b"".join(data_parts), b"".join(replies), None)

    def _short_run(self, data: bytes, index: int) -> tuple[int, list[bytes], Failure | None]:
        """The whole short data messages from `index` on, unmasked with one
        XOR: where they end, their payloads each with its "\\n" (as one
        piece), and the failure that ends the reading if one is text but not
        UTF-8 (then only the payloads before it, and the reader is done)."""
        start, end = index, len(data)
        heads: list[int] = []  # where each frame starts
        add_head = heads.append
        first_bytes = _SHORT_MESSAGE_STARTS
        last = end - 1
        while index < last:
            size = data[index + 1] - _SHORT_SIZE_OFFSET  # the frame's, if masked and short
            if not 6 <= size < 132 or data[index] not in first_bytes:  # 132: 6 + 126
                break
            add_head(index)
            index += size
        if index > end:  # the last one is cut by the read's edge
            index = heads.pop()
        if not heads:
            return start, [], None
        stops = [*heads[1:], index]
        # One key for the run: each frame's mask, repeated from two bytes
        # before the frame so that it falls on the payload as sent (the
        # header is garbled, and left out). 34 masks, 136 bytes, cover the
        # 2 skipped and a frame's 131.
        key = b"".join(
            [
                (data[head + 2 : head + 6] * 34)[2 : stop - head + 2]
                for head, stop in zip(heads, stops, strict=True)
            ]
        )
        # The run's bytes only (a read may hold many runs, between pings).
        plain = (
            int.from_bytes(data[start:index], "little") ^ int.from_bytes(key, "little")
        ).to_bytes(index - start, "little")
        first = 6 - start  # + a frame's head: where its payload starts in `plain`
        payloads = [
            plain[head + first : stop - start] for head, stop in zip(heads, stops, strict=True)
        ]
        payloads.append(b"")  # each payload with its "\n"
        lines = b"\n".join(payloads)
        if lines.isascii():
            return index, [lines], None
        for number, head in enumerate(heads):  # rarer: check the text that is not ASCII
            if data[head] == _FIN_TEXT and not payloads[number].isascii():
                try:
                    payloads[number].decode()
                except UnicodeDecodeError:
                    failure = Failure(INVALID_DATA, "text message not UTF-8")
                    self._fail(failure, [])
                    return index, [b"".join(line + b"\n" for line in payloads[:number])], failure
        return index, [lines], None

    def _read_head(self, data: bytes, index: int, events: list[Event]) -> int:
        """Take header bytes from `data` at `index`; check the first two as
        soon as they are there, and start the frame once the header is whole.
        Returns the index after what it took."""
        head = self._head
        want = self._head_size or 2
        taken = min(want - len(head), len(data) - index)
        head += data[index : index + taken]
        index += taken
        if len(head) < want:
            return index
        if not self._head_size:
            failure = self._check_start(head[0], head[1])
            if failure is not None:
                self._fail(failure, events)
                return index
            return self._read_head(data, index, events) if index < len(data) else index
        length = head[1] & 0x7F
        if length == _LENGTH_16:
            length = int.from_bytes(head[2:4], "big")
        elif length == _LENGTH_64:
            length = int.from_bytes(head[2:10], "big")
            if length >> 63:
                self._fail(Failure(PROTOCOL_ERROR, "64-bit length with its top bit set"), events)
                return index
        if not head[0] & 0x08 and len(self._message) + length > MAX_MESSAGE_BYTES:
            # Known from the header alone: the payload is never buffered.
            self._fail(Failure(MESSAGE_TOO_BIG, "message over 1 MiB"), events)
            return index
        self._fin = bool(head[0] & _FIN)
        self._opcode = head[0] & 0x0F
        self._mask = bytes(head[-4:])
        self._length = length
        self._offset = 0
        head.clear()
        self._head_size = 0
        if self._opcode in (TEXT, BINARY):
            self._message_opcode = self._opcode
            self._utf8 = _strict_utf8() if self._opcode == TEXT else None
        return index

    def _check_start(self, first: int, second: int) -> Failure | None:
        """Check a frame's first two bytes; on success, note its header size."""
        opcode = first & 0x0F
        length = second & 0x7F
        if first & _RESERVED:
            return Failure(PROTOCOL_ERROR, "reserved bits set")
        if opcode not in _KNOWN_OPCODES:
            return Failure(PROTOCOL_ERROR, "unknown opcode")
        if not second & _MASKED:
            return Failure(PROTOCOL_ERROR, "unmasked client frame")
        if opcode & 0x08:
            if not first & _FIN:
                return Failure(PROTOCOL_ERROR, "fragmented control frame")
            if length > MAX_CONTROL_BYTES:
                return Failure(PROTOCOL_ERROR, "control frame over 125 bytes")
        elif opcode == CONTINUATION:
            if self._message_opcode < 0:
                return Failure(PROTOCOL_ERROR, "continuation without a message")
        elif self._message_opcode >= 0:
            return Failure(PROTOCOL_ERROR, "new message inside a fragmented one")
        extra = 2 if length == _LENGTH_16 else 8 if length == _LENGTH_64 else 0
        self._head_size = 2 + extra + 4
        return None

    def _take_payload(self, chunk: bytes) -> Failure | None:
        """Unmask the next `chunk` of the current frame's payload and keep it."""
        plain = _unmask(chunk, self._mask, self._offset)
        self._offset += len(chunk)
        if self._opcode & 0x08:
            self._control += plain
            return None
        self._message += plain
        if self._utf8 is not None:
            try:
                self._utf8.decode(plain)
            except UnicodeDecodeError:
                return Failure(INVALID_DATA, "text message not UTF-8")
            # CPython's decoder rejects every other impossible prefix at once
            # but holds ED A0..ED BF (a UTF-16 surrogate) until its third byte.
            held = self._utf8.getstate()[0]
            if len(held) >= 2 and held[0] == 0xED and held[1] >= 0xA0:
                return Failure(INVALID_DATA, "text message not UTF-8")
        return None

    def _finish_frame(self, events: list[Event]) -> None:
        """The current frame's payload is whole: say what it completes."""
        opcode = self._opcode
        self._opcode = -1
        if opcode & 0x08:
            payload = bytes(self._control)
            self._control.clear()
            if opcode == PING:
                events.append(Ping(payload))
            elif opcode == PONG:
                events.append(Pong(payload))
            else:
                event = _read_close(payload)
                self._done = True
                self._drop_message()
                events.append(event)
            return
        if not self._fin:
            return
        if self._utf8 is not None:
            try:
                self._utf8.decode(b"", True)
            except UnicodeDecodeError:
                self._fail(Failure(INVALID_DATA, "text message not UTF-8"), events)
                return
        events.append(Message(bytes(self._message), self._message_opcode == TEXT))
        self._drop_message()

    def _drop_message(self) -> None:
        self._message = bytearray()
        self._message_opcode = -1
        self._utf8 = None

    def _fail(self, failure: Failure, events: list[Event]) -> None:
        self._done = True
        self._drop_message()
        self._control = bytearray()
        self._head = bytearray()
        events.append(failure)


def _read_close(payload: bytes) -> Close | Failure:
    """What a close frame's payload says (RFC 6455 5.5.1): nothing, or a
    code and a UTF-8 reason."""
    if not payload:
        return Close(None, "")
    if len(payload) == 1:
        return Failure(PROTOCOL_ERROR, "close frame of one byte")
    code = int.from_bytes(payload[:2], "big")
    if not close_code_allowed(code):
        return Failure(PROTOCOL_ERROR, "close code that may not be sent")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        return Failure(INVALID_DATA, "close reason not UTF-8")
    return Close(code, reason)


class Handled(NamedTuple):
    """What a server does with a read's events (see `handle`)."""

    data: bytes  # each message's payload and a "\n": input for the line splitter
    replies: bytes  # pongs, then the close frame if the reading ended
    end: Close | Failure | None  # set: send `replies`, then close the connection


def handle(events: Iterable[Event]) -> Handled:
    """The server's side of the events of one read, as PROTOCOL.md has it:
    a message is a line (payload + "\n", through TCP's line rules), a ping
    is answered with its pong, a pong is only a sign of life, and a Close
    or a Failure is answered with its close frame and ends the connection,
    after the lines that came before it."""
    data: list[bytes] = []
    replies: list[bytes] = []
    end: Close | Failure | None = None
    for event in events:
        if isinstance(event, Message):
            data += (event.payload, b"\n")
        elif isinstance(event, Ping):
            replies.append(pong_frame(event.payload))
        elif isinstance(event, Close):
            replies.append(close_frame(event.code))
            end = event
        elif isinstance(event, Failure):
            replies.append(close_frame(event.code, event.reason))
            end = event
    return Handled(b"".join(data), b"".join(replies), end)


# --- Writing: the server's frames are never masked --------------------------


def _header(first: int, length: int) -> bytes:
    if length < _LENGTH_16:
        return bytes((first, length))
    if length < 1 << 16:
        return bytes((first, _LENGTH_16)) + length.to_bytes(2, "big")
    return bytes((first, _LENGTH_64)) + length.to_bytes(8, "big")


# The header of a one-frame text message for each line length under 126,
# by the line's length with its "\n" (the index frame_lines has at hand):
# almost every line of the room takes one, and frame_lines makes none.
_SHORT_TEXT_HEADERS: Final = tuple(
    b"" if size == 0 else bytes((_FIN_TEXT, size - 1)) for size in range(_LENGTH_16 + 1)
)


_pack_16_bit_header: Final = struct.Struct("!BBH").pack


def text_frame(payload: bytes) -> bytes:
    """One unfragmented text message; `payload` must be UTF-8."""
    return _header(_FIN_TEXT, len(payload)) + payload


def frame_lines(lines: Iterable[bytes]) -> bytes:
    """The turn's lines, each ending in "\\n", as one text message per line
    without its "\\n", all in one bytes object: what every WebSocket member
    gets, as a TCP member gets b"".join(lines).

    The broadcast's hot path: one call per turn, shared by all members.
    """
    short = _SHORT_TEXT_HEADERS
    medium = _pack_16_bit_header
    parts: list[bytes] = []
    append = parts.append
    for line in lines:
        size = len(line)
        if 0 < size <= _LENGTH_16:
            append(short[size])
        elif _LENGTH_16 < size <= 1 << 16:
            # Every line of the room ends here or above: at most ~4.2 KB.
            append(medium(_FIN_TEXT, _LENGTH_16, size - 1))
        else:
            # An empty `line` has no "\n" to drop: an empty message.
            size = max(size, 1)
            append(_header(_FIN_TEXT, size - 1))
        append(line[: size - 1])
    return b"".join(parts)


def frame_offsets(lines: Sequence[bytes]) -> list[int]:
    """Where each line's message starts in `frame_lines(lines)`, and where
    the last ends: so that a member's own copy of the turn (without its own
    lines) is cut from the framed turn, never framed again."""
    sizes = list(map(len, lines))
    if 0 not in sizes and max(sizes, default=0) <= _LENGTH_16:
        # Every line short (the room's lines nearly always are): its frame is
        # the line, its "\n" dropped, behind a 2-byte header: one byte more.
        return list(map(add, accumulate(sizes, initial=0), range(len(sizes) + 1)))
    offsets = [0]
    position = 0
    for size in sizes:
        payload = max(size, 1) - 1  # without its "\n"
        position += payload + (2 if payload < _LENGTH_16 else 4 if payload < 1 << 16 else 10)
        offsets.append(position)
    return offsets


def close_frame(code: int | None = NORMAL_CLOSURE, reason: str = "") -> bytes:
    """A close frame with `code` (None: an empty one, as an answer to a
    Close that gave none) and `reason`, cut to fit 125 bytes at a
    character's edge."""
    if code is None:
        return bytes((_FIN | CLOSE, 0))
    raw = reason.encode()[: MAX_CONTROL_BYTES - 2]
    raw = raw.decode(errors="ignore").encode()
    payload = (code & 0xFFFF).to_bytes(2, "big") + raw
    return _header(_FIN | CLOSE, len(payload)) + payload


def ping_frame(payload: bytes = b"") -> bytes:
    """A ping; only its first 125 bytes are sent, all a control frame holds."""
    payload = payload[:MAX_CONTROL_BYTES]
    return _header(_FIN | PING, len(payload)) + payload


def pong_frame(payload: bytes = b"") -> bytes:
    """A pong, the answer to Ping(payload); cut to 125 bytes like ping_frame."""
    payload = payload[:MAX_CONTROL_BYTES]
    return _header(_FIN | PONG, len(payload)) + payload
