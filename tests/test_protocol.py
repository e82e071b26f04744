"""Pure tests of protocol.py (PROTOCOL.md sections 1, 2, 5 and 7): bytes in, messages
out, no sockets, no clock."""

import copy
import hashlib
import hmac
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol
from conftest import frame
from protocol import (FrameDecoder, FrameError, FrameTooLarge, MessageError, MessageType,
                      ProtocolError, ServiceError, encode_frame, parse_message,
                      validate_message)

# Hypothesis: a few seconds in all, no example database written to the work tree.
FAST = settings(deadline=None, max_examples=150, database=None,
                suppress_health_check=[HealthCheck.too_slow])

SHA1_HELLO = hashlib.sha1(b"hello").hexdigest()
HOST_ERROR = ("host must be an IP address or a DNS name (labels of 1 to 63 letters, "
              "digits and hyphens), got ")


def body_of(message):
    """The compact UTF-8 JSON body of ``message``, as encode_frame must write it."""
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def valid(kind):
    """A fresh valid message of MessageType ``kind`` (type given as a plain int)."""
    return copy.deepcopy({
        0: {"type": 0, "srcid": "c1", "privPoliId": "111", "payload": "hello"},
        1: {"type": 1, "id": "s1", "privPolyId": "111", "listenport": 8080},
        2: {"type": 2, "srcid": "s1", "destid": "c1", "payloadsize": 40,
            "payload": SHA1_HELLO},
        3: {"type": 3, "code": "NO_SERVER", "message": "no live server"},
        4: {"type": 4, "id": "s1", "privPolyId": "111"},
        5: {"type": 5},
        6: {"type": 6},
    }[kind])


def message_error(message):
    """Validate ``message``; return the MessageError it must raise."""
    with pytest.raises(MessageError) as caught:
        validate_message(message)
    return caught.value


# --- Framing: encoding ------------------------------------------------------------

def test_encode_frame_is_big_endian_length_then_compact_utf8_json_with_int_type():
    frame = encode_frame(protocol.data("c1", 111, "héllo"))
    body = '{"type":0,"srcid":"c1","privPoliId":111,"payload":"héllo"}'.encode("utf-8")
    assert frame == b"\x00\x00\x00" + bytes([len(body)]) + body
    assert len(body) == 59  # 58 characters, "é" is two UTF-8 bytes


def test_encode_frame_writes_length_of_a_body_above_255_bytes_in_four_bytes():
    message = {"type": 5, "pad": "x" * 300}
    frame = encode_frame(message)
    assert frame[:4] == (len(body_of(message))).to_bytes(4, "big") == b"\x00\x00\x01\x3f"
    assert frame[4:] == b'{"type":5,"pad":"' + b"x" * 300 + b'"}'


def test_encode_frame_writes_type_as_json_integer_after_string_type_is_normalized():
    message = parse_message(b'{"type":"6"}')
    assert encode_frame(message) == b'\x00\x00\x00\x0a{"type":6}'


# --- Framing: decoding --------------------------------------------------------------

def test_decoder_returns_whole_frame_body_then_none():
    decoder = FrameDecoder()
    decoder.feed(b'\x00\x00\x00\x0a{"type":5}')
    assert decoder.next_frame() == b'{"type":5}'
    assert decoder.next_frame() is None
    assert decoder.in_frame is False


def test_decoder_returns_every_frame_of_one_chunk_in_order():
    bodies = [b'{"type":5}', b'{"type":6}', b"x", b"[1,2,3]"]
    decoder = FrameDecoder()
    decoder.feed(b"".join(frame(body) for body in bodies))
    assert [decoder.next_frame() for _ in range(5)] == [*bodies, None]


def test_decoder_accepts_a_frame_split_at_every_byte():
    frame = encode_frame(protocol.data("c1", "111", "héllo wörld"))
    body = frame[4:]
    for cut in range(1, len(frame)):
        decoder = FrameDecoder()
        decoder.feed(frame[:cut])
        assert decoder.next_frame() is None, cut
        assert decoder.in_frame is True
        decoder.feed(frame[cut:])
        assert decoder.next_frame() == body, cut
        assert decoder.next_frame() is None


def test_decoder_accepts_a_frame_fed_one_byte_at_a_time():
    frame = encode_frame(protocol.ping())
    decoder = FrameDecoder()
    got = []
    for index in range(len(frame)):
        decoder.feed(frame[index:index + 1])
        got.append(decoder.next_frame())
    assert got == [None] * (len(frame) - 1) + [b'{"type":5}']


