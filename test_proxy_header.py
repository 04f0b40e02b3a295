"""proxy_header.py: the PROXY protocol header, v1 and v2, as haproxy's
doc/proxy-protocol.txt specifies it, and who may send one.

Headers are built here by an encoder of the test's own (socket.inet_pton and
struct, not the parser's ipaddress), and the parser is fed every prefix of
what a connection sends: whatever the chunking, the door sees one of those
prefixes at each read, so "every prefix" covers every chunking.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from conftest import TIMEOUT
from haproxy_testing import connect_from, running_haproxy
from proxy_header import (
    Header,
    Incomplete,
    Malformed,
    Parsed,
    parse_header,
    proxy_network,
    trusted,
)

# doc/proxy-protocol.txt, 2.1 and 2.2, typed from the spec, not imported.
V1_LIMIT = 107
SIGNATURE = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
LOCAL, PROXY = 0x0, 0x1
UNSPEC, INET, INET6, UNIX = 0x0, 0x1, 0x2, 0x3
STREAM, DGRAM = 0x1, 0x2
MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


# --- The test's own encoder ----------------------------------------------------


def v1(protocol: str, source: str, destination: str, source_port: int, port: int) -> bytes:
    return f"PROXY {protocol} {source} {destination} {source_port} {port}\r\n".encode()


def v2(
    block: bytes = b"", *, command: int = PROXY, family: int = INET, transport: int = STREAM
) -> bytes:
    """A v2 header: the signature, version 2 and `command`, the family and
    transport byte, the length, then `block` (addresses and TLVs)."""
    fixed = SIGNATURE + bytes([0x20 | command, family << 4 | transport])
    return fixed + struct.pack("!H", len(block)) + block


def inet_block(source: bytes, destination: bytes, source_port: int, port: int) -> bytes:
    return source + destination + struct.pack("!HH", source_port, port)


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def packed(host: str) -> bytes:
    """The address bytes of a host the parser returned: an IPv4-mapped IPv6
    address comes back as IPv4, so compare it as the mapped form."""
    if ":" in host:
        return socket.inet_pton(socket.AF_INET6, host)
    return MAPPED_PREFIX + socket.inet_pton(socket.AF_INET, host)


def as_v6(raw: bytes) -> bytes:
    return raw if len(raw) == 16 else MAPPED_PREFIX + raw


def ipv6_text(raw: bytes, style: str) -> str:
    """The spellings senders use: glibc's inet_ntop (HAProxy's; a mapped
    address with a dotted tail), all four digits, no leading zeros, upper
    case."""
    groups = struct.unpack("!8H", raw)
    if style == "full":
        return ":".join(f"{group:04x}" for group in groups)
    if style == "short":
        return ":".join(f"{group:x}" for group in groups)
    text = socket.inet_ntop(socket.AF_INET6, raw)
    return text.upper() if style == "upper" else text


ipv4s = st.binary(min_size=4, max_size=4)
ipv6s = st.one_of(
    st.binary(min_size=16, max_size=16),
    st.builds(lambda raw: MAPPED_PREFIX + raw, ipv4s),
    st.sampled_from([bytes(16), bytes(15) + b"\x01", b"\xfe\x80" + bytes(13) + b"\x01"]),
)
ipv6_styles = st.sampled_from(["ntop", "full", "short", "upper"])
ports = st.integers(0, 65535)
rests = st.binary(max_size=40)
tlvs = st.lists(st.builds(tlv, st.integers(0, 255), st.binary(max_size=30)), max_size=4).map(
    b"".join
)


@st.composite
def valid_headers(draw: st.DrawFn) -> tuple[bytes, tuple[bytes, int] | None]:
    """A header of any kind, and the client it names: (the address as 16
    bytes, IPv4 mapped; the port), or None for the balancer's own."""
    kind = draw(st.sampled_from(["tcp4", "tcp6", "unknown", "v2-inet", "v2-inet6", "v2-other"]))
    source_port, port = draw(ports), draw(ports)
    if kind == "tcp4":
        source, destination = draw(ipv4s), draw(ipv4s)
        text = [socket.inet_ntop(socket.AF_INET, raw) for raw in (source, destination)]
        return v1("TCP4", text[0], text[1], source_port, port), (as_v6(source), source_port)
    if kind == "tcp6":
        source, destination = draw(ipv6s), draw(ipv6s)
        text = [ipv6_text(raw, draw(ipv6_styles)) for raw in (source, destination)]
        return v1("TCP6", text[0], text[1], source_port, port), (source, source_port)
    if kind == "unknown":
        rest = draw(st.sampled_from(["", " ", " ::1 ::2 1 2", " anything at all"]))
        return f"PROXY UNKNOWN{rest}\r\n".encode(), None
    if kind == "v2-inet":
        source = draw(ipv4s)
        block = inet_block(source, draw(ipv4s), source_port, port) + draw(tlvs)
        return v2(block), (as_v6(source), source_port)
    if kind == "v2-inet6":
        source = draw(ipv6s)
        block = inet_block(source, draw(ipv6s), source_port, port) + draw(tlvs)
        return v2(block, family=INET6), (source, source_port)
    command, family, transport = draw(
        st.sampled_from(
            [
                *[(LOCAL, UNSPEC, UNSPEC), (LOCAL, INET, STREAM), (LOCAL, 0xF, 0xF)],
                *[(PROXY, UNSPEC, UNSPEC), (PROXY, UNIX, STREAM), (PROXY, INET, UNSPEC)],
            ]
        )
    )
    if family == UNIX:  # two 108-byte paths, then TLVs as for any other family
        block = draw(st.binary(min_size=216, max_size=216)) + draw(tlvs)
    else:  # ignored, whatever it holds
        block = draw(st.binary(max_size=40))
    return v2(block, command=command, family=family, transport=transport), None


