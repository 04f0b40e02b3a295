"""README.md, followed as a newcomer would: every code block, in page order,
on a copy of the repository, so that the page cannot drift from the program.

The page's blocks are read as they are shown, with a marker (an HTML comment
the rendered page does not show) just before a block, or standing alone,
where the block alone does not say how to run it:

- no marker, and the first line starts with `$ `: a session typed into real
  clients (`nc`, `telnet`, `ncat`, `openssl s_client`), one column per
  terminal, side by side; the rows are the order of events. A line of
  capitals (`USERNAME ana`, `NOT_A_COMMAND test`) is typed, `^C` in it is
  Ctrl-C; a `RECEIVE` or `ERROR` line is the server's, and the replies a
  terminal shows must be exactly its column's; any other line is the
  client's own (telnet's `Trying ...`) and must show up in its place. At
  the end each client leaves the way the page says: Ctrl-C, or telnet's
  Ctrl-] and `quit`.
- no marker, any other block: commands, typed line by line into one shell
  (the same shell all along, so `&` jobs and `kill %1` work as on the page),
  each of which must exit 0. A block whose lines do not start with a
  command the shell knows fails the check: mark it.
- `<!-- readme-check: server PORT... -->`: a command that keeps running, in
  a terminal of its own; the check goes on once every PORT is listening.
- `<!-- readme-check: background PORT... -->`: commands for the shell, like
  an unmarked block, that leave servers running in the background; the
  check goes on once every PORT is listening.
- `<!-- readme-check: stop -->`, standing alone where the page says to stop
  the last server started: Ctrl-C in its terminal, which must then exit 0.
  Servers still running at the end of the page are stopped the same way.
- `<!-- readme-check: output -->`: the next block is lines the terminal of
  the block before it must show, in any order (a log line's time stamp is
  any time; `...` stands for lines left out).
- `<!-- readme-check: file PATH -->`: the next block is a file's contents
  (a configuration, say), saved as PATH in the clone for the blocks after.
- `<!-- readme-check: skip (WHY) -->`: the next block is not run (it
  installs packages, is output, takes minutes...).
- `<!-- readme-check: skip section (WHY) -->`, just before a heading: no
  block of that section (up to the next heading of its level or above) is
  run.

The terminals are windows of one tmux server, which runs in network and
process namespaces of its own: the page's fixed ports (8080, 7379, ...) are
free there whatever runs on the machine, nothing outside is reached, and
whatever the page leaves running dies with the namespace. Every wait has a
deadline and waits for something it can see: a port listening (read from
/proc/net, without connecting), a log line of the server (`connected`,
`took the name`), a reply, an exit status.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from conftest import TIMEOUT, poll

HERE: Final = Path(__file__).resolve().parent
README: Final = HERE / "README.md"

# How long one command of the page may take (openssl's key, a server's start).
COMMAND_TIMEOUT: Final = 6 * TIMEOUT
MARKER: Final = re.compile(r"<!--\s*readme-check:\s*(.*?)\s*-->")
HEADING: Final = re.compile(r"(#{1,6}) ")
# A line the user types into a client: a command word in capitals.
TYPED: Final = re.compile(r"[A-Z][A-Z_]*( .*)?")
REPLY: Final = re.compile(r"(RECEIVE|ERROR) ")
# Shell builtins the page may use; any other first word must be on PATH.
BUILTINS: Final = frozenset({".", "source", "cd", "kill", "export", "wait", "echo"})


# --- The page, read --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Commands:
    """Lines for the shell; `ports`: servers they leave running."""

    line: int
    commands: tuple[str, ...]
    ports: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Server:
    """A command that keeps running in a terminal of its own."""

    line: int
    command: str
    ports: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Stop:
    """Ctrl-C in the terminal of the last server still running."""

    line: int


@dataclass(frozen=True, slots=True)
class Cell:
    """One line of one column of a session."""

    column: int
    text: str


@dataclass(frozen=True, slots=True)
class Session:
    """Clients side by side: their commands, then the rows of events."""

    line: int
    clients: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]


@dataclass(frozen=True, slots=True)
class Output:
    """Lines the terminal of the block before must show."""

    line: int
    lines: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class File:
    """A file's contents, saved in the clone under `path` as a reader would."""

    line: int
    path: str
    text: str


