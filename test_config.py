"""Tests of PROTOCOL.md, "The program" (v3), for the operator: the settings
file (config.py, --config), SIGHUP re-reading it (ChatServer.apply_limits),
the port in use named, socket activation (activation.py, with Debian's
systemd-socket-activate), and the example file and systemd units in the
repository, checked against the parser so they cannot drift from it."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.sync.client import connect as websocket_connect

import activation
import chat
import config
from conftest import (
    HERE,
    SERVER_FULL,
    SYNC_REPLY,
    TIMED_OUT_WAITING,
    TIMEOUT,
    TOO_MANY_FROM_ADDRESS,
    Client,
    FakeClock,
    Pumped,
    ServerProcess,
    TLSClient,
    TLSFiles,
    free_port,
    launch,
    poll,
    run_chat,
)

EXAMPLE: Final = HERE / "chat.example.toml"
UNITS: Final = HERE / "systemd"


def table() -> dict[str, config.Setting]:
    return config.setting_table(chat.build_parser())


def one_line(stderr: bytes) -> str:
    """The only line of `stderr`, checked to be one clear line."""
    text = stderr.decode()
    assert "Traceback" not in text, text
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


# --- the settings file: one table, one set of rules ---------------------------------


def test_every_option_in_help_is_a_key_of_the_file() -> None:
    """--config: the file's keys are the options of --help, by the same names."""
    help_text = run_chat("--help").stdout.decode()
    usage = help_text.partition("\n\n")[0]  # every option, once: [--max-clients N]
    options = set(re.findall(r"\[--([a-z-]+)", usage))
    assert "max-clients" in options and "port" not in options
    assert set(table()) == (options - {"config"}) | {"port"}


def test_every_live_setting_the_parser_has_is_applied() -> None:
    """SIGHUP: each live setting the options have (send-rate, send-burst when added) is applied."""
    keywords = set(inspect.signature(chat.ChatServer.apply_limits).parameters) - {"self"}
    live = {table()[key].dest for key in config.LIVE_SETTINGS if key in table()}
    assert live - {"log_level"} == keywords  # log-level is the logging module's


def test_file_values_go_through_the_options_own_checks() -> None:
    """--config: each value is read as its option reads it (a level in any case, seconds)."""
    text = 'port = 0\nlog-level = "warning"\nredis-timeout = 3\nreuse-port = true\nhost = "::1"\n'
    assert config.parse_settings(text, "chat.toml", table()) == {
        "port": 0,
        "log_level": "WARNING",
        "redis_timeout": 3.0,
        "reuse_port": True,
        "host": "::1",
    }


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("port = 8080\nmax-clients = = 3\n", ["not valid TOML", "line 2"]),
        ("# a comment\n\nmax-client = 3\n", ["line 3", "'max-client'", "unknown"]),
        ("port = 70000\n", ["line 1", "port", "65535"]),
        ("\nmax-clients = 0\n", ["line 2", "max-clients", "at least 1"]),
        ("keepalive = 40000\n", ["line 1", "keepalive", "at most"]),
        ('max-clients = "100"\n', ["line 1", "max-clients", "whole number", "string"]),
        ("max-clients = 1.5\n", ["line 1", "max-clients", "whole number"]),
        ("max-clients = true\n", ["line 1", "max-clients", "whole number, not true or false"]),
        ("redis-timeout = false\n", ["line 1", "redis-timeout", "a number, not true or false"]),
        ("host = 8080\n", ["line 1", "host", "string", "8080"]),
        ("reuse-port = 1\n", ["line 1", "reuse-port", "true or false"]),
        ('log-level = "loud"\n', ["line 1", "log-level", "'loud'"]),
        ("redis-timeout = 0.01\n", ["line 1", "redis-timeout", "0.05"]),
        ("port = 1\n\n[tls]\nport = 2\n", ["line 3", "'tls'", "unknown"]),
        ("port = 1\n\n[max-clients]\nx = 2\n", ["line 3", "max-clients", "a table"]),
        ('port = 1\n"max-clients" = 0\n', ["line 2", "max-clients"]),
        ("port = 1\nconfig = 'other.toml'\n", ["line 2", "'config'", "unknown"]),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_a_bad_file_is_one_line_naming_the_file_the_key_and_its_line(
    text: str, mentions: list[str]
) -> None:
    """--config: not TOML, an unknown key, a wrong kind or out of range: the file, key and line."""
    found = config.parse_settings(text, "/etc/chat/chat.toml", table())
    assert isinstance(found, config.ConfigProblem), found
    assert found.message.startswith("/etc/chat/chat.toml")
    assert "\n" not in found.message
    for mention in mentions:
        assert mention in found.message