def every_prefix(data: bytes) -> list[Parsed]:
    return [parse_header(data[:size]) for size in range(len(data) + 1)]


def same_answer(one: Parsed, other: Parsed) -> bool:
    """The same Header, or both Malformed (the reason may quote more bytes)."""
    if isinstance(one, Malformed):
        return isinstance(other, Malformed)
    return one == other


def assert_decided_once(data: bytes) -> None:
    """Incomplete, within its bound, until the answer is decided; then the
    same answer whatever more arrives."""
    results = every_prefix(data)
    final = results[-1]
    decided = False
    bound = None
    for size, result in enumerate(results):
        if decided or not isinstance(result, Incomplete):
            decided = True
            assert same_answer(result, final), (size, result, final)
        else:
            assert size < result.at_most
            assert bound is None or result.at_most <= bound, "the bound grew"
            bound = result.at_most


# --- Properties -----------------------------------------------------------------


@given(valid_headers(), rests)
def test_a_valid_header_round_trips_whatever_follows(
    header: tuple[bytes, tuple[bytes, int] | None], rest: bytes
) -> None:
    """A header from the test's encoder names its client and takes exactly
    its own bytes, whatever the client sends after it."""
    encoded, client = header
    parsed = parse_header(encoded + rest)
    assert isinstance(parsed, Header), parsed
    assert parsed.length == len(encoded)
    assert parsed.version == (1 if encoded.startswith(b"PROXY") else 2)
    if client is None:
        assert parsed.source is None
    else:
        assert parsed.source is not None
        host, port = parsed.source
        assert (packed(host), port) == client


@given(valid_headers(), rests)
def test_a_valid_header_is_decided_once_at_its_last_byte(
    header: tuple[bytes, tuple[bytes, int] | None], rest: bytes
) -> None:
    """Every proper prefix of a valid header is Incomplete within its bound
    (never Malformed: any chunking works), and the header is decided by its
    last byte and stays so."""
    encoded, _ = header
    results = every_prefix(encoded + rest)
    assert all(isinstance(result, Incomplete) for result in results[: len(encoded)])
    assert all(isinstance(result, Header) for result in results[len(encoded) :])
    assert_decided_once(encoded + rest)


