"""The machinery the tests share, beside conftest.py's lines, clients and
servers: the room's fake host and members; the real `telnet` in a
pseudo-terminal behind a recording proxy; a TLS client that decides what
goes into each packet; and the room model with its state machine, which
drives a real server and compares every byte with the model's prediction.
Each is written once here and imported by the test files that need it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Final

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from conftest import (
    ERRORS,
    LINE_TOO_LONG,
    MAX_LINE,
    MAX_NAME,
    MESSAGE_EMPTY,
    MESSAGE_INVALID,
    NAME_EMPTY,
    NAME_HAS_SPACES,
    NAME_INVALID,
    NAME_REQUIRED,
    NAME_TAKEN,
    NAME_TOO_LONG,
    SERVER_FULL,
    SERVICE_UNAVAILABLE,
    SYNC,
    SYNC_REPLY,
    TIMEOUT,
    UNRECOGNISED,
    Client,
    RunningServer,
    client_context,
    poll,
    receives,
    sends,
    start_server,
    username,
)
from confusables_table import CONFUSABLES
from host import Member
from room import NO_KEYS, LocalRoom

# --- The room without a server: a fake host and fake members -----------------


@dataclass(eq=False)  # hashed by identity, as connections are
class FakeMember:
    label: str
    name: str | None = None
    keys: tuple[str, ...] = NO_KEYS
    receive_prefix: bytes = b""
    closed: bool = False


@dataclass
class FakeTimer:
    when: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeHost:
    """The reactor, as the room sees it: replies that the batch does not
    keep go straight to `direct`; holds and timers are recorded."""

    room: LocalRoom | None = None
    direct: dict[Member, bytes] = field(default_factory=dict)
    held: set[Member] = field(default_factory=set)
    timers: list[FakeTimer] = field(default_factory=list)
    clock: float = 0.0

    def now(self) -> float:
        return self.clock

    def call_at(self, when: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(when, callback)
        self.timers.append(timer)
        return timer

    def reply(self, member: Member, line: bytes) -> None:
        assert self.room is not None
        if not self.room.batch.reply(member, line):
            self.direct[member] = self.direct.get(member, b"") + line

    def hold(self, member: Member) -> None:
        self.held.add(member)

    def resume(self, member: Member) -> None:
        self.held.discard(member)

    def disconnect(self, member: Member, detail: str) -> None:
        raise AssertionError("a LocalRoom never falls behind")

    def watch(self, sock: object, events: int, handler: Callable[[int], None]) -> None:
        raise AssertionError("a LocalRoom has no sockets")

    def unwatch(self, sock: object) -> None:
        raise AssertionError("a LocalRoom has no sockets")


def make_room() -> tuple[LocalRoom, FakeHost]:
    host = FakeHost()
    room = LocalRoom(host)
    host.room = room
    return room, host


# --- Sessions and checks that more than one test file runs -----------------


def expect_exactly(client: Client, expected: bytes) -> None:
    """`client` receives exactly `expected` and, as its sync proves, nothing
    more so far."""
    assert client.exactly(len(expected)) == expected
    assert client.sync() == []


SEED_ONE_INPUT: Final = b"USERNAME mia\nSEND Hello, world!\nUSERNAME not valid\n"


SEED_ONE_REPLY: Final = NAME_HAS_SPACES + b"\n"


def seed_session_one(mia: Client) -> None:
    """README session one, byte for byte, on `mia`'s connection."""
    mia.send(SEED_ONE_INPUT)
    expect_exactly(mia, SEED_ONE_REPLY)
    mia.send(b"NOT_A_COMMAND test\n")
    expect_exactly(mia, UNRECOGNISED + b"\n")


def seed_session_two(teixe: Client, jeff: Client) -> None:
    """README session two, byte for byte, between two connections."""
    teixe.send(b"USERNAME teixe\n")
    assert teixe.sync() == []
    jeff.send(b"USERNAME jeff\n")
    assert jeff.sync() == []
    teixe.send(b"SEND hi\n")
    assert teixe.sync() == []  # the sender gets nothing back
    expect_exactly(jeff, b"RECEIVE teixe hi\n")
    jeff.send(b"SEND bye\n")
    assert jeff.sync() == []
    expect_exactly(teixe, b"RECEIVE jeff bye\n")


def take_name_within(client: Client, name: str, seconds: float) -> None:
    """Retry USERNAME until accepted: for names freed by an event the test
    cannot sync on (a reset, a slow consumer). Bounded by a deadline."""

    def taken() -> bool:
        client.send(username(name))
        reply = client.sync()
        assert reply in ([], [NAME_TAKEN]), reply
        return reply == []

    poll(f"{name!r} to be freed", taken, seconds)


