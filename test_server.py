"""The real server over real sockets, against PROTOCOL.md (all of it but
"Cluster mode").

Ordering rests on one fact: the server processes each connection's lines in
order, so once a client's `PING` (an unknown command) has been answered,
everything it sent before has been processed, and every RECEIVE it caused
has been handed to the recipients' sockets. Tests wait on such replies
(`Client.sync`), never on the clock; every read has a timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Final

import pytest

import chat
from chat import ChatServer
from conftest import (
    HERE,
    SYNC,
    SYNC_REPLY,
    TIMEOUT,
    Client,
    RunningServer,
    ServerProcess,
    spawn_server,
    start_server,
)

# --- The contract, row by row ---

# Every line the server may send, spelled as in PROTOCOL.md, without "\n".
# Typed here rather than imported from protocol.py so that a typo there is
# caught here.
LINE_TOO_LONG: Final = b"ERROR Line too long."
NAME_EMPTY: Final = b"ERROR Username cannot be empty."
NAME_INVALID: Final = b"ERROR Username contains invalid characters."
NAME_HAS_SPACES: Final = b"ERROR Username contains empty spaces."
NAME_TOO_LONG: Final = b"ERROR Username is too long."
NAME_TAKEN: Final = b"ERROR Username already in use."
NAME_REQUIRED: Final = b"ERROR You must set a username first."
MESSAGE_EMPTY: Final = b"ERROR Message cannot be empty."
MESSAGE_INVALID: Final = b"ERROR Message contains invalid characters."
UNRECOGNISED: Final = b"ERROR Unrecognised command."
SERVER_FULL: Final = b"ERROR Server is full."

MAX_LINE: Final = 4096  # bytes, not counting "\r\n" or "\n"

# The zero-width joiner sequence "woman technologist": format characters
# (Cf) are allowed in messages.
ZWJ_EMOJI: Final = "\U0001f469\u200d\U0001f4bb"


def username(name: str | bytes) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    return b"USERNAME " + raw + b"\n"


def send_line(message: str | bytes) -> bytes:
    raw = message.encode() if isinstance(message, str) else message
    return b"SEND " + raw + b"\n"


def receive(name: str, message: str | bytes) -> bytes:
    """A RECEIVE line as a client sees it, without its "\\n"."""
    raw = message.encode() if isinstance(message, str) else message
    return b"RECEIVE " + name.encode() + b" " + raw


def member(running: RunningServer, name: str) -> Client:
    client = running.client()
    client.register(name)
    return client


def read_exactly(client: Client, size: int) -> bytes:
    """The next `size` bytes from `client`, through its line buffer; each
    recv is bounded by the socket's timeout."""
    data = client.buffer
    while len(data) < size:
        chunk = client.sock.recv(65536)
        if not chunk:
            raise EOFError(f"closed after {data!r}")
        data += chunk
    client.buffer = data[size:]
    return data[:size]


def expect_exactly(client: Client, expected: bytes) -> None:
    """`client` receives exactly `expected` and, as its sync proves, nothing
    more so far."""
    assert read_exactly(client, len(expected)) == expected
    assert client.sync() == []


def sync_unrecognised(client: Client) -> list[bytes]:
    """Like `Client.sync`, for tests that expect `ERROR Unrecognised
    command.` (the reply to PING): syncs with `USERNAME`, which is refused
    as empty and changes nothing, and returns every line before its reply."""
    client.send(b"USERNAME\n")
    return client.until(NAME_EMPTY)


def send_in_pieces(client: Client, data: bytes, sizes: Sequence[int], pace: float = 0.0) -> None:
    """Send `data` cut into pieces of the given sizes (cycled), one sendall
    each. `pace` only spaces the packets out so that the server is likelier
    to read them one by one; nothing waits on the server."""
    position = 0
    index = 0
    while position < len(data):
        size = sizes[index % len(sizes)]
        client.send(data[position : position + size])
        position += size
        index += 1
        if pace:
            time.sleep(pace)


def half_close(client: Client) -> bytes:
    """Send end of input; return everything until the server closes."""
    client.sock.shutdown(socket.SHUT_WR)
    return client.read_to_eof()


def take_name_within(client: Client, name: str, seconds: float) -> None:
    """Retry USERNAME until accepted: for names freed by an event the test
    cannot sync on (a reset, a slow consumer). Bounded by a deadline."""
    deadline = time.monotonic() + seconds
    while True:
        client.send(username(name))
        reply = client.sync()
        if reply == []:
            return
        assert reply == [NAME_TAKEN]
        assert time.monotonic() < deadline, f"{name!r} was never freed"
        time.sleep(0.02)  # polling pace, not a wait for a known event