GOOD_V1_FIELDS = ["PROXY", "TCP4", "192.0.2.1", "198.51.100.7", "56324", "443"]
WRONG_V1_FIELDS = [
    ["proxy", "PROXY6", "PROX", "PROXY\t", " PROXY"],
    ["tcp4", "TCP", "TCP5", "UDP4", "UNKNOWNX", ""],
    ["01.2.3.4", "1.2.3", "256.1.1.1", "1.2.3.4.5", "1.2.3.4%eth0", "fe80::1%eth0"],
    ["::1::2", "1:2:3:4:5:6:7:8:9", "12345::", ":1", "1.2.3.04", "example.com", "1.2.3."],
    ["01", "65536", "-1", "+1", "0x10", "١٢"],
    ["00", "99999", " 1", "1 ", ""],
]


@st.composite
def malformed_v1(draw: st.DrawFn) -> bytes:
    """A v1 line with one thing wrong that the spec forbids: one field
    (TCP4 or TCP6), or the end of the line."""
    fields = list(GOOD_V1_FIELDS)
    ending = "\r\n"
    if draw(st.booleans()):
        if draw(st.booleans()):
            fields[1:4] = ["TCP6", "2001:db8::1", "::ffff:192.0.2.9"]
        index = draw(st.integers(0, len(fields) - 1))
        fields[index] = draw(st.sampled_from(WRONG_V1_FIELDS[index]))
    else:
        ending = draw(st.sampled_from(["\n", "\r\r\n", "\rx\n", "\n\r\n", " \r\n"]))
    return (" ".join(fields) + ending).encode() + draw(rests)