def test_decoder_accepts_a_frame_of_exactly_the_maximum_size():
    decoder = FrameDecoder(max_frame=5)
    decoder.feed(b"\x00\x00\x00\x05abcde")
    assert decoder.next_frame() == b"abcde"


def test_decoder_refuses_length_zero_with_bad_frame():
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00\x00\x00")
    with pytest.raises(FrameError) as caught:
        decoder.next_frame()
    error = caught.value
    assert type(error) is FrameError
    assert error.code == "BAD_FRAME"
    assert error.fatal is True
    assert error.message == "frame length is 0; a frame body holds at least 1 byte"


def test_decoder_refuses_length_above_maximum_as_soon_as_the_header_arrives():
    decoder = FrameDecoder(max_frame=10)
    decoder.feed(b"\x00\x00\x00")
    assert decoder.next_frame() is None
    decoder.feed(b"\x0b")  # the fourth header byte: length 11, no body byte yet
    with pytest.raises(FrameTooLarge) as caught:
        decoder.next_frame()
    error = caught.value
    assert error.code == "FRAME_TOO_LARGE"
    assert error.fatal is True
    assert isinstance(error, FrameError)
    assert error.message == "frame length 11 bytes is above the maximum of 10 bytes"
    assert decoder.in_frame is False  # nothing buffered


def test_decoder_refuses_4_gb_length_prefix_without_buffering_and_keeps_refusing():
    decoder = FrameDecoder()
    decoder.feed(b"\xff\xff\xff\xff")
    with pytest.raises(FrameTooLarge) as first:
        decoder.next_frame()
    assert first.value.message == ("frame length 4294967295 bytes is above the maximum "
                                   "of 1048576 bytes")
    decoder.feed(b"a" * 1000 + frame(b'{"type":5}'))
    assert decoder.in_frame is False  # later bytes are not buffered either
    for _ in range(3):
        with pytest.raises(FrameTooLarge) as again:
            decoder.next_frame()
        assert again.value.code == "FRAME_TOO_LARGE"
        assert again.value.message == first.value.message


def test_decoder_repeats_bad_frame_error_on_later_calls():
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00\x00\x00" + frame(b"{}"))
    for _ in range(2):
        with pytest.raises(FrameError) as caught:
            decoder.next_frame()
        assert caught.value.code == "BAD_FRAME"


def test_decoder_hands_out_frames_before_a_bad_length_then_refuses():
    decoder = FrameDecoder(max_frame=20)
    decoder.feed(frame(b'{"type":5}') + b"\x00\x00\x00\x15")
    assert decoder.next_frame() == b'{"type":5}'
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_decoder_refuses_maximum_below_one_byte():
    with pytest.raises(ValueError, match="max_frame must be at least 1 byte, got 0"):
        FrameDecoder(max_frame=0)


# --- parse_message: bodies that are not messages ------------------------------------

@pytest.mark.parametrize("body, text", [
    (b"\xff", "frame body is not valid UTF-8 (bad byte at offset 0)"),
    (b'{"type":5,"x":"\xc3"}', "frame body is not valid UTF-8 (bad byte at offset 15)"),
    (b'{"type":5,"x":NaN}', "frame body is not valid JSON: NaN is not a JSON number"),
    (b'{"type":5,"x":Infinity}',
     "frame body is not valid JSON: Infinity is not a JSON number"),
    (b'{"type":5,"x":-Infinity}',
     "frame body is not valid JSON: -Infinity is not a JSON number"),
    (b"[" * 100000, "frame body is JSON nested too deeply"),
    (b"[1,2,3]", "a message must be a JSON object, got an array: [1, 2, 3]"),
    (b'"hi"', "a message must be a JSON object, got a string: hi"),
    (b"42", "a message must be a JSON object, got a number: 42"),
    (b"true", "a message must be a JSON object, got a boolean: true"),
    (b"null", "a message must be a JSON object, got null: null"),
    (b'{"srcid":"c1"}', "message has no 'type' field"),
    (b'{"type":7}', "unknown message type 7; known types are 0 to 6"),
    (b'{"type":"7"}', "unknown message type 7; known types are 0 to 6"),
    (b'{"type":"00"}', "unknown message type 00; known types are 0 to 6"),
    (b'{"type":-1}', "unknown message type -1; known types are 0 to 6"),
    (b'{"type":0.0}', "unknown message type 0.0; known types are 0 to 6"),
    (b'{"type":true}', "unknown message type true; known types are 0 to 6"),
    (b'{"type":false}', "unknown message type false; known types are 0 to 6"),
    (b'{"type":null}', "unknown message type null; known types are 0 to 6"),
])
def test_parse_message_rejects_body_with_exact_bad_message_text(body, text):
    with pytest.raises(MessageError) as caught:
        parse_message(body)
    assert caught.value.code == "BAD_MESSAGE"
    assert caught.value.fatal is False
    assert caught.value.message == text
    assert str(caught.value) == "BAD_MESSAGE: " + text