class SmallBufferClient(Client):
    """A Client whose receive buffer is set before connecting, so that the
    window it advertises stays small."""

    def __init__(self, address: tuple[str, int], receive_buffer: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.settimeout(TIMEOUT)
        sock.connect(address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.buffer = b""


# --- 1. The seed sessions (README / the brief), byte for byte -------------

SEED_ONE_INPUT: Final = b"USERNAME teixe\nSEND Hello, world!\nUSERNAME not valid\n"
SEED_ONE_REPLY: Final = NAME_HAS_SPACES + b"\n"


def test_seed_session_one(server: RunningServer) -> None:
    teixe = server.client()
    teixe.send(SEED_ONE_INPUT)
    expect_exactly(teixe, SEED_ONE_REPLY)
    teixe.send(b"NOT_A_COMMAND test\n")
    expect_exactly(teixe, UNRECOGNISED + b"\n")


def test_seed_session_two(server: RunningServer) -> None:
    teixe = server.client()
    jeff = server.client()
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


# --- 2. USERNAME, row by row ----------------------------------------------

# (the USERNAME line without "\n", the reply to a connection without a name)
USERNAME_ROWS: Final[list[tuple[bytes, bytes]]] = [
    # empty
    (b"USERNAME", NAME_EMPTY),
    (b"USERNAME ", NAME_EMPTY),
    # not valid UTF-8 (checked before whitespace: the last row has a space)
    (b"USERNAME \xff", NAME_INVALID),
    (b"USERNAME te\xc3ixe", NAME_INVALID),
    (b"USERNAME \xc0\xaf", NAME_INVALID),
    (b"USERNAME \xed\xa0\x80", NAME_INVALID),
    (b"USERNAME \xf4\x90\x80\x80", NAME_INVALID),
    (b"USERNAME a b\xff", NAME_INVALID),
    # whitespace by str.isspace(), anywhere in the name
    (b"USERNAME te ixe", NAME_HAS_SPACES),
    (b"USERNAME  teixe", NAME_HAS_SPACES),
    (b"USERNAME teixe ", NAME_HAS_SPACES),
    (b"USERNAME te\tixe", NAME_HAS_SPACES),
    (username("te\u00a0ixe")[:-1], NAME_HAS_SPACES),
    (username("te\u3000ixe")[:-1], NAME_HAS_SPACES),
    (username("te\u2028ixe")[:-1], NAME_HAS_SPACES),
    # Cc and whitespace at once: the whitespace row comes first
    (b"USERNAME te\x0bixe", NAME_HAS_SPACES),
    (b"USERNAME te\x1cixe", NAME_HAS_SPACES),
    (username("te\u0085ixe")[:-1], NAME_HAS_SPACES),
    (b"USERNAME \x1b[31m red", NAME_HAS_SPACES),
    # control (Cc) or format (Cf)
    (b"USERNAME te\x1bixe", NAME_INVALID),
    (b"USERNAME te\x00ixe", NAME_INVALID),
    (b"USERNAME te\x7fixe", NAME_INVALID),
    (username("te\u009bixe")[:-1], NAME_INVALID),
    (username("te\u200bixe")[:-1], NAME_INVALID),
    (username("te\u200dixe")[:-1], NAME_INVALID),
    (username("\u202eexiet")[:-1], NAME_INVALID),
    (username("\ufeffteixe")[:-1], NAME_INVALID),
    (username("te\u00adixe")[:-1], NAME_INVALID),
    # control before length
    (username("\x1b" * 40)[:-1], NAME_INVALID),
    # longer than 32 code points, whatever their size in bytes
    (username("a" * 33)[:-1], NAME_TOO_LONG),
    (username("é" * 33)[:-1], NAME_TOO_LONG),
    (username("あ" * 33)[:-1], NAME_TOO_LONG),
    (username("🙂" * 33)[:-1], NAME_TOO_LONG),
    (username("e\u0301" * 17)[:-1], NAME_TOO_LONG),  # 17 letters, 34 code points
]


@pytest.mark.parametrize(
    ("line", "reply"), USERNAME_ROWS, ids=[repr(line[9:])[:40] for line, _ in USERNAME_ROWS]
)
def test_username_refused(server: RunningServer, line: bytes, reply: bytes) -> None:
    client = server.client()
    client.send(line + b"\n")
    assert client.sync() == [reply]
    # Refused means no name: SEND still asks for one.
    client.send(b"SEND hi\n")
    assert client.sync() == [NAME_REQUIRED]


@pytest.mark.parametrize(
    "name",
    [
        "teixe",
        "a" * 32,
        "é" * 32,  # 32 code points, 64 bytes
        "あ" * 32,  # 96 bytes
        "🙂" * 32,  # 128 bytes
        "e\u0301" * 16,  # 32 code points
        "ｔｅｉｘｅ",
        "Zoë",
        "a-b_c.d!?",
        "ERROR",
        "RECEIVE",
    ],
    ids=lambda name: ascii(name)[:24],
)
def test_username_accepted_silently_and_shown_as_typed(server: RunningServer, name: str) -> None:
    watcher = member(server, "watcher")
    client = server.client()
    client.send(username(name))
    assert client.sync() == []
    client.send(b"SEND hi\n")
    assert client.sync() == []
    assert watcher.sync() == [receive(name, "hi")]


@pytest.mark.parametrize(
    ("holder", "attempt"),
    [
        ("teixe", "teixe"),
        ("teixe", "Teixe"),
        ("teixe", "TEIXE"),
        ("teixe", "ｔｅｉｘｅ"),
        ("teixe", "ＴＥＩＸＥ"),
        ("ｔｅｉｘｅ", "teixe"),
        ("fish", "\ufb01sh"),  # the "fi" ligature: NFKC makes it "fi"
        ("strasse", "STRAẞE"),  # casefold makes "ß" and "ẞ" "ss"
        ("Kelvin", "\u212aelvin"),  # the Kelvin sign: NFKC makes it K
    ],
    ids=lambda name: ascii(name)[:24],
)
def test_username_taken(server: RunningServer, holder: str, attempt: str) -> None:
    first = member(server, holder)
    second = server.client()
    second.send(username(attempt))
    assert second.sync() == [NAME_TAKEN]
    # The holder keeps it, and the second connection has no name.
    second.send(b"SEND hi\n")
    assert second.sync() == [NAME_REQUIRED]
    observer = member(server, "observer")
    first.send(b"SEND still mine\n")
    assert first.sync() == []
    assert observer.sync() == [receive(holder, "still mine")]


def test_sending_own_name_again_is_silent(server: RunningServer) -> None:
    teixe = member(server, "teixe")
    jeff = member(server, "jeff")
    teixe.send(b"USERNAME teixe\nUSERNAME teixe\n")
    assert teixe.sync() == []
    teixe.send(b"SEND hi\n")
    assert teixe.sync() == []
    assert jeff.sync() == [receive("teixe", "hi")]


def test_own_name_in_another_case_is_not_taken_and_is_shown_as_typed(
    server: RunningServer,
) -> None:
    # "held by another connection" is the taken row: the holder itself may
    # respell its name, and the new spelling is what others see.
    teixe = member(server, "teixe")
    jeff = member(server, "jeff")
    teixe.send(username("TEIXE"))
    assert teixe.sync() == []
    teixe.send(b"SEND hi\n")
    assert teixe.sync() == []
    assert jeff.sync() == [receive("TEIXE", "hi")]


def test_rename_frees_old_name_at_once(server: RunningServer) -> None:
    teixe = member(server, "teixe")
    watcher = member(server, "watcher")
    teixe.send(username("bob"))
    assert teixe.sync() == []
    # No waiting: the next connection to ask gets the old name.
    newcomer = server.client()
    newcomer.send(username("Teixe"))
    assert newcomer.sync() == []
    teixe.send(b"SEND from bob\n")
    assert teixe.sync() == []
    newcomer.send(b"SEND from the new Teixe\n")
    assert newcomer.sync() == [receive("bob", "from bob")]
    assert watcher.sync() == [receive("bob", "from bob"), receive("Teixe", "from the new Teixe")]


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"USERNAME not valid", NAME_HAS_SPACES),
        (b"USERNAME", NAME_EMPTY),
        (b"USERNAME \xff", NAME_INVALID),
        (b"USERNAME te\x1bixe", NAME_INVALID),
        (username("x" * 33)[:-1], NAME_TOO_LONG),
        (b"USERNAME JEFF", NAME_TAKEN),
    ],
    ids=repr,
)
def test_rejected_username_keeps_the_old_name(
    server: RunningServer, line: bytes, reply: bytes
) -> None:
    teixe = member(server, "teixe")
    jeff = member(server, "jeff")
    teixe.send(line + b"\n")
    assert teixe.sync() == [reply]
    teixe.send(b"SEND still teixe\n")
    assert teixe.sync() == []
    assert jeff.sync() == [receive("teixe", "still teixe")]
    # And the old name is still held.
    other = server.client()
    other.send(username("teixe"))
    assert other.sync() == [NAME_TAKEN]


