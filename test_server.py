"""The real server over real sockets, against PROTOCOL.md (all of it but
"Cluster mode", which is test_cluster.py).

Ordering rests on one fact: the server processes each connection's lines in
order, so once a client's `PING` (an unknown command) has been answered,
everything it sent before has been processed, and every RECEIVE it caused
has been handed to the recipients' sockets. Tests wait on such replies
(`Client.sync`), or poll with a deadline (`poll`), never on the clock; every
read has a timeout. The contract's lines, the clients and the servers
(`server`, `start_server`, `launch`, `in_process`, `turns`) are in
conftest.py; the real telnet's pty and proxy, the room model and its state
machine in chat_testing.py.

The sections follow the headings of this repository's PROTOCOL.md, in its
order; each test's docstring names the contract row it holds. Index:

Its opening: "what a person typing into nc localhost 8080 would expect"
    test_seed_session_one, test_seed_session_two (the README's sessions)
    test_nc_seed_session_two, test_nc_seed_session_one (the real nc)
Connecting; Lines
  TCP, dual-stack; --host       test_default_host_serves_ipv4_and_ipv6_together,
                                test_program_without_host_serves_ipv4_and_ipv6,
                                test_host_ipv6_any_is_logged_as_ipv6_only
  Port, PORT, port 0            test_module_port_is_the_default,
                                test_port_zero_logs_the_real_port
  Line ends (\\n, \\r\\n)         test_crlf_line_endings,
                                test_only_one_cr_before_lf_is_dropped
  Any number of pieces          test_seed_sessions_one_byte_per_send,
                                test_same_result_whatever_the_pieces, test_many_lines_in_one_send
  Longer than 4096 bytes        test_line_length_limit,
                                test_too_long_line_then_next_line_in_the_same_piece,
                                test_one_megabyte_line,
                                test_ten_megabyte_line_is_refused_once_in_bounded_memory
  An empty line is ignored      test_blank_lines_get_no_reply,
                                test_megabytes_of_blank_lines_cost_linear_time
  Telnet                        test_telnet_ctrl_c_is_answered_and_drops_the_unfinished_line,
                                test_telnet_interrupt_or_abort_output_drops_the_unfinished_line,
                                test_telnet_every_ctrl_c_is_answered,
                                test_telnet_options_are_refused_once_per_verb_and_option,
                                test_telnet_subnegotiation_inside_a_line_is_skipped,
                                test_telnet_other_commands_are_dropped_without_a_reply,
                                test_telnet_bytes_do_not_count_towards_the_line_limit,
                                test_telnet_negotiation_at_connect_then_the_first_command,
                                test_plain_clients_never_receive_an_iac_byte;
                                the real telnet in a pty: test_real_telnet_session_through_ctrl_c,
                                test_real_telnet_with_option_negotiation_processes_the_first_command
Commands
  USERNAME <name>               test_username_refused,
                                test_username_accepted_silently_and_shown_as_typed,
                                test_username_taken, test_sending_own_name_again_is_silent,
                                test_own_name_in_another_case_is_not_taken_and_is_shown_as_typed,
                                test_rename_frees_old_name_at_once,
                                test_rejected_username_keeps_the_old_name;
                                the v2 rows: test_username_that_shows_nothing_is_refused,
                                test_username_that_shows_nothing_in_the_order_of_the_rows,
                                test_lookalike_names,
                                test_rename_frees_every_form_of_the_old_name_at_once
  SEND <message>                test_send_before_a_name, test_send_refused,
                                test_send_of_only_whitespace_controls_is_refused,
                                test_send_relayed_byte_for_byte
  Anything else                 test_unknown_commands
Delivery guarantees             test_sender_never_receives_its_own_messages,
                                test_connections_without_a_name_receive_nothing,
                                test_every_recipient_sees_one_global_order,
                                test_thousand_registered_clients_all_receive_a_broadcast
Limits and failures
  Slow consumers                test_slow_consumer_is_disconnected_others_unaffected,
                                test_slow_consumer_is_dropped_without_slowing_the_others,
                                test_many_slow_consumers_and_several_senders_keep_one_order
  Fairness                      test_flooder_does_not_starve_a_conversation,
                                test_a_turn_processes_a_bounded_share_of_each_connections_lines
  Too many connections, fds     test_server_full,
                                test_fd_exhaustion_does_not_spin_and_service_continues,
                                test_accept_pauses_for_exactly_accept_pause_after_emfile
  End of input                  test_half_close_processes_everything_then_closes,
                                test_half_close_answers_the_final_line,
                                test_half_close_with_many_replies_pending
  A reset or broken connection  test_reset_client_does_not_disturb_others_and_frees_its_name,
                                test_resets_in_the_middle_of_a_broadcast_spare_the_others,
                                test_connect_reset_cycles_leak_no_descriptors
  No input can crash it         see "Model-based and fuzz tests"
Real networks                   test_real_networks.py (network namespaces, the fake clock)
TLS                             test_tls.py (the transport against fakes, and the TLS port)
Monitoring                      test_metrics.py
The program
  Usage, --help, --log-level    test_help_explains_every_option, test_log_level_in_any_case,
                                test_log_level_above_info_hides_connections,
                                test_cluster_options_without_redis_are_ignored_with_a_warning
  One thread, one loop          test_closing_a_server_twice_is_harmless (ChatServer embedded),
                                test_a_wake_up_is_drained_so_the_loop_waits_again
  Timers (the fake clock)       test_timers_run_in_deadline_order_once_due,
                                test_a_cancelled_timer_never_runs,
                                test_a_timer_set_by_a_callback_for_now_runs_next_turn,
                                test_many_cancelled_timers_do_not_pile_up
  Logs                          test_logs_show_events_but_never_message_text,
                                test_log_name_starts_every_line,
                                test_a_bad_redis_port_is_one_plain_line
  Ctrl-C or SIGTERM             test_signal_stops_the_server_within_a_second,
                                test_signal_stops_at_once_with_output_queued
  Port in use, bad option       test_port_already_in_use, test_host_that_cannot_be_bound,
                                test_bad_command_line
Cluster mode                    test_cluster.py (with What "accepted" means, v2)
Model-based and fuzz tests      test_state_machine_matches_the_room_model (delivery, every
                                reply), test_fuzzer_beside_a_chatting_pair (no input can crash
                                it or make it send anything outside the protocol)
Room and batch, no sockets      test_room.py
This file's index               test_the_index_names_every_test_of_this_file_and_nothing_else
"""

from __future__ import annotations

import errno
import logging
import operator
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Final

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from hypothesis.stateful import (
    run_state_machine_as_test,
)

import chat
from chat_testing import (
    SEED_ONE_INPUT,
    SEED_ONE_REPLY,
    ChatMachine,
    PtyTelnet,
    RecordingProxy,
    RoomModel,
    assert_contract_line,
    assert_cut_short,
    cut_points,
    expect_exactly,
    good_messages,
    lines_near_limit,
    machine_settings,
    name_line,
    no_iac,
    read_through_sync,
    seed_session_one,
    seed_session_two,
    send_lines,
    send_randomly_cut,
    send_until_closed,
    take_name_within,
)
from conftest import (
    HERE,
    LINE_TOO_LONG,
    LISTENING,
    MAX_LINE,
    MESSAGE_EMPTY,
    MESSAGE_INVALID,
    NAME_EMPTY,
    NAME_HAS_SPACES,
    NAME_INVALID,
    NAME_REQUIRED,
    NAME_TAKEN,
    NAME_TOO_LONG,
    SERVER_FULL,
    SYNC,
    SYNC_REPLY,
    TIMEOUT,
    UNRECOGNISED,
    Client,
    FakeClock,
    Netcat,
    RunningServer,
    in_process,
    launch,
    nc_path,
    poll,
    raise_fd_limit,
    receive,
    receives,
    require_tool,
    run_chat,
    send_line,
    sends,
    start_server,
    username,
)

# ============================================================================
# Helpers of this file (the shared ones are in conftest.py)
# ============================================================================


# The zero-width joiner sequence "woman technologist": format characters
# (Cf) are allowed in messages.
ZWJ_EMOJI: Final = "\U0001f469\u200d\U0001f4bb"


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


# ============================================================================
# The opening: the README's sessions, as a person types them into nc
# ============================================================================


def test_seed_session_one(server: RunningServer) -> None:
    """README session one, byte for byte: a refused USERNAME, an unknown command."""
    seed_session_one(server.client())


def test_seed_session_two(server: RunningServer) -> None:
    """README session two, byte for byte: two users talk; no sender gets its own."""
    seed_session_two(server.client(), server.client())


def test_nc_seed_session_two(server: RunningServer) -> None:
    """README session two typed into two real nc processes."""
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
    """README session one through real nc, with \\n and with \\r\\n (-C) line ends."""
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


# ============================================================================
# Connecting; Lines
# ============================================================================


# --- TCP, dual-stack by default; --host narrows it ---------------------------


needs_dualstack = pytest.mark.skipif(
    not socket.has_dualstack_ipv6(), reason="no dual-stack IPv6 on this system"
)


@needs_dualstack
def test_default_host_serves_ipv4_and_ipv6_together() -> None:
    """No host: one dual-stack listener serves IPv6 and IPv4 clients in one room."""
    running = start_server(host=None)
    port = running.address[1]
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
        running.stop()
    assert not running.thread.is_alive()


@needs_dualstack
def test_program_without_host_serves_ipv4_and_ipv6() -> None:
    """`python chat.py 0` without --host listens dual-stack, IPv4 and IPv6."""
    with launch(host=None) as running:
        port = running.port
        assert port != 0
        with Client(("127.0.0.1", port)) as v4, Client(("::1", port)) as v6:
            v4.register("four")
            v6.register("six")
            v6.send(b"SEND hi\n")
            assert v6.sync() == []
            assert v4.sync() == [receive("six", "hi")]
        assert "(every address, IPv6 and IPv4)" in running.log.text()
        running.process.terminate()
        running.process.wait(TIMEOUT)
        assert running.process.returncode == 0


def test_host_ipv6_any_is_logged_as_ipv6_only() -> None:
    """--host narrows it: `--host ::` listens on IPv6 only, and says so."""
    with launch(host="::") as running:
        with pytest.raises(ConnectionRefusedError):
            Client(("127.0.0.1", running.port)).close()
        with Client(("::1", running.port)) as six, Client(("::1", running.port)) as other:
            six.register("six")
            other.register("other")
            six.send(b"SEND over IPv6\n")
            assert six.sync() == []
            assert other.sync() == [receive("six", "over IPv6")]
        assert f"listening on [::]:{running.port} (IPv6 only)" in running.log.text()


# --- Port: PORT = 8080 by default; port 0 and the startup log line -----------


def test_module_port_is_the_default() -> None:
    """Port: with no argument the module-level PORT = 8080 is used."""
    assert chat.PORT == 8080
    assert chat.parse_args([]).port == chat.PORT
    assert chat.parse_args(["9000"]).port == 9000


