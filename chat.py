"""A line-protocol chat server: one thread, one selectors reactor.

    python3 chat.py 8080        then, in two terminals: nc localhost 8080

PROTOCOL.md is the contract. protocol.py knows what a line means, room.py
knows who holds which name and what the turn says to whom, and the
reactor moves bytes and keeps time, in six modules along its seams:

- reactor.py: the loop (`ChatServer.run_once`, one turn: select, read,
  timers, process, flush, close), the `Host` the room asks, and the
  `ServerView` tests read;
- connection.py: a `Connection`, its transport's `Kind`, the `Schedule`
  that owns every connection's place in the turns (and its timers), and
  the read path (`Reader`);
- processing.py: the round's lines through protocol.parse_line to the
  room (`Processor`);
- output.py: the write path (`Writer`, `Outbox`, the budget, the slow
  consumers) and backpressure (the room's input held back while a member
  that is reading is over the high water mark);
- door.py: the listeners and the limits on who comes in (`Door`), and the
  TLS port with what its connections' transport needs (`TLSPort`);
- webport.py: the web port (`WebPort`), whose connections' transport
  (`WebTransport`) speaks HTTP, then WebSocket (web.py and websocket.py
  are those protocols without I/O);
- timers.py: the deadlines, on one heap read against one clock.

host.py is what the reactor offers the modules it runs; tls.py is TLS as
a transport, metrics.py renders the counts for GET /metrics, and
cluster.py (imported only with --redis) is the room over Redis. This
module is the command line; it re-exports what embedders and tests use.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, Final, cast

import activation
import config
import flood
import options
from connection import LINES_PER_TURN, READ_SIZE, Connection, Transport
from door import (
    ACCEPT_PAUSE,
    DEFAULT_KEEPALIVE,
    DEFAULT_MAX_CLIENTS,
    DEFAULT_MAX_PER_ADDRESS,
    DEFAULT_REGISTER_TIMEOUT,
    SEND_BUFFER,
    UNACKED_LIMIT_WITHOUT_KEEPALIVE,
    address_key,
    format_peer,
    open_listener,
)
from host import Host
from output import (
    BATCH_BYTES,
    DEFAULT_OUTPUT_BUDGET,
    DEFAULT_OUTPUT_LIMIT,
    STALL_CHECK,
    STALL_TIMEOUT,
)
from proxy_header import proxy_network
from reactor import ChatServer
from room import ConfigurationError, LocalRoom, Room
from timers import Timers
from tls import TLSConfig, TLSConfigError
from webport import WebConfig

PORT = 8080

# What `import chat` offers: the server and its limits, for embedders,
# benchmarks and tests.
__all__ = [
    "ACCEPT_PAUSE",
    "BATCH_BYTES",
    "DEFAULT_KEEPALIVE",
    "DEFAULT_MAX_CLIENTS",
    "DEFAULT_MAX_PER_ADDRESS",
    "DEFAULT_OUTPUT_BUDGET",
    "DEFAULT_OUTPUT_LIMIT",
    "DEFAULT_REGISTER_TIMEOUT",
    "LINES_PER_TURN",
    "PORT",
    "READ_SIZE",
    "SEND_BUFFER",
    "STALL_CHECK",
    "STALL_TIMEOUT",
    "ChatServer",
    "Connection",
    "Timers",
    "Transport",
    "address_key",
    "format_peer",
    "main",
    "open_listener",
    "parse_args",
    "return_large_buffers_to_the_system",
]

log = logging.getLogger("chat")

RoomFactory = Callable[[Host], Room]


# --- the command line ----------------------------------------------------
# Builds the objects and runs them; no other module depends on it.


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser; also the table of the settings file's
    keys and their checks (config.setting_table)."""
    parser = options.Parser(
        prog="chat.py",
        description="A line-protocol chat server. Connect with: nc localhost PORT",
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="read settings from FILE, a TOML file of these options by the same names "
        "(port = 8080, max-clients = 100, reuse-port = true); options given here win; "
        "SIGHUP reads it again (see chat.example.toml)",
    )
    parser.add_argument(
        "port",
        nargs="?",
        type=options.port,
        default=PORT,
        metavar="PORT",
        help=f"TCP port to listen on; 0 picks a free one (default: {PORT})",
    )
    parser.add_argument(
        "--host",
        default=None,
        help="address or name to listen on (default: every interface, IPv6 and IPv4)",
    )
    parser.add_argument(
        "--max-clients",
        type=options.positive,
        default=DEFAULT_MAX_CLIENTS,
        metavar="N",
        help="connections over N are told 'ERROR Server is full.' and closed "
        f"(default: {DEFAULT_MAX_CLIENTS})",
    )
    parser.add_argument(
        "--output-limit",
        type=options.positive,
        default=DEFAULT_OUTPUT_LIMIT,
        metavar="BYTES",
        help="a client with more than BYTES of output it has not read is "
        f"disconnected as a slow consumer (default: {DEFAULT_OUTPUT_LIMIT}, 1 MiB)",
    )
    internet = parser.add_argument_group(
        "real networks",
        "limits for a server on the open internet (0 turns --keepalive, --register-timeout "
        "and --max-per-address off)",
    )
    internet.add_argument(
        "--output-budget",
        type=options.positive,
        default=DEFAULT_OUTPUT_BUDGET,
        metavar="BYTES",
        help="all clients' unread output together; over it, the clients holding the "
        f"most are disconnected as slow consumers (default: {DEFAULT_OUTPUT_BUDGET}, 256 MiB)",
    )
    internet.add_argument(
        "--keepalive",
        type=options.keepalive,
        default=DEFAULT_KEEPALIVE,
        metavar="SECONDS",
        help="probe a client that has been quiet this long, so that one that vanished "
        "(network cut, laptop closed) is disconnected after about 2 x SECONDS (at most "
        "4 x SECONDS + 10 s); 0: no "
        f"probes, and unacknowledged output gives up after {UNACKED_LIMIT_WITHOUT_KEEPALIVE} s "
        f"(default: {DEFAULT_KEEPALIVE})",
    )
    internet.add_argument(
        "--register-timeout",
        type=options.whole,
        default=DEFAULT_REGISTER_TIMEOUT,
        metavar="SECONDS",
        help="a connection without a name after SECONDS is told 'ERROR Timed out waiting "
        f"for USERNAME.' and closed (default: {DEFAULT_REGISTER_TIMEOUT})",
    )
    internet.add_argument(
        "--max-per-address",
        type=options.whole,
        default=DEFAULT_MAX_PER_ADDRESS,
        metavar="N",
        help="connections over N from one address (IPv6: one /64) are told 'ERROR Too many "
        "connections from your address.' and closed; 127.0.0.1 and ::1 are not counted "
        f"(default: {DEFAULT_MAX_PER_ADDRESS})",
    )
    internet.add_argument(
        "--proxy-protocol",
        type=proxy_network,
        action="append",
        default=None,
        metavar="CIDR",
        help="connections from this network (a CIDR or one address; repeat for more) come "
        "from a load balancer: each must begin with a PROXY protocol header (v1 or v2), "
        "whose client address is then the connection's own, for --max-per-address and "
        "the logs (default: none)",
    )
    internet.add_argument(
        "--send-rate",
        type=options.send_rate,
        default=0.0,
        metavar="N",
        help="SEND lines per second per connection (decimals allowed): a client that sends "
        "faster is not read until it may send again, so it is slowed, and nothing it sent "
        "is refused or lost; 0: no limit (default: 0)",
    )
    internet.add_argument(
        "--send-burst",
        type=options.send_burst,
        default=None,
        metavar="B",
        help="with --send-rate: SEND lines a connection may send at once before the rate "
        "holds it back (default: 10 x N, rounded up)",
    )
    tls = parser.add_argument_group(
        "TLS",
        "a TLS listener (TLS 1.2 or newer) beside the plain one, on the same --host, "
        "serving the same room; SIGHUP reloads the certificate and key for new connections",
    )
    tls.add_argument(
        "--tls-port",
        type=options.port,
        default=None,
        metavar="PORT",
        help="also listen for TLS on PORT; 0 picks a free one (default: no TLS)",
    )
    tls.add_argument(
        "--tls-cert",
        default=None,
        metavar="FILE",
        help="with --tls-port: the certificate (and chain) in PEM",
    )
    tls.add_argument(
        "--tls-key",
        default=None,
        metavar="FILE",
        help="with --tls-port: its private key in PEM, without a passphrase",
    )
    web_group = parser.add_argument_group(
        "web",
        "people in a web browser: a web page and WebSocket clients of the same room, on "
        "the same --host; they count towards the limits like any other connection",
    )
    web_group.add_argument(
        "--web-port",
        type=options.port,
        default=None,
        metavar="PORT",
        help="serve the web page at http://HOST:PORT/ and WebSocket clients at /chat; "
        "0 picks a free one (default: no web port)",
    )
    web_group.add_argument(
        "--web-origin",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="only pages from ORIGIN (such as https://chat.example.org) may open a "
        "WebSocket; repeat it for several (default: any; clients that send no Origin, "
        "which browsers always send, are let in)",
    )
    web_group.add_argument(
        "--web-tls",
        action="store_true",
        help="the web port speaks HTTPS and WSS, with --tls-cert and --tls-key "
        "(--tls-port is then optional); SIGHUP reloads them",
    )
    parser.add_argument(
        "--log-level",
        type=options.log_level,
        default="INFO",
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR, in any case (default: INFO)",
    )
    parser.add_argument(
        "--log-name",
        default=None,
        metavar="NAME",
        help="start every log line with [NAME], to tell servers apart in one log "
        "(default: none; with --redis, the port it listens on)",
    )
    parser.add_argument(
        "--metrics-port",
        type=options.port,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="with --metrics-port: the address to serve them on (default: 127.0.0.1)",
    )
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="set SO_REUSEPORT, so that several servers on one machine can share "
        "the port (with --redis, to use every core)",
    )
    cluster = parser.add_argument_group(
        "cluster mode",
        "several servers, on one machine or many, serving one room through Redis "
        "(needs the hiredis package: pip install -r requirements-cluster.txt)",
    )
    cluster.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help="join the cluster of every server using this Redis, e.g. "
        "redis://127.0.0.1:7379/0 (default: none, a single server)",
    )
    cluster.add_argument(
        "--room",
        type=options.room,
        default=options.DEFAULT_ROOM,
        metavar="NAME",
        help="with --redis: servers with the same Redis and NAME share one room "
        f"(default: {options.DEFAULT_ROOM})",
    )
    cluster.add_argument(
        "--lease-ms",
        type=options.lease_ms,
        default=options.DEFAULT_LEASE_MS,
        metavar="MS",
        help="with --redis: how long a name stays taken in Redis after its server "
        f"stops renewing it, e.g. because it died; at least {options.MIN_LEASE_MS} "
        f"(default: {options.DEFAULT_LEASE_MS})",
    )
    cluster.add_argument(
        "--redis-timeout",
        type=options.redis_timeout,
        default=options.DEFAULT_REDIS_TIMEOUT,
        metavar="SECONDS",
        help="with --redis: every request to Redis must be answered within SECONDS; "
        "if one is not, Redis counts as unreachable and SENDs waiting for it get "
        f"'ERROR Service unavailable.'; {options.MIN_REDIS_TIMEOUT:g} to "
        f"{options.MAX_REDIS_TIMEOUT:g} "
        f"(default: {options.DEFAULT_REDIS_TIMEOUT:g})",
    )
    return parser


TLS_TOGETHER: Final = "--tls-port, --tls-cert and --tls-key go together: give all three"
WEB_TLS_NEEDS: Final = "--web-tls needs --tls-cert and --tls-key"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, and the settings file it names (--config) for
    every option it does not give."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        table = config.setting_table(parser)
        from_file = config.read_settings(args.config, table)
        if isinstance(from_file, config.ConfigProblem):
            parser.error(from_file.message)
        given = config.given_on_command_line(build_parser(), argv)
        args = argparse.Namespace(**config.merge(table, from_file, given) | {"config": args.config})
    tls = [args.tls_port is not None, args.tls_cert is not None, args.tls_key is not None]
    # A certificate and key without a port are checked once it is known
    # whether systemd passed a TLS socket (_passed_sockets), or --web-tls.
    if any(tls) and not all(tls) and tls != [False, True, True]:
        parser.error(TLS_TOGETHER)
    if args.web_tls and not (tls[1] and tls[2]):
        parser.error(WEB_TLS_NEEDS)
    if isinstance(args.web_origin, str):  # one origin, from the settings file
        args.web_origin = [args.web_origin]
    return args


def _cluster_room(args: argparse.Namespace) -> RoomFactory:
    """The room of cluster mode; ConfigurationError if it cannot be set up."""
    try:
        import cluster  # needs hiredis: cluster mode only
    except ImportError as error:
        raise ConfigurationError(
            f"--redis needs the hiredis package ({error}); pip install -r requirements-cluster.txt"
        ) from None
    return cluster.room_factory(
        args.redis, room=args.room, lease_ms=args.lease_ms, timeout=args.redis_timeout
    )