# --- 2. SEND, row by row ---------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [b"SEND hi", b"SEND", b"SEND ", b"SEND \xff", b"SEND \x1b[2J", b"SEND   "],
    ids=repr,
)
def test_send_before_a_name(server: RunningServer, line: bytes) -> None:
    # The missing name is reported first, whatever the message.
    bystander = member(server, "bystander")
    client = server.client()
    client.send(line + b"\n")
    assert client.sync() == [NAME_REQUIRED]
    assert bystander.sync() == []


# (a SEND line without "\n", the reply to a connection with a name)
REFUSED_SENDS: Final[list[tuple[bytes, bytes]]] = [
    # empty, or whitespace only
    (b"SEND", MESSAGE_EMPTY),
    (b"SEND ", MESSAGE_EMPTY),
    (b"SEND  ", MESSAGE_EMPTY),
    (b"SEND     ", MESSAGE_EMPTY),
    (b"SEND \t", MESSAGE_EMPTY),
    (b"SEND  \t \t", MESSAGE_EMPTY),
    (send_line("\u00a0\u3000\u2028")[:-1], MESSAGE_EMPTY),
    # not valid UTF-8
    (b"SEND \xff", MESSAGE_INVALID),
    (b"SEND caf\xc3", MESSAGE_INVALID),
    (b"SEND \xc0\xaf", MESSAGE_INVALID),
    (b"SEND \xed\xa0\x80", MESSAGE_INVALID),
    (b"SEND \xf4\x90\x80\x80", MESSAGE_INVALID),
    (b"SEND \xff ", MESSAGE_INVALID),  # not valid UTF-8, so not "whitespace"
    (b"SEND hello \x80 world", MESSAGE_INVALID),
    # a control character other than TAB
    (b"SEND \x1b[31mred", MESSAGE_INVALID),
    (b"SEND \x1b]0;pwned\x07", MESSAGE_INVALID),
    (b"SEND a\x00b", MESSAGE_INVALID),
    (b"SEND bell\x07", MESSAGE_INVALID),
    (b"SEND back\x08space", MESSAGE_INVALID),
    (b"SEND a\x0bb", MESSAGE_INVALID),
    (b"SEND a\x0cb", MESSAGE_INVALID),
    (b"SEND a\x1cb", MESSAGE_INVALID),
    (b"SEND del\x7f", MESSAGE_INVALID),
    (send_line("csi\u009b31m")[:-1], MESSAGE_INVALID),
    (send_line("next\u0085line")[:-1], MESSAGE_INVALID),
    (b"SEND a\rb", MESSAGE_INVALID),  # a lone "\r" is a control, not a line end
]


@pytest.mark.parametrize(
    ("line", "reply"), REFUSED_SENDS, ids=[repr(line[4:])[:30] for line, _ in REFUSED_SENDS]
)
def test_send_refused(server: RunningServer, line: bytes, reply: bytes) -> None:
    sender = member(server, "sender")
    other = member(server, "other")
    sender.send(line + b"\n")
    assert sender.sync() == [reply]
    assert other.sync() == []


@pytest.mark.parametrize("message", [b"\x0b", b"\x1c\x1d", "\u0085".encode(), b" \x0c "])
def test_send_of_only_whitespace_controls_is_refused(server: RunningServer, message: bytes) -> None:
    # Both the "empty" row (str.isspace() is true) and the "control
    # character" row apply; PROTOCOL.md does not say which comes first for
    # SEND, so either reply is accepted, but nothing may be relayed.
    sender = member(server, "sender")
    other = member(server, "other")
    sender.send(send_line(message))
    assert sender.sync() in ([MESSAGE_EMPTY], [MESSAGE_INVALID])
    assert other.sync() == []


# Messages relayed byte for byte.
RELAYED_MESSAGES: Final[list[bytes]] = [
    b"Hello, world!",
    b"a\tb",
    b"\tleading tab",
    b"   leading and trailing spaces   ",
    b" x",
    ZWJ_EMOJI.encode(),
    "zero\u200bwidth, \u202eRTL override and \ufeffBOM are Cf".encode(),
    "non\u00a0breaking \u3000 ideographic space".encode(),
    "שלום עולם".encode(),
    b"SEND USERNAME x",
    b"ERROR Unrecognised command.",
    b"RECEIVE someone else",
    b"100% \\n not a newline",
]