Step = Commands | Server | Stop | Session | Output | File


class PageError(Exception):
    """A block or a marker the check cannot follow, with its line."""


def page_items(lines: list[str]) -> Iterator[tuple[str, int, list[str]]]:
    """("heading" | "marker" | "block", line number, text) in page order; a
    block's text is its indented or fenced code, without the indent."""
    index = 0
    previous_blank = True
    while index < len(lines):
        line = lines[index]
        if HEADING.match(line) or MARKER.fullmatch(line.strip()):
            yield "heading" if HEADING.match(line) else "marker", index + 1, [line.strip()]
            previous_blank = False
            index += 1
        elif line.startswith("```"):
            end = index + 1
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            yield "block", index + 1, lines[index + 1 : end] or [""]
            index = end + 1
            previous_blank = False
        elif previous_blank and line.startswith("    ") and line.strip():
            end = index
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            while not lines[end - 1].strip():
                end -= 1
            yield "block", index + 1, [text[4:] for text in lines[index:end]]
            index = end
            previous_blank = False
        else:
            previous_blank = not line.strip()
            index += 1


def parse_ports(words: list[str], line: int) -> tuple[int, ...]:
    if not words or not all(word.isdigit() for word in words):
        raise PageError(f"line {line}: a server marker names its ports: {' '.join(words)!r}")
    return tuple(int(word) for word in words)


def parse_session(line: int, text: list[str]) -> Session:
    """Columns start where the first line has `$ ` after two spaces."""
    first = text[0]
    starts = [0, *sorted({m.end() for m in re.finditer(r" {2,}(?=\$ )", first)})]
    bounds = [*starts[1:], None]
    clients = tuple(first[a:b].strip()[2:] for a, b in zip(starts, bounds, strict=True))
    rows: list[tuple[Cell, ...]] = []
    for offset, row in enumerate(text[1:], start=1):
        cells = []
        for column, (a, b) in enumerate(zip(starts, bounds, strict=True)):
            if b is not None and len(row) > b and row[b - 1] != " ":
                raise PageError(f"line {line + offset}: a line crosses into the next column")
            if row[a:b].strip():
                cells.append(Cell(column, row[a:b].rstrip()))
        rows.append(tuple(cells))
    return Session(line, clients, tuple(rows))


def known_command(command: str) -> bool:
    words = command.split()
    return bool(words) and (words[0] in BUILTINS or shutil.which(words[0]) is not None)


def shell_commands(line: int, text: list[str]) -> tuple[str, ...]:
    """The block's commands, a line ending in `\\` joined to the next."""
    commands: list[str] = []
    pending = ""
    for row in text:
        pending += row + "\n"
        if not row.endswith("\\"):
            commands.append(pending.rstrip("\n"))
            pending = ""
    if pending:
        commands.append(pending.rstrip("\n"))
    for command in commands:
        if not known_command(command):
            raise PageError(
                f"line {line}: not a command the check knows how to run: {command!r};"
                " mark the block (see test_readme.py)"
            )
    return tuple(commands)