def send_until_closed(sender: Client, fast: Client, claimant: Client, name: str) -> list[bytes]:
    """`sender` sends batches of 2 KB messages, each batch checked at
    `fast`, until `claimant` can take `name`: the member that holds it
    (which never reads) was closed and its name freed. Every message sent."""
    sent: list[bytes] = []
    deadline = time.monotonic() + 30
    while True:
        batch = [b"%06d " % (len(sent) + index) + b"z" * 2000 for index in range(16)]
        sender.send(sends(batch))
        assert sender.sync() == []
        assert fast.sync() == receives("sender", batch)
        sent += batch
        claimant.send(username(name))
        reply = claimant.sync()
        if reply == []:
            return sent  # the slow consumer is gone and its name is free
        assert reply == [NAME_TAKEN]
        assert time.monotonic() < deadline, f"{name!r} was never disconnected"


def assert_cut_short(received: bytes, owed: bytes) -> None:
    """What a slow consumer read before the server closed it is the start of
    what it was owed, cut where the server gave up: its first line whole
    (what the kernel had taken is still delivered), never all of it."""
    first_line = owed[: owed.index(b"\n") + 1]
    assert received.startswith(first_line), f"{len(received)} bytes: {received[:80]!r}"
    assert owed.startswith(received)
    assert len(received) < len(owed)


# --- The real `telnet`: in a pseudo-terminal, behind a recording proxy -------