@given(st.text())
def test_reading_settings_never_raises(text: str) -> None:
    """--config: any text gives settings or one line, never an exception."""
    found = config.parse_settings(text, "f.toml", table())
    assert isinstance(found, dict) or "\n" not in found.message


_NUMBERS: Final = [key for key, setting in table().items() if setting.kind in (int, float)]


@given(st.sampled_from(_NUMBERS), st.integers(min_value=-(10**6), max_value=10**12))
def test_file_and_command_line_accept_the_same_numbers(key: str, number: int) -> None:
    """--config: a number is good in the file exactly when its option takes it, as is."""
    found = config.parse_settings(f"{key} = {number}\n", "f.toml", table())
    dest = table()[key].dest
    argv = [str(number)] if key == "port" else [f"--{key}={number}"]
    if key.startswith("tls-"):
        argv += ["--tls-cert=c", "--tls-key=k"] if key == "tls-port" else []
    try:
        from_command_line: object = chat.build_parser().parse_args(argv)
    except SystemExit:
        from_command_line = None
    if from_command_line is None:
        assert isinstance(found, config.ConfigProblem)
    else:
        assert found == {dest: getattr(from_command_line, dest)}


def test_an_unreadable_file_is_one_line_naming_it(tmp_path: Path) -> None:
    """--config: a missing file or one that is not UTF-8 is named, no traceback, exit 2."""
    missing = tmp_path / "missing.toml"
    result = run_chat("--config", str(missing))
    assert result.returncode == 2
    assert str(missing) in one_line(result.stderr)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'log-name = "caf\xe9"\n')
    result = run_chat("--config", str(latin))
    assert result.returncode == 2
    assert str(latin) in one_line(result.stderr)


def test_a_bad_file_exits_2_with_one_line(tmp_path: Path) -> None:
    """--config: the program prints the one line naming file, key and line, and exits 2."""
    path = tmp_path / "chat.toml"
    path.write_text("port = 0\nmax-per-address = -1\n")
    result = run_chat("--config", str(path))
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert f"{path}, line 2: max-per-address" in line


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_command_line_wins_over_the_file(tmp_path: Path) -> None:
    """--config: an option on the command line wins, even at its default; the rest from the file."""
    path = write(tmp_path / "chat.toml", "port = 1234\nmax-clients = 5\nkeepalive = 7\n")
    args = chat.parse_args(["--config", str(path), "--max-clients", "9"])
    assert (args.port, args.max_clients, args.keepalive) == (1234, 9, 7)
    assert args.output_limit == chat.DEFAULT_OUTPUT_LIMIT  # in neither
    args = chat.parse_args(["--config", str(path), "--max-clients", "10000", "99"])
    assert (args.port, args.max_clients) == (99, 10000)


@pytest.mark.parametrize(
    "text", ["tls-port = 8443\n", 'tls-cert = "c.pem"\ntls-key = "k.pem"\n', 'tls-key = "k"\n']
)
def test_tls_options_from_the_file_still_go_together(tmp_path: Path, text: str) -> None:
    """--config: the TLS options go together from the file too (no TLS socket passed)."""
    path = write(tmp_path / "chat.toml", text)
    result = run_chat("--config", str(path))
    assert result.returncode == 2
    assert "go together" in one_line(result.stderr)


# --- SIGHUP: the live settings -----------------------------------------------------


@contextlib.contextmanager
def in_process(**options: object) -> Iterator[chat.ChatServer]:
    server = chat.ChatServer("127.0.0.1", 0, **options)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.close()


def connections(server: chat.ChatServer) -> list[chat.Connection]:
    selector_map = server._selector.get_map()
    assert selector_map is not None
    return [key.data for key in selector_map.values() if isinstance(key.data, chat.Connection)]


