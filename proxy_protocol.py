"""PROXY protocol headers (versions 1 and 2) from an HAProxy front tier: parse, build; no I/O.

The reverse proxy's ``-proxy-protocol-port`` listener takes connections from HAProxy
(``send-proxy-v2``, see deploy/haproxy.cfg), and every such connection begins with a
PROXY protocol header that carries the client's real address. The specification is
HAProxy's ``doc/proxy-protocol.txt`` ("The PROXY protocol, Versions 1 & 2"); the
section numbers below are that document's. This module knows nothing of sockets.

Strategy, after h11: ``parse(buffer)`` is given every byte received so far on a new
connection and returns one of three things:

* ``NEED_DATA``: the header is not complete yet; call again when more bytes arrive;
* a ``ProxyHeader``: the header, whose ``length`` bytes the caller drops; the bytes
  after it are the stream's own data (frames) and are left untouched;
* or it raises ``ProxyProtocolError``: the caller closes the connection (section 2.1:
  "abort the connection as soon as possible") and logs the one-line message.

It refuses as early as the bytes allow: a first byte that begins neither signature,
any byte that departs from a signature, a bad v2 version, command or family byte, a
v2 length above the limit or below the family's address block, and a lone CR or LF
in a v1 line are refused when they arrive, not when the header is complete. (A v1
line's fields are decoded once its CRLF is in, as section 2.1 says.) It never waits for more than ``V1_MAX_SIZE`` bytes (v1) or
``max_v2_size`` bytes (v2). Being stateless, it may be called on each new chunk; each
call reads at most that many bytes of the buffer.

Deliberate choices where the specification leaves one (sections 2.1, 2.2):

* v1 addresses are parsed strictly: IPv4 without leading zeros (no octal confusion),
  IPv6 as HAProxy's own parser (``inet_pton``) reads it, an embedded IPv4 included,
  but without a zone (``%eth0``);
  ports are decimal 0-65535 without leading zeros. A lone CR or LF is refused.
* v1 ``UNKNOWN`` ignores the rest of its line, as the specification says (HAProxy's
  own receiver accepts only the short form ``PROXY UNKNOWN\\r\\n``).
* v2 LOCAL (HAProxy's health checks) skips the whole address block whatever its family
  byte (AWS NLB sends LOCAL with dummy IPv4 addresses): source None.
* v2 PROXY over TCP4/TCP6 gives the addresses; over UDP, UNIX or UNSPEC it falls back
  to the real connection's addresses (source None), as section 2.2 allows. The address
  block must still be as long as the family needs.
* v2 TLVs (section 2.2) are split into ``(type, value)`` pairs and checked to fit the
  header; their meaning is left to the caller. PP2_TYPE_CRC32C is not verified (a
  receiver "supporting" it must; this one does not claim to).
"""

import ipaddress
import re
import struct
from typing import NamedTuple, Optional, Tuple

__all__ = [
    "NEED_DATA", "ProxyHeader", "ProxyProtocolError", "parse", "build_v1", "build_v2",
    "V1_MAX_SIZE", "V2_MAX_SIZE", "DEFAULT_MAX_V2_SIZE",
]

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

# Section 2.1: the worst case, "PROXY UNKNOWN <IPv6> <IPv6> 65535 65535\r\n", is 107
# bytes with its CRLF; a line without CRLF within them is invalid.
V1_MAX_SIZE = 107

# Section 2.2: signature, version and command byte, family and transport byte, and
# the length of the rest (addresses, then TLVs), big-endian.
_V2_HEAD = struct.Struct(">12sBBH")
V2_HEAD_SIZE = _V2_HEAD.size  # 16
V2_MAX_SIZE = V2_HEAD_SIZE + 0xFFFF

