"""Wire protocol of the policy-routed reverse proxy: frames and messages, no I/O.

This module implements PROTOCOL.md (version 1.2, and the project's registration proof
of section 9) and nothing else. It never touches a socket, a thread or a clock, so
every rule of the contract can be tested with bytes in and bytes out.

Strategy, after h11 and websockets' ``protocol.py``:

* ``FrameDecoder`` is fed any chunks of received bytes and hands out whole frame
  bodies. It checks a frame's length prefix as soon as the four bytes are there,
  before it buffers any of the body, so an oversized length costs nothing.
* ``parse_message`` turns one frame body into a validated message: a ``dict`` whose
  ``type`` is a ``MessageType`` and whose other fields are as received (unknown
  fields are kept, because the proxy passes them on).
* ``parse_passable`` parses a frame the proxy passes on, and gives the frame to
  send: the bytes received, when they are already in the protocol's output form.
  DATA and ACK bodies in the compact form (``encode_frame``'s, and most peers') are
  read by a strict pattern three times faster than by the JSON decoder.
* ``encode_frame`` and the builders (``data``, ``setup``, ``ack``, ...) go the
  other way.
* Every fault is one ``ProtocolError`` carrying the PROTOCOL.md error code to send
  back and a one-line message that names the value at fault, so that turning any
  failure into an ERROR frame is ``error_message(exc)``.

Exception tree::

    ProtocolError            code, message; ``fatal`` says close the connection
    ├── FrameError           BAD_FRAME: the byte stream is out of step (fatal)
    │   └── FrameTooLarge    FRAME_TOO_LARGE (fatal)
    ├── MessageError         BAD_MESSAGE: one bad frame, the stream is still fine
    └── ServiceError         the message was fine but cannot be served:
                             NO_SERVER, UPSTREAM_FAILED, TIMEOUT, OVERLOADED,
                             UNAUTHORIZED
"""

import enum
import hashlib
import hmac
import ipaddress
import json
import math
import re
import struct

__all__ = [
    "DEFAULT_MAX_FRAME", "MessageType", "ProtocolError", "FrameError", "FrameTooLarge",
    "MessageError", "ServiceError", "FrameDecoder", "encode_frame", "parse_message",
    "validate_message",
    "data", "setup", "ack", "error", "registered", "ping", "pong", "error_message",
    "sha1_hex", "ack_for", "policy_text", "setup_proof", "check_setup_proof",
    "parse_hostport", "parse_port", "show", "parse_passable", "frame_of", "is_host",
    "MAX_WEIGHT", "MAX_ID_LENGTH", "format_address", "parse_hostports", "ERROR_CODES", "CLOSING_CODES",
]

# 1 MiB, PROTOCOL.md section 1. A demo payload is a few bytes; the largest frame the
# tests send is 300 kB. nginx's client_max_body_size defaults to 1 MiB too.
DEFAULT_MAX_FRAME = 1 << 20

# The largest SETUP weight (PROTOCOL.md section 8). HAProxy's server weights run from
# 0 to 256, nginx's have no upper bound.
MAX_WEIGHT = 256

# The longest heartbeat accepted, in seconds. PROTOCOL.md sets no bound; an hour keeps
# 3 x heartbeat a timeout that sockets can take, and a silent server is still found
# within a few hours. Envoy's health-check intervals are seconds, too.
MAX_HEARTBEAT = 3600

# The longest server id and policy id a SETUP may give, in characters of their text.
# PROTOCOL.md sets no bound; they stay in the registry and label every line of the
# stats page and /metrics. DNS names stop at 253, Prometheus advises short label
# values; 256 leaves room for any name a person would choose.
MAX_ID_LENGTH = 256

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size

# Error codes of PROTOCOL.md section 2.
BAD_FRAME = "BAD_FRAME"
FRAME_TOO_LARGE = "FRAME_TOO_LARGE"
BAD_MESSAGE = "BAD_MESSAGE"
NO_SERVER = "NO_SERVER"
UPSTREAM_FAILED = "UPSTREAM_FAILED"
TIMEOUT = "TIMEOUT"
OVERLOADED = "OVERLOADED"
UNAUTHORIZED = "UNAUTHORIZED"
ERROR_CODES = (BAD_FRAME, FRAME_TOO_LARGE, BAD_MESSAGE, NO_SERVER, UPSTREAM_FAILED, TIMEOUT,
               OVERLOADED, UNAUTHORIZED)

