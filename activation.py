"""Socket activation, systemd's protocol (sd_listen_fds(3)): the service
manager binds the ports, then starts the program with the listening sockets
as descriptors 3, 4, ... and says so in LISTEN_FDS (how many), LISTEN_PID
(for which process: a child that inherits the variables must not take the
sockets) and LISTEN_FDNAMES (their names, colon-separated: `chat`, `tls`,
`web` or `metrics`; one socket without a name is the chat port). So the
server can serve port 80 or 443 without ever running as root.

`listen_fds` reads the variables (a mapping and a pid in, names to
descriptors or a problem out); `take_sockets` is the little that touches
the process: it reads os.environ, unsets the variables (as sd_listen_fds
does when told to) and wraps each descriptor in a non-blocking socket.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Final

# sd-daemon.h: the first passed descriptor, after stdin, stdout and stderr.
SD_LISTEN_FDS_START: Final = 3
NAMES: Final = ("chat", "tls", "web", "metrics")
VARIABLES: Final = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
# What systemd-socket-activate and sd_listen_fds_with_names call a socket
# that was given no name.
_UNNAMED: Final = frozenset({"", "unknown"})


@dataclass(frozen=True, slots=True)
class ActivationProblem:
    """Sockets were passed, but not in a way the server can use: one line."""

    message: str


def listen_fds(environ: Mapping[str, str], pid: int) -> dict[str, int] | ActivationProblem:
    """The sockets passed to process `pid`, by name (`chat`, `tls`, `web`,
    `metrics`), from the variables in `environ`: none when LISTEN_FDS or
    LISTEN_PID is unset or LISTEN_PID is another process's."""
    count_text = environ.get("LISTEN_FDS")
    pid_text = environ.get("LISTEN_PID")
    if count_text is None or pid_text is None:
        return {}
    if not pid_text.strip().isdecimal():
        return ActivationProblem(f"LISTEN_PID is not a process id: {pid_text!r}")
    if int(pid_text) != pid:
        return {}  # meant for the process that started us
    if not count_text.strip().isdecimal():
        return ActivationProblem(f"LISTEN_FDS is not a number: {count_text!r}")
    count = int(count_text)
    names_text = environ.get("LISTEN_FDNAMES")
    names = [""] * count if names_text is None else names_text.split(":")
    if count == 0:
        return {}
    if len(names) != count:
        return ActivationProblem(
            f"LISTEN_FDNAMES names {len(names)} sockets, LISTEN_FDS passes {count}: {names_text!r}"
        )
    if count == 1 and names[0] in _UNNAMED:
        names = ["chat"]
    fds: dict[str, int] = {}
    for offset, name in enumerate(names):
        if name in _UNNAMED:
            return ActivationProblem(
                f"{count} sockets passed and one has no name: name each one of "
                f"{', '.join(NAMES)} (FileDescriptorName=)"
            )
        if name not in NAMES:
            return ActivationProblem(
                f"a socket named {name!r} was passed: the names are {', '.join(NAMES)}"
            )
        if name in fds:
            return ActivationProblem(f"two sockets named {name!r} were passed")
        fds[name] = SD_LISTEN_FDS_START + offset
    return fds


def take_sockets(
    environ: MutableMapping[str, str] | None = None,
) -> dict[str, socket.socket] | ActivationProblem:
    """The listening sockets systemd passed to this process, by name, each
    non-blocking and not inherited by children; the variables are unset
    (from `environ`, default os.environ) either way, so that no child
    process takes them for its own."""
    if environ is None:
        environ = os.environ
    fds = listen_fds(environ, os.getpid())
    for variable in VARIABLES:
        environ.pop(variable, None)
    if isinstance(fds, ActivationProblem):
        return fds
    sockets: dict[str, socket.socket] = {}
    for name, fd in fds.items():
        try:
            sock = socket.socket(fileno=fd)
        except OSError as error:
            return ActivationProblem(f"socket {name!r} (descriptor {fd}): {error.strerror}")
        sockets[name] = sock
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.type != socket.SOCK_STREAM or not listening:
            return ActivationProblem(
                f"socket {name!r} (descriptor {fd}) is not a listening TCP socket "
                "(ListenStream= in the .socket unit, Accept=no)"
            )
        sock.setblocking(False)
        sock.set_inheritable(False)
    return sockets