def test_apply_limits_max_clients_for_new_connections() -> None:
    """SIGHUP: a lower max-clients refuses the next connection; the open ones stay."""
    with in_process(max_clients=2) as server:
        first, second = Pumped(server), Pumped(server)
        first.sync()
        second.sync()
        server.apply_limits(max_clients=1)
        third = Pumped(server)
        assert third.read_to_eof() == SERVER_FULL + b"\n"
        assert first.sync() == [] and second.sync() == []
        server.apply_limits(max_clients=3)
        assert Pumped(server).sync() == []


def test_apply_limits_max_per_address() -> None:
    """SIGHUP: max-per-address applies to the next connection from that address."""

    def from_127_0_0_2() -> socket.socket:
        sock = socket.socket()
        sock.bind(("127.0.0.2", 0))  # counted: not the machine's own 127.0.0.1
        return sock

    with in_process(max_per_address=5) as server:
        first = Pumped(server, make=from_127_0_0_2)
        first.sync()
        server.apply_limits(max_per_address=1)
        assert Pumped(server, make=from_127_0_0_2).read_to_eof() == TOO_MANY_FROM_ADDRESS + b"\n"
        assert first.sync() == []


def test_apply_limits_register_timeout_for_new_connections() -> None:
    """SIGHUP: a new register-timeout times new connections; an open one keeps its own."""
    clock = FakeClock()
    with in_process(register_timeout=60, clock=clock) as server:
        old = Pumped(server)
        old.sync()
        server.apply_limits(register_timeout=5)
        new = Pumped(server)
        new.sync()
        clock.advance(5)
        assert new.read_to_eof() == TIMED_OUT_WAITING + b"\n"
        assert old.sync() == []
        clock.advance(55)
        assert old.read_to_eof() == TIMED_OUT_WAITING + b"\n"


def test_apply_limits_output_limit() -> None:
    """SIGHUP: a lower output-limit closes a connection whose unread output passes it."""
    with in_process() as server:
        reader = Pumped(server, rcvbuf=4096)
        reader.register("reader")
        sender = Pumped(server)
        sender.register("sender")
        server.apply_limits(output_limit=100_000)
        line = b"SEND " + b"x" * 4000 + b"\n"
        for _ in range(200):  # 800 KB: under the default 1 MiB, over 100 kB
            sender.send(line)
        sender.sync()
        assert server.stats.disconnections["slow_consumer"] == 1


def test_apply_limits_output_budget() -> None:
    """SIGHUP: a lower output-budget sheds the largest unread output."""
    with in_process() as server:
        reader = Pumped(server, rcvbuf=4096)
        reader.register("reader")
        sender = Pumped(server)
        sender.register("sender")
        server.apply_limits(output_budget=100_000)
        line = b"SEND " + b"x" * 4000 + b"\n"
        for _ in range(200):
            sender.send(line)
        sender.sync()
        assert server.stats.disconnections["memory_budget"] == 1


def test_apply_limits_keepalive_for_new_connections() -> None:
    """SIGHUP: keepalive changes (off too) for connections accepted next, not open ones."""
    with in_process(keepalive=30) as server:
        clients = [Pumped(server)]
        clients[-1].sync()
        (old,) = connections(server)
        server.apply_limits(keepalive=0)
        clients.append(Pumped(server))
        clients[-1].sync()
        (new,) = [conn for conn in connections(server) if conn is not old]
        server.apply_limits(keepalive=9)
        clients.append(Pumped(server))
        clients[-1].sync()
        (newest,) = [conn for conn in connections(server) if conn not in (old, new)]
        for conn, expected in ((old, 1), (new, 0), (newest, 1)):
            assert isinstance(conn.sock, socket.socket)
            assert conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == expected
        assert isinstance(newest.sock, socket.socket)
        assert newest.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 9