def read_page(markdown: str) -> list[Step]:
    """The steps the page asks for, in order; PageError for a block or a
    marker the check cannot follow."""
    steps: list[Step] = []
    marker: tuple[int, list[str]] | None = None  # waiting for its block or heading
    skipped_level = 0  # inside a skipped section of this heading level
    for kind, number, text in page_items(markdown.splitlines()):
        if kind == "heading":
            level = len(text[0]) - len(text[0].lstrip("#"))
            if skipped_level and level <= skipped_level:
                skipped_level = 0
            if marker is not None:
                if marker[1][:2] != ["skip", "section"]:
                    raise PageError(f"line {marker[0]}: a marker with no block after it")
                skipped_level, marker = level, None
            continue
        if kind == "marker":
            if marker is not None:
                raise PageError(f"line {marker[0]}: a marker with no block after it")
            found = MARKER.fullmatch(text[0])
            assert found is not None
            words = found.group(1).split()
            if words == ["stop"]:
                steps.append(Stop(number))
            elif re.fullmatch(r"skip (section )?\(.+\)", found.group(1)) or words == ["output"]:
                marker = (number, words)
            elif len(words) == 2 and words[0] == "file":
                if Path(words[1]).is_absolute() or ".." in Path(words[1]).parts:
                    raise PageError(f"line {number}: a file marker names a path in the clone")
                marker = (number, words)
            elif words[:1] in (["server"], ["background"]):
                parse_ports(words[1:], number)
                marker = (number, words)
            else:
                raise PageError(f"line {number}: unknown marker {text[0]!r}")
            continue
        if skipped_level:
            continue
        words = marker[1] if marker else []
        marker = None
        if words[:2] == ["skip", "section"]:
            raise PageError(f"line {number}: 'skip section' belongs just before a heading")
        if words[:1] == ["skip"]:
            continue
        if words == ["output"]:
            steps.append(Output(number, tuple(text)))
        elif words[:1] == ["file"]:
            steps.append(File(number, words[1], "\n".join(text) + "\n"))
        elif words[:1] == ["server"]:
            command, *more = shell_commands(number, text)
            if more:
                raise PageError(f"line {number}: a server block has one command")
            steps.append(Server(number, command, parse_ports(words[1:], number)))
        elif words[:1] == ["background"]:
            ports = parse_ports(words[1:], number)
            steps.append(Commands(number, shell_commands(number, text), ports))
        elif text[0].startswith("$ "):
            steps.append(parse_session(number, text))
        else:
            steps.append(Commands(number, shell_commands(number, text)))
    if marker is not None:
        raise PageError(f"line {marker[0]}: a marker with no block after it")
    return steps


# --- The terminals ----------------------------------------------------------------

# Terminal control sequences, stripped from what a window showed.
CONTROL: Final = re.compile(
    r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][0-9A-Za-z]|\x1b[=>]"
)
# Run inside the namespace, it waits until every port given is listening
# (state 0A in /proc/net), without connecting, so no server logs a client.
PROBE: Final = """\
import sys, time
ports = {int(port) for port in sys.argv[2:]}
deadline = time.monotonic() + float(sys.argv[1])
while True:
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[3] == "0A":
                    listening.add(int(fields[1].rsplit(":", 1)[1], 16))
    if ports <= listening:
        sys.exit(0)
    if time.monotonic() > deadline:
        sys.exit(f"not listening: {sorted(ports - listening)}")
    time.sleep(0.01)
"""


class Window:
    """One terminal: a bash in a tmux window, everything it shows logged."""

    def __init__(self, tmux: Tmux, name: str) -> None:
        self.tmux = tmux
        self.name = name
        self.log = tmux.directory / f"{name}.log"
        self.log.touch()
        tmux.run(
            "new-window", "-d", "-n", name, "-c", str(tmux.workdir), "bash --norc --noprofile -i"
        )
        tmux.run("pipe-pane", "-o", "-t", name, f"cat >> {shlex.quote(str(self.log))}")
        self.finished = 0  # commands whose exit status was collected
        assert self.status() == 0

    def shown(self) -> str:
        """What the window showed so far, without control sequences."""
        raw = self.log.read_bytes().decode("utf-8", "replace")
        return CONTROL.sub("", raw).replace("\r", "")

    def lines(self) -> list[str]:
        return self.shown().split("\n")

    def type(self, text: str, enter: bool = True) -> None:
        self.tmux.run("send-keys", "-t", self.name, "-l", text)
        if enter:
            self.key("Enter")

    def type_until_shown(self, text: str) -> None:
        """Type without Enter; return once the terminal echoed it."""
        shown = len(self.shown())
        self.type(text, enter=False)
        poll(f"{text!r} to show in {self.name}", lambda: text in self.shown()[shown:], TIMEOUT)

    def key(self, key: str) -> None:
        self.tmux.run("send-keys", "-t", self.name, key)

    def status(self, timeout: float = COMMAND_TIMEOUT) -> int:
        """The exit status of what the window's shell last ran, once it is
        back at its prompt."""
        self.finished += 1
        done = re.compile(rf"@@{self.finished}:(\d+)@@")
        self.type(f'echo "@@{self.finished}:$?@@"')
        poll(
            f"{self.name}'s shell to finish", lambda: done.search(self.shown()) is not None, timeout
        )
        found = done.search(self.shown())
        assert found is not None
        return int(found.group(1))

    def run(self, command: str) -> None:
        """Type a command (several lines if it has continuations), which
        must exit 0."""
        for row in command.split("\n"):
            self.type(row)
        status = self.status()
        assert status == 0, f"{command!r} exited {status}; {self.name} showed:\n{self.shown()}"