class RecordingProxy:
    """A TCP relay for one connection, to `upstream`, that keeps every byte
    each way: what `telnet` really sent and got."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port: int = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.sent = bytearray()  # client to server
        self.got = bytearray()  # server to client
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._serve, daemon=True)]
        self.threads[0].start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            near, _ = self.listener.accept()
            far = socket.create_connection(self.upstream, timeout=TIMEOUT)
            for sock in (near, far):
                sock.settimeout(None)  # the pumps end when close() shuts them down
                self.sockets.append(sock)
            for source, sink, record in ((near, far, self.sent), (far, near, self.got)):
                pump = threading.Thread(target=self._pump, args=(source, sink, record))
                pump.daemon = True
                pump.start()
                self.threads.append(pump)

    def _pump(self, source: socket.socket, sink: socket.socket, record: bytearray) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                with self.lock:
                    record += chunk
                sink.sendall(chunk)
            sink.shutdown(socket.SHUT_WR)

    def client_sent(self) -> bytes:
        with self.lock:
            return bytes(self.sent)

    def client_got(self) -> bytes:
        with self.lock:
            return bytes(self.got)

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self.threads:
            thread.join(TIMEOUT)

    def __enter__(self) -> RecordingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _take_the_terminal() -> None:
    """In the child, after setsid: make its pty (fd 0) the controlling
    terminal, so that Ctrl-C raises SIGINT in telnet, which then sends
    IAC IP and IAC DO TIMING-MARK."""
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtyTelnet:
    """`telnet ARGS...` in a pseudo-terminal, as a person runs it: keys are
    written to the pty, the screen is read by a thread; every wait has a
    deadline."""

    def __init__(self, telnet: str, *args: str, home: Path) -> None:
        self.master, slave = os.openpty()
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "TERM": "dumb"}
        try:
            self.process = subprocess.Popen(
                [telnet, *args],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=env,  # HOME: no ~/.telnetrc of the user's
                start_new_session=True,
                preexec_fn=_take_the_terminal,
            )
        finally:
            os.close(slave)
        self.screen = b""
        self.seen = 0
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):  # EIO once telnet has exited
            while chunk := os.read(self.master, 65536):
                with self.changed:
                    self.screen += chunk
                    self.changed.notify_all()

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def expect(self, text: bytes) -> bytes:
        """Wait for `text` on the screen after what was seen; return what
        came before it."""
        with self.changed:
            found = self.changed.wait_for(lambda: text in self.screen[self.seen :], TIMEOUT)
            assert found, f"{text!r} not on the screen: {self.screen[self.seen :]!r}"
            end = self.screen.index(text, self.seen)
            before = self.screen[self.seen : end]
            self.seen = end + len(text)
        return before

    def sync(self) -> bytes:
        """Type PING; the screen before its reply (the echo of what was
        typed, and what the server sent)."""
        self.type(b"PING\r")
        return self.expect(SYNC_REPLY)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(TIMEOUT)
        os.close(self.master)
        self.reader.join(TIMEOUT)

    def __enter__(self) -> PtyTelnet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- A TLS client that decides what goes into each packet --------------------


class BioClient:
    """A TLS client that decides what goes into each packet: an SSLObject
    over memory BIOs, on a blocking socket with a timeout. It verifies
    nothing (these tests are about the server's I/O, not about trust)."""

    def __init__(self, address: tuple[str, int], receive_buffer: int | None = None) -> None:
        self.raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.raw.settimeout(TIMEOUT)
        self.raw.connect(address)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = client_context().wrap_bio(self.incoming, self.outgoing)

    def start_handshake(self) -> None:
        """Send the ClientHello, and read nothing."""
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        self.raw.sendall(self.outgoing.read())

    def finish_handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if self.outgoing.pending:
                    self.raw.sendall(self.outgoing.read())
                self._receive()
        if self.outgoing.pending:
            self.raw.sendall(self.outgoing.read())

    def send(self, data: bytes, *, close_notify: bool = False) -> None:
        """`data`, and maybe close_notify after it, in one sendall."""
        self.tls.write(data)
        if close_notify:
            with contextlib.suppress(ssl.SSLWantReadError):
                self.tls.unwrap()
        self.raw.sendall(self.outgoing.read())

    def read_to_eof(self) -> bytes:
        data = b""
        while True:
            try:
                piece = self.tls.read(65536)
                if not piece:  # close_notify
                    return data
                data += piece
            except ssl.SSLWantReadError:
                if not self._receive():
                    return data
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return data

    def _receive(self) -> bool:
        chunk = self.raw.recv(65536)
        if chunk:
            self.incoming.write(chunk)
        else:
            self.incoming.write_eof()
        return bool(chunk)

    def close(self) -> None:
        self.raw.close()


# --- The room model and its state machine, against a real server -------------
#
# A plain Python model of the room, written from PROTOCOL.md alone (it never
# calls protocol.py), predicts every line each client must receive; the tests
# drive a real in-process ChatServer and compare byte for byte. Every byte a
# client writes is cut into random pieces, each sent with its own sendall.
#
# Ordering rests on one fact: the server answers each connection's lines in
# order, so once the reply to a client's trailing `PING` (an unknown command)
# has arrived, everything that client sent before it has been processed, and
# every RECEIVE it caused has been handed to its recipients.


# --- The model ---------------------------------------------------------------


def model_key(name: str) -> str:
    """What makes two names the same name (PROTOCOL.md, USERNAME)."""
    return unicodedata.normalize("NFKC", name).casefold()


def model_skeleton(text: str) -> str:
    """UTS #39, section 4, as PROTOCOL.md words it: NFD, every character
    through confusables.txt, NFD again."""
    decomposed = unicodedata.normalize("NFD", text)
    mapped = "".join(CONFUSABLES.get(char, char) for char in decomposed)
    return unicodedata.normalize("NFD", mapped)


def model_same_name(a: str, b: str) -> bool:
    """PROTOCOL.md, USERNAME: the same key, or the same look as typed, or
    keys that look the same."""
    return (
        model_key(a) == model_key(b)
        or model_skeleton(a) == model_skeleton(b)
        or model_skeleton(model_key(a)) == model_skeleton(model_key(b))
    )


def model_name_error(raw: bytes) -> bytes | None:
    """The reply to `USERNAME <raw>` from the first failing row of the table
    that does not depend on the room; None if the name is well-formed."""
    if not raw:
        return NAME_EMPTY
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return NAME_INVALID
    if any(char.isspace() for char in name):
        return NAME_HAS_SPACES
    if any(unicodedata.category(char) in ("Cc", "Cf") for char in name):
        return NAME_INVALID
    # Characters that show nothing (the strategies draw them from INVISIBLES),
    # or a combining mark with nothing to sit on.
    if any(char in INVISIBLES for char in name) or unicodedata.category(name[0]) in (
        "Mn",
        "Mc",
        "Me",
    ):
        return NAME_INVALID
    if len(name) > MAX_NAME:
        return NAME_TOO_LONG
    return None


def model_message_error(raw: bytes) -> bytes | None:
    """The reply to `SEND <raw>` from a named connection; None if relayed."""
    if not raw:
        return MESSAGE_EMPTY
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return MESSAGE_INVALID
    if text.isspace():
        return MESSAGE_EMPTY
    if any(unicodedata.category(char) == "Cc" and char != "\t" for char in text):
        return MESSAGE_INVALID
    return None


def model_lines(stream: bytes, *, at_eof: bool) -> list[bytes]:
    """The lines of everything one connection sent, as PROTOCOL.md frames
    them: split on "\\n", one "\\r" before it dropped; at end of input an
    unterminated rest is a line too (its "\\r", not being before a "\\n",
    stays). An over-long line stays whole here; `RoomModel.feed` answers it."""
    *complete, rest = stream.split(b"\n")
    lines = [line.removesuffix(b"\r") for line in complete]
    if at_eof and rest:
        lines.append(rest)
    return lines


# The lines the model and the fuzzer may see: "Server is full." and "Service
# unavailable." are never provoked here.
MODEL_ERRORS: Final = ERRORS - {SERVER_FULL, SERVICE_UNAVAILABLE}


Output = tuple[int, bytes]  # (connection, line it must receive, without "\n")


class RoomModel:
    """The room as PROTOCOL.md describes it: who holds which name."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}  # connection -> name as typed

    def holder(self, name: str, asking: int) -> int | None:
        """Who else holds a name that counts as `name`."""
        for who, held in self.names.items():
            if who != asking and model_same_name(held, name):
                return who
        return None

    def feed(self, who: int, line: bytes) -> list[Output]:
        """What one line from `who` makes the server send, in order."""
        if not line:
            return []
        if len(line) > MAX_LINE:
            return [(who, LINE_TOO_LONG)]
        verb, _, argument = line.partition(b" ")
        if verb == b"USERNAME":
            error = model_name_error(argument)
            if error is not None:
                return [(who, error)]
            name = argument.decode("utf-8")
            if self.holder(name, who) is not None:
                return [(who, NAME_TAKEN)]
            self.names[who] = name
            return []
        if verb == b"SEND":
            sender = self.names.get(who)
            if sender is None:
                return [(who, NAME_REQUIRED)]
            error = model_message_error(argument)
            if error is not None:
                return [(who, error)]
            line = b"RECEIVE " + sender.encode("utf-8") + b" " + argument
            return [(other, line) for other in self.names if other != who]
        return [(who, UNRECOGNISED)]

    def feed_stream(self, who: int, stream: bytes, *, at_eof: bool) -> list[Output]:
        outputs: list[Output] = []
        for line in model_lines(stream, at_eof=at_eof):
            outputs += self.feed(who, line)
        return outputs

    def leave(self, who: int) -> None:
        self.names.pop(who, None)


def assert_contract_line(line: bytes) -> None:
    """`line` (received, without its "\\n") is one the contract allows: an
    exact ERROR line, or a RECEIVE with a valid name and message; valid
    UTF-8 whose only control character may be a TAB inside a RECEIVE."""
    text = line.decode("utf-8")  # raises on invalid UTF-8
    if line.startswith(b"RECEIVE "):
        # A valid name holds no whitespace, so the first space ends it.
        name, space, message = line.removeprefix(b"RECEIVE ").partition(b" ")
        assert space, line
        assert model_name_error(name) is None, line
        assert model_message_error(message) is None, line
        allowed = "\t"
    else:
        assert line in MODEL_ERRORS, line
        allowed = ""
    controls = [char for char in text if unicodedata.category(char) == "Cc"]
    assert all(char in allowed for char in controls), line


# --- Socket helpers ----------------------------------------------------------


def cut_points(size: int) -> st.SearchStrategy[list[int]]:
    """Where to cut `size` bytes into pieces: not at all, at a few random
    places, at every byte (short payloads) or every few bytes (long ones)."""
    if size < 2:
        return st.just([])
    random_cuts = st.lists(st.integers(1, size - 1), max_size=12, unique=True).map(sorted)
    # At most about 512 pieces, so a 5 KB line is not 5,000 syscalls.
    smallest = max(1, size // 512)
    strides = st.integers(smallest, max(smallest, size // 2)).map(
        lambda step: list(range(step, size, step))
    )
    return st.one_of(st.just([]), random_cuts, strides)


def send_randomly_cut(data: st.DataObject, conn: Client, payload: bytes) -> None:
    """Send `payload` in randomly cut pieces, one sendall each."""
    cuts = data.draw(cut_points(len(payload)), label="cuts")
    for start, end in pairwise([0, *cuts, len(payload)]):
        conn.send(payload[start:end])


def read_through_sync(conn: Client, expected: Sequence[bytes]) -> list[bytes]:
    """The lines before the reply to the SYNC sent after lines whose replies
    are `expected`. Any unknown command gets the same reply as SYNC, so this
    reads until it has seen one more of those than `expected` holds. Linear
    in what it reads (Client.line re-copies its buffer for every line)."""
    wanted = list(expected).count(UNRECOGNISED) + 1
    lines: list[bytes] = []
    while True:
        *complete, conn.buffer = conn.buffer.split(b"\n")
        for index, line in enumerate(complete):
            if line == UNRECOGNISED:
                wanted -= 1
                if wanted == 0:
                    rest = complete[index + 1 :]
                    conn.buffer = b"".join(line + b"\n" for line in rest) + conn.buffer
                    return lines
            lines.append(line)
        chunk = conn.sock.recv(65536)  # the socket's timeout bounds this
        if not chunk:
            raise EOFError(f"closed before the sync reply; got {lines!r}")
        conn.buffer += chunk


# --- Strategies --------------------------------------------------------------


line_endings = st.sampled_from([b"\n", b"\r\n"])


def no_iac(data: bytes) -> bytes:
    """`data` without the byte 0xFF, which is always telnet's IAC (PROTOCOL.md,
    "Telnet"): the model has no telnet; the telnet tests and test_protocol.py's
    properties of protocol.receive cover those bytes."""
    return data.replace(b"\xff", b"\xfe")


# Name characters chosen for how they compare: "ß"/"ẞ"/"ss", the long s,
# the Kelvin and Ohm signs (NFKC makes them K and Ω), dotted I, a ligature,
# a combining accent (so "é" has two spellings), 4-byte emoji.
NAME_ALPHABET: Final = "abksxyzABKSXYZ019_-.éÉßẞſΩ\u2126\u212aİıﬁжЖあ日🙂\u0301"


# Whitespace by str.isspace(), including the C0 separators \x1c-\x1f and
# NEL, which are also control characters: the whitespace row comes first.
SPACES: Final = (" ", "\t", "\u00a0", "\u3000", "\u2028", "\u1680", "\x0b", "\x1c", "\x1f", "\x85")


# Control (Cc) and format (Cf) characters that are not whitespace.
CONTROLS: Final = ("\x1b", "\x00", "\x07", "\x7f", "\x9b")


FORMATS: Final = ("\u200b", "\u200d", "\ufeff", "\u202e", "\u00ad", "\u2066")


# Characters that show nothing and are neither whitespace, Cc nor Cf
# (PROTOCOL.md, USERNAME, v2): fillers, the blank braille pattern, the
# combining grapheme joiner, variation selectors.
INVISIBLES: Final = (
    "\u034f",
    "\u115f",
    "\u1160",
    "\u3164",
    "\uffa0",
    "\u2800",
    "\ufe0f",
    "\U000e0100",
)


# Letters from other scripts that look like Latin ones, and look-alikes
# within Latin: what a user would try in order to pass for another.
LOOKALIKES: Final = {
    "a": "а",
    "e": "е",
    "o": "о",
    "x": "х",
    "y": "у",
    "B": "Β",
    "K": "Κ",
    "X": "Χ",
    "Z": "Ζ",
    "l": "1",
    "I": "l",
    "0": "O",
}


# Invalid UTF-8 wherever it is put (see test_protocol.py), plus a truncated
# two-byte sequence, which is invalid unless a continuation byte follows.
INVALID_UTF8: Final = (b"\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xc3")


fresh_names = st.text(NAME_ALPHABET, min_size=1, max_size=10)


# Around the 32-code-point limit, in characters of 1 to 4 bytes.
boundary_names = st.one_of(
    st.text(NAME_ALPHABET, min_size=31, max_size=34),
    st.builds(
        lambda char, count: char * count,
        st.sampled_from(["a", "é", "あ", "🙂"]),
        st.sampled_from([32, 33]),
    ),
)


def fullwidth(name: str) -> str:
    """ASCII printable characters as their fullwidth forms (NFKC undoes it)."""
    return "".join(chr(ord(char) + 0xFEE0) if "!" <= char <= "~" else char for char in name)


def name_variants(name: str) -> st.SearchStrategy[str]:
    """Spellings of `name` that PROTOCOL.md may count as the same name, and
    one that it never does."""
    return st.sampled_from(
        [
            name,
            name.upper(),
            name.lower(),
            name.swapcase(),
            name.casefold(),
            fullwidth(name),
            unicodedata.normalize("NFD", name),
            unicodedata.normalize("NFKC", name),
            name + "2",
            "".join(LOOKALIKES.get(char, char) for char in name),
            "".join(LOOKALIKES.get(char, char) for char in name.upper()),
        ]
    )


def name_line(name: str) -> bytes:
    """`USERNAME <name>` without an end: the strategies add one."""
    return username(name, end=b"")


def insert(base: bytes, extra: bytes, position: int) -> bytes:
    position = min(position, len(base))
    return base[:position] + extra + base[position:]


bad_name_lines = st.one_of(
    st.sampled_from([b"USERNAME", b"USERNAME "]),
    st.builds(
        lambda name, char, at: b"USERNAME " + insert(name.encode(), char.encode(), at),
        fresh_names,
        st.sampled_from(SPACES + CONTROLS + FORMATS + INVISIBLES),
        st.integers(0, 40),
    ),
    # A combining mark first: nothing to sit on.
    fresh_names.map(lambda name: b"USERNAME \xcc\x81" + name.encode()),
    st.builds(
        lambda name, bad, at: b"USERNAME " + insert(name.encode(), bad, at),
        fresh_names,
        st.sampled_from(INVALID_UTF8),
        st.integers(0, 40),
    ),
    # An argument starting with the second of two spaces holds a space.
    fresh_names.map(lambda name: b"USERNAME  " + name.encode()),
    boundary_names.map(name_line),
)


MESSAGE_TOKENS: Final = (
    "hi",
    "Hello, world!",
    " ",
    "\t",
    "é",
    "e\u0301",
    "日本語",
    "🙂",
    "👩\u200d💻",
    "👨\u200d👩\u200d👧",
    "🏳\ufe0f\u200d🌈",
    "\u200b",
    "\u00a0",
    "\u3000",
    "\u2028",
    "SEND x",
    "USERNAME y",
    "RECEIVE a b",
    "ERROR",
)


good_messages = (
    st.builds(
        lambda lead, tokens: lead + "".join(tokens),
        st.sampled_from(["", " ", "  ", "\t", " \t"]),
        st.lists(st.sampled_from(MESSAGE_TOKENS), min_size=1, max_size=8),
    )
    .map(str.encode)
    .filter(lambda message: model_message_error(message) is None)
)


send_lines = good_messages.map(lambda message: b"SEND " + message)


bad_send_lines = st.one_of(
    st.sampled_from([b"SEND", b"SEND "]),
    # Whitespace only (NEL and \x1f are whitespace before they are controls).
    st.lists(st.sampled_from(SPACES), min_size=1, max_size=4).map(
        lambda spaces: b"SEND " + "".join(spaces).encode()
    ),
    st.builds(
        lambda message, bad, at: b"SEND " + insert(message, bad, at),
        good_messages,
        st.sampled_from(
            [
                b"\x1b[2J",
                b"\x1b]0;owned\x07",
                b"\x00",
                b"\x7f",
                b"\xc2\x9b",
                b"\r",
                b"\x08",
                *INVALID_UTF8,
            ]
        ),
        st.integers(0, 60),
    ),
)


unknown_lines = st.one_of(
    st.sampled_from(
        [
            b"PING",
            b"send hi",
            b"SENDhi",
            b"USERNAMEx y",
            b" SEND hi",
            b"SEND\thi",
            b"Send hi",
            b"username bob",
            b"RECEIVE a b",
            b"\x00",
            b"\xfeSEND hi",
            b"\x1b[2J",
            b"QUIT",
        ]
    ),
    st.binary(min_size=1, max_size=12).filter(lambda line: b"\n" not in line).map(no_iac),
)


@st.composite
def lines_near_limit(draw: st.DrawFn) -> bytes:
    """A line of 4,093 to 5,200 bytes, filled with characters of 1 to 4
    bytes, so that a byte/character mix-up shows at the 4,096 limit."""
    head = draw(st.sampled_from([b"SEND ", b"USERNAME ", b"NOPE "]))
    length = draw(st.one_of(st.integers(4093, 4099), st.integers(4100, 5200)))
    fill = draw(st.sampled_from(["x", "é", "🙂", "\t"])).encode()
    body = head + fill * ((length - len(head)) // len(fill))
    return body + b"x" * (length - len(body))


# --- The state machine -------------------------------------------------------


MAX_PEERS: Final = 6


class Peer:
    """One test connection in the machine's bundle."""

    def __init__(self, ident: int, conn: Client) -> None:
        self.ident = ident
        self.conn = conn

    def __repr__(self) -> str:
        return f"peer{self.ident}"