def test_port_zero_logs_the_real_port() -> None:
    """Port 0 asks the system for a free port; the startup log line shows the real one."""
    with launch() as running:  # port 0
        found = LISTENING.search(running.log.text())
        assert found is not None
        assert found.group(1) == "127.0.0.1"
        port = int(found.group(2))
        assert port != 0
        # The logged port is the real one: chat happens on it.
        alice = Client(("127.0.0.1", port))
        bob = Client(("127.0.0.1", port))
        running.clients += [alice, bob]
        alice.register("alice")
        bob.register("bob")
        alice.send(b"SEND hi\n")
        assert alice.sync() == []
        assert bob.sync() == [receive("alice", "hi")]
        running.process.terminate()
        rest = running.stderr_text()
        assert running.process.returncode == 0
        assert "Traceback" not in rest


# --- A line ends with \n; one \r before it is dropped ------------------------


def test_crlf_line_endings(server: RunningServer) -> None:
    """One \\r right before the \\n is dropped, so telnet and Windows clients work."""
    jeff = server.member("jeff")
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
    """Only one \\r is dropped: the rest of a line ending in \\r\\r\\n keeps a \\r."""
    jeff = server.member("jeff")
    client = server.member("client")
    client.send(data)
    assert client.sync_unrecognised() == replies
    assert jeff.sync() == []


# --- A line in any number of pieces, many lines in one piece -----------------


def test_seed_sessions_one_byte_per_send(server: RunningServer) -> None:
    """A line may arrive one byte per packet: the README sessions, byte by byte."""
    one_byte = [1]
    pace = 0.001  # spaces the bytes out so the server sees them one by one
    mia = server.client()
    send_in_pieces(mia, SEED_ONE_INPUT + b"NOT_A_COMMAND test\n", one_byte, pace)
    expect_exactly(mia, SEED_ONE_REPLY + UNRECOGNISED + b"\n")
    teixe = server.client()
    send_in_pieces(teixe, b"USERNAME teixe\n", one_byte, pace)
    assert teixe.sync() == []
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
    """Any number of pieces, many lines in one piece: the result is the same."""
    jeff = server.member("jeff")
    client = server.client()
    send_in_pieces(client, CHUNKING_SCRIPT, sizes)
    assert client.sync_unrecognised() == CHUNKING_REPLIES
    assert jeff.sync() == CHUNKING_RELAYED


def test_many_lines_in_one_send(server: RunningServer) -> None:
    """Many lines may arrive in one piece: a thousand SENDs in one sendall."""
    jeff = server.member("jeff")
    teixe = server.client()
    lines = [username("teixe")] + [send_line(f"n{i}") for i in range(1000)] + [b"BAD\n"]
    teixe.send(b"".join(lines))
    assert teixe.sync_unrecognised() == [UNRECOGNISED]
    assert jeff.sync() == [receive("teixe", f"n{i}") for i in range(1000)]


# --- A line longer than 4096 bytes -------------------------------------------


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
    """Over 4096 bytes (not counting \\r\\n): one Line too long, then carry on."""
    jeff = server.member("jeff")
    sender = server.member("sender")
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
    """A too long line's bytes are discarded up to the next \\n only."""
    jeff = server.member("jeff")
    sender = server.member("sender")
    sender.send(long_send(5000) + b"\nSEND next\n" + long_send(MAX_LINE + 1) + b"\r\nSEND last\n")
    assert sender.sync() == [LINE_TOO_LONG, LINE_TOO_LONG]
    assert jeff.sync() == [receive("sender", "next"), receive("sender", "last")]


def test_one_megabyte_line(server: RunningServer) -> None:
    """A 1 MiB line is answered once with Line too long; the next line is processed."""
    jeff = server.member("jeff")
    sender = server.member("sender")
    line = long_send(1 << 20)
    for start in range(0, len(line), 50_000):
        sender.send(line[start : start + 50_000])
    sender.send(b"\nSEND after\n")
    assert sender.sync() == [LINE_TOO_LONG]
    assert jeff.sync() == [receive("sender", "after")]


def test_ten_megabyte_line_is_refused_once_in_bounded_memory() -> None:
    """A 10 MiB line: one Line too long, in bounded memory."""
    with launch() as server:
        client = server.client()
        assert client.sync() == []
        # VmHWM is the peak: a buffer that grew and was freed still shows.
        peak_before = server.status_kib("VmHWM")
        rss_before = server.status_kib("VmRSS")
        piece = b"x" * 65536
        for _ in range(160):  # 10 MiB, no "\n"
            client.send(piece)
        client.send(b"\n")
        assert client.sync() == [LINE_TOO_LONG]
        peak_growth = server.status_kib("VmHWM") - peak_before
        rss_growth = server.status_kib("VmRSS") - rss_before
        assert peak_growth < 4096, f"peak memory grew by {peak_growth} KiB"
        assert rss_growth < 4096, f"memory grew by {rss_growth} KiB"
        # The line after it is a line like any other.
        client.register("after")
        server.finish()


# --- An empty line is ignored ------------------------------------------------


def test_blank_lines_get_no_reply(server: RunningServer) -> None:
    """An empty line (\\n or \\r\\n) is ignored: no reply, named or not."""
    jeff = server.member("jeff")
    unnamed = server.client()
    named = server.member("named")
    for client in (unnamed, named):
        client.send(b"\n\r\n\n\r\n")
        client.send(b"\r")
        client.send(b"\n")  # "\r\n" split across two sends
        assert client.sync() == []
    assert jeff.sync() == []


def test_megabytes_of_blank_lines_cost_linear_time() -> None:
    """Empty lines are ignored: 4 Mi of them, in linear time."""
    with launch() as server:
        client = server.client()
        assert client.sync() == []
        cpu_before = server.cpu_seconds()
        start = time.monotonic()
        client.send(b"\n" * (4 << 20))
        assert client.sync() == []  # no reply to any blank line
        elapsed = time.monotonic() - start
        cpu = server.cpu_seconds() - cpu_before
        # Both take ~0.8 s on an idle 2-core machine; anything quadratic in
        # 4 Mi lines would take hours. The server's CPU time is the sharp
        # measure: other processes on the machine barely change it, whereas
        # the wall time reached 4.1 s with two busy loops and two other runs
        # of this file beside it.
        assert cpu < 3.0, f"4 Mi blank lines took {cpu:.2f}s of the server's CPU"
        assert elapsed < 10.0, f"4 Mi blank lines took {elapsed:.2f}s"
        server.finish()


# --- Telnet ------------------------------------------------------------------
#
# The telnet bytes are typed here from RFC 854 and 860, never imported from
# protocol.py. The raw-socket tests speak telnet by hand; the last two run the
# real `telnet` client in a pseudo-terminal, through a recording proxy that
# shows what it really sent and got.

TELNET_IAC: Final = 0xFF
TELNET_DONT, TELNET_DO, TELNET_WONT, TELNET_WILL = 0xFE, 0xFD, 0xFC, 0xFB
TELNET_SB, TELNET_SE = 0xFA, 0xF0
TELNET_IP, TELNET_AO = 0xF4, 0xF5
TIMING_MARK: Final = 6


def iac(*codes: int) -> bytes:
    """A telnet command: IAC, then `codes`."""
    return bytes((TELNET_IAC, *codes))


# What `telnet` sends for Ctrl-C, and the answer it waits for.
CTRL_C: Final = iac(TELNET_IP) + iac(TELNET_DO, TIMING_MARK)
WILL_TIMING_MARK: Final = iac(TELNET_WILL, TIMING_MARK)
# What inetutils telnet offers at once after `open host -PORT` (captured from
# it), and the refusals the contract gives in return, in order.
TELNET_OFFERS: Final = [
    (TELNET_DO, 38), (TELNET_WILL, 38), (TELNET_DO, 3), (TELNET_WILL, 24), (TELNET_WILL, 31),
    (TELNET_WILL, 32), (TELNET_WILL, 33), (TELNET_WILL, 34), (TELNET_WILL, 39), (TELNET_DO, 5),
]  # fmt: skip
TELNET_OPENING: Final = b"".join(iac(verb, option) for verb, option in TELNET_OFFERS)
TELNET_REFUSALS: Final = b"".join(
    iac(TELNET_WONT if verb == TELNET_DO else TELNET_DONT, option) for verb, option in TELNET_OFFERS
)


def before_sync(client: Client) -> bytes:
    """Send SYNC; every byte that came before its reply, telnet bytes
    included (`Client.sync` splits into lines, which hides stray bytes)."""
    client.send(SYNC)
    marker = SYNC_REPLY + b"\n"
    data = client.buffer
    while marker not in data:
        chunk = client.sock.recv(65536)  # bounded by the socket's timeout
        if not chunk:
            raise EOFError(f"closed after {data!r}")
        data += chunk
    end = data.index(marker)
    client.buffer = data[end + len(marker) :]
    return data[:end]


def test_telnet_ctrl_c_is_answered_and_drops_the_unfinished_line(server: RunningServer) -> None:
    """Telnet: IAC DO TIMING-MARK gets IAC WILL TIMING-MARK; IAC IP drops the unfinished line."""
    watcher = server.member("watcher")
    x = server.member("x")
    x.send(b"SEND half")
    x.send(CTRL_C)
    assert x.exactly(len(WILL_TIMING_MARK)) == WILL_TIMING_MARK
    x.send(b"SEND whole\r\n")
    assert before_sync(x) == b""  # no ERROR line, nothing else
    assert watcher.sync() == [receive("x", "whole")]


@pytest.mark.parametrize("command", [TELNET_IP, TELNET_AO], ids=["IP", "AO"])
def test_telnet_interrupt_or_abort_output_drops_the_unfinished_line(
    server: RunningServer, command: int
) -> None:
    """Telnet: on IAC IP or IAC AO the server drops the unfinished line typed so far."""
    watcher = server.member("watcher")
    x = server.member("x")
    x.send(b"SEND half" + iac(command) + b"SEND whole\n")
    assert before_sync(x) == b""
    # In pieces too: the line typed before the command came in an earlier read.
    x.send(b"SEND half")
    assert watcher.sync() == [receive("x", "whole")]  # (the half is not a line yet)
    x.send(iac(command))
    x.send(b"SEND again\n")
    assert before_sync(x) == b""
    assert watcher.sync() == [receive("x", "again")]


def test_telnet_every_ctrl_c_is_answered(server: RunningServer) -> None:
    """Telnet: IAC DO TIMING-MARK is answered with IAC WILL TIMING-MARK every time."""
    watcher = server.member("watcher")
    x = server.member("x")
    for _ in range(4):
        x.send(CTRL_C)
        assert x.exactly(len(WILL_TIMING_MARK)) == WILL_TIMING_MARK
    x.send(3 * CTRL_C)
    assert before_sync(x) == 3 * WILL_TIMING_MARK
    x.send(b"SEND still here\n")
    assert before_sync(x) == b""
    assert watcher.sync() == [receive("x", "still here")]


