#!/usr/bin/env python3
"""Load generator for the chat server (and, with --redis or --nats, Redis
or NATS pub/sub, for comparison, through the same client code).

    python3 bench.py --spawn fanout                  # starts chat.py itself
    python3 bench.py --spawn --pin fanout -n 1000 -s 4
    python3 bench.py --spawn --redis latency         # the same load on Redis
    python3 bench.py --spawn --nats latency          # ... and on NATS (nats-server)
    python3 bench.py --port 8080 conns -n 10000 --pid $(pgrep -f chat.py)
    python3 bench.py conns -n 10000 --port 8080     # options on either side
    python3 bench.py --spawn --cluster 2 --reuse-port fanout   # Redis + 2 chat.py
    python3 bench.py --ports 9001,9002 latency                 # clients round robin
    python3 bench.py --spawn hostile -k 2000 --server-arg=--output-budget=67108864
    python3 bench.py --spawn hostile -k 2000 --line-size 1024 --flood-rate 5242880
    python3 bench.py --spawn --tls fanout            # chat.py's TLS port
    python3 bench.py --spawn --redis --tls fanout    # Redis with TLS
    python3 bench.py --spawn --ws fanout             # chat.py's --web-port, WebSocket
    python3 bench.py --spawn --websockets-lib fanout # the websockets library's broadcast()
    python3 bench.py --spawn --nats --ws fanout      # NATS over WebSocket
    python3 bench.py compare --a="--spawn --pin" --b="--spawn --pin --ws" fanout -n 1000

Scenarios:
  fanout   n clients register; s of them send m messages each, closed loop:
           a sender is at most w messages ahead of what the probe (client 0)
           has received from it. Deliveries/s, lost deliveries, probe latency.
  latency  n registered receivers and one sender at a fixed rate; every
           delivery to every receiver is timed: p50/p99/p99.9/max over all
           of them, the time until the last receiver has a message, and
           (labelled probe_) receiver 0 alone.
  conns    n idle registered connections; connect+register rate, proof that
           all of them get one broadcast, server RSS per connection.
  flood    one client sends as fast as it can while a pair exchanges
           messages at a low rate: the pair's round trip (fairness).
  hostile  k registered clients that never read (small SO_RCVBUF), one
           flooder, and a chatting pair, for --duration seconds: the pair's
           round trip, whether it was disconnected, the server's peak RSS,
           how many slow consumers it closed and why (from its log, with
           --spawn), against goals that are printed, not asserted.

The target options (--host, --port, --spawn, ...) may come before or after
the scenario. Without --spawn, --port or --ports the target is the chat
server at 127.0.0.1:8080. Each scenario prints a table and one JSON line,
and stops by itself (--timeout). CPU shares are only given for runs of at
least a second. Clients count lines with bytes.count on a reused buffer; only
the probe parses, so the load generator stays cheap (latency: every receiver
parses, with one regular expression per read). Over WebSocket (--ws,
--websockets-lib) a client counts text frames the same way, by one byte of
their header (see FRAME_MARK), and the probe checks that count by reading
every header. `compare` runs two targets in turn and prints their ratio.
Standard library only (the --websockets-lib server is a separate script,
bench_websockets_server.py, which needs the websockets library).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import resource
import selectors
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

HERE = Path(__file__).resolve().parent
RECV_SIZE = 256 * 1024
# What a flooder hands the kernel at once.
FLOOD_WRITE = 64 * 1024
# A non-blocking read that found nothing: over TLS (--tls) a record not yet
# whole, or a read that must wait for a write, says so in its own words.
WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
# The shortest run whose CPU share is worth showing: /proc's clock ticks are
# 10 ms, so over 1 s the share is within about 2 %.
MIN_CPU_SECONDS = 1.0
PAD = b"x" * 24  # makes a message about as long as a short chat line
# latency's payload, "0:<seq>:<send time, ns>:xxx...", found in any target's
# framing by one regular expression: one C call per chunk, so that the
# Python load generator can time every delivery to every receiver.
LATENCY_STAMP = re.compile(rb"(?<![0-9])0:([0-9]+):([0-9]+):x")
# Counting "\n" counts messages, even across reads, because every kind of
# delivery holds a fixed number of them (payloads hold none): a chat
# "RECEIVE name payload" line holds one; a RESP pub/sub push,
# "*3 $7 message $4 chat $N payload", seven; a NATS "MSG chat 1 N" line and
# its payload, two.
LINES_PER_MESSAGE = {"chat": 1, "redis": 7, "nats": 2}
# verbose off: no "+OK" after every PUB; echo off: a connection gets no copy
# of what it publishes, so a NATS sender can be a member, as in chat.py.
NATS_CONNECT = b'CONNECT {"verbose":false,"pedantic":false,"echo":false}\r\n'
# A WebSocket server's text frame shorter than 126 bytes, as every line bench.py
# causes is, starts with 0x81 (FIN, text) and its length byte (RFC 6455, 5.2);
# an ASCII payload holds no byte over 0x7F. So its count of 0x81 bytes is its
# count of lines, at bytes.count's speed, as "\n" is over TCP: a Python walk
# from header to header costs several times more per frame, and at millions
# of deliveries a second the client, not the server, would set the figure.
# The probe walks every header (ServerFrames) and checks the two counts agree.
FRAME_MARK = b"\x81"
# The client's masking key: RFC 6455 asks clients to mask, not for a key that
# is not zero; with zero the masked payload is the payload, so masking costs
# the load generator nothing, and the servers (websocket.py's _unmask, the
# websockets library's apply_mask) XOR every payload whatever the key.
ZERO_MASK = b"\0\0\0\0"
# RFC 6455, 1.3: what the server hashes with the client's key to accept it.
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# What each kind of target needs explained next to its figures.
NOTES = {
    "redis": "Redis: a subscribed connection cannot PUBLISH, so each sender is one "
    "more connection beside the n subscribers, and every subscriber (the probe "
    "too) gets every message",
    "nats": "NATS: senders are members connected with echo off (they get no copy of "
    "their own messages), as in chat.py: no extra connections",
    "websockets": "websockets library: bench_websockets_server.py, its documented "
    "broadcast() pattern speaking USERNAME and SEND, with its keepalive pings off (the "
    "load's receivers do not answer pings); no permessage-deflate (not offered)",
}


# --- the server under test -------------------------------------------------


@dataclass
class Target:
    """Where the load goes, and how to speak to it. With several ports
    (several chat servers of one cluster), client i connects to port
    i mod len(ports)."""

    host: str
    ports: list[int]
    kind: str  # "chat", "redis" or "nats": the protocol spoken
    pids: list[int] = field(default_factory=list)  # the chat servers (or Redis, NATS)
    redis_pid: int | None = None  # cluster mode: the Redis they share
    logs: list[Path] = field(default_factory=list)  # spawned servers' stderr
    tls: ssl.SSLContext | None = None  # --tls: every client speaks TLS
    websocket: bool = False  # --ws, --websockets-lib: the protocol inside WebSocket frames
    server: str = ""  # "websockets": the websockets library's server, not chat.py
    # A hidden field: the upgrade's key, sent by open() and checked by upgraded().
    keys: dict[socket.socket, bytes] = field(default_factory=dict, repr=False)

    def connect(self, index: int = 0, rcvbuf: int | None = None) -> socket.socket:
        """A connection ready to carry the protocol: over WebSocket, upgraded."""
        sock = self.open(index, rcvbuf)
        self.upgraded(sock, time.monotonic() + 10)
        return sock

    def open(self, index: int = 0, rcvbuf: int | None = None) -> socket.socket:
        """A connection; over WebSocket, its upgrade request sent and its
        answer still to read (upgraded()), so that a batch of clients can
        send theirs before any waits."""
        port = self.ports[index % len(self.ports)]
        try:
            if rcvbuf is None:
                sock = socket.create_connection((self.host, port), timeout=10)
            else:
                family, kind, proto, _, address = socket.getaddrinfo(
                    self.host, port, type=socket.SOCK_STREAM
                )[0]
                sock = socket.socket(family, kind, proto)
                # Before connect(): the window scale is agreed on in the
                # handshake, so a buffer shrunk later would not shrink the
                # window the server may fill.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                sock.settimeout(10)
                try:
                    sock.connect(address)
                except OSError:
                    sock.close()
                    raise
        except OSError as error:
            hint = "" if self.pids else " (is the server running? --spawn starts one)"
            sys.exit(
                f"bench.py: cannot connect to {self.kind} at {self.host}:{port}: "
                f"{error.strerror or error}{hint}"
            )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            try:  # the handshake, blocking, within the connect timeout
                sock = self.tls.wrap_socket(sock)
            except OSError as error:
                sock.close()
                sys.exit(f"bench.py: TLS handshake with {self.host}:{port} failed: {error}")
        if self.websocket:
            key = base64.b64encode(os.urandom(16))
            self.keys[sock] = key
            sock.sendall(upgrade_request(self.host, port, key))
        return sock

    def upgraded(self, sock: socket.socket, deadline: float) -> None:
        """Reads the answer to open()'s upgrade request (nothing without
        --ws): it must be 101 with the accept key that matches ours. A
        frame that came right after it (NATS's INFO) is dropped: what the
        scenarios read starts with the answer to their join."""
        key = self.keys.pop(sock, None)
        if key is None:
            return
        answer = b""
        while b"\r\n\r\n" not in answer:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            chunk = sock.recv(4096)
            if not chunk or len(answer) > 65536:
                sys.exit("bench.py: the server closed the connection during the WebSocket upgrade")
            answer += chunk
        status, *fields = answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        if status.split(b" ")[1:2] != [b"101"]:
            refused = status.decode(errors="replace")
            sys.exit(f"bench.py: the WebSocket upgrade was refused: {refused}")
        accept = base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest())
        headers = {name.strip().lower(): value.strip() for name, _, value in
                   (line.partition(b":") for line in fields)}  # fmt: skip
        if headers.get(b"sec-websocket-accept") != accept:
            sys.exit("bench.py: the WebSocket upgrade's Sec-WebSocket-Accept is wrong")

    def wire(self, data: bytes) -> bytes:
        """What goes on the wire for `data`, the protocol's bytes: over
        WebSocket, the chat protocol's lines each as one masked text frame
        without its "\\n" (PROTOCOL.md), NATS's bytes as one binary frame."""
        if not self.websocket or not data:
            return data
        if self.kind == "nats":
            return client_frame(BINARY_OPCODE, data)
        if len(data) <= len(MASKED_TEXT_HEADERS) and data.find(b"\n") == len(data) - 1:
            return MASKED_TEXT_HEADERS[len(data) - 1] + data[:-1]  # one short line, the usual
        return b"".join(client_frame(TEXT_OPCODE, line) for line in data.split(b"\n")[:-1])

    @property
    def redis(self) -> bool:
        return self.kind == "redis"

    @property
    def nats(self) -> bool:
        return self.kind == "nats"

    def join(self, index: int) -> bytes:
        """The bytes a subscriber sends to join, then to prove it joined."""
        if self.redis:
            return b"SUBSCRIBE chat\r\n"
        if self.nats:
            return self.wire(NATS_CONNECT + b"SUB chat 1\r\nPING\r\n")
        return self.wire(b"USERNAME u%d\nSYNC\n" % index)

    def hello(self, name: bytes) -> bytes:
        """What a connection that only sends says first (nothing for Redis)."""
        if self.redis:
            return b""
        if self.nats:
            return self.wire(NATS_CONNECT + b"PING\r\n")
        return self.wire(b"USERNAME " + name + b"\nSYNC\n")

    @property
    def joined(self) -> bytes:
        """The end of the reply that proves `join` (or `hello`) was processed
        (over WebSocket, the end of a frame's payload)."""
        if self.redis:
            return b":1\r\n"
        if self.nats:
            # The server's INFO comes first, unasked; the PONG answers our PING
            # and so follows the SUB.
            return b"PONG\r\n"
        return b"ERROR Unrecognised command." + (b"" if self.websocket else b"\n")

    def publish(self, payload: bytes) -> bytes:
        if self.redis:
            return b"PUBLISH chat " + payload + b"\r\n"
        if self.nats:
            return self.wire(b"PUB chat %d\r\n%s\r\n" % (len(payload), payload))
        return self.wire(b"SEND " + payload + b"\n")

    def publish_all(self, payloads: list[bytes]) -> bytes:
        """`publish` of each of `payloads`, joined: a sender's burst, made
        with as little of the load's CPU over WebSocket as over TCP."""
        if self.redis:
            return b"".join([b"PUBLISH chat " + payload + b"\r\n" for payload in payloads])
        if self.nats and not self.websocket:
            return b"".join([b"PUB chat %d\r\n%s\r\n" % (len(p), p) for p in payloads])
        if not self.websocket:
            return b"".join([b"SEND " + payload + b"\n" for payload in payloads])
        headers = MASKED_SEND_HEADERS
        if self.kind == "chat" and max(map(len, payloads), default=0) < len(headers):
            return b"".join([headers[len(payload)] + payload for payload in payloads])
        return b"".join(map(self.publish, payloads))

    @property
    def counts_frames(self) -> bool:
        """Whether a client counts deliveries by FRAME_MARK (the chat
        protocol over WebSocket, one line a frame) rather than by "\\n" in
        the stream that frames carry (NATS over WebSocket: a frame holds
        whatever the server had to send)."""
        return self.websocket and self.kind == "chat"

    def frame_reader(self) -> ServerFrames | None:
        """A reader of one connection's frames, over WebSocket."""
        return ServerFrames() if self.websocket else None

    def unframed(self, frames: ServerFrames | None, chunk: bytes) -> bytes:
        """What TCP would have carried for `chunk`: the chat protocol's
        lines, each with its "\\n", or the stream that NATS's frames hold."""
        if frames is None:
            return chunk
        if self.kind != "chat":
            return frames.stream(chunk)
        lines = frames.messages(chunk)
        return b"\n".join(lines) + b"\n" if lines else b""

    def deliveries(self, newlines: int) -> int:
        return newlines // LINES_PER_MESSAGE[self.kind]

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the server processes, if they are local."""
        total = 0.0
        for pid in self.pids:
            seconds = cpu_seconds_of(pid)
            if seconds is None:
                return None
            total += seconds
        return total if self.pids else None

    def describe(self) -> str:
        """ "chat", "redis", "nats", or "cluster of N" (chat servers sharing a
        Redis); with " (TLS)" after it over TLS, " (WebSocket)" over
        WebSocket; "websockets library" for that comparison server."""
        if self.server == "websockets":
            return "websockets library"
        suffix = " (TLS)" if self.tls is not None else ""
        return self._describe() + suffix + (" (WebSocket)" if self.websocket else "")

    def _describe(self) -> str:
        if self.kind != "chat":
            return self.kind
        servers = max(len(self.pids), len(self.ports))
        if self.redis_pid is not None or servers > 1:
            return f"cluster of {servers}"
        return "chat"

    def note(self) -> dict[str, str]:
        """The explanation its figures need, as a field of the results."""
        kind = self.server or self.kind
        return {"note": NOTES[kind]} if kind in NOTES else {}

    def redis_cpu_seconds(self) -> float | None:
        return None if self.redis_pid is None else cpu_seconds_of(self.redis_pid)

    def rss_bytes(self, key: str = "VmRSS") -> int | None:
        """The servers' resident memory (VmRSS), or with key="VmHWM" its peak
        since each started, if they are local."""
        total = 0
        for pid in self.pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(key + ":"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                return None
        return total if self.pids else None


def own_cpu_seconds() -> float:
    """The load generator's own user + system CPU time: beside the
    server's, it says which of the two set the figure."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds_of(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LineReader:
    """Whole lines out of chunks read from one socket: only the probe pays
    for parsing."""

    def __init__(self) -> None:
        self.tail = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        lines = (self.tail + chunk).split(b"\n")
        self.tail = lines.pop()
        return lines


# Opcodes, RFC 6455 section 5.2.
CONTINUATION_OPCODE = 0x0
TEXT_OPCODE = 0x1
BINARY_OPCODE = 0x2
CLOSE_OPCODE = 0x8
PING_OPCODE = 0x9
PONG_OPCODE = 0xA


def upgrade_request(host: str, port: int, key: bytes) -> bytes:
    """The opening handshake's request (RFC 6455, 4.1), no extension
    offered: chat.py's path, which NATS and the websockets library's server
    take as well as any other."""
    return (
        b"GET /chat HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (host.encode(), port, key)
    )


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One whole frame from the client, masked with ZERO_MASK."""
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, 0x80 | size))
    elif size < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    return head + ZERO_MASK + payload


# The longest payload a 7-bit length says (RFC 6455, 5.2).
MAX_SHORT_LENGTH = 125
# The header of a masked text frame for each payload length under 126.
MASKED_TEXT_HEADERS = tuple(
    bytes((0x80 | TEXT_OPCODE, 0x80 | size)) + ZERO_MASK for size in range(126)
)
# A SEND's frame up to its payload, by the payload's length.
MASKED_SEND_HEADERS = tuple(header + b"SEND " for header in MASKED_TEXT_HEADERS[5:])


def frame_header_size(head: bytes) -> int | None:
    """How long the header that `head` starts is, once its first two bytes
    are there to say."""
    if len(head) < 2:
        return None
    length = head[1] & 0x7F
    extended = 2 if length == 126 else 8 if length == 127 else 0
    return 2 + extended + (4 if head[1] & 0x80 else 0)


class ServerFrames:
    """What a server's WebSocket frames carry, out of one connection's
    reads cut anywhere: its whole messages (the chat protocol's lines), or
    its payloads end to end (NATS's stream, which frames cut anywhere).
    Pings are kept for the caller to answer; `frames` counts the data
    frames. For the probe and the latency receivers, not for every client:
    a read of whole short text frames (the usual one) is split by their
    header byte, anything else read by a Python loop per frame."""

    def __init__(self) -> None:
        self.head = b""  # a header cut by the end of a read
        self.left = 0  # bytes of the current frame's payload not yet read
        self.first = 0  # the current frame's first byte: FIN and opcode
        self.control = b""  # a control frame's payload so far
        self.partial: list[bytes] = []  # the message so far, for messages()
        self.frames = 0
        self.pings: list[bytes] = []
        self.closed = False

    def messages(self, chunk: bytes) -> list[bytes]:
        """The messages that `chunk` completes."""
        if not (self.left or self.head or self.partial) and chunk[:1] == FRAME_MARK:
            # The usual read, whole short text frames whose payloads hold no
            # FRAME_MARK: each piece between marks is one, its 7-bit length
            # byte first. Any other read (a mark inside a payload, a frame
            # cut by the read's edge, a longer frame, a control frame) has a
            # piece whose first byte is not a short length or not its own,
            # and the loop below reads the chunk.
            pieces = chunk.split(FRAME_MARK)[1:]
            if (
                all(pieces)
                and [piece[0] + 1 for piece in pieces] == list(map(len, pieces))
                and max(map(len, pieces)) <= MAX_SHORT_LENGTH + 1
            ):
                self.frames += len(pieces)
                return [piece[1:] for piece in pieces]
        return self._read(chunk, whole=True)

    def stream(self, chunk: bytes) -> bytes:
        """The payload bytes in `chunk`, even of a frame not yet whole."""
        return b"".join(self._read(chunk, whole=False))

    def _read(self, chunk: bytes, whole: bool) -> list[bytes]:
        out: list[bytes] = []
        pos, size = 0, len(chunk)
        while pos < size:
            if not self.left and not self.head and pos + 1 < size:
                length = chunk[pos + 1]
                end = pos + 2 + length
                if chunk[pos] == 0x80 | TEXT_OPCODE and length < 126 and end <= size:
                    out.append(chunk[pos + 2 : end])
                    self.frames += 1
                    pos = end
                    continue
            if self.left:
                end = min(size, pos + self.left)
                self._take(chunk[pos:end], whole, out)
                self.left -= end - pos
                pos = end
                if not self.left:
                    self._end(whole, out)
                continue
            head = self.head + chunk[pos : pos + 14]
            need = frame_header_size(head)
            if need is None or len(head) < need:
                self.head = head
                break
            pos += need - len(self.head)
            self.head = b""
            self.first = head[0]
            self.left = head[1] & 0x7F
            if self.left == 126:
                self.left = int.from_bytes(head[2:4], "big")
            elif self.left == 127:
                self.left = int.from_bytes(head[2:10], "big")
            # A masked server frame breaks RFC 6455: its payload is taken as
            # it is, and the probe's check or the lost count shows it.
            if not self.left:
                self._end(whole, out)
        return out

    def _take(self, payload: bytes, whole: bool, out: list[bytes]) -> None:
        if self.first & 0x08:  # a control frame: whole before it means anything
            self.control += payload
        elif whole:
            self.partial.append(payload)
        else:
            out.append(payload)

    def _end(self, whole: bool, out: list[bytes]) -> None:
        opcode = self.first & 0x0F
        if opcode == PING_OPCODE:
            self.pings.append(self.control)
        elif opcode == CLOSE_OPCODE:
            self.closed = True
        elif opcode in (CONTINUATION_OPCODE, TEXT_OPCODE, BINARY_OPCODE):
            self.frames += 1
            if whole and self.first & 0x80:  # FIN: the message's last frame
                out.append(b"".join(self.partial))
                self.partial.clear()
        self.control = b""

    def pongs(self) -> bytes:
        """The answers to the pings seen so far (each once)."""
        answers = b"".join(client_frame(PONG_OPCODE, ping) for ping in self.pings)
        self.pings.clear()
        return answers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_listening(
    host: str, port: int, process: subprocess.Popen[bytes], log: Path | None = None
) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            # Its last line says why (a bad --server-arg, most likely).
            last = log.read_text(errors="replace").strip().splitlines()[-1:] if log else []
            why = f": {last[0]}" if last else ""
            sys.exit(f"bench.py: the server exited with {process.returncode}{why}")
        with contextlib.suppress(OSError):
            socket.create_connection((host, port), timeout=1).close()
            return
        time.sleep(0.05)
    process.kill()
    sys.exit("bench.py: the server did not start listening within 10 s")


@contextlib.contextmanager
def target_from(args: argparse.Namespace) -> Iterator[Target]:
    """The target the arguments name; with --spawn, started here and stopped
    afterwards."""
    tls = tls_client_context() if args.tls else None
    kind = kind_of(args)
    websocket = args.ws or args.websockets_lib
    server_name = "websockets" if args.websockets_lib else ""
    if websocket and (args.tls or args.cluster):
        sys.exit("bench.py: --ws and --websockets-lib are for one server, without --tls")
    if not args.spawn:
        ports = [int(port) for port in args.ports.split(",")] if args.ports else [args.port]
        pids = [args.pid] if args.pid else []
        yield Target(
            args.host, ports, kind, pids=pids, tls=tls, websocket=websocket, server=server_name
        )
        return
    if args.cluster:
        if args.tls:
            sys.exit("bench.py: --tls is for one server (chat.py or Redis), not --cluster")
        with spawn_cluster(args) as target:
            yield target
        return
    port = free_port()
    logs = Path(tempfile.mkdtemp(prefix="bench-"))
    if args.tls and args.nats:
        sys.exit("bench.py: --tls is for chat.py or Redis, not NATS")
    if args.websockets_lib:
        if importlib.util.find_spec("websockets") is None:  # it runs on this Python
            sys.exit("bench.py: --websockets-lib needs websockets (requirements-dev.txt)")
        command = [sys.executable, str(HERE / "bench_websockets_server.py"), str(port)]
    elif args.redis:
        server = shutil.which("redis-server")
        if server is None:
            sys.exit("bench.py: redis-server not found (apt-get install -y redis-server)")
        command = [server, "--port", str(port), "--save", "", "--appendonly", "no"]
        command += ["--maxclients", "20000"]
        if args.tls:  # the TLS port only; clients are not asked for certificates
            cert, key = make_certificate(logs)
            command[1:3] = ["--port", "0", "--tls-port", str(port)]
            command += ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
            command += ["--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]
    elif args.nats:
        server = find_nats_server()
        if server is None:
            sys.exit("bench.py: nats-server not found (apt-get install -y nats-server)")
        # Core NATS only (no JetStream); loopback, like the others.
        command = [server, "--addr", "127.0.0.1", "--port", str(port)]
        if args.ws:  # the clients use the WebSocket port, the plain one is its own
            config = logs / "nats.conf"
            config.write_text(f"websocket {{ host: 127.0.0.1, port: {port}, no_tls: true }}\n")
            command[4] = str(free_port())
            command += ["--config", str(config)]
    else:
        command = [sys.executable, str(HERE / "chat.py"), str(port), "--host", "127.0.0.1"]
        command += ["--log-level", "WARNING", "--max-clients", "20000"]
        if args.tls:  # the clients use the TLS port; the plain one is on a port of its own
            cert, key = make_certificate(logs)
            command[2] = str(free_port())
            command += ["--tls-port", str(port), "--tls-cert", str(cert), "--tls-key", str(key)]
        if args.ws:  # the clients use the web port; the plain one is on a port of its own
            command[2] = str(free_port())
            command += ["--web-port", str(port)]
    command += args.server_args  # last, so that they override the defaults above

    def pin_server() -> None:
        os.sched_setaffinity(0, {0})
        raise_fd_limit()

    log = logs / "server.log"
    process = start(command, log, pin_server if args.pin else raise_fd_limit)
    if args.pin:
        os.sched_setaffinity(0, {1})
    try:
        wait_until_listening("127.0.0.1", port, process, log)
        yield Target(
            "127.0.0.1",
            [port],
            kind,
            pids=[process.pid],
            logs=[log],
            tls=tls,
            websocket=websocket,
            server=server_name,
        )
    finally:
        stop(process)
        shutil.rmtree(logs, ignore_errors=True)


def tls_client_context() -> ssl.SSLContext:
    """--tls: the clients' context. It verifies nothing: the server's
    certificate is a throwaway one (--spawn), or the user's."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate and key (P-256) for a spawned
    server's TLS port, made with the openssl command."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=localhost",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as error:
        sys.exit(f"bench.py: --tls needs the openssl command to make a certificate: {error}")
    return cert, key


def start(
    command: list[str], log: Path, preexec: Callable[[], None] | None = None
) -> subprocess.Popen[bytes]:
    """A server whose stderr goes to `log` (a file, not a pipe: nobody reads
    a pipe during the run, and a full one would stop the server)."""
    with log.open("wb") as stderr:
        return subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=preexec
        )


def find_nats_server() -> str | None:
    # Debian installs it in /usr/sbin, which is not on every user's PATH.
    return shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin")


def kind_of(args: argparse.Namespace) -> str:
    """The protocol the target speaks (the websockets library's server
    speaks the chat protocol's USERNAME and SEND)."""
    if args.redis and args.nats:
        sys.exit("bench.py: --redis and --nats name two different targets: choose one")
    if args.websockets_lib and (args.redis or args.nats or args.ws):
        sys.exit("bench.py: --websockets-lib is a target of its own (WebSocket already)")
    if args.ws and args.redis:
        sys.exit("bench.py: Redis speaks no WebSocket: --ws is for chat.py or NATS")
    return "redis" if args.redis else "nats" if args.nats else "chat"


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def spawn_cluster(args: argparse.Namespace) -> Iterator[Target]:
    """Redis and `args.cluster` chat.py servers in cluster mode: on one
    shared port with --reuse-port, else on a port each."""
    server = shutil.which("redis-server")
    if server is None:
        sys.exit("bench.py: redis-server not found (apt-get install -y redis-server)")
    if args.redis or args.nats or args.pin:
        sys.exit("bench.py: --cluster speaks the chat protocol and is not pinned")
    if importlib.util.find_spec("hiredis") is None:  # the servers run on this Python
        sys.exit("bench.py: --cluster needs hiredis: pip install -r requirements-cluster.txt")
    redis_port = free_port()
    logs = Path(tempfile.mkdtemp(prefix="bench-"))
    processes = [
        start(
            [server, "--port", str(redis_port), "--save", "", "--appendonly", "no"],
            logs / "redis.log",
        )
    ]
    try:
        shared = free_port()
        ports = [shared if args.reuse_port else free_port() for _ in range(args.cluster)]
        for port in ports:
            command = [sys.executable, str(HERE / "chat.py"), str(port), "--host", "127.0.0.1"]
            command += ["--log-level", "WARNING", "--max-clients", "20000"]
            command += ["--redis", f"redis://127.0.0.1:{redis_port}/0"]
            command += ["--reuse-port"] if args.reuse_port else []
            command += args.server_args
            log = logs / f"chat-{len(processes)}.log"
            processes.append(start(command, log, raise_fd_limit))
        chat_logs = [logs / f"chat-{i}.log" for i in range(1, len(processes))]
        for process, port, log in zip(processes[1:], ports, chat_logs, strict=True):
            wait_until_listening("127.0.0.1", port, process, log)
        wait_until_subscribed(redis_port, args.cluster)
        yield Target(
            "127.0.0.1",
            sorted(set(ports)),
            "chat",
            pids=[process.pid for process in processes[1:]],
            redis_pid=processes[0].pid,
            logs=chat_logs,
        )
    finally:
        for process in reversed(processes):
            stop(process)
        shutil.rmtree(logs, ignore_errors=True)


def wait_until_subscribed(redis_port: int, count: int) -> None:
    """Until `count` chat servers read the room (each binds first): each
    waits for the room's messages in XREAD BLOCK, which CLIENT LIST shows."""
    deadline = time.monotonic() + 10
    query = b"*2\r\n$6\r\nCLIENT\r\n$4\r\nLIST\r\n"
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", redis_port), timeout=5) as sock:
            sock.sendall(query)
            reply = b""
            while not (b"\r\n" in reply and reply.endswith(b"\r\n") and _bulk_done(reply)):
                reply += sock.recv(65536)
        if sum(b" cmd=xread " in b" %s " % line for line in reply.split(b"\n")) >= count:
            # Reading; the command connection is ready by then too.
            time.sleep(0.2)
            return
        time.sleep(0.05)
    sys.exit("bench.py: the chat servers did not reach Redis within 10 s")


def _bulk_done(reply: bytes) -> bool:
    """Whether `reply` holds a whole RESP bulk string ("$<n>\r\n<n bytes>\r\n")."""
    header, _, body = reply.partition(b"\r\n")
    return header.startswith(b"$") and len(body) >= int(header[1:]) + 2


def raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- measuring ---------------------------------------------------------------


@dataclass
class Latencies:
    nanoseconds: list[int] = field(default_factory=list)

    def add(self, sent_ns: int) -> None:
        self.nanoseconds.append(time.perf_counter_ns() - sent_ns)

    def percentile_ms(self, fraction: float) -> float | None:
        values = sorted(self.nanoseconds)
        if not values:
            return None
        return round(values[min(len(values) - 1, int(fraction * len(values)))] / 1e6, 3)


def percentiles_ms(nanoseconds: list[int], *fractions: float) -> list[float | None]:
    """Several percentiles of one list, sorted once (it may hold millions)."""
    values = sorted(nanoseconds)
    if not values:
        return [None for _ in fractions]
    return [round(values[min(len(values) - 1, int(f * len(values)))] / 1e6, 3) for f in fractions]


class Progress:
    """One line on stderr, rewritten in place, only on a terminal and only
    once the run has taken a couple of seconds."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = time.monotonic()
        self.shown_at = 0.0
        self.enabled = sys.stderr.isatty()

    def due(self) -> bool:
        now = time.monotonic()
        return self.enabled and now - self.started >= 2 and now - self.shown_at >= 0.5

    def show(self, text: str) -> None:
        now = self.shown_at = time.monotonic()
        sys.stderr.write(f"\r{self.label}: {text}  [{now - self.started:.0f}s]\033[K")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.shown_at:
            sys.stderr.write("\r\033[K")


def connect_all(
    target: Target, count: int, deadline: float, first: int = 0, rcvbuf: int | None = None
) -> list[socket.socket]:
    """Open `count` subscribers (named u<first>, u<first + 1>, ...), joined,
    in pipelined batches: each sends its join as soon as it is connected
    (over WebSocket, as soon as the batch is upgraded); the replies are
    collected per batch."""
    clients: list[socket.socket] = []
    progress = Progress("connecting")
    batch_size = 1024
    while len(clients) < count:
        size = min(batch_size, count - len(clients))
        batch = []
        for offset in range(size):
            # Joining at once keeps the server busy while the rest connect.
            index = first + len(clients) + offset
            sock = target.open(index, rcvbuf)
            if not target.websocket:
                sock.sendall(target.join(index))
            batch.append(sock)
        if target.websocket:
            for offset, sock in enumerate(batch):
                target.upgraded(sock, deadline)
                sock.sendall(target.join(first + len(clients) + offset))
        for sock in batch:
            read_through(sock, target.joined, deadline)
        clients += batch
        if progress.due():
            progress.show(f"{len(clients)}/{count}")
    progress.done()
    return clients


def read_through(sock: socket.socket, token: bytes, deadline: float) -> None:
    """Read until `token` ends what was received (nothing may follow it)."""
    data = b""
    while not data.endswith(token):
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            sys.exit("bench.py: the server closed a connection during set-up")
        data += chunk


def add_cpu(
    figures: dict[str, Any], key: str, before: float | None, after: float | None, elapsed: float
) -> None:
    """A CPU share, only from a run long enough for it to mean something:
    /proc counts CPU time in clock ticks (10 ms), so a run of a few
    milliseconds reads anything from 0 to a few hundred per cent."""
    if before is None or after is None:
        return  # not a local server (no --spawn, no --pid)
    if elapsed < MIN_CPU_SECONDS:
        figures[key] = None
        figures["cpu_note"] = (
            f"CPU not measured: the run took {elapsed:.3f} s, under {MIN_CPU_SECONDS:g} s"
        )
        return
    figures[key] = round(100 * (after - before) / elapsed)


def result(name: str, figures: dict[str, Any]) -> None:
    """The human-readable table, then the JSON line."""
    width = max(map(len, figures))
    print(f"{name}")
    for key, value in figures.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        print(f"  {key:<{width}}  {shown}")
    print(json.dumps({"scenario": name, **figures}))
    sys.stdout.flush()


# --- scenarios ---------------------------------------------------------------


def fanout(target: Target, args: argparse.Namespace) -> None:
    deadline = time.monotonic() + args.timeout
    clients = connect_all(target, args.n, deadline)
    if target.redis:
        senders = [target.connect() for _ in range(args.s)]
        sender_names = [b"p%d" % j for j in range(args.s)]
    else:
        senders = clients[1 : args.s + 1]
        sender_names = [b"u%d" % j for j in range(1, args.s + 1)]
    del sender_names  # senders are told apart by the payload's first field
    probe = clients[0]
    for sock in clients + senders:
        sock.setblocking(False)
    selector = selectors.DefaultSelector()
    for sock in clients:
        selector.register(sock, selectors.EVENT_READ, True)
    if target.redis:
        for sock in senders:
            selector.register(sock, selectors.EVENT_READ, False)  # ":N" replies

    if target.redis:
        expected = args.n * args.s * args.m
    else:  # senders do not get their own lines
        expected = (args.n - args.s) * args.s * args.m + args.s * (args.s - 1) * args.m
    sent = [0] * args.s
    seen = [0] * args.s
    in_order = True
    latencies = Latencies()
    probe_reader = LineReader()
    # Over WebSocket the probe reads every frame; NATS's clients read theirs
    # to count the "\n" of the stream inside them.
    readers = {sock: target.frame_reader() for sock in clients}
    probe_frames = readers[probe] or ServerFrames()  # (unused over TCP)
    probe_marks = 0  # FRAME_MARK bytes the probe received, to check the count
    newlines = 0
    buffer = bytearray(RECV_SIZE)
    view = memoryview(buffer)
    ping_tails: dict[socket.socket, bytes] = {}

    def pump() -> None:
        for j, sock in enumerate(senders):
            count = min(args.m, seen[j] + args.w) - sent[j]
            if count <= 0:
                continue
            now = time.perf_counter_ns()
            first = sent[j]
            data = target.publish_all(
                [b"%d:%d:%d:%s" % (j, first + i, now, PAD) for i in range(count)]
            )
            sock.setblocking(True)
            sock.sendall(data)
            sock.setblocking(False)
            sent[j] += count

    def probe_lines(lines: list[bytes]) -> None:
        nonlocal in_order
        for line in lines:
            payload = payload_of(line, target.kind)
            if payload is None:
                continue
            j_text, seq, stamp, _ = payload.split(b":", 3)
            j = int(j_text)
            if int(seq) != seen[j]:
                in_order = False
            seen[j] += 1
            latencies.add(int(stamp))

    progress = Progress("fanout")
    load_before = own_cpu_seconds()
    cpu_before = target.cpu_seconds()
    redis_cpu_before = target.redis_cpu_seconds()
    started = time.perf_counter()
    pump()
    while target.deliveries(newlines) < expected and time.monotonic() < deadline:
        for key, _ in selector.select(0.5):
            sock = cast(socket.socket, key.fileobj)
            try:
                size = sock.recv_into(buffer)
            except WOULD_BLOCK:
                continue
            if not size:
                sys.exit("bench.py: the server closed a connection")
            if not key.data:
                continue
            if target.counts_frames:
                marks = buffer.count(FRAME_MARK, 0, size)
                newlines += marks
                if sock is probe:
                    probe_marks += marks
                    probe_lines(probe_frames.messages(bytes(view[:size])))
                    answer_websocket_pings(sock, probe_frames)
                continue
            frames = readers[sock]
            if frames is None:
                stream: bytes | bytearray = buffer
            else:  # NATS over WebSocket: the stream, out of its frames
                stream = frames.stream(bytes(view[:size]))
                size = len(stream)
                answer_websocket_pings(sock, frames)
            newlines += stream.count(b"\n", 0, size)
            if target.nats:
                newlines -= answer_pings(target, sock, stream, size, ping_tails)
            if sock is probe:
                probe_lines(probe_reader.feed(bytes(stream[:size])))
        pump()
        if progress.due():
            progress.show(f"{target.deliveries(newlines):,}/{expected:,} deliveries")
    elapsed = time.perf_counter() - started
    cpu_after = target.cpu_seconds()
    load_after = own_cpu_seconds()
    redis_cpu_after = target.redis_cpu_seconds()
    progress.done()
    if target.counts_frames and probe_marks != probe_frames.frames:
        sys.exit(
            f"bench.py: counting {FRAME_MARK!r} bytes found {probe_marks} frames where the "
            f"probe's headers say {probe_frames.frames}: a line over 125 bytes, or not ASCII?"
        )
    delivered = target.deliveries(newlines)
    figures: dict[str, Any] = {
        "target": target.describe(),
        "clients": args.n,
        "senders": args.s,
        "connections": len(clients) + (len(senders) if target.redis else 0),
        "messages_per_sender": args.m,
        "window": args.w,
        "seconds": round(elapsed, 3),
        "deliveries": delivered,
        "lost": expected - delivered,
        "deliveries_per_s": round(delivered / elapsed),
        "messages_per_s": round(args.s * args.m / elapsed),
        "probe_p50_ms": latencies.percentile_ms(0.5),
        "probe_p99_ms": latencies.percentile_ms(0.99),
        "probe_max_ms": latencies.percentile_ms(1.0),
        "probe_order_ok": in_order,
    }
    if target.counts_frames:
        figures["probe_frames_checked"] = probe_frames.frames
    add_cpu(figures, "server_cpu_percent", cpu_before, cpu_after, elapsed)
    if figures.get("server_cpu_percent") is not None and delivered:
        # What a delivery costs the server whoever else is busy: a figure
        # that a load generator short of CPU does not move.
        server_seconds = cast(float, cpu_after) - cast(float, cpu_before)
        figures["server_cpu_ns_per_delivery"] = round(server_seconds * 1e9 / delivered, 1)
    add_cpu(figures, "redis_cpu_percent", redis_cpu_before, redis_cpu_after, elapsed)
    add_cpu(figures, "load_cpu_percent", load_before, load_after, elapsed)
    figures.update(target.note())
    result("fanout", figures)
    for sock in clients + (senders if target.redis else []):
        sock.close()


def answer_websocket_pings(sock: socket.socket, frames: ServerFrames | None) -> None:
    """Pongs for the WebSocket pings `frames` has seen (chat.py pings a
    member that sent nothing for --keepalive seconds)."""
    if frames is not None and frames.pings:
        sock.setblocking(True)
        sock.sendall(frames.pongs())
        sock.setblocking(False)


def answer_pings(
    target: Target,
    sock: socket.socket,
    buffer: bytes | bytearray,
    size: int,
    tails: dict[socket.socket, bytes],
) -> int:
    """nats-server PINGs every connection a couple of seconds after it
    connects (to learn its round trip), then every 2 minutes, and closes one
    that leaves two unanswered: answer each, and say how many there were, so
    that their lines are not counted as messages. One may straddle two
    reads, hence the last bytes of each read are kept."""
    pings = buffer.count(b"PING\r\n", 0, size)
    tail = tails.get(sock, b"")
    if tail:  # only a PING cut by the read boundary can match here
        pings += (tail + buffer[: min(5, size)]).count(b"PING\r\n")
    tails[sock] = bytes(buffer[max(0, size - 5) : size])
    if pings:
        sock.sendall(target.wire(b"PONG\r\n" * pings))
    return pings


def payload_of(line: bytes, kind: str) -> bytes | None:
    """The message payload in one received line, if the line carries one."""
    if kind != "chat":
        # Redis and NATS put the payload on a line of its own; ours start with
        # a digit, and no framing line does ("*3", "$7", ":1", "MSG ...", "PING").
        line = line.rstrip(b"\r")
        if line[:1].isdigit() and line.count(b":") >= 3:
            return line
        return None
    if line.startswith(b"RECEIVE "):
        return line.split(b" ", 2)[2]
    return None


def latency(target: Target, args: argparse.Namespace) -> None:
    """Every receiver is timed: which member a server serves first would
    otherwise decide the figure. One selectors loop reads all of them; a
    delivery's time runs from the sender's stamp in the payload to the
    select() that reported its receiver readable (one clock read per
    select, so the loop's own work on the sockets before it in the ready
    list is not counted against the server)."""
    deadline = time.monotonic() + args.timeout
    receivers = connect_all(target, args.n, deadline)
    # The sender is one more connection, for every target, so that each of
    # the n receivers should get every message (a chat.py or NATS sender
    # gets no copy of its own, a Redis subscriber cannot publish).
    sender = target.connect(args.n)
    if target.hello(b"bench-sender"):
        sender.sendall(target.hello(b"bench-sender"))
        read_through(sender, target.joined, deadline)
    selector = selectors.DefaultSelector()
    for index, sock in enumerate(receivers):
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, index)
    # Redis answers each PUBLISH with ":N", and NATS may PING: read the sender too.
    sender.setblocking(False)
    selector.register(sender, selectors.EVENT_READ, -1)
    total = int(args.rate * args.duration)
    expected = total * args.n
    reached = [0] * total  # how many receivers have message i
    last_ns = [0] * total  # how long until the last of them had it
    delays: list[int] = []  # every delivery, in nanoseconds
    probe: list[int] = []  # receiver 0's, the figure bench.py used to give
    tails = [b""] * args.n
    # Over WebSocket every receiver reads its frames (the rate is low).
    readers = [target.frame_reader() for _ in range(args.n)]
    sender_frames = target.frame_reader()
    last_seq = [-1] * args.n
    in_order = True
    interval = 1 / args.rate
    # recv_into one buffer: recv(RECV_SIZE) would allocate RECV_SIZE bytes on
    # every call, which costs more than the rest of a delivery's handling.
    buffer = bytearray(RECV_SIZE)
    view = memoryview(buffer)
    sent = 0
    progress = Progress("latency")
    load_before = own_cpu_seconds()
    cpu_before = target.cpu_seconds()
    started = time.perf_counter()
    next_send = started
    # Once everything is sent, what has not come within 5 s is lost.
    give_up = min(deadline, time.monotonic() + args.duration + 5)
    while len(delays) < expected and time.monotonic() < give_up:
        now = time.perf_counter()
        if sent < total and now >= next_send:
            payload = b"0:%d:%d:%s" % (sent, time.perf_counter_ns(), PAD)
            sender.setblocking(True)
            sender.sendall(target.publish(payload))
            sender.setblocking(False)
            sent += 1
            next_send += interval
        wait = max(0.0, next_send - time.perf_counter()) if sent < total else 0.5
        events = selector.select(wait)
        ready_ns = time.perf_counter_ns()
        for key, _ in events:
            sock = cast(socket.socket, key.fileobj)
            try:
                size = sock.recv_into(buffer)
            except WOULD_BLOCK:
                continue
            if not size:
                sys.exit("bench.py: the server closed a connection")
            chunk = view[:size].tobytes()
            receiver: int = key.data
            frames = sender_frames if receiver < 0 else readers[receiver]
            if frames is not None:
                chunk = target.unframed(frames, chunk)
                answer_websocket_pings(sock, frames)
            if target.nats and b"PING\r\n" in chunk:  # the server's keepalive
                sock.sendall(target.wire(b"PONG\r\n"))
            if receiver < 0:
                continue
            data = tails[receiver] + chunk if tails[receiver] else chunk
            cut = data.rfind(b"\n") + 1  # only whole lines; the rest waits
            tails[receiver] = data[cut:]
            for seq_text, stamp in LATENCY_STAMP.findall(data, 0, cut):
                seq = int(seq_text)
                delay = ready_ns - int(stamp)
                delays.append(delay)
                reached[seq] += 1
                if delay > last_ns[seq]:
                    last_ns[seq] = delay
                if seq <= last_seq[receiver]:
                    in_order = False
                last_seq[receiver] = seq
                if receiver == 0:
                    probe.append(delay)
        if progress.due():
            progress.show(f"{sent:,}/{total:,} sent, {len(delays):,}/{expected:,} received")
    elapsed = time.perf_counter() - started
    cpu_after = target.cpu_seconds()
    load_after = own_cpu_seconds()
    progress.done()
    p50, p99, p99_9, top = percentiles_ms(delays, 0.5, 0.99, 0.999, 1.0)
    complete = [last_ns[i] for i in range(total) if reached[i] == args.n]
    last_p50, last_p99, last_top = percentiles_ms(complete, 0.5, 0.99, 1.0)
    probe_p50, probe_p99, probe_p99_9, probe_top = percentiles_ms(probe, 0.5, 0.99, 0.999, 1.0)
    figures: dict[str, Any] = {
        "target": target.describe(),
        "clients": args.n,
        "connections": args.n + 1,
        "rate_per_s": args.rate,
        "messages": total,
        "deliveries": len(delays),
        "lost": expected - len(delays),
        "order_ok": in_order,
        "all_clients_read": True,
        # Over every delivery to every receiver:
        "p50_ms": p50,
        "p99_ms": p99,
        "p99_9_ms": p99_9,
        "max_ms": top,
        # Per message, until the last receiver had it:
        "last_member_p50_ms": last_p50,
        "last_member_p99_ms": last_p99,
        "last_member_max_ms": last_top,
        "messages_short_of_someone": total - len(complete),
        # Receiver 0 alone (what bench.py latency reported before):
        "received_by_probe": len(probe),
        "probe_p50_ms": probe_p50,
        "probe_p99_ms": probe_p99,
        "probe_p99_9_ms": probe_p99_9,
        "probe_max_ms": probe_top,
    }
    add_cpu(figures, "server_cpu_percent", cpu_before, cpu_after, elapsed)
    add_cpu(figures, "load_cpu_percent", load_before, load_after, elapsed)
    figures.update(target.note())
    result("latency", figures)
    for sock in [*receivers, sender]:
        sock.close()


def conns(target: Target, args: argparse.Namespace) -> None:
    raise_fd_limit()
    deadline = time.monotonic() + args.timeout
    rss_before = target.rss_bytes()
    cpu_before = target.cpu_seconds()
    started = time.perf_counter()
    clients = connect_all(target, args.n, deadline)
    elapsed = time.perf_counter() - started
    cpu_after = target.cpu_seconds()
    rss_after = target.rss_bytes()
    # One broadcast must reach every idle connection.
    sender = target.connect()
    if target.hello(b"bench-sender"):
        sender.sendall(target.hello(b"bench-sender"))
        read_through(sender, target.joined, deadline)
    sender.sendall(target.publish(b"hello-everyone"))
    reached = 0
    for sock in clients:
        data = b""
        with contextlib.suppress(OSError):
            while b"hello-everyone" not in data and time.monotonic() < deadline:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        reached += b"hello-everyone" in data
    figures: dict[str, Any] = {
        "target": target.describe(),
        "connections": args.n,
        "connect_register_per_s": round(args.n / elapsed),
        "broadcast_reached": reached,
    }
    add_cpu(figures, "server_cpu_percent", cpu_before, cpu_after, elapsed)
    if rss_before is not None and rss_after is not None:
        figures["server_rss_before_kib"] = rss_before // 1024
        figures["server_rss_after_kib"] = rss_after // 1024
        figures["rss_per_connection_kib"] = round((rss_after - rss_before) / args.n / 1024, 3)
    figures.update(target.note())
    result("conns", figures)
    for sock in [*clients, sender]:
        sock.close()


@dataclass
class PairRun:
    """What a chatting pair saw while a third client flooded."""

    round_trips: list[float] = field(default_factory=list)  # seconds
    flood_lines: int = 0  # received by the pair, both together
    seconds: float = 0.0
    disconnected: str | None = None  # which of the pair the server closed, and how
    pending: float | None = None  # a round trip still unanswered at the end (seconds)
    # A numbered flood (--flood-rate): lines each of the pair found missing
    # (a number skipped) or out of order (a number lower than the last).
    flood_missing: int = 0
    flood_out_of_order: int = 0

    def trip_ms(self, fraction: float) -> float | None:
        trips = sorted(self.round_trips)
        if not trips:
            return None
        return round(1000 * trips[min(len(trips) - 1, int(fraction * len(trips)))], 3)


def flood_line(size: int) -> bytes:
    """A valid SEND line of `size` bytes before its "\\n" (at least 6)."""
    return b"SEND " + b"f" * max(1, size - 5) + b"\n"


def numbered(line: bytes, number: int) -> bytes:
    """`line` (a SEND) with `number` in front of its message, its size kept."""
    prefix = b"SEND %d " % number
    return prefix + line[len(prefix) :]


def paced_flooder(sock: socket.socket, line: bytes, rate: float) -> int:
    """Fork a process that sends `line`s, numbered from 0 (`numbered`), to
    `sock` in FLOOD_WRITE-sized writes at `rate` bytes per second (and drops
    what it receives), so the flood keeps its pace whatever the pair's loop
    is doing; its pid."""
    per_write = max(1, FLOOD_WRITE // len(line))
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: nothing of the parent's may run here
        sock.setblocking(True)
        sock.settimeout(1.0)
        started = time.perf_counter()
        sent = 0
        number = 0
        while True:
            due = started + sent / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            burst = b"".join(numbered(line, number + i) for i in range(per_write))
            number += per_write
            sock.sendall(burst)
            sent += len(burst)
            with contextlib.suppress(BlockingIOError):
                sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
    except BaseException:
        pass
    os._exit(0)


def chat_under_flood(
    ping: socket.socket,
    pong: socket.socket,
    flooder: socket.socket,
    interval: float,
    stop_after: Callable[[int, float], bool],
    label: str,
    every_tick: Callable[[], None] = lambda: None,
    line: bytes = flood_line(45),
    flood_rate: float | None = None,
) -> PairRun:
    """ping (u0) and pong (u1) exchange a message each way every `interval`
    seconds while flooder (u2) sends `line` as fast as the server takes it
    (or, with `flood_rate`, at that many bytes per second from a process of
    its own), until `stop_after(round trips, seconds)` or the server closes
    one of the pair. The flooder sends valid messages, so the pair must read
    the flood too: the round trip measures both the server's fairness and
    its fan-out."""
    for sock in (ping, pong, flooder):
        sock.setblocking(False)
    burst = line * max(1, FLOOD_WRITE // len(line))
    selector = selectors.DefaultSelector()
    selector.register(ping, selectors.EVENT_READ, "ping")
    selector.register(pong, selectors.EVENT_READ, "pong")
    flooder_pid = None
    if flood_rate is None:
        selector.register(flooder, selectors.EVENT_READ | selectors.EVENT_WRITE, "flooder")
    else:
        flooder_pid = paced_flooder(flooder, line, flood_rate)
    tails = {"ping": b"", "pong": b""}
    # With a numbered flood: each side's partial line, and the next number due.
    partial = {"ping": b"", "pong": b""}
    next_number = {"ping": 0, "pong": 0}
    run = PairRun()
    exchange = 0
    sent_at = 0.0
    waiting = False
    progress = Progress(label)
    started = time.perf_counter()
    while not run.disconnected and not stop_after(exchange, time.perf_counter() - started):
        now = time.perf_counter()
        if not waiting and now - started >= exchange * interval:
            try:
                ping.sendall(b"SEND ping-%d\n" % exchange)
            except OSError as error:
                run.disconnected = f"ping: {error.strerror or error}"
                break
            sent_at = now
            waiting = True
        for key, events in selector.select(0.01):
            role = key.data
            sock = cast(socket.socket, key.fileobj)
            if role == "flooder":
                try:
                    if events & selectors.EVENT_WRITE:
                        with contextlib.suppress(*WOULD_BLOCK):
                            sock.send(burst)
                    if events & selectors.EVENT_READ:
                        with contextlib.suppress(*WOULD_BLOCK):
                            sock.recv(RECV_SIZE)
                except OSError:  # closed by the server: the pair goes on
                    selector.unregister(sock)
                continue
            try:
                chunk = sock.recv(RECV_SIZE)
            except WOULD_BLOCK:
                continue
            except OSError as error:
                run.disconnected = f"{role}: {error.strerror or error}"
                break
            if not chunk:
                run.disconnected = f"{role}: closed by the server"
                break
            run.flood_lines += chunk.count(b"\n")
            if flood_rate is not None:
                lines = (partial[role] + chunk).split(b"\n")
                partial[role] = lines.pop()
                for received in lines:
                    if received.startswith(b"RECEIVE u2 "):
                        number = int(received[11 : received.index(b" ", 11)])
                        if number > next_number[role]:
                            run.flood_missing += number - next_number[role]
                        elif number < next_number[role]:
                            run.flood_out_of_order += 1
                        next_number[role] = number + 1
            data = tails[role] + chunk
            tails[role] = data[-32:]
            if role == "pong" and b"RECEIVE u0 ping-%d\n" % exchange in data:
                try:
                    pong.sendall(b"SEND pong-%d\n" % exchange)
                except OSError as error:
                    run.disconnected = f"pong: {error.strerror or error}"
                    break
                tails[role] = b""
            elif role == "ping" and waiting and b"RECEIVE u1 pong-%d\n" % exchange in data:
                run.round_trips.append(time.perf_counter() - sent_at)
                tails[role] = b""
                waiting = False
                exchange += 1
        every_tick()
        if progress.due():
            progress.show(f"{exchange} round trips")
    run.seconds = time.perf_counter() - started
    if waiting:
        run.pending = time.perf_counter() - sent_at
    if flooder_pid is not None:
        os.kill(flooder_pid, signal.SIGKILL)
        os.waitpid(flooder_pid, 0)
    progress.done()
    selector.close()
    return run


def flood(target: Target, args: argparse.Namespace) -> None:
    deadline = time.monotonic() + args.timeout
    if target.kind != "chat" or target.websocket:
        sys.exit("bench.py: flood speaks the chat protocol over TCP only")
    ping, pong, flooder = connect_all(target, 3, deadline)
    run = chat_under_flood(
        ping,
        pong,
        flooder,
        args.interval,
        lambda trips, _: trips >= args.exchanges or time.monotonic() >= deadline,
        "flood",
    )
    if run.disconnected:
        sys.exit(f"bench.py: the server closed a connection ({run.disconnected})")
    result(
        "flood",
        {
            "target": "chat",
            "round_trips": len(run.round_trips),
            "flood_lines_per_s_at_pair": round(run.flood_lines / 2 / run.seconds),
            "round_trip_p50_ms": run.trip_ms(0.5),
            "round_trip_p99_ms": run.trip_ms(0.99),
            "round_trip_max_ms": run.trip_ms(1.0),
        },
    )
    for sock in (ping, pong, flooder):
        sock.close()


def hostile(target: Target, args: argparse.Namespace) -> None:
    """k registered clients that never read (each with a small receive
    buffer), one flooder, and a pair that chats: does the pair keep
    chatting, and what does the server's memory do?"""
    if target.kind != "chat" or target.websocket:
        sys.exit("bench.py: hostile speaks the chat protocol over TCP only")
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.k + 64:  # the k, the three, the server's pipes and files
        sys.exit(f"bench.py: -k {args.k} needs {args.k + 64} file descriptors; ulimit -n is {soft}")
    deadline = time.monotonic() + args.timeout
    ping, pong, flooder = connect_all(target, 3, deadline)  # u0, u1, u2
    # Registered (the reply to the join is read), then never read again.
    non_readers = connect_all(target, args.k, deadline, first=3, rcvbuf=args.rcvbuf)
    peak_sampled = target.rss_bytes()
    next_sample = time.monotonic()

    def sample_rss() -> None:
        """VmHWM says the peak only for the server's whole life: with --pid it
        may come from before this run, so RSS is also sampled every 0.1 s."""
        nonlocal peak_sampled, next_sample
        if peak_sampled is None or time.monotonic() < next_sample:
            return
        next_sample = time.monotonic() + 0.1
        rss = target.rss_bytes()
        if rss is not None:
            peak_sampled = max(peak_sampled, rss)

    run = chat_under_flood(
        ping,
        pong,
        flooder,
        args.interval,
        lambda _, seconds: seconds >= args.duration or time.monotonic() >= deadline,
        "hostile",
        sample_rss,
        flood_line(args.line_size),
        args.flood_rate,
    )
    peak = target.rss_bytes("VmHWM")
    rss_after = target.rss_bytes()
    closed = slow_consumers_closed(target)
    budget, budget_given = output_budget(args.server_args)
    p99 = run.trip_ms(0.99)
    figures: dict[str, Any] = {
        "target": target.describe(),
        "non_readers": args.k,
        "non_reader_rcvbuf": args.rcvbuf,
        "flood_line_bytes": args.line_size,
        "flood_rate_bytes_per_s": args.flood_rate,
        "seconds": round(run.seconds, 3),
        "round_trips": len(run.round_trips),
        "round_trip_p50_ms": run.trip_ms(0.5),
        "round_trip_p99_ms": p99,
        "round_trip_max_ms": run.trip_ms(1.0),
        "round_trip_unanswered_ms": None if run.pending is None else round(1000 * run.pending),
        "flood_lines_per_s_at_pair": round(run.flood_lines / 2 / run.seconds),
        "flood_lines_missing_at_pair": None if args.flood_rate is None else run.flood_missing,
        "flood_lines_out_of_order_at_pair": (
            None if args.flood_rate is None else run.flood_out_of_order
        ),
        "pair_disconnected": run.disconnected is not None,
        "pair_disconnected_how": run.disconnected,
        "server_peak_rss_kib": None if peak is None else peak // 1024,
        "server_peak_rss_sampled_kib": None if peak_sampled is None else peak_sampled // 1024,
        "server_rss_after_kib": None if rss_after is None else rss_after // 1024,
        **closed,
        "output_budget_bytes": budget,
        "output_budget_from": "--server-arg" if budget_given else "the protocol's default",
        # Goals, shown and not asserted: "met", "missed" or "unknown".
        "goal_pair_never_disconnected": goal(run.disconnected is None),
        "goal_pair_saw_the_flood_whole_and_in_order": goal(
            None
            if args.flood_rate is None
            else run.flood_missing == 0 and run.flood_out_of_order == 0
        ),
        "goal_round_trip_p99_under_250_ms": goal(None if p99 is None else p99 < 250),
        "goal_peak_rss_under_budget_plus_64_mib": goal(
            None if peak is None else peak < budget + 64 * 1024 * 1024
        ),
    }
    result("hostile", figures)
    for sock in [ping, pong, flooder, *non_readers]:
        sock.close()


# The protocol's default for --output-budget (PROTOCOL.md, "Total memory").
DEFAULT_OUTPUT_BUDGET = 256 * 1024 * 1024
# An address with its port, as in the server's "<fd 7 127.0.0.1:51234 'u3'>".
PEER = re.compile(r"(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\]):(\d+)")


def output_budget(server_args: list[str]) -> tuple[int, bool]:
    """The server's --output-budget, as passed with --server-arg, and
    whether it was passed (else the protocol's default is assumed)."""
    for i, arg in enumerate(server_args):
        if arg.startswith("--output-budget="):
            return int(arg.split("=", 1)[1]), True
        if arg == "--output-budget" and i + 1 < len(server_args):
            return int(server_args[i + 1]), True
    return DEFAULT_OUTPUT_BUDGET, False


def slow_consumers_closed(target: Target) -> dict[str, Any]:
    """How many connections the server closed as slow consumers, and why,
    from the logs of servers started here (None without --spawn). The
    wording may change, so a line counts when it says "slow consumer" or
    "budget" in any case; a connection the server logs twice (e.g. "is a
    slow consumer" at WARNING, "disconnected: slow consumer" at INFO) counts
    once, told apart by its peer address."""
    if not target.logs:
        return {
            "slow_consumers_closed": None,
            "slow_consumer_reasons": None,
            "slow_consumer_log_example": None,
        }
    reasons: dict[str, str] = {}  # connection -> why it was closed
    example = None
    for log in target.logs:
        with contextlib.suppress(OSError):
            for number, line in enumerate(log.read_text(errors="replace").splitlines()):
                lower = line.lower()
                if "slow consumer" not in lower and "budget" not in lower:
                    continue
                # A client's port, never the server's own (a start-up line
                # about the budget names the listening address).
                peers = [m for m in PEER.finditer(line) if int(m[1]) not in target.ports]
                if not peers and PEER.search(line):
                    continue
                key = peers[0][0] if peers else f"{log.name}:{number}"
                why = "output budget" if "budget" in lower else "output limit"
                if reasons.get(key) != "output budget":  # the more specific reason wins
                    reasons[key] = why
                example = example or line
    counts: dict[str, int] = {}
    for why in reasons.values():
        counts[why] = counts.get(why, 0) + 1
    return {
        "slow_consumers_closed": len(reasons),
        "slow_consumer_reasons": counts,
        "slow_consumer_log_example": example,
    }


def goal(met: bool | None) -> str:
    return "unknown" if met is None else "met" if met else "missed"


SCENARIOS: dict[str, Callable[[Target, argparse.Namespace], None]] = {
    "fanout": fanout,
    "latency": latency,
    "conns": conns,
    "flood": flood,
    "hostile": hostile,
}


def add_target_options(parser: argparse.ArgumentParser, late: bool) -> None:
    """The options that say where the load goes. Each scenario's parser has
    them too (`late`), so that they may come before or after the scenario;
    there they default to nothing, so that a value given before the
    scenario stands."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if late else value

    group = parser.add_argument_group("target (before or after the scenario)")
    group.add_argument("--host", default=default("127.0.0.1"), help="default: 127.0.0.1")
    group.add_argument("--port", type=int, default=default(8080), help="default: 8080")
    group.add_argument(
        "--ports",
        default=default(None),
        help="several servers of one cluster, e.g. 9001,9002: client i uses the i-th",
    )
    group.add_argument(
        "--pid", type=int, default=default(None), help="the server's pid, for its CPU and RSS"
    )
    group.add_argument(
        "--spawn",
        action="store_true",
        default=default(False),
        help="start the server on a free port (and stop it afterwards)",
    )
    group.add_argument(
        "--pin",
        action="store_true",
        default=default(False),
        help="with --spawn: server on core 0, load on core 1",
    )
    group.add_argument(
        "--redis", action="store_true", default=default(False), help="speak Redis pub/sub instead"
    )
    group.add_argument(
        "--nats",
        action="store_true",
        default=default(False),
        help="speak core NATS pub/sub instead (with --spawn: nats-server)",
    )
    group.add_argument(
        "--ws",
        action="store_true",
        default=default(False),
        help="every client speaks WebSocket (with --spawn: chat.py's --web-port, or with "
        "--nats, nats-server's websocket port)",
    )
    group.add_argument(
        "--websockets-lib",
        action="store_true",
        default=default(False),
        help="the websockets library's broadcast() server (with --spawn: "
        "bench_websockets_server.py), over WebSocket",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        default=default(False),
        help="every client speaks TLS (with --spawn: chat.py's --tls-port, or with "
        "--redis, redis-server's --tls-port, each with a throwaway certificate)",
    )
    group.add_argument(
        "--cluster",
        type=int,
        default=default(0),
        metavar="N",
        help="with --spawn: start Redis and N chat.py servers in cluster mode",
    )
    group.add_argument(
        "--reuse-port",
        action="store_true",
        default=default(False),
        help="with --cluster: the N servers share one port",
    )
    group.add_argument(
        "--server-arg",
        # A separate list after the scenario: argparse would otherwise let
        # that list replace the one given before it.
        dest="late_server_args" if late else "server_args",
        action="append",
        default=default([]),
        metavar="ARG",
        help="with --spawn: one more argument for the server, e.g. "
        "--server-arg=--output-budget=67108864 (repeatable)",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=default(120),
        help="stop after this many seconds (default: 120)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Without --spawn, --port or --ports, the target is the chat server at "
        "127.0.0.1:8080. `bench.py compare --help`: two targets in turn, and their ratio.",
    )
    add_target_options(parser, late=False)
    sub = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")

    def scenario(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_target_options(p, late=True)
        return p

    p = scenario("fanout", "n clients, s senders, closed loop")
    p.add_argument("-n", type=int, default=100, help="clients (default 100)")
    p.add_argument("-s", type=int, default=10, help="senders among them (default 10)")
    p.add_argument("-m", type=int, default=20_000, help="messages per sender (default 20000)")
    p.add_argument("-w", type=int, default=64, help="window per sender (default 64)")
    p = scenario("latency", "one sender at a fixed rate; every receiver timed")
    p.add_argument("-n", type=int, default=100, help="receivers (default 100)")
    p.add_argument("--rate", type=float, default=500, help="messages per second (default 500)")
    p.add_argument("--duration", type=float, default=10, help="seconds of sending (default 10)")
    # Every receiver reads (and is timed) now; the old switch is still accepted.
    p.add_argument("--all-read", action="store_true", help=argparse.SUPPRESS)
    p = scenario("conns", "many idle registered connections")
    p.add_argument("-n", type=int, default=10_000, help="connections (default 10000)")
    p = scenario("flood", "a flooder beside a ping-pong pair")
    p.add_argument("--exchanges", type=int, default=200, help="round trips (default 200)")
    p.add_argument("--interval", type=float, default=0.02, help="seconds between round trips")
    p = scenario("hostile", "k clients that never read, a flooder, and a chatting pair")
    p.add_argument("-k", type=int, default=2000, help="clients that never read (default 2000)")
    p.add_argument("--duration", type=float, default=10, help="seconds of flood (default 10)")
    p.add_argument(
        "--interval", type=float, default=0.02, help="seconds between round trips (default 0.02)"
    )
    p.add_argument(
        "--rcvbuf",
        type=int,
        default=4096,
        help="SO_RCVBUF of each non-reader, set before it connects (default 4096)",
    )
    p.add_argument(
        "--line-size",
        type=int,
        default=45,
        help="bytes of each flood line, its newline not counted (default 45)",
    )
    p.add_argument(
        "--flood-rate",
        type=float,
        default=None,
        help="bytes per second the flooder sends, paced, from a process of its own "
        "(default: as fast as the server takes them, from the pair's loop)",
    )
    args = parser.parse_args(argv)
    args.server_args = args.server_args + getattr(args, "late_server_args", [])
    if args.server_args and not args.spawn:
        parser.error("--server-arg is for a server started with --spawn")
    return args


# What `compare` shows of each run beside its figure: who was busy.
CPU_FIGURES = ("server_cpu_percent", "load_cpu_percent")
# The figure `compare` takes from each scenario unless told (--figure).
COMPARED = {
    "fanout": "deliveries_per_s",
    "latency": "p99_ms",
    "conns": "rss_per_connection_kib",
    "flood": "round_trip_p99_ms",
    "hostile": "round_trip_p99_ms",
}


def compare(argv: list[str]) -> int:
    """`bench.py compare --a=OPTIONS --b=OPTIONS SCENARIO ARGS...`: the same
    load on two targets in turn, A, B, A, B..., each run a bench.py of its
    own, so that a shared, noisy machine drifts over both alike; the
    medians and the median of the rounds' B/A ratios."""
    parser = argparse.ArgumentParser(
        prog="bench.py compare",
        description=compare.__doc__.split("\n\n")[0] if compare.__doc__ else None,
        usage="bench.py compare --a=OPTIONS --b=OPTIONS [--rounds N] [--figure KEY] "
        "SCENARIO [ARGS...]",
    )
    parser.add_argument("--a", required=True, help='target A\'s options, e.g. --a="--spawn --pin"')
    parser.add_argument("--b", required=True, help='target B\'s, e.g. --b="--spawn --pin --ws"')
    parser.add_argument("--rounds", type=int, default=3, help="rounds of A then B (default 3)")
    parser.add_argument(
        "--figure", help="the result field compared (default: " + ", ".join(
            f"{scenario} {key}" for scenario, key in COMPARED.items()) + ")"
    )  # fmt: skip
    # The scenario and what follows it are the runs' own: not for this parser.
    where = next((i for i, arg in enumerate(argv) if arg in SCENARIOS), len(argv))
    args = parser.parse_args(argv[:where])
    if where == len(argv):
        parser.error(f"a scenario is needed: one of {', '.join(SCENARIOS)}")
    scenario, rest = argv[where], argv[where + 1 :]
    figure = args.figure or COMPARED[scenario]
    values: dict[str, list[float]] = {"a": [], "b": []}
    lost = 0
    for round_number in range(1, args.rounds + 1):
        for label in ("a", "b"):
            options = shlex.split(getattr(args, label))
            command = [sys.executable, str(Path(__file__).resolve()), *options, scenario, *rest]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = done.stdout.strip().splitlines()
            if done.returncode != 0 or not lines:
                sys.exit(f"bench.py compare: {label} failed: {done.stderr.strip()}")
            figures = json.loads(lines[-1])
            if figures.get(figure) is None:
                sys.exit(f"bench.py compare: {label}'s {scenario} gave no {figure}")
            values[label].append(figures[figure])
            lost += figures.get("lost") or 0
            cpu = {key: figures[key] for key in CPU_FIGURES if key in figures}
            print(
                f"round {round_number} {label} ({figures.get('target')}): "
                f"{figure} {figures[figure]:,} lost {figures.get('lost')} {json.dumps(cpu)}"
            )
            sys.stdout.flush()
    ratios = [b / a if a else float("inf") for a, b in zip(values["a"], values["b"], strict=True)]
    result(
        "compare",
        {
            "a": args.a,
            "b": args.b,
            "load": " ".join([scenario, *rest]),
            "figure": figure,
            "rounds": args.rounds,
            "a_values": values["a"],
            "b_values": values["b"],
            "a_median": statistics.median(values["a"]),
            "b_median": statistics.median(values["b"]),
            "ratios_b_to_a": [round(ratio, 3) for ratio in ratios],
            "ratio_b_to_a_median": round(statistics.median(ratios), 3),
            "lost": lost,
        },
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        return compare(argv[1:])
    args = parse_args(argv)
    # Thousands of sockets (conns, hostile) need more than the usual 1,024
    # descriptors.
    raise_fd_limit()
    try:
        with target_from(args) as target:
            SCENARIOS[args.scenario](target, args)
    except OSError as error:
        # One clear line, not a traceback: the server went away, or a limit of
        # this machine was hit.
        sys.exit(f"bench.py: {error.strerror or error}")
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