def test_on_reload_runs_in_the_loop_when_reload_is_asked(caplog: pytest.LogCaptureFixture) -> None:
    """SIGHUP: the reload runs in the loop, not in the handler; a bug in it does not stop it."""
    calls: list[str] = []

    def reload() -> None:
        calls.append("reload")
        raise RuntimeError("a bug")

    with in_process(on_reload=reload) as server:
        client = Pumped(server)
        client.sync()
        server.reload_tls()  # what the signal handler calls
        assert calls == []  # not yet: only the loop runs it
        assert client.sync() == []  # the wake-up was written first, so it ran before
        assert calls == ["reload"]
        assert "internal error reloading the settings" in caplog.text
        assert "SIGHUP ignored" not in caplog.text  # the settings were reloaded
        assert client.sync() == []


def test_chat_server_listens_on_sockets_it_is_given() -> None:
    """Socket activation: ChatServer(sockets=...) serves the listening sockets given, binds none."""
    made = socket.create_server(("127.0.0.1", 0))
    made.setblocking(False)
    metrics_made = socket.create_server(("127.0.0.1", 0))
    metrics_made.setblocking(False)
    port = made.getsockname()[1]
    with in_process(
        sockets={"chat": made, "metrics": metrics_made},
        metrics_address=metrics_made.getsockname()[:2],
    ) as server:
        assert server.address == ("127.0.0.1", port)
        assert server.metrics is not None
        assert server.metrics.address == metrics_made.getsockname()[:2]
        client = Pumped(server, address=("127.0.0.1", port))
        client.register("alice")
    assert made.fileno() == -1  # closed with the server


def hangup(server: ServerProcess, expected: str) -> str:
    """SIGHUP, then wait for the log line the reload ends with."""
    before = server.log.text().count(expected)
    server.process.send_signal(signal.SIGHUP)
    poll(f"{expected!r} in the log", lambda: server.log.text().count(expected) > before)
    return server.log.text()


def test_sighup_applies_the_live_settings_and_names_the_others(tmp_path: Path) -> None:
    """SIGHUP: max-clients and log-level apply to what comes next; others are named."""
    path = write(tmp_path / "chat.toml", "max-clients = 1\n")
    with launch("--config", str(path)) as server:
        alice = server.member("alice")
        refused = server.client()
        assert refused.read_to_eof() == SERVER_FULL + b"\n"
        write(path, 'max-clients = 2\nlog-level = "warning"\nroom = "other"\nlease-ms = 9000\n')
        log = hangup(server, "only after a restart")
        assert re.search(r"WARNING .*chat.toml.* restart: room, lease-ms$", log, re.MULTILINE)
        connected = log.count(" connected")
        bob = server.member("bob")  # max-clients 2
        assert server.log.text().count(" connected") == connected  # log-level WARNING
        assert alice.sync() == [] and bob.sync() == []
        # Again with the same file: those still wait for a restart.
        hangup(server, "restart: room, lease-ms")
        server.finish()


def test_sighup_keeps_the_command_line_over_the_file(tmp_path: Path) -> None:
    """SIGHUP: an option given on the command line still wins over the reloaded file."""
    path = write(tmp_path / "chat.toml", "max-clients = 1\n")
    with launch("--config", str(path), "--max-clients", "1") as server:
        server.member("alice")
        write(path, "max-clients = 5\nmax-per-address = 3\n")
        hangup(server, "reloaded the settings")
        assert server.client().read_to_eof() == SERVER_FULL + b"\n"
        server.finish()


def test_sighup_with_a_broken_file_keeps_every_old_setting(tmp_path: Path) -> None:
    """SIGHUP: a file that no longer reads is logged naming it, and none of its values apply."""
    path = write(tmp_path / "chat.toml", "max-clients = 1\n")
    with launch("--config", str(path)) as server:
        server.member("alice")
        write(path, "max-clients = 5\nmax-client = 5\n")  # a good value, then a bad key
        log = hangup(server, "keeping every setting")
        assert re.search(rf"ERROR cannot reload the settings: {re.escape(str(path))}, line 2", log)
        assert server.client().read_to_eof() == SERVER_FULL + b"\n"
        write(path, "max-clients = 2\n")  # fixed: read again
        hangup(server, "reloaded the settings in")
        server.member("bob")
        hangup(server, "no change that applies while running")  # 2 is in force already
        assert "SIGHUP ignored" not in server.finish()


# --- the port in use is named ------------------------------------------------------