def _warn_about_unused_options(args: argparse.Namespace, web: bool) -> None:
    if not web and (args.web_origin or args.web_tls):
        log.warning("--web-origin and --web-tls matter only with --web-port: ignored")
    if args.redis is None:
        unused = [
            option
            for option, value, default in (
                ("--room", args.room, options.DEFAULT_ROOM),
                ("--lease-ms", args.lease_ms, options.DEFAULT_LEASE_MS),
                ("--redis-timeout", args.redis_timeout, options.DEFAULT_REDIS_TIMEOUT),
            )
            if value != default
        ]
        if unused:
            verb = "matters" if len(unused) == 1 else "matter"
            log.warning("%s only %s with --redis: ignored", ", ".join(unused), verb)
        if args.reuse_port:
            log.warning(
                "--reuse-port without --redis: servers sharing the port do not share a room"
            )
    if args.send_burst is not None and not args.send_rate:
        log.warning("--send-burst only matters with --send-rate: ignored")


def _describe_listener(host: str | None, address: tuple[str, int]) -> str:
    where = format_peer((address[0] or "*", address[1]))
    if host is None and address[0] == "::":
        return f"{where} (every address, IPv6 and IPv4)"
    if ":" in address[0]:
        return f"{where} (IPv6 only)"
    return where