def test_telnet_options_are_refused_once_per_verb_and_option(server: RunningServer) -> None:
    """Telnet: DO x -> WONT x, WILL x -> DONT x, once per verb and option; WONT, DONT: nothing."""
    x = server.client()
    echo, sga, ttype = 1, 3, 24
    x.send(
        iac(TELNET_DO, echo)
        + iac(TELNET_WILL, echo)
        + iac(TELNET_DO, echo)
        + iac(TELNET_WILL, echo)
        + iac(TELNET_DO, sga)
        + iac(TELNET_WILL, ttype)
        + iac(TELNET_DONT, sga)
        + iac(TELNET_WONT, ttype)
        + iac(TELNET_DO, 0xFF)  # the option byte may be 0xFF (EXOPL)
    )
    assert before_sync(x) == (
        iac(TELNET_WONT, echo)
        + iac(TELNET_DONT, echo)
        + iac(TELNET_WONT, sga)
        + iac(TELNET_DONT, ttype)
        + iac(TELNET_WONT, 0xFF)
    )
    # Asked again, later: already refused, so no answer.
    x.send(iac(TELNET_DO, echo) + iac(TELNET_WILL, ttype) + iac(TELNET_DO, sga))
    assert before_sync(x) == b""
    # The other verb for the same option is its own question.
    x.send(iac(TELNET_WILL, sga) + iac(TELNET_DO, ttype))
    assert before_sync(x) == iac(TELNET_DONT, sga) + iac(TELNET_WONT, ttype)
    # Per connection: another one is answered afresh.
    other = server.client()
    other.send(iac(TELNET_DO, echo))
    assert before_sync(other) == iac(TELNET_WONT, echo)


SUBNEGOTIATION: Final = (
    iac(TELNET_SB, 24) + b"\x00xterm\nSEND evil\n" + iac(TELNET_IAC) + b"\r\n" + iac(TELNET_SE)
)


@pytest.mark.parametrize("size", [None, 1], ids=["one-piece", "byte-by-byte"])
def test_telnet_subnegotiation_inside_a_line_is_skipped(
    server: RunningServer, size: int | None
) -> None:
    """Telnet: IAC SB ... IAC SE is skipped, \\n included; the line is as if it were not there."""
    watcher = server.member("watcher")
    x = server.member("x")
    data = b"SEND hel" + SUBNEGOTIATION + b"lo\r\n"
    send_in_pieces(x, data, [size or len(data)])
    assert before_sync(x) == b""
    assert watcher.sync() == [receive("x", "hello")]


@pytest.mark.parametrize(
    "command",
    [
        iac(TELNET_IAC),  # an escaped 0xFF
        iac(TELNET_WONT, 1),
        iac(TELNET_DONT, 1),
        iac(0xF1),  # NOP
        iac(0xF6),  # AYT
        iac(0xF7),  # EC
        iac(0xF8),  # EL
        iac(0xF9),  # GA
        iac(0xF3),  # BRK
        iac(0xF2),  # DM
    ],
    ids=["IAC", "WONT", "DONT", "NOP", "AYT", "EC", "EL", "GA", "BRK", "DM"],
)
def test_telnet_other_commands_are_dropped_without_a_reply(
    server: RunningServer, command: bytes
) -> None:
    """Telnet: WONT, DONT, NOP, AYT, EC, EL, GA, BRK, DM, IAC IAC are dropped without a reply."""
    watcher = server.member("watcher")
    x = server.member("x")
    x.send(b"SEND a" + command + b"b\n")
    assert before_sync(x) == b""
    assert watcher.sync() == [receive("x", "ab")]


def with_telnet_inside(line: bytes) -> bytes:
    """`line` with telnet commands between its bytes: a NOP every 100
    bytes, one 3000-byte subnegotiation, and one DO ECHO."""
    pieces = [line[i : i + 100] for i in range(0, len(line), 100)]
    middle = len(pieces) // 2
    pieces[middle] += iac(TELNET_SB, 24) + b"y" * 3000 + iac(TELNET_SE) + iac(TELNET_DO, 1)
    return iac(0xF1).join(pieces)


def test_telnet_bytes_do_not_count_towards_the_line_limit(server: RunningServer) -> None:
    """Telnet bytes do not count towards the 4096-byte line limit."""
    watcher = server.member("watcher")
    x = server.member("x")
    line = with_telnet_inside(long_send(MAX_LINE))
    assert len(line) > MAX_LINE + 3000
    x.send(line + b"\r\n")
    assert before_sync(x) == iac(TELNET_WONT, 1)
    assert watcher.sync() == [receive("x", b"x" * (MAX_LINE - 5))]
    # The limit still holds for the text itself.
    x.send(with_telnet_inside(long_send(MAX_LINE + 1)) + b"\r\nSEND next\r\n")
    assert before_sync(x) == LINE_TOO_LONG + b"\n"
    assert watcher.sync() == [receive("x", "next")]


@pytest.mark.parametrize("together", [True, False], ids=["same-packet", "after-the-answers"])
def test_telnet_negotiation_at_connect_then_the_first_command(
    server: RunningServer, together: bool
) -> None:
    """Telnet: with option negotiation at connect, the first command is processed normally."""
    watcher = server.member("watcher")
    tel = server.client()
    if together:
        tel.send(TELNET_OPENING + b"USERNAME tel\r\n")
    else:
        tel.send(TELNET_OPENING)
        assert tel.exactly(len(TELNET_REFUSALS)) == TELNET_REFUSALS
        tel.send(b"USERNAME tel\r\n")
    assert before_sync(tel) == (TELNET_REFUSALS if together else b"")
    tel.send(b"SEND hi\r\n")
    assert before_sync(tel) == b""
    assert watcher.sync() == [receive("tel", "hi")]


def test_plain_clients_never_receive_an_iac_byte(server: RunningServer) -> None:
    """Telnet: the server never sends an IAC byte to a client that has not sent one."""
    received: dict[str, bytearray] = {"alice": bytearray(), "bob": bytearray()}
    alice, bob = server.member("alice"), server.member("bob")
    tel = server.client()

    def sync_plain(name: str, client: Client) -> bytes:
        got = before_sync(client)
        received[name] += got + SYNC_REPLY + b"\n"
        return got

    tel.send(TELNET_OPENING + b"USERNAME tel\r\n")
    tel.send(b"SEND from" + SUBNEGOTIATION + b" telnet\r\nSEND half" + CTRL_C)
    tel.send(iac(TELNET_DO, 1) + iac(TELNET_WILL, 1) + b"SEND \xc3\xbf\r\n")  # ÿ is C3 BF
    assert before_sync(tel) == (
        TELNET_REFUSALS + WILL_TIMING_MARK + iac(TELNET_WONT, 1) + iac(TELNET_DONT, 1)
    )
    from_tel = receive("tel", "from telnet") + b"\n" + receive("tel", "ÿ") + b"\n"
    assert sync_plain("alice", alice) == from_tel
    alice.send(b"SEND hi bob\nSEND \xfe\n" + long_send(MAX_LINE + 1) + b"\n")
    assert sync_plain("alice", alice) == MESSAGE_INVALID + b"\n" + LINE_TOO_LONG + b"\n"
    bob.send(b"SEND hi alice\n")
    assert sync_plain("bob", bob) == from_tel + receive("alice", "hi bob") + b"\n"
    assert sync_plain("alice", alice) == receive("bob", "hi alice") + b"\n"
    # Their whole streams, to the end.
    received["alice"] += alice.half_close()
    received["bob"] += bob.half_close()
    for name, stream in received.items():
        assert b"\xff" not in stream, (name, bytes(stream))


# --- Telnet: the real `telnet` client -----------------------------------------


@pytest.fixture
def telnet_path() -> str:
    """The `telnet` program; CI must have it (.ci/run installs it)."""
    return require_tool(shutil.which("telnet"), "telnet")


def test_real_telnet_session_through_ctrl_c(
    server: RunningServer, telnet_path: str, tmp_path: Path
) -> None:
    """`telnet host 8080` works through Ctrl-C: the session goes on, both ways."""
    plain = server.member("plain")
    with (
        RecordingProxy(server.address) as proxy,
        PtyTelnet(telnet_path, "127.0.0.1", str(proxy.port), home=tmp_path) as tel,
    ):
        tel.expect(b"Escape character is")
        tel.type(b"USERNAME tel\r")
        assert b"ERROR" not in tel.sync()
        plain.send(b"SEND hello tel\n")
        assert plain.sync() == []
        tel.expect(b"RECEIVE plain hello tel")
        tel.type(b"SEND hi plain\r")
        assert b"ERROR" not in tel.sync()
        assert plain.sync() == [receive("tel", "hi plain")]
        # Half a line, then Ctrl-C.
        tel.type(b"SEND half")
        tel.type(b"\x03")
        poll("telnet to send Ctrl-C", lambda: CTRL_C in proxy.client_sent())
        poll("the server to answer it", lambda: WILL_TIMING_MARK in proxy.client_got())
        assert b"ERROR" not in tel.sync()
        # Still a session: the user sees later messages, and is heard.
        plain.send(b"SEND after ctrl-c\n")
        assert plain.sync() == []
        tel.expect(b"RECEIVE plain after ctrl-c")
        tel.type(b"SEND whole\r")
        assert b"ERROR" not in tel.sync()
        assert plain.sync() == [receive("tel", "whole")]
        # The connection never sent anything to telnet but lines and the mark.
        assert proxy.client_got().count(b"\xff") == 1


def test_real_telnet_with_option_negotiation_processes_the_first_command(
    server: RunningServer, telnet_path: str, tmp_path: Path
) -> None:
    """`telnet` -> `open host -8080`: options are negotiated, and the first command is processed."""
    plain = server.member("plain")
    with RecordingProxy(server.address) as proxy, PtyTelnet(telnet_path, home=tmp_path) as tel:
        tel.expect(b"telnet> ")
        tel.type(f"open 127.0.0.1 -{proxy.port}\r".encode())
        tel.expect(b"Escape character is")
        tel.type(b"USERNAME neg\r")  # at once, the first command
        tel.type(b"SEND first\r")
        assert b"ERROR" not in tel.sync()
        assert plain.sync() == [receive("neg", "first")]
        assert proxy.client_sent().startswith(b"\xff")  # it did negotiate
        assert WILL_TIMING_MARK not in proxy.client_got()
        assert b"\xff" in proxy.client_got()  # and was refused
        plain.send(b"SEND welcome\n")
        assert plain.sync() == []
        tel.expect(b"RECEIVE plain welcome")


# ============================================================================
# Commands
# ============================================================================


# --- USERNAME <name> ---------------------------------------------------------
# The v2 rows (names that show nothing, names that look alike) come after the v1 ones.


