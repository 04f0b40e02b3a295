"""bench.py runs end to end: a smoke test with tiny sizes, not a timing.

Every scenario runs against chat.py, and fanout, latency and conns against
Redis, NATS and a cluster too, and over WebSocket against chat.py's web
port, the websockets library's server and NATS, each server started by
bench.py itself (--spawn); each run must report nothing lost and all its
fields. No timing is asserted anywhere: the machine is shared and noisy.
The WebSocket client's own parts (frames out, frames in, the upgrade) are
checked against websocket.py's reader and wsproto's writer.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

import bench
import websocket
from conftest import HERE, TIMEOUT, require_tool

# (target, scenario) -> bench.py's arguments. Some put the target options
# after the scenario, which bench.py accepts too.
TARGETS = {
    "chat": ["--spawn"],
    "redis": ["--spawn", "--redis"],
    "nats": ["--spawn", "--nats"],
    "cluster": ["--spawn", "--cluster", "2", "--reuse-port"],
    "chat-tls": ["--spawn", "--tls"],
    "redis-tls": ["--spawn", "--redis", "--tls"],
    "chat-ws": ["--spawn", "--ws"],
    "websockets-lib": ["--spawn", "--websockets-lib"],
    "nats-ws": ["--spawn", "--nats", "--ws"],
}
# What each target calls itself in the results.
DESCRIBED = {
    "cluster": "cluster of 2",
    "chat-tls": "chat (TLS)",
    "redis-tls": "redis (TLS)",
    "chat-ws": "chat (WebSocket)",
    "websockets-lib": "websockets library",
    "nats-ws": "nats (WebSocket)",
}
# The word its note must hold, for a target whose connections differ.
NOTED = {"redis": "redis", "nats": "nats", "redis-tls": "redis", "nats-ws": "nats"}
NOTED["websockets-lib"] = "websockets"
SCENARIOS = {
    "fanout": ["fanout", "-n", "6", "-s", "2", "-m", "200"],
    "latency": ["latency", "-n", "4", "--rate", "200", "--duration", "0.5"],
    "conns": ["conns", "-n", "50"],
    "flood": ["flood", "--exchanges", "5", "--interval", "0.01"],
    # A small output limit, so that the non-readers are closed within the
    # second and the count of slow consumers is exercised.
    "hostile": ["hostile", "-k", "20", "--duration", "1", "--server-arg=--output-limit=65536"],
    # The load, small: numbered 1 KiB lines, paced, from a process of
    # their own; the pair must see every one of them, in order.
    "hostile-paced": [
        "hostile",
        "-k",
        "20",
        "--duration",
        "1",
        "--line-size",
        "1024",
        "--flood-rate",
        "1048576",
        "--server-arg=--output-limit=65536",
    ],
}
CASES = [
    *[("chat", scenario) for scenario in SCENARIOS],
    *[
        (target, scenario)
        for target in (
            "redis",
            "nats",
            "cluster",
            "chat-tls",
            "redis-tls",
            "chat-ws",
            "websockets-lib",
            "nats-ws",
        )
        for scenario in ("fanout", "latency", "conns")
    ],
]
# Fields every run of a scenario must report (others may come and go).
FIELDS = {
    "fanout": {"target", "clients", "connections", "deliveries", "lost", "deliveries_per_s"},
    "latency": {
        "target",
        "deliveries",
        "lost",
        "order_ok",
        "p50_ms",
        "p99_ms",
        "p99_9_ms",
        "max_ms",
        "last_member_p50_ms",
        "last_member_p99_ms",
        "last_member_max_ms",
        "received_by_probe",
        "probe_p50_ms",
        "probe_p99_ms",
    },
    "conns": {"target", "connections", "connect_register_per_s", "broadcast_reached"},
    "flood": {"target", "round_trips", "round_trip_p50_ms", "round_trip_p99_ms"},
    "hostile": {
        "round_trips",
        "round_trip_p50_ms",
        "round_trip_p99_ms",
        "round_trip_max_ms",
        "pair_disconnected",
        "server_peak_rss_kib",
        "slow_consumers_closed",
        "slow_consumer_reasons",
        "goal_pair_never_disconnected",
        "goal_round_trip_p99_under_250_ms",
        "goal_peak_rss_under_budget_plus_64_mib",
    },
}
FIELDS["hostile-paced"] = FIELDS["hostile"] | {
    "flood_lines_missing_at_pair",
    "flood_lines_out_of_order_at_pair",
    "goal_pair_saw_the_flood_whole_and_in_order",
}


def require(target: str) -> None:
    """Skip a target whose server is not installed, except in CI (.ci/run
    sets CI), where a missing tool must fail rather than hide a target."""
    missing = None
    if target in ("redis", "cluster", "redis-tls") and shutil.which("redis-server") is None:
        missing = "redis-server"
    elif target in ("nats", "nats-ws") and bench.find_nats_server() is None:
        missing = "nats-server"
    elif target == "cluster" and importlib.util.find_spec("hiredis") is None:
        missing = "hiredis"
    elif target == "websockets-lib" and importlib.util.find_spec("websockets") is None:
        missing = "websockets"
    if missing is not None:
        require_tool(None, missing)


def run_bench(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HERE / "bench.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


def last_json(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


@pytest.mark.parametrize(("target", "scenario"), CASES, ids=[f"{t}-{s}" for t, s in CASES])
def test_bench_scenario_runs_and_loses_nothing(target: str, scenario: str) -> None:
    """bench.py: each scenario runs at a tiny size against each target and loses nothing."""
    require(target)
    if target == "redis":  # target options after the scenario
        args = [*SCENARIOS[scenario], *TARGETS[target], "--timeout", "30"]
    else:
        args = [*TARGETS[target], "--timeout", "30", *SCENARIOS[scenario]]
    result = last_json(run_bench(*args))
    assert result["scenario"] == scenario.removesuffix("-paced")
    assert FIELDS[scenario] <= result.keys()
    assert result["target"] == DESCRIBED.get(target, target)
    if target in NOTED:  # how its connections differ
        assert NOTED[target] in result["note"].lower()
    if scenario == "conns":
        assert result["broadcast_reached"] == 50
    elif scenario == "flood":
        assert result["round_trips"] == 5
    elif scenario.startswith("hostile"):
        assert result["pair_disconnected"] is False
        if scenario == "hostile-paced":
            assert result["flood_lines_per_s_at_pair"] > 0
            assert result["flood_lines_missing_at_pair"] == 0
            assert result["flood_lines_out_of_order_at_pair"] == 0
        # Each non-reader gets far more than 64 KiB within the second.
        assert result["slow_consumers_closed"] >= 1
        assert sum(result["slow_consumer_reasons"].values()) == result["slow_consumers_closed"]
    else:
        assert result["lost"] == 0
    if scenario == "fanout":
        assert result["probe_order_ok"] is True
    if scenario == "fanout" and target in ("chat-ws", "websockets-lib"):
        # The frames counted by their header byte, checked by the probe's reading.
        assert result["probe_frames_checked"] == 2 * 200
    if scenario == "latency":
        assert result["order_ok"] is True
        assert result["deliveries"] == 4 * result["messages"]
        assert result["received_by_probe"] == result["messages"]
    # A run this short is too short for a CPU share.
    if "server_cpu_percent" in result and result.get("seconds", 2) < 1:
        assert result["server_cpu_percent"] is None


def test_no_server_is_one_clear_line() -> None:
    """bench.py: with no server at the port, one line on stderr and a failing status."""
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        done = run_bench("--port", str(port), "fanout", "-n", "2", "-s", "1", check=False)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert f"cannot connect to chat at 127.0.0.1:{port}" in done.stderr


def test_help_names_the_default_target() -> None:
    """bench.py: --help names the default host and port."""
    out = run_bench("--help").stdout
    assert "127.0.0.1" in out
    assert "8080" in out


def test_server_arg_needs_spawn() -> None:
    """bench.py: --server-arg without --spawn is refused, saying so."""
    done = run_bench("--server-arg=--keepalive=5", "conns", check=False)
    assert done.returncode != 0
    assert "--spawn" in done.stderr


def test_server_args_before_and_after_the_scenario_add_up() -> None:
    """bench.py: target options count on either side of the scenario."""
    args = bench.parse_args(["--spawn", "--server-arg=a", "conns", "--server-arg=b", "--port", "9"])
    assert args.server_args == ["a", "b"]
    assert args.port == 9
    assert bench.parse_args(["--port", "9", "conns"]).port == 9
    assert bench.parse_args(["conns"]).port == 8080


def test_slow_consumers_are_counted_once_each_with_their_reason(tmp_path: Path) -> None:
    """The server's wording may change: any line saying "slow consumer" or
    "budget" counts, once per connection, and a start-up line about the
    budget (it names the listening address) does not."""
    log = tmp_path / "server.log"
    log.write_text(
        "INFO listening on 127.0.0.1:9000 (output budget 67108864 bytes)\n"
        "WARNING <fd 7 127.0.0.1:50001 'u3'> is a slow consumer: 2000000 bytes unsent\n"
        "INFO <fd 7 127.0.0.1:50001 'u3'> disconnected: slow consumer\n"
        "WARNING <fd 8 127.0.0.1:50002 'u4'> closed: over the output budget\n"
        "INFO <fd 8 127.0.0.1:50002 'u4'> disconnected: Slow Consumer\n"
        "INFO <fd 9 127.0.0.1:50003 'u5'> disconnected: client closed\n"
    )
    target = bench.Target("127.0.0.1", [9000], "chat", logs=[log])
    closed = bench.slow_consumers_closed(target)
    assert closed["slow_consumers_closed"] == 2
    assert closed["slow_consumer_reasons"] == {"output limit": 1, "output budget": 1}


def test_compare_runs_both_targets_in_turn_and_gives_their_ratios() -> None:
    """bench.py compare: A and B each round, their medians and the median of B/A per round."""
    require("websockets-lib")
    done = run_bench(
        "compare",
        "--rounds",
        "2",
        "--a=--spawn",
        "--b=--spawn --websockets-lib",
        "fanout",
        "-n",
        "4",
        "-s",
        "1",
        "-m",
        "100",
    )
    result = last_json(done)
    assert result["scenario"] == "compare"
    assert result["load"] == "fanout -n 4 -s 1 -m 100"
    assert result["figure"] == "deliveries_per_s"
    assert result["lost"] == 0
    a, b = result["a_values"], result["b_values"]
    assert len(a) == len(b) == 2
    assert result["ratios_b_to_a"] == [round(y / x, 3) for x, y in zip(a, b, strict=True)]
    assert result["ratio_b_to_a_median"] == round((b[0] / a[0] + b[1] / a[1]) / 2, 3)
    # Alternated: A, B, A, B, each naming its target.
    rounds = [line for line in done.stdout.splitlines() if line.startswith("round ")]
    assert [line.split(" (")[0] for line in rounds] == [
        "round 1 a",
        "round 1 b",
        "round 2 a",
        "round 2 b",
    ]
    assert "(websockets library)" in rounds[1]
    assert "(chat)" in rounds[2]


def test_compare_needs_a_scenario() -> None:
    """bench.py compare without a scenario says so, with a failing status."""
    done = run_bench("compare", "--a=--spawn", "--b=--spawn --ws", check=False)
    assert done.returncode != 0
    assert "a scenario is needed" in done.stderr


# --- The WebSocket client's parts --------------------------------------------------


chat_lines = st.lists(
    st.text(st.characters(codec="utf-8", exclude_characters="\n"), max_size=300).map(
        lambda text: text.encode() + b"\n"
    ),
    max_size=12,
)


def fed(frames: bench.ServerFrames, stream: bytes, cuts: list[int], lines: bool = True) -> bytes:
    """What `frames` makes of `stream`, read in pieces cut at `cuts`: its
    messages, each with a "\\n" (lines), or its payloads end to end."""
    edges = [0, *sorted(cuts), len(stream)]
    pieces = [stream[start:end] for start, end in pairwise(edges)]
    if not lines:
        return b"".join(frames.stream(piece) for piece in pieces)
    return b"".join(line + b"\n" for piece in pieces for line in frames.messages(piece))


@given(chat_lines, st.data())
def test_server_frames_give_back_the_lines_however_cut(
    lines: list[bytes], data: st.DataObject
) -> None:
    """A turn framed by the server, read in any pieces, is its lines again, one frame each."""
    stream = websocket.frame_lines(lines)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    frames = bench.ServerFrames()
    assert fed(frames, stream, cuts) == b"".join(lines)
    assert frames.frames == len(lines)


@given(st.lists(st.binary(max_size=70_000), max_size=4), st.data())
def test_server_frames_join_fragments_and_answer_pings(
    pieces: list[bytes], data: st.DataObject
) -> None:
    """wsproto's fragments, 16- and 64-bit lengths and pings between them: the bytes, pings kept."""
    server = Connection(ConnectionType.SERVER)
    stream = b""
    for number, piece in enumerate(pieces):
        last = number == len(pieces) - 1
        stream += server.send(BytesMessage(data=piece, message_finished=last))
        stream += server.send(Ping(payload=b"p%d" % number))
    stream += server.send(CloseConnection(code=1000))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    frames = bench.ServerFrames()
    assert fed(frames, stream, cuts) == b"".join(pieces) + (b"\n" if pieces else b"")
    assert frames.pings == [b"p%d" % number for number in range(len(pieces))]
    assert frames.closed
    pongs = websocket.FrameReader().receive(frames.pongs())
    assert pongs == [websocket.Pong(b"p%d" % number) for number in range(len(pieces))]
    assert frames.pings == []