@pytest.mark.parametrize("message", RELAYED_MESSAGES, ids=lambda m: repr(m)[:30])
def test_send_relayed_byte_for_byte(server: RunningServer, message: bytes) -> None:
    sender = member(server, "sender")
    other = member(server, "other")
    sender.send(send_line(message))
    assert sender.sync() == []
    expect_exactly(other, b"RECEIVE sender " + message + b"\n")


@pytest.mark.parametrize(
    "line",
    [
        b"send hi",
        b"SENDhi",
        b"USERNAMEx y",
        b"Send hi",
        b"username teixe",
        b" SEND hi",
        b"SEND\thi",
        b"USERNAME\tteixe",
        b"NOT_A_COMMAND test",
        b"\x00",
        b"\xff\xfe\xfd",
        b"\x1b[2J",
        "ＳＥＮＤ hi".encode(),
        *(
            bytes(b for b in random.Random(seed).randbytes(200) if b not in b"\r\n")
            for seed in range(3)
        ),
    ],
    ids=lambda line: repr(line)[:30],
)
def test_unknown_commands(server: RunningServer, line: bytes) -> None:
    bystander = member(server, "bystander")
    client = server.client()
    client.send(line + b"\n")
    assert sync_unrecognised(client) == [UNRECOGNISED]
    # Nothing was set or relayed by it.
    client.send(b"SEND hi\n")
    assert client.sync() == [NAME_REQUIRED]
    # The same from a connection with a name.
    client.register("named")
    client.send(line + b"\n")
    assert sync_unrecognised(client) == [UNRECOGNISED]
    assert bystander.sync() == []


# --- 3. Delivery -----------------------------------------------------------


def test_sender_never_receives_its_own_messages(server: RunningServer) -> None:
    alice = member(server, "alice")
    bob = member(server, "bob")
    alice.send(b"".join(send_line(f"m{i}") for i in range(50)))
    assert alice.sync() == []
    assert bob.sync() == [receive("alice", f"m{i}") for i in range(50)]


def test_connections_without_a_name_receive_nothing(server: RunningServer) -> None:
    alice = member(server, "alice")
    bob = member(server, "bob")
    silent = server.client()
    refused = server.client()
    refused.send(b"USERNAME not valid\n")
    assert refused.sync() == [NAME_HAS_SPACES]
    alice.send(b"SEND before\n")
    assert alice.sync() == []
    assert bob.sync() == [receive("alice", "before")]
    assert silent.sync() == []
    assert refused.sync() == []
    # Once named, a connection gets what is sent from then on, only.
    silent.register("late")
    alice.send(b"SEND after\n")
    assert alice.sync() == []
    assert silent.sync() == [receive("alice", "after")]
    assert refused.sync() == []