# (the USERNAME line without "\n", the reply to a connection without a name)
USERNAME_ROWS: Final[list[tuple[bytes, bytes]]] = [
    # empty
    (b"USERNAME", NAME_EMPTY),
    (b"USERNAME ", NAME_EMPTY),
    # not valid UTF-8 (checked before whitespace: the last row has a space)
    (b"USERNAME \xfe", NAME_INVALID),
    (b"USERNAME te\xc3ixe", NAME_INVALID),
    (b"USERNAME \xc0\xaf", NAME_INVALID),
    (b"USERNAME \xed\xa0\x80", NAME_INVALID),
    (b"USERNAME \xf4\x90\x80\x80", NAME_INVALID),
    (b"USERNAME a b\xfe", NAME_INVALID),
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
    """USERNAME: every refusing row of the table, in its order, and no name after it."""
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
    """USERNAME otherwise: no reply; the displayed name is kept as typed."""
    watcher = server.member("watcher")
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
    """USERNAME held by another connection (NFKC + casefold): Username already in use."""
    first = server.member(holder)
    second = server.client()
    second.send(username(attempt))
    assert second.sync() == [NAME_TAKEN]
    # The holder keeps it, and the second connection has no name.
    second.send(b"SEND hi\n")
    assert second.sync() == [NAME_REQUIRED]
    observer = server.member("observer")
    first.send(b"SEND still mine\n")
    assert first.sync() == []
    assert observer.sync() == [receive(holder, "still mine")]


def test_sending_own_name_again_is_silent(server: RunningServer) -> None:
    """USERNAME: setting the name it already has is fine (no reply)."""
    teixe = server.member("teixe")
    jeff = server.member("jeff")
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
    """USERNAME: the holder may respell its own name; others see the new spelling."""
    teixe = server.member("teixe")
    jeff = server.member("jeff")
    teixe.send(username("TEIXE"))
    assert teixe.sync() == []
    teixe.send(b"SEND hi\n")
    assert teixe.sync() == []
    assert jeff.sync() == [receive("TEIXE", "hi")]


def test_rename_frees_old_name_at_once(server: RunningServer) -> None:
    """USERNAME again: a valid new name replaces the old one, which is free at once."""
    teixe = server.member("teixe")
    watcher = server.member("watcher")
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
        (b"USERNAME \xfe", NAME_INVALID),
        (b"USERNAME te\x1bixe", NAME_INVALID),
        (username("x" * 33)[:-1], NAME_TOO_LONG),
        (b"USERNAME JEFF", NAME_TAKEN),
    ],
    ids=repr,
)
def test_rejected_username_keeps_the_old_name(
    server: RunningServer, line: bytes, reply: bytes
) -> None:
    """A rejected USERNAME leaves the current name unchanged."""
    teixe = server.member("teixe")
    jeff = server.member("jeff")
    teixe.send(line + b"\n")
    assert teixe.sync() == [reply]
    teixe.send(b"SEND still teixe\n")
    assert teixe.sync() == []
    assert jeff.sync() == [receive("teixe", "still teixe")]
    # And the old name is still held.
    other = server.client()
    other.send(username("teixe"))
    assert other.sync() == [NAME_TAKEN]


# The v2 rows. Names that show nothing: (the name, why), each refused as
# invalid characters.
INVISIBLE_NAMES: Final[list[tuple[str, str]]] = [
    ("te\u3164ixe", "U+3164 HANGUL FILLER"),
    ("te\u2800ixe", "U+2800 BRAILLE PATTERN BLANK"),
    ("te\u034fixe", "U+034F COMBINING GRAPHEME JOINER"),
    ("teixe\ufe0f", "U+FE0F VARIATION SELECTOR-16"),
    ("teixe\U000e0100", "U+E0100 VARIATION SELECTOR-17"),
    ("\u3164", "only U+3164"),
    ("\u0301teixe", "leading Mn, U+0301"),
    ("\u0903teixe", "leading Mc, U+0903"),
    ("\u20ddteixe", "leading Me, U+20DD"),
]


@pytest.mark.parametrize(("name", "why"), INVISIBLE_NAMES, ids=[why for _, why in INVISIBLE_NAMES])
def test_username_that_shows_nothing_is_refused(server: RunningServer, name: str, why: str) -> None:
    """USERNAME (v2): a character that shows nothing, or a leading combining mark: invalid."""
    client = server.client()
    client.send(username(name))
    assert client.sync() == [NAME_INVALID], why
    client.send(b"SEND hi\n")
    assert client.sync() == [NAME_REQUIRED]


@pytest.mark.parametrize(
    ("name", "reply"),
    [
        ("te ixe\u3164", NAME_HAS_SPACES),  # whitespace comes first
        ("\u0301te ixe", NAME_HAS_SPACES),
        ("te\u3164ixe" + "x" * 40, NAME_INVALID),  # before the length
        ("\u0301" + "x" * 40, NAME_INVALID),
        ("t\u0435i\u034fxe", NAME_INVALID),  # before "in use" (teixe is held)
        ("teixe\ufe0f", NAME_INVALID),
    ],
    ids=ascii,
)
def test_username_that_shows_nothing_in_the_order_of_the_rows(
    server: RunningServer, name: str, reply: bytes
) -> None:
    """USERNAME (v2): the row "shows nothing" comes after whitespace, before length and in use."""
    server.member("teixe")
    client = server.client()
    client.send(username(name))
    assert client.sync() == [reply]


# (the holder's name, the attempt, whether the attempt is the same name)
LOOKALIKE_NAMES: Final[list[tuple[str, str, bool]]] = [
    ("teixe", "t\u0435ixe", True),  # Cyrillic е
    ("t\u0435ixe", "teixe", True),
    ("Bob", "\u0392\u03bfb", True),  # Greek Βο
    ("\u0392\u03bfb", "Bob", True),
    ("alice", "aIice", True),  # capital I
    ("aIice", "alice", True),
    ("user1", "userl", True),
    ("userl", "user1", True),
    ("rnodern", "modern", True),
    ("modern", "rnodern", True),
    ("TEIXE", "\u03a4\u0395\u0399\u03a7\u0395", True),  # Greek capitals ΤΕΙΧΕ
    ("\u03a4\u0395\u0399\u03a7\u0395", "TEIXE", True),
    ("teixe", "\u03a4\u0395\u0399\u03a7\u0395", False),  # a person sees capitals
    ("\u03a4\u0395\u0399\u03a7\u0395", "teixe", False),
]


@pytest.mark.parametrize(("holder", "attempt", "same"), LOOKALIKE_NAMES, ids=ascii)
def test_lookalike_names(server: RunningServer, holder: str, attempt: str, same: bool) -> None:
    """USERNAME (v2): names that look the same (confusable skeletons) are one name."""
    watcher = server.member("watcher")
    first = server.member(holder)
    second = server.client()
    second.send(username(attempt))
    if same:
        assert second.sync() == [NAME_TAKEN]
        second.send(b"SEND hi\n")
        assert second.sync() == [NAME_REQUIRED]
    else:
        assert second.sync() == []
        second.send(b"SEND hi\n")
        assert second.sync() == []
        assert watcher.sync() == [receive(attempt, "hi")]
        assert first.sync() == [receive(attempt, "hi")]
    # The holder keeps its name either way.
    first.send(b"SEND still mine\n")
    assert first.sync() == []
    assert watcher.sync() == [receive(holder, "still mine")]


def test_rename_frees_every_form_of_the_old_name_at_once(server: RunningServer) -> None:
    """USERNAME again (v2): the old name is free at once, look-alikes included."""
    greek = "\u03a4\u0395\u0399\u03a7\u0395"  # looks like TEIXE as typed
    cyrillic = "t\u0435ixe"  # looks like teixe, TEIXE's key
    holder = server.member("TEIXE")
    others = [server.client() for _ in range(3)]
    for other, attempt in zip(others, ["teixe", greek, cyrillic], strict=True):
        other.send(username(attempt))
        assert other.sync() == [NAME_TAKEN], attempt
    holder.send(username("bob"))
    assert holder.sync() == []
    # No waiting: each form is free for the next connection that asks.
    for index, (other, attempt) in enumerate(zip(others, [greek, cyrillic, "TEIXE"], strict=True)):
        other.send(username(attempt))
        assert other.sync() == [], attempt
        other.register(f"done{index}")  # and leaves it for the next form


# --- SEND <message> ----------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [b"SEND hi", b"SEND", b"SEND ", b"SEND \xfe", b"SEND \x1b[2J", b"SEND   "],
    ids=repr,
)
def test_send_before_a_name(server: RunningServer, line: bytes) -> None:
    # The missing name is reported first, whatever the message.
    """SEND without a username yet: You must set a username first, whatever it holds."""
    bystander = server.member("bystander")
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
    (b"SEND \xfe", MESSAGE_INVALID),
    (b"SEND caf\xc3", MESSAGE_INVALID),
    (b"SEND \xc0\xaf", MESSAGE_INVALID),
    (b"SEND \xed\xa0\x80", MESSAGE_INVALID),
    (b"SEND \xf4\x90\x80\x80", MESSAGE_INVALID),
    (b"SEND \xfe ", MESSAGE_INVALID),  # not valid UTF-8, so not "whitespace"
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
    """SEND: the empty and invalid-characters rows, nothing relayed."""
    sender = server.member("sender")
    other = server.member("other")
    sender.send(line + b"\n")
    assert sender.sync() == [reply]
    assert other.sync() == []


@pytest.mark.parametrize("message", [b"\x0b", b"\x1c\x1d", "\u0085".encode(), b" \x0c "])
def test_send_of_only_whitespace_controls_is_refused(server: RunningServer, message: bytes) -> None:
    # Both the "empty" row (str.isspace() is true) and the "control
    # character" row apply; PROTOCOL.md does not say which comes first for
    # SEND, so either reply is accepted, but nothing may be relayed.
    """SEND of controls that are whitespace: refused (empty or invalid), not relayed."""
    sender = server.member("sender")
    other = server.member("other")
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
    """SEND otherwise: no reply; others get RECEIVE <name> <message>, byte for byte."""
    sender = server.member("sender")
    other = server.member("other")
    sender.send(send_line(message))
    assert sender.sync() == []
    expect_exactly(other, b"RECEIVE sender " + message + b"\n")


# --- Anything else -----------------------------------------------------------


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
        b"\xfe\xfd\xfc",
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
    """Anything else: Unrecognised command (send hi, SENDhi, random bytes...)."""
    bystander = server.member("bystander")
    client = server.client()
    client.send(line + b"\n")
    assert client.sync_unrecognised() == [UNRECOGNISED]
    # Nothing was set or relayed by it.
    client.send(b"SEND hi\n")
    assert client.sync() == [NAME_REQUIRED]
    # The same from a connection with a name.
    client.register("named")
    client.send(line + b"\n")
    assert client.sync_unrecognised() == [UNRECOGNISED]
    assert bystander.sync() == []


# ============================================================================
# Delivery guarantees
# ============================================================================


def test_sender_never_receives_its_own_messages(server: RunningServer) -> None:
    """The sender never receives its own message."""
    alice = server.member("alice")
    bob = server.member("bob")
    alice.send(b"".join(send_line(f"m{i}") for i in range(50)))
    assert alice.sync() == []
    assert bob.sync() == [receive("alice", f"m{i}") for i in range(50)]


def test_connections_without_a_name_receive_nothing(server: RunningServer) -> None:
    """Connections without a username receive no RECEIVE lines."""
    alice = server.member("alice")
    bob = server.member("bob")
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
    """All recipients see one global order; each connection's lines in its order."""
    sender_count, listener_count, per_sender = 6, 10, 150
    senders = [server.member(f"s{i}") for i in range(sender_count)]
    listeners = [server.member(f"l{i}") for i in range(listener_count)]
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


def test_thousand_registered_clients_all_receive_a_broadcast() -> None:
    """A message accepted while a recipient is connected reaches it: 1,000 members."""
    count = 1000
    raise_fd_limit(count + 200)  # the sockets here; the server inherits it too
    with launch() as server:
        clients = [server.client() for _ in range(count)]
        # Pipelined: every client's name and sync are sent before any reply
        # is read.
        for index, client in enumerate(clients):
            client.send(f"USERNAME user{index}\n".encode() + SYNC)
        for client in clients:
            assert client.until(SYNC_REPLY) == []
        clients[0].send(b"SEND hello, everyone\n")
        assert clients[0].sync() == []
        for client in clients[1:]:
            assert client.line() == b"RECEIVE user0 hello, everyone"
        for client in clients:
            client.send(SYNC)
        for client in clients:
            assert client.until(SYNC_REPLY) == []
        server.finish()