@pytest.mark.parametrize("taken", ["port", "TLS port", "metrics port"])
def test_the_port_in_use_is_named(taken: str, tls_files: TLSFiles) -> None:
    """A port in use (v3): the one line says which of the ports given is taken."""
    with socket.create_server(("127.0.0.1", 0)) as blocker:
        busy = blocker.getsockname()[1]
        ports = {"port": 0, "TLS port": 0, "metrics port": 0, taken: busy}
        result = run_chat(
            str(ports["port"]),
            "--host=127.0.0.1",
            f"--tls-port={ports['TLS port']}",
            f"--tls-cert={tls_files.cert}",
            f"--tls-key={tls_files.key}",
            f"--metrics-port={ports['metrics port']}",
        )
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert re.search(rf"cannot listen on {taken} {busy}\b.*: Address already in use$", line)
    others = {"port", "TLS port", "metrics port"} - {taken}
    assert not any(f"on {other} " in line for other in others)


# --- socket activation: the variables ----------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, {}),
        ({"LISTEN_FDS": "1"}, {}),  # no LISTEN_PID: not ours
        ({"LISTEN_FDS": "1", "LISTEN_PID": "4242"}, {}),  # another process's
        ({"LISTEN_FDS": "0", "LISTEN_PID": "100"}, {}),
        ({"LISTEN_FDS": "1", "LISTEN_PID": "100"}, {"chat": 3}),
        ({"LISTEN_FDS": "1", "LISTEN_PID": "100", "LISTEN_FDNAMES": "unknown"}, {"chat": 3}),
        ({"LISTEN_FDS": "1", "LISTEN_PID": "100", "LISTEN_FDNAMES": "tls"}, {"tls": 3}),
        (
            {"LISTEN_FDS": "4", "LISTEN_PID": "100", "LISTEN_FDNAMES": "metrics:chat:web:tls"},
            {"metrics": 3, "chat": 4, "web": 5, "tls": 6},
        ),
    ],
)
def test_listen_fds_takes_only_what_is_passed_to_this_process(
    environ: dict[str, str], expected: dict[str, int]
) -> None:
    """Socket activation: sockets from 3 on, by name; taken only when LISTEN_PID is ours."""
    assert activation.listen_fds(environ, 100) == expected


@pytest.mark.parametrize(
    ("environ", "mention"),
    [
        ({"LISTEN_FDS": "2", "LISTEN_PID": "100", "LISTEN_FDNAMES": "chat"}, "names 1 sockets"),
        ({"LISTEN_FDS": "1", "LISTEN_PID": "100", "LISTEN_FDNAMES": "chat:tls"}, "names 2"),
        ({"LISTEN_FDS": "2", "LISTEN_PID": "100"}, "no name"),
        ({"LISTEN_FDS": "1", "LISTEN_PID": "100", "LISTEN_FDNAMES": "http"}, "'http'"),
        ({"LISTEN_FDS": "2", "LISTEN_PID": "100", "LISTEN_FDNAMES": "chat:chat"}, "two"),
        ({"LISTEN_FDS": "many", "LISTEN_PID": "100"}, "LISTEN_FDS"),
        ({"LISTEN_FDS": "-1", "LISTEN_PID": "100"}, "LISTEN_FDS"),
        ({"LISTEN_FDS": "1", "LISTEN_PID": "me"}, "LISTEN_PID"),
    ],
)
def test_listen_fds_that_do_not_fit_are_one_line(environ: dict[str, str], mention: str) -> None:
    """Socket activation: a count that does not match the names, or a name not ours: one line."""
    found = activation.listen_fds(environ, 100)
    assert isinstance(found, activation.ActivationProblem)
    assert mention in found.message


_VARIABLE_TEXT: Final = st.one_of(
    st.text(max_size=12), st.integers(-2, 6).map(str), st.just("100"), st.just("chat:tls")
)


@given(st.dictionaries(st.sampled_from(activation.VARIABLES), _VARIABLE_TEXT))
def test_listen_fds_never_raises(environ: dict[str, str]) -> None:
    """Socket activation: any variables give sockets numbered from 3 by known names, or one line."""
    found = activation.listen_fds(environ, 100)
    if isinstance(found, activation.ActivationProblem):
        assert "\n" not in found.message
    else:
        assert set(found) <= set(activation.NAMES)
        assert sorted(found.values()) == list(range(3, 3 + len(found)))