def unshare() -> list[str]:
    """New network and process namespaces; without root, in a user namespace."""
    command = ["unshare", "--net", "--pid", "--fork", "--kill-child"]
    return command if os.geteuid() == 0 else [*command, "--map-root-user"]


class Tmux:
    """A tmux server in network and process namespaces of its own."""

    def __init__(self, directory: Path, workdir: Path) -> None:
        self.directory = directory
        self.workdir = workdir
        self.socket = directory / "tmux.socket"
        # The shells' environment; the tmux commands too pass it, since a new
        # session takes its environment from the command that makes it.
        self.environment = {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(directory),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HISTFILE": "/dev/null",
            "PS1": "$ ",
            "TERM": "xterm",
        }
        server = (
            f"ip link set lo up && exec tmux -D -S {shlex.quote(str(self.socket))} -f /dev/null"
        )
        self.process = subprocess.Popen(
            [*unshare(), "sh", "-c", server], env=self.environment, stdin=subprocess.DEVNULL
        )
        poll("the tmux server", lambda: self.socket.exists() or self.process.poll() is not None)
        assert self.process.poll() is None, f"the namespaces' tmux exited {self.process.returncode}"
        self.run("new-session", "-d", "-s", "readme", "-x", "300", "-y", "50")
        self.windows = 0

    def run(self, *arguments: str) -> None:
        subprocess.run(
            ["tmux", "-S", str(self.socket), *arguments],
            env=self.environment,
            check=True,
            timeout=TIMEOUT,
        )

    def window(self, role: str) -> Window:
        self.windows += 1
        return Window(self, f"{self.windows}-{role}")

    def close(self) -> None:
        """Everything in the namespace dies with the tmux server, its init."""
        self.process.kill()
        self.process.wait(timeout=TIMEOUT)


# --- The newcomer -----------------------------------------------------------------

LOG_TIME: Final = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
CONNECTED: Final = re.compile(r"> connected( on the TLS port)?$", re.MULTILINE)


