"""A real HAProxy for the tests: Debian's `haproxy`, started in the
foreground in front of a backend port, sending a PROXY protocol header
(`send-proxy` for v1, `send-proxy-v2` for v2) on every connection it makes.

`running_haproxy` starts it on a free loopback port, waits until that port
listens (read from /proc, so no probe connection reaches the backend) and
kills it when the block ends. `connect_from` opens a client connection from
a chosen loopback address (127.0.0.2, 127.0.0.3, ...), so that the headers
of different clients carry different addresses.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from conftest import TIMEOUT, free_port, listening_ports, poll, require_tool

# Debian installs it in /usr/sbin, which a user's PATH may lack.
HAPROXY: Final = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
# A free port can be taken by someone else before haproxy binds it.
_START_ATTEMPTS: Final = 5


def require_haproxy() -> str:
    """The haproxy program; the test is skipped without it, or fails in CI
    (.ci/run installs it)."""
    return require_tool(HAPROXY, "haproxy")


def haproxy_config(
    listen: tuple[str, int],
    backend: tuple[str, int],
    server_options: str,
    source: str | None = None,
    bind_options: str = "",
) -> str:
    """A TCP frontend on `listen` (with `bind_options`, such as "v4v6")
    relaying every connection to `backend`; `server_options` such as
    "send-proxy" or "send-proxy-v2"; `source`, the address haproxy connects
    from (the balancer's own address)."""
    host, port = listen
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    backend_host, backend_port = backend
    target = (
        f"[{backend_host}]:{backend_port}"
        if ":" in backend_host
        else f"{backend_host}:{backend_port}"
    )
    source_line = f" source {source}" if source else ""
    return f"""\
global
    nbthread 1
    maxconn 1000

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend chat
    bind {bind} {bind_options}
    default_backend chat

backend chat
    server chat {target} {server_options}{source_line}
"""


@dataclass
class HAProxy:
    """A running haproxy: where clients connect, and its stderr so far."""

    process: subprocess.Popen[bytes]
    address: tuple[str, int]
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(TIMEOUT)


def _start(program: str, config: str, address: tuple[str, int], directory: Path) -> HAProxy | str:
    """haproxy with `config`, once it listens on `address`; or its stderr,
    if it exited instead."""
    config_path = directory / f"haproxy-{address[1]}.cfg"
    config_path.write_text(config)
    stderr_path = directory / f"haproxy-{address[1]}.log"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [program, "-f", str(config_path), "-db"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    poll(
        "haproxy to listen or exit",
        lambda: address[1] in listening_ports(process.pid) or process.poll() is not None,
    )
    if process.poll() is not None:
        return stderr_path.read_text(errors="replace")
    return HAProxy(process, address, stderr_path)


@contextlib.contextmanager
def running_haproxy(
    backend: tuple[str, int],
    directory: Path,
    *,
    server_options: str = "send-proxy",
    host: str = "127.0.0.1",
    bind_options: str = "",
    source: str | None = None,
) -> Iterator[HAProxy]:
    """haproxy in front of `backend` with `server_options` ("send-proxy" for
    v1, "send-proxy-v2" for v2), listening on a free port of `host`, in the
    foreground (-db); killed when the block ends, its stderr printed if the
    block failed."""
    program = require_haproxy()
    proxy: HAProxy | str = ""
    for _ in range(_START_ATTEMPTS):
        port = free_port()
        config = haproxy_config((host, port), backend, server_options, source, bind_options)
        proxy = _start(program, config, (host, port), directory)
        if not isinstance(proxy, str) or "cannot bind socket" not in proxy:
            break
    if isinstance(proxy, str):
        pytest.fail(f"haproxy did not start:\n{proxy}")
    try:
        yield proxy
    except BaseException:
        print("--- haproxy's stderr ---")
        print(proxy.stderr()[-5000:])
        raise
    finally:
        proxy.stop()


def connect_from(source: str, address: tuple[str, int]) -> socket.socket:
    """A client connection to `address` from the local address `source`
    (any of 127.0.0.0/8 is this machine's), blocking with TIMEOUT."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(TIMEOUT)
        sock.bind((source, 0))
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock
