"""The web port's HTTP without I/O: a request head in, the answer's bytes out.

The web port (PROTOCOL.md, "People in a web browser") answers one request
per connection: `GET /` gets the page (chat.html, served with a CSP that
allows only its own inline style and script), `GET /chat` with a valid
WebSocket handshake gets `101 Switching Protocols` and becomes a member
of the room, and everything else gets its status and is closed.

`parse_request` reads the bytes received so far and says whether a whole
head is there; `respond` decides what a request gets. Both are total: any
bytes are a value, never an exception. The frames after a 101 are
websocket.py's.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# PROTOCOL.md: a request whose headers pass 8 KiB gets a 431. Counted over
# the whole head, request line and blank line included.
MAX_HEAD_BYTES: Final = 8 * 1024
# PROTOCOL.md: a request not finished within 10 s is closed (the reactor's timer).
REQUEST_TIMEOUT: Final = 10.0
# RFC 6455, 1.3: appended to the client's key before hashing it.
_WEBSOCKET_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PAGE_PATH: Final = "/"
CHAT_PATH: Final = "/chat"


@dataclass(frozen=True, slots=True)
class Incomplete:
    """No whole request head yet, and still within the limit: read more."""


INCOMPLETE: Final = Incomplete()


@dataclass(frozen=True, slots=True)
class Request:
    """A well-formed request head."""

    method: str
    target: str  # as sent: origin-form, "/path?query"
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    headers: dict[str, str]  # lower-case names; a repeated field's values joined by ", "
    size: int  # bytes of the head, blank line included; what follows is not HTTP


@dataclass(frozen=True, slots=True)
class Respond:
    """Send `response`, then close: the web port answers one request per
    connection."""

    status: int
    response: bytes


@dataclass(frozen=True, slots=True)
class Upgrade:
    """Send `response` (the 101); from then on the connection speaks
    WebSocket and is a client of the room."""

    response: bytes


_REASONS: Final = {
    101: "Switching Protocols",
    200: "OK",
    304: "Not Modified",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def _response(status: int, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _error(status: int, extra: list[tuple[str, str]] | None = None) -> Respond:
    body = f"{status} {_REASONS[status]}\n".encode()
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        ("X-Content-Type-Options", "nosniff"),
        *(extra or []),
    ]
    return Respond(status, _response(status, headers, body))


BAD_REQUEST: Final = _error(400)
FORBIDDEN: Final = _error(403)
NOT_FOUND: Final = _error(404)
# RFC 6455 4.4: say which version the server speaks; RFC 9110 15.5.22: a
# 426 names the protocol to upgrade to.
UPGRADE_REQUIRED: Final = _error(426, [("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")])
HEAD_TOO_LARGE: Final = _error(431)
SERVICE_UNAVAILABLE: Final = _error(503)

# RFC 9112: the head ends at the first empty line; a bare "\n" may end a line.
_HEAD_END: Final = re.compile(rb"\n\r?\n")
# RFC 9110 5.6.2's token, and RFC 9112 3's request line (origin-form
# targets only: a browser sends nothing else to a server that is not a proxy).
_TOKEN: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE: Final = re.compile(rb"(" + _TOKEN + rb") (/[\x21-\x7e]*) HTTP/1\.([01])")
# RFC 9112 5: no space before the colon, no line folding; a value is
# visible ASCII, obs-text, spaces and tabs.
_FIELD_LINE: Final = re.compile(rb"(" + _TOKEN + rb"):([\x21-\x7e\x80-\xff \t]*)")


def parse_request(buffer: bytes) -> Incomplete | Request | Respond:
    """What the bytes received so far on a web connection hold: not a whole
    head yet, a request, or a 400 or 431 to answer with and close."""
    end = _HEAD_END.search(buffer, 0, MAX_HEAD_BYTES)
    if end is None:
        # Past MAX_HEAD_BYTES, no blank line can end the head in time.
        return HEAD_TOO_LARGE if len(buffer) >= MAX_HEAD_BYTES else INCOMPLETE
    lines = buffer[: end.start()].split(b"\n")
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    request_line = _REQUEST_LINE.fullmatch(lines[0])
    if request_line is None:
        return BAD_REQUEST
    headers: dict[str, str] = {}
    for line in lines[1:]:
        field = _FIELD_LINE.fullmatch(line)
        if field is None:
            return BAD_REQUEST
        name = field[1].decode("ascii").lower()
        value = field[2].strip(b" \t").decode("latin-1")
        if name in headers:
            if name == "host":
                return BAD_REQUEST  # RFC 9112 3.2: exactly one Host
            value = headers[name] + ", " + value
        headers[name] = value
    if request_line[3] == b"1" and "host" not in headers:
        return BAD_REQUEST  # RFC 9112 3.2: an HTTP/1.1 request without Host
    method, target = request_line[1].decode("ascii"), request_line[2].decode("ascii")
    return Request(method, target, "HTTP/1." + chr(request_line[3][0]), headers, end.end())


def _lower(values: Collection[str]) -> set[str]:
    return {value.lower() for value in values}


def _tokens(value: str) -> set[str]:
    return {token.strip().lower() for token in value.split(",")}


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for the client's Sec-WebSocket-Key (RFC 6455, 4.2.2)."""
    digest = hashlib.sha1(key.encode("latin-1") + _WEBSOCKET_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def valid_key(key: str) -> bool:
    """Whether `key` is the base64 of 16 bytes, as RFC 6455 4.1 says it is."""
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:  # binascii.Error is one; so is a key that is not ASCII
        return False


def respond(
    request: Request, origins: Collection[str] = (), full: bool = False
) -> Respond | Upgrade:
    """What `request` gets: the page, the WebSocket upgrade, or an error.

    `origins`: the --web-origin values, in any case; empty means any, and a
    request without Origin is always let in. `full`: the door is over one
    of its limits, so a page request gets a 503 (a WebSocket is upgraded
    anyway, to be told why in its own terms, then closed with 1008).
    """
    path = request.target.partition("?")[0]
    headers = request.headers
    if request.method in ("GET", "HEAD") and path == PAGE_PATH:
        if full:
            return SERVICE_UNAVAILABLE
        if PAGE_ETAG in _tokens(headers.get("if-none-match", "")):
            return _NOT_MODIFIED
        return _PAGE_HEAD if request.method == "HEAD" else _PAGE
    if request.method != "GET" or path != CHAT_PATH:
        return NOT_FOUND
    if "websocket" not in _tokens(headers.get("upgrade", "")):
        return NOT_FOUND  # a plain GET /chat is not a handshake: "anything else"
    if request.version != "HTTP/1.1" or "upgrade" not in _tokens(headers.get("connection", "")):
        return BAD_REQUEST  # RFC 6455 4.1: HTTP/1.1 (so a Host), Connection: Upgrade
    if headers.get("sec-websocket-version", "").strip() != "13":
        return UPGRADE_REQUIRED
    key = headers.get("sec-websocket-key", "").strip()
    if not valid_key(key):
        return BAD_REQUEST
    origin = headers.get("origin")
    if origins and origin is not None and origin.strip().lower() not in _lower(origins):
        return FORBIDDEN
    return Upgrade(
        _response(
            101,
            [
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Accept", accept_key(key)),
            ],
        )
    )


# --- The page ------------------------------------------------------------------

PAGE: Final = Path(__file__).with_name("chat.html").read_bytes()


def _inline_hashes(tag: str) -> list[str]:
    """CSP source expressions for each inline <tag> block of the page: the
    sha256 of exactly the text between its tags (CSP3, 'hash-source')."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>".encode(), PAGE, re.DOTALL)
    return [
        "'sha256-" + base64.b64encode(hashlib.sha256(block).digest()).decode() + "'"
        for block in blocks
    ]


# Nothing from anywhere: only the page's own inline style and script, by
# hash, and a connection to its own origin ('self' covers ws: and wss: on
# the same host and port in CSP3). No frames, forms or <base> either.
CSP: Final = "; ".join(
    [
        "default-src 'none'",
        "style-src " + " ".join(_inline_hashes("style")),
        "script-src " + " ".join(_inline_hashes("script")),
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
# The page changes only with the server: a browser may keep it, but asks
# each time whether it is still this one (If-None-Match gets a 304).
PAGE_ETAG: Final = '"' + hashlib.sha256(PAGE).hexdigest()[:32] + '"'
_PAGE_HEADERS: Final = [
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
    ("ETag", PAGE_ETAG),
    ("Connection", "close"),
]


def page_response(head_only: bool = False) -> bytes:
    """The 200 that carries the page (without its body for a HEAD)."""
    headers = [
        ("Content-Type", "text/html; charset=utf-8"),
        ("Content-Length", str(len(PAGE))),
        *_PAGE_HEADERS,
    ]
    return _response(200, headers, b"" if head_only else PAGE)


_PAGE: Final = Respond(200, page_response())
_PAGE_HEAD: Final = Respond(200, page_response(head_only=True))
_NOT_MODIFIED: Final = Respond(304, _response(304, _PAGE_HEADERS))