@given(malformed_v1())
@example(b"PROXY TCP4 192.0.2.1 2001:db8::1 1 2\r\n")
@example(b"PROXY TCP6 192.0.2.1 2001:db8::1 1 2\r\n")
@example(b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2 3\r\n")
@example(b"PROXY TCP4 192.0.2.1 198.51.100.7 1\r\n")
@example(b"PROXY TCP4  192.0.2.1 198.51.100.7 1 2\r\n")
@example(b"PROXY  UNKNOWN\r\n")
@example(b"PROXY\r\n")
@example(b"PROXY \r\n")
@example(b"PROXY UNKNOWN\n\r\n")
@example(b"PROXY UNKNOWN \xc3\xa9\r\n")
def test_a_malformed_v1_line_is_malformed_at_every_chunking(data: bytes) -> None:
    """A v1 line that breaks the spec (case, spaces, addresses, ports, a lone
    CR or LF, too many or too few fields) is Malformed, and no prefix of it
    is ever a Header."""
    assert isinstance(parse_header(data), Malformed), data
    assert not any(isinstance(result, Header) for result in every_prefix(data))
    assert_decided_once(data)


@st.composite
def malformed_v2(draw: st.DrawFn) -> bytes:
    """A v2 header with one thing wrong."""
    address = inet_block(b"\xc0\x00\x02\x01", b"\xc6\x33\x64\x07", 56324, 443)
    good = v2(address + tlv(4, b"pad"))
    flaw = draw(
        st.sampled_from(["signature", "version", "command", "family", "transport", "short"])
    )
    if flaw == "signature":
        index = draw(st.integers(0, 11))
        wrong = draw(st.integers(0, 255).filter(lambda byte: byte != SIGNATURE[index]))
        return good[:index] + bytes([wrong]) + good[index + 1 :]
    if flaw == "version":
        version = draw(st.sampled_from([0, 1, 3, 15]))
        return good[:12] + bytes([version << 4 | PROXY]) + good[13:]
    if flaw == "command":
        return good[:12] + bytes([0x20 | draw(st.integers(2, 15))]) + good[13:]
    if flaw == "family":
        return v2(address, family=draw(st.integers(4, 15)))
    if flaw == "transport":
        return v2(address, transport=draw(st.sampled_from([DGRAM, 3, 15])))
    cut = draw(st.integers(0, 11))
    family, size = draw(st.sampled_from([(INET, 12), (INET6, 36), (UNIX, 216)]))
    if draw(st.booleans()):
        return v2(bytes(size - 1 - cut % size), family=family)  # no room for the addresses
    # TLVs that do not fill the rest exactly: one runs past it, or a stub.
    tail = draw(st.sampled_from([tlv(1, b"abc")[:-1], b"\x01", b"\x01\x00", b"\x04\xff\xff"]))
    return v2(bytes(size) + tail, family=family)


@given(malformed_v2(), rests)
def test_a_malformed_v2_header_is_malformed_at_every_chunking(data: bytes, rest: bytes) -> None:
    """A v2 header with a wrong signature byte, version, command, family or
    transport (a datagram), too few address bytes or broken TLVs is
    Malformed, and no prefix of it is ever a Header."""
    assert isinstance(parse_header(data + rest), Malformed), data
    assert not any(isinstance(result, Header) for result in every_prefix(data + rest))
    assert_decided_once(data + rest)


starts = st.sampled_from(
    [b"", b"P", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN ", SIGNATURE]
    + [SIGNATURE + bytes([0x21, family << 4 | STREAM]) for family in (INET, INET6, UNIX)]
)


@given(starts, st.binary(max_size=300))
def test_any_bytes_give_an_answer_decided_once(start: bytes, data: bytes) -> None:
    """Any bytes, plain or after the start of a header, give an answer and
    never raise; the answer is decided once and never changes."""
    assert_decided_once(start + data)


@given(valid_headers(), rests, st.data())
def test_a_header_with_a_byte_changed_gives_an_answer_decided_once(
    header: tuple[bytes, tuple[bytes, int] | None], rest: bytes, data: st.DataObject
) -> None:
    """A valid header with any one byte changed (a fuzzer's first move)
    never makes the parser raise, and its answer is decided once."""
    encoded = bytearray(header[0] + rest)
    index = data.draw(st.integers(0, len(encoded) - 1))
    encoded[index] = data.draw(st.integers(0, 255))
    assert_decided_once(bytes(encoded))


@given(starts, st.binary(max_size=60), st.binary(min_size=1, max_size=1))
def test_an_answer_never_needs_more_than_its_bound(start: bytes, data: bytes, fill: bytes) -> None:
    """Incomplete says how far the header may reach: with that many bytes,
    whatever they are, it is decided."""
    result = parse_header(start + data)
    if isinstance(result, Incomplete):
        padded = start + data + fill * (result.at_most - len(start + data))
        assert not isinstance(parse_header(padded), Incomplete)


# --- Edge cases --------------------------------------------------------------------

SPEC_EXAMPLES = [
    # doc/proxy-protocol.txt 2.1: the example, and the longest line of each kind.
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", ("192.168.0.1", 56324)),
    (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", ("255.255.255.255", 65535)),
    (
        b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        b" ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
    ),
    (b"PROXY UNKNOWN\r\n", None),
    (
        b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        b" ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
        None,
    ),
]


@pytest.mark.parametrize(("line", "source"), SPEC_EXAMPLES)
def test_the_specs_examples(line: bytes, source: tuple[str, int] | None) -> None:
    """The spec's example line and its longest lines (56, 104, 15 and 107
    bytes) are headers, followed by what the client sent."""
    assert parse_header(line + b"GET / HTTP/1.1\r\n") == Header(source, len(line), 1)


def test_107_bytes_is_the_v1_limit() -> None:
    """A v1 line of 107 bytes with its CRLF is a header; one of 108 is
    Malformed as soon as the 107th byte is not the LF, and a 106-byte
    prefix ending in CR still waits for the LF."""
    line = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(line) == V1_LIMIT
    assert parse_header(line) == Header(None, V1_LIMIT, 1)
    assert parse_header(line[:-1]) == Incomplete(V1_LIMIT)
    longer = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"
    assert isinstance(parse_header(longer), Malformed)
    assert isinstance(parse_header(longer[:V1_LIMIT]), Malformed)
    assert parse_header(longer[: V1_LIMIT - 1]) == Incomplete(V1_LIMIT)


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # no CR
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r",  # no LF yet: waits...
        b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY unknown\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1  2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 02\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
        b"PROXY TCP6 ::1 ::g 1 2\r\n",
        b"PROXY TCP6 fe80::1%lo ::1 1 2\r\n",
        b"GET /metrics HTTP/1.1\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
    ],
)
def test_malformed_v1_forms(data: bytes) -> None:
    """Missing CR, lower case, extra spaces, leading zeros, numbers out of
    range, the wrong family, a zone, other protocols: Malformed (a lone CR
    at the end is still Incomplete, and Malformed once anything but LF
    follows)."""
    if data.endswith(b"\r") and not data.endswith(b"\r\n"):
        assert parse_header(data) == Incomplete(V1_LIMIT)
        data += b"x"
    assert isinstance(parse_header(data), Malformed)


@pytest.mark.parametrize(
    ("data", "decided_at"),
    [
        (b"GET /", 1),
        (b"PROXY TCP5 ", len(b"PROXY TCP5")),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 655360", len(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536")),
        (b"PROXY TCP6 1:2:3:4:5:6:7:8:9", len(b"PROXY TCP6 1:2:3:4:5:6:7:8:")),
        (b"PROXY TCP6 ::1::", len(b"PROXY TCP6 ::1::")),
        (b"PROXY TCP6 1::2:3:4:5:6:7:8", len(b"PROXY TCP6 1::2:3:4:5:6:7:")),
        (b"PROXY TCP6 1:::", len(b"PROXY TCP6 1:::")),
        (b"PROXY TCP6 12345", len(b"PROXY TCP6 12345")),
        (b"PROXY TCP6 1:2:3:4:5:6:7:1.2.3.4 ", len(b"PROXY TCP6 1:2:3:4:5:6:7:1.")),
        (b"PROXY TCP4 1.2.3.4.5 ", len(b"PROXY TCP4 1.2.3.4.")),
        (b"PROXY TCP4 1.2.3.256 ", len(b"PROXY TCP4 1.2.3.256")),
        (b"PROXY UNKNOWN ::1 \n\r\n", len(b"PROXY UNKNOWN ::1 \n")),
        (SIGNATURE[:5] + b"x", 6),
        (SIGNATURE + b"\x31", 13),
        (SIGNATURE + b"\x21\x41", 14),
        (v2(bytes(11)), 16),
    ],
)
def test_malformed_as_soon_as_certain(data: bytes, decided_at: int) -> None:
    """A header is Malformed at the first byte no valid header could have
    there, not later."""
    assert isinstance(parse_header(data[: decided_at - 1]), Incomplete)
    assert isinstance(parse_header(data[:decided_at]), Malformed)


