"""The settings file (--config FILE): TOML holding any of the program's
options by their own names (`port = 8080`, `max-clients = 100`), read
through the argparse parser itself, so the file and the command line share
one table of names and one set of rules. Nothing here touches the server:
`read_settings` turns a file into values or one line saying what is wrong
with it, `given_on_command_line` tells which options the command line set
(those win over the file, also after a reload), and `changes` sorts what a
reload changed into what the running server can take and what needs a
restart.
"""

from __future__ import annotations

import argparse
import re
import tomllib
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

# PROTOCOL.md, "The program": what SIGHUP applies to what comes next.
# Keys the parser does not have (yet) are skipped, so a new live setting is
# one name here and one keyword of ChatServer.apply_limits.
LIVE_SETTINGS: Final = (
    "max-clients",
    "max-per-address",
    "register-timeout",
    "output-limit",
    "output-budget",
    "keepalive",
    "send-rate",
    "send-burst",
    "log-level",
)
# Options that make no sense in the file: --config naming another file,
# and --help.
_NOT_SETTINGS: Final = frozenset({"config", "help"})

# A repeatable option (--proxy-protocol) is an array of strings.
Kind = type[bool] | type[int] | type[float] | type[str] | type[list[str]]
_KIND_NAMES: Final[dict[Kind, str]] = {
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    str: "a string",
    list: "an array of strings",
}


@dataclass(frozen=True, slots=True)
class Setting:
    """One option as a key of the file: where argparse keeps it (`dest`),
    the TOML kind it takes, and the option's own check (`check`, the
    argparse type; None for plain strings and switches)."""

    key: str
    dest: str
    kind: Kind
    check: Callable[[str], object] | None
    default: object


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """Why a settings file cannot be used, as one line for the operator."""

    message: str


def setting_table(parser: argparse.ArgumentParser) -> dict[str, Setting]:
    """Every option of `parser` as a settings-file key: `--max-clients` is
    `max-clients`, the positional PORT is `port`."""
    table = {}
    for action in parser._actions:
        if action.option_strings:
            long_options = [name for name in action.option_strings if name.startswith("--")]
            key = long_options[0].removeprefix("--")
        else:
            key = action.dest
        if key in _NOT_SETTINGS:
            continue
        table[key] = Setting(key, action.dest, _kind(action), action.type, action.default)  # type: ignore[arg-type]
    return table


def _kind(action: argparse.Action) -> Kind:
    if isinstance(action, argparse._StoreTrueAction):
        return bool
    if isinstance(action, argparse._AppendAction):
        return list
    if action.type is None:
        return str
    # The check's own return annotation: _port says int, _redis_timeout float.
    returns = typing.get_type_hints(action.type).get("return", str)
    return returns if returns in (int, float, str) else str


# Not None, not a string (argparse would run the option's type on a string
# default): marks an option the command line did not give.
_ABSENT: Final = object()


def given_on_command_line(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> dict[str, object]:
    """The options `argv` gives, by dest, and their values: `parser` (a
    fresh one: its defaults are changed) parses it with every default
    taken out."""
    repeatable = set()
    for action in parser._actions:
        if isinstance(action, argparse._AppendAction):
            # argparse appends to the default: None stands for absent here.
            action.default = None
            repeatable.add(action.dest)
        else:
            action.default = _ABSENT
    given = vars(parser.parse_args(argv))
    return {
        dest: value
        for dest, value in given.items()
        if value is not _ABSENT and not (dest in repeatable and value is None)
    }


def parse_settings(
    text: str, source: str, table: Mapping[str, Setting]
) -> dict[str, object] | ConfigProblem:
    """The settings `text` (the TOML of file `source`) holds, by dest; or
    the first problem, naming `source`, the key and its line."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        return ConfigProblem(f"{source}: not valid TOML: {error}")
    settings: dict[str, object] = {}
    for key, value in document.items():
        where = _where(source, text, key)
        setting = table.get(key)
        if setting is None:
            return ConfigProblem(f"{where}: unknown setting {key!r} (see chat.py --help)")
        checked = _check(setting, value)
        if isinstance(checked, ConfigProblem):
            return ConfigProblem(f"{where}: {key}: {checked.message}")
        settings[setting.dest] = checked
    return settings


def _check(setting: Setting, value: object) -> object:
    """`value` as the option's own check takes it, or the problem."""
    kind = setting.kind
    if kind is list:
        return _check_each(setting, value)
    # bool is an int to Python, not to TOML; an int is a fine float.
    fits = (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))) or (
        kind is float and isinstance(value, int) and not isinstance(value, bool)
    )
    if not fits:
        return ConfigProblem(f"must be {_KIND_NAMES[kind]}, not {_describe(value)}")
    if setting.check is None:
        return value
    try:
        return setting.check(str(value))
    except (argparse.ArgumentTypeError, ValueError) as error:
        return ConfigProblem(str(error))


def _check_each(setting: Setting, value: object) -> object:
    """An array of strings, each as the repeatable option's check takes it."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        return ConfigProblem(f"must be {_KIND_NAMES[list]}, not {_describe(value)}")
    checked = []
    for item in value:
        try:
            checked.append(item if setting.check is None else setting.check(item))
        except (argparse.ArgumentTypeError, ValueError) as error:
            return ConfigProblem(str(error))
    return checked


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"  # dates and times


def _where(source: str, text: str, key: str) -> str:
    """`source` and the line that sets `key` (`key = `, `"key" = `, a
    dotted `key.x = ` or a table `[key]`), where there is one."""
    quoted = re.escape(key)
    pattern = re.compile(
        rf"^\s*(?:(?:{quoted}|\"{quoted}\"|'{quoted}')\s*[=.]|\[+\s*(?:{quoted}|\"{quoted}\")\s*[\].])"
    )
    for number, line in enumerate(text.split("\n"), start=1):
        if pattern.match(line):
            return f"{source}, line {number}"
    return source


def read_settings(path: str, table: Mapping[str, Setting]) -> dict[str, object] | ConfigProblem:
    """The settings in file `path` (see `parse_settings`)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        return ConfigProblem(f"{path}: cannot read it: {error.strerror or error}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        return ConfigProblem(f"{path}: not valid TOML: not UTF-8 (byte {error.start})")
    return parse_settings(text, path, table)


def merge(
    table: Mapping[str, Setting], from_file: Mapping[str, object], given: Mapping[str, object]
) -> dict[str, object]:
    """Every setting by dest: the command line's, else the file's, else the
    default."""
    merged = {setting.dest: setting.default for setting in table.values()}
    merged.update(from_file)
    merged.update(given)
    return merged


@dataclass(frozen=True, slots=True)
class Changes:
    """What a reload changed: the live settings' new values (by dest), and
    the keys of the others, which need a restart."""

    live: dict[str, object]
    need_restart: list[str]


def changes(
    table: Mapping[str, Setting], old: Mapping[str, object], new: Mapping[str, object]
) -> Changes:
    live: dict[str, object] = {}
    need_restart = []
    for key, setting in table.items():
        dest = setting.dest
        if old.get(dest) == new.get(dest):
            continue
        if key in LIVE_SETTINGS:
            live[dest] = new.get(dest)
        else:
            need_restart.append(key)
    return Changes(live, need_restart)
