"""Tests of proxy_protocol.py (HAProxy's doc/proxy-protocol.txt): bytes in, a header,
NEED_DATA or an error out, no sockets.

The error cases include the faults other proxies' parsers were reported for: a header
split across TCP segments (nginx/nginx#1400, cloudamqp/lavinmq#2082,
eclipse-mosquitto/mosquitto#3701), v2 LOCAL from health checks (haproxy/haproxy#511,
pires/go-proxyproto#12, thingsboard/tbmq#326), the short UNKNOWN form
(envoyproxy/envoy#1728), an address block shorter than its family (apache/httpd#683),
a v2 length past the limit (CVE-2019-10097), TLVs after the addresses
(SChernykh/p2pool#399), a CRLF check off by one (FreeRADIUS/freeradius-server#5667),
ports above 65535 (mosano-eu/proxywrap#13) and IPv4 octets with leading zeros.
"""

import ipaddress

import pytest
from hypothesis import given, settings, strategies as st

import proxy_protocol as pp
from proxy_protocol import NEED_DATA, ProxyHeader, ProxyProtocolError, parse

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
TRAIL = b"\x00\x00\x00\x0a" + b'{"type":5}'  # a PING frame: the stream's own data
FFFF6 = ":".join(["ffff"] * 8)
NOT_A_HEADER = ("not a PROXY protocol header: the connection begins {}, not b'PROXY ' "
                "(v1) or b'\\r\\n\\r\\n\\x00\\r\\nQUIT\\n' (v2)")


def v1(source, destination, length, family="TCP4"):
    return ProxyHeader(1, "PROXY", family, source, destination, (), length)


def v2(family, source, destination, length, tlvs=(), command="PROXY"):
    return ProxyHeader(2, command, family, source, destination, tlvs, length)


