"""Black-box tests of reverse_proxy.py against PROTOCOL.md sections 1 to 5.

Every test starts its own proxy on port 0 -- in a thread of the test (``proxies``),
or as a process where its command line or output is the point (``nodes.proxy``) --
and speaks raw framed sockets to it (``wires``). Upstream servers are real
``server.py`` processes or in-process ``FakeServer``s whose ``received`` list shows
what the proxy forwarded.
Answers are read undecoded (``recv``: plain ``json.loads`` of the frame body) so that
the exact JSON types on the wire are asserted, not the harness's normalised ones.
One behaviour per test; every wait is bounded by ``WAIT``.
"""

import collections
import hashlib
import json
import socket
import threading
import time

import pytest

import protocol
from conftest import WAIT, Wire, data, frame, run, sha1

pytestmark = pytest.mark.usefixtures("no_traceback_in_nodes")


# --- Helpers -----------------------------------------------------------------------

class RawWire:
    """A framed connection from a chosen source address (``recv`` reads it)."""

    def __init__(self, port, source):
        self.sock = socket.create_connection(("127.0.0.1", port), WAIT, (source, 0))
        self.decoder = protocol.FrameDecoder()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()


def encode(message):
    """One frame holding ``message`` as compact UTF-8 JSON (no ``\\u`` escapes)."""
    return frame(json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def recv(wire, timeout=WAIT):
    """The next frame's body as plain JSON (types exactly as sent), None at EOF."""
    wire.sock.settimeout(timeout)
    while True:
        body = wire.decoder.next_frame()
        if body is not None:
            return json.loads(body.decode("utf-8"))
        chunk = wire.sock.recv(65536)
        if not chunk:
            return None
        wire.decoder.feed(chunk)


def ack(server_id, destid, payload):
    """The exact ACK of PROTOCOL.md section 2."""
    return {"type": 2, "srcid": server_id, "destid": destid, "payloadsize": 40,
            "payload": sha1(payload)}


def assert_error(answer, code):
    assert isinstance(answer, dict), answer
    assert answer["type"] == 3 and answer["code"] == code, answer
    assert isinstance(answer["message"], str) and answer["message"], answer


def register(proxy_port, server_id, policy, listenport, **extra):
    """Send one SETUP on a new connection; return (answer, wire)."""
    wire = Wire(proxy_port)
    wire.sock.sendall(encode({"type": 1, "id": server_id, "privPolyId": policy,
                              "listenport": listenport, **extra}))
    return recv(wire), wire


def add_fake(fake_servers, proxy, server_id, policy, behaviour=None):
    """A FakeServer registered (legacy SETUP, connection then closed) for ``policy``."""
    fake = fake_servers(server_id, behaviour)
    answer, wire = register(proxy.port, server_id, policy, fake.port)
    wire.close()
    assert answer == {"type": 4, "id": server_id, "privPolyId": policy}, answer
    return fake


@pytest.fixture
def proxy(proxies):
    """A proxy in a thread of the test (``.port``, its log lines in ``.log``)."""
    return proxies()


@pytest.fixture
def served(proxy, fake_servers):
    """A proxy whose policy "111" is served by one honest FakeServer, id "900"."""
    fake = add_fake(fake_servers, proxy, "900", "111")
    return proxy, fake


def assert_usable(wire, srcid="c1", payload="after"):
    """The connection is still in step: a DATA frame gets its ACK (from id "900")."""
    wire.send_bytes(encode(data(srcid, "111", payload)))
    assert recv(wire) == ack("900", srcid, payload)


# --- Section 1: framing --------------------------------------------------------------

def test_length_zero_is_bad_frame_and_closes(proxy, wires):
    wire = wires(proxy.port)
    wire.send_bytes(b"\x00\x00\x00\x00")
    assert_error(recv(wire), "BAD_FRAME")
    assert wire.closed()


def test_length_above_max_frame_is_frame_too_large_and_closes(proxies, wires):
    proxy = proxies(max_frame=200)
    wire = wires(proxy.port)
    wire.send_bytes((201).to_bytes(4, "big") + b"x" * 201)  # body sent too: not read
    answer = recv(wire)
    assert_error(answer, "FRAME_TOO_LARGE")
    assert "201" in answer["message"]
    assert wire.closed()


def test_body_of_exactly_max_frame_is_accepted(proxies, fake_servers, wires):
    proxy = proxies(max_frame=200)
    add_fake(fake_servers, proxy, "900", "111")
    head = json.dumps(data("c1", "111", ""), separators=(",", ":"))
    payload = "p" * (200 - len(head))
    body = json.dumps(data("c1", "111", payload), separators=(",", ":")).encode()
    assert len(body) == 200
    wire = wires(proxy.port)
    wire.send_bytes(frame(body))
    assert recv(wire) == ack("900", "c1", payload)


def test_4gb_length_prefix_answered_at_once_and_closed(proxy, wires):
    wire = wires(proxy.port)
    started = time.monotonic()
    wire.send_bytes(b"\xff\xff\xff\xff")
    answer = recv(wire, timeout=2.0)
    assert time.monotonic() - started < 2.0
    assert_error(answer, "FRAME_TOO_LARGE")
    assert "4294967295" in answer["message"]
    assert wire.closed()


def test_framing_error_frame_survives_unread_input(proxy, wires):
    wire = wires(proxy.port)
    wire.send_bytes(b"\xff\xff\xff\xff" + b"x" * 256_000)  # a body the proxy never reads
    assert_error(recv(wire), "FRAME_TOO_LARGE")
    assert wire.closed()


def test_proxy_serves_another_client_after_framing_error(served, wires):
    proxy, _ = served
    bad = wires(proxy.port)
    bad.send_bytes(b"\xff\xff\xff\xff")
    assert_error(recv(bad), "FRAME_TOO_LARGE")
    assert bad.closed()
    assert_usable(wires(proxy.port), "c2", "next client")


def test_frame_sent_one_byte_at_a_time(served, wires):
    proxy, _ = served
    wire = wires(proxy.port)
    wire.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for byte in encode(data("c1", "111", "slowly")):
        wire.send_bytes(bytes([byte]))
    assert recv(wire) == ack("900", "c1", "slowly")


def test_frames_coalesced_in_one_send_are_all_answered(served, wires):
    proxy, _ = served
    wire = wires(proxy.port)
    wire.send_bytes(b"".join(encode(data("c1", "111", f"p{i}")) for i in range(3)))
    assert [recv(wire) for _ in range(3)] == [ack("900", "c1", f"p{i}") for i in range(3)]


def test_300_kb_payload(proxies, nodes, wires):
    proxy = proxies()
    nodes.server("100", "111", proxy.port)
    payload = "abcdefghij" * 30_000
    wire = wires(proxy.port)
    wire.send_bytes(encode(data("c1", "111", payload)))
    assert recv(wire) == ack("100", "c1", payload)


def test_close_mid_frame_loses_only_that_frame(served, wires):
    proxy, fake = served
    wire = wires(proxy.port)
    whole = encode(data("c1", "111", "whole"))
    partial = encode(data("c1", "111", "partial"))[:-5]
    wire.send_bytes(whole + partial)
    wire.sock.shutdown(socket.SHUT_WR)
    assert recv(wire) == ack("900", "c1", "whole")
    assert recv(wire) is None
    assert [m["payload"] for m in fake.received] == ["whole"]
    assert_usable(wires(proxy.port))


def test_frame_slower_than_frame_timeout_is_timeout_and_closes(proxies, wires):
    proxy = proxies(frame_timeout=0.5)
    wire = wires(proxy.port)
    wire.send_bytes(encode(data("c1", "111", "never finished"))[:-3])
    assert_error(recv(wire, timeout=5.0), "TIMEOUT")
    assert wire.closed()


BAD_BODIES = {
    "not UTF-8": b'{"type":0,"srcid":"c1","privPoliId":"111","payload":"\xff\xfe"}',
    "not JSON": b'{"type": 0, "srcid": ',
    "array": b'[{"type":0,"srcid":"c1","privPoliId":"111","payload":"x"}]',
    "string": b'"hello"',
    "number": b"42",
    "null": b"null",
    "lone surrogate": b'{"type":0,"srcid":"c1","privPoliId":"111","payload":"\\ud800"}',
    "NaN": b'{"type":0,"srcid":"c1","privPoliId":"111","payload":"x","payloadsize":NaN}',
    "array nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
}


def test_bad_message_answered_in_order_between_pipelined_data(served, wires):
    proxy, _ = served
    wire = wires(proxy.port)
    wire.send_bytes(encode(data("c1", "111", "one")) + frame(b"{oops")
                    + encode(data("c1", "111", "two")))
    assert recv(wire) == ack("900", "c1", "one")
    assert_error(recv(wire), "BAD_MESSAGE")
    assert recv(wire) == ack("900", "c1", "two")


# --- Section 2: messages ----------------------------------------------------------------

BAD_DATA = {
    "payload integer": data("c1", "111", 5),
    "payload null": data("c1", "111", None),
    "srcid list": data(["c1"], "111", "x"),
    "srcid float": data(1.5, "111", "x"),
    "srcid boolean": data(True, "111", "x"),
    "policy object": data("c1", {"id": "111"}, "x"),
    "policy boolean": data("c1", False, "x"),
    "no srcid": {"type": 0, "privPoliId": "111", "payload": "x"},
    "no policy": {"type": 0, "srcid": "c1", "payload": "x"},
    "no payload": {"type": 0, "srcid": "c1", "privPoliId": "111"},
    "no type": {"srcid": "c1", "privPoliId": "111", "payload": "x"},
    "type unknown": data("c1", "111", "x", type=9),
    "type word": data("c1", "111", "x", type="DATA"),
    "payloadsize too big": data("c1", "111", "abc", payloadsize=4),
    "payloadsize counts chars": data("c1", "111", "héllo", payloadsize=5),
    "payloadsize negative": data("c1", "111", "abc", payloadsize=-3),
}


BAD_FRAMES = {**BAD_BODIES, **{name: encode(message)[4:]
                               for name, message in BAD_DATA.items()}}


@pytest.mark.parametrize("body", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
def test_bad_message_is_answered_not_forwarded_and_connection_stays_usable(served, wires, body):
    proxy, fake = served
    wire = wires(proxy.port)
    wire.send_bytes(frame(body))
    assert_error(recv(wire), "BAD_MESSAGE")
    assert_usable(wire)
    assert [m["payload"] for m in fake.received] == ["after"]


def test_payloadsize_equal_to_utf8_bytes_is_accepted(served, wires):
    proxy, _ = served
    wire = wires(proxy.port)
    wire.send_bytes(encode(data("c1", "111", "héllo ✓", payloadsize=10)))
    assert recv(wire) == ack("900", "c1", "héllo ✓")


def test_string_type_accepted_and_answers_use_integer_types(served, wires):
    proxy, fake = served
    wire = wires(proxy.port)
    wire.send_bytes(encode(data("1", "111", "xyz1", type="0")))
    answer = recv(wire)
    assert answer == ack("900", "1", "xyz1")
    assert type(answer["type"]) is int and type(answer["payloadsize"]) is int
    wire.send_bytes(encode(data("1", "999", "xyz1", type="0")))
    error = recv(wire)
    assert_error(error, "NO_SERVER")
    assert type(error["type"]) is int


def test_ack_fields_exact_from_real_server(proxies, nodes, wires):
    proxy = proxies()
    nodes.server("100", "111", proxy.port)
    wire = wires(proxy.port)
    wire.send_bytes(encode(data("c7", "111", "xyz1")))
    assert recv(wire) == {"type": 2, "srcid": "100", "destid": "c7", "payloadsize": 40,
                          "payload": "b0400cf1f3919fdba057dbd2acc52f148fbb43ac"}


def test_ack_destid_keeps_integer_srcid(proxies, nodes, wires):
    proxy = proxies()
    nodes.server("100", "111", proxy.port)
    wire = wires(proxy.port)
    wire.send_bytes(encode(data(7, "111", "xyz1")))
    assert recv(wire) == ack("100", 7, "xyz1")


@pytest.mark.parametrize("escaped", [False, True], ids=["utf8", "u-escapes"])
def test_non_ascii_payload_hashed_over_utf8(proxies, nodes, wires, escaped):
    proxy = proxies()
    nodes.server("100", "111", proxy.port)
    payload = "héllo wörld ✓ 中文"
    body = json.dumps(data("c1", "111", payload), ensure_ascii=escaped).encode("utf-8")
    wire = wires(proxy.port)
    wire.send_bytes(frame(body))
    answer = recv(wire)
    assert answer == ack("100", "c1", payload)
    assert answer["payload"] == hashlib.sha1(payload.encode("utf-8")).hexdigest()


def test_unknown_fields_of_data_are_passed_to_the_server(served, wires):
    proxy, fake = served
    wire = wires(proxy.port)
    extra = {"trace": "abc-123", "hops": [1, {"n": None}], "ünï": "çødé"}
    wire.send_bytes(encode(data("c1", "111", "x", **extra)))
    assert recv(wire) == ack("900", "c1", "x")
    (received,) = fake.received
    assert {key: received[key] for key in extra} == extra
    assert received["type"] == 0 and received["srcid"] == "c1" and received["payload"] == "x"


def test_number_out_of_float_range_is_refused_with_bad_message(proxies, nodes, wires):
    # 1e400 cannot be passed on as JSON (it would become Infinity), so the proxy
    # refuses it up front instead of forwarding a frame the server cannot read.
    proxy = proxies()
    nodes.server("100", "111", proxy.port)
    wire = wires(proxy.port)
    wire.send_body(b'{"type":0,"srcid":"c1","privPoliId":"111","payload":"x","big":1e400}')
    assert recv(wire) == {"type": 3, "code": "BAD_MESSAGE",
                          "message": "frame body is not valid JSON: number 1e400 is out of range"}
    wire.send_bytes(encode(data("c1", "111", "x")))
    assert recv(wire) == ack("100", "c1", "x")


def test_unknown_fields_of_ack_are_passed_to_the_client(proxy, fake_servers, wires):
    def with_note(message, count):
        return {**protocol.ack_for("900", message), "note": "from the server"}
    add_fake(fake_servers, proxy, "900", "111", with_note)
    wire = wires(proxy.port)
    wire.send_bytes(encode(data("c1", "111", "x")))
    assert recv(wire) == {**ack("900", "c1", "x"), "note": "from the server"}


@pytest.mark.parametrize("registered, requested", [("111", 111), (111, "111")],
                         ids=["server-string-data-int", "server-int-data-string"])
def test_policy_integer_equals_string(proxy, fake_servers, wires, registered, requested):
    fake = fake_servers("900")
    answer, reg = register(proxy.port, "900", registered, fake.port)
    reg.close()
    assert answer == {"type": 4, "id": "900", "privPolyId": registered}
    wire = wires(proxy.port)
    wire.send_bytes(encode(data("c1", requested, "x")))
    assert recv(wire) == ack("900", "c1", "x")


def test_no_server_names_the_policy(served, wires):
    proxy, fake = served
    wire = wires(proxy.port)
    wire.send_bytes(encode(data("c9", "4242", "x")))
    answer = recv(wire)
    assert_error(answer, "NO_SERVER")
    assert "4242" in answer["message"]
    assert answer["destid"] == "c9"
    assert fake.received == []


def test_upstream_failed_when_the_only_server_closes_without_answering(
        proxy, fake_servers, wires):
    fake = add_fake(fake_servers, proxy, "900", "111", lambda message, count: "close")
    wire = wires(proxy.port)
    wire.send_bytes(encode(data("c1", "111", "x")))
    answer = recv(wire)
    assert_error(answer, "UPSTREAM_FAILED")
    assert "111" in answer["message"]
    assert answer["destid"] == "c1"
    assert fake.count >= 1


def test_upstream_failed_when_the_only_server_never_answers(proxies, fake_servers, wires):
    proxy = proxies(upstream_timeout=0.5)
    add_fake(fake_servers, proxy, "900", "111", lambda message, count: None)
    wire = wires(proxy.port)
    started = time.monotonic()
    wire.send_bytes(encode(data("c1", "111", "x")))
    assert_error(recv(wire), "UPSTREAM_FAILED")
    assert time.monotonic() - started < 5.0


def test_connection_above_max_conns_is_overloaded(proxies, wires):
    proxy = proxies(max_conns=1)
    first = wires(proxy.port)
    first.send_bytes(frame(b"[]"))
    assert_error(recv(first), "BAD_MESSAGE")  # the first connection is being served
    second = wires(proxy.port)
    assert_error(recv(second), "OVERLOADED")
    assert second.closed()


# --- Section 2 and 3: registration -------------------------------------------------------

def test_setup_answered_registered_with_id_and_policy(proxy, fake_servers):
    fake = fake_servers("s1")
    answer, wire = register(proxy.port, "s1", "111", fake.port)
    wire.close()
    assert answer == {"type": 4, "id": "s1", "privPolyId": "111"}


def test_setup_listenport_as_digit_string_is_accepted(proxy, fake_servers, wires):
    fake = fake_servers("s1")
    answer, wire = register(proxy.port, "s1", "111", str(fake.port))
    wire.close()
    assert answer == {"type": 4, "id": "s1", "privPolyId": "111"}
    client = wires(proxy.port)
    client.send_bytes(encode(data("c1", "111", "x")))
    assert recv(client) == ack("s1", "c1", "x")


@pytest.mark.parametrize("port", [0, 65536, -1, "abc", "", 1.5, None, True, [5000]],
                         ids=repr)
def test_setup_bad_listenport_is_bad_message(proxy, wires, port):
    answer, wire = register(proxy.port, "s1", "111", port)
    assert_error(answer, "BAD_MESSAGE")
    assert "listenport" in answer["message"]
    if isinstance(port, int) and not isinstance(port, bool):
        assert str(port) in answer["message"]
    wire.close()
    client = wires(proxy.port)
    client.send_bytes(encode(data("c1", "111", "x")))
    assert_error(recv(client), "NO_SERVER")  # nothing was registered


def test_setup_without_listenport_is_bad_message(proxy):
    wire = Wire(proxy.port)
    wire.send_bytes(encode({"type": 1, "id": "s1", "privPolyId": "111"}))
    try:
        assert_error(recv(wire), "BAD_MESSAGE")
    finally:
        wire.close()


def test_registration_connection_may_stay_open_and_register_again(proxy, fake_servers,
                                                                 wires):
    one, two = fake_servers("s1"), fake_servers("s2")
    answer, wire = register(proxy.port, "s1", "111", one.port)
    wire.send_bytes(encode({"type": 1, "id": "s2", "privPolyId": "111",
                            "listenport": two.port}))
    assert recv(wire) == {"type": 4, "id": "s2", "privPolyId": "111"}
    wire.close()
    client = wires(proxy.port)
    client.send_bytes(encode(data("c1", "111", "a")) + encode(data("c1", "111", "b")))
    assert [recv(client)["srcid"] for _ in range(2)] == ["s1", "s2"]


def test_setup_host_field_is_honoured(proxy, fake_servers, wires):
    fake = fake_servers("s1")  # listens on 127.0.0.1 only
    with RawWire(proxy.port, source="127.0.0.2") as reg:
        reg.sock.sendall(encode({"type": 1, "id": "s1", "privPolyId": "111",
                                 "listenport": fake.port, "host": "127.0.0.1"}))
        assert recv(reg) == {"type": 4, "id": "s1", "privPolyId": "111"}
    client = wires(proxy.port)
    client.send_bytes(encode(data("c1", "111", "x")))
    assert recv(client) == ack("s1", "c1", "x")


def test_setup_without_host_uses_the_registration_source_address(proxy, fake_servers, wires):
    fake = fake_servers("s1")  # listens on 127.0.0.1, registers from 127.0.0.2
    with RawWire(proxy.port, source="127.0.0.2") as reg:
        reg.sock.sendall(encode({"type": 1, "id": "s1", "privPolyId": "111",
                                 "listenport": fake.port}))
        assert recv(reg) == {"type": 4, "id": "s1", "privPolyId": "111"}
    client = wires(proxy.port)
    client.send_bytes(encode(data("c1", "111", "x")))
    answer = recv(client)
    assert_error(answer, "UPSTREAM_FAILED")
    assert "127.0.0.2" in answer["message"]
    assert fake.received == []


def test_reregistration_with_new_port_replaces_the_entry(proxy, fake_servers, wires):
    old = add_fake(fake_servers, proxy, "A", "111")
    add_fake(fake_servers, proxy, "B", "111")
    new = add_fake(fake_servers, proxy, "A", "111")  # same id, new port
    client = wires(proxy.port)
    client.send_bytes(b"".join(encode(data("c1", "111", f"p{i}")) for i in range(4)))
    assert [recv(client)["srcid"] for _ in range(4)] == ["A", "B", "A", "B"]
    assert old.received == []
    assert [m["payload"] for m in new.received] == ["p0", "p2"]


def test_reregistration_with_new_policy_moves_the_server(proxy, fake_servers, wires):
    fake = add_fake(fake_servers, proxy, "A", "111")
    answer, wire = register(proxy.port, "A", "222", fake.port)
    wire.close()
    assert answer == {"type": 4, "id": "A", "privPolyId": "222"}
    client = wires(proxy.port)
    client.send_bytes(encode(data("c1", "111", "x")) + encode(data("c1", "222", "y")))
    assert_error(recv(client), "NO_SERVER")
    assert recv(client) == ack("A", "c1", "y")


# --- Section 3: conversations -------------------------------------------------------------

def test_50_pipelined_frames_across_two_policies_answered_in_order(proxies, nodes, wires):
    proxy = proxies()
    nodes.server("100", "111", proxy.port)
    nodes.server("200", "222", proxy.port)
    wire = wires(proxy.port)
    sent = [("111" if i % 3 else "222", f"payload {i}") for i in range(50)]
    wire.send_bytes(b"".join(encode(data("c1", policy, payload)) for policy, payload in sent))
    answers = [recv(wire) for _ in sent]
    assert answers == [ack("100" if policy == "111" else "200", "c1", payload)
                       for policy, payload in sent]


@pytest.mark.parametrize("kind", [
    {"type": 1, "id": "s1", "privPolyId": "111", "listenport": 5000},
    {"type": 2, "srcid": "s1", "destid": "c1", "payloadsize": 40, "payload": "0" * 40},
    {"type": 3, "code": "BAD_FRAME", "message": "no"},
    {"type": 4, "id": "s1", "privPolyId": "111"},
    {"type": 6},
], ids=["SETUP", "ACK", "ERROR", "REGISTERED", "PONG"])
def test_other_type_on_a_client_connection_is_bad_message(served, wires, kind):
    proxy, _ = served
    wire = wires(proxy.port)
    assert_usable(wire, "c1", "first")
    wire.send_bytes(encode(kind))
    assert_error(recv(wire), "BAD_MESSAGE")
    assert_usable(wire, "c1", "still")


def test_ack_as_first_frame_is_bad_message(served, wires):
    proxy, _ = served
    wire = wires(proxy.port)
    wire.send_bytes(encode({"type": 2, "srcid": "s1", "destid": "c1", "payloadsize": 40,
                            "payload": "0" * 40}))
    assert_error(recv(wire), "BAD_MESSAGE")
    assert_usable(wire)


def test_setup_on_a_client_connection_does_not_register(served, fake_servers, wires):
    proxy, _ = served
    intruder = fake_servers("evil")
    wire = wires(proxy.port)
    assert_usable(wire, "c1", "first")
    wire.send_bytes(encode({"type": 1, "id": "evil", "privPolyId": "111",
                            "listenport": intruder.port}))
    assert_error(recv(wire), "BAD_MESSAGE")
    wire.send_bytes(b"".join(encode(data("c1", "111", f"p{i}")) for i in range(3)))
    assert [recv(wire)["srcid"] for _ in range(3)] == ["900"] * 3
    assert intruder.received == []


def test_half_close_gets_every_answer_then_eof(served, wires):
    proxy, _ = served
    wire = wires(proxy.port)
    wire.send_bytes(b"".join(encode(data("c1", "111", f"p{i}")) for i in range(10)))
    wire.sock.shutdown(socket.SHUT_WR)
    assert [recv(wire) for _ in range(10)] == [ack("900", "c1", f"p{i}") for i in range(10)]
    assert recv(wire) is None


def test_half_close_without_frames_gets_eof(proxy, wires):
    wire = wires(proxy.port)
    wire.sock.shutdown(socket.SHUT_WR)
    assert recv(wire) is None


def test_answers_go_back_on_the_incoming_connection_whatever_srcid(served, wires):
    proxy, _ = served
    one, two = wires(proxy.port), wires(proxy.port)
    one.send_bytes(encode(data("same", "111", "for one")))
    two.send_bytes(encode(data("same", "111", "for two")))
    one.send_bytes(encode(data("c2", "111", "for one again")))  # another client's id
    assert recv(two) == ack("900", "same", "for two")
    assert recv(one) == ack("900", "same", "for one")
    assert recv(one) == ack("900", "c2", "for one again")


def test_legacy_registration_stays_after_its_connection_closes(proxy, fake_servers, wires):
    add_fake(fake_servers, proxy, "900", "111")  # the SETUP connection is closed
    client = wires(proxy.port)
    client.send_bytes(encode(data("c1", "111", "x")))
    assert recv(client) == ack("900", "c1", "x")


# --- Section 4: load balancing -------------------------------------------------------------

def test_round_robin_four_servers_fifth_frame_wraps_to_first(proxy, fake_servers, wires):
    for server_id in ("s1", "s2", "s3", "s4"):
        add_fake(fake_servers, proxy, server_id, "111")
    wire = wires(proxy.port)
    wire.send_bytes(b"".join(encode(data("c1", "111", f"p{i}")) for i in range(5)))
    assert [recv(wire)["srcid"] for _ in range(5)] == ["s1", "s2", "s3", "s4", "s1"]


def test_rotation_is_counted_over_all_clients(proxy, fake_servers, wires):
    for server_id in ("s1", "s2", "s3"):
        add_fake(fake_servers, proxy, server_id, "111")
    clients = [wires(proxy.port), wires(proxy.port)]
    seen = []
    for i in range(6):
        wire = clients[i % 2]
        wire.send_bytes(encode(data(f"c{i % 2}", "111", f"p{i}")))
        seen.append(recv(wire)["srcid"])
    assert seen == ["s1", "s2", "s3", "s1", "s2", "s3"]


def test_each_policy_has_its_own_rotation(proxy, fake_servers, wires):
    for server_id, policy in (("a1", "111"), ("b1", "222"), ("a2", "111"), ("b2", "222")):
        add_fake(fake_servers, proxy, server_id, policy)
    wire = wires(proxy.port)
    policies = ["111", "222", "222", "111", "222", "111"]
    wire.send_bytes(b"".join(encode(data("c1", p, f"p{i}")) for i, p in enumerate(policies)))
    assert [recv(wire)["srcid"] for _ in policies] == ["a1", "b1", "b2", "a2", "b1", "a1"]


def test_joining_server_is_appended_and_rotation_not_reset(proxy, fake_servers, wires):
    for server_id in ("s1", "s2", "s3"):
        add_fake(fake_servers, proxy, server_id, "111")
    wire = wires(proxy.port)
    wire.send_bytes(encode(data("c1", "111", "p0")))
    assert recv(wire)["srcid"] == "s1"
    add_fake(fake_servers, proxy, "s4", "111")
    wire.send_bytes(b"".join(encode(data("c1", "111", f"p{i}")) for i in range(1, 6)))
    assert [recv(wire)["srcid"] for _ in range(5)] == ["s2", "s3", "s4", "s1", "s2"]


def test_leaving_server_is_removed_and_rotation_goes_on(proxy, fake_servers, wires):
    sessions = {}
    for server_id in ("s1", "s2", "s3"):
        fake = fake_servers(server_id)
        sessions[server_id] = fake.register(proxy.port, "111", heartbeat=30)
    wire = wires(proxy.port)
    wire.send_bytes(encode(data("c1", "111", "p0")))
    assert recv(wire)["srcid"] == "s1"
    sessions["s2"].close()  # s2 leaves: its session closes
    proxy.log.wait_for(r"server id s2 .*left")
    wire.send_bytes(b"".join(encode(data("c1", "111", f"p{i}")) for i in range(1, 5)))
    assert [recv(wire)["srcid"] for _ in range(4)] == ["s3", "s1", "s3", "s1"]
    for session in sessions.values():
        session.close()


def test_12_concurrent_clients_480_packets_spread_evenly(proxies, nodes):
    proxy = proxies()
    for server_id in ("a", "b", "c"):
        nodes.server(server_id, "777", proxy.port, "-quiet")
    results, failures = [], []
    lock = threading.Lock()

    def client(number):
        try:
            wire = Wire(proxy.port)
            try:
                payloads = [f"client {number} packet {i}" for i in range(40)]
                wire.send_bytes(b"".join(encode(data(f"c{number}", "777", p))
                                         for p in payloads))
                answers = [recv(wire) for _ in payloads]
            finally:
                wire.close()
            with lock:
                results.extend(zip(payloads, answers, [f"c{number}"] * 40))
        except Exception as exc:  # reported below with the assertion
            with lock:
                failures.append(f"client {number}: {exc!r}")

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 2)
    assert not failures, failures
    assert len(results) == 480
    for payload, answer, srcid in results:
        assert answer == ack(answer["srcid"], srcid, payload)
    counts = collections.Counter(answer["srcid"] for _, answer, _ in results)
    assert counts == {"a": 160, "b": 160, "c": 160}


def test_50_concurrent_connections_are_served(served, wires):
    proxy, fake = served
    conns = [wires(proxy.port) for _ in range(50)]
    for number, wire in enumerate(conns):
        wire.send_bytes(encode(data(f"c{number}", "111", f"payload {number}")))
    for number, wire in enumerate(conns):
        assert recv(wire) == ack("900", f"c{number}", f"payload {number}")
    assert fake.count == 50


# --- Section 5: the proxy's command line and output ------------------------------------

def test_port_zero_prints_the_real_port_as_first_line(nodes, wires):
    proxy = nodes.proxy()
    assert proxy.port != 0
    assert proxy.lines[0] == f"Running the reverse proxy on port {proxy.port}"
    wire = wires(proxy.port)
    wire.send_bytes(encode(data("c1", "5", "x")))
    assert_error(recv(wire), "NO_SERVER")


def test_registration_prints_setup_line(proxy, fake_servers):
    add_fake(fake_servers, proxy, "s77", "111")
    proxy.log.wait_for(r"setup message from server id s77\b")


def test_busy_port_exits_1_naming_the_port():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = run("reverse_proxy.py", "-port", port)
    assert result.returncode == 1
    assert str(port) in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_server_data_port_answers_pipelined_data_in_order(proxies, nodes, wires):
    proxy = proxies()
    server = nodes.server("100", "111", proxy.port)
    assert server.port != 0
    wire = wires(server.port)
    wire.send_bytes(b"".join(encode(data("c1", "111", f"p{i}")) for i in range(5))
                    + frame(b"not json") + encode(data("c1", "111", "last")))
    assert [recv(wire) for _ in range(5)] == [ack("100", "c1", f"p{i}") for i in range(5)]
    assert_error(recv(wire), "BAD_MESSAGE")
    assert recv(wire) == ack("100", "c1", "last")


def test_server_data_port_closes_after_bad_frame(proxies, nodes, wires):
    proxy = proxies()
    server = nodes.server("100", "111", proxy.port)
    wire = wires(server.port)
    wire.send_bytes(b"\x00\x00\x00\x00")
    assert_error(recv(wire), "BAD_FRAME")
    assert wire.closed()


# --- The front-tier listener (PROXY protocol, README "Scaling out") -------------------------

def test_the_front_tier_listener_takes_the_client_address_from_the_header(
        proxies, fake_servers):
    import proxy_protocol
    proxy = proxies(proxy_protocol_address=("127.0.0.1", 0))
    port = proxy.front_tier.port
    server = fake_servers("A")
    server.register(proxy.port, "111")
    # An IPv4 client seen by a dual-stack front tier: the mapped form is unmapped.
    wire = Wire(port)
    wire.send_bytes(proxy_protocol.build_v1(("::ffff:127.0.0.9", 5555), ("::1", 2100)))
    wire.send(protocol.data("c", "111", "p"))
    assert wire.receive()["payload"] == protocol.sha1_hex("p")
    wire.send_body(b"{}")  # a bad message: its warning names the client
    assert wire.receive()["code"] == "BAD_MESSAGE"
    proxy.log.wait_for(r"\(from 127\.0\.0\.9:5555\)$")
    wire.close()
    # A front tier's health check: a LOCAL header, then PING.
    check = Wire(port)
    check.send_bytes(proxy_protocol.build_v2(command="LOCAL"))
    check.send(protocol.ping())
    assert check.receive() == {"type": 6}
    check.close()
    # No header: closed without an answer, and said so.
    bare = Wire(port)
    bare.send(protocol.data("c", "111", "p"))
    assert bare.closed()
    proxy.log.wait_for(r"not a PROXY protocol header")
    bare.close()


def test_a_front_tier_connection_whose_header_never_comes_is_said_to_lack_it(proxies):
    proxy = proxies(proxy_protocol_address=("127.0.0.1", 0), frame_timeout=0.3)
    silent = Wire(proxy.front_tier.port)
    silent.send_bytes(b"PROXY TCP4 ")  # the start of a header, and no more
    assert silent.closed()
    proxy.log.wait_for(r"^connection from 127\.0\.0\.1:\d+ failed before its PROXY protocol "
                       r"header \(front-tier port\): timed out")
    silent.close()