def test_take_sockets_unsets_the_variables() -> None:
    """Socket activation: the variables are unset once read, so children do not take the sockets."""
    environ = {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "chat", "HOME": "/"}
    assert activation.take_sockets(environ) == {}  # pid 1's, not ours
    assert environ == {"HOME": "/"}


# --- socket activation with systemd-socket-activate ------------------------------


def socket_activate() -> str:
    path = shutil.which("systemd-socket-activate")
    if path is None:
        pytest.skip("systemd-socket-activate is not installed (Debian package systemd)")
    return path


@contextlib.contextmanager
def activated(*options: str, chat_args: tuple[str, ...] = ()) -> Iterator[subprocess.Popen[bytes]]:
    """chat.py started by systemd-socket-activate with `options` (-l, --fdname)."""
    command = [socket_activate(), *options, sys.executable, str(HERE / "chat.py"), *chat_args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:  # stuck: never left behind
            process.kill()
            process.wait()
        assert process.stderr is not None
        process.stderr.close()


def connect_when_listening(port: int) -> Client:
    """A client of `port` once systemd-socket-activate has bound it."""
    clients: list[Client] = []

    def connected() -> bool:
        try:
            clients.append(Client(("127.0.0.1", port)))
        except ConnectionRefusedError:
            return False
        return True

    poll(f"port {port} to listen", connected)
    return clients[0]


def test_systemd_socket_activate_serves_the_passed_socket() -> None:
    """Socket activation: systemd-socket-activate binds, chat.py serves it, users chat."""
    port = free_port()
    with activated(f"--listen=127.0.0.1:{port}", "--fdname=chat", chat_args=("0",)) as process:
        alice = connect_when_listening(port)  # chat.py starts on this connection
        alice.register("alice")
        with Client(("127.0.0.1", port)) as bob:
            bob.register("bob")
            bob.send(b"SEND hello\n")
            assert alice.line() == b"RECEIVE bob hello"
        alice.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(TIMEOUT) == 0
        assert process.stderr is not None
        log = process.stderr.read().decode()
    # PORT 0 was given: the server did not bind one of its own.
    assert re.search(rf"listening on 127\.0\.0\.1:{port}$", log, re.MULTILINE), log
    assert "socket activation: serving the sockets passed in (chat)" in log


def test_systemd_socket_activate_passes_a_named_metrics_socket() -> None:
    """Socket activation: two named sockets, chat and metrics, each serves its own."""
    chat_port, metrics_port = free_port(), free_port()
    with activated(
        f"--listen=127.0.0.1:{chat_port}",
        f"--listen=127.0.0.1:{metrics_port}",
        "--fdname=chat:metrics",
    ):
        client = connect_when_listening(chat_port)
        client.send(b"PING\n")
        assert client.line() == SYNC_REPLY
        with socket.create_connection(("127.0.0.1", metrics_port), timeout=TIMEOUT) as scrape:
            scrape.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := scrape.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.")
        # The chat socket's client.
        assert b'\nchat_connections_open{transport="tcp"} 1\n' in reply
        client.close()


def test_systemd_socket_activate_passes_tls_and_web(tls_files: TLSFiles) -> None:
    """Socket activation: a tls socket serves TLS with the configured certificate, and a
    web socket the web port (WebSocket members of the same room)."""
    ports = [free_port(), free_port(), free_port()]
    cert, key = f"--tls-cert={tls_files.cert}", f"--tls-key={tls_files.key}"
    with activated(
        *(f"--listen=127.0.0.1:{port}" for port in ports),
        "--fdname=chat:tls:web",
        chat_args=(cert, key),
    ) as process:
        plain = connect_when_listening(ports[0])
        plain.register("alice")
        with TLSClient(("127.0.0.1", ports[1])) as secure:
            secure.register("bob")
            secure.send(b"SEND over TLS\n")
            assert plain.line() == b"RECEIVE bob over TLS"
        with websocket_connect(f"ws://127.0.0.1:{ports[2]}/chat", open_timeout=TIMEOUT) as ws:
            ws.send("USERNAME carol\nSEND from the web")
            assert plain.line() == b"RECEIVE carol from the web"
        plain.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(TIMEOUT) == 0
        assert process.stderr is not None
        log = process.stderr.read().decode()
    assert re.search(rf"listening for TLS on 127\.0\.0\.1:{ports[1]}$", log, re.MULTILINE), log
    web = rf"listening for the web \(HTTP and WebSocket\) on 127\.0\.0\.1:{ports[2]}:"
    assert re.search(web, log), log


@pytest.mark.parametrize(
    ("fdname", "said"),
    [
        ("tls", "--tls-cert"),  # a tls socket without --tls-cert and --tls-key
        ("http", "'http'"),  # a name other than chat, tls, web, metrics
    ],
)
def test_systemd_socket_activate_with_a_socket_it_cannot_serve_exits_2(
    fdname: str, said: str
) -> None:
    """Socket activation: a tls socket without a certificate, or a socket
    named other than chat, tls, web or metrics: one line that says why, exit 2."""
    port = free_port()
    with activated(f"--listen=127.0.0.1:{port}", f"--fdname={fdname}") as process:
        client = connect_when_listening(port)
        assert process.wait(TIMEOUT) == 2
        assert process.stderr is not None
        # What systemd-socket-activate says before it runs chat.py, then chat.py's.
        ours = process.stderr.read().partition(b"\nExecing ")[2].partition(b"\n")[2]
        assert said in one_line(ours)
        client.close()


# --- the example file and the systemd units -----------------------------------------


def test_example_file_has_every_option_at_its_default() -> None:
    """chat.example.toml: every option, at its default; unset ones commented out."""
    parser_table = table()
    text = EXAMPLE.read_text()
    from_file = config.read_settings(str(EXAMPLE), parser_table)
    assert isinstance(from_file, dict), from_file
    commented = set(re.findall(r"^# ([a-z-]+) = ", text, re.MULTILINE))
    active = {key for key, setting in parser_table.items() if setting.dest in from_file}
    assert active | commented == set(parser_table)
    assert not active & commented
    for key, setting in parser_table.items():
        if key in active:
            assert from_file[setting.dest] == setting.default, key
        else:
            assert setting.default is None, key  # TOML has no "unset"
    defaults = vars(chat.parse_args([]))
    assert chat.parse_args(["--config", str(EXAMPLE)]) == argparse.Namespace(
        **defaults | {"config": str(EXAMPLE)}
    )


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: section -> key -> its values, in order."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


HARDENING: Final = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "DynamicUser": "yes",
    "Restart": "on-failure",
}