# (name, header bytes, expected result): each also runs split at every byte.
VALID = [
    ("spec 2.1 example",
     b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
     v1(("192.168.0.1", 56324), ("192.168.0.11", 443), 47)),
    ("spec 2.1 longest TCP4 line, 56 bytes",
     b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
     v1(("255.255.255.255", 65535), ("255.255.255.255", 65535), 56)),
    ("spec 2.1 longest TCP6 line, 104 bytes",
     f"PROXY TCP6 {FFFF6} {FFFF6} 65535 65535\r\n".encode(),
     v1((FFFF6, 65535), (FFFF6, 65535), 104, "TCP6")),
    ("spec 2.1 UNKNOWN short form, 15 bytes",
     b"PROXY UNKNOWN\r\n",
     v1(None, None, 15, "UNKNOWN")),
    ("spec 2.1 UNKNOWN worst case, 107 bytes",
     f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 65535\r\n".encode(),
     v1(None, None, 107, "UNKNOWN")),
    ("v1 UNKNOWN ignores the rest of its line",
     b"PROXY UNKNOWN anything \x00\xff at all\r\n",
     v1(None, None, 34, "UNKNOWN")),
    ("v1 zero address and port 0",
     b"PROXY TCP4 0.0.0.0 10.0.0.1 0 9\r\n",
     v1(("0.0.0.0", 0), ("10.0.0.1", 9), 33)),
    ("v1 IPv6 upper case and uncompressed, formatted by ipaddress",
     b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::1 1 65535\r\n",
     v1(("2001:db8::1", 1), ("::1", 65535), 45, "TCP6")),
    ("v1 IPv6 with an embedded IPv4 (HAProxy's inet_ntop writes it so)",
     b"PROXY TCP6 ::ffff:192.0.2.1 :: 5 6\r\n",
     v1((str(ipaddress.IPv6Address("::ffff:192.0.2.1")), 5), ("::", 6), 36, "TCP6")),
    # The two that Debian's HAProxy 2.6.12 sent in the deploy/haproxy.cfg experiment.
    ("HAProxy 2.6 health check: v2 LOCAL, UNSPEC, no address",
     bytes.fromhex("0d0a0d0a000d0a515549540a20000000"),
     v2("UNSPEC", None, None, 16, command="LOCAL")),
    ("HAProxy 2.6 client connection: v2 PROXY TCP4",
     bytes.fromhex("0d0a0d0a000d0a515549540a2111000c7f0000027f000001c6efb5c9"),
     v2("TCP4", ("127.0.0.2", 50927), ("127.0.0.1", 46537), 28)),
    ("v2 TCP6",
     SIG + b"\x21\x21\x00\x24" + ipaddress.IPv6Address("2001:db8::1").packed
     + ipaddress.IPv6Address("::1").packed + b"\x01\xbb\x00\x50",
     v2("TCP6", ("2001:db8::1", 443), ("::1", 80), 52)),
    ("v2 TCP4 with ALPN, AUTHORITY and an empty NOOP TLV",
     SIG + b"\x21\x11\x00\x22" + bytes([10, 0, 0, 1, 10, 0, 0, 2]) + b"\x04\xd2\x16\x2e"
     + b"\x01\x00\x02h2" + b"\x02\x00\x0bexample.com" + b"\x04\x00\x00",
     v2("TCP4", ("10.0.0.1", 1234), ("10.0.0.2", 5678), 50,
        ((0x01, b"h2"), (0x02, b"example.com"), (0x04, b"")))),
    ("v2 LOCAL with dummy IPv4 addresses (AWS NLB health checks): skipped whole",
     SIG + b"\x20\x11\x00\x0c" + bytes(12),
     v2("UNSPEC", None, None, 28, command="LOCAL")),
    ("v2 LOCAL ignores its family byte",
     SIG + b"\x20\xff\x00\x00",
     v2("UNSPEC", None, None, 16, command="LOCAL")),
    ("v2 PROXY UNSPEC: the real addresses",
     SIG + b"\x21\x00\x00\x00",
     v2("UNSPEC", None, None, 16)),
    ("v2 PROXY UNSPEC with a TLV",
     SIG + b"\x21\x00\x00\x05" + b"\x04\x00\x02\x00\x00",
     v2("UNSPEC", None, None, 21, ((0x04, b"\x00\x00"),))),
    ("v2 UDP4 falls back to the real addresses",
     SIG + b"\x21\x12\x00\x0c" + bytes(range(12)),
     v2("UDP4", None, None, 28)),
    ("v2 UDP6 falls back to the real addresses",
     SIG + b"\x21\x22\x00\x24" + bytes(36),
     v2("UDP6", None, None, 52)),
    ("v2 AF_UNIX stream: 2 x 108 bytes, falls back to the real addresses",
     SIG + b"\x21\x31\x00\xd8" + b"/run/a.sock".ljust(108, b"\x00")
     + b"/run/b.sock".ljust(108, b"\x00"),
     v2("UNIX_STREAM", None, None, 232)),
    ("v2 AF_UNIX datagram with a TLV after the addresses",
     SIG + b"\x21\x32\x00\xdb" + bytes(216) + b"\xe0\x00\x00",
     v2("UNIX_DGRAM", None, None, 235, ((0xE0, b""),))),
]


@pytest.mark.parametrize("header, expected", [case[1:] for case in VALID],
                         ids=[case[0] for case in VALID])
def test_valid_header_and_trailing_data_untouched(header, expected):
    assert len(header) == expected.length
    for kind in (bytes, bytearray, memoryview):
        buffer = kind(header + TRAIL)
        assert parse(buffer) == expected
        assert bytes(buffer[expected.length:]) == TRAIL


@pytest.mark.parametrize("header, expected", [case[1:] for case in VALID],
                         ids=[case[0] for case in VALID])
def test_valid_header_split_at_every_byte(header, expected):
    for end in range(len(header)):
        assert parse(header[:end]) is NEED_DATA, end
    assert parse(header) == expected


def v1_line(text):
    return text.encode("latin-1")


ADDRESSES = b"PROXY TCP4 1.2.3.4 5.6.7.8 "