def test_every_recipient_sees_one_global_order(server: RunningServer) -> None:
    sender_count, listener_count, per_sender = 6, 10, 150
    senders = [member(server, f"s{i}") for i in range(sender_count)]
    listeners = [member(server, f"l{i}") for i in range(listener_count)]
    # What each sender read before its own sync replies: RECEIVEs from the
    # other senders, which send at the same time.
    early: dict[int, list[bytes]] = {i: [] for i in range(sender_count)}
    failures: list[BaseException] = []
    start = threading.Barrier(sender_count)

    def run(index: int) -> None:
        try:
            start.wait(TIMEOUT)
            for first in range(0, per_sender, 5):
                burst = b"".join(send_line(f"{index}:{j}") for j in range(first, first + 5))
                senders[index].send(burst)
                # Waiting for each burst to be processed makes the senders
                # take turns, so the bursts interleave in the global order.
                early[index] += senders[index].sync()
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(sender_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(4 * TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    # Every SEND has been processed and handed to every recipient.
    reference = listeners[0].sync()
    assert len(reference) == sender_count * per_sender
    for i in range(sender_count):
        mine = [line for line in reference if line.startswith(f"RECEIVE s{i} ".encode())]
        assert mine == [receive(f"s{i}", f"{i}:{j}") for j in range(per_sender)]
    for listener in listeners[1:]:
        assert listener.sync() == reference
    for i, sender in enumerate(senders):
        seen = early[i] + sender.sync()
        assert seen == [
            line for line in reference if not line.startswith(f"RECEIVE s{i} ".encode())
        ]


# --- 4. Framing --------------------------------------------------------------


def test_seed_sessions_one_byte_per_send(server: RunningServer) -> None:
    one_byte = [1]
    pace = 0.001  # spaces the bytes out so the server sees them one by one
    teixe = server.client()
    send_in_pieces(teixe, SEED_ONE_INPUT + b"NOT_A_COMMAND test\n", one_byte, pace)
    expect_exactly(teixe, SEED_ONE_REPLY + UNRECOGNISED + b"\n")
    jeff = server.client()
    send_in_pieces(jeff, b"USERNAME jeff\n", one_byte, pace)
    assert jeff.sync() == []
    send_in_pieces(teixe, b"SEND hi\n", one_byte, pace)
    assert teixe.sync() == []
    expect_exactly(jeff, b"RECEIVE teixe hi\n")
    send_in_pieces(jeff, b"SEND bye\r\n", one_byte, pace)
    assert jeff.sync() == []
    expect_exactly(teixe, b"RECEIVE jeff bye\n")


# One connection's input, and what it and a watching member must get,
# whatever pieces the input arrives in.
CHUNKING_SCRIPT: Final = b"".join(
    [
        b"SEND early\n",
        b"USERNAME te ixe\n",
        b"USERNAME teixe\r\n",
        b"\n\r\n",
        b"SEND Hello, world!\n",
        b"SEND a\tb " + ZWJ_EMOJI.encode() + b"\r\n",
        b"USERNAME jeff\n",
        b"SEND \x1b[2J\n",
        b"send hi\n",
        b"SEND " + b"x" * (MAX_LINE - 4) + b"\r\n",  # 4097 bytes
        b"SEND " + b"y" * (MAX_LINE - 5) + b"\r\n",  # 4096 bytes
        b"SEND bye\n",
    ]
)
CHUNKING_REPLIES: Final = [
    NAME_REQUIRED,
    NAME_HAS_SPACES,
    NAME_TAKEN,
    MESSAGE_INVALID,
    UNRECOGNISED,
    LINE_TOO_LONG,
]
CHUNKING_RELAYED: Final = [
    receive("teixe", "Hello, world!"),
    receive("teixe", "a\tb " + ZWJ_EMOJI),
    receive("teixe", b"y" * (MAX_LINE - 5)),
    receive("teixe", "bye"),
]


def cuts_after(data: bytes, byte: bytes) -> list[int]:
    """Piece sizes that cut `data` right after every occurrence of `byte`."""
    ends = [i + 1 for i in range(len(data)) if data[i : i + 1] == byte] + [len(data)]
    starts = [0, *ends[:-1]]
    return [end - start for start, end in zip(starts, ends, strict=True) if end > start]


@pytest.mark.parametrize(
    "sizes",
    [
        [len(CHUNKING_SCRIPT)],
        [1],
        random.Random(7).choices(range(1, 9), k=500),
        random.Random(8).choices(range(1, 3000), k=50),
        cuts_after(CHUNKING_SCRIPT, b"\r"),
        cuts_after(CHUNKING_SCRIPT, b" "),
    ],
    ids=["whole", "bytes", "small", "large", "after-cr", "after-space"],
)
def test_same_result_whatever_the_pieces(server: RunningServer, sizes: list[int]) -> None:
    jeff = member(server, "jeff")
    client = server.client()
    send_in_pieces(client, CHUNKING_SCRIPT, sizes)
    assert sync_unrecognised(client) == CHUNKING_REPLIES
    assert jeff.sync() == CHUNKING_RELAYED


def test_many_lines_in_one_send(server: RunningServer) -> None:
    jeff = member(server, "jeff")
    teixe = server.client()
    lines = [username("teixe")] + [send_line(f"n{i}") for i in range(1000)] + [b"BAD\n"]
    teixe.send(b"".join(lines))
    assert sync_unrecognised(teixe) == [UNRECOGNISED]
    assert jeff.sync() == [receive("teixe", f"n{i}") for i in range(1000)]


def test_crlf_line_endings(server: RunningServer) -> None:
    jeff = member(server, "jeff")
    teixe = server.client()
    teixe.send(b"USERNAME teixe\r\nSEND hi\r\n")
    assert teixe.sync() == []
    # No "\r" in what is relayed: the name is "teixe", the message "hi".
    expect_exactly(jeff, b"RECEIVE teixe hi\n")
    jeff.send(b"USERNAME teixe\r\n")
    assert jeff.sync() == [NAME_TAKEN]


@pytest.mark.parametrize(
    ("data", "replies"),
    [
        (b"SEND hi\r\r\n", [MESSAGE_INVALID]),  # only one "\r" is dropped
        (b"USERNAME teixe\r\r\n", [NAME_HAS_SPACES]),  # "\r".isspace()
        (b"\r\r\n", [UNRECOGNISED]),  # a line holding one "\r" is not blank
        (b"SEND a\rb\r\n", [MESSAGE_INVALID]),
        (b"SEND \r\n", [MESSAGE_EMPTY]),
    ],
    ids=repr,
)
def test_only_one_cr_before_lf_is_dropped(
    server: RunningServer, data: bytes, replies: list[bytes]
) -> None:
    jeff = member(server, "jeff")
    client = member(server, "client")
    client.send(data)
    assert sync_unrecognised(client) == replies
    assert jeff.sync() == []


def test_blank_lines_get_no_reply(server: RunningServer) -> None:
    jeff = member(server, "jeff")
    unnamed = server.client()
    named = member(server, "named")
    for client in (unnamed, named):
        client.send(b"\n\r\n\n\r\n")
        client.send(b"\r")
        client.send(b"\n")  # "\r\n" split across two sends
        assert client.sync() == []
    assert jeff.sync() == []


def long_send(total: int) -> bytes:
    """A SEND line of exactly `total` bytes, without its terminator."""
    return b"SEND " + b"x" * (total - 5)


@pytest.mark.parametrize(
    ("pieces", "relayed"),
    [
        ([long_send(MAX_LINE) + b"\n"], True),
        ([long_send(MAX_LINE) + b"\r\n"], True),
        ([long_send(MAX_LINE) + b"\r", b"\n"], True),
        ([long_send(MAX_LINE), b"\r", b"\n"], True),
        ([long_send(MAX_LINE)[:1000], long_send(MAX_LINE)[1000:], b"\n"], True),
        ([long_send(MAX_LINE + 1) + b"\n"], False),
        ([long_send(MAX_LINE + 1) + b"\r\n"], False),
        ([long_send(MAX_LINE + 1) + b"\r", b"\n"], False),
        ([long_send(MAX_LINE), b"x", b"\n"], False),
        ([long_send(MAX_LINE) + b"\r", b"\r\n"], False),  # 4096 bytes + "\r"
        ([long_send(3 * MAX_LINE) + b"\n"], False),
    ],
    ids=[
        "4096",
        "4096-crlf",
        "4096-cr|lf",
        "4096|cr|lf",
        "4096-in-pieces",
        "4097",
        "4097-crlf",
        "4097-cr|lf",
        "4096|x|lf",
        "4096-cr|crlf",
        "12288",
    ],
)
def test_line_length_limit(server: RunningServer, pieces: list[bytes], relayed: bool) -> None:
    jeff = member(server, "jeff")
    sender = member(server, "sender")
    for piece in pieces:
        sender.send(piece)
    if relayed:
        assert sender.sync() == []
        expect_exactly(jeff, b"RECEIVE sender " + long_send(MAX_LINE)[5:] + b"\n")
    else:
        # Exactly one reply, however long the line; the connection carries on.
        assert sender.sync() == [LINE_TOO_LONG]
        assert jeff.sync() == []
    sender.send(b"SEND next\n")
    assert sender.sync() == []
    assert jeff.sync() == [receive("sender", "next")]


def test_too_long_line_then_next_line_in_the_same_piece(server: RunningServer) -> None:
    jeff = member(server, "jeff")
    sender = member(server, "sender")
    sender.send(long_send(5000) + b"\nSEND next\n" + long_send(MAX_LINE + 1) + b"\r\nSEND last\n")
    assert sender.sync() == [LINE_TOO_LONG, LINE_TOO_LONG]
    assert jeff.sync() == [receive("sender", "next"), receive("sender", "last")]


def test_one_megabyte_line(server: RunningServer) -> None:
    jeff = member(server, "jeff")
    sender = member(server, "sender")
    line = long_send(1 << 20)
    for start in range(0, len(line), 50_000):
        sender.send(line[start : start + 50_000])
    sender.send(b"\nSEND after\n")
    assert sender.sync() == [LINE_TOO_LONG]
    assert jeff.sync() == [receive("sender", "after")]


# --- 5. Failures -------------------------------------------------------------


def test_reset_client_does_not_disturb_others_and_frees_its_name(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chat")
    alice = member(server, "alice")
    bob = member(server, "bob")
    doomed = member(server, "doomed")
    # Unread input on the doomed side when it resets.
    alice.send(b"SEND unread\n")
    assert alice.sync() == []
    doomed.reset()
    alice.send(b"SEND after the reset\n")
    assert alice.sync() == []
    assert bob.sync() == [receive("alice", "unread"), receive("alice", "after the reset")]
    take_name_within(server.client(), "doomed", TIMEOUT)
    assert any("disconnected" in record.getMessage() for record in caplog.records)


def test_half_close_processes_everything_then_closes(server: RunningServer) -> None:
    alice = member(server, "alice")
    bob = member(server, "bob")
    # A final line without "\n" is a line too.
    alice.send(b"SEND one\nNOPE\nSEND \x1b[2J\nSEND bye")
    # The replies come before the end of the stream, and nothing else.
    assert half_close(alice) == UNRECOGNISED + b"\n" + MESSAGE_INVALID + b"\n"
    assert bob.sync() == [receive("alice", "one"), receive("alice", "bye")]
    # The server frees the name before it closes, and the EOF has arrived.
    member(server, "alice")


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"USERNAME", NAME_EMPTY + b"\n"),
        (b"SEND hi", NAME_REQUIRED + b"\n"),
        (b"PING\nPING", 2 * (UNRECOGNISED + b"\n")),
        (b"", b""),
        (b"\r\n", b""),
        (long_send(MAX_LINE + 1), LINE_TOO_LONG + b"\n"),
    ],
    ids=repr,
)
def test_half_close_answers_the_final_line(
    server: RunningServer, data: bytes, reply: bytes
) -> None:
    client = server.client()
    client.send(data)
    assert half_close(client) == reply