# The codes after which the sender closes the connection: a framing error (section 1)
# and a frame that did not arrive in time. The frames sent behind the one they answer
# were never read.
CLOSING_CODES = frozenset((BAD_FRAME, FRAME_TOO_LARGE, TIMEOUT))


class MessageType(enum.IntEnum):
    """Message types of PROTOCOL.md sections 2 and 6."""

    DATA = 0
    SETUP = 1
    ACK = 2
    ERROR = 3
    REGISTERED = 4
    PING = 5
    PONG = 6


class ProtocolError(Exception):
    """A fault to report to the peer as one ERROR frame (PROTOCOL.md section 2).

    Attributes:
        code: the PROTOCOL.md error code, for example ``"BAD_MESSAGE"``.
        message: one sentence naming the value at fault.
        fatal: True when the connection must be closed after the ERROR frame.
    """

    code = BAD_MESSAGE
    fatal = False

    def __init__(self, message, code=None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self):
        return f"{self.code}: {self.message}"


class FrameError(ProtocolError):
    """The length prefix is invalid: the stream can no longer be trusted (section 1)."""

    code = BAD_FRAME
    fatal = True


class FrameTooLarge(FrameError):
    """The length prefix is above the receiver's maximum frame size (section 1)."""

    code = FRAME_TOO_LARGE


class MessageError(ProtocolError):
    """A well-framed body that is not a valid message: BAD_MESSAGE (sections 1, 2)."""

    code = BAD_MESSAGE


class ServiceError(ProtocolError):
    """A valid message that cannot be served; ``code`` is set by the raiser."""


def show(value, limit=64):
    """Return ``value`` as text fit for one log line: printable, at most ``limit`` chars.

    Strings are shown as they are unless they hold control characters (then as a
    Python literal), so that a hostile id cannot forge log lines.
    """
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (RecursionError, ValueError):
            text = f"(a deeply nested {type(value).__name__})"
    if not text.isprintable():
        text = repr(text)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} chars)"
    return text


class FrameDecoder:
    """Incremental decoder of length-prefixed frames (PROTOCOL.md section 1).

    Feed it received bytes in chunks of any size with ``feed``; take whole frame
    bodies out with ``next_frame``. It never buffers the body of a frame whose length
    prefix it refuses.

    Args:
        max_frame: the largest body accepted, in bytes (>= 1).
    """

    def __init__(self, max_frame=DEFAULT_MAX_FRAME):
        if max_frame < 1:
            raise ValueError(f"max_frame must be at least 1 byte, got {max_frame}")
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._error = None

    def clear(self):
        """Drop the bytes buffered (the connection is gone)."""
        self._buffer = bytearray()

    def feed(self, chunk):
        """Append received bytes (``bytes`` or ``bytearray``) to the buffer."""
        if self._error is None:
            self._buffer += chunk

    @property
    def in_frame(self):
        """True when part of a frame has arrived and the rest has not."""
        return bool(self._buffer)

    def next_frame(self):
        """Return the next whole frame body as ``bytes``, or None if more data is needed.

        Raises:
            FrameTooLarge: the length prefix is above ``max_frame``.
            FrameError: the length prefix is 0.
            Once raised, the same error is raised on every later call: the stream
            is out of step for good.
        """
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        if len(buffer) < HEADER_SIZE:
            return None
        (length,) = _HEADER.unpack_from(buffer)
        if length == 0 or length > self.max_frame:
            self._buffer = bytearray()
            self._error = _length_error(length, self.max_frame)
            raise self._error
        end = HEADER_SIZE + length
        if len(buffer) < end:
            return None
        body = bytes(buffer[HEADER_SIZE:end])
        del buffer[:end]
        return body

    def frames(self):
        """Return every whole frame body in the buffer, in order, and the framing error
        that follows them, if any: ``(bodies, error)``.

        One call does the work of many ``next_frame`` calls and moves the rest of the
        buffer once, which is what a reader that batches (the proxy's loop) wants.

        Returns:
            (list of bytes, FrameError or None): the bodies, and the error of a bad
            length prefix after them. Once an error is returned, every later call
            returns ``([], that error)``: the stream is out of step for good.
        """
        if self._error is not None:
            return [], self._error
        buffer = self._buffer
        size = len(buffer)
        bodies = []
        start = 0
        unpack = _HEADER.unpack_from
        while size - start >= HEADER_SIZE:
            (length,) = unpack(buffer, start)
            if length == 0 or length > self.max_frame:
                self._buffer = bytearray()
                self._error = _length_error(length, self.max_frame)
                return bodies, self._error
            end = start + HEADER_SIZE + length
            if end > size:
                break
            bodies.append(bytes(buffer[start + HEADER_SIZE:end]))
            start = end
        if start:
            del buffer[:start]
        return bodies, None