# (name, bytes, exact message). Each is also fed split at every byte.
ERRORS = [
    # Not a PROXY header at all: refused at the first byte that departs.
    ("HTTP", b"GET / HTTP/1.1\r\n", NOT_A_HEADER.format("b'G'")),
    ("a frame sent without header", TRAIL, NOT_A_HEADER.format("b'\\x00'")),
    ("TLS ClientHello", b"\x16\x03\x01\x02\x00", NOT_A_HEADER.format("b'\\x16'")),
    ("lower-case v1", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", NOT_A_HEADER.format("b'p'")),
    ("PROXY without its space", b"PROXY\r\n", NOT_A_HEADER.format("b'PROXY\\r'")),
    ("v1 signature cut short", b"PROXX TCP4", NOT_A_HEADER.format("b'PROXX'")),
    ("v2 signature departing at byte 8", SIG[:7] + b"X" + SIG[8:],
     NOT_A_HEADER.format("b'\\r\\n\\r\\n\\x00\\r\\nX'")),
    ("CRLF then HTTP", b"\r\nGET /", NOT_A_HEADER.format("b'\\r\\nG'")),
    # v2 fixed part.
    ("v2 version 1", SIG + b"\x11\x11\x00\x0c",
     "PROXY v2 header: version 1 is not 2 (byte 0x11)"),
    ("v2 version 3", SIG + b"\x31\x11\x00\x0c",
     "PROXY v2 header: version 3 is not 2 (byte 0x31)"),
    ("v2 command 2", SIG + b"\x22\x11\x00\x0c",
     "PROXY v2 header: command 0x2 is not LOCAL (0x0) or PROXY (0x1)"),
    ("v2 command 0xf", SIG + b"\x2f\x00\x00\x00",
     "PROXY v2 header: command 0xf is not LOCAL (0x0) or PROXY (0x1)"),
    ("v2 family 4", SIG + b"\x21\x41\x00\x0c",
     "PROXY v2 header: family and transport byte 0x41 is not one of "
     "0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32"),
    ("v2 transport 3", SIG + b"\x21\x13\x00\x0c",
     "PROXY v2 header: family and transport byte 0x13 is not one of "
     "0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32"),
    ("v2 AF_INET with UNSPEC transport", SIG + b"\x21\x10\x00\x0c",
     "PROXY v2 header: family and transport byte 0x10 is not one of "
     "0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32"),
    ("v2 TCP4 address block of 8 bytes", SIG + b"\x21\x11\x00\x08" + bytes(8),
     "PROXY v2 header: address length 8 is below the 12 bytes TCP4 needs"),
    ("v2 TCP6 with an IPv4-sized block", SIG + b"\x21\x21\x00\x0c" + bytes(12),
     "PROXY v2 header: address length 12 is below the 36 bytes TCP6 needs"),
    ("v2 UDP6 block of 0 bytes", SIG + b"\x21\x22\x00\x00",
     "PROXY v2 header: address length 0 is below the 36 bytes UDP6 needs"),
    ("v2 AF_UNIX with an IPv4-sized block", SIG + b"\x21\x31\x00\x0c" + bytes(12),
     "PROXY v2 header: address length 12 is below the 216 bytes UNIX_STREAM needs"),
    ("v2 above the 4096-byte default limit", SIG + b"\x21\x11\x0f\xf1",
     "PROXY v2 header: its size, 16 + 4081 bytes, is above the limit of 4096 bytes"),
    ("v2 LOCAL above the limit too", SIG + b"\x20\x00\xff\xff",
     "PROXY v2 header: its size, 16 + 65535 bytes, is above the limit of 4096 bytes"),
    # v2 TLVs.
    ("v2 2 bytes left after the addresses", SIG + b"\x21\x11\x00\x0e" + bytes(14),
     "PROXY v2 header: 2 bytes at offset 28 are too few for a TLV (3 at least)"),
    ("v2 TLV longer than the header", SIG + b"\x21\x11\x00\x11" + bytes(12) + b"\x01\x00\x05h2",
     "PROXY v2 header: TLV type 0x01 at offset 28 has length 5, past the header's "
     "end at offset 33"),
    ("v2 second TLV past the end",
     SIG + b"\x21\x00\x00\x06" + b"\x04\x00\x00" + b"\x20\x00\x01",
     "PROXY v2 header: TLV type 0x20 at offset 19 has length 1, past the header's "
     "end at offset 22"),
    # v1 line ends.
    ("v1 without CRLF in 107 bytes", b"PROXY UNKNOWN " + b"x" * 100,
     "PROXY v1 header: no CRLF within the first 107 bytes"),
    ("v1 line of 108 bytes", b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n",
     "PROXY v1 header: no CRLF within the first 107 bytes"),
    ("v1 ended by LF alone", ADDRESSES + b"1 2\n",
     "PROXY v1 header: a lone LF at offset 30 (the line must end with CRLF)"),
    ("v1 ended by LF CR", ADDRESSES + b"1 2\n\r",
     "PROXY v1 header: a lone LF at offset 30 (the line must end with CRLF)"),
    ("v1 ended by CR alone", ADDRESSES + b"1 2\rGET",
     "PROXY v1 header: the CR at offset 30 is followed by b'G', not LF"),
    ("v1 UNKNOWN with a lone LF in its rest", b"PROXY UNKNOWN a\nb\r\n",
     "PROXY v1 header: a lone LF at offset 15 (the line must end with CRLF)"),
    # v1 protocol and fields.
    ("v1 protocol TCP5", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
     "PROXY v1 header: protocol 'TCP5' is not TCP4, TCP6 or UNKNOWN"),
    ("v1 protocol UDP4", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
     "PROXY v1 header: protocol 'UDP4' is not TCP4, TCP6 or UNKNOWN"),
    ("v1 protocol UNKNOWNX", b"PROXY UNKNOWNX\r\n",
     "PROXY v1 header: protocol 'UNKNOWNX' is not TCP4, TCP6 or UNKNOWN"),
    ("v1 empty line", b"PROXY \r\n",
     "PROXY v1 header: protocol '' is not TCP4, TCP6 or UNKNOWN"),
    ("v1 two spaces after PROXY", b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
     "PROXY v1 header: protocol '' is not TCP4, TCP6 or UNKNOWN"),
    ("v1 TCP4 without its fields", b"PROXY TCP4\r\n",
     "PROXY v1 header: 'PROXY TCP4' has 2 fields separated by single spaces, not 6 "
     "(PROXY, protocol, 2 addresses, 2 ports)"),
    ("v1 one port missing", b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n",
     "PROXY v1 header: 'PROXY TCP4 1.2.3.4 5.6.7.8 80' has 5 fields separated by "
     "single spaces, not 6 (PROXY, protocol, 2 addresses, 2 ports)"),
    ("v1 space before CRLF", ADDRESSES + b"1 2 \r\n",
     "PROXY v1 header: 'PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ' has 7 fields separated by "
     "single spaces, not 6 (PROXY, protocol, 2 addresses, 2 ports)"),
    ("v1 tab between fields", b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n",
     "PROXY v1 header: 'PROXY TCP4 1.2.3.4\\t5.6.7.8 1 2' has 5 fields separated by "
     "single spaces, not 6 (PROXY, protocol, 2 addresses, 2 ports)"),
    # v1 IPv4 addresses.
    ("v1 octet 256", b"PROXY TCP4 256.1.1.1 5.6.7.8 1 2\r\n",
     "PROXY v1 header: source address '256.1.1.1' has octet '256' above 255"),
    ("v1 octet 1000", b"PROXY TCP4 1.2.3.4 5.6.7.1000 1 2\r\n",
     "PROXY v1 header: destination address '5.6.7.1000' has octet '1000' above 255"),
    ("v1 octet with a leading zero (octal?)", b"PROXY TCP4 1.2.3.010 5.6.7.8 1 2\r\n",
     "PROXY v1 header: source address '1.2.3.010' has a leading zero in '010'"),
    ("v1 octet 00", b"PROXY TCP4 1.2.3.4 00.6.7.8 1 2\r\n",
     "PROXY v1 header: destination address '00.6.7.8' has a leading zero in '00'"),
    ("v1 three octets", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
     "PROXY v1 header: source address '1.2.3' is not an IPv4 address"),
    ("v1 five octets", b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n",
     "PROXY v1 header: source address '1.2.3.4.5' is not an IPv4 address"),
    ("v1 hexadecimal octet", b"PROXY TCP4 1.2.3.0x4 5.6.7.8 1 2\r\n",
     "PROXY v1 header: source address '1.2.3.0x4' is not an IPv4 address"),
    ("v1 superscript digit", b"PROXY TCP4 1.2.3.\xb2 5.6.7.8 1 2\r\n",
     "PROXY v1 header: source address '1.2.3.\xb2' is not an IPv4 address"),
    ("v1 IPv6 address in TCP4", b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
     "PROXY v1 header: source address '::1' is not an IPv4 address"),
    # v1 IPv6 addresses.
    ("v1 IPv4 address in TCP6", b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
     "PROXY v1 header: source address '1.2.3.4' is not an IPv6 address"),
    ("v1 IPv6 with a zone", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
     "PROXY v1 header: source address 'fe80::1%eth0' is not an IPv6 address"),
    ("v1 IPv6 in brackets", b"PROXY TCP6 ::1 [::1] 1 2\r\n",
     "PROXY v1 header: destination address '[::1]' is not an IPv6 address"),
    ("v1 IPv6 of 9 groups", b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n",
     "PROXY v1 header: source address '1:2:3:4:5:6:7:8:9' is not an IPv6 address"),
    ("v1 IPv6 with two ::", b"PROXY TCP6 1::2::3 ::1 1 2\r\n",
     "PROXY v1 header: source address '1::2::3' is not an IPv6 address"),
    ("v1 IPv6 group of 5 digits", b"PROXY TCP6 12345::1 ::1 1 2\r\n",
     "PROXY v1 header: source address '12345::1' is not an IPv6 address"),
    # v1 ports.
    ("v1 port 99999", ADDRESSES + b"99999 2\r\n",
     "PROXY v1 header: source port '99999' is not 0-65535"),
    ("v1 port 65536", ADDRESSES + b"1 65536\r\n",
     "PROXY v1 header: destination port '65536' is not 0-65535"),
    ("v1 port with a leading zero", ADDRESSES + b"080 2\r\n",
     "PROXY v1 header: source port '080' has a leading zero"),
    ("v1 port 00", ADDRESSES + b"1 00\r\n",
     "PROXY v1 header: destination port '00' has a leading zero"),
    ("v1 negative port", ADDRESSES + b"-1 2\r\n",
     "PROXY v1 header: source port '-1' is not a decimal number"),
    ("v1 port with a plus sign", ADDRESSES + b"+1 2\r\n",
     "PROXY v1 header: source port '+1' is not a decimal number"),
    ("v1 port with an underscore (int() takes it)", ADDRESSES + b"1_000 2\r\n",
     "PROXY v1 header: source port '1_000' is not a decimal number"),
    ("v1 empty port", ADDRESSES + b"1 \r\n",
     "PROXY v1 header: destination port '' is not a decimal number"),
]


@pytest.mark.parametrize("data, message", [case[1:] for case in ERRORS],
                         ids=[case[0] for case in ERRORS])
def test_error_message(data, message):
    with pytest.raises(ProxyProtocolError) as caught:
        parse(data)
    assert caught.value.message == message
    assert str(caught.value) == message


@pytest.mark.parametrize("data, message", [case[1:] for case in ERRORS],
                         ids=[case[0] for case in ERRORS])
def test_error_split_at_every_byte(data, message):
    """Prefixes give NEED_DATA until the faulty byte arrives, then that same error."""
    refused = False
    for end in range(len(data) + 1):
        try:
            assert parse(data[:end]) is NEED_DATA, end
            assert not refused, f"NEED_DATA at {end} bytes after an error"
        except ProxyProtocolError as exc:
            refused = True
            assert exc.message == message, end
    assert refused


@pytest.mark.parametrize("data", [
    b"G", b"\x00", b"PROXX", SIG[:5] + b"X",     # the first byte that departs
    SIG + b"\x31",                               # the version, alone
    SIG + b"\x22",                               # the command, alone
    SIG + b"\x21\x13",                           # the family byte, alone
    SIG + b"\x21\x11\x00\x08",                   # 16 bytes: address block too short
    SIG + b"\x21\x11\x10\x00",                   # 16 bytes: above the limit
    b"PROXY UNKNOWN " + b"x" * 92,               # 106 bytes: no room left for CRLF
    b"PROXY TCP4 1.2.3.4\n",                     # a lone LF, before the line is whole
], ids=repr)
def test_refused_as_soon_as_the_fault_arrives(data):
    with pytest.raises(ProxyProtocolError):
        parse(data)


def test_waits_up_to_the_last_place_for_crlf():
    assert parse(b"PROXY UNKNOWN " + b"x" * 91) is NEED_DATA          # 105 bytes
    assert parse(b"PROXY UNKNOWN " + b"x" * 91 + b"\r") is NEED_DATA  # 106: CR last
    assert parse(b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n") == v1(None, None, 107, "UNKNOWN")


def test_v2_limit_default_and_maximum():
    at_default = SIG + b"\x21\x11" + (4096 - 16).to_bytes(2, "big") + bytes(12) \
        + b"\x04" + (4096 - 16 - 12 - 3).to_bytes(2, "big") + bytes(4096 - 16 - 12 - 3)
    assert parse(at_default).length == 4096
    largest = SIG + b"\x21\x11\xff\xff" + bytes(12) + b"\x04" \
        + (65535 - 15).to_bytes(2, "big") + bytes(65535 - 15)
    assert len(largest) == pp.V2_MAX_SIZE == 65551
    with pytest.raises(ProxyProtocolError):
        parse(largest)
    header = parse(largest + TRAIL, max_v2_size=pp.V2_MAX_SIZE)
    assert (header.length, header.tlvs) == (65551, ((0x04, bytes(65520)),))
    assert parse(largest[:-1], max_v2_size=pp.V2_MAX_SIZE) is NEED_DATA


def test_v2_smaller_limit():
    header = pp.build_v2(("::1", 1), ("::1", 2))
    assert parse(header, max_v2_size=52).length == 52
    with pytest.raises(ProxyProtocolError) as caught:
        parse(pp.build_v2(("::1", 1), ("::1", 2), tlvs=[(4, b"")]), max_v2_size=52)
    assert caught.value.message == ("PROXY v2 header: its size, 16 + 39 bytes, is above "
                                    "the limit of 52 bytes")


@pytest.mark.parametrize("size", [0, 51, 65552])
def test_v2_limit_out_of_range(size):
    with pytest.raises(ValueError) as caught:
        parse(b"", max_v2_size=size)
    assert str(caught.value) == f"max_v2_size must be 52 to 65551 bytes (a TCP6 header " \
                                f"fits), got {size}"


def test_need_data_and_error_types():
    assert parse(b"") is NEED_DATA
    assert repr(NEED_DATA) == "NEED_DATA"
    assert issubclass(ProxyProtocolError, ValueError)


# --- Builders ---------------------------------------------------------------------------

def test_build_exact_bytes():
    assert pp.build_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == \
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    assert pp.build_v1(("2001:db8::1", 1), ("::1", 2)) == b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n"
    assert pp.build_v1() == b"PROXY UNKNOWN\r\n"
    assert pp.build_v2(command="LOCAL") == bytes.fromhex("0d0a0d0a000d0a515549540a20000000")
    assert pp.build_v2(("127.0.0.2", 50927), ("127.0.0.1", 46537)) == \
        bytes.fromhex("0d0a0d0a000d0a515549540a2111000c7f0000027f000001c6efb5c9")
    assert pp.build_v2() == SIG + b"\x21\x00\x00\x00"
    assert pp.build_v2(tlvs=[(0x02, b"example.com")]) == \
        SIG + b"\x21\x00\x00\x0e\x02\x00\x0bexample.com"


@pytest.mark.parametrize("call, message", [
    (lambda: pp.build_v1(("1.2.3.4", 1), ("::1", 2)),
     "source '1.2.3.4' and destination '::1' are not of one address family"),
    (lambda: pp.build_v1(("1.2.3.4", 1), None), "give both source and destination, or neither"),
    (lambda: pp.build_v1(("1.2.3.4", 65536), ("1.2.3.4", 2)),
     "source port 65536 is not an int 0-65535"),
    (lambda: pp.build_v2(("fe80::1%eth0", 1), ("::1", 2)),
     "source address 'fe80::1%eth0' has a zone, which no header carries"),
    (lambda: pp.build_v2(("::1", 1), ("::1", 2), command="LOCAL"),
     "a LOCAL header carries no address (section 2.2)"),
    (lambda: pp.build_v2(command="HEALTH"), "command 'HEALTH' is not PROXY or LOCAL"),
    (lambda: pp.build_v2(tlvs=[(256, b"")]), "TLV type 256 with 0 bytes cannot be encoded"),
    (lambda: pp.build_v2(tlvs=[(1, bytes(40000)), (2, bytes(40000))]),
     "80006 bytes after the 16-byte head are above 65535"),
])
def test_build_refuses(call, message):
    with pytest.raises(ValueError) as caught:
        call()
    assert str(caught.value) == message


# --- Properties -------------------------------------------------------------------------

ports = st.integers(0, 65535)
trailing = st.binary(max_size=40)
tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=30)), max_size=4)