def test_half_close_with_many_replies_pending(server: RunningServer) -> None:
    # Best effort, but a client that keeps reading loses nothing.
    client = server.client()
    client.send(SYNC * 5000)
    assert half_close(client) == (SYNC_REPLY + b"\n") * 5000


def test_server_full() -> None:
    running = start_server(max_clients=2)
    try:
        first = member(running, "first")
        second = member(running, "second")
        third = running.client()
        # Exactly this, then the end of the stream.
        assert third.read_to_eof() == SERVER_FULL + b"\n"
        # The refused connection took no place and disturbed nobody.
        first.send(b"SEND hi\n")
        assert first.sync() == []
        assert second.sync() == [receive("first", "hi")]
        # Once `first` is gone (its EOF proves the server closed it), a new
        # connection gets its place.
        assert half_close(first) == b""
        fourth = member(running, "fourth")
        fourth.send(b"SEND welcome\n")
        assert fourth.sync() == []
        assert second.sync() == [receive("fourth", "welcome")]
        assert running.client().read_to_eof() == SERVER_FULL + b"\n"
    finally:
        running.stop()


def test_slow_consumer_is_disconnected_others_unaffected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    running = start_server(output_limit=64 * 1024)
    try:
        slow = SmallBufferClient(running.address, receive_buffer=4096)
        running.clients.append(slow)
        slow.register("slow")  # and from now on it never reads
        sender = member(running, "sender")
        fast = member(running, "fast")
        claimant = running.client()
        sent: list[bytes] = []
        deadline = time.monotonic() + 30
        while True:
            batch = [b"%06d " % (len(sent) + i) + b"z" * 2000 for i in range(16)]
            sender.send(b"".join(send_line(message) for message in batch))
            assert sender.sync() == []
            assert fast.sync() == [receive("sender", message) for message in batch]
            sent += batch
            claimant.send(username("slow"))
            reply = claimant.sync()
            if reply == []:
                break  # the slow consumer is gone and its name is free
            assert reply == [NAME_TAKEN]
            assert time.monotonic() < deadline, "the slow consumer was never disconnected"
        # The server closed it: its stream ends, and holds a prefix of what
        # was sent, in order.
        stream = b"".join(b"RECEIVE sender " + message + b"\n" for message in sent)
        got = slow.read_to_eof()
        assert stream.startswith(got)
        assert any("slow consumer" in record.getMessage() for record in caplog.records)
    finally:
        running.stop()


# --- 6. The program ----------------------------------------------------------


@pytest.fixture
def spawned() -> Iterator[Callable[..., ServerProcess]]:
    """spawn_server, with every process killed at the end of the test."""
    started: list[ServerProcess] = []

    def spawn(*args: str) -> ServerProcess:
        started.append(spawn_server(*args))
        return started[-1]

    yield spawn
    for running in started:
        if running.process.poll() is None:
            running.process.kill()
            running.process.communicate()


def ready_member(address: tuple[str, int], name: str) -> Client:
    """A member of a chat.py process. Its sync reply also proves the server
    loop is running, so the signal handlers are installed."""
    client = Client(address)
    client.register(name)
    return client


def run_chat(*args: str) -> subprocess.CompletedProcess[bytes]:
    """chat.py run to completion, for command lines that must not serve."""
    return subprocess.run(
        [sys.executable, str(HERE / "chat.py"), *args],
        capture_output=True,
        timeout=3 * TIMEOUT,
        check=False,
    )