# ============================================================================
# Limits and failures
# ============================================================================


# --- Slow consumers ----------------------------------------------------------


def test_slow_consumer_is_disconnected_others_unaffected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Slow consumers: past the output limit, closed, name freed, logged."""
    caplog.set_level(logging.INFO, logger="chat")
    running = start_server(output_limit=64 * 1024)
    try:
        slow = running.small_window_client()
        slow.register("slow")  # and from now on it never reads
        sender = running.member("sender")
        fast = running.member("fast")
        claimant = running.client()
        sent = send_until_closed(sender, fast, claimant, "slow")
        # The server closed it: its stream ends, and holds a prefix of what
        # was sent, in order.
        stream = b"".join(b"RECEIVE sender " + message + b"\n" for message in sent)
        assert_cut_short(slow.read_to_eof(), stream)
        log = "\n".join(record.getMessage() for record in caplog.records)
        assert_closed_as_slow_consumers(log, [slow], 64 * 1024)
        assert running.server.stats.disconnections["slow_consumer"] == 1
    finally:
        running.stop()


def assert_closed_as_slow_consumers(log: str, clients: list[Client], limit: int) -> None:
    """`log` says that each of `clients` passed the output limit `limit` and
    was closed for it: the slow-consumer lines, not the output budget's
    ("slow consumer: over the total output budget"). A connection is logged
    as <fd N PEER 'name'>; its peer is the client's own address."""
    for client in clients:
        host, port = client.sock.getsockname()[:2]
        who = re.escape(f" {host}:{port}") + r"(?: '[^']*')?>"
        unsent = rf"{who} is a slow consumer: \d+ bytes unsent \(limit {limit}\); closing it$"
        assert re.search(unsent, log, re.MULTILINE), f"no output-limit line for port {port}"
        closed = rf"{who} disconnected: slow consumer$"
        assert re.search(closed, log, re.MULTILINE), f"no slow-consumer close for port {port}"
    assert "output budget" not in log


def timed_sync(client: Client) -> tuple[list[bytes], float]:
    start = time.monotonic()
    lines = client.sync()
    return lines, time.monotonic() - start


def test_slow_consumer_is_dropped_without_slowing_the_others() -> None:
    """Slow consumers: at the default 1 MiB, closed without slowing anybody else."""
    with launch() as server:  # the default output limit, 1 MiB
        slow = server.small_window_client()
        slow.register("slow")
        alice = server.client()
        alice.register("alice")
        bob = server.client()
        bob.register("bob")
        prober = server.client()

        filler = b"x" * 4000
        stream: list[bytes] = []  # every RECEIVE line the slow client was owed
        sync_times: list[float] = []
        # The kernel holds a few MB for a client that does not read (the
        # server's send buffer grows to ~2.8 MB on loopback) before the
        # server's own 1 MiB limit even starts to fill: 256 KiB a round, up
        # to 64 rounds.
        for turn in range(64):
            messages = [f"{turn}-{index} ".encode() + filler for index in range(64)]
            alice.send(sends(messages))
            lines, elapsed = timed_sync(alice)
            assert lines == []
            sync_times.append(elapsed)
            lines, elapsed = timed_sync(bob)
            assert lines == receives("alice", messages)
            sync_times.append(elapsed)
            stream += lines
            prober.send(b"USERNAME slow\n")
            reply = prober.sync()
            if reply == []:
                break  # the prober holds the slow client's name now
            assert reply == [NAME_TAKEN]
        else:
            pytest.fail("the slow client was never disconnected")
        assert max(sync_times) < 2.0, f"slowest sync {max(sync_times):.2f}s"

        # The prober took the name, so it is a member and gets messages.
        alice.send(b"SEND after\n")
        assert alice.sync() == []
        assert bob.sync() == [b"RECEIVE alice after"]
        assert prober.sync() == [b"RECEIVE alice after"]

        # What the slow client gets before the end is a prefix of what it
        # was owed, cut where the server gave up on it.
        owed = b"".join(line + b"\n" for line in stream)
        assert_cut_short(slow.read_to_eof(), owed)

        assert_closed_as_slow_consumers(server.finish(), [slow], 1024 * 1024)


def test_many_slow_consumers_and_several_senders_keep_one_order() -> None:
    """Slow consumers: ten dropped while four senders keep one global order for the rest."""
    output_limit = 256 * 1024
    with launch("--output-limit", str(output_limit)) as server:
        slow = [server.small_window_client() for _ in range(10)]
        for index, client in enumerate(slow):
            client.register(f"slow{index}")
        healthy = [server.client() for _ in range(40)]
        for index, client in enumerate(healthy):
            client.register(f"h{index}")
        senders = 4
        filler = b"y" * 2000
        per_burst = 32
        seen: list[list[bytes]] = [[] for _ in healthy]

        def burst(sender: int, turn: int) -> None:
            messages = [f"{sender}-{turn}-{index} ".encode() + filler for index in range(per_burst)]
            healthy[sender].send(sends(messages))
            seen[sender] += healthy[sender].sync()

        # Rounds of 256 KiB, from all senders at once. A healthy client's
        # kernel buffers take a whole round, so reading once a round keeps
        # it far from the limit; a slow one passes ~2.8 MB of kernel buffer
        # plus the limit after a dozen rounds. The rounds go on until a
        # prober can take every slow client's name: a free name it takes,
        # one it already holds (it renames itself through the free ones) is
        # no error either. It is a member once it holds one, so its sync
        # returns RECEIVE lines too.
        prober = server.client()
        probe = b"".join(f"USERNAME slow{index}\n".encode() for index in range(len(slow)))
        rounds = 0
        with ThreadPoolExecutor(senders) as pool:
            while True:
                assert rounds < 40, "the slow clients were never all disconnected"
                futures = [pool.submit(burst, sender, rounds) for sender in range(senders)]
                for future in futures:
                    future.result(timeout=30)
                for index in range(senders, len(healthy)):
                    seen[index] += healthy[index].sync()
                rounds += 1
                prober.send(probe)
                refused = [line for line in prober.sync() if line.startswith(b"ERROR")]
                if not refused:
                    break
                assert set(refused) == {NAME_TAKEN}
        for index, client in enumerate(healthy):
            seen[index] += client.sync()

        order = seen[senders]  # a member that sent nothing saw everything
        assert len(order) == rounds * senders * per_burst
        for index in range(senders, len(healthy)):
            assert seen[index] == order, f"h{index} saw another order"
        for sender in range(senders):
            own = f"RECEIVE h{sender} ".encode()
            assert seen[sender] == [line for line in order if not line.startswith(own)]
            # ...and each sender's messages kept the order it sent them in.
            assert [line for line in order if line.startswith(own)] == [
                own + f"{sender}-{turn}-{index} ".encode() + filler
                for turn in range(rounds)
                for index in range(per_burst)
            ]

        owed = b"".join(line + b"\n" for line in order)
        for client in slow:
            assert_cut_short(client.read_to_eof(), owed)
        assert_closed_as_slow_consumers(server.finish(), slow, output_limit)


# --- Fairness ----------------------------------------------------------------


def test_a_turn_processes_a_bounded_share_of_each_connections_lines() -> None:
    """Fairness: the server processes a bounded number of each connection's
    lines per loop turn (LINES_PER_TURN), the rest in later turns, in order."""
    clock = FakeClock()
    with (
        in_process(clock=clock) as server,
        socket.create_connection(server.address, timeout=TIMEOUT) as flooder,
        socket.create_connection(server.address, timeout=TIMEOUT) as watcher,
    ):
        watcher.sendall(username("watcher"))
        flooder.sendall(username("flooder"))
        for _ in range(3):
            server.run_once(max_wait=0.1)
        total = 3 * chat.LINES_PER_TURN + 7
        flooder.sendall(b"".join(send_line(f"m{i}") for i in range(total)))
        received = b""

        def one_turn_delivers(expected: int) -> None:
            """One turn, then exactly `expected` lines in all so far."""
            nonlocal received
            server.run_once(max_wait=TIMEOUT)
            while received.count(b"\n") < expected:
                received += watcher.recv(1 << 20)
            # Nothing more: the server has not run since.
            watcher.setblocking(False)
            with pytest.raises(BlockingIOError):
                received += watcher.recv(1 << 20)
            watcher.settimeout(TIMEOUT)
            assert received.count(b"\n") == expected

        # The first turn reads the whole burst (one recv) but processes
        # only its share; each later turn one more share.
        for turn in (1, 2, 3):
            one_turn_delivers(turn * chat.LINES_PER_TURN)
        server.run_once(max_wait=TIMEOUT)
        watcher.settimeout(TIMEOUT)
        while received.count(b"\n") < total:
            received += watcher.recv(1 << 20)
        assert received.split(b"\n")[:-1] == [receive("flooder", f"m{i}") for i in range(total)]


class Reader(threading.Thread):
    """Reads one connection until `stop`, handing `on_match` the first group
    of every line that matches `pattern` and discarding the rest (all of it
    when `pattern` is None)."""

    def __init__(
        self,
        client: Client,
        pattern: bytes | None,
        on_match: Callable[[bytes], None],
        stop: threading.Event,
    ) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.pattern = None if pattern is None else re.compile(pattern, re.MULTILINE)
        self.on_match = on_match
        self.stop = stop
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            # Short, so the thread sees `stop` soon; sends on this socket
            # are small and are not affected in practice.
            self.client.sock.settimeout(0.2)
            tail = b""
            while not self.stop.is_set():
                try:
                    chunk = self.client.sock.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    raise EOFError("the server closed the connection")
                if self.pattern is None:
                    continue
                data = tail + chunk
                end = data.rfind(b"\n") + 1
                tail = data[end:]
                for match in self.pattern.finditer(data, 0, end):
                    self.on_match(match.group(1))
        except BaseException as error:
            self.error = error


class Flooder(threading.Thread):
    """Sends `block` again and again until `stop` or `limit` seconds."""

    def __init__(self, client: Client, block: bytes, stop: threading.Event, limit: float) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.block = block
        self.stop = stop
        self.deadline = time.monotonic() + limit
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                self.client.sock.sendall(self.block)
                self.sent += len(self.block)
        except BaseException as error:
            self.error = error