def test_an_ipv4_mapped_client_is_named_as_ipv4() -> None:
    """An IPv4 client of an IPv6 listener, as HAProxy sends it (TCP6 with
    ::ffff:a.b.c.d, or v2 INET6 with the mapped address), is named by its
    IPv4 address, as the per-address limit counts it."""
    line = b"PROXY TCP6 ::ffff:192.0.2.1 ::ffff:198.51.100.7 56324 443\r\n"
    assert parse_header(line) == Header(("192.0.2.1", 56324), len(line), 1)
    header = v2(inet_block(MAPPED_PREFIX + b"\xc0\x00\x02\x01", bytes(16), 1, 2), family=INET6)
    assert parse_header(header) == Header(("192.0.2.1", 1), len(header), 2)


def test_v2_truncated_waits_for_exactly_its_length() -> None:
    """A v2 header waits for its fixed part with the largest bound, then
    for exactly 16 + its length, and is a Header at that byte."""
    header = v2(inet_block(b"\xc0\x00\x02\x01", bytes(4), 1234, 80) + tlv(0x04, bytes(100)))
    assert len(header) == 16 + 12 + 103
    assert parse_header(header[:15]) == Incomplete(16 + 0xFFFF)
    for size in range(16, len(header)):
        assert parse_header(header[:size]) == Incomplete(len(header))
    assert parse_header(header) == Header(("192.0.2.1", 1234), len(header), 2)