@pytest.mark.parametrize("body", [b"", b"{", b'{"type":5,}', b"{'type':5}", b'{"type":5}x'])
def test_parse_message_rejects_invalid_json(body):
    with pytest.raises(MessageError) as caught:
        parse_message(body)
    assert caught.value.code == "BAD_MESSAGE"
    assert caught.value.message.startswith("frame body is not valid JSON: ")


def test_parse_message_rejects_a_5000_digit_integer_as_bad_message():
    body = b'{"type":0,"srcid":' + b"7" * 5000 + b',"privPoliId":"1","payload":"x"}'
    with pytest.raises(MessageError) as caught:
        parse_message(body)
    assert caught.value.code == "BAD_MESSAGE"
    assert caught.value.message.startswith("frame body is not valid JSON: ")
    assert "5000 digits" in caught.value.message


def test_parse_message_rejects_bool_type_even_though_bool_is_an_int():
    error = message_error({"type": True, "payload": "x"})
    assert error.message == "unknown message type true; known types are 0 to 6"


# --- parse_message: valid messages and normalization ---------------------------------

@pytest.mark.parametrize("kind", range(7))
def test_parse_message_returns_each_type_as_message_type(kind):
    message = parse_message(body_of(valid(kind)))
    assert message == valid(kind)
    assert type(message["type"]) is MessageType
    assert message["type"] is MessageType(kind)


@pytest.mark.parametrize("text, kind", [("0", MessageType.DATA), ("1", MessageType.SETUP),
                                        ("6", MessageType.PONG)])
def test_parse_message_accepts_digit_string_type_and_normalizes_to_int(text, kind):
    message = valid(kind.value)
    message["type"] = text
    parsed = parse_message(body_of(message))
    assert parsed["type"] is kind
    assert parsed["type"] == kind.value
    assert json.loads(encode_frame(parsed)[4:])["type"] == kind.value


def test_parse_message_keeps_unknown_extra_fields_as_received():
    message = valid(0)
    message.update({"trace": "abc", "hops": [1, {"k": None}], "ratio": 0.5})
    parsed = parse_message(body_of(message))
    assert parsed == {"type": 0, "srcid": "c1", "privPoliId": "111", "payload": "hello",
                      "trace": "abc", "hops": [1, {"k": None}], "ratio": 0.5}


def test_parse_message_accepts_integer_ids_and_policies():
    parsed = parse_message(b'{"type":0,"srcid":5,"privPoliId":111,"payload":""}')
    assert parsed == {"type": 0, "srcid": 5, "privPoliId": 111, "payload": ""}


def test_parse_message_accepts_escaped_surrogate_pair_as_one_character():
    parsed = parse_message(b'{"type":0,"srcid":"c","privPoliId":"p",'
                           b'"payload":"\\ud83d\\ude00","payloadsize":4}')
    assert parsed["payload"] == "\U0001F600"


# --- Required fields of every message type (table-driven) ----------------------------

MISSING = [
    (0, "srcid"), (0, "privPoliId"), (0, "payload"),
    (1, "id"), (1, "privPolyId"), (1, "listenport"),
    (2, "srcid"), (2, "destid"), (2, "payloadsize"), (2, "payload"),
    (3, "code"), (3, "message"),
    (4, "id"), (4, "privPolyId"),
]


@pytest.mark.parametrize("kind, field", MISSING)
def test_message_without_required_field_is_rejected_naming_the_field(kind, field):
    message = valid(kind)
    del message[field]
    error = message_error(message)
    assert error.code == "BAD_MESSAGE"
    assert error.message == f"{MessageType(kind).name} message has no '{field}' field"


