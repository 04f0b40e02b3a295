"""Tests for web.py, the web port's HTTP without I/O, and for chat.html.

PROTOCOL.md's "People in a web browser" gives the statuses; RFC 6455 the
handshake, which wsproto's client checks independently; the page's CSP is
checked against hashes computed here with the standard library's HTML
parser, not web.py's.
"""

from __future__ import annotations

import base64
import hashlib
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Final

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection
from wsproto.events import Request as WsprotoRequest

import web
from web import INCOMPLETE, Incomplete, Request, Respond, Upgrade, parse_request, respond

MAX_HEAD: Final = 8 * 1024  # PROTOCOL.md: headers past 8 KiB get a 431
PAGE_FILE: Final = Path(__file__).with_name("chat.html")
# RFC 6455 section 1.3's example key and its accept value.
RFC_KEY: Final = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT: Final = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def head(request_line: str = "GET /chat HTTP/1.1", **fields: str) -> bytes:
    """A request head; `fields` named with "_" for "-" (sec_websocket_key)."""
    lines = [request_line] + [f"{name.replace('_', '-')}: {v}" for name, v in fields.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


HANDSHAKE: Final = {
    "Host": "chat.example",
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec_WebSocket_Key": RFC_KEY,
    "Sec_WebSocket_Version": "13",
}


def answer(data: bytes, origins: tuple[str, ...] = (), full: bool = False) -> Respond | Upgrade:
    """What a connection that sent `data` gets."""
    request = parse_request(data)
    assert isinstance(request, Request | Respond), request
    return request if isinstance(request, Respond) else respond(request, origins, full)


def status(data: bytes, origins: tuple[str, ...] = (), full: bool = False) -> int:
    result = answer(data, origins, full)
    return 101 if isinstance(result, Upgrade) else result.status


def response_headers(response: bytes) -> dict[str, str]:
    head_text = response.partition(b"\r\n\r\n")[0].decode("latin-1")
    fields = (line.partition(": ") for line in head_text.split("\r\n")[1:])
    return {name.lower(): value for name, _, value in fields}


# --- The request head ------------------------------------------------------------


def test_a_request_head_is_parsed() -> None:
    """Method, target, lower-cased headers and the head's size, up to the blank line."""
    data = head("GET /chat?x=1 HTTP/1.1", Host="h", X_Two="a") + b"frames"
    request = parse_request(data)
    expected = Request("GET", "/chat?x=1", "HTTP/1.1", {"host": "h", "x-two": "a"}, len(data) - 6)
    assert request == expected


def test_every_prefix_of_a_head_is_incomplete() -> None:
    """Until its blank line arrives, a head is incomplete, however it was cut."""
    data = head(**HANDSHAKE)
    for end in range(len(data)):
        assert parse_request(data[:end]) is INCOMPLETE
    assert isinstance(parse_request(data), Request)


def test_bare_newlines_end_lines_and_repeated_fields_are_joined() -> None:
    """A head ending its lines in "\\n" alone reads the same; repeated fields join with ", "."""
    data = b"GET / HTTP/1.1\nHost: h\nConnection: keep-alive\nConnection:  Upgrade \n\n"
    request = parse_request(data)
    assert isinstance(request, Request)
    assert request.headers == {"host": "h", "connection": "keep-alive, Upgrade"}


@given(st.binary(max_size=2 * MAX_HEAD))
def test_any_bytes_are_a_value(data: bytes) -> None:
    """Any bytes are incomplete, a request, or a 400 or 431: never an exception."""
    result = parse_request(data)
    assert isinstance(result, Incomplete | Request) or result.status in (400, 431)
    if isinstance(result, Request):
        assert not isinstance(respond(result), Exception)


@given(st.binary(max_size=200).filter(lambda data: b"\n" not in data))
def test_garbage_with_a_blank_line_is_a_400(garbage: bytes) -> None:
    """Random bytes for a request line are a 400 (unless they happen to be one)."""
    result = parse_request(garbage + b"\r\n\r\n")
    assert isinstance(result, Request) or result == web.BAD_REQUEST


def test_a_head_of_exactly_8_kib_is_read_and_one_byte_more_is_a_431() -> None:
    """8 KiB of head, blank line included, is allowed; 8 KiB + 1 is a 431."""
    base = head("GET / HTTP/1.1", Host="h", X_Pad="")
    fits = head("GET / HTTP/1.1", Host="h", X_Pad="p" * (MAX_HEAD - len(base)))
    assert len(fits) == MAX_HEAD
    assert isinstance(parse_request(fits), Request)
    over = head("GET / HTTP/1.1", Host="h", X_Pad="p" * (MAX_HEAD - len(base) + 1))
    assert parse_request(over) == web.HEAD_TOO_LARGE
    assert web.HEAD_TOO_LARGE.status == 431


def test_an_unfinished_head_is_a_431_once_it_passes_8_kib() -> None:
    """Without its blank line, a head is incomplete below 8 KiB and a 431 from there."""
    start = b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad: "
    assert parse_request(start.ljust(MAX_HEAD - 1, b"p")) is INCOMPLETE
    assert parse_request(start.ljust(MAX_HEAD, b"p")) == web.HEAD_TOO_LARGE
    assert parse_request(start.ljust(100 * MAX_HEAD, b"p")) == web.HEAD_TOO_LARGE
    # The first byte of the blank line inside the limit, the second past it.
    assert parse_request(start.ljust(MAX_HEAD - 1, b"p") + b"\n\n") == web.HEAD_TOO_LARGE


@pytest.mark.parametrize(
    "data",
    [
        b"\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\nHost: h\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET / HTTP/2.0\r\nHost: h\r\n\r\n",
        b"GET / HTTP/1.2\r\nHost: h\r\n\r\n",
        b"GET / http/1.1\r\nHost: h\r\n\r\n",
        b"GET chat HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
        b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /\xff HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nNo colon\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\n: empty name\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\x00\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    ],
)
def test_malformed_requests_are_a_400(data: bytes) -> None:
    """Bad request lines, versions, targets, field lines, Host, or TLS on the plain port: 400."""
    assert parse_request(data) == web.BAD_REQUEST
    assert web.BAD_REQUEST.response.startswith(b"HTTP/1.1 400 Bad Request\r\n")


def test_http_1_0_needs_no_host() -> None:
    """An HTTP/1.0 request without Host is read (it gets the page)."""
    assert status(b"GET / HTTP/1.0\r\n\r\n") == 200


# --- What a request gets --------------------------------------------------------------


def test_the_websocket_handshake_is_accepted_as_rfc_6455_says() -> None:
    """RFC 6455's own example key gets its accept value in a 101."""
    result = answer(head(**HANDSHAKE))
    assert isinstance(result, Upgrade)
    assert result.response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    headers = response_headers(result.response)
    assert headers["sec-websocket-accept"] == RFC_ACCEPT
    assert headers["upgrade"].lower() == "websocket"
    assert headers["connection"].lower() == "upgrade"
    assert web.accept_key(RFC_KEY) == RFC_ACCEPT


def test_wsproto_completes_a_handshake_with_it() -> None:
    """wsproto's client sends its request, takes the 101, and then reads our frames."""
    client = WSConnection(ConnectionType.CLIENT)
    data = client.send(WsprotoRequest(host="chat.example", target="/chat"))
    result = answer(data)
    assert isinstance(result, Upgrade)
    client.receive_data(result.response)
    assert [type(event) for event in client.events()] == [AcceptConnection]


@pytest.mark.parametrize(
    ("connection", "upgrade"),
    [("keep-alive, Upgrade", "websocket"), ("upgrade", "WebSocket"), ("Upgrade", "h2c, websocket")],
)
def test_upgrade_tokens_are_found_in_lists_in_any_case(connection: str, upgrade: str) -> None:
    """Firefox's "keep-alive, Upgrade" and tokens in any case still upgrade."""
    assert status(head(**HANDSHAKE | {"Connection": connection, "Upgrade": upgrade})) == 101


@pytest.mark.parametrize("version", ["8", "12", "14", "", "13, 8"])
def test_another_version_is_a_426_naming_13(version: str) -> None:
    """Any Sec-WebSocket-Version but 13 gets a 426 with Sec-WebSocket-Version: 13."""
    result = answer(head(**HANDSHAKE | {"Sec_WebSocket_Version": version}))
    assert isinstance(result, Respond)
    assert result.status == 426
    assert response_headers(result.response)["sec-websocket-version"] == "13"


def test_no_version_is_a_426() -> None:
    """A handshake without Sec-WebSocket-Version gets the 426 too."""
    fields = {name: value for name, value in HANDSHAKE.items() if "Version" not in name}
    assert status(head(**fields)) == 426


@pytest.mark.parametrize(
    "key",
    [
        None,
        "",
        "dGhlIHNhbXBsZSBub25jZQ",  # unpadded
        "dGhlIHNhbXBsZSBub25j",  # 15 bytes
        "dGhlIHNhbXBsZSBub25jZXM=",  # 17 bytes
        "dGhlIHNhbXBsZSBub25jZQ==, dGhlIHNhbXBsZSBub25jZQ==",  # two keys
        "dGhlIHNhbXBsZSBub25jZ!==",  # not base64
        "dGhlIHNhbXBsZSBub25j!ZQ==",  # 16 bytes, if the "!" were skipped
        "dGhlIHNhbXBsZSBub25jZQ===",  # 16 bytes, if the extra "=" were
        "dGhlIHNhbXBsZSBub25jZQ=\u00e9",  # not ASCII (obs-text, read as Latin-1)
    ],
)
def test_no_valid_key_is_a_400(key: str | None) -> None:
    """A missing key, or one that is not the base64 of 16 bytes, gets a 400."""
    fields = {name: value for name, value in HANDSHAKE.items() if "Key" not in name}
    if key is not None:
        fields["Sec_WebSocket_Key"] = key
    assert status(head(**fields)) == 400


def test_an_upgrade_without_connection_upgrade_is_a_400() -> None:
    """Upgrade: websocket without Connection: upgrade is a broken handshake: 400."""
    assert status(head(**HANDSHAKE | {"Connection": "keep-alive"})) == 400


def test_an_upgrade_over_http_1_0_is_a_400() -> None:
    """A WebSocket handshake needs HTTP/1.1 (and its Host)."""
    assert status(head("GET /chat HTTP/1.0", **HANDSHAKE)) == 400
    fields = {name: value for name, value in HANDSHAKE.items() if name != "Host"}
    assert status(head("GET /chat HTTP/1.0", **fields)) == 400


@pytest.mark.parametrize(
    ("origin", "allowed", "expected"),
    [
        (None, (), 101),
        ("https://anywhere.example", (), 101),
        (None, ("https://chat.example",), 101),
        ("https://chat.example", ("https://chat.example",), 101),
        ("https://CHAT.example", ("https://chat.example",), 101),
        ("https://chat.example", ("HTTPS://Chat.Example",), 101),
        ("https://other.example", ("https://chat.example",), 403),
        ("http://chat.example", ("https://chat.example",), 403),
        ("null", ("https://chat.example",), 403),
    ],
)
def test_origins(origin: str | None, allowed: tuple[str, ...], expected: int) -> None:
    """Only the allowed origins (any when none is given; always without Origin) upgrade."""
    fields = HANDSHAKE if origin is None else HANDSHAKE | {"Origin": origin}
    assert status(head(**fields), allowed) == expected


@pytest.mark.parametrize(
    "request_line",
    [
        "GET /other HTTP/1.1",
        "GET /chat/ HTTP/1.1",
        "GET /index.html HTTP/1.1",
        "POST / HTTP/1.1",
        "POST /chat HTTP/1.1",
        "get / HTTP/1.1",
        "DELETE /chat HTTP/1.1",
    ],
)
def test_anything_else_is_a_404(request_line: str) -> None:
    """Other paths and methods, even with a valid handshake, get a plain 404."""
    result = answer(head(request_line, **HANDSHAKE))
    assert isinstance(result, Respond)
    assert result.status == 404
    assert response_headers(result.response)["content-type"].startswith("text/plain")


def test_a_plain_get_of_the_websocket_path_is_a_404() -> None:
    """GET /chat without Upgrade: websocket is not a handshake: 404."""
    assert status(head(Host="h")) == 404


def test_the_page() -> None:
    """GET / is the page, with its type, CSP, nosniff, caching headers and length."""
    result = answer(head("GET /?from=link HTTP/1.1", Host="h"))
    assert isinstance(result, Respond)
    assert result.status == 200
    headers = response_headers(result.response)
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["content-security-policy"] == web.CSP
    assert headers["cache-control"] == "no-cache"
    assert headers["etag"] == web.PAGE_ETAG
    body = result.response.partition(b"\r\n\r\n")[2]
    assert body == PAGE_FILE.read_bytes()
    assert headers["content-length"] == str(len(body))


def test_head_gets_the_pages_headers_without_it() -> None:
    """HEAD / gets the page's headers and no body."""
    result = answer(head("HEAD / HTTP/1.1", Host="h"))
    assert isinstance(result, Respond)
    assert result.response.endswith(b"\r\n\r\n")
    assert response_headers(result.response)["content-length"] == str(len(web.PAGE))


def test_a_page_the_browser_has_is_a_304() -> None:
    """If-None-Match with the page's ETag gets a 304 without a body."""
    result = answer(head("GET / HTTP/1.1", Host="h", If_None_Match=f'W/"x", {web.PAGE_ETAG}'))
    assert isinstance(result, Respond)
    assert result.status == 304
    assert result.response.endswith(b"\r\n\r\n")
    assert status(head("GET / HTTP/1.1", Host="h", If_None_Match='"other"')) == 200


def test_a_full_server_answers_a_page_request_with_a_503() -> None:
    """Over a limit, the page is a 503, but a WebSocket is still upgraded (to hear why)."""
    assert status(head("GET / HTTP/1.1", Host="h"), full=True) == 503
    assert status(head(**HANDSHAKE), full=True) == 101


@pytest.mark.parametrize("response", [web.BAD_REQUEST, web.NOT_FOUND, web.HEAD_TOO_LARGE])
def test_error_responses_are_complete_http(response: Respond) -> None:
    """Each error is a whole HTTP/1.1 response with its length, closing the connection."""
    head_bytes, _, body = response.response.partition(b"\r\n\r\n")
    assert head_bytes.startswith(f"HTTP/1.1 {response.status} ".encode())
    headers = response_headers(response.response)
    assert headers["content-length"] == str(len(body))
    assert headers["connection"] == "close"


# --- The page ------------------------------------------------------------------------


class InlineBlocks(HTMLParser):
    """The text of each <script> and <style>, and every attribute, as a browser sees them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.blocks: dict[str, list[str]] = {"script": [], "style": []}
        self.attributes: list[tuple[str, str | None]] = []
        self._inside: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.attributes += attrs
        if tag in self.blocks:
            self._inside = tag
            self.blocks[tag].append("")

    def handle_endtag(self, tag: str) -> None:
        self._inside = None

    def handle_data(self, data: str) -> None:
        if self._inside:
            self.blocks[self._inside][-1] += data


def page_blocks() -> InlineBlocks:
    parser = InlineBlocks()
    parser.feed(PAGE_FILE.read_text())
    parser.close()
    return parser


def csp_directives() -> dict[str, list[str]]:
    directives = (part.split() for part in web.CSP.split(";"))
    return {words[0]: words[1:] for words in directives}


def test_the_csp_hashes_are_those_of_the_inline_blocks() -> None:
    """script-src and style-src hold exactly the sha256 of each inline block."""
    blocks = page_blocks().blocks
    directives = csp_directives()
    for tag in ("script", "style"):
        assert len(blocks[tag]) == 1
        hashes = [
            "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"
            for text in blocks[tag]
        ]
        assert directives[f"{tag}-src"] == hashes


def test_the_csp_loads_nothing_from_elsewhere() -> None:
    """default-src 'none', and the only connection allowed is to the page's own origin."""
    directives = csp_directives()
    assert directives["default-src"] == ["'none'"]
    assert directives["connect-src"] == ["'self'"]
    assert set(directives) == {
        "default-src",
        "script-src",
        "style-src",
        "connect-src",
        "base-uri",
        "form-action",
        "frame-ancestors",
    }


def test_the_page_loads_no_external_resource() -> None:
    """No src= or href= attribute, no "http" at all, no CSS url() or @import."""
    text = PAGE_FILE.read_text()
    names = {name for name, _ in page_blocks().attributes}
    assert not names & {"src", "href", "action", "srcset", "poster", "data"}
    assert not re.search(r"(?i)\b(src|href)\s*=", text)
    assert "http" not in text.lower()
    assert not re.search(r"(?i)url\(|@import", text)


def test_the_page_never_uses_innerhtml_and_needs_no_inline_handlers() -> None:
    """Room text only goes through textContent; no on*= or style= (a CSP hash allows neither)."""
    text = PAGE_FILE.read_text()
    for risky in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert risky not in text
    assert "textContent" in text
    names = {name for name, _ in page_blocks().attributes}
    assert not {name for name in names if name.startswith("on")}
    assert "style" not in names


def test_the_page_connects_to_its_own_chat_path() -> None:
    """The WebSocket URL comes from location (ws: or wss:) with the path /chat."""
    script = page_blocks().blocks["script"][0]
    assert "location.host" in script
    assert '"/chat"' in script
    assert '"wss:" : "ws:"' in script