class Newcomer:
    """Follows the page's steps in its terminals."""

    def __init__(self, tmux: Tmux) -> None:
        self.tmux = tmux
        self.terminals: list[Window] = []
        self.shell = self.open("shell")
        self.probe = self.open("probe")
        (tmux.directory / "probe.py").write_text(PROBE)
        self.servers: list[Window] = []  # running, the last started last
        self.last = self.shell  # the terminal of the last commands run

    def open(self, role: str) -> Window:
        window = self.tmux.window(role)
        self.terminals.append(window)
        return window

    def count(self, pattern: re.Pattern[str]) -> int:
        """How often every terminal together showed `pattern`: the servers'
        logs are in their own terminals, or in the shell's for `&` jobs."""
        return sum(len(pattern.findall(window.shown())) for window in self.terminals)

    def after(self, pattern: re.Pattern[str], before: int, what: str) -> None:
        poll(what, lambda: self.count(pattern) > before, COMMAND_TIMEOUT)

    def listening(self, ports: tuple[int, ...]) -> None:
        probe = self.tmux.directory / "probe.py"
        # The probe gives up before the shell's wait does, to say which port.
        self.probe.run(f"python3 {probe} {2 * TIMEOUT} {' '.join(map(str, ports))}")

    def follow(self, step: Step) -> None:
        match step:
            case Commands(commands=commands, ports=ports):
                for command in commands:
                    self.shell.run(command)
                if ports:
                    self.listening(ports)
                self.last = self.shell
            case Server(command=command, ports=ports):
                server = self.open("server")
                server.type(command)
                self.servers.append(server)
                self.listening(ports)
                self.last = server
            case Stop():
                assert self.servers, "no server left to stop"
                self.stop(self.servers.pop())
            case Session():
                self.converse(step)
            case Output(lines=lines):
                self.expect_output(self.last, lines)
            case File():
                save(self.tmux.workdir, step)

    @staticmethod
    def expect_output(window: Window, lines: tuple[str, ...]) -> None:
        """Every line shows up in the window, in any order (two servers'
        logs interleave as they please), perhaps after a prompt; a log
        line's time stamp is any time; `...` stands for lines left out."""
        patterns = []
        for line in lines:
            stamp = LOG_TIME.match(line)
            if stamp is not None:
                patterns.append(LOG_TIME.pattern + re.escape(line[stamp.end() :]) + "$")
            elif line != "...":
                patterns.append(re.escape(line) + "$")
        poll(
            f"{lines} in {window.name}",
            lambda: all(re.search(pattern, window.shown(), re.MULTILINE) for pattern in patterns),
            COMMAND_TIMEOUT,
        )

    def stop(self, server: Window) -> None:
        """Ctrl-C, as the page says; a clean stop exits 0."""
        server.key("C-c")
        status = server.status()
        assert status == 0, f"stopped with Ctrl-C, it exited {status}:\n{server.shown()}"

    def converse(self, session: Session) -> None:
        """Each row in order: type what is typed, wait for what is shown."""
        clients: list[Window] = []
        for client in session.clients:
            window = self.open("client")
            before = self.count(CONNECTED)
            window.type(client)
            self.after(CONNECTED, before, f"the server to log {client!r}'s connection")
            clients.append(window)
        expected: list[list[str]] = [[] for _ in clients]
        seen = [0 for _ in clients]  # lines of each terminal already matched
        for index, row in enumerate(session.rows):
            for cell in row:
                window = clients[cell.column]
                if REPLY.match(cell.text):
                    expected[cell.column].append(cell.text)
                    self.expect_replies(window, expected[cell.column])
                elif TYPED.fullmatch(cell.text):
                    self.type_line(window, cell.text, self.refused(session, index, cell))
                else:
                    seen[cell.column] = self.expect_line(window, cell.text, seen[cell.column])
        for window, replies in zip(clients, expected, strict=True):
            assert replies_of(window) == replies, f"{window.name} showed:\n{window.shown()}"
        for window, client in zip(clients, session.clients, strict=True):
            self.leave(window, client)

    @staticmethod
    def refused(session: Session, index: int, cell: Cell) -> bool:
        """Whether the next line of this column is an ERROR: the typed line's answer."""
        for row in session.rows[index + 1 :]:
            for later in row:
                if later.column == cell.column:
                    return later.text.startswith("ERROR ")
        return False

    def type_line(self, window: Window, text: str, refused: bool) -> None:
        """Type a line, `^C` as Ctrl-C once what comes before it shows; a
        name taken is waited for in the server's log."""
        *parts, last = text.split("^C")
        for part in parts:
            # Ctrl-C flushes what the terminal has not echoed yet: a person
            # sees the text before pressing it.
            window.type_until_shown(part)
            window.key("C-c")
        name = re.fullmatch(r"USERNAME (\S+)", last)
        if name is None or refused:
            window.type(last)
            return
        took = re.compile(rf"took the name {re.escape(repr(name.group(1)))}")
        before = self.count(took)
        window.type(last)
        self.after(took, before, f"the server to log {last!r}")

    @staticmethod
    def expect_replies(window: Window, replies: list[str]) -> None:
        poll(
            f"{replies[-1]!r} in {window.name}",
            lambda: len(replies_of(window)) >= len(replies),
            COMMAND_TIMEOUT,
        )
        shown = replies_of(window)[: len(replies)]
        assert shown == replies, f"{window.name} showed:\n{window.shown()}"

    @staticmethod
    def expect_line(window: Window, text: str, start: int) -> int:
        """Wait for a line of the client's own; where it was, plus one."""

        def found() -> int | None:
            lines = window.lines()
            return next((i for i in range(start, len(lines) - 1) if lines[i] == text), None)

        poll(f"{text!r} in {window.name}", lambda: found() is not None, COMMAND_TIMEOUT)
        index = found()
        assert index is not None
        return index + 1

    def leave(self, window: Window, client: str) -> None:
        """As the page says: telnet's Ctrl-] then quit, Ctrl-C elsewhere."""
        if client.startswith("telnet "):
            window.key("C-]")
            poll("telnet's prompt", lambda: window.shown().endswith("telnet> "), TIMEOUT)
            window.type("quit")
        else:
            window.key("C-c")
        window.status()

    def screens(self) -> str:
        """The last lines every terminal showed, for a failure's message."""
        return "".join(
            f"\n--- {window.name}:\n" + "\n".join(window.lines()[-30:]) for window in self.terminals
        )

    def finish(self) -> None:
        """The servers the page left running stop with Ctrl-C, last first."""
        while self.servers:
            self.stop(self.servers.pop())