@st.composite
def endpoints(draw):
    """A source and a destination of one family: ((host, port), (host, port))."""
    version = draw(st.sampled_from([4, 6]))
    return tuple((str(draw(st.ip_addresses(v=version))), draw(ports)) for _ in range(2))


def assert_prefixes_wait(data, length):
    for end in (0, 1, length // 2, length - 1):
        assert parse(data[:end]) is NEED_DATA


@given(endpoints(), trailing)
def test_v1_round_trip(pair, rest):
    (source, destination) = pair
    header = pp.build_v1(source, destination)
    family = "TCP4" if ":" not in source[0] else "TCP6"
    assert parse(header + rest) == v1(source, destination, len(header), family)
    assert len(header) <= 104
    assert_prefixes_wait(header + rest, len(header))


@given(endpoints(), tlv_lists, trailing)
def test_v2_round_trip(pair, tlvs, rest):
    (source, destination) = pair
    header = pp.build_v2(source, destination, tlvs=tlvs)
    family = "TCP4" if ":" not in source[0] else "TCP6"
    assert parse(header + rest) == v2(family, source, destination, len(header), tuple(tlvs))
    assert_prefixes_wait(header + rest, len(header))


@given(st.sampled_from(["PROXY", "LOCAL"]), tlv_lists, trailing)
def test_v2_without_addresses_round_trip(command, tlvs, rest):
    header = pp.build_v2(command=command, tlvs=tlvs)
    expected_tlvs = tuple(tlvs) if command == "PROXY" else ()
    assert parse(header + rest) == v2("UNSPEC", None, None, len(header), expected_tlvs,
                                      command)


@st.composite
def damaged(draw):
    """A built header with trailing data, one byte of it replaced."""
    pair = draw(endpoints())
    header = draw(st.sampled_from([pp.build_v1(*pair), pp.build_v2(*pair),
                                   pp.build_v2(command="LOCAL"), pp.build_v1()]))
    data = bytearray(header + draw(trailing))
    data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=300)
@given(st.one_of(damaged(), st.binary(max_size=120),
                 st.binary(max_size=120).map(lambda tail: SIG + tail),
                 st.binary(max_size=120).map(lambda tail: b"PROXY " + tail)))
def test_any_bytes_wait_then_settle(data):
    """Every buffer gives NEED_DATA, a header or one ProxyProtocolError with a one-line
    message; once a prefix settles, every longer prefix gives the same result."""
    settled = None
    for end in range(len(data) + 1):
        try:
            result = parse(data[:end])
        except ProxyProtocolError as exc:
            assert "\n" not in exc.message and "\r" not in exc.message
            result = exc.message
        if settled is not None:
            assert result == settled, end
        elif result is not NEED_DATA:
            settled = result
            if isinstance(result, ProxyHeader):
                assert result.length <= end