def test_service_unit_is_hardened_and_runs_our_command_line() -> None:
    """systemd/chat.service: own user, hardened, restarts, SIGHUP reload, our options."""
    service = unit("chat.service")["Service"]
    for key, value in HARDENING.items():
        assert service.get(key) == [value], key
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    (exec_start,) = service["ExecStart"]
    _python, script, *argv = shlex.split(exec_start)
    assert Path(script).name == "chat.py"
    args = chat.build_parser().parse_args(argv)  # exits the test on a bad option
    assert args.config is not None  # its settings are in the file SIGHUP reloads


@pytest.mark.parametrize(
    ("name", "fd_name", "privileged"), [("chat", "chat", False), ("chat-tls", "tls", True)]
)
def test_socket_units_pass_named_sockets_to_the_service(
    name: str, fd_name: str, privileged: bool
) -> None:
    """systemd/*.socket: a name chat.py takes, for chat.service, on 8080 or a privileged port."""
    sockets = unit(f"{name}.socket")["Socket"]
    assert sockets["FileDescriptorName"] == [fd_name]
    assert fd_name in activation.NAMES
    assert sockets["Service"] == ["chat.service"]
    (port,) = sockets["ListenStream"]
    assert (int(port) < 1024) == privileged
    if not privileged:
        assert port == str(chat.PORT)


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd/: `systemd-analyze verify` finds nothing to say about the units."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    names = ["chat.service", "chat.socket", "chat-tls.socket"]
    result = subprocess.run(
        [analyze, "verify", *(str(UNITS / name) for name in names)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    # Unknown keys are only warned about, and ignored: none may be.
    assert b"Unknown" not in result.stderr and b"ignoring" not in result.stderr, result.stderr