@pytest.mark.parametrize("flood", ["unknown-commands", "valid-sends"])
def test_flooder_does_not_starve_a_conversation(flood: str) -> None:
    """Fairness: one client flooding the server cannot starve the others."""
    # Alice and Bob read the flood in Python threads, which share a core
    # with the flooder: a loaded machine can leave them a moment behind. The
    # kernel's send buffer is fixed at 256 KiB (Real networks), so the
    # server holds the rest; a larger output limit keeps a momentary lag
    # from counting as a slow consumer, which other tests cover.
    with launch("--output-limit", str(8 << 20)) as server:
        alice = server.client()
        alice.register("alice")
        bob = server.client()
        bob.register("bob")
        flooder = server.client()
        if flood == "valid-sends":
            # Alice and Bob get the whole flood and must read it all.
            flooder.register("flooder")
            line = b"SEND " + b"f" * 100 + b"\n"
        else:
            # Only the flooder gets answers: one error a line.
            line = b"FLOOD " + b"f" * 100 + b"\n"

        stop = threading.Event()
        pongs: list[int] = []
        pong_arrived = threading.Condition()

        def on_ping(number: bytes) -> None:
            bob.send(b"SEND pong " + number + b"\n")

        def on_pong(number: bytes) -> None:
            with pong_arrived:
                pongs.append(int(number))
                pong_arrived.notify()

        threads: list[Reader | Flooder] = [
            Reader(alice, rb"^RECEIVE bob pong (\d+)$", on_pong, stop),
            Reader(bob, rb"^RECEIVE alice ping (\d+)$", on_ping, stop),
            Reader(flooder, None, lambda _: None, stop),
        ]
        flood_thread = Flooder(flooder, line * 2048, stop, limit=20)
        threads.append(flood_thread)
        try:
            for thread in threads:
                thread.start()
            poll("the flood to start", lambda: flood_thread.sent >= 1 << 20)
            flooded_before = flood_thread.sent
            round_trips: list[float] = []
            for number in range(20):
                start = time.monotonic()
                alice.send(f"SEND ping {number}\n".encode())
                with pong_arrived:
                    arrived = pong_arrived.wait_for(
                        partial(operator.contains, pongs, number), TIMEOUT
                    )
                assert arrived, f"no pong {number}; errors: {[t.error for t in threads]}"
                round_trips.append(time.monotonic() - start)
                time.sleep(0.05)  # a conversation, not a benchmark
            flooded = flood_thread.sent - flooded_before
        finally:
            stop.set()
            for thread in threads:
                thread.join(TIMEOUT)
        assert [thread.error for thread in threads] == [None] * len(threads)
        assert pongs == list(range(20))
        # The flood really ran alongside the whole conversation.
        assert flooded >= 1 << 20, f"only {flooded} bytes flooded"
        assert max(round_trips) < 1.5, f"round trips {sorted(round_trips)[-3:]}"
        server.finish()


# --- Too many connections; running out of file descriptors -------------------


def test_server_full() -> None:
    """Too many connections: Server is full. and closed; a freed place is reused."""
    running = start_server(max_clients=2)
    try:
        first = running.member("first")
        second = running.member("second")
        third = running.client()
        # Exactly this, then the end of the stream.
        assert third.read_to_eof() == SERVER_FULL + b"\n"
        # The refused connection took no place and disturbed nobody.
        first.send(b"SEND hi\n")
        assert first.sync() == []
        assert second.sync() == [receive("first", "hi")]
        # Once `first` is gone (its EOF proves the server closed it), a new
        # connection gets its place.
        assert first.half_close() == b""
        fourth = running.member("fourth")
        fourth.send(b"SEND welcome\n")
        assert fourth.sync() == []
        assert second.sync() == [receive("fourth", "welcome")]
        assert running.client().read_to_eof() == SERVER_FULL + b"\n"
    finally:
        running.stop()


# Low enough that 100 extra connections exhaust it, high enough for Python.
FD_LIMIT = 64


def limit_fds() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, hard))


def test_fd_exhaustion_does_not_spin_and_service_continues() -> None:
    """Running out of file descriptors never makes the server spin or crash."""
    with launch(preexec=limit_fds) as server:
        alice = server.client()
        alice.register("alice")
        bob = server.client()
        bob.register("bob")
        extra: list[socket.socket] = []
        try:
            # The kernel completes these handshakes whether or not the server
            # can accept them; the ones past its limit wait in the backlog.
            for _ in range(100):
                extra.append(socket.create_connection(server.address, timeout=TIMEOUT))
            poll("the server to run out", lambda: "Too many open files" in server.log.text())

            for turn in range(3):
                alice.send(f"SEND while out of descriptors {turn}\n".encode())
                assert alice.sync() == []
                assert bob.sync() == [f"RECEIVE alice while out of descriptors {turn}".encode()]
                bob.send(f"SEND still here {turn}\n".encode())
                assert bob.sync() == []
                assert alice.sync() == [f"RECEIVE bob still here {turn}".encode()]

            # The listener stays readable while the backlog is not empty: a
            # server that retried accept() at once would burn a whole core.
            cpu_before = server.cpu_seconds()
            wall_before = time.monotonic()
            time.sleep(1.0)  # the quiet second being measured, not a wait
            cpu = server.cpu_seconds() - cpu_before
            wall = time.monotonic() - wall_before
            assert cpu < 0.2, f"the server used {cpu:.2f}s of CPU in {wall:.2f}s while idle"
        finally:
            for sock in extra:
                sock.close()

        # The server must notice the closes, free the descriptors and accept
        # again by itself.
        deadline = time.monotonic() + 10
        while True:
            carol = server.client()
            try:
                carol.register("carol")
                break
            except (OSError, EOFError):
                carol.close()
                if time.monotonic() > deadline:
                    raise
        carol.send(b"SEND back to normal\n")
        assert carol.sync() == []
        assert alice.sync() == [b"RECEIVE carol back to normal"]
        assert bob.sync() == [b"RECEIVE carol back to normal"]
        alice.send(b"SEND welcome\n")
        assert alice.sync() == []
        assert carol.sync() == [b"RECEIVE alice welcome"]
        assert bob.sync() == [b"RECEIVE alice welcome"]

        log = server.finish()
        assert "cannot accept connections: Too many open files" in log


class FailingListener:
    """The listening socket, whose accept() fails with EMFILE while `failing`."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.failing = True
        self.accepts = 0

    def fileno(self) -> int:
        return self.real.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        self.accepts += 1
        if self.failing:
            raise OSError(errno.EMFILE, "Too many open files")
        return self.real.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_accept_pauses_for_exactly_accept_pause_after_emfile() -> None:
    """Limits and failures: running out of descriptors pauses accepting for
    ACCEPT_PAUSE on the reactor's clock (no spin), then resumes."""
    clock = FakeClock()
    with in_process(clock=clock) as server:
        listener = FailingListener(server.view.listeners[0].sock)
        server.view.listeners[0].sock = listener  # type: ignore[assignment]
        with socket.create_connection(server.address, timeout=TIMEOUT) as client:
            server.run_once(max_wait=TIMEOUT)  # readable listener: EMFILE
            assert listener.accepts == 1
            # The loop would sleep until the pause ends, not spin.
            assert server.view.select_timeout() == pytest.approx(chat.ACCEPT_PAUSE)
            for _ in range(5):
                server.run_once(max_wait=0)
            assert listener.accepts == 1  # not watched meanwhile
            clock.advance(chat.ACCEPT_PAUSE / 2)
            server.run_once(max_wait=0)
            assert listener.accepts == 1
            listener.failing = False
            clock.advance(chat.ACCEPT_PAUSE / 2 + 1e-6)
            server.run_once(max_wait=0)  # the timer re-arms the listener
            server.run_once(max_wait=TIMEOUT)  # and the client is accepted
            assert listener.accepts >= 2
            client.sendall(b"PING\n")
            for _ in range(10):
                server.run_once(max_wait=0.1)
            assert client.recv(100) == b"ERROR Unrecognised command.\n"


# --- End of input from a client ----------------------------------------------


def test_half_close_processes_everything_then_closes(server: RunningServer) -> None:
    """End of input: lines processed, a final line without \\n too, then closed, name freed."""
    alice = server.member("alice")
    bob = server.member("bob")
    # A final line without "\n" is a line too.
    alice.send(b"SEND one\nNOPE\nSEND \x1b[2J\nSEND bye")
    # The replies come before the end of the stream, and nothing else.
    assert alice.half_close() == UNRECOGNISED + b"\n" + MESSAGE_INVALID + b"\n"
    assert bob.sync() == [receive("alice", "one"), receive("alice", "bye")]
    # The server frees the name before it closes, and the EOF has arrived.
    server.member("alice")


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
    """End of input: the final line without \\n is processed as a line."""
    client = server.client()
    client.send(data)
    assert client.half_close() == reply


def test_half_close_with_many_replies_pending(server: RunningServer) -> None:
    # Best effort, but a client that keeps reading loses nothing.
    """End of input: pending output to that client is sent before the close."""
    client = server.client()
    client.send(SYNC * 5000)
    assert client.half_close() == (SYNC_REPLY + b"\n") * 5000


# --- A reset or broken connection --------------------------------------------