def _length_error(length, max_frame):
    if length == 0:
        return FrameError("frame length is 0; a frame body holds at least 1 byte")
    return FrameTooLarge(f"frame length {length} bytes is above the maximum of {max_frame} bytes")


def frame_of(body):
    """Return the frame that carries ``body`` (bytes): its length prefix, then it."""
    return _HEADER.pack(len(body)) + body


def encode_frame(message):
    """Encode one message (a ``dict``) as a frame: 4-byte big-endian length + JSON body.

    Strings go out as UTF-8, not ``\\u`` escapes, so a forwarded frame is never longer
    than the one received.

    Returns:
        bytes: the whole frame.
    """
    return frame_of(json.dumps(message, ensure_ascii=False, separators=(",", ":"),
                               allow_nan=False).encode("utf-8"))


# --- Parsing and validation (PROTOCOL.md section 2) --------------------------------

def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def _reject_constant(name):
    raise ValueError(f"{name} is not a JSON number")


class _RepeatedName(ValueError):
    pass


def _unique_object(pairs):
    # A name given twice in one object is ambiguous: RFC 8259 section 4 says names
    # SHOULD be unique and parsers differ on which value wins (Python keeps the last,
    # others the first). The proxy passes frames on as received, so what it routes on
    # must be what every server reads: such a frame is refused, as HAProxy refuses a
    # request with two different Content-Length headers.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for name, _ in pairs:
            if name in seen:
                raise _RepeatedName(name)
            seen.add(name)
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_object,
                            parse_constant=_reject_constant, parse_float=_finite_float)


def _check_text(value, field):
    # A JSON "\ud800" escape decodes to a lone surrogate, which cannot be encoded
    # again and would break every later log line or forward.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise MessageError(f"field '{field}' holds a lone surrogate, which is not Unicode text") from None


def _require(message, field):
    if field not in message:
        raise MessageError(
            f"{MessageType(message['type']).name} message has no '{field}' field")
    return message[field]


def _check_id(message, field):
    value = _require(message, field)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise MessageError(f"field '{field}' must be a string or an integer, got {show(value)}")
    if isinstance(value, str):
        if not value:
            raise MessageError(f"field '{field}' is an empty string")
        _check_text(value, field)


def _check_string(message, field):
    value = _require(message, field)
    if not isinstance(value, str):
        raise MessageError(f"field '{field}' must be a string, got {show(value)}")
    _check_text(value, field)
    return value


def _shown_as_sent(value):
    # A value of the wrong type shown as JSON: "3" (a string) is not 3 (a number).
    return show(json.dumps(value, ensure_ascii=False) if isinstance(value, str) else value)