def assert_one_clear_line(stderr: bytes, *mentions: str) -> None:
    text = stderr.decode()
    assert "Traceback" not in text
    assert text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == 1, text
    for mention in mentions:
        assert mention in lines[0]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_stops_the_server_within_a_second(
    spawned: Callable[..., ServerProcess], signum: signal.Signals
) -> None:
    running = spawned()
    alice = ready_member(running.address, "alice")
    bob = ready_member(running.address, "bob")
    alice.send(b"SEND hi\n")
    assert alice.sync() == []
    unnamed = Client(running.address)
    assert unnamed.sync() == []
    started = time.monotonic()
    running.process.send_signal(signum)
    running.process.wait(TIMEOUT)
    elapsed = time.monotonic() - started
    assert running.process.returncode == 0
    assert elapsed < 1.0
    # Every connection was closed, with nothing more sent to it.
    assert bob.read_to_eof() == b"RECEIVE alice hi\n"
    assert alice.read_to_eof() == b""
    assert unnamed.read_to_eof() == b""
    assert "Traceback" not in running.stderr_text()
    for client in (alice, bob, unnamed):
        client.close()


def read_stderr_until(
    process: subprocess.Popen[bytes], pattern: re.Pattern[str]
) -> tuple[re.Match[str], str]:
    """Read the process's stderr (unbuffered, so `communicate` can read the
    rest later) until a line matches `pattern`; bounded by TIMEOUT."""
    assert process.stderr is not None
    fd = process.stderr.fileno()
    text = ""
    deadline = time.monotonic() + TIMEOUT
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            for line in text.splitlines():
                if found := pattern.search(line):
                    return found, text
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no line matching {pattern.pattern!r} in {text!r}"
            if selector.select(remaining):
                chunk = os.read(fd, 65536)
                assert chunk, f"stderr closed; it said {text!r}"
                text += chunk.decode("utf-8", "replace")