WRONG = [
    # (type, field, bad value, exact message)
    (0, "srcid", [1], "field 'srcid' must be a string or an integer, got [1]"),
    (0, "srcid", True, "field 'srcid' must be a string or an integer, got true"),
    (0, "srcid", "", "field 'srcid' is an empty string"),
    (0, "privPoliId", 1.5, "field 'privPoliId' must be a string or an integer, got 1.5"),
    (0, "privPoliId", None, "field 'privPoliId' must be a string or an integer, got null"),
    (0, "payload", 5, "field 'payload' must be a string, got 5"),
    (0, "payload", None, "field 'payload' must be a string, got null"),
    (0, "payloadsize", "5", 'field \'payloadsize\' must be a non-negative integer, got "5"'),
    (0, "payloadsize", -1, "field 'payloadsize' must be a non-negative integer, got -1"),
    (0, "payloadsize", True, "field 'payloadsize' must be a non-negative integer, got true"),
    (1, "id", {"a": 1}, 'field \'id\' must be a string or an integer, got {"a": 1}'),
    (1, "privPolyId", False, "field 'privPolyId' must be a string or an integer, got false"),
    (1, "listenport", 8080.0, "listenport must be a port number from 1 to 65535, got 8080.0"),
    (1, "listenport", True, "listenport must be a port number from 1 to 65535, got true"),
    (1, "host", 5, "field 'host' must be a string, got 5"),
    (1, "host", "", HOST_ERROR),
    (1, "host", "a b", HOST_ERROR + "a b"),
    (1, "nonce", 5, "field 'nonce' must be a string, got 5"),
    (1, "proof", None, "field 'proof' must be a string, got null"),
    (2, "srcid", 1.0, "field 'srcid' must be a string or an integer, got 1.0"),
    (2, "destid", [], "field 'destid' must be a string or an integer, got []"),
    (2, "payloadsize", "40", 'field \'payloadsize\' must be a non-negative integer, got "40"'),
    (1, "weight", "3", 'weight must be an integer from 1 to 256, got "3"'),
    (1, "weight", "", 'weight must be an integer from 1 to 256, got ""'),
    (2, "payload", 40, "field 'payload' must be a string, got 40"),
    (3, "code", 1, "field 'code' must be a string, got 1"),
    (3, "message", None, "field 'message' must be a string, got null"),
    (3, "destid", True, "field 'destid' must be a string or an integer, got true"),
    (4, "id", "", "field 'id' is an empty string"),
    (4, "privPolyId", [], "field 'privPolyId' must be a string or an integer, got []"),
]


@pytest.mark.parametrize("kind, field, value, text", WRONG,
                         ids=[f"{k}-{f}-{v!r}" for k, f, v, _ in WRONG])
def test_message_with_field_of_wrong_type_is_rejected_naming_the_value(kind, field, value,
                                                                       text):
    message = valid(kind)
    message[field] = value
    error = message_error(message)
    assert error.code == "BAD_MESSAGE"
    assert error.message == text


def test_data_payloadsize_must_count_utf8_bytes_not_characters():
    payload = "héllo€"  # 6 characters, 9 UTF-8 bytes
    message = protocol.data("c1", "111", payload, payloadsize=6)
    error = message_error(message)
    assert error.message == "payloadsize 6 does not match the payload's 9 UTF-8 bytes"
    assert validate_message(protocol.data("c1", "111", payload, payloadsize=9))["payloadsize"] == 9


def test_lone_surrogate_in_payload_is_rejected():
    body = b'{"type":0,"srcid":"c1","privPoliId":"111","payload":"a\\ud800b"}'
    with pytest.raises(MessageError) as caught:
        parse_message(body)
    assert caught.value.message == ("field 'payload' holds a lone surrogate, which is not "
                                    "Unicode text")


def test_lone_surrogate_in_id_is_rejected():
    body = b'{"type":4,"id":"\\udc00","privPolyId":"111"}'
    with pytest.raises(MessageError) as caught:
        parse_message(body)
    assert caught.value.message == "field 'id' holds a lone surrogate, which is not Unicode text"


@pytest.mark.parametrize("port, normalized", [("8080", 8080), ("00080", 80), (1, 1),
                                              ("65535", 65535), (65535, 65535)])
def test_setup_listenport_digit_string_or_int_is_normalized_to_int(port, normalized):
    message = valid(1)
    message["listenport"] = port
    assert validate_message(message)["listenport"] == normalized
    assert type(message["listenport"]) is int


@pytest.mark.parametrize("port, shown", [(0, "0"), ("0", "0"), (65536, "65536"),
                                         ("65536", "65536"), ("abc", '"abc"'),
                                         ("123456", '"123456"'), ("-1", '"-1"'), (-1, "-1"),
                                         (" 80", '" 80"'), ("٨٠", '"٨٠"'), (None, "null")])
def test_setup_listenport_out_of_range_or_not_digits_is_rejected(port, shown):
    message = valid(1)
    message["listenport"] = port
    error = message_error(message)
    assert error.message == f"listenport must be a port number from 1 to 65535, got {shown}"