# 0x8105: a 16-bit length whose bytes, cut from the header's first two, look
# like a whole short text frame's header.
@pytest.mark.parametrize("size", [0, 125, 126, 127, 0x8105, 65535, 65536, 70_000])
@pytest.mark.parametrize("text", [True, False])
def test_server_frames_read_every_length_encoding(size: int, text: bool) -> None:
    """Payloads at each edge of the 7-bit, 16-bit and 64-bit lengths, then one more frame."""
    server = Connection(ConnectionType.SERVER)
    payload = b"0123456789" * (size // 10) + b"y" * (size % 10)
    message = TextMessage(data=payload.decode()) if text else BytesMessage(data=payload)
    stream = server.send(message) + server.send(TextMessage(data="after"))
    for cut in (1, 2, 3, 9, len(stream) - 1):
        frames = bench.ServerFrames()
        assert fed(frames, stream, [cut]) == payload + b"\nafter\n"
        assert frames.frames == 2


@pytest.mark.parametrize(
    "lines",
    [
        [b"\xc4\x81 holds the mark\n", b"next\n"],  # "\u0101": its second byte is 0x81
        [b"\x81\n", b"\n"],
        [b"x" * 125 + b"\n", b"y" * 126 + b"\n", b"z\n"],
    ],
)
def test_server_frames_read_a_mark_inside_a_payload_the_long_way(lines: list[bytes]) -> None:
    """messages(): a FRAME_MARK byte inside a payload, or a frame too long
    for a 7-bit length, does not fool the split by marks."""
    stream = websocket.frame_lines(lines)
    frames = bench.ServerFrames()
    assert fed(frames, stream, []) == b"".join(lines)
    assert frames.frames == len(lines)


def test_server_frames_read_every_cut_of_longer_frames_among_short_ones() -> None:
    """messages(): a turn with 16-bit-length frames among short ones, cut
    once anywhere (inside a header, 124 bytes into a payload, where the
    split by marks would look right), gives its lines and count; and a mark
    and a byte in a 16-bit frame's payload that would make two short frames
    of it do not."""
    lines = [b"hi\n", b"a" * 200 + b"\n", b"z" * 129 + b"\n", b"next\n"]
    stream = websocket.frame_lines(lines)
    for cut in range(len(stream) + 1):
        frames = bench.ServerFrames()
        assert fed(frames, stream, [cut]) == b"".join(lines), cut
        assert frames.frames == len(lines)
    lookalike = [b"x" * 123 + "\u0101".encode() + b"\x04yyyy\n"]  # 0x81, then 4: "4 bytes"
    frames = bench.ServerFrames()
    assert fed(frames, websocket.frame_lines(lookalike), []) == lookalike[0]
    assert frames.frames == 1
    # 129 bytes (length 0x0081), whose payload after its header's first
    # three bytes reads as two short frames: "d" (100) and 0x1a (26).
    cut_header = [b"d" + b"x" * 99 + "\u0101".encode() + b"\x1a" + b"y" * 26 + b"\n", b"ok\n"]
    frames = bench.ServerFrames()
    assert fed(frames, websocket.frame_lines(cut_header), [3]) == b"".join(cut_header)
    assert frames.frames == 2


@pytest.mark.parametrize(
    ("kind", "websocket_"),
    [("chat", False), ("chat", True), ("nats", False), ("nats", True), ("redis", False)],
)
# The longest payload then 120 and 121 bytes: the last SEND of a short frame, the first of a longer.
@pytest.mark.parametrize("size", [0, 1, 114, 115, 120, 121, 200])
def test_publish_all_is_each_publish_joined(kind: str, websocket_: bool, size: int) -> None:
    """publish_all(): a sender's burst, the same bytes as publish() one by one."""
    target = bench.Target("127.0.0.1", [1], kind, websocket=websocket_)
    payloads = [b"p" * size, b"1:2:3:" + b"q" * size, b""]
    assert target.publish_all(payloads) == b"".join(map(target.publish, payloads))


def test_server_frames_without_lines_give_the_stream_as_it_was() -> None:
    """NATS's stream, which its frames cut anywhere, comes back whole and unmarked."""
    server = Connection(ConnectionType.SERVER)
    stream = server.send(BytesMessage(data=b"MSG chat 1 2\r\n")) + server.send(
        BytesMessage(data=b"hi\r\n")
    )
    for cut in range(len(stream) + 1):
        frames = bench.ServerFrames()
        assert fed(frames, stream, [cut], lines=False) == b"MSG chat 1 2\r\nhi\r\n"


@given(chat_lines.filter(lambda lines: all(line.isascii() and len(line) <= 126 for line in lines)))
def test_frame_mark_counts_short_ascii_lines(lines: list[bytes]) -> None:
    """The fanout count: one FRAME_MARK byte a line, for lines of ASCII under 126 bytes."""
    assert websocket.frame_lines(lines).count(bench.FRAME_MARK) == len(lines)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
def test_client_frames_are_masked_messages_the_server_reads(size: int) -> None:
    """wire(): each chat line one masked text frame; NATS's bytes one binary frame."""
    line = b"x" * size
    chat = bench.Target("127.0.0.1", [1], "chat", websocket=True)
    events = websocket.FrameReader().receive(chat.wire(b"SEND " + line + b"\nSYNC\n"))
    assert events == [websocket.Message(b"SEND " + line, True), websocket.Message(b"SYNC", True)]
    one_by_one = chat.wire(line + b"\n") + chat.wire(b"SYNC\n")  # the one-line way
    assert websocket.FrameReader().receive(one_by_one) == [
        websocket.Message(line, True),
        websocket.Message(b"SYNC", True),
    ]
    nats = bench.Target("127.0.0.1", [1], "nats", websocket=True)
    events = websocket.FrameReader().receive(nats.wire(line + b"\r\n"))
    assert events == [websocket.Message(line + b"\r\n", False)]


def test_wire_is_the_bytes_themselves_over_tcp() -> None:
    """Without WebSocket, wire() leaves the protocol's bytes as they are."""
    assert bench.Target("127.0.0.1", [1], "chat").wire(b"SEND hi\n") == b"SEND hi\n"


@pytest.mark.parametrize("good", [True, False])
def test_upgrade_checks_the_servers_accept_key(good: bool) -> None:
    """The client sends RFC 6455's request and goes on only with the right Sec-WebSocket-Accept."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]
        target = bench.Target("127.0.0.1", [port], "chat", websocket=True)
        client = target.open()
        server, _ = listener.accept()
        with server, client:
            server.settimeout(TIMEOUT)
            request = b""
            while not request.endswith(b"\r\n\r\n"):
                request += server.recv(4096)
            assert request.startswith(b"GET /chat HTTP/1.1\r\n")
            assert b"\r\nSec-WebSocket-Version: 13\r\n" in request
            key = request.split(b"Sec-WebSocket-Key: ")[1].split(b"\r\n")[0]
            assert len(base64.b64decode(key)) == 16
            accept = base64.b64encode(hashlib.sha1(key + bench.WEBSOCKET_GUID).digest())
            if not good:
                accept = base64.b64encode(b"x" * 20)
            server.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            if good:
                target.upgraded(client, time.monotonic() + TIMEOUT)
            else:
                with pytest.raises(SystemExit, match="Sec-WebSocket-Accept"):
                    target.upgraded(client, time.monotonic() + TIMEOUT)