def test_v2_skips_tlvs_of_any_kind() -> None:
    """TLVs after the addresses (ALPN, authority, CRC, padding, SSL, and an
    empty one) are skipped whatever they hold."""
    tlvs = [tlv(0x01, b"h2"), tlv(0x02, b"chat.example"), tlv(0x03, b"\0\0\0\0")]
    tlvs += [tlv(0x04, b""), tlv(0x20, b"\x01" + bytes(4) + tlv(0x21, b"TLSv1.3"))]
    block = inet_block(bytes(15) + b"\x01", bytes(16), 40000, 7000) + b"".join(tlvs)
    header = v2(block, family=INET6)
    assert parse_header(header + b"USERNAME") == Header(("::1", 40000), len(header), 2)


def test_v2_local_keeps_the_balancers_address() -> None:
    """LOCAL (a health check) keeps the balancer's address, and its block is
    skipped whatever family it claims."""
    assert parse_header(v2(command=LOCAL, family=UNSPEC, transport=UNSPEC)) == Header(None, 16, 2)
    block = inet_block(b"\x0a\x00\x00\x01", bytes(4), 1, 2)
    assert parse_header(v2(block, command=LOCAL)) == Header(None, 28, 2)
    assert parse_header(v2(b"xyz", command=LOCAL, family=0xF)) == Header(None, 19, 2)


def test_v2_unspec_and_unix_keep_the_balancers_address() -> None:
    """The unspecified family or transport, and AF_UNIX, keep the balancer's
    address; AF_UNIX needs its two 108-byte paths."""
    assert parse_header(v2(b"junk", family=UNSPEC, transport=UNSPEC)) == Header(None, 20, 2)
    assert parse_header(v2(bytes(12), family=INET, transport=UNSPEC)) == Header(None, 28, 2)
    paths = b"/run/haproxy.sock".ljust(108, b"\0") + b"/run/chat.sock".ljust(108, b"\0")
    assert parse_header(v2(paths, family=UNIX)) == Header(None, 232, 2)
    assert isinstance(parse_header(v2(paths[:-1], family=UNIX)), Malformed)


# --- Who may send one ---------------------------------------------------------------

NETWORKS = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("10.1.2.3", True),
        ("11.0.0.1", False),
        ("fd12::1", True),
        ("fe80::1%eth0", False),
        ("fd12::1%eth0", True),
        ("::ffff:10.1.2.3", True),  # an IPv4 balancer on a dual-stack socket
        ("::ffff:11.0.0.1", False),
        ("not an address", False),
        ("", False),
    ],
)
def test_trusted_networks(host: str, expected: bool) -> None:
    """A peer is trusted when its address is in a --proxy-protocol network;
    an IPv4-mapped peer is matched as IPv4; anything else is not trusted."""
    assert trusted(host, NETWORKS) is expected


def test_nobody_is_trusted_without_networks() -> None:
    """With no --proxy-protocol, no address is trusted."""
    assert not trusted("10.1.2.3", [])


@pytest.mark.parametrize(
    ("text", "network"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("192.0.2.7", "192.0.2.7/32"),
        ("fd00::/8", "fd00::/8"),
        ("::1", "::1/128"),
    ],
)
def test_proxy_network_reads_cidr(text: str, network: str) -> None:
    """--proxy-protocol takes a CIDR network or a single address."""
    assert proxy_network(text) == ipaddress.ip_network(network)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.1/8", "host bits set (the network is 10.0.0.0/8)"),
        ("10.0.0.0/33", "an address or a CIDR"),
        ("balancer.example", "an address or a CIDR"),
        ("", "an address or a CIDR"),
    ],
)
def test_proxy_network_says_what_is_wrong(text: str, message: str) -> None:
    """A value that is no network is one argparse error that says why."""
    with pytest.raises(argparse.ArgumentTypeError, match="invalid network") as raised:
        proxy_network(text)
    assert message in str(raised.value)