def _log_format(name: str | None) -> str:
    # No % formatting of the name: it is the user's text.
    tag = f"[{name.replace('%', '%%')}] " if name else ""
    return "%(asctime)s %(levelname)s " + tag + "%(message)s"


# glibc's mallopt parameter for the size from which blocks are mmapped.
_M_MMAP_THRESHOLD: Final = -3
# Blocks of this size or more get their own mapping, which goes back to the
# system when they are freed. Left to itself, glibc raises its threshold to
# the size of every large block freed (up to 32 MiB), so slow consumers'
# growing buffers come from the heap and fragment it: 2,000 of them under
# the default output budget of 256 MiB peaked at 365 MiB of memory, and
# 300 MiB stayed after they were closed. Just above READ_SIZE, so that
# reads stay on the heap.
MMAP_THRESHOLD: Final = READ_SIZE + 4096


def return_large_buffers_to_the_system() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD (the program does; a
    program that embeds ChatServer decides for itself). Whether it was set:
    False on a C library without mallopt."""
    import ctypes  # only here: nothing else needs it

    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


class _CannotListen(Exception):
    """A port cannot be bound: which one (`where`), and the OSError."""

    def __init__(self, where: str, error: OSError) -> None:
        super().__init__(where, error)
        self.where = where
        self.error = error


def _open_listeners(
    args: argparse.Namespace, passed: dict[str, socket.socket]
) -> dict[str, socket.socket]:
    """The listening sockets the server needs, by what they serve: those
    systemd passed (`passed`), and the others bound here, one at a time,
    so that the port that is taken can be named (_CannotListen)."""
    sockets = dict(passed)
    wanted: list[tuple[str, str, str | None, int]] = [("chat", "port", args.host, args.port)]
    if args.tls_port is not None:
        wanted.append(("tls", "TLS port", args.host, args.tls_port))
    if args.web_port is not None:
        wanted.append(("web", "web port", args.host, args.web_port))
    if args.metrics_port is not None:
        wanted.append(("metrics", "metrics port", args.metrics_host, args.metrics_port))
    try:
        for name, what, host, port in wanted:
            if name in sockets:
                continue
            try:
                if name == "metrics" and host is not None:  # one address, not every one
                    family = socket.AF_INET6 if ":" in host else socket.AF_INET
                    sockets[name] = socket.create_server((host, port), family=family)
                    sockets[name].setblocking(False)
                else:
                    sockets[name] = open_listener(host, port, reuse_port=args.reuse_port)
            except OSError as error:
                where = f"{what} {port}" if host is None else f"{what} {port} of {host!r}"
                raise _CannotListen(where, error) from None
    except BaseException:
        for sock in sockets.values():
            sock.close()
        raise
    return sockets


def _os_error_reason(error: OSError) -> str:
    # Not str(error): create_server adds "(while attempting to bind on
    # address ...)", which says it in Python's words.
    if isinstance(error, socket.gaierror) or not error.errno:
        return error.strerror or str(error)  # the resolver's words
    return os.strerror(error.errno)


def _passed_sockets(args: argparse.Namespace) -> dict[str, socket.socket] | str:
    """The sockets systemd passed (socket activation), checked against the
    options; or the one line saying why they cannot be used."""
    passed = activation.take_sockets()
    if isinstance(passed, activation.ActivationProblem):
        return f"chat.py: socket activation: {passed.message}"
    if "tls" in passed and (args.tls_cert is None or args.tls_key is None):
        return (
            "chat.py: socket activation: a socket 'tls' was passed: give --tls-cert and --tls-key"
        )
    if (
        "tls" not in passed
        and args.tls_cert is not None
        and args.tls_port is None
        and not args.web_tls
    ):
        return f"chat.py: error: {TLS_TOGETHER}"
    return passed


def _reloader(
    args: argparse.Namespace,
    given: dict[str, object],
    server: Callable[[], ChatServer | None],
) -> Callable[[], None]:
    """What SIGHUP does in the loop, besides reloading the certificate:
    read the settings file again and apply what can change while running
    (config.LIVE_SETTINGS); `args` is updated to what is in force."""
    path = args.config
    table = config.setting_table(build_parser())

    def reload() -> None:
        running = server()
        from_file = config.read_settings(path, table)
        if isinstance(from_file, config.ConfigProblem):
            log.error(
                "cannot reload the settings: %s; keeping every setting as it was", from_file.message
            )
            return
        merged = config.merge(table, from_file, given)
        found = config.changes(table, vars(args), merged)
        if found.need_restart:
            log.warning(
                "settings changed in %s take effect only after a restart: %s",
                path,
                ", ".join(found.need_restart),
            )
        live = dict(found.live)
        if "send_rate" in live or "send_burst" in live:
            # Both, the burst worked out: its default follows the rate, and
            # to apply_limits None would mean "unchanged".
            rate = cast(float, merged["send_rate"])
            burst = cast("int | None", merged["send_burst"])
            live["send_rate"] = rate
            live["send_burst"] = flood.default_burst(rate) if burst is None else burst
        level = live.pop("log_level", None)
        if isinstance(level, str):
            logging.getLogger().setLevel(level)
        if running is not None and live:
            running.apply_limits(**cast(dict[str, Any], live))
        vars(args).update(found.live)
        if found.live:
            changed = ", ".join(
                f"{dest.replace('_', '-')} = {value}" for dest, value in found.live.items()
            )
            log.info("reloaded the settings in %s: %s", path, changed)
        else:
            log.info("reloaded the settings in %s: no change that applies while running", path)

    return reload


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return_large_buffers_to_the_system()
    log_name = args.log_name
    if log_name is None and args.redis is not None:
        log_name = str(args.port)  # servers of one cluster told apart by port
    logging.basicConfig(level=args.log_level, format=_log_format(log_name), stream=sys.stderr)
    server: ChatServer | None = None
    on_reload = None
    if args.config is not None:
        given = config.given_on_command_line(build_parser(), argv)
        on_reload = _reloader(args, given, lambda: server)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if server is None:  # still starting: nothing to close yet
            raise SystemExit(0)
        server.stop()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        if server is not None:  # still starting: the files were just read
            server.reload_tls()  # only wakes the loop, which does the work

    # Before binding, so a signal at any moment after the port is open
    # ends in the same clean exit (and SIGHUP never kills the server).
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    passed = _passed_sockets(args)
    if isinstance(passed, str):
        print(passed, file=sys.stderr)
        return 2
    try:
        room = LocalRoom if args.redis is None else _cluster_room(args)
        sockets = _open_listeners(args, passed)
        tls_port = args.tls_port
        if "tls" in sockets:
            tls_port = sockets["tls"].getsockname()[1]
        web = None
        if "web" in sockets:
            web = WebConfig(
                sockets["web"].getsockname()[1],
                tuple(args.web_origin or ()),
                args.tls_cert if args.web_tls else None,
                args.tls_key if args.web_tls else None,
            )
        metrics_address = None
        if "metrics" in sockets:
            metrics_address = cast(tuple[str, int], sockets["metrics"].getsockname()[:2])
        server = ChatServer(
            args.host,
            args.port,
            max_clients=args.max_clients,
            max_per_address=args.max_per_address,
            output_limit=args.output_limit,
            output_budget=args.output_budget,
            keepalive=args.keepalive,
            register_timeout=args.register_timeout,
            send_rate=args.send_rate,
            send_burst=args.send_burst,
            reuse_port=args.reuse_port,
            metrics_address=metrics_address,
            tls=None if tls_port is None else TLSConfig(tls_port, args.tls_cert, args.tls_key),
            web=web,
            room=room,
            sockets=sockets,
            on_reload=on_reload,
            proxy_networks=args.proxy_protocol or (),
        )
    except ConfigurationError as error:
        print(f"chat.py: {error}", file=sys.stderr)
        return 2
    except TLSConfigError as error:
        print(f"chat.py: cannot load the TLS certificate: {error}", file=sys.stderr)
        return 2
    except _CannotListen as cannot:
        reason = _os_error_reason(cannot.error)
        print(f"chat.py: cannot listen on {cannot.where}: {reason}", file=sys.stderr)
        return 1
    except OSError as error:  # out of descriptors, say
        print(f"chat.py: cannot start: {_os_error_reason(error)}", file=sys.stderr)
        return 1
    if args.log_name is None and args.redis is not None and args.port == 0:
        for handler in logging.getLogger().handlers:  # the port it was given
            handler.setFormatter(logging.Formatter(_log_format(str(server.address[1]))))
    if passed:
        log.info("socket activation: serving the sockets passed in (%s)", ", ".join(passed))
    log.info("listening on %s", _describe_listener(args.host, server.address))
    if server.tls_address is not None:
        log.info("listening for TLS on %s", _describe_listener(args.host, server.tls_address))
    if args.proxy_protocol:
        networks = ", ".join(map(str, args.proxy_protocol))
        log.info("expecting a PROXY protocol header from %s", networks)
    if server.web_address is not None:
        what = "HTTPS and WSS" if args.web_tls else "HTTP and WebSocket"
        where = _describe_listener(args.host, server.web_address)
        log.info("listening for the web (%s) on %s: the page at /", what, where)
    if server.metrics is not None:
        log.info("metrics at http://%s/metrics", format_peer(server.metrics.address))
    _warn_about_unused_options(args, server.web_address is not None)
    server.serve_forever()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