def save(workdir: Path, file: File) -> None:
    """Save a file block in the clone, its folders made as needed."""
    target = workdir / file.path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(file.text)


def replies_of(window: Window) -> list[str]:
    return [line for line in window.lines() if REPLY.match(line)]


# --- Reading the page -------------------------------------------------------------


def test_unmarked_blocks_are_commands_or_sessions() -> None:
    """An unmarked block is commands for the shell, or a session when it starts with `$ `."""
    page = "Run:\n\n    python3 chat.py --help\n\nThen:\n\n    $ nc localhost 8080\n    SEND x\n"
    assert read_page(page) == [
        Commands(3, ("python3 chat.py --help",)),
        Session(7, ("nc localhost 8080",), ((Cell(0, "SEND x"),),)),
    ]


def test_an_unmarked_block_of_output_fails_the_check() -> None:
    """A block that is not commands (output, a file) needs a marker, or the check fails."""
    with pytest.raises(PageError, match="line 3: not a command"):
        read_page("Errors:\n\n    ERROR Username cannot be empty.\n")
    marked = "Errors:\n\n<!-- readme-check: skip (output) -->\n\n    ERROR Username is too long.\n"
    assert read_page(marked) == []


def test_markers_say_how_to_run_a_block() -> None:
    """server and background name their ports; stop stands alone; a `\\` joins two lines."""
    page = """\
<!-- readme-check: server 8080 8443 -->

    python3 chat.py 8080 --tls-port 8443

<!-- readme-check: stop -->

<!-- readme-check: background 9001 -->

    python3 chat.py 9001 &
    kill \\
        %1

<!-- readme-check: output -->

    INFO stopped

<!-- readme-check: file etc/chat.toml -->

    port = 8080
    # a comment
"""
    assert read_page(page) == [
        Server(3, "python3 chat.py 8080 --tls-port 8443", (8080, 8443)),
        Stop(5),
        Commands(9, ("python3 chat.py 9001 &", "kill \\\n    %1"), (9001,)),
        Output(15, ("INFO stopped",)),
        File(19, "etc/chat.toml", "port = 8080\n# a comment\n"),
    ]