@pytest.mark.parametrize("beat, shown", [(0, "0"), (0.0, "0.0"), (-1, "-1"), (-0.5, "-0.5"),
                                         (True, "true"), (False, "false"), ("5", '"5"'),
                                         (None, "null"), (float("inf"), "Infinity"),
                                         (3600.5, "3600.5"), (10 ** 400, "1" + "0" * 63 + "... (401 chars)"),
                                         (1e300, "1e+300")])
def test_setup_heartbeat_must_be_seconds_above_zero_and_at_most_an_hour(beat, shown):
    message = valid(1)
    message["heartbeat"] = beat
    error = message_error(message)
    assert error.message == ("heartbeat must be a number of seconds above 0 and at most 3600, "
                             f"got {shown}")


@pytest.mark.parametrize("field", ["id", "privPolyId"])
def test_setup_ids_of_at_most_256_characters_are_accepted_longer_ones_refused(field):
    for value in ("x" * 256, 10 ** 255):
        message = valid(1)
        message[field] = value
        assert validate_message(message)[field] == value
    for value, length in (("é" * 257, 257), (10 ** 300, 301)):
        message = valid(1)
        message[field] = value
        assert message_error(message).message == (
            f"field '{field}' is {length} characters long; a SETUP's ids may have at most 256")


@pytest.mark.parametrize("beat", [1, 0.25, 30])
def test_setup_heartbeat_positive_number_is_accepted_as_is(beat):
    message = valid(1)
    message["heartbeat"] = beat
    assert validate_message(message)["heartbeat"] == beat


def test_error_message_shows_value_with_control_characters_as_a_python_literal():
    message = valid(1)
    message["host"] = "a\nb"
    error = message_error(message)
    assert error.message == HOST_ERROR + "'a\\nb'"


# --- A parsed message is passed on: it must encode to a frame that parses again ------

REENCODE_OK = [b'{"type":5,"x":"\\u00e9","y":[1,2.5,null]}',
               b'{"type":0,"srcid":"c","privPoliId":"p","payload":"\\ud83d\\ude00"}']
REENCODE_REFUSED = [
    (b'{"type":5,"x":"\\ud800"}', "frame body holds a lone surrogate (\\ud800-\\udfff), "
     "which is not Unicode text"),
    (b'{"type":5,"\\udc00":1}', "frame body holds a lone surrogate (\\ud800-\\udfff), "
     "which is not Unicode text"),
    (b'{"type":5,"x":1e400}', "frame body is not valid JSON: number 1e400 is out of range"),
]


@pytest.mark.parametrize("body, text", REENCODE_REFUSED)
def test_values_no_frame_can_carry_are_refused_up_front(body, text):
    with pytest.raises(MessageError) as caught:
        parse_message(body)
    assert caught.value.message == text


@pytest.mark.parametrize("body", REENCODE_OK)
def test_parsed_message_reencodes_to_a_frame_that_parses_to_the_same_message(body):
    """The proxy re-encodes a client's DATA (unknown fields and all) to forward it, so
    whatever parse_message accepts must survive encode_frame -> parse_message, or be
    refused with BAD_MESSAGE up front."""
    message = parse_message(body)
    again = parse_message(encode_frame(message)[4:])
    assert again == message


# --- Builders and hashes ------------------------------------------------------------

def test_builders_build_exact_messages():
    assert protocol.data("c1", 111, "hi", payloadsize=2) == {
        "type": 0, "srcid": "c1", "privPoliId": 111, "payload": "hi", "payloadsize": 2}
    assert protocol.setup("s1", "111", 8080) == {
        "type": 1, "id": "s1", "privPolyId": "111", "listenport": 8080}
    assert protocol.setup("s1", "111", 8080, host="10.0.0.2", heartbeat=0.5, nonce="n",
                          proof="p") == {
        "type": 1, "id": "s1", "privPolyId": "111", "listenport": 8080,
        "host": "10.0.0.2", "heartbeat": 0.5, "nonce": "n", "proof": "p"}
    assert protocol.ack("s1", "c1", SHA1_HELLO) == {
        "type": 2, "srcid": "s1", "destid": "c1", "payloadsize": 40, "payload": SHA1_HELLO}
    assert protocol.error("NO_SERVER", "none") == {
        "type": 3, "code": "NO_SERVER", "message": "none"}
    assert protocol.error("TIMEOUT", "slow", destid=0) == {
        "type": 3, "code": "TIMEOUT", "message": "slow", "destid": 0}
    assert protocol.registered("s1", 111) == {"type": 4, "id": "s1", "privPolyId": 111}
    assert protocol.ping() == {"type": 5}
    assert protocol.pong() == {"type": 6}