# 4096 bytes for a whole v2 header: nginx's limit (NGX_PROXY_PROTOCOL_MAX_HEADER);
# HAProxy's own receiver is bounded by its 16 KiB buffer (tune.bufsize). Our front
# tier sends 16 + 36 bytes at most and no TLV; 4 KiB leaves room for ALPN,
# authority, unique id (128 bytes) and SSL TLVs, but not for a client certificate
# (PP2_SUBTYPE_SSL_CLIENT_CERT): raise ``max_v2_size`` up to V2_MAX_SIZE for that.
DEFAULT_MAX_V2_SIZE = 4096

_LOCAL, _PROXY = 0x0, 0x1
_COMMANDS = {_LOCAL: "LOCAL", _PROXY: "PROXY"}

# Section 2.2, the 14th byte: family and transport -> name, address block size.
_V2_FAMILIES = {
    0x00: ("UNSPEC", 0),
    0x11: ("TCP4", 12),
    0x12: ("UDP4", 12),
    0x21: ("TCP6", 36),
    0x22: ("UDP6", 36),
    0x31: ("UNIX_STREAM", 216),
    0x32: ("UNIX_DGRAM", 216),
}
_V2_FAMILY_BYTES = ", ".join(f"0x{byte:02x}" for byte in _V2_FAMILIES)
_V2_ADDRESS_BYTES = {"TCP4": 4, "TCP6": 16}  # families whose addresses are decoded

_LINE_END = re.compile(rb"[\r\n]")
_DIGITS = re.compile(r"[0-9]+")
_IPV6_TEXT = re.compile(r"[0-9A-Fa-f:.]+")  # no zone ("%eth0"), no brackets


