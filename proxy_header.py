"""The PROXY protocol header without I/O: the first bytes of a connection in,
who the client really is out.

PROTOCOL.md, "Behind a load balancer": a connection from a trusted balancer
(`trusted`, with the networks of --proxy-protocol, `proxy_network`) begins
with a header, version 1 (text) or 2 (binary), as haproxy's
doc/proxy-protocol.txt specifies them. `parse_header` reads what has
arrived so far and says one of three things: `Incomplete` (wait for more,
and never for more than `at_most` bytes in all), `Malformed` (close, and log
`reason`), or `Header` (the client's address, and how many bytes the header
took: what follows is the client's own first bytes).

`parse_header` is total: for any bytes it returns one of the three and never
raises. It is also decided as early as it can be: a header is Malformed as
soon as no more bytes could make it valid, and once the answer is not
Incomplete, more bytes never change it. test_proxy_header.py checks all of
this with Hypothesis, and against a real HAProxy.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

# doc/proxy-protocol.txt, 2.1: the longest v1 line, "PROXY UNKNOWN" with two
# IPv6 addresses and two ports, is 107 bytes with its CRLF; a receiver that
# has not seen the CRLF by then declares the line invalid.
V1_MAX_BYTES: Final = 107
# 2.2: the 12-byte signature, version and command, family and transport,
# and the length of what follows (16 bits): a v2 header is 16 + length bytes.
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_BYTES: Final = 16
V2_MAX_BYTES: Final = V2_FIXED_BYTES + 0xFFFF
# Until the first byte says which version it is, either bound may apply.
MAX_HEADER_BYTES: Final = max(V1_MAX_BYTES, V2_MAX_BYTES)
# PROTOCOL.md, "Behind a load balancer": how long a trusted connection may
# take to send its header when there is no register timeout to bound it.
# (The spec asks for at least 3 s, to cover a TCP retransmit.)
DEFAULT_HEADER_TIMEOUT: Final = 10.0

_V1_KEYWORD: Final = "PROXY"
_V1_TCP4: Final = "TCP4"
_V1_TCP6: Final = "TCP6"
_V1_UNKNOWN: Final = "UNKNOWN"
# "PROXY", the protocol, two addresses, two ports.
_V1_FIELDS: Final = 6

_V2_LOCAL: Final = 0x0
_V2_PROXY: Final = 0x1
_V2_UNSPEC: Final = 0x0
_V2_INET: Final = 0x1
_V2_INET6: Final = 0x2
_V2_UNIX: Final = 0x3
_V2_STREAM: Final = 0x1
_V2_DGRAM: Final = 0x2
# The address block of each family over STREAM: two addresses, two ports
# (UNIX: two 108-byte paths). TLVs may follow it within the length.
_V2_ADDRESS_BYTES: Final = {_V2_INET: 12, _V2_INET6: 36, _V2_UNIX: 216}
# A TLV is a type byte and a 16-bit length before its value.
_TLV_HEAD_BYTES: Final = 3

# 2.1: decimal without leading zeros (they could be read as octal).
_DECIMAL: Final = re.compile(r"0|[1-9][0-9]*")
_IPV4: Final = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
# Hex groups and colons, and a dotted IPv4 tail, which HAProxy itself sends
# for an IPv4 client of an IPv6 listener ("::ffff:192.0.2.1"); never a zone.
_IPV6_CHARACTERS: Final = re.compile(r"[0-9A-Fa-f:.]*")


@dataclass(frozen=True, slots=True)
class Incomplete:
    """Not decided yet: more bytes are needed. The header, if it is one,
    ends within the first `at_most` bytes of the connection."""

    at_most: int


@dataclass(frozen=True, slots=True)
class Malformed:
    """No valid header can begin with these bytes; `reason` is for the log."""

    reason: str


@dataclass(frozen=True, slots=True)
class Header:
    """A valid header of `length` bytes. `source` is the client's (host,
    port), the host as `str(ipaddress)` gives it (an IPv4-mapped IPv6
    address as plain IPv4), or None where the balancer's own address is
    kept: `PROXY UNKNOWN`, v2 LOCAL, v2 of another family or transport."""

    source: tuple[str, int] | None
    length: int
    version: int


Parsed = Incomplete | Malformed | Header

_NOT_A_HEADER: Final = Malformed("not a PROXY protocol header (neither v1 nor v2)")


def parse_header(data: bytes) -> Parsed:
    """What the first bytes of a connection from a trusted balancer say."""
    if not data:
        return Incomplete(MAX_HEADER_BYTES)
    if data[0] == ord("P"):
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    return _NOT_A_HEADER


# --- Version 1: "PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n" -------------


def _parse_v1(data: bytes) -> Parsed:
    end = data.find(b"\r\n", 0, V1_MAX_BYTES)
    complete = end >= 0
    line = data[:end] if complete else data[:V1_MAX_BYTES]
    problem = _v1_problem(line, complete)
    if problem is not None:
        return Malformed(f"PROXY v1: {problem}")
    if not complete:
        if len(data) >= V1_MAX_BYTES:
            return Malformed(f"PROXY v1: no CRLF in the first {V1_MAX_BYTES} bytes")
        return Incomplete(V1_MAX_BYTES)
    fields = line.decode("ascii").split(" ")
    if fields[1] == _V1_UNKNOWN:
        return Header(None, end + 2, 1)
    return Header((_canonical(fields[2]), int(fields[4])), end + 2, 1)


def _v1_problem(line: bytes, complete: bool) -> str | None:
    """Why no valid v1 line begins with `line` (the whole line before its
    CRLF when `complete`), or None if one may."""
    if b"\n" in line:
        return "a line feed without a carriage return before it"
    carriage_return = line.find(b"\r")
    if carriage_return >= 0 and (complete or carriage_return < len(line) - 1):
        return "a carriage return without a line feed after it"
    if not line.isascii():
        return "a byte that is not US-ASCII"
    fields = line.rstrip(b"\r").decode("ascii").split(" ")
    for index, field in enumerate(fields):
        partial = not complete and index == len(fields) - 1
        if index == 0:
            if not _is_word(field, _V1_KEYWORD, partial):
                return f"{field!r} where PROXY belongs"
        elif index == 1:
            if field == _V1_UNKNOWN:
                return None  # 2.1: the receiver ignores the rest of an UNKNOWN line
            if not any(_is_word(field, word, partial) for word in (_V1_TCP4, _V1_TCP6)) and not (
                partial and _V1_UNKNOWN.startswith(field)
            ):
                return f"protocol {field!r}, not TCP4, TCP6 or UNKNOWN"
        elif index >= _V1_FIELDS:
            return "more than two addresses and two ports"
        elif index <= 3:
            if not _is_address(field, fields[1], partial):
                return f"{field!r} is no {fields[1]} address"
        elif not _is_port(field) and not (partial and not field):
            return f"{field!r} is no port (0 to 65535, no leading zero)"
    if complete and len(fields) < _V1_FIELDS:
        return f"{len(fields)} fields, not {_V1_FIELDS}"
    return None


def _is_word(field: str, word: str, partial: bool) -> bool:
    return field == word or (partial and word.startswith(field))


def _is_port(text: str) -> bool:
    return _DECIMAL.fullmatch(text) is not None and len(text) <= 5 and int(text) <= 0xFFFF


def _is_address(text: str, family: str, partial: bool) -> bool:
    if family == _V1_TCP4:
        return _is_ipv4_prefix(text) if partial else _is_ipv4(text)
    return _is_ipv6_prefix(text) if partial else _is_ipv6(text)


def _is_ipv4(text: str) -> bool:
    return _IPV4.fullmatch(text) is not None and all(int(part) <= 255 for part in text.split("."))


def _is_ipv4_prefix(text: str) -> bool:
    """Whether some IPv4 address in dotted decimal begins with `text`."""
    parts = text.split(".")
    if len(parts) > 4:
        return False
    *whole, last = parts
    return all(_is_octet(part) for part in whole) and (last == "" or _is_octet(last))


def _is_octet(text: str) -> bool:
    return _DECIMAL.fullmatch(text) is not None and len(text) <= 3 and int(text) <= 255


def _is_ipv6(text: str) -> bool:
    if _IPV6_CHARACTERS.fullmatch(text) is None or not text:
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _is_ipv6_prefix(text: str) -> bool:
    """Whether some IPv6 address, in the text `_is_ipv6` takes, begins with
    `text`."""
    if _IPV6_CHARACTERS.fullmatch(text) is None:
        return False
    if "." in text:
        # A dotted IPv4 tail: what is before it must take one.
        head, colon, tail = text.rpartition(":")
        return bool(colon) and _is_ipv4_prefix(tail) and _is_ipv6(head + ":0.0.0.0")
    if ":::" in text or text.count("::") > 1:
        return False
    if text.startswith(":") and not text.startswith("::") and len(text) > 1:
        return False
    groups = [group for group in text.split(":") if group]
    if any(len(group) > 4 for group in groups):
        return False
    # Eight groups in all, a "::" standing for at least one; a single ":"
    # at the end still needs a group after it.
    room = 7 if "::" in text else 8
    if text.endswith(":") and not text.endswith("::"):
        room -= 1
    return len(groups) <= room


def _canonical(host: str) -> str:
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


# --- Version 2: the signature, then binary fields --------------------------------


def _parse_v2(data: bytes) -> Parsed:
    if not V2_SIGNATURE.startswith(data[: len(V2_SIGNATURE)]):
        return _NOT_A_HEADER
    if len(data) <= len(V2_SIGNATURE):
        return Incomplete(V2_MAX_BYTES)
    version, command = data[12] >> 4, data[12] & 0xF
    if version != 2:
        return Malformed(f"PROXY v2: version {version}, not 2")
    if command not in (_V2_LOCAL, _V2_PROXY):
        return Malformed(f"PROXY v2: command {command}, neither LOCAL nor PROXY")
    if len(data) < 14:
        return Incomplete(V2_MAX_BYTES)
    family, transport = data[13] >> 4, data[13] & 0xF
    # 2.2: a LOCAL header's family is ignored, and so is its whole block.
    if command == _V2_PROXY:
        if family > _V2_UNIX:
            return Malformed(f"PROXY v2: address family {family}")
        if transport > _V2_DGRAM:
            return Malformed(f"PROXY v2: transport {transport}")
        if transport == _V2_DGRAM:
            return Malformed("PROXY v2: a datagram header on a stream connection")
    if len(data) < V2_FIXED_BYTES:
        return Incomplete(V2_MAX_BYTES)
    length = int.from_bytes(data[14:16], "big")
    total = V2_FIXED_BYTES + length
    if command == _V2_LOCAL or family == _V2_UNSPEC or transport != _V2_STREAM:
        # The balancer's own connection, or an address to ignore (2.2).
        return Header(None, total, 2) if len(data) >= total else Incomplete(total)
    address_bytes = _V2_ADDRESS_BYTES[family]
    if length < address_bytes:
        return Malformed(f"PROXY v2: {length} address bytes, fewer than {address_bytes}")
    problem = _tlv_problem(data[V2_FIXED_BYTES + address_bytes : total], length - address_bytes)
    if problem is not None:
        return Malformed(f"PROXY v2: {problem}")
    if len(data) < total:
        return Incomplete(total)
    if family == _V2_INET:
        host = str(ipaddress.IPv4Address(data[16:20]))
        port = int.from_bytes(data[24:26], "big")
    elif family == _V2_INET6:
        host = _canonical(str(ipaddress.IPv6Address(data[16:32])))
        port = int.from_bytes(data[48:50], "big")
    else:
        return Header(None, total, 2)  # AF_UNIX: no address of ours to give
    return Header((host, port), total, 2)


def _tlv_problem(arrived: bytes, size: int) -> str | None:
    """Why the TLVs after the addresses (`size` bytes, of which `arrived`
    are here) cannot be a chain of whole TLVs, or None if they may be. Their
    values are skipped: nothing in them changes who the client is."""
    offset = 0
    while offset < size:
        if size - offset < _TLV_HEAD_BYTES:
            return f"{size - offset} bytes after the last TLV, too few for another"
        if len(arrived) < offset + _TLV_HEAD_BYTES:
            return None  # the rest is still to come
        value_bytes = int.from_bytes(arrived[offset + 1 : offset + 3], "big")
        offset += _TLV_HEAD_BYTES + value_bytes
        if offset > size:
            return f"a TLV of {value_bytes} bytes runs past the header's end"
    return None


# --- Who may send a header: --proxy-protocol CIDR --------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted(host: str, networks: Iterable[Network]) -> bool:
    """Whether a connection from `host` (as getpeername gives it) must begin
    with a header: it is in one of `networks`. An IPv4 client of a
    dual-stack socket (::ffff:a.b.c.d) is matched as the IPv4 address it is."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    forms: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = (address,)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        forms = (address, address.ipv4_mapped)
    return any(form in network for network in networks for form in forms)


def proxy_network(text: str) -> Network:
    """An argparse type for --proxy-protocol: a network in CIDR notation, or
    one address (a network of one)."""
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        pass
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid network {text!r}: an address or a CIDR such as 10.0.0.0/8 or fd00::/8"
        ) from None
    raise argparse.ArgumentTypeError(
        f"invalid network {text!r}: it has host bits set (the network is {network})"
    )