@pytest.mark.parametrize("build", [
    lambda: protocol.data("c1", 111, "hi"),
    lambda: protocol.setup("s1", "111", 8080, host="h", heartbeat=1),
    lambda: protocol.ack("s1", "c1", SHA1_HELLO),
    lambda: protocol.error("BAD_MESSAGE", "bad", "c1"),
    lambda: protocol.registered("s1", "111"),
    protocol.ping, protocol.pong,
])
def test_built_message_encodes_and_parses_back_equal(build):
    message = build()
    assert parse_message(encode_frame(message)[4:]) == message


@pytest.mark.parametrize("payload", ["", "hello", "héllo€", "\U0001F600", "a" * 10000])
def test_sha1_hex_is_hashlib_sha1_of_utf8_bytes(payload):
    assert protocol.sha1_hex(payload) == hashlib.sha1(payload.encode("utf-8")).hexdigest()


def test_sha1_hex_of_empty_string_is_known_digest():
    assert protocol.sha1_hex("") == "da39a3ee5e6b4b0d3255bfef95601890afd80709"


def test_ack_for_answers_data_to_its_srcid_with_hash_of_payload():
    answer = protocol.ack_for("s9", parse_message(b'{"type":"0","srcid":7,"privPoliId":"1",'
                                                  b'"payload":"h\\u00e9"}'))
    assert answer == {"type": 2, "srcid": "s9", "destid": 7, "payloadsize": 40,
                      "payload": hashlib.sha1("hé".encode("utf-8")).hexdigest()}
    assert validate_message(answer) is answer


def test_error_message_reports_exception_code_and_text():
    exc = ServiceError("no live server serves privacy policy 9", protocol.NO_SERVER)
    assert protocol.error_message(exc, "c1") == {
        "type": 3, "code": "NO_SERVER", "message": "no live server serves privacy policy 9",
        "destid": "c1"}
    assert isinstance(exc, ProtocolError)


def test_policy_text_makes_int_and_string_policies_equal():
    assert protocol.policy_text(111) == protocol.policy_text("111") == "111"


# --- Registration proof -------------------------------------------------------------

KEY = b"policy-111-secret"


def signed_setup(key=KEY, nonce="n-1"):
    message = protocol.setup("s1", "111", 8080, heartbeat=1.0, nonce=nonce)
    message["proof"] = protocol.setup_proof(key, nonce, message)
    return message


def test_setup_proof_is_hmac_sha256_over_documented_text():
    message = protocol.setup("s1", "111", 8080, heartbeat=1.0)
    text = 'rproxy-setup-1\nn-1\n"s1"\n"111"\n8080\nnull\n1.0'
    expected = hmac.new(KEY, text.encode("utf-8"), hashlib.sha256).hexdigest()
    assert protocol.setup_proof(KEY, "n-1", message) == expected


def test_check_setup_proof_accepts_the_right_key_and_nonce():
    assert protocol.check_setup_proof(KEY, "n-1", signed_setup()) is True


def test_check_setup_proof_refuses_wrong_key():
    assert protocol.check_setup_proof(b"other-key", "n-1", signed_setup()) is False


def test_check_setup_proof_refuses_other_nonce():
    assert protocol.check_setup_proof(KEY, "n-2", signed_setup()) is False


@pytest.mark.parametrize("field, value", [("id", "s2"), ("privPolyId", "112"),
                                          ("privPolyId", 111), ("listenport", 8081),
                                          ("host", "10.6.6.6"), ("heartbeat", 2.0)])
def test_check_setup_proof_refuses_tampered_field(field, value):
    message = signed_setup()
    message[field] = value
    assert protocol.check_setup_proof(KEY, "n-1", message) is False


@pytest.mark.parametrize("proof", [None, 123, "", "é" * 64])
def test_check_setup_proof_refuses_missing_or_malformed_proof(proof):
    message = signed_setup()
    if proof is None:
        del message["proof"]
    else:
        message["proof"] = proof
    assert protocol.check_setup_proof(KEY, "n-1", message) is False


# --- Command-line addresses ---------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("8000", ("127.0.0.1", 8000)),
    ("example.org:81", ("example.org", 81)),
    ("10.0.0.1:65535", ("10.0.0.1", 65535)),
    ("[::1]:9000", ("::1", 9000)),
])
def test_parse_hostport_accepts_port_or_host_and_port(text, expected):
    assert protocol.parse_hostport(text) == expected