class ChatMachine(RuleBasedStateMachine):
    """Up to six clients on one fresh server; after every step each live
    client's whole stream is compared with what the room model predicts.

    Disconnect timing: a close or reset is seen by the server some time
    after the client's call returns, so the step that does it also proves
    the server has let go. For a client that held a name, a fresh probe
    connection polls (with a deadline) until it can take that name, then
    half-closes and reads to EOF; the server frees a name before it closes
    the connection, so the EOF proves the name is free again. Only then does
    the step end, so later steps never race with the disconnect. A half-close
    needs no polling: the client reads to EOF itself, and the name must then
    be free at the first try. A client without a name leaves no trace the
    others could see, so its disconnect needs no proof.
    """

    peers = Bundle("peers")

    def __init__(self) -> None:
        super().__init__()
        self.running: RunningServer = self.open_server()
        self.room = RoomModel()
        self.live: dict[int, Peer] = {}
        self.pending: dict[int, list[bytes]] = {}  # lines due, not yet read
        self.seen_names: list[str] = []  # every name ever accepted
        self.next_ident = 0

    def teardown(self) -> None:
        self.running.stop()

    def open_server(self) -> RunningServer:
        return start_server()

    def open_client(self, ident: int) -> Client:
        """The connection of peer number `ident`."""
        return self.running.client()

    # --- model bookkeeping ------------------------------------------------

    def expect(self, outputs: list[Output]) -> None:
        for who, line in outputs:
            self.pending[who].append(line)
        for name in self.room.names.values():
            if name not in self.seen_names:
                self.seen_names.append(name)

    def forget(self, peer: Peer) -> None:
        self.room.leave(peer.ident)
        del self.live[peer.ident]
        del self.pending[peer.ident]

    def check(self, peer: Peer, got: list[bytes]) -> None:
        want = self.pending[peer.ident]
        assert got == want, f"{peer}: got {got!r}, expected {want!r}"
        want.clear()

    def check_everyone(self, data: st.DataObject, *, but: Peer | None = None) -> None:
        """Sync every live client (`but` one) and compare its whole stream.
        The SYNCs go out together and are read afterwards: each stream is
        independent."""
        peers = [peer for peer in self.live.values() if peer is not but]
        # One way of cutting for all: a draw per client would make failures
        # much slower to shrink, for no new kind of input.
        cuts = data.draw(cut_points(len(SYNC)), label="sync cuts")
        for peer in peers:
            for start, end in pairwise([0, *cuts, len(SYNC)]):
                peer.conn.send(SYNC[start:end])
        for peer in peers:
            self.check(peer, read_through_sync(peer.conn, self.pending[peer.ident]))

    def act(
        self,
        peer: Peer,
        payload: bytes,
        data: st.DataObject,
        *,
        head_sent: int = 0,
        but: Peer | None = None,
    ) -> None:
        """`peer` sends `payload` (of which the first `head_sent` bytes went
        out earlier); then every stream (but `but`'s) must be as predicted.
        The acting client's SYNC travels with its payload; the others sync
        only once its reply proves every RECEIVE it caused has been sent."""
        self.expect(self.room.feed_stream(peer.ident, payload, at_eof=False))
        send_randomly_cut(data, peer.conn, payload[head_sent:] + SYNC)
        self.check(peer, read_through_sync(peer.conn, self.pending[peer.ident]))
        self.check_everyone(data, but=but)

    def prove_name_free(self, name: str, *, may_wait: bool) -> None:
        """A fresh probe takes `name` (polling until `TIMEOUT` if `may_wait`),
        then gives it back by half-closing and reading to EOF. Nobody sends
        meanwhile, so the probe receives nothing but its replies."""
        probe = self.running.client()

        def taken() -> bool:
            probe.send(username(name) + SYNC)
            reply = read_through_sync(probe, [])
            if reply == []:
                return True
            assert reply == [NAME_TAKEN], reply
            assert may_wait, f"{name!r} is still taken after its holder got EOF"
            return False

        poll(f"{name!r} to be freed", taken)
        assert probe.half_close() == b""

    # --- rules --------------------------------------------------------------

    @invariant()
    def server_is_running(self) -> None:
        assert self.running.thread.is_alive()

    def new_peer(self) -> Peer:
        peer = Peer(self.next_ident, self.open_client(self.next_ident))
        self.next_ident += 1
        self.live[peer.ident] = peer
        self.pending[peer.ident] = []
        return peer

    # Disconnect rules use clients up, so without a head start and a second
    # way in, most runs would have one client and no RECEIVE to check.
    @initialize(
        target=peers,
        names=st.lists(st.one_of(st.none(), fresh_names), min_size=2, max_size=4),
        data=st.data(),
    )
    def first_peers(self, names: list[str | None], data: st.DataObject) -> MultipleResults[Peer]:
        peers = [self.new_peer() for _ in names]
        for peer, name in zip(peers, names, strict=True):
            if name is not None:
                self.act(peer, username(name, data.draw(line_endings)), data)
        return multiple(*peers)

    @precondition(lambda self: len(self.live) < MAX_PEERS)
    @rule(target=peers)
    def connect(self) -> Peer:
        return self.new_peer()

    @precondition(lambda self: len(self.live) < MAX_PEERS)
    @rule(target=peers, name=fresh_names, data=st.data())
    def connect_and_take_a_name(self, name: str, data: st.DataObject) -> Peer:
        peer = self.new_peer()
        self.act(peer, username(name, data.draw(line_endings)), data)
        return peer

    def name_lines(self) -> st.SearchStrategy[bytes]:
        """Valid names, fresh or spelled like one seen before (taken or not)."""
        fresh = st.one_of(fresh_names, fresh_names, boundary_names)
        if not self.seen_names:
            return fresh.map(name_line)
        seen = st.sampled_from(self.seen_names).flatmap(name_variants)
        return st.one_of(fresh, seen, seen).map(name_line)

    def any_line(self) -> st.SearchStrategy[bytes]:
        return st.one_of(
            self.name_lines(),
            bad_name_lines,
            send_lines,
            bad_send_lines,
            unknown_lines,
            st.just(b""),
        )

    @rule(peer=peers, data=st.data())
    def set_name(self, peer: Peer, data: st.DataObject) -> None:
        self.act(peer, data.draw(self.name_lines()) + data.draw(line_endings), data)

    @rule(peer=peers, data=st.data())
    def set_bad_name(self, peer: Peer, data: st.DataObject) -> None:
        self.act(peer, data.draw(bad_name_lines) + data.draw(line_endings), data)

    @rule(peer=peers, data=st.data())
    def send_message(self, peer: Peer, data: st.DataObject) -> None:
        self.act(peer, data.draw(send_lines) + data.draw(line_endings), data)

    @rule(peer=peers, data=st.data())
    def send_bad_message(self, peer: Peer, data: st.DataObject) -> None:
        self.act(peer, data.draw(bad_send_lines) + data.draw(line_endings), data)

    @rule(peer=peers, data=st.data())
    def send_unknown_command(self, peer: Peer, data: st.DataObject) -> None:
        self.act(peer, data.draw(unknown_lines) + data.draw(line_endings), data)

    @rule(peer=peers, data=st.data())
    def send_blank_line(self, peer: Peer, data: st.DataObject) -> None:
        self.act(peer, data.draw(line_endings), data)

    @rule(peer=peers, data=st.data())
    def send_long_line(self, peer: Peer, data: st.DataObject) -> None:
        self.act(peer, data.draw(lines_near_limit()) + data.draw(line_endings), data)

    @rule(peer=peers, data=st.data())
    def send_burst(self, peer: Peer, data: st.DataObject) -> None:
        """Several lines in one go: the server must answer them in order."""
        lines = data.draw(st.lists(self.any_line(), min_size=2, max_size=5))
        self.act(peer, b"".join(line + data.draw(line_endings) for line in lines), data)

    @precondition(lambda self: len(self.live) >= 2)
    @rule(first=peers, data=st.data())
    def interleave(self, first: Peer, data: st.DataObject) -> None:
        """`first` sends part of a line; another client acts in full; then
        `first` ends its line. A connection's unfinished line must neither
        be processed early nor hold up the others, and must not change what
        that connection receives meanwhile. (No over-long line here: when
        its answer comes relative to the other client's lines is not in the
        contract.)"""
        second = data.draw(st.sampled_from([p for p in self.live.values() if p is not first]))
        line = data.draw(self.any_line()) + data.draw(line_endings)
        cut = data.draw(st.integers(0, len(line) - 1), label="cut")
        send_randomly_cut(data, first.conn, line[:cut])
        self.act(second, data.draw(self.any_line()) + data.draw(line_endings), data, but=first)
        self.act(first, line, data, head_sent=cut)

    @rule(peer=consumes(peers), data=st.data())
    def close(self, peer: Peer, data: st.DataObject) -> None:
        """A plain close, after a few last lines that get no reply (valid
        SENDs, blank lines): 'lines already received are processed'. Lines
        with a reply are left out on purpose: a reply reaching a closed
        socket makes its kernel answer RST, which may rightly destroy the
        lines the server has not read yet."""
        name = self.room.names.get(peer.ident)
        farewell = b""
        if name is not None:
            lines = data.draw(st.lists(st.one_of(send_lines, st.just(b"")), max_size=3))
            farewell = b"".join(line + data.draw(line_endings) for line in lines)
        outputs = self.room.feed_stream(peer.ident, farewell, at_eof=True)
        assert all(who != peer.ident for who, _ in outputs), "the model expects a reply"
        self.forget(peer)
        self.expect(outputs)
        if farewell:
            send_randomly_cut(data, peer.conn, farewell)
        peer.conn.close()
        if name is not None:
            # Once the name is free the close is processed, and so is every
            # line before it: the RECEIVEs are out before the others sync.
            self.prove_name_free(name, may_wait=True)
        self.check_everyone(data)

    @rule(peer=consumes(peers), data=st.data())
    def reset(self, peer: Peer, data: st.DataObject) -> None:
        """An RST instead of a FIN: that client is dropped, silently."""
        name = self.room.names.get(peer.ident)
        self.forget(peer)
        peer.conn.reset()
        if name is not None:
            self.prove_name_free(name, may_wait=True)
        self.check_everyone(data)

    def unfinished_lines(self, peer: Peer) -> st.SearchStrategy[bytes]:
        """What `peer` may send after its last "\\n", before its end of input."""
        return st.one_of(st.just(b""), self.any_line(), self.any_line().map(lambda x: x + b"\r"))

    @rule(peer=consumes(peers), data=st.data())
    def half_close(self, peer: Peer, data: st.DataObject) -> None:
        """shutdown(SHUT_WR), maybe after a last line without "\\n": every
        line is processed, the replies arrive, then EOF and the name is free."""
        lines = data.draw(st.lists(self.any_line(), max_size=2))
        payload = b"".join(line + data.draw(line_endings) for line in lines)
        payload += data.draw(self.unfinished_lines(peer))
        self.expect(self.room.feed_stream(peer.ident, payload, at_eof=True))
        name = self.room.names.get(peer.ident)
        want = b"".join(line + b"\n" for line in self.pending[peer.ident])
        self.forget(peer)
        send_randomly_cut(data, peer.conn, payload)
        got = peer.conn.half_close()
        assert got == want, f"{peer}: got {got!r} before EOF, expected {want!r}"
        if name is not None:
            self.prove_name_free(name, may_wait=False)
        self.check_everyone(data)


def machine_settings() -> settings:
    """The loaded profile with a bounded budget: a run of 35 steps over real
    sockets costs about as much as a hundred plain examples. The soak
    profile keeps its own (much larger) number of examples."""
    current = settings()
    examples = current.max_examples
    if os.environ.get("HYPOTHESIS_PROFILE", "ci") != "soak":
        examples = min(examples, 60)
    return settings(
        current, max_examples=examples, stateful_step_count=40, report_multiple_bugs=False
    )