def _check_count(message, field):
    value = _require(message, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MessageError(f"field '{field}' must be a non-negative integer, got "
                           f"{_shown_as_sent(value)}")
    return value


def _validate_data(message):
    _check_id(message, "srcid")
    _check_id(message, "privPoliId")
    payload = _check_string(message, "payload")
    if "payloadsize" in message:
        size = _check_count(message, "payloadsize")
        actual = len(payload.encode("utf-8"))
        if size != actual:
            raise MessageError(
                f"payloadsize {show(size)} does not match the payload's {actual} UTF-8 bytes")


def _validate_setup(message):
    for field in ("id", "privPolyId"):
        _check_id(message, field)
        if len(policy_text(message[field])) > MAX_ID_LENGTH:
            raise MessageError(f"field '{field}' is {len(policy_text(message[field]))} "
                               f"characters long; a SETUP's ids may have at most "
                               f"{MAX_ID_LENGTH}")
    port = _require(message, "listenport")
    if isinstance(port, str) and port.isascii() and port.isdigit() and len(port) <= 5:
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise MessageError(f"listenport must be a port number from 1 to 65535, got "
                           f"{_shown_as_sent(port)}")
    message["listenport"] = port
    if "host" in message:
        host = _check_string(message, "host")
        if not is_host(host):
            raise MessageError(f"host must be an IP address or a DNS name (labels of 1 to "
                               f"63 letters, digits and hyphens), got {show(host)}")
    if "weight" in message:
        weight = message["weight"]
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
            raise MessageError(f"weight must be an integer from 1 to {MAX_WEIGHT}, got "
                               f"{_shown_as_sent(weight)}")
    if "heartbeat" in message:
        beat = message["heartbeat"]
        if (isinstance(beat, bool) or not isinstance(beat, (int, float))
                or not 0 < beat <= MAX_HEARTBEAT):
            raise MessageError(f"heartbeat must be a number of seconds above 0 and at most "
                               f"{MAX_HEARTBEAT}, got {_shown_as_sent(beat)}")
    for field in ("nonce", "proof"):
        if field in message:
            _check_string(message, field)


def _validate_ack(message):
    _check_id(message, "srcid")
    _check_id(message, "destid")
    _check_count(message, "payloadsize")
    _check_string(message, "payload")


def _validate_error(message):
    _check_string(message, "code")
    _check_string(message, "message")
    if "destid" in message:
        _check_id(message, "destid")


def _validate_registered(message):
    _check_id(message, "id")
    _check_id(message, "privPolyId")


def _validate_nothing(message):
    pass


_VALIDATORS = {
    MessageType.DATA: _validate_data,
    MessageType.SETUP: _validate_setup,
    MessageType.ACK: _validate_ack,
    MessageType.ERROR: _validate_error,
    MessageType.REGISTERED: _validate_registered,
    MessageType.PING: _validate_nothing,
    MessageType.PONG: _validate_nothing,
}

# Brackets in a body above which parse_message checks that it encodes again.
_NESTING_CHECK = 64

_TYPE_TEXT = {str(t.value): t for t in MessageType}
_TYPE_NUMBER = {t.value: t for t in MessageType}


def parse_message(body):
    """Parse and validate one frame body (PROTOCOL.md sections 1 and 2).

    Args:
        body: the frame body, ``bytes``.

    Returns:
        dict: the message. ``type`` is a ``MessageType``; a SETUP's ``listenport`` is
        an ``int``; every other field, known or not, is as received.

    Raises:
        MessageError: the body is not UTF-8, not JSON, not an object, a JSON object
            names a field twice, or it is not a valid message; its text names the
            value at fault.
    """
    return _parse(body)[0]


def parse_passable(body, max_frame=None):
    """Parse one frame body like ``parse_message``, and return the frame that passes
    the message on unchanged in meaning.

    The body itself is passed on when it is already in the form the protocol outputs
    (an integer ``type``): no second encoding, and unknown fields reach the peer byte
    for byte. A body with the assignment's string ``type`` is encoded again, because
    output always uses integers (PROTOCOL.md section 2); numbers may grow then
    (``1e9`` is written ``1000000000.0``), so the new body is held to ``max_frame``.

    Args:
        body: the frame body (bytes).
        max_frame: the largest body that may be passed on, bytes; None: no limit.

    Returns:
        (dict, bytes): the message, and the whole frame (length prefix and body).

    Raises:
        MessageError: as ``parse_message``; and BAD_MESSAGE when the body encoded
            again is longer than ``max_frame``.
    """
    message, integer_type = _parse(body)
    if integer_type:
        return message, frame_of(body)
    frame = encode_frame(message)
    if max_frame is not None and len(frame) - HEADER_SIZE > max_frame:
        raise MessageError(
            f"with type {message['type'].value} as an integer, this message takes "
            f"{len(frame) - HEADER_SIZE} bytes, above the maximum frame size of {max_frame} "
            "bytes; send type as an integer")
    return message, frame


# The fast path, for the frames that make up nearly all traffic. DATA and ACK frames
# in the compact form that ``encode_frame`` (and most peers) write -- no white space,
# no escapes, the usual fields in the usual order, nothing else -- are matched by a
# strict pattern; a body that matches is valid UTF-8 JSON and a valid message by
# construction, and is read in a third of the time the general path takes (1.6 us
# against 4.2 us for 64-byte payloads, CPython 3.11). Any other body takes the
# general path, which gives the same result (a test checks both on random bodies).
# Past ~800 bytes the JSON decoder's C scanner beats the pattern: 512 is the limit.
_FAST_LIMIT = 512
_ID = rb'("[^"\\\x00-\x1f]+"|-?(?:0|[1-9][0-9]{0,17}))'
_TEXT = rb'"([^"\\\x00-\x1f]*)"'
_FAST_DATA = re.compile(rb'\{"type":0,"srcid":' + _ID + rb',"privPoliId":' + _ID
                        + rb',"payload":' + _TEXT + rb'\}\Z')
_FAST_ACK = re.compile(rb'\{"type":2,"srcid":' + _ID + rb',"destid":' + _ID
                       + rb',"payloadsize":(0|[1-9][0-9]{0,17}),"payload":' + _TEXT
                       + rb'\}\Z')


def _fast_id(raw):
    return raw[1:-1].decode("utf-8") if raw[:1] == b'"' else int(raw)


def _fast(body):
    # The message of a body in the compact form, or None.
    kind = body[8:9]
    try:
        if kind == b"0":
            match = _FAST_DATA.match(body)
            if match is not None:
                srcid, policy, payload = match.groups()
                return {"type": MessageType.DATA, "srcid": _fast_id(srcid),
                        "privPoliId": _fast_id(policy), "payload": payload.decode("utf-8")}
        elif kind == b"2":
            match = _FAST_ACK.match(body)
            if match is not None:
                srcid, destid, size, payload = match.groups()
                return {"type": MessageType.ACK, "srcid": _fast_id(srcid),
                        "destid": _fast_id(destid), "payloadsize": int(size),
                        "payload": payload.decode("utf-8")}
    except UnicodeDecodeError:
        pass  # the general path names the bad byte
    return None


def _parse(body):
    if len(body) <= _FAST_LIMIT:
        message = _fast(body)
        if message is not None:
            return message, True
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MessageError(f"frame body is not valid UTF-8 (bad byte at offset {exc.start})") from None
    try:
        message = _DECODER.decode(text)
    except RecursionError:
        raise MessageError("frame body is JSON nested too deeply") from None
    except _RepeatedName as exc:
        raise MessageError(f"frame body names field {show(exc.args[0])} twice in one "
                           "object; a repeated name is ambiguous") from None
    except ValueError as exc:
        raise MessageError(f"frame body is not valid JSON: {exc}") from None
    integer_type = type(message.get("type")) is int if type(message) is dict else False
    validate_message(message)
    # What is passed on must encode again: a "\ud800" escape anywhere (an unknown
    # field, a key) decodes to a lone surrogate, and json.dumps needs more stack per
    # level of nesting than json.loads. The cheap tests keep the check off the common
    # path: a one-character search is a memchr() scan, ~50 times faster than a
    # two-character search; nesting is only possible under a field whose value is an
    # object or an array, and only then are brackets counted (a count over a 64 KiB
    # payload takes ~40 us, a quarter of the frame's parse).
    if (("\\" in text and "\\u" in text)
            or (any(type(value) is dict or type(value) is list for value in message.values())
                and text.count("[") + text.count("{") > _NESTING_CHECK)):
        try:
            json.dumps(message, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise MessageError("frame body holds a lone surrogate (\\ud800-\\udfff), "
                               "which is not Unicode text") from None
        except RecursionError:
            raise MessageError("frame body is JSON nested too deeply") from None
    return message, integer_type


def validate_message(message):
    """Validate a decoded JSON value as a message (PROTOCOL.md section 2).

    Args:
        message: any decoded JSON value; a ``dict`` is normalized in place.

    Returns:
        dict: ``message``, with ``type`` a ``MessageType`` and a SETUP's
        ``listenport`` an ``int``.

    Raises:
        MessageError: not an object, or not a valid message; names the value at fault.
    """
    if not isinstance(message, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(message), "a number")
        raise MessageError(f"a message must be a JSON object, got {kind}: {show(message)}")
    if "type" not in message:
        raise MessageError("message has no 'type' field")
    kind = message["type"]
    if isinstance(kind, str):
        kind = _TYPE_TEXT.get(kind, kind)
    elif isinstance(kind, int) and not isinstance(kind, bool):
        kind = _TYPE_NUMBER.get(kind, kind)
    if not isinstance(kind, MessageType):
        raise MessageError(f"unknown message type {show(message['type'])}; known types are 0 to 6")
    message["type"] = kind
    _VALIDATORS[kind](message)
    return message


_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


# An IPv6 zone id: an interface name or number ("fe80::1%eth0"), nothing that could
# end a log line or reach the resolver as something else.
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
# The legacy IPv4 forms that inet_aton (and so getaddrinfo) reads but ipaddress does
# not: octal (010.0.0.1), hexadecimal (0x7f.1) and short (127.1, 2130706433). As
# names they would connect to another address than the one shown (the ambiguity of
# CVE-2021-29921); RFC 1123 section 2.1 rules out an all-numeric top label.
_LEGACY_IPV4 = re.compile(r"(?:(?:0x[0-9a-f]*|[0-9]+)\.){0,3}(?:0x[0-9a-f]*|[0-9]+)\.?\Z",
                          re.IGNORECASE)


def is_host(text):
    """True when ``text`` (str) is an IP address literal (IPv4 in dotted decimal, or
    IPv6 without brackets, with a zone id of letters, digits, ``_.-`` if any) or a DNS
    name: dot-separated labels of 1 to 63 letters, digits and hyphens, not starting or
    ending with a hyphen, the last one not all digits (RFC 1123 section 2.1), 253
    characters at most, one trailing dot allowed.

    Anything else would fail only later, inside the resolver or the IDNA codec, on
    the path of a client's packet (a label of 64 characters raises ``UnicodeError``),
    or would connect somewhere else than it says (``0x7f.1`` is 127.0.0.1).
    """
    try:
        ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        _, percent, zone = text.partition("%")
        return not percent or bool(_ZONE.match(zone))
    name = text[:-1] if text.endswith(".") else text
    return (0 < len(name) <= 253 and name.isascii() and not _LEGACY_IPV4.match(name)
            and all(_LABEL.match(label) for label in name.split(".")))


def format_address(host, port):
    """Return ``"host:port"``, with brackets around an IPv6 host: ``"[::1]:2100"``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def policy_text(policy):
    """Return the text by which policy ids (and server ids) compare: ``111 == "111"``."""
    return policy if isinstance(policy, str) else str(policy)


# --- Builders ----------------------------------------------------------------------

def data(srcid, policy, payload, **extra):
    """Build a DATA message (type 0) from client ``srcid`` for ``policy``."""
    return {"type": MessageType.DATA, "srcid": srcid, "privPoliId": policy,
            "payload": payload, **extra}


def setup(server_id, policy, listenport, *, host=None, heartbeat=None, weight=None,
          nonce=None, proof=None):
    """Build a SETUP message (type 1); optional fields are left out when None.

    Args:
        listenport: the server's data port, int 1..65535.
        host: the address the proxy should connect to; default: the SETUP's source.
        heartbeat: seconds between PINGs on the session (section 6); None: legacy.
        weight: the server's share in its rotation, int 1..256 (section 8); None: 1.
        nonce, proof: the registration proof (PROTOCOL.md section 9).
    """
    message = {"type": MessageType.SETUP, "id": server_id, "privPolyId": policy,
               "listenport": listenport}
    for field, value in (("host", host), ("heartbeat", heartbeat), ("weight", weight),
                         ("nonce", nonce), ("proof", proof)):
        if value is not None:
            message[field] = value
    return message


def sha1_hex(payload):
    """Return the lowercase hex SHA-1 of the UTF-8 bytes of ``payload`` (str)."""
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()


def ack(server_id, destid, payload_hash):
    """Build an ACK message (type 2) carrying ``payload_hash`` (40 hex chars)."""
    return {"type": MessageType.ACK, "srcid": server_id, "destid": destid,
            "payloadsize": len(payload_hash), "payload": payload_hash}


def ack_for(server_id, data_message):
    """Build the ACK that server ``server_id`` owes for a validated DATA message."""
    return ack(server_id, data_message["srcid"], sha1_hex(data_message["payload"]))


def error(code, message, destid=None):
    """Build an ERROR message (type 3); ``destid`` is left out when None."""
    built = {"type": MessageType.ERROR, "code": code, "message": message}
    if destid is not None:
        built["destid"] = destid
    return built


def error_message(exc, destid=None):
    """Build the ERROR message that reports ``exc`` (a ProtocolError) to the peer."""
    return error(exc.code, exc.message, destid)


def registered(server_id, policy):
    """Build a REGISTERED message (type 4)."""
    return {"type": MessageType.REGISTERED, "id": server_id, "privPolyId": policy}


def ping():
    """Build a PING message (type 5)."""
    return {"type": MessageType.PING}


def pong():
    """Build a PONG message (type 6)."""
    return {"type": MessageType.PONG}


# --- Registration proof (PROTOCOL.md section 9) ------------------------------------

_PROOF_FIELDS = ("id", "privPolyId", "listenport", "host", "heartbeat")


def setup_proof(key, nonce, message):
    """Return the proof of a SETUP: lowercase hex HMAC-SHA256 over nonce and fields.

    The signed text is ``"rproxy-setup-1"``, the nonce, then the SETUP's ``id``,
    ``privPolyId``, ``listenport``, ``host`` and ``heartbeat`` as JSON (absent
    fields as ``null``), joined by newlines.

    Args:
        key: the policy's secret key, ``bytes``.
        nonce: the nonce the proxy issued for this connection, ``str``.
        message: the SETUP message (``dict``).
    """
    fields = [json.dumps(message.get(field), ensure_ascii=True) for field in _PROOF_FIELDS]
    text = "\n".join(["rproxy-setup-1", nonce, *fields])
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def check_setup_proof(key, nonce, message):
    """True when ``message["proof"]`` is the proof of ``message`` for ``key`` and ``nonce``.

    Compares in constant time.
    """
    proof = message.get("proof")
    if not isinstance(proof, str):
        return False
    return hmac.compare_digest(proof.encode("utf-8", "replace"),
                               setup_proof(key, nonce, message).encode("ascii"))


# --- Command lines (PROTOCOL.md section 5) -----------------------------------------

def parse_port(text, allow_zero=True):
    """Parse a TCP port number from ``text``; 0 (pick a free port) when ``allow_zero``.

    Raises:
        ValueError: ``text`` is not a port number; the message names it.
    """
    low = 0 if allow_zero else 1
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= 65535:
        raise ValueError(f"'{text}' is not a port number from {low} to 65535")
    return int(text)


def parse_hostport(text, default_host="127.0.0.1", allow_zero=False):
    """Parse ``PORT`` or ``HOST:PORT`` (also ``[v6addr]:PORT``) into ``(host, port)``.

    Args:
        allow_zero: port 0 (pick a free port) is allowed: an address to listen on.

    Raises:
        ValueError: the text is not of that form; the message names it.
    """
    if text.startswith("[") and text.endswith("]"):
        raise ValueError(f"'{text}' has no port: write {text}:PORT")
    host, sep, port = text.rpartition(":")
    if not sep:
        return default_host, parse_port(text, allow_zero)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        if "[" in host or "]" in host:
            raise ValueError(f"'{text}' is not HOST:PORT (IPv6: [ADDRESS]:PORT)")
        raise ValueError(f"'{text}' has an IPv6 address without brackets: write "
                         f"[{host}]:{port}")
    if not host:
        raise ValueError(f"'{text}' has no host before the ':'")
    if not is_host(host):
        raise ValueError(f"'{host}' is not an IP address or a DNS name")
    return host, parse_port(port, allow_zero)


def parse_hostports(text):
    """Parse a list of peers (``-revproc``): ``RPPORT`` or several, comma-separated,
    each ``PORT`` or ``HOST:PORT`` (``[v6addr]:PORT``); the host defaults to
    127.0.0.1.

    Returns:
        list of ``(host, port)``, in the order given.

    Raises:
        ValueError: an entry that is empty or not of that form, or one that names a
            proxy listed before it (``2100`` and ``127.0.0.1:2100`` are one proxy;
            host names are not resolved); the message names the entry.
    """
    proxies, seen = [], {}
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            raise ValueError(f"'{text}' has an empty entry (a comma too many)")
        host, port = parse_hostport(entry)
        try:
            same = ipaddress.ip_address(host).compressed
        except ValueError:
            same = host.lower()
        first = seen.get((same, port))
        if first is not None:
            raise ValueError(f"'{entry}' is listed twice" if first == entry else
                             f"'{entry}' names the same reverse proxy as '{first}'")
        seen[same, port] = entry
        proxies.append((host, port))
    return proxies