def test_parse_hostport_uses_given_default_host():
    assert protocol.parse_hostport("81", default_host="proxy.local") == ("proxy.local", 81)


@pytest.mark.parametrize("text, reason", [
    (":80", "':80' has no host before the ':'"),
    ("host:", "'' is not a port number from 1 to 65535"),
    ("0", "'0' is not a port number from 1 to 65535"),
    ("host:0", "'0' is not a port number from 1 to 65535"),
    ("65536", "'65536' is not a port number from 1 to 65535"),
    ("abc", "'abc' is not a port number from 1 to 65535"),
    ("host:-1", "'-1' is not a port number from 1 to 65535"),
    ("[::1]", "'[::1]' has no port: write [::1]:PORT"),
    ("[::1]:3100:", "'[::1]:3100:' is not HOST:PORT (IPv6: [ADDRESS]:PORT)"),
    ("::1:2100", "'::1:2100' has an IPv6 address without brackets: write [::1]:2100"),
])
def test_parse_hostport_refuses_bad_text_naming_it(text, reason):
    with pytest.raises(ValueError) as caught:
        protocol.parse_hostport(text)
    assert str(caught.value) == reason


@pytest.mark.parametrize("text, port", [("0", 0), ("1", 1), ("65535", 65535), ("080", 80)])
def test_parse_port_accepts_zero_to_65535(text, port):
    assert protocol.parse_port(text) == port


@pytest.mark.parametrize("text, allow_zero, reason", [
    ("0", False, "'0' is not a port number from 1 to 65535"),
    ("65536", True, "'65536' is not a port number from 0 to 65535"),
    ("", True, "'' is not a port number from 0 to 65535"),
    (" 80", True, "' 80' is not a port number from 0 to 65535"),
    ("+80", True, "'+80' is not a port number from 0 to 65535"),
    ("٨٠", True, "'٨٠' is not a port number from 0 to 65535"),
])
def test_parse_port_refuses_bad_text_naming_it(text, allow_zero, reason):
    with pytest.raises(ValueError) as caught:
        protocol.parse_port(text, allow_zero=allow_zero)
    assert str(caught.value) == reason


# --- Properties (hypothesis) --------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-10**20, 10**20)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
ids = st.text(min_size=1, max_size=12) | st.integers(-10**9, 10**9)
KNOWN = {"type", "srcid", "privPoliId", "privPolyId", "payload", "payloadsize", "id",
         "listenport", "host", "heartbeat", "nonce", "proof", "destid", "code", "message"}
extras = st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in KNOWN),
                         json_values, max_size=3)


@st.composite
def valid_messages(draw):
    """A valid message in normalized form (type an int, listenport an int)."""
    kind = draw(st.integers(0, 6))
    if kind == 0:
        payload = draw(st.text(max_size=40))
        message = protocol.data(draw(ids), draw(ids), payload)
        if draw(st.booleans()):
            message["payloadsize"] = len(payload.encode("utf-8"))
    elif kind == 1:
        message = protocol.setup(
            draw(ids), draw(ids), draw(st.integers(1, 65535)),
            host=draw(st.none() | st.sampled_from(["10.0.0.1", "h.example", "::1"])),
            heartbeat=draw(st.none() | st.floats(0.001, 1000) | st.integers(1, 100)))
    elif kind == 2:
        message = protocol.ack(draw(ids), draw(ids), draw(st.text(max_size=40)))
    elif kind == 3:
        message = protocol.error(draw(st.text(max_size=16)), draw(st.text(max_size=40)),
                                 draw(st.none() | ids))
    elif kind == 4:
        message = protocol.registered(draw(ids), draw(ids))
    else:
        message = {"type": MessageType(kind)}
    message.update(draw(extras))
    return message