@pytest.mark.parametrize(
    "page",
    [
        "<!-- readme-check: skip -->\n\n    true\n",  # no reason
        "<!-- readme-check: server -->\n\n    true\n",  # no port
        "<!-- readme-check: run -->\n\n    true\n",  # no such marker
        "<!-- readme-check: skip (why) -->\n\nText.\n",  # no block after it
        "<!-- readme-check: skip section (why) -->\n\n    true\n",  # not before a heading
        "<!-- readme-check: server 8080 -->\n\n    true\n    true\n",  # two commands
        "<!-- readme-check: file /etc/chat.toml -->\n\n    port = 1\n",  # outside the clone
        "<!-- readme-check: file ../chat.toml -->\n\n    port = 1\n",  # outside the clone
    ],
)
def test_a_marker_the_check_cannot_follow_fails_it(page: str) -> None:
    """A misspelt or misplaced marker fails the check rather than skip a block quietly."""
    with pytest.raises(PageError):
        read_page(page)


def test_skip_section_skips_to_the_next_heading_of_its_level() -> None:
    """`skip section` covers the section's subsections, up to a heading of its level or above."""
    page = """\
<!-- readme-check: skip section (slow) -->

## Performance

    python3 bench.py

### Cluster mode

    python3 bench.py --cluster 2

## Limits

    python3 chat.py --help
"""
    assert read_page(page) == [Commands(13, ("python3 chat.py --help",))]


def test_a_file_block_is_saved_in_the_clone(tmp_path: Path) -> None:
    """A `file` block is saved under its path in the clone, folders and all."""
    (step,) = read_page("<!-- readme-check: file etc/chat.toml -->\n\n    port = 8080\n")
    assert isinstance(step, File)
    save(tmp_path, step)
    assert (tmp_path / "etc" / "chat.toml").read_text() == "port = 8080\n"


def test_session_columns_start_at_each_dollar() -> None:
    """A session's columns start at each `$ ` of its first line; a line may not cross them."""
    session = parse_session(
        1, ["$ nc a       $ telnet b", "USERNAME x   Trying ...", "             RECEIVE x hi"]
    )
    assert session.clients == ("nc a", "telnet b")
    assert session.rows == (
        (Cell(0, "USERNAME x"), Cell(1, "Trying ...")),
        (Cell(1, "RECEIVE x hi"),),
    )
    with pytest.raises(PageError, match="crosses"):
        parse_session(1, ["$ nc a       $ telnet b", "USERNAME xxxxxxxxx"])


# --- The check --------------------------------------------------------------------


def copy_of_repository(destination: Path) -> Path:
    """The tracked files as they are in the working tree (committed or
    not), as a fresh clone would have them, plus nothing else."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=HERE, capture_output=True, check=True, timeout=TIMEOUT
    )
    for name in listed.stdout.decode().split("\0"):
        source = HERE / name
        if name and source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def missing_tools() -> list[str]:
    tools = ["tmux", "unshare", "ip", "nc", "telnet", "ncat", "openssl", "curl", "redis-server"]
    return [tool for tool in tools if shutil.which(tool) is None]


def test_readme_in_page_order() -> None:
    """README.md's blocks, in page order, on a copy of the repository, do what the page shows."""
    missing = missing_tools()
    if missing and not os.environ.get("CI"):
        pytest.skip(f"needs {', '.join(missing)} (see the README's Set-up)")
    works = subprocess.run([*unshare(), "true"], capture_output=True, timeout=TIMEOUT, check=False)
    if works.returncode != 0 and not os.environ.get("CI"):
        pytest.skip(f"needs namespaces (root, or user namespaces): {works.stderr.decode()}")
    steps = read_page(README.read_text())
    with tempfile.TemporaryDirectory(prefix="readme-check-") as name:
        directory = Path(name)
        workdir = copy_of_repository(directory / "chat")
        tmux = Tmux(directory, workdir)
        try:
            newcomer = Newcomer(tmux)
            for step in steps:
                try:
                    newcomer.follow(step)
                except AssertionError as error:
                    raise AssertionError(
                        f"README.md line {step.line}: {error}{newcomer.screens()}"
                    ) from error
            newcomer.finish()
        finally:
            tmux.close()