# --- A real HAProxy as the sender ------------------------------------------------------


def read_header(conn: socket.socket) -> tuple[Header, bytes]:
    """The header a connection begins with, and what came after it so far."""
    data = b""
    while isinstance(parsed := parse_header(data), Incomplete):
        chunk = conn.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    assert isinstance(parsed, Header), (parsed, data)
    return parsed, data[parsed.length :]


def read_exactly(conn: socket.socket, data: bytes, size: int) -> bytes:
    while len(data) < size:
        chunk = conn.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


@pytest.mark.parametrize(
    "server_options", ["send-proxy", "send-proxy-v2", "send-proxy-v2 proxy-v2-options crc32c"]
)
@pytest.mark.parametrize(
    ("listen", "bind_options", "clients", "balancer"),
    [
        ("127.0.0.1", "", ["127.0.0.2", "127.0.0.3"], "127.0.0.9"),
        ("::1", "", ["::1"], None),
        # IPv4 clients of a dual-stack listener: HAProxy sends them IPv4-mapped.
        ("::", "v4v6", ["127.0.0.2"], None),
    ],
)
def test_haproxy_names_each_client(
    tmp_path: Path,
    server_options: str,
    listen: str,
    bind_options: str,
    clients: list[str],
    balancer: str | None,
) -> None:
    """A real HAProxy's header, v1 or v2 (with a CRC32C TLV too), over IPv4,
    IPv6 or IPv4-mapped IPv6, parses to the address and port each client
    connected from, while the backend sees HAProxy's own address; the
    client's bytes follow the header intact."""
    backend_host = "::1" if listen == "::1" else "127.0.0.1"
    family = socket.AF_INET6 if ":" in backend_host else socket.AF_INET
    with socket.create_server((backend_host, 0), family=family) as backend:
        backend.settimeout(TIMEOUT)
        with running_haproxy(
            backend.getsockname()[:2],
            tmp_path,
            server_options=server_options,
            host=listen,
            bind_options=bind_options,
            source=balancer,
        ) as proxy:
            connect_to = ("127.0.0.1" if listen == "::" else listen, proxy.address[1])
            for source in clients:
                with connect_from(source, connect_to) as client:
                    first = b"USERNAME alice\nSEND hi\n"
                    client.sendall(first)
                    conn, peer = backend.accept()
                    with conn:
                        conn.settimeout(TIMEOUT)
                        header, rest = read_header(conn)
                        assert header.version == (2 if "v2" in server_options else 1)
                        assert header.source == client.getsockname()[:2]
                        assert peer[0] == (balancer or backend_host)
                        assert read_exactly(conn, rest, len(first)) == first


def test_haproxy_health_check_is_local(tmp_path: Path) -> None:
    """HAProxy's health check with send-proxy-v2 sends a LOCAL header: it
    keeps the balancer's own address."""
    with socket.create_server(("127.0.0.1", 0)) as backend:
        backend.settimeout(TIMEOUT)
        options = "send-proxy-v2 check check-send-proxy inter 100ms"
        with running_haproxy(backend.getsockname(), tmp_path, server_options=options):
            conn, _ = backend.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                header, _ = read_header(conn)
                assert header == Header(None, header.length, 2)


def test_proxy_protocol_option_errors_as_argparse_shows_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """As an argparse type, a bad value is one line naming the option and
    the reason; the option repeats."""
    parser = argparse.ArgumentParser(prog="chat.py")
    parser.add_argument("--proxy-protocol", type=proxy_network, action="append")
    args = parser.parse_args(["--proxy-protocol", "10.0.0.0/8", "--proxy-protocol", "fd00::/8"])
    assert args.proxy_protocol == NETWORKS
    with pytest.raises(SystemExit):
        parser.parse_args(["--proxy-protocol", "10.0.0.1/8"])
    error = capsys.readouterr().err.splitlines()[-1]
    assert error == (
        "chat.py: error: argument --proxy-protocol: invalid network '10.0.0.1/8':"
        " it has host bits set (the network is 10.0.0.0/8)"
    )