@contextlib.contextmanager
def chat_process(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    """chat.py with the given arguments; killed at the end if still running."""
    process = subprocess.Popen(
        [sys.executable, str(HERE / "chat.py"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=TIMEOUT)


LISTENING: Final = re.compile(r"listening on \[?([^\]\s]*)\]?:(\d+)\s*$")


def test_port_zero_logs_the_real_port() -> None:
    with chat_process("0", "--host", "127.0.0.1") as process:
        found, _ = read_stderr_until(process, LISTENING)
        assert found.group(1) == "127.0.0.1"
        port = int(found.group(2))
        assert port != 0
        alice = ready_member(("127.0.0.1", port), "alice")
        bob = ready_member(("127.0.0.1", port), "bob")
        alice.send(b"SEND hi\n")
        assert alice.sync() == []
        assert bob.sync() == [receive("alice", "hi")]
        process.terminate()
        _, rest = process.communicate(timeout=TIMEOUT)
        assert process.returncode == 0
        assert b"Traceback" not in rest
        alice.close()
        bob.close()


@pytest.mark.parametrize("default_host", [False, True], ids=["host", "all-interfaces"])
def test_port_already_in_use(default_host: bool) -> None:
    with socket.create_server(("127.0.0.1", 0)) as blocker:
        port = blocker.getsockname()[1]
        host_args = [] if default_host else ["--host", "127.0.0.1"]
        result = run_chat(str(port), *host_args)
    assert result.returncode != 0
    assert_one_clear_line(result.stderr, str(port))


def test_host_that_cannot_be_bound() -> None:
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never an address of this machine.
    result = run_chat("0", "--host", "192.0.2.1")
    assert result.returncode != 0
    assert_one_clear_line(result.stderr, "192.0.2.1")


@pytest.mark.parametrize(
    ("args", "mention"),
    [
        (["99999"], "99999"),
        (["65536"], "65536"),
        (["abc"], "abc"),
        (["-1"], "-1"),
        (["--bogus"], "--bogus"),
        (["8080", "9090"], "9090"),
        (["0", "--max-clients", "many"], "many"),
        (["0", "--log-level", "loud"], "loud"),
        (["0", "--output-limit", "lots"], "lots"),
        (["0", "--host"], "--host"),
    ],
    ids=" ".join,
)
def test_bad_command_line(args: list[str], mention: str) -> None:
    result = run_chat(*args)
    assert result.returncode != 0
    assert_one_clear_line(result.stderr, mention)


def test_help_explains_every_option() -> None:
    result = run_chat("--help")
    assert result.returncode == 0
    text = result.stdout.decode()
    for option in ("PORT", "--host", "--max-clients", "--log-level", "--output-limit"):
        assert option in text
    assert result.stderr == b""


@pytest.mark.parametrize("level", ["debug", "Info", "DEBUG"])
def test_log_level_in_any_case(spawned: Callable[..., ServerProcess], level: str) -> None:
    running = spawned("--log-level", level)
    client = ready_member(running.address, "alice")
    running.process.terminate()
    text = running.stderr_text()
    assert running.process.returncode == 0
    assert "listening on" in text
    assert "Traceback" not in text
    client.close()


@pytest.mark.parametrize("level", ["WARNING", "error"])
def test_log_level_above_info_hides_connections(
    spawned: Callable[..., ServerProcess], level: str
) -> None:
    running = spawned("--log-level", level)
    alice = ready_member(running.address, "alice")
    bob = ready_member(running.address, "bob")
    alice.send(b"SEND hi\n")
    assert alice.sync() == []
    assert half_close(alice) == b""
    running.process.terminate()
    text = running.stderr_text()
    assert running.process.returncode == 0
    assert "INFO" not in text
    assert "connected" not in text
    assert "alice" not in text
    bob.close()


@pytest.mark.parametrize("args", [[], ["--log-level", "debug"]], ids=["default", "debug"])
def test_logs_show_events_but_never_message_text(
    spawned: Callable[..., ServerProcess], args: list[str]
) -> None:
    running = spawned(*args)
    marker = f"marker-{os.getpid()}-{time.monotonic_ns()}"
    alice = ready_member(running.address, "alice")
    bob = ready_member(running.address, "bob")
    alice_port = alice.sock.getsockname()[1]
    # Relayed, refused for a control character, refused as invalid UTF-8.
    alice.send(
        send_line(marker) + send_line("\x1b" + marker) + send_line(marker.encode() + b"\xff")
    )
    assert alice.sync() == [MESSAGE_INVALID, MESSAGE_INVALID]
    assert bob.sync() == [receive("alice", marker)]
    alice.send(username("carol"))
    assert alice.sync() == []
    assert half_close(alice) == b""  # the server has logged the disconnection
    running.process.terminate()
    text = running.stderr_text()
    assert running.process.returncode == 0
    assert marker not in text
    lines = text.splitlines()
    # Every line about alice's connection or names is at INFO: her connection
    # (named by its address), her name, her rename, her disconnection.
    about_alice = [
        line
        for line in lines
        if f"127.0.0.1:{alice_port}" in line or "alice" in line or "carol" in line
    ]
    assert all("INFO" in line for line in about_alice), about_alice
    by_address = [line for line in about_alice if f"127.0.0.1:{alice_port}" in line]
    assert any("disconnected" not in line and "connected" in line for line in by_address)
    assert any("disconnected" in line for line in by_address)
    assert any("alice" in line and "carol" not in line for line in about_alice)
    assert any("alice" in line and "carol" in line for line in about_alice)
    bob.close()


def test_module_port_is_the_default() -> None:
    assert chat.PORT == 8080
    assert chat.parse_args([]).port == chat.PORT
    assert chat.parse_args(["9000"]).port == 9000


# --- 7. The real nc client ---------------------------------------------------


def nc_path() -> str:
    path = shutil.which("nc")
    assert path is not None, "nc (netcat-openbsd) is required: apt-get install netcat-openbsd"
    return path


class Netcat:
    """`nc -N 127.0.0.1 PORT`, typed into through a pipe; its stdout is read
    by a thread, and every wait for it has a deadline."""

    def __init__(self, port: int) -> None:
        self.process = subprocess.Popen(
            [nc_path(), "-N", "127.0.0.1", str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.output = b""
        self.seen = 0  # how much of `output` sync has consumed
        self.closed = False
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while chunk := os.read(fd, 65536):
            with self.changed:
                self.output += chunk
                self.changed.notify_all()
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def type(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def sync(self) -> list[bytes]:
        """Type PING; the lines nc printed before the reply."""
        self.type(SYNC)
        marker = SYNC_REPLY + b"\n"
        with self.changed:
            found = self.changed.wait_for(
                lambda: marker in self.output[self.seen :] or self.closed, TIMEOUT
            )
            assert found and marker in self.output[self.seen :], self.output
            end = self.output.index(marker, self.seen)
            lines = self.output[self.seen : end].split(b"\n")[:-1]
            self.seen = end + len(marker)
        return lines

    def finish(self) -> bytes:
        """Close nc's stdin (-N sends end of input); all it printed."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(TIMEOUT)
        self.reader.join(TIMEOUT)
        assert self.closed
        assert self.process.returncode == 0
        return self.output

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(TIMEOUT)
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


def test_nc_seed_session_two(server: RunningServer) -> None:
    port = server.address[1]
    teixe = Netcat(port)
    jeff = Netcat(port)
    try:
        teixe.type(b"USERNAME teixe\n")
        assert teixe.sync() == []
        jeff.type(b"USERNAME jeff\n")
        assert jeff.sync() == []
        teixe.type(b"SEND hi\n")
        assert teixe.sync() == []
        assert jeff.sync() == [b"RECEIVE teixe hi"]
        jeff.type(b"SEND bye\n")
        assert jeff.sync() == []
        assert teixe.sync() == [b"RECEIVE jeff bye"]
        sync = SYNC_REPLY + b"\n"
        assert teixe.finish() == 2 * sync + b"RECEIVE jeff bye\n" + sync
        assert jeff.finish() == sync + b"RECEIVE teixe hi\n" + 2 * sync
    finally:
        teixe.kill()
        jeff.kill()


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
def test_nc_seed_session_one(server: RunningServer, crlf: bool) -> None:
    # -N: shut the socket down for writing at the end of stdin, then print
    # until the server closes. -C: send "\r\n" like telnet.
    flags = ["-N", "-C"] if crlf else ["-N"]
    result = subprocess.run(
        [nc_path(), *flags, "127.0.0.1", str(server.address[1])],
        input=SEED_ONE_INPUT + b"NOT_A_COMMAND test\n",
        capture_output=True,
        timeout=3 * TIMEOUT,
        check=False,
    )
    assert result.stdout == SEED_ONE_REPLY + UNRECOGNISED + b"\n"
    assert result.returncode == 0


# --- 8. Dual stack -------------------------------------------------------------

needs_dualstack = pytest.mark.skipif(
    not socket.has_dualstack_ipv6(), reason="no dual-stack IPv6 on this system"
)


@needs_dualstack
def test_default_host_serves_ipv4_and_ipv6_together() -> None:
    server = ChatServer(None, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.address[1]
    try:
        with Client(("127.0.0.1", port)) as v4, Client(("::1", port)) as v6:
            v4.register("four")
            v6.register("six")
            v4.send(b"SEND over IPv4\n")
            assert v4.sync() == []
            assert v6.sync() == [receive("four", "over IPv4")]
            v6.send(b"SEND over IPv6\n")
            assert v6.sync() == []
            assert v4.sync() == [receive("six", "over IPv6")]
            v6.send(username("FOUR"))
            assert v6.sync() == [NAME_TAKEN]
    finally:
        server.stop()
        thread.join(TIMEOUT)
    assert not thread.is_alive()


@needs_dualstack
def test_program_without_host_serves_ipv4_and_ipv6() -> None:
    with chat_process("0") as process:
        found, _ = read_stderr_until(process, LISTENING)
        port = int(found.group(2))
        assert port != 0
        with (
            ready_member(("127.0.0.1", port), "four") as v4,
            ready_member(("::1", port), "six") as v6,
        ):
            v6.send(b"SEND hi\n")
            assert v6.sync() == []
            assert v4.sync() == [receive("six", "hi")]
        process.terminate()
        process.wait(TIMEOUT)
        assert process.returncode == 0