class _NeedData:
    """Type of the ``NEED_DATA`` sentinel."""

    __slots__ = ()

    def __repr__(self):
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""Returned by ``parse`` while the header is incomplete and still valid so far."""


class ProxyProtocolError(ValueError):
    """The connection does not begin with a valid PROXY protocol header.

    The caller closes the connection (sections 2.1 and 2.2: such a connection is
    dropped) and logs ``message``. No ERROR frame is owed: the peer has not spoken
    the proxy's wire protocol yet.

    Attributes:
        message: one line naming the fault and the value at fault, for example
            ``"PROXY v1 header: source port '99999' is not 0-65535"``.
    """

    def __init__(self, message):
        super().__init__(message)
        self.message = message


class ProxyHeader(NamedTuple):
    """One parsed PROXY protocol header.

    Attributes:
        version: 1 (text, section 2.1) or 2 (binary, section 2.2).
        command: "PROXY" (relayed on behalf of a client; every v1 header) or "LOCAL"
            (v2 only: the proxy's own connection, such as a health check).
        family: "TCP4", "TCP6"; v1 "UNKNOWN"; v2 "UNSPEC" (also every LOCAL),
            "UDP4", "UDP6", "UNIX_STREAM", "UNIX_DGRAM".
        source: the client's ``(host, port)`` (host as ``str(ipaddress.ip_address)``
            gives it, IPv6 without brackets; port an int 0-65535), or None: use the
            connection's real peer address (v1 UNKNOWN, v2 LOCAL, families other
            than TCP4/TCP6).
        destination: the address the client connected to, likewise, or None.
        tlvs: v2 TLVs as a tuple of ``(type, value)`` pairs (int 0-255, bytes), in
            order; () for v1 and LOCAL.
        length: the header's size in bytes: the caller drops that many bytes from the
            start of the connection; what follows is the stream's data.
    """

    version: int
    command: str
    family: str
    source: Optional[Tuple[str, int]]
    destination: Optional[Tuple[str, int]]
    tlvs: Tuple[Tuple[int, bytes], ...]
    length: int


def parse(buffer, max_v2_size=DEFAULT_MAX_V2_SIZE):
    """Parse the PROXY protocol header at the start of ``buffer`` (sections 2.1, 2.2).

    Args:
        buffer: every byte received so far on the connection (bytes, bytearray or
            memoryview). It is not modified.
        max_v2_size: the largest v2 header accepted, in bytes, signature to last TLV
            (52 to V2_MAX_SIZE = 65551; default 4096, see DEFAULT_MAX_V2_SIZE).

    Returns:
        ``NEED_DATA`` while the header is incomplete and valid so far, else a
        ``ProxyHeader``; ``buffer[header.length:]`` is the stream's data.

    Raises:
        ProxyProtocolError: the bytes received cannot begin a valid header; the
            message names the fault. Every longer buffer with the same beginning
            raises the same error.
        ValueError: ``max_v2_size`` is out of range (a bug of the caller).
    """
    if not V2_HEAD_SIZE + 36 <= max_v2_size <= V2_MAX_SIZE:
        raise ValueError(f"max_v2_size must be {V2_HEAD_SIZE + 36} to {V2_MAX_SIZE} "
                         f"bytes (a TCP6 header fits), got {max_v2_size}")
    first = bytes(buffer[:1])
    if first == V1_SIGNATURE[:1]:
        return _parse_v1(bytes(buffer[:V1_MAX_SIZE]))
    if first == V2_SIGNATURE[:1]:
        return _parse_v2(buffer, max_v2_size)
    if not first:
        return NEED_DATA
    raise _not_a_header(first)


def _not_a_header(shown):
    return ProxyProtocolError(
        f"not a PROXY protocol header: the connection begins {shown!r}, not "
        f"{V1_SIGNATURE!r} (v1) or {V2_SIGNATURE!r} (v2)")


def _check_signature(data, signature):
    """Refuse ``data`` at its first byte that departs from ``signature``."""
    for index, (got, wanted) in enumerate(zip(data, signature)):
        if got != wanted:
            raise _not_a_header(data[:index + 1])


# --- Version 1: one line of text (section 2.1) ----------------------------------------

def _parse_v1(data):
    _check_signature(data, V1_SIGNATURE)
    # The line ends at its first CR, which must be followed by LF, within 107 bytes:
    # the last possible CR is at offset 105.
    end = _LINE_END.search(data, len(V1_SIGNATURE), V1_MAX_SIZE - 1)
    if end is None:
        if len(data) >= V1_MAX_SIZE - 1:
            raise ProxyProtocolError(
                f"PROXY v1 header: no CRLF within the first {V1_MAX_SIZE} bytes")
        return NEED_DATA
    at = end.start()
    if data[at] == 0x0A:
        raise ProxyProtocolError(
            f"PROXY v1 header: a lone LF at offset {at} (the line must end with CRLF)")
    if at + 1 == len(data):
        return NEED_DATA
    if data[at + 1] != 0x0A:
        raise ProxyProtocolError(
            f"PROXY v1 header: the CR at offset {at} is followed by "
            f"{data[at + 1:at + 2]!r}, not LF")
    return _decode_v1(data[:at].decode("latin-1"), at + 2)


def _decode_v1(line, length):
    fields = line.split(" ")
    protocol = fields[1]
    if protocol == "UNKNOWN":
        # Section 2.1: "the receiver must ignore anything presented before the CRLF".
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None, (), length)
    if protocol not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(
            f"PROXY v1 header: protocol {protocol!r} is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        raise ProxyProtocolError(
            f"PROXY v1 header: {line!r} has {len(fields)} fields separated by single "
            f"spaces, not 6 (PROXY, protocol, 2 addresses, 2 ports)")
    address = _v1_ipv4 if protocol == "TCP4" else _v1_ipv6
    source_host = address(fields[2], "source")
    destination_host = address(fields[3], "destination")
    source = (source_host, _v1_port(fields[4], "source"))
    destination = (destination_host, _v1_port(fields[5], "destination"))
    return ProxyHeader(1, "PROXY", protocol, source, destination, (), length)


def _v1_ipv4(text, role):
    parts = text.split(".")
    if len(parts) != 4 or not all(_DIGITS.fullmatch(part) for part in parts):
        raise ProxyProtocolError(
            f"PROXY v1 header: {role} address {text!r} is not an IPv4 address")
    for part in parts:
        if len(part) > 1 and part[0] == "0":
            raise ProxyProtocolError(
                f"PROXY v1 header: {role} address {text!r} has a leading zero in {part!r}")
        if int(part) > 255:
            raise ProxyProtocolError(
                f"PROXY v1 header: {role} address {text!r} has octet {part!r} above 255")
    return str(ipaddress.IPv4Address(text))


def _v1_ipv6(text, role):
    if _IPV6_TEXT.fullmatch(text):
        try:
            return str(ipaddress.IPv6Address(text))
        except ValueError:
            pass
    raise ProxyProtocolError(f"PROXY v1 header: {role} address {text!r} is not an IPv6 address")


def _v1_port(text, role):
    if not _DIGITS.fullmatch(text):
        raise ProxyProtocolError(
            f"PROXY v1 header: {role} port {text!r} is not a decimal number")
    if len(text) > 1 and text[0] == "0":
        raise ProxyProtocolError(
            f"PROXY v1 header: {role} port {text!r} has a leading zero")
    if int(text) > 0xFFFF:
        raise ProxyProtocolError(f"PROXY v1 header: {role} port {text!r} is not 0-65535")
    return int(text)


# --- Version 2: binary (section 2.2) --------------------------------------------------

def _parse_v2(buffer, max_size):
    head = bytes(buffer[:V2_HEAD_SIZE])
    _check_signature(head, V2_SIGNATURE)
    if len(head) > 12:
        version, command = head[12] >> 4, head[12] & 0x0F
        if version != 2:
            raise ProxyProtocolError(
                f"PROXY v2 header: version {version} is not 2 (byte 0x{head[12]:02x})")
        if command not in _COMMANDS:
            raise ProxyProtocolError(
                f"PROXY v2 header: command 0x{command:x} is not LOCAL (0x0) or PROXY (0x1)")
        # LOCAL ignores the family byte; PROXY must name a known one (section 2.2).
        if len(head) > 13 and command == _PROXY and head[13] not in _V2_FAMILIES:
            raise ProxyProtocolError(
                f"PROXY v2 header: family and transport byte 0x{head[13]:02x} is not "
                f"one of {_V2_FAMILY_BYTES}")
    if len(head) < V2_HEAD_SIZE:
        return NEED_DATA
    _, version_command, family_byte, rest = _V2_HEAD.unpack(head)
    size = V2_HEAD_SIZE + rest
    if size > max_size:
        raise ProxyProtocolError(
            f"PROXY v2 header: its size, {V2_HEAD_SIZE} + {rest} bytes, is above the "
            f"limit of {max_size} bytes")
    if version_command & 0x0F == _LOCAL:
        if len(buffer) < size:
            return NEED_DATA
        # Section 2.2: LOCAL "must use the real connection endpoints and discard the
        # protocol block including the family".
        return ProxyHeader(2, "LOCAL", "UNSPEC", None, None, (), size)
    family, address_size = _V2_FAMILIES[family_byte]
    if rest < address_size:
        raise ProxyProtocolError(
            f"PROXY v2 header: address length {rest} is below the {address_size} bytes "
            f"{family} needs")
    if len(buffer) < size:
        return NEED_DATA
    block = bytes(buffer[V2_HEAD_SIZE:size])
    source = destination = None
    width = _V2_ADDRESS_BYTES.get(family)
    if width:
        ports = struct.unpack_from(">HH", block, 2 * width)
        source = (str(ipaddress.ip_address(block[:width])), ports[0])
        destination = (str(ipaddress.ip_address(block[width:2 * width])), ports[1])
    return ProxyHeader(2, "PROXY", family, source, destination,
                       _v2_tlvs(block, address_size), size)


def _v2_tlvs(block, offset):
    """Split ``block[offset:]`` into ``(type, value)`` pairs; offsets in messages
    count from the start of the header."""
    tlvs = []
    while offset < len(block):
        if len(block) - offset < 3:
            raise ProxyProtocolError(
                f"PROXY v2 header: {len(block) - offset} bytes at offset "
                f"{V2_HEAD_SIZE + offset} are too few for a TLV (3 at least)")
        kind, size = struct.unpack_from(">BH", block, offset)
        end = offset + 3 + size
        if end > len(block):
            raise ProxyProtocolError(
                f"PROXY v2 header: TLV type 0x{kind:02x} at offset {V2_HEAD_SIZE + offset} "
                f"has length {size}, past the header's end at offset "
                f"{V2_HEAD_SIZE + len(block)}")
        tlvs.append((kind, block[offset + 3:end]))
        offset = end
    return tuple(tlvs)


# --- Building headers: what HAProxy sends (tests, integration tests) -----------------

def _endpoints(source, destination):
    """Return ``(source, destination)`` as ``((ip_address, port), ...)`` of one family."""
    if source is None or destination is None:
        raise ValueError("give both source and destination, or neither")
    pairs = []
    for role, (host, port) in (("source", source), ("destination", destination)):
        address = ipaddress.ip_address(host)
        if getattr(address, "scope_id", None):
            raise ValueError(f"{role} address {host!r} has a zone, which no header carries")
        if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
            raise ValueError(f"{role} port {port!r} is not an int 0-65535")
        pairs.append((address, port))
    if pairs[0][0].version != pairs[1][0].version:
        raise ValueError(f"source {source[0]!r} and destination {destination[0]!r} are "
                         f"not of one address family")
    return pairs


def build_v1(source=None, destination=None):
    """Build a version 1 header line (section 2.1), as HAProxy's ``send-proxy`` does.

    Args:
        source, destination: ``(host, port)`` (host an IPv4 or IPv6 address as text,
            both of one family; port an int 0-65535), or both None for the short
            ``PROXY UNKNOWN\\r\\n``.

    Returns:
        bytes: the line, CRLF included (at most 104 bytes).

    Raises:
        ValueError: an address or port that no header can carry, or mixed families.
    """
    if source is None and destination is None:
        return b"PROXY UNKNOWN\r\n"
    (src, sport), (dst, dport) = _endpoints(source, destination)
    protocol = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {protocol} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def build_v2(source=None, destination=None, command="PROXY", tlvs=()):
    """Build a version 2 header (section 2.2), as HAProxy's ``send-proxy-v2`` does.

    Args:
        source, destination: ``(host, port)`` as for ``build_v1`` (TCP over IPv4 or
            IPv6), or both None: family UNSPEC, no address block.
        command: "PROXY", or "LOCAL" (a health check: addresses must be None).
        tlvs: ``(type, value)`` pairs (int 0-255, bytes) appended after the addresses.

    Returns:
        bytes: the header (16 bytes, + 12 or 36 address bytes, + the TLVs).

    Raises:
        ValueError: a bad command, address, port or TLV, or more than 65535 bytes
            after the 16-byte head.
    """
    if command not in ("PROXY", "LOCAL"):
        raise ValueError(f"command {command!r} is not PROXY or LOCAL")
    if source is None and destination is None:
        family, block = 0x00, b""
    elif command == "LOCAL":
        raise ValueError("a LOCAL header carries no address (section 2.2)")
    else:
        (src, sport), (dst, dport) = _endpoints(source, destination)
        family = 0x11 if src.version == 4 else 0x21
        block = src.packed + dst.packed + struct.pack(">HH", sport, dport)
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
            raise ValueError(f"TLV type {kind!r} with {len(value)} bytes cannot be encoded")
        block += struct.pack(">BH", kind, len(value)) + bytes(value)
    if len(block) > 0xFFFF:
        raise ValueError(f"{len(block)} bytes after the 16-byte head are above 65535")
    command_bits = _LOCAL if command == "LOCAL" else _PROXY
    return _V2_HEAD.pack(V2_SIGNATURE, 0x20 | command_bits, family, len(block)) + block