def test_reset_client_does_not_disturb_others_and_frees_its_name(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A reset connection drops that client only, silently (logged); its name is freed."""
    caplog.set_level(logging.INFO, logger="chat")
    alice = server.member("alice")
    bob = server.member("bob")
    doomed = server.member("doomed")
    # Unread input on the doomed side when it resets.
    alice.send(b"SEND unread\n")
    assert alice.sync() == []
    doomed.reset()
    alice.send(b"SEND after the reset\n")
    assert alice.sync() == []
    assert bob.sync() == [receive("alice", "unread"), receive("alice", "after the reset")]
    take_name_within(server.client(), "doomed", TIMEOUT)
    assert any("disconnected" in record.getMessage() for record in caplog.records)


def test_resets_in_the_middle_of_a_broadcast_spare_the_others() -> None:
    # A limit no survivor can reach: they are read only after the burst.
    """Resets in the middle of a broadcast drop those clients only."""
    with launch("--output-limit", str(16 << 20)) as server:
        sender = server.client()
        sender.register("sender")
        members = [server.client() for _ in range(60)]
        for index, client in enumerate(members):
            client.register(f"m{index}")
        victims = members[::3]
        survivors = [client for client in members if client not in victims]
        messages = [f"{index} ".encode() + b"w" * 200 for index in range(4000)]
        chunk = len(messages) // len(victims)
        # Each victim resets, with output unread, while the server is still
        # working through the burst and sending to it.
        for number, victim in enumerate(victims):
            sender.send(sends(messages[number * chunk : (number + 1) * chunk]))
            victim.reset()
        assert sender.sync() == []
        expected = receives("sender", messages)
        for client in survivors:
            assert client.sync() == expected
        # Still serving: a newcomer takes a victim's name and talks.
        newcomer = server.client()
        newcomer.register("m0")
        newcomer.send(b"SEND still up\n")
        assert newcomer.sync() == []
        assert sender.sync() == [b"RECEIVE m0 still up"]
        for client in survivors:
            assert client.sync() == [b"RECEIVE m0 still up"]
        server.finish()


def test_connect_reset_cycles_leak_no_descriptors() -> None:
    """Resets and closes, hundreds of them, drop those clients only and leak nothing."""
    with launch() as server:
        watcher = server.client()
        watcher.register("watcher")
        baseline = server.fd_count()
        names: list[str] = []

        def cycle(index: int, kind: str) -> None:
            client = Client(server.address)
            try:
                if kind.startswith("register"):
                    names.append(f"cycle{index}")
                    client.send(f"USERNAME cycle{index}\n".encode())
                    # A member now: earlier cycles' messages may reach it.
                    assert all(line.startswith(b"RECEIVE cycle") for line in client.sync())
                elif kind.startswith("pipeline"):
                    # A name, a message to the watcher and an unterminated
                    # line, likely still unprocessed when the connection goes.
                    names.append(f"cycle{index}")
                    lines = f"USERNAME cycle{index}\nSEND bye {index}\n".encode()
                    # A reply left unread would turn close() into an RST, so
                    # only the reset variant asks for one.
                    if kind.endswith("reset"):
                        lines += SYNC
                    client.send(lines + b"SEND par")
                if kind.endswith("reset"):
                    client.reset()
            finally:
                client.close()

        kinds = ["reset", "register-reset", "pipeline-reset", "pipeline-close", "close"]
        cycles = 335  # 201 resets, 134 closes
        for index in range(cycles):
            cycle(index, kinds[index % len(kinds)])

        received: list[bytes] = []

        def settled() -> bool:
            received.extend(watcher.sync())
            return server.fd_count() == baseline

        poll(f"the server to get back to {baseline} descriptors", settled, 10)
        received.extend(watcher.sync())  # what came with the last close
        # A closed connection's final line without "\n" is still a line; a
        # reset one's lines may or may not have been read before the RST,
        # but its unterminated line never is one.
        for index, kind in enumerate(kinds[i % len(kinds)] for i in range(cycles)):
            bye = f"RECEIVE cycle{index} bye {index}".encode()
            final = f"RECEIVE cycle{index} par".encode()
            if kind == "pipeline-close":
                assert received.count(bye) == received.count(final) == 1
                assert received.index(bye) < received.index(final)
            else:
                assert final not in received
        assert all(re.fullmatch(rb"RECEIVE cycle\d+ (bye \d+|par)", line) for line in received)

        # Every name used is free again: taking each in turn renames one
        # connection through all of them.
        checker = server.client()
        checker.send(b"".join(f"USERNAME {name}\n".encode() for name in names))
        assert checker.sync() == []
        server.finish()


# --- No input can crash the server -------------------------------------------
# See "Model-based and fuzz tests" at the end of this file.


# ============================================================================
# Real networks
# ============================================================================
# In test_real_networks.py: dead peers (network namespaces), unregistered
# connections, per address, total memory, stalled output.


# ============================================================================
# TLS; Monitoring
# ============================================================================
# In test_tls.py (the transport against fakes, then the TLS port) and
# test_metrics.py (the text and the HTTP answers, then the metrics port).


# ============================================================================
# The program
# ============================================================================


# --- Usage, --help, --log-level ----------------------------------------------


def test_help_explains_every_option() -> None:
    """`python chat.py --help` explains each option."""
    result = run_chat("--help")
    assert result.returncode == 0
    text = result.stdout.decode()
    for option in ("PORT", "--host", "--max-clients", "--log-level", "--output-limit"):
        assert option in text
    assert result.stderr == b""


@pytest.mark.parametrize("level", ["debug", "Info", "DEBUG"])
def test_log_level_in_any_case(level: str) -> None:
    """LEVEL is DEBUG, INFO (the default), WARNING or ERROR, in any case."""
    with launch("--log-level", level) as running:
        running.member("alice")
        running.process.terminate()
        text = running.stderr_text()
        assert running.process.returncode == 0
        assert "listening on" in text
        assert "Traceback" not in text


@pytest.mark.parametrize("level", ["WARNING", "error"])
def test_log_level_above_info_hides_connections(level: str) -> None:
    """A LEVEL above INFO hides the connection and name logs."""
    with launch("--log-level", level) as running:
        alice = running.member("alice")
        running.member("bob")
        alice.send(b"SEND hi\n")
        assert alice.sync() == []
        assert alice.half_close() == b""
        running.process.terminate()
        text = running.stderr_text()
        assert running.process.returncode == 0
        assert "INFO" not in text
        assert "connected" not in text
        assert "alice" not in text


def test_cluster_options_without_redis_are_ignored_with_a_warning() -> None:
    """Without --redis nothing changes: cluster options are ignored, with a warning."""
    with launch("--room", "elsewhere") as running:
        running.member("alice").close()
        running.process.send_signal(signal.SIGTERM)
        text = running.stderr_text()
    assert "--room only matters with --redis" in text
    assert "--lease-ms" not in text
    assert running.process.returncode == 0


# --- One thread, one selectors loop (ChatServer, embedded) -------------------


def test_closing_a_server_twice_is_harmless() -> None:
    """ChatServer.close is idempotent: an embedding program may call it again."""
    # close() runs when serve_forever ends, and an embedding program may
    # call it again.
    server = chat.ChatServer("127.0.0.1", 0)
    port = server.address[1]
    server.close()
    server.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def test_a_wake_up_is_drained_so_the_loop_waits_again() -> None:
    """One loop: after a wake-up (what stop and SIGHUP do) select has nothing ready, so it waits."""
    with in_process() as server:
        server.reload_tls()  # without TLS: logged and ignored, but it wakes the loop
        server.run_once(max_wait=TIMEOUT)
        assert server.view.ready_now() == []  # the wake-up socket would spin it


# --- Timers: one heap, one clock (a fake one here) ---------------------------


def test_timers_run_in_deadline_order_once_due() -> None:
    """Timers: callbacks run once their deadline is reached, earliest first,
    equal deadlines in the order they were set."""
    clock = FakeClock()
    timers = chat.Timers(clock)
    ran: list[str] = []
    timers.call_at(clock.now + 2, lambda: ran.append("b"))
    timers.call_at(clock.now + 1, lambda: ran.append("a1"))
    timers.call_at(clock.now + 1, lambda: ran.append("a2"))
    assert timers.next_due() == clock.now + 1
    timers.run_due()
    assert ran == []
    clock.advance(1)
    timers.run_due()
    assert ran == ["a1", "a2"]
    assert timers.next_due() == clock.now + 1
    clock.advance(5)
    timers.run_due()
    assert ran == ["a1", "a2", "b"]
    assert timers.next_due() is None


def test_a_cancelled_timer_never_runs() -> None:
    """Timers: cancel() before the deadline keeps the callback from running
    and the deadline from waking the loop."""
    clock = FakeClock()
    timers = chat.Timers(clock)
    ran: list[int] = []
    first = timers.call_at(clock.now + 1, lambda: ran.append(1))
    timers.call_at(clock.now + 2, lambda: ran.append(2))
    first.cancel()
    assert timers.next_due() == clock.now + 2
    clock.advance(3)
    timers.run_due()
    assert ran == [2]


def test_a_timer_set_by_a_callback_for_now_runs_next_turn() -> None:
    """Timers: a callback that sets a timer already due does not make one
    run_due loop for ever."""
    clock = FakeClock()
    timers = chat.Timers(clock)
    ran: list[int] = []

    def again() -> None:
        ran.append(len(ran))
        timers.call_at(clock.now, again)

    timers.call_at(clock.now, again)
    timers.run_due()
    timers.run_due()
    assert ran == [0, 1]


def test_many_cancelled_timers_do_not_pile_up() -> None:
    """Timers: cancelled ones are dropped once they are most of the heap, so
    a timer per connection costs nothing after it is cancelled."""
    clock = FakeClock()
    timers = chat.Timers(clock)
    for _ in range(10):
        for timer in [timers.call_at(clock.now + 60, lambda: None) for _ in range(1000)]:
            timer.cancel()
    assert len(timers._heap) < 200
    assert timers.next_due() is None


# --- Logs go to stderr; message text is never logged -------------------------


def test_log_name_starts_every_line() -> None:
    """Logs: --log-name NAME tells servers apart; without it, lines are as before."""
    with launch("--log-name", "east") as named, launch() as plain:
        named.member("alice").close()
        plain.member("bob").close()
        named_text, plain_text = named.finish(), plain.finish()
    lines = [line for line in named_text.splitlines() if line]
    assert lines and all(" [east] " in line for line in lines)
    assert re.search(r"^\S+ \S+ INFO listening on 127\.0\.0\.1:\d+$", plain_text, re.MULTILINE)


def test_a_bad_redis_port_is_one_plain_line() -> None:
    """A bad option: one clear line in our words (not Python's parser's), exit 2."""
    result = run_chat("0", "--redis", "redis://127.0.0.1:99999/0")
    assert result.returncode == 2
    assert_one_clear_line(result.stderr, "port")
    assert b"out of range" not in result.stderr


@pytest.mark.parametrize("args", [[], ["--log-level", "debug"]], ids=["default", "debug"])
def test_logs_show_events_but_never_message_text(args: list[str]) -> None:
    """Logs: connections, disconnections and name changes at INFO; never message text."""
    with launch(*args) as running:
        marker = f"marker-{os.getpid()}-{time.monotonic_ns()}"
        alice = running.member("alice")
        bob = running.member("bob")
        alice_port = alice.sock.getsockname()[1]
        # Relayed, refused for a control character, refused as invalid UTF-8.
        alice.send(
            send_line(marker) + send_line("\x1b" + marker) + send_line(marker.encode() + b"\xfe")
        )
        assert alice.sync() == [MESSAGE_INVALID, MESSAGE_INVALID]
        assert bob.sync() == [receive("alice", marker)]
        alice.send(username("carol"))
        assert alice.sync() == []
        assert alice.half_close() == b""  # the server has logged the disconnection
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


# --- Ctrl-C or SIGTERM -------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_stops_the_server_within_a_second(signum: signal.Signals) -> None:
    """Ctrl-C or SIGTERM: closes every connection, exits 0 within a second."""
    with launch() as running:
        alice = running.member("alice")
        bob = running.member("bob")
        alice.send(b"SEND hi\n")
        assert alice.sync() == []
        unnamed = running.client()
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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_at_once_with_output_queued(signum: signal.Signals) -> None:
    # 8 MiB so that the non-readers, owed 5 MB each, stay connected with
    # output queued in the server (the kernel takes ~2.8 MB of it).
    """Ctrl-C or SIGTERM with output queued: exits 0 within a second, port free."""
    with launch("--output-limit", str(8 << 20)) as server:
        stuck = [server.small_window_client() for _ in range(5)]
        for index, client in enumerate(stuck):
            client.register(f"stuck{index}")
        sender = server.client()
        sender.register("sender")
        idle = [server.client() for _ in range(44)]  # 50 connections in all
        messages = [f"{index} ".encode() + b"z" * 4000 for index in range(1250)]
        sender.send(sends(messages))
        assert sender.sync() == []
        for client in idle:
            assert client.sync() == []

        start = time.monotonic()
        server.process.send_signal(signum)
        returncode = server.process.wait(TIMEOUT)
        elapsed = time.monotonic() - start
        assert returncode == 0
        assert elapsed < 1.0, f"exited {elapsed:.2f}s after the signal"

        # The port is free at once, with the old connections still draining:
        # bound as the server binds it (SO_REUSEADDR).
        with socket.socket() as again:
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(server.address)
            again.listen()

        owed = b"".join(line + b"\n" for line in receives("sender", messages))
        for client in stuck:
            assert owed.startswith(client.read_to_eof())
        for client in [sender, *idle]:
            assert client.read_to_eof() == b""

        server.log.join()
        log = server.log.text()
        assert "Traceback" not in log, log
        # They were still connected, output queued, when the signal came.
        assert "slow consumer" not in log


# --- A port already in use, a bad port number or a bad option ----------------


def assert_one_clear_line(stderr: bytes, *mentions: str) -> None:
    text = stderr.decode()
    assert "Traceback" not in text
    assert text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == 1, text
    for mention in mentions:
        assert mention in lines[0]


@pytest.mark.parametrize("default_host", [False, True], ids=["host", "all-interfaces"])
def test_port_already_in_use(default_host: bool) -> None:
    """A port already in use: one clear line on stderr and a non-zero exit code."""
    with socket.create_server(("127.0.0.1", 0)) as blocker:
        port = blocker.getsockname()[1]
        host_args = [] if default_host else ["--host", "127.0.0.1"]
        result = run_chat(str(port), *host_args)
    assert result.returncode != 0
    assert_one_clear_line(result.stderr, str(port), "Address already in use")
    assert b"while attempting" not in result.stderr  # Python's words, not ours


def test_host_that_cannot_be_bound() -> None:
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never an address of this machine.
    """A host that cannot be bound: one clear line on stderr and a non-zero exit code."""
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
    """A bad port number or a bad option: one clear line on stderr, non-zero exit."""
    result = run_chat(*args)
    assert result.returncode != 0
    assert_one_clear_line(result.stderr, mention)


# ============================================================================
# Cluster mode: in test_cluster.py
# ============================================================================


# ============================================================================
# Model-based and fuzz tests
# ============================================================================
# Model-based and byte-fuzz tests of the real server, over real sockets. The
# room model, its state machine (`ChatMachine`) and the strategies they draw
# from are in chat_testing.py, which says how they sync.


def test_state_machine_matches_the_room_model() -> None:
    """Every line each client receives is what the room model predicts, step by step."""
    run_state_machine_as_test(ChatMachine, settings=machine_settings())


# --- Byte-level fuzzing ------------------------------------------------------


FUZZ_ATOMS: Final = (
    b"\r",
    b"\n",
    b"\r\n",
    b"\n\r",
    b"\r\r\n",
    b"\x00",
    b" ",
    b"\t",
    b"SEND ",
    b"USERNAME ",
    b"SEND",
    b"USERNAME",
    b"PING",
    b"\xfe",
    b"\xc3",
    b"\xc3\xa9",
    b"\xed\xa0\x80",
    b"\xe2\x80\x8b",
    b"\xe3\x80\x80",
    b"\xc2\x85",
    b"\xc2\x9b",
    b"\x1b[2J",
    "🙂".encode(),
    b"alice",
    b"ALICE",
    "ａｌｉｃｅ".encode(),
    b"Bob",
    b"fuzz",
)


# Arguments that matter: the pair's names in other spellings, names with a
# space or too long, valid messages, and anything at all.
FUZZ_ARGUMENTS: Final = (
    b"alice",
    b"ALICE",
    "ａｌｉｃｅ".encode(),
    b"bob",
    b"fuzz",
    b"Fuzz2",
    b"x y",
    b" ",
    b"\t",
    b"\xc3",
    b"\x1b[2J",
    "🙂".encode() * 33,
)


fuzz_commands = st.builds(
    lambda start, verb, argument, end: start + verb + argument + end,
    st.sampled_from([b"\n", b"\n", b"\n", b""]),  # mostly on a line of its own
    st.sampled_from([b"SEND ", b"USERNAME ", b"SEND", b"USERNAME", b"send "]),
    st.one_of(
        st.sampled_from(FUZZ_ARGUMENTS),
        good_messages,
        st.binary(max_size=12).map(no_iac),
        st.text(max_size=8).map(str.encode),
    ),
    st.sampled_from([b"\n", b"\r\n", b"", b"\r"]),
)


# Well-formed lines, so that the fuzzer also renames, collides with the
# pair's names and really sends.
fuzz_good_lines = st.one_of(
    send_lines,
    st.sampled_from(["alice", "ALICE", "ａｌｉｃｅ", "bob", "fuzz", "Fuzz2", "ＦＵＺＺ"]).map(
        name_line
    ),
).map(lambda line: b"\n" + line + b"\n")


fuzz_pieces = st.one_of(
    st.sampled_from(FUZZ_ATOMS),
    st.binary(max_size=16).map(no_iac),
    st.text(max_size=8).map(str.encode),
    fuzz_commands,
    fuzz_good_lines,
)


# A line near or over the limit, starting on a fresh line so its length is
# exactly the one drawn, ended in every way (or not yet).
fuzz_long_lines = st.builds(
    lambda line, end: b"\n" + line + end,
    lines_near_limit(),
    st.sampled_from([b"\n", b"\r\n", b"\r", b"\r\r\n", b""]),
)


@st.composite
def fuzz_streams(draw: st.DrawFn) -> bytes:
    # Lengths drawn first and uniformly: left to itself, Hypothesis mostly
    # draws short lists, and the few long lines would be all there is.
    count = draw(st.integers(0, 80), label="pieces")
    pieces = draw(st.lists(fuzz_pieces, min_size=count, max_size=count))
    long_count = draw(st.integers(0, 2), label="long lines")
    for line in draw(st.lists(fuzz_long_lines, min_size=long_count, max_size=long_count)):
        pieces.insert(draw(st.integers(0, len(pieces))), line)
    return b"".join(pieces)


FUZZER, ALICE, BOB = 0, 1, 2


PAIR_NAMES: Final = {ALICE: "alice", BOB: "Bob"}


def is_receive_from(line: bytes, name: str) -> bool:
    return line.startswith(b"RECEIVE " + name.encode() + b" ")


def run_fuzz_round(running: RunningServer, stream: bytes, named: bool, data: st.DataObject) -> None:
    room = RoomModel()
    conns = {who: running.client() for who in (FUZZER, ALICE, BOB)}
    received: dict[int, list[bytes]] = {who: [] for who in conns}

    def sync_exactly(who: int, payload: bytes, want: list[bytes]) -> None:
        send_randomly_cut(data, conns[who], payload + SYNC)
        got = read_through_sync(conns[who], want)
        received[who] += got
        assert got == want, f"client {who}: got {got!r}, expected {want!r}"

    joins = list(PAIR_NAMES.items()) + ([(FUZZER, "fuzz")] if named else [])
    for who, name in joins:
        payload = username(name)
        assert room.feed_stream(who, payload, at_eof=False) == []
        sync_exactly(who, payload, [])

    # The fuzzer's lines are answered in order whatever the pair does, and
    # its RECEIVEs reach both members of the pair, whose names never change.
    # The "\n" ends a last unterminated line, so that the SYNC stays a line.
    outputs = room.feed_stream(FUZZER, stream + b"\n", at_eof=False)
    fuzz_replies = [line for who, line in outputs if who == FUZZER]
    fuzz_receives = {who: [line for to, line in outputs if to == who] for who in PAIR_NAMES}
    fuzzer_named = FUZZER in room.names  # once named, named for good
    # For --hypothesis-show-statistics: is the fuzz reaching every path?
    event("fuzzer named " + ("before" if named else "during" if fuzzer_named else "never"))
    event(f"fuzzer relayed {'some' if fuzz_receives[ALICE] else 'no'} messages")
    for reply in sorted(set(fuzz_replies)):
        event(f"fuzzer got {reply.decode()}")

    chatter = {who: data.draw(st.lists(good_messages, max_size=3)) for who in PAIR_NAMES}
    # The pair chats between the fuzzer's pieces: which turn of the server
    # handles which line is up to the scheduler, so the checks below only
    # rely on each connection's own order.
    # Each sender's messages go out in order: its positions are sorted.
    schedule: list[tuple[int, int, int, bytes]] = []
    for who, messages in chatter.items():
        positions = sorted(data.draw(st.integers(0, len(stream))) for _ in messages)
        schedule += [
            (at, who, index, m)
            for index, (at, m) in enumerate(zip(positions, messages, strict=True))
        ]
    schedule.sort()
    cuts = data.draw(cut_points(len(stream)), label="fuzz cuts")
    position = 0
    for end in [*cuts, len(stream)]:
        conns[FUZZER].send(stream[position:end])
        position = end
        while schedule and schedule[0][0] <= position:
            _, who, _, message = schedule.pop(0)
            send_randomly_cut(data, conns[who], b"SEND " + message + b"\n")
    conns[FUZZER].send(b"\n")

    # Round one proves each client's own lines processed; round two then
    # collects the RECEIVEs that round one may have overtaken.
    for round_ in range(2):
        for who, conn in conns.items():
            send_randomly_cut(data, conn, SYNC)
            due = fuzz_replies if who == FUZZER and round_ == 0 else []
            received[who] += read_through_sync(conn, due)

    for lines in received.values():
        for line in lines:
            assert_contract_line(line)

    got = received[FUZZER]
    assert [line for line in got if not line.startswith(b"RECEIVE ")] == fuzz_replies
    receives = [line for line in got if line.startswith(b"RECEIVE ")]
    for who, name in PAIR_NAMES.items():
        sent = [b"RECEIVE " + name.encode() + b" " + message for message in chatter[who]]
        from_them = [line for line in receives if is_receive_from(line, name)]
        if named:
            assert from_them == sent
        elif not fuzzer_named:
            assert from_them == []
        else:
            # It joined mid-stream: it gets what was accepted after that.
            assert from_them == sent[len(sent) - len(from_them) :]
    assert len(receives) == sum(
        is_receive_from(line, name) for line in receives for name in PAIR_NAMES.values()
    ), receives

    for who in PAIR_NAMES:
        other = BOB if who == ALICE else ALICE
        other_name = PAIR_NAMES[other]
        got = received[who]
        from_other = [line for line in got if is_receive_from(line, other_name)]
        assert from_other == [
            b"RECEIVE " + other_name.encode() + b" " + message for message in chatter[other]
        ]
        assert [line for line in got if not is_receive_from(line, other_name)] == (
            fuzz_receives[who]
        )

    # After the storm: exact delivery, and the fuzzer still answers.
    for who in conns:
        received[who] = []
    message = b"still here\t\xf0\x9f\x99\x82"
    relayed = b"RECEIVE alice " + message
    sync_exactly(ALICE, b"SEND " + message + b"\r\n", [])
    sync_exactly(BOB, b"", [relayed])
    sync_exactly(FUZZER, b"", [relayed] if fuzzer_named else [])
    for conn in conns.values():
        assert conn.buffer == b"", "bytes after the last line"
    assert running.thread.is_alive()
    with Client(running.address) as late:
        late.send(SYNC)
        assert read_through_sync(late, []) == []


@given(stream=fuzz_streams(), named=st.booleans(), data=st.data())
def test_fuzzer_beside_a_chatting_pair(stream: bytes, named: bool, data: st.DataObject) -> None:
    """No input can crash the server or make it send anything outside this protocol."""
    # Random bytes in random pieces from one client never crash the
    # server, never put anything outside the contract on any wire, are
    # answered exactly as the model predicts, and leave the others alone.
    running = start_server()
    try:
        run_fuzz_round(running, stream, named, data)
    finally:
        running.stop()


# ============================================================================
# This file's index
# ============================================================================


def test_the_index_names_every_test_of_this_file_and_nothing_else() -> None:
    """The index in this file's docstring lists every test here, and each
    name in it is a test here (or a test file that exists)."""
    assert __doc__ is not None
    indexed = set(re.findall(r"\b(test_\w+)\b(?!\.py)", __doc__))
    files = set(re.findall(r"\b(test_\w+\.py)\b", __doc__))
    here = {
        name for name, value in globals().items() if name.startswith("test_") and callable(value)
    }
    assert sorted(here - indexed) == [], "tests missing from the index"
    assert sorted(indexed - here) == [], "index entries that are no test of this file"
    assert sorted(file for file in files if not (HERE / file).is_file()) == []