@FAST
@given(messages=st.lists(valid_messages(), max_size=8), data=st.data())
def test_property_valid_messages_survive_any_chunking(messages, data):
    stream = b"".join(encode_frame(message) for message in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    chunks = [stream[start:end] for start, end in zip([0, *cuts], [*cuts, len(stream)])]
    decoder = FrameDecoder()
    got = []
    for chunk in chunks:
        decoder.feed(chunk)
        while (body := decoder.next_frame()) is not None:
            got.append(parse_message(body))
    assert got == messages
    assert decoder.in_frame is False


def drain(decoder):
    """Take every frame out of ``decoder`` and parse it; only ProtocolErrors may occur."""
    results = []
    while True:
        try:
            body = decoder.next_frame()
        except FrameError as exc:
            assert exc.code in ("BAD_FRAME", "FRAME_TOO_LARGE")
            results.append(exc)
            return results
        if body is None:
            return results
        try:
            results.append(parse_message(body))
        except MessageError as exc:
            assert exc.code == "BAD_MESSAGE"
            results.append(exc)


json_bodies = json_values.map(lambda v: json.dumps(v).encode("utf-8"))
message_bodies = valid_messages().map(lambda m: encode_frame(m)[4:])
mangled_bodies = st.tuples(message_bodies, st.binary(max_size=4)).map(lambda t: t[0] + t[1])
pieces = (st.binary(max_size=40)
          | st.one_of(json_bodies, message_bodies, mangled_bodies, st.binary(min_size=1,
                                                                             max_size=30))
          .map(frame))


@FAST
@given(parts=st.lists(pieces, max_size=6), max_frame=st.integers(1, 300),
       data=st.data())
def test_property_any_bytes_yield_messages_or_protocol_errors_only(parts, max_frame, data):
    stream = b"".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    decoder = FrameDecoder(max_frame=max_frame)
    results = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        decoder.feed(stream[start:end])
        results.extend(drain(decoder))
        if results and isinstance(results[-1], FrameError):
            break
    for result in results:
        assert isinstance(result, (dict, ProtocolError))
        if isinstance(result, dict):
            assert isinstance(result["type"], MessageType)


message_like = st.fixed_dictionaries(
    {"type": st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, -1, "0", "1", "2", "5", "x", True,
                              None, 1.0])},
    optional={field: json_values | ids for field in sorted(KNOWN - {"type"})})


@FAST
@given(value=json_values | message_like)
def test_property_validate_message_returns_dict_or_raises_message_error(value):
    try:
        result = validate_message(value)
    except MessageError as exc:
        assert exc.code == "BAD_MESSAGE"
        assert isinstance(exc.message, str) and exc.message
        return
    assert result is value
    assert isinstance(result["type"], MessageType)


# --- The fast path of compact DATA and ACK bodies -------------------------------------

def general_parse(body):
    """What the general path makes of ``body``: the message, or the MessageError."""
    limit, protocol._FAST_LIMIT = protocol._FAST_LIMIT, -1
    try:
        return protocol.parse_passable(body)[0]
    except MessageError as exc:
        return exc
    finally:
        protocol._FAST_LIMIT = limit


fast_ids = st.one_of(st.text(max_size=8), st.integers(-10**20, 10**20),
                st.sampled_from(["", "a\"b", "a\\b", "\x01", "\u00e9", "\ud800"]))
raw_ids = st.one_of(fast_ids.map(lambda value: json.dumps(value, ensure_ascii=False)
                            .encode("utf-8", "surrogatepass")),
                    st.sampled_from([b"007", b"-0", b"1e3", b"true", b"null", b'"\xff"',
                                     b'"\x7f"', b"1" * 19, b'""']))
raw_texts = st.one_of(st.text(max_size=40).map(
    lambda text: json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.binary(max_size=20).map(lambda raw: b'"' + raw + b'"'))


@FAST
@given(srcid=raw_ids, second=raw_ids, text=raw_texts, size=st.integers(0, 10**19),
       kind=st.sampled_from([0, 2]))
def test_fast_path_agrees_with_the_general_path(srcid, second, text, size, kind):
    if kind == 0:
        body = b'{"type":0,"srcid":' + srcid + b',"privPoliId":' + second + b',"payload":' + text + b"}"
    else:
        body = (b'{"type":2,"srcid":' + srcid + b',"destid":' + second + b',"payloadsize":'
                + str(size).encode() + b',"payload":' + text + b"}")
    fast = protocol._fast(body)
    general = general_parse(body)
    if fast is not None:
        assert fast == general
        assert type(fast["type"]) is type(general["type"]) is MessageType
    else:
        # Only bodies the pattern cannot vouch for go the general way: escapes, numbers
        # that are not plain integers, invalid UTF-8, control characters, other types.
        assert (b"\\" in body or isinstance(general, MessageError) or size >= 10**18
                or any(raw[:1] != b'"' and not raw.lstrip(b"-").isdigit()
                       for raw in (srcid, second))
                or any(len(raw.lstrip(b"-")) > 18 for raw in (srcid, second)))


def test_compact_bodies_of_our_own_builders_take_the_fast_path():
    for message in (protocol.data("c1", 111, "héllo"), protocol.ack("s1", 7, "0" * 40)):
        body = encode_frame(message)[4:]
        assert protocol._fast(body) == protocol.parse_message(body)
        assert protocol._fast(body) is not None
