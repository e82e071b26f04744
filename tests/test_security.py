"""Attack tests of the hardening issue: bounded resources, hostile input, authenticated
registration and TLS (PROTOCOL.md sections 1, 2 and 7, and this repository's sections
8 and 9).

Every test runs the real programs on 127.0.0.1, port 0, and talks to them over real
sockets. Waits are on output lines, answers or counts read from /proc, each bounded;
a sleep only paces bytes a test sends on purpose (a slow client), never to wait for a
state. Certificates are made at run time with the openssl command.
"""

import collections
import json
import os
import re
import resource
import signal
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gate
import protocol
from conftest import (WAIT, Wire, assert_clean_log, data, frame, run, sha1, wait_until,
                      write_packets)

MAX_FRAME = protocol.DEFAULT_MAX_FRAME
TRACEBACK = re.compile(r"^\s*Traceback \(most recent call last\)", re.M)
NONCE = re.compile(r"^[0-9a-f]{32}$")


# --- Helpers ------------------------------------------------------------------------

def read_until_eof(sock, timeout=WAIT):
    """Read every frame until the peer closes; return (messages, partial) where
    ``partial`` is True if the stream ended inside a frame.

    Messages are plain dicts (``parse_message``); a body that does not parse is
    returned as its raw bytes so that the caller's assertion shows it.
    """
    decoder = protocol.FrameDecoder(1 << 30)
    messages = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"peer did not close within {timeout} s; got {messages}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            return messages, decoder.in_frame
        decoder.feed(chunk)
        while (body := decoder.next_frame()) is not None:
            try:
                messages.append(protocol.parse_message(body))
            except protocol.ProtocolError:
                messages.append(body)


def proc_counts(pid):
    """(threads, open file descriptors) of process ``pid``, read from /proc."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        threads = int(re.search(r"^Threads:\s+(\d+)", status.read(), re.M).group(1))
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def wait_counts(pid, condition, timeout=WAIT):
    """Poll /proc until ``condition((threads, fds))`` holds; return the counts."""
    deadline = time.monotonic() + timeout
    while True:
        counts = proc_counts(pid)
        if condition(counts):
            return counts
        if time.monotonic() > deadline:
            raise AssertionError(f"counts of pid {pid} still (threads, fds) = {counts} "
                                 f"after {timeout} s")
        time.sleep(0.05)


def ask(port, message, timeout=WAIT):
    """Open a connection, send one message, return the one answer (dict)."""
    wire = Wire(port, timeout=timeout)
    try:
        wire.send(message)
        return wire.receive()
    finally:
        wire.close()


@pytest.fixture
def closed_port():
    """A port bound but not listening: a connection to it is refused at once. Unlike
    ``conftest.free_port`` it stays bound to the end of the test, so that no other
    program can take it while the fuzz tests name it in their hundreds of examples."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture(scope="module", autouse=True)
def enough_descriptors():
    """500 held connections need ~1,100 descriptors here and in the proxy (children
    inherit the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- 2. Hostile input: the fuzz test ------------------------------------------------

GOOD_POLICY = "good-policy-zz"  # no fuzz value can name it: see the pools below

# Values that are wrong, huge or odd for any field. Raw JSON text, so that values
# json.dumps cannot make (deep nesting, numbers of any size) can be sent too.
# Valid heartbeats are left out: they turn the connection into a session with its
# own timing; out-of-range ones are in the pool below.
# Nesting depths; 941 to 999, next to the JSON decoder's limit, are swept one by one
# in test_nesting_next_to_the_recursion_limit.
DEPTHS = st.one_of(st.integers(min_value=1, max_value=940),
                   st.integers(min_value=1000, max_value=1200))
HOSTILE_JSON = st.one_of(
    st.sampled_from([
        "null", "true", "false", "0", "-1", "1.5", "-0", "1e999", "-1e999", "1e-400",
        "[]", "{}", '""', '" "', '"0"', '"-1"', '"65536"', '"\\u0000"',
        '"line\\nforged"', '"\\u001b[31mred"', '"\\ud83d\\ude00"', '"\u00e9\u4e2d"',
        '"Infinity"',
    ]),
    st.integers(min_value=-10 ** 30, max_value=10 ** 30).map(str),
    st.integers(min_value=300, max_value=5000).map(lambda n: "9" * n),   # any size
    DEPTHS.map(lambda n: "[" * n + "]" * n),
    DEPTHS.map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.integers(min_value=1, max_value=200_000).map(lambda n: json.dumps("x" * n)),
    st.text(max_size=40).map(json.dumps),
    st.binary(max_size=12).map(lambda b: json.dumps(b.decode("latin-1"))),
)

FIELD_NAMES = ["type", "srcid", "privPoliId", "privPolyId", "payload", "payloadsize",
               "id", "listenport", "host", "heartbeat", "destid", "code", "message",
               "nonce", "proof", "extra"]


def templates(closed_port):
    """One valid message of each type, its fields as raw JSON text."""
    j = json.dumps
    return [
        {"type": "0", "srcid": j("fz-c"), "privPoliId": j("fz-d"), "payload": j("abc")},
        {"type": '"0"', "srcid": "17", "privPoliId": j("fz-s"), "payload": j("p\u00e9"),
         "payloadsize": "3"},
        {"type": "1", "id": j("fz-srv"), "privPolyId": j("fz-s"),
         "listenport": str(closed_port)},
        {"type": "1", "id": "5", "privPolyId": "111", "listenport": j(str(closed_port)),
         "host": j("127.0.0.1")},
        {"type": "2", "srcid": j("a"), "destid": j("b"), "payloadsize": "40",
         "payload": j("0" * 40)},
        {"type": "3", "code": j("NO_SERVER"), "message": j("x")},
        {"type": "4", "id": j("a"), "privPolyId": j("b")},
        {"type": "5"},
        {"type": "6"},
    ]


def render(fields):
    return ("{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in fields.items()) + "}").encode()


@st.composite
def hostile_chunk(draw, closed_port):
    """One piece of a hostile byte stream."""
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "valid", "random",
                                 "random_frame", "not_object", "truncated", "bad_length",
                                 "huge_frame"]))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=64))
    if kind == "random_frame":
        return frame(draw(st.binary(min_size=1, max_size=200)))
    if kind == "not_object":
        return frame(draw(st.sampled_from([
            b"[]", b"1", b"null", b'"x"', b"NaN", b"-Infinity", b"\xff\xfe", b"\xef\xbb\xbf{}",
            b"{", b'{"type":0,}', b"{'type':0}", b"\x00", b" ", b'{"type":0}{"type":0}'])))
    if kind == "bad_length":
        length = draw(st.sampled_from([0, MAX_FRAME + 1, 0xFFFFFFFF, 0x7FFFFFFF]))
        return length.to_bytes(4, "big") + draw(st.binary(max_size=16))
    if kind == "huge_frame":
        # exactly the maximum: a valid frame of 1 MiB
        body = render({"type": "0", "srcid": '"big"', "privPoliId": '"fz-d"',
                       "payload": json.dumps("y" * (MAX_FRAME - 60))})
        return frame(body + b" " * (MAX_FRAME - len(body)))
    fields = dict(draw(st.sampled_from(templates(closed_port))))
    if kind in ("mutated", "truncated"):
        for _ in range(draw(st.integers(1, 3))):
            name = draw(st.sampled_from(FIELD_NAMES))
            action = draw(st.sampled_from(["set", "set", "set", "delete"]))
            if action == "delete":
                fields.pop(name, None)
            else:
                value = draw(HOSTILE_JSON)
                if name == "heartbeat":
                    value = draw(st.sampled_from(["0", "-1", '"1"', "null", "[]", "true",
                                                   "1" + "0" * 400, "1e300", "3601"]))
                if name == "host":
                    value = draw(st.sampled_from(['""', "5", '"a b"', json.dumps("h" * 254),
                                                  '"\\n"', "null", '"127.0.0.1"']))
                fields[name] = value
    whole = frame(render(fields))
    if kind == "truncated":
        return whole[:draw(st.integers(1, len(whole) - 1))]
    return whole


def expected_answers(stream):
    """How many answers the proxy owes for ``stream`` followed by a half-close, and
    the code of the fatal framing error if there is one (PROTOCOL.md section 1)."""
    count, at = 0, 0
    while len(stream) - at >= 4:
        length = int.from_bytes(stream[at:at + 4], "big")
        if length == 0:
            return count + 1, "BAD_FRAME"
        if length > MAX_FRAME:
            return count + 1, "FRAME_TOO_LARGE"
        if len(stream) - at - 4 < length:
            break
        count += 1
        at += 4 + length
    return count, None


FUZZ_CODES = {"BAD_FRAME", "FRAME_TOO_LARGE", "BAD_MESSAGE", "NO_SERVER", "UPSTREAM_FAILED"}
ANSWER_TYPES = {protocol.MessageType.ACK, protocol.MessageType.ERROR,
                protocol.MessageType.REGISTERED, protocol.MessageType.PONG}


def test_fuzz_random_and_mutated_frames_then_good_client_served(nodes, closed_port, tmp_path):
    proxy = nodes.proxy()
    bystander = Wire(proxy.port)  # opened before the attack, used after it
    connections = [0]
    seen = collections.Counter()
    started = time.monotonic()

    @settings(max_examples=300, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.lists(hostile_chunk(closed_port), min_size=1, max_size=6),
                    min_size=1, max_size=8))
    def attack(scripts):
        socks = [socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT)
                 for _ in scripts]
        connections[0] += len(socks)
        streams = [b"".join(script) for script in scripts]
        try:
            senders = []
            for sock, stream in zip(socks, streams):
                def send(sock=sock, stream=stream):
                    try:
                        sock.sendall(stream)
                        sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass  # closed by the proxy after a framing error: allowed
                senders.append(threading.Thread(target=send, daemon=True))
                senders[-1].start()
            for sock, stream, sender in zip(socks, streams, senders):
                answers, partial = read_until_eof(sock)
                sender.join(WAIT)
                owed, fatal = expected_answers(stream)
                assert not partial, answers
                assert len(answers) == owed, (answers, stream[:300])
                for answer in answers:
                    assert isinstance(answer, dict), answer
                    seen[answer.get("code", answer["type"].name)] += 1
                    assert answer["type"] in ANSWER_TYPES, answer
                    if answer["type"] == protocol.MessageType.ERROR:
                        assert answer["code"] in FUZZ_CODES, answer
                if fatal:
                    assert answers[-1]["code"] == fatal, answers[-1]
        finally:
            for sock in socks:
                sock.close()

    attack()
    fuzz_seconds = time.monotonic() - started
    assert connections[0] >= 300
    # The attack reached every kind of answer, not only framing errors.
    assert {"BAD_FRAME", "FRAME_TOO_LARGE", "BAD_MESSAGE", "NO_SERVER"} <= set(seen), seen

    server = nodes.server("good-srv", GOOD_POLICY, proxy.port)
    wire = Wire(proxy.port)
    wire.send(data("c1", GOOD_POLICY, "after the storm"))
    assert wire.receive() == {"type": 2, "srcid": "good-srv", "destid": "c1",
                              "payloadsize": 40, "payload": sha1("after the storm")}
    bystander.send(data("c2", GOOD_POLICY, "still here"))
    assert bystander.receive()["payload"] == sha1("still here")
    pkt = write_packets(tmp_path, "p.json", [data("9", GOOD_POLICY, "xyz1")])
    done = run("client.py", "-id", "9", "-revproc", proxy.port, "-pkt", pkt)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Hash of payload is correct" in done.stdout
    assert proxy.proc.poll() is None
    assert_clean_log(proxy)
    assert_clean_log(server)
    print(f"fuzz: {connections[0]} hostile connections in {fuzz_seconds:.1f} s; "
          f"answers {dict(seen)}")
    wire.close()
    bystander.close()


DEEP_FIELDS = {
    "DATA.srcid": '{"type":0,"srcid":%s,"privPoliId":"p","payload":"x"}',
    "DATA.privPoliId": '{"type":0,"srcid":"c","privPoliId":%s,"payload":"x"}',
    "DATA.payload": '{"type":0,"srcid":"c","privPoliId":"p","payload":%s}',
    "DATA.extra": '{"type":0,"srcid":"c","privPoliId":"p","payload":"x","e":%s}',
    "type": '{"type":%s}',
    "SETUP.id": '{"type":1,"id":%s,"privPolyId":"p","listenport":9}',
    "SETUP.listenport": '{"type":1,"id":"s","privPolyId":"p","listenport":%s}',
    "SETUP.heartbeat": '{"type":1,"id":"s","privPolyId":"p","listenport":9,"heartbeat":%s}',
}


@pytest.mark.parametrize("program", ["proxy", "server"])
def test_nesting_next_to_the_recursion_limit(proxies, nodes, program):
    """Every depth from 941 to 999, as a list and as an object, in each kind of field:
    one answer per frame (BAD_MESSAGE, or NO_SERVER for an unknown field that is
    passed on) and the connection stays in step."""
    proxy = proxies()
    target = proxy if program == "proxy" else nodes.server("d", "dp", proxy.port, "-quiet")
    missing = {}
    for name, template in DEEP_FIELDS.items():
        frames = []
        for depth in range(941, 1000):
            for value in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
                frames.append(frame((template % value).encode()))
        with socket.create_connection(("127.0.0.1", target.port), timeout=WAIT) as sock:
            sock.sendall(b"".join(frames))
            sock.shutdown(socket.SHUT_WR)
            answers, _ = read_until_eof(sock)
        codes = {a["code"] for a in answers if isinstance(a, dict) and "code" in a}
        expected = {"BAD_MESSAGE", "NO_SERVER"} if name == "DATA.extra" else {"BAD_MESSAGE"}
        if len(answers) != len(frames) or not codes <= expected:
            missing[name] = (len(frames) - len(answers), codes)
    assert missing == {}
    assert_clean_log(target)


def test_forged_log_line_stays_one_line(proxies, wires):
    """An id holding a newline and a fake traceback cannot forge log lines."""
    proxy = proxies()
    wire = wires(proxy.port)
    evil = "x\nTraceback (most recent call last):\n  fake"
    wire.send(data(evil, "nope", "p"))
    answer = wire.receive()
    assert (answer["code"], answer["destid"]) == ("NO_SERVER", evil)
    proxy.log.wait_for(r"no live server serves privacy policy nope")
    assert not TRACEBACK.search("\n".join(proxy.log.lines))
    assert proxy.log.count(r"^\s+fake") == 0


def test_lone_surrogate_in_passed_on_field(proxies, wires):
    proxy = proxies()
    wire = wires(proxy.port)
    for body in (b'{"type":0,"srcid":"1","privPoliId":"p","payload":"x","note":"\\ud800"}',
                 b'{"type":0,"srcid":"1","privPoliId":"p","payload":"x","\\udfff":1}'):
        wire.send_body(body)
        answer = wire.receive(timeout=5)
        assert answer is not None and answer["code"] == "BAD_MESSAGE", answer
    wire.send(data("1", "p", "x"))
    assert wire.receive()["code"] == "NO_SERVER"
    assert_clean_log(proxy)


@pytest.mark.parametrize("program", ["proxy", "server"])
def test_heartbeat_huge_integer(proxies, nodes, wires, program):
    """A heartbeat of 401 digits is a BAD_MESSAGE, not an OverflowError in validation
    that dropped the connection unanswered (found by this file, now fixed)."""
    proxy = proxies()
    target = proxy
    if program == "server":
        target = nodes.server("h1", "ph", proxy.port)
    wire = wires(target.port)
    wire.send_body(b'{"type":1,"id":"a","privPolyId":"p","listenport":5,"heartbeat":1'
                   + b"0" * 400 + b"}")
    answer = wire.receive(timeout=5)
    assert answer is not None and answer["code"] == "BAD_MESSAGE", answer
    assert_clean_log(target)


def test_heartbeat_out_of_range_float(proxies, wires, closed_port):
    """A heartbeat of 1e300 s is refused, or makes a session that works; it once
    registered, then killed the session with an OverflowError in settimeout."""
    proxy = proxies()
    wire = wires(proxy.port)
    wire.send_body(b'{"type":1,"id":"a","privPolyId":"p","listenport":%d,"heartbeat":1e300}'
                   % closed_port)
    answer = wire.receive(timeout=5)
    if answer["type"] == protocol.MessageType.REGISTERED:
        wire.send({"type": 5})
        assert wire.receive(timeout=5) == {"type": 6}
        wire.send({"type": 5})
        assert wire.receive(timeout=5) == {"type": 6}
    else:
        assert answer["code"] == "BAD_MESSAGE", answer
    assert_clean_log(proxy)


# --- 2. Every field of every message with a wrong type ------------------------------

BAD_ID = [None, True, 1.5, [], {}, "", ["1"], {"a": 1}, "\ud800"]
BAD_STRING = [None, True, 5, 1.5, [], {}, "\udc00"]
BAD_COUNT = [None, True, -1, 1.5, "40", [], {}]
BAD_PORT = [None, True, 0, -1, 65536, 1.5, "abc", "", "65536", "1e3", " 80", "0x50",
            [], {}, 10 ** 40]
BAD_HEARTBEAT = [None, True, 0, -1, -0.5, "1", [], {}]
BAD_HOST = [None, 5, [], "", "a b", "h" * 254, "x\ny"]
BAD_TYPE = [None, True, 7, -1, 1.5, "x", "01", " 0", "", [], {}, 10 ** 30]

VALID = {
    "DATA": {"type": 0, "srcid": "c", "privPoliId": "p", "payload": "x"},
    "SETUP": {"type": 1, "id": "s", "privPolyId": "p", "listenport": 9},
    "ACK": {"type": 2, "srcid": "s", "destid": "c", "payloadsize": 40, "payload": "0" * 40},
    "ERROR": {"type": 3, "code": "NO_SERVER", "message": "m"},
    "REGISTERED": {"type": 4, "id": "s", "privPolyId": "p"},
    "PING": {"type": 5},
    "PONG": {"type": 6},
}
FIELD_VALUES = {
    ("DATA", "srcid"): BAD_ID, ("DATA", "privPoliId"): BAD_ID,
    ("DATA", "payload"): BAD_STRING, ("DATA", "payloadsize"): BAD_COUNT + [2, 0],
    ("SETUP", "id"): BAD_ID, ("SETUP", "privPolyId"): BAD_ID,
    ("SETUP", "listenport"): BAD_PORT, ("SETUP", "host"): BAD_HOST,
    ("SETUP", "heartbeat"): BAD_HEARTBEAT, ("SETUP", "nonce"): BAD_STRING,
    ("SETUP", "proof"): BAD_STRING,
    ("ACK", "srcid"): BAD_ID, ("ACK", "destid"): BAD_ID,
    ("ACK", "payloadsize"): BAD_COUNT, ("ACK", "payload"): BAD_STRING,
    ("ERROR", "code"): BAD_STRING, ("ERROR", "message"): BAD_STRING,
    ("ERROR", "destid"): BAD_ID,
    ("REGISTERED", "id"): BAD_ID, ("REGISTERED", "privPolyId"): BAD_ID,
}
REQUIRED = {"DATA": ["srcid", "privPoliId", "payload"],
            "SETUP": ["id", "privPolyId", "listenport"],
            "ACK": ["srcid", "destid", "payloadsize", "payload"],
            "ERROR": ["code", "message"], "REGISTERED": ["id", "privPolyId"]}


def wrong_type_cases():
    """(label, body bytes, word the ERROR message must name) for every field of every
    message type with a wrong value, every required field missing, and a wrong type."""
    cases = []
    for (kind, field), values in FIELD_VALUES.items():
        for value in values:
            message = dict(VALID[kind], **{field: value})
            word = "payloadsize" if field == "payloadsize" else field
            cases.append((f"{kind}.{field}={value!r:.30}", json.dumps(message).encode(), word))
    for kind, fields in REQUIRED.items():
        for field in fields:
            message = {k: v for k, v in VALID[kind].items() if k != field}
            cases.append((f"{kind} without {field}", json.dumps(message).encode(), field))
    cases.append(("no type", json.dumps({"srcid": "c", "payload": "x"}).encode(), "type"))
    for kind in VALID:
        for value in BAD_TYPE:
            message = dict(VALID[kind], type=value)
            cases.append((f"{kind}.type={value!r:.30}", json.dumps(message).encode(), "type"))
    return cases


@pytest.mark.parametrize("program", ["proxy", "server"])
def test_every_field_with_a_wrong_type_gets_bad_message(proxies, nodes, wires, program):
    proxy = proxies()
    server = nodes.server("wt", "wtp", proxy.port)
    target = proxy if program == "proxy" else server
    wire = wires(target.port)
    cases = wrong_type_cases()
    assert len(cases) > 200
    wrong = []
    for label, body, word in cases:
        wire.send_body(body)
        answer = wire.receive(timeout=5)
        if (answer is None or answer["type"] != protocol.MessageType.ERROR
                or answer["code"] != "BAD_MESSAGE" or word not in answer["message"]):
            wrong.append((label, answer))
    assert wrong == []
    # The same connection is still in step and usable.
    wire.send(data("c9", "wtp", "usable"))
    assert wire.receive() == {"type": 2, "srcid": "wt", "destid": "c9",
                              "payloadsize": 40, "payload": sha1("usable")}
    assert ask(proxy.port, data("c8", "wtp", "other"))["payload"] == sha1("other")
    assert_clean_log(proxy)
    assert_clean_log(server)


# --- 1. Bounded resources -----------------------------------------------------------

def test_connection_cap_answers_overloaded_once_then_serves_again(nodes, wires):
    proxy = nodes.proxy("-max-conns", 20)
    server = nodes.server("cap", "capp", proxy.port)  # its session is connection 1
    held = []
    for index in range(19):
        wire = wires(proxy.port)
        wire.send(data(f"c{index}", "capp", "in"))
        assert wire.receive()["payload"] == sha1("in")
        held.append(wire)
    extra = wires(proxy.port)
    answers, partial = read_until_eof(extra.sock)
    assert not partial
    assert [(a["type"], a["code"]) for a in answers] == [(3, "OVERLOADED")]
    assert "20 connections" in answers[0]["message"]
    proxy.wait_for(r"refusing connection from 127\.0\.0\.1:\d+: the proxy has 20 connections "
                   r"open, its maximum \(-max-conns\); try again later$")
    # The held connections were not harmed.
    held[0].send(data("c0", "capp", "again"))
    assert held[0].receive()["payload"] == sha1("again")
    # Close 5: their descriptors are released, and exactly 5 new connections are served.
    busy = proc_counts(proxy.proc.pid)[1]
    for wire in held[:5]:
        wire.close()
    wait_counts(proxy.proc.pid, lambda c: c[1] <= busy - 5)
    for index in range(5):
        wire = wires(proxy.port)
        wire.send(data(f"n{index}", "capp", "new"))
        assert wire.receive()["payload"] == sha1("new")
    answers, _ = read_until_eof(wires(proxy.port).sock)
    assert [a["code"] for a in answers] == ["OVERLOADED"]
    assert proxy.proc.poll() is None
    assert_clean_log(proxy)
    assert_clean_log(server)


def test_stalled_frame_gets_timeout_and_close(proxies, wires):
    proxy = proxies(frame_timeout=0.5)
    other = wires(proxy.port)
    other.send(data("o", "none", "before"))
    assert other.receive()["code"] == "NO_SERVER"
    stalled = wires(proxy.port)
    body = json.dumps(data("s", "none", "never finished")).encode()
    started = time.monotonic()
    stalled.send_bytes(frame(body)[:10])
    answers, partial = read_until_eof(stalled.sock, timeout=5)
    elapsed = time.monotonic() - started
    assert [(a["type"], a["code"]) for a in answers] == [(3, "TIMEOUT")]
    assert 0.45 <= elapsed <= 1.5, elapsed
    proxy.log.wait_for(r"closing connection from 127\.0\.0\.1:\d+: timed out waiting for "
                   r"the rest of a frame")
    other.send(data("o", "none", "after"))
    assert other.receive()["code"] == "NO_SERVER"
    assert_clean_log(proxy)


def test_trickled_frame_times_out_as_a_whole(proxies, wires):
    """A slow client sending one byte every 0.3 s cannot keep a frame open forever:
    the frame timeout counts from the frame's first byte."""
    proxy = proxies(frame_timeout=1)
    wire = wires(proxy.port)
    whole = frame(json.dumps(data("s", "none", "z" * 100)).encode())
    stop = threading.Event()

    def trickle():
        for byte in whole:
            if stop.is_set():
                return
            try:
                wire.sock.send(bytes([byte]))
            except OSError:
                return
            stop.wait(0.3)  # pacing the slow client; no byte lands on the deadline

    started = time.monotonic()
    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        answer = wire.receive(timeout=5)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
    assert answer["code"] == "TIMEOUT", answer
    assert 0.9 <= elapsed <= 2.0, elapsed
    assert read_until_eof(wire.sock, timeout=5) == ([], False)
    sender.join(WAIT)


def test_byte_landing_on_the_frame_deadline_still_gets_timeout(proxies):
    """Slow clients whose bytes keep coming, 1 ms apart, across the frame deadline."""
    proxy = proxies(frame_timeout=1)
    whole = frame(json.dumps(data("s", "none", "z" * 1000)).encode())
    results = []

    def slow_client():
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT) as sock:
            sock.sendall(whole[:1])
            started = time.monotonic()
            stop = threading.Event()

            def trickle():
                stop.wait(0.9)  # pacing: the dense part straddles the 1 s deadline
                for index in range(1, len(whole)):
                    if stop.is_set() or time.monotonic() - started > 1.15:
                        return
                    try:
                        sock.send(whole[index:index + 1])
                    except OSError:
                        return
                    stop.wait(0.001)

            sender = threading.Thread(target=trickle, daemon=True)
            sender.start()
            try:
                answers, _ = read_until_eof(sock, timeout=5)
            finally:
                stop.set()
            sender.join(WAIT)
            results.append([a["code"] for a in answers if isinstance(a, dict)])

    clients = [threading.Thread(target=slow_client) for _ in range(12)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(WAIT)
    assert results == [["TIMEOUT"]] * 12
    assert proxy.log.count(r"timed out waiting for the rest of a frame") == 12


def test_idle_connection_closed_silently(proxies, wires):
    proxy = proxies(idle_timeout=0.5)
    idle = wires(proxy.port)
    started = time.monotonic()
    answers, partial = read_until_eof(idle.sock, timeout=5)
    elapsed = time.monotonic() - started
    assert (answers, partial) == ([], False)
    assert 0.45 <= elapsed <= 1.5, elapsed
    # Idle after an answered frame: closed too; a connection that keeps talking is not.
    after = wires(proxy.port)
    after.send(data("a", "none", "x"))
    assert after.receive()["code"] == "NO_SERVER"
    busy = wires(proxy.port)
    for _ in range(5):
        busy.send(data("b", "none", "x"))
        assert busy.receive()["code"] == "NO_SERVER"
        time.sleep(0.2)  # pacing a client that talks every 0.2 s, under the timeout
    assert read_until_eof(after.sock, timeout=5) == ([], False)
    busy.send(data("b", "none", "still open"))
    assert busy.receive()["code"] == "NO_SERVER"
    assert_clean_log(proxy)


def test_500_slow_clients_do_not_delay_a_good_client(nodes, wires):
    proxy = nodes.proxy("-max-conns", 2000, "-frame-timeout", 60, "-quiet")
    server = nodes.server("fast", "fastp", proxy.port, "-quiet")
    pid = proxy.proc.pid
    _, base_fds = proc_counts(pid)
    slow = []
    partial = frame(json.dumps(data("slow", "fastp", "held")).encode())
    try:
        for _ in range(500):
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT)
            sock.sendall(partial[:7])
            slow.append(sock)
        wait_counts(pid, lambda c: c[1] >= base_fds + 500, timeout=20)
        latencies = []
        for index in range(5):
            started = time.monotonic()
            wire = Wire(proxy.port, timeout=5)
            wire.send(data(f"g{index}", "fastp", f"good {index}"))
            answer = wire.receive()
            latencies.append(time.monotonic() - started)
            wire.close()
            assert answer["payload"] == sha1(f"good {index}")
        assert max(latencies) < 1.0, latencies
        # A slow client that finishes its frame is served too.
        slow[0].sendall(partial[7:])
        slow[0].settimeout(5)
        answers = []
        decoder = protocol.FrameDecoder()
        while not answers:
            decoder.feed(slow[0].recv(65536))
            body = decoder.next_frame()
            if body is not None:
                answers.append(protocol.parse_message(body))
        assert answers[0]["payload"] == sha1("held")
        print(f"500 slow clients: good client latency max {max(latencies) * 1000:.1f} ms "
              f"(all {[round(x * 1000, 1) for x in latencies]} ms)")
    finally:
        for sock in slow:
            sock.close()
    assert_clean_log(proxy)
    assert_clean_log(server)


def hammer(port, count, kinds, policy):
    """Open and close ``count`` connections to ``port``, 8 at a time, each doing one
    of ``kinds``; return how many of each kind."""
    good = json.dumps(data("h", policy, "hello")).encode()

    def one(index):
        kind = kinds[index % len(kinds)]
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            if kind == "idle":
                return kind
            if kind == "data":
                sock.sendall(frame(good))
            elif kind == "ping":
                sock.sendall(frame(b'{"type":5}'))
            elif kind == "bad_json":
                sock.sendall(frame(b"{nope"))
            elif kind == "zero_length":
                sock.sendall(b"\0\0\0\0")
            elif kind == "too_large":
                sock.sendall((MAX_FRAME + 1).to_bytes(4, "big") + b"xx")
            elif kind == "partial":
                sock.sendall(frame(good)[:9])
                return kind
            decoder = protocol.FrameDecoder()
            while (body := decoder.next_frame()) is None:
                chunk = sock.recv(65536)
                assert chunk, f"closed without answering {kind}"
                decoder.feed(chunk)
            message = protocol.parse_message(body)
            expected = {"data": 2, "ping": 6}.get(kind, 3)
            assert message["type"] == expected, (kind, message)
            if kind == "data":
                assert message["payload"] == sha1("hello")
        return kind

    with ThreadPoolExecutor(8) as pool:
        done = list(pool.map(one, range(count)))
    return {kind: done.count(kind) for kind in kinds}


def check_release(pid, port, kinds, policy, label):
    base = proc_counts(pid)
    peak = list(base)
    stop = threading.Event()

    def sample():
        while not stop.wait(0.02):
            counts = proc_counts(pid)
            peak[:] = [max(peak[0], counts[0]), max(peak[1], counts[1])]

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        done = hammer(port, 2000, kinds, policy)
    finally:
        stop.set()
        sampler.join(WAIT)
    assert sum(done.values()) == 2000
    after = wait_counts(pid, lambda c: c[0] <= base[0] + 5 and c[1] <= base[1] + 5)
    print(f"{label}: threads {base[0]} -> peak {peak[0]} -> {after[0]}, fds {base[1]} -> "
          f"peak {peak[1]} -> {after[1]} "
          f"after 2000 connections {done}")
    return base, after


def test_proxy_releases_threads_and_descriptors(nodes):
    proxy = nodes.proxy("-quiet", "-pool-size", 2)
    server = nodes.server("rel", "relp", proxy.port, "-quiet")
    kinds = ["idle", "data", "bad_json", "zero_length", "too_large", "partial", "data"]
    check_release(proxy.proc.pid, proxy.port, kinds, "relp", "proxy")
    assert ask(proxy.port, data("z", "relp", "end"))["payload"] == sha1("end")
    assert_clean_log(proxy)
    assert_clean_log(server)


def test_server_releases_threads_and_descriptors(nodes):
    proxy = nodes.proxy("-quiet")
    server = nodes.server("rel", "relp", proxy.port, "-quiet")
    kinds = ["idle", "data", "ping", "bad_json", "zero_length", "too_large", "partial"]
    check_release(server.proc.pid, server.port, kinds, "relp", "server.py")
    assert ask(proxy.port, data("z", "relp", "end"))["payload"] == sha1("end")
    assert_clean_log(proxy)
    assert_clean_log(server)


# --- 3. Authenticated registration --------------------------------------------------

KEYS = {"pA": b"alpha-key-1", "pB": b"bravo-key-2", "*": b"star-key-3"}


@pytest.fixture
def keyed(tmp_path):
    """Policy key file and one key file per key, plus a wrong one."""
    keyfile = tmp_path / "policy.keys"
    keyfile.write_text("# policy keys\npA alpha-key-1\n\npB   bravo-key-2   # B's key\n"
                       "* star-key-3\n", encoding="utf-8")
    files = {"policy": keyfile}
    for name, key in [("a", KEYS["pA"]), ("b", KEYS["pB"]), ("star", KEYS["*"]),
                      ("wrong", b"not-the-key")]:
        path = tmp_path / f"{name}.key"
        path.write_bytes(b"# server key\n" + key + b"\n")
        files[name] = path
    return files


def challenge(wire, setup):
    """Send ``setup`` without proof; return the nonce of the UNAUTHORIZED answer."""
    wire.send(setup)
    answer = wire.receive()
    assert (answer["type"], answer["code"]) == (3, "UNAUTHORIZED"), answer
    assert NONCE.match(answer["nonce"]), answer
    return answer["nonce"]


def proven(setup, key, nonce):
    message = dict(setup, nonce=nonce)
    message["proof"] = protocol.setup_proof(key, nonce, message)
    return message


def served_by(port, policy, times=4):
    """The srcid of the answers to ``times`` DATA frames of ``policy`` (or the code)."""
    wire = Wire(port)
    try:
        result = []
        for index in range(times):
            wire.send(data(f"q{index}", policy, f"d{index}"))
            answer = wire.receive()
            if answer["type"] == protocol.MessageType.ACK:
                assert answer["payload"] == sha1(f"d{index}")
                result.append(answer["srcid"])
            else:
                result.append(answer["code"])
        return result
    finally:
        wire.close()


def test_startup_says_registration_is_open_without_keys(nodes, keyed):
    proxy = nodes.proxy()
    proxy.wait_for(rf"^Registration is open: any server that reaches port {proxy.port} "
                   r"may serve any policy")
    keyed_proxy = nodes.proxy("-policy-keys", keyed["policy"])
    keyed_proxy.wait_for(r"^Registration needs a key proof for policies: \*, pA, pB$")
    assert keyed_proxy.count(r"Registration is open") == 0


def test_right_key_registers_and_is_served(proxies, nodes, keyed, tmp_path):
    proxy = proxies(policy_keys=gate.load_policy_keys(keyed["policy"]))
    nodes.server("sA", "pA", proxy.port, "-key-file", keyed["a"])
    proxy.log.wait_for(r"setup message from server id sA privacy policy pA")
    # The challenge is the first step of every keyed registration, not a refusal.
    assert proxy.log.count(r"^registration challenge sent to 127\.0\.0\.1:\d+ \(server id "
                           r"sA, privacy policy pA\)$") == 1
    assert proxy.log.count("unauthorized") == 0
    assert proxy.stats()["totals"]["registrations"] == {"registered": 1, "refused": 0}
    assert served_by(proxy.port, "pA") == ["sA"] * 4
    pkt = write_packets(tmp_path, "a.json", [data("1", "pA", "xyz1")])
    done = run("client.py", "-id", "1", "-revproc", proxy.port, "-pkt", pkt)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Receiving a response from the server sA" in done.stdout
    assert_clean_log(proxy)


def test_no_key_is_unauthorized_logged_and_not_in_rotation(proxies, nodes, keyed, wires, closed_port):
    proxy = proxies(policy_keys=gate.load_policy_keys(keyed["policy"]))
    refused = nodes.server("nokey", "pA", proxy.port, wait=False)
    assert refused.wait() == 1
    refused.wait_for(r"^server\.py: the reverse proxy refused registration: UNAUTHORIZED: "
                     r"registration for privacy policy pA needs a proof.*\(the proxy "
                     r"requires a key: give -key-file\)$")
    # A legacy SETUP by hand: the challenge, logged with the peer's address.
    wire = wires(proxy.port)
    nonce = challenge(wire, protocol.setup("legacy", "pA", closed_port))
    peer = f"127.0.0.1:{wire.sock.getsockname()[1]}"
    proxy.log.wait_for(rf"registration challenge sent to {re.escape(peer)} \(server id "
                       r"legacy, privacy policy pA\)")
    wire.send(protocol.setup("legacy", "pA", closed_port))  # again without proof
    second = wire.receive()
    assert second["code"] == "UNAUTHORIZED" and NONCE.match(second["nonce"])
    assert second["nonce"] != nonce
    assert served_by(proxy.port, "pA", 2) == ["NO_SERVER"] * 2
    assert proxy.log.count(r"setup message from server id") == 0


def test_wrong_key_is_unauthorized_and_not_in_rotation(proxies, nodes, keyed, wires, fake_servers):
    proxy = proxies(policy_keys=gate.load_policy_keys(keyed["policy"]))
    good = nodes.server("sA", "pA", proxy.port, "-key-file", keyed["a"])
    bad = nodes.server("evil", "pA", proxy.port, "-key-file", keyed["wrong"], wait=False)
    assert bad.wait() == 1
    bad.wait_for(r"refused registration: UNAUTHORIZED: wrong proof for privacy policy pA "
                 r"\(server id evil\)")
    proxy.log.wait_for(r"unauthorized: wrong proof for privacy policy pA \(server id evil\) "
                   r"\(from 127\.0\.0\.1:\d+\)")
    fake = fake_servers("evil2")
    wire = wires(proxy.port)
    setup = protocol.setup("evil2", "pA", fake.port)
    nonce = challenge(wire, setup)
    wire.send(proven(setup, b"not-the-key", nonce))
    answer = wire.receive()
    assert answer["code"] == "UNAUTHORIZED" and NONCE.match(answer["nonce"])
    peer = f"127.0.0.1:{wire.sock.getsockname()[1]}"
    proxy.log.wait_for(rf"unauthorized: wrong proof .*\(from {re.escape(peer)}\)")
    assert served_by(proxy.port, "pA") == ["sA"] * 4
    assert fake.received == []
    assert "Received a message" not in bad.output
    assert_clean_log(proxy)
    assert_clean_log(good)


def test_replayed_proof_is_unauthorized(proxies, keyed, wires, fake_servers):
    proxy = proxies(policy_keys=gate.load_policy_keys(keyed["policy"]))
    fake = fake_servers("rec")
    recorder = wires(proxy.port)
    setup = protocol.setup("rec", "pA", fake.port, heartbeat=30)
    nonce = challenge(recorder, setup)
    recorded = proven(setup, KEYS["pA"], nonce)
    recorder.send(recorded)
    assert recorder.receive() == {"type": 4, "id": "rec", "privPolyId": "pA"}
    assert served_by(proxy.port, "pA", 1) == ["rec"]
    # The same proof again on the same connection: the nonce was used.
    recorder.send(recorded)
    again = recorder.receive()
    assert again["code"] == "UNAUTHORIZED" and NONCE.match(again["nonce"])
    recorder.close()  # the server leaves
    proxy.log.wait_for(r"server id rec of privacy policy pA left")
    assert served_by(proxy.port, "pA", 1) == ["NO_SERVER"]
    # Replayed verbatim on a new connection, as its first frame...
    replay = wires(proxy.port)
    replay.send(recorded)
    answer = replay.receive()
    assert answer["code"] == "UNAUTHORIZED" and answer["nonce"] != nonce
    peer = f"127.0.0.1:{replay.sock.getsockname()[1]}"
    proxy.log.wait_for(r"unauthorized: the SETUP's nonce was not issued on this connection"
                   rf".*\(from {re.escape(peer)}\)")
    # ...and after taking a fresh challenge: old nonce, or new nonce with the old proof.
    replay2 = wires(proxy.port)
    fresh = challenge(replay2, setup)
    replay2.send(recorded)
    assert replay2.receive()["code"] == "UNAUTHORIZED"
    replay3 = wires(proxy.port)
    fresh = challenge(replay3, setup)
    replay3.send(dict(recorded, nonce=fresh))
    assert replay3.receive()["code"] == "UNAUTHORIZED"
    assert served_by(proxy.port, "pA", 2) == ["NO_SERVER"] * 2
    assert proxy.log.count(r"setup message from server id rec") == 1
    assert_clean_log(proxy)


def test_key_of_another_policy_is_unauthorized(proxies, nodes, keyed, wires, fake_servers):
    proxy = proxies(policy_keys=gate.load_policy_keys(keyed["policy"]))
    b_server = nodes.server("s7", "pB", proxy.port, "-key-file", keyed["b"])
    # B's key cannot register for A.
    cross = nodes.server("s8", "pA", proxy.port, "-key-file", keyed["b"], wait=False)
    assert cross.wait() == 1
    cross.wait_for(r"UNAUTHORIZED: wrong proof for privacy policy pA")
    # A's valid proof cannot move B's live server s7 to A.
    fake = fake_servers("s7")
    wire = wires(proxy.port)
    setup = protocol.setup("s7", "pA", fake.port)
    wire.send(proven(setup, KEYS["pA"], challenge(wire, setup)))
    answer = wire.receive()
    assert answer["code"] == "UNAUTHORIZED", answer
    assert "server id s7 is registered for privacy policy pB" in answer["message"]
    peer = f"127.0.0.1:{wire.sock.getsockname()[1]}"
    proxy.log.wait_for(rf"unauthorized: server id s7 is registered .*\(from {re.escape(peer)}\)")
    assert served_by(proxy.port, "pB") == ["s7"] * 4
    assert served_by(proxy.port, "pA", 2) == ["NO_SERVER"] * 2
    assert fake.received == []
    assert_clean_log(proxy)
    assert_clean_log(b_server)


def test_every_unauthorized_answer_carries_a_fresh_nonce(proxies, nodes, keyed, wires, fake_servers):
    """Also the refusal of an id live in another policy (PROTOCOL.md section 9)."""
    proxy = proxies(policy_keys=gate.load_policy_keys(keyed["policy"]))
    nodes.server("s7", "pB", proxy.port, "-key-file", keyed["b"])
    fake = fake_servers("s7")
    wire = wires(proxy.port)
    setup = protocol.setup("s7", "pA", fake.port)
    wire.send(proven(setup, KEYS["pA"], challenge(wire, setup)))
    answer = wire.receive()
    assert answer["code"] == "UNAUTHORIZED"
    assert NONCE.match(answer.get("nonce", "")), answer


def test_star_key_covers_unnamed_policies_only(proxies, nodes, keyed):
    proxy = proxies(policy_keys=gate.load_policy_keys(keyed["policy"]))
    star = nodes.server("sC", "pC", proxy.port, "-key-file", keyed["star"])
    # The star key is not the key of a named policy.
    named = nodes.server("sX", "pA", proxy.port, "-key-file", keyed["star"], wait=False)
    assert named.wait() == 1
    other = nodes.server("sY", "pC", proxy.port, "-key-file", keyed["a"], wait=False)
    assert other.wait() == 1
    assert served_by(proxy.port, "pC") == ["sC"] * 4
    assert served_by(proxy.port, "pA", 1) == ["NO_SERVER"]
    assert_clean_log(proxy)
    assert_clean_log(star)


def test_a_policy_given_two_keys_makes_the_key_file_invalid(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("pA alpha\n# a comment\n* star\npA other\n", encoding="utf-8")
    with pytest.raises(ValueError) as refused:
        gate.load_policy_keys(str(keys))
    assert str(refused.value) == f"{keys} line 4: policy 'pA' already has a key on line 1"


def test_a_byte_order_mark_is_not_part_of_the_first_policy(tmp_path):
    # Windows editors start a UTF-8 file with U+FEFF: policy 111 must keep its key.
    keys = tmp_path / "keys"
    keys.write_bytes(b"\xef\xbb\xbf111 secret\n222 other\n")
    assert gate.load_policy_keys(str(keys)) == {"111": b"secret", "222": b"other"}
    key = tmp_path / "key"
    key.write_bytes(b"\xef\xbb\xbfsecret\n")
    assert gate.key_file_lines(str(key), "key file") == [(1, "secret")]


def test_key_file_lines_are_numbered_as_an_editor_numbers_them(tmp_path):
    # A form feed is white space within a line, not a line break (str.splitlines).
    keys = tmp_path / "keys"
    keys.write_text("111 a\x0c222 b\r\n333 c\n", encoding="utf-8")
    with pytest.raises(ValueError) as refused:
        gate.load_policy_keys(str(keys))
    assert str(refused.value) == f"{keys} line 1: expected 'POLICY KEY', got 4 fields"


def test_a_key_file_larger_than_a_key_file_is_refused_without_reading_it_whole():
    with pytest.raises(ValueError) as refused:
        gate.load_policy_keys("/dev/zero")
    assert str(refused.value) == ("cannot read policy key file '/dev/zero': it is larger "
                                  "than 1,048,576 characters (not a key file?)")


def test_a_policy_key_file_with_a_duplicate_is_a_usage_error_at_start(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("* one\n* two\n", encoding="utf-8")
    done = run("reverse_proxy.py", "-port", 0, "-policy-keys", keys)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        f"reverse_proxy.py: error: {keys} line 2: policy '*' already has a key on line 1")


def test_policy_without_key_accepts_no_server(proxies, nodes, tmp_path, wires, closed_port):
    keyfile = tmp_path / "only-a.keys"
    keyfile.write_text("pA alpha-key-1\n", encoding="utf-8")
    proxy = nodes.proxy("-policy-keys", keyfile)
    wire = wires(proxy.port)
    setup = protocol.setup("z", "pZ", closed_port)
    wire.send(setup)
    answer = wire.receive()
    assert answer["code"] == "UNAUTHORIZED"
    assert "no server may register for privacy policy pZ: it has no key" in answer["message"]
    # No proof can cure it: no nonce invites one.
    assert "nonce" not in answer
    wire.send(dict(setup, nonce="0" * 32, proof="0" * 64))
    assert wire.receive()["code"] == "UNAUTHORIZED"
    assert served_by(proxy.port, "pZ", 1) == ["NO_SERVER"]
    # The log lines come through the proxy's log writer: wait for them, then count.
    refused = r"^unauthorized: no server may register for privacy policy pZ"
    wait_until(lambda: proxy.count(refused) >= 2, "two refusals logged")
    assert proxy.count(refused) == 2


def test_a_server_with_a_key_is_refused_once_by_a_policy_without_one(nodes, tmp_path, keyed):
    keyfile = tmp_path / "only-a.keys"
    keyfile.write_text("pA alpha-key-1\n", encoding="utf-8")
    proxy = nodes.proxy("-policy-keys", keyfile)
    server = nodes.server("sZ", "pZ", proxy.port, "-key-file", keyed["b"], wait=False)
    assert server.wait() == 1
    assert server.output.splitlines()[-1] == (
        "server.py: the reverse proxy refused registration: "
        "UNAUTHORIZED: no server may register for privacy policy pZ: it has no key")
    proxy.wait_for(r"^unauthorized: no server may register for privacy policy pZ")
    assert proxy.count(r"^unauthorized: ") == 1


def test_a_challenge_left_unanswered_is_a_refusal(proxies, nodes, keyed, log_watch):
    proxy = proxies(policy_keys=gate.load_policy_keys(keyed["policy"]))
    server = nodes.server("sK", "pA", proxy.port, wait=False)  # no -key-file
    assert server.wait() == 1
    assert server.output.splitlines()[-1].endswith(" (the proxy requires a key: give -key-file)")
    log_watch.wait_for(r"^unauthorized: server id sK \(privacy policy pA\) did not answer the "
                       r"registration challenge before its connection closed; does it have "
                       r"the policy's key \(server.py -key-file\)\? \(from 127\.0\.0\.1:\d+\)$")
    assert proxy.stats()["totals"]["registrations"] == {"registered": 0, "refused": 1}


def test_three_refused_setups_close_the_connection(proxies, nodes, keyed, wires, closed_port):
    proxy = proxies(policy_keys=gate.load_policy_keys(keyed["policy"]))
    wire = wires(proxy.port)
    setup = protocol.setup("t", "pA", closed_port)
    nonce = challenge(wire, setup)                      # refusal 1: the challenge
    wire.send(proven(setup, b"wrong", nonce))           # refusal 2
    nonce = wire.receive()["nonce"]
    wire.send(proven(setup, b"wrong", nonce))           # refusal 3
    answers, partial = read_until_eof(wire.sock)
    assert [a["code"] for a in answers] == ["UNAUTHORIZED"]
    assert not partial
    assert served_by(proxy.port, "pA", 1) == ["NO_SERVER"]


# --- 4. TLS -------------------------------------------------------------------------

def tls_proxy(nodes, pki, mutual=True):
    options = ["-tls-cert", pki["leaf.pem"], "-tls-key", pki["leaf.key"]]
    if mutual:
        options += ["-tls-ca", pki["ca.pem"]]
    return nodes.proxy(*options)


def tls_server(nodes, pki, server_id, policy, port, **kwargs):
    return nodes.server(server_id, policy, port, "-tls-cert", pki["leaf.pem"],
                        "-tls-key", pki["leaf.key"], "-tls-ca", pki["ca.pem"], **kwargs)


def one_line_failure(done, program="client.py"):
    """Exit 1, exactly one line on stderr, naming the program, no traceback."""
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{program}: "), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    return lines[0]


def test_tls_client_with_right_ca_is_served(nodes, pki, tmp_path):
    proxy = tls_proxy(nodes, pki)
    server = tls_server(nodes, pki, "t1", "tp", proxy.port)
    # One packet here; pipelined packets over TLS: the test below.
    pkt = write_packets(tmp_path, "t.json", [data("5", "tp", "xyz1")])
    done = run("client.py", "-id", "5", "-revproc", proxy.port, "-pkt", pkt,
               "-tls-ca", pki["ca.pem"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-2:] == [
        f"Receiving a response from the server t1 payload: {sha1('xyz1')}",
        "Hash of payload is correct"]
    # Checked by hand, from one thread: the proxy's certificate, and exact ACKs for
    # three pipelined frames.
    context = ssl.create_default_context(cafile=pki["ca.pem"])
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        sock.sendall(b"".join(protocol.encode_frame(data("6", "tp", f"over tls {n}"))
                              for n in range(3)))
        sock.settimeout(WAIT)
        decoder = protocol.FrameDecoder()
        answers = []
        while len(answers) < 3:
            while (body := decoder.next_frame()) is not None:
                answers.append(protocol.parse_message(body))
            if len(answers) < 3:
                decoder.feed(sock.recv(65536))
        assert answers == [{"type": 2, "srcid": "t1", "destid": "6", "payloadsize": 40,
                            "payload": sha1(f"over tls {n}")} for n in range(3)]
    # The server's data port speaks TLS only: a plain frame gets no answer.
    plain = Wire(server.port)
    plain.send(data("6", "tp", "plain"))
    assert read_until_eof(plain.sock)[0] == []
    plain.close()
    assert_clean_log(proxy)


def test_tls_client_pipelined_packets_all_answered(nodes, pki, tmp_path):
    """client.py -tls-ca with 50 pipelined packets, 15 runs: every run gets all 50
    answers (about 4 in 10 runs lost some when the client read and wrote one TLS
    socket from two threads: 15 runs catch that with odds of 1 in 2,000)."""
    proxy = tls_proxy(nodes, pki)
    tls_server(nodes, pki, "t1", "tp", proxy.port)
    pkt = write_packets(tmp_path, "t.json",
                        [data("5", "tp", f"{n}" + "x" * 2000) for n in range(50)])
    for attempt in range(15):
        done = run("client.py", "-id", "5", "-revproc", proxy.port, "-pkt", pkt,
                   "-tls-ca", pki["ca.pem"], "-timeout", 3)
        assert done.returncode == 0, (attempt, done.stderr)
        assert "50 of 50 packets answered with a correct hash" in done.stdout


def test_tls_client_against_plain_proxy_fails_in_one_line(nodes, pki, tmp_path):
    proxy = nodes.proxy()
    pkt = write_packets(tmp_path, "t.json", [data("5", "tp", "xyz1")])
    done = run("client.py", "-id", "5", "-revproc", proxy.port, "-pkt", pkt,
               "-tls-ca", pki["ca.pem"])
    line = one_line_failure(done)
    assert "TLS" in line, line
    print(f"TLS client, plain proxy: {line}")
    assert ask(proxy.port, data("5", "tp", "plain"))["code"] == "NO_SERVER"
    assert proxy.proc.poll() is None
    assert_clean_log(proxy)


def test_plain_client_against_tls_proxy_fails_in_one_line(nodes, pki, tmp_path):
    proxy = tls_proxy(nodes, pki)
    tls_server(nodes, pki, "t1", "tp", proxy.port)
    pkt = write_packets(tmp_path, "t.json", [data("5", "tp", "xyz1")])
    done = run("client.py", "-id", "5", "-revproc", proxy.port, "-pkt", pkt)
    print(f"plain client, TLS proxy: {one_line_failure(done)}")
    proxy.wait_for(r"connection from 127\.0\.0\.1:\d+ failed before its first frame: "
                   r"TLS error")
    done = run("client.py", "-id", "5", "-revproc", proxy.port, "-pkt", pkt,
               "-tls-ca", pki["ca.pem"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert_clean_log(proxy)


def test_plain_client_against_tls_proxy_says_what_failed(nodes, pki, tmp_path):
    proxy = tls_proxy(nodes, pki, mutual=False)
    pkt = write_packets(tmp_path, "t.json", [data("5", "tp", "xyz1")])
    line = one_line_failure(run("client.py", "-id", "5", "-revproc", proxy.port, "-pkt", pkt))
    assert f"reverse proxy at 127.0.0.1:{proxy.port}" in line, line


def test_client_with_another_ca_is_refused(nodes, pki, tmp_path):
    proxy = tls_proxy(nodes, pki)
    pkt = write_packets(tmp_path, "t.json", [data("5", "tp", "xyz1")])
    done = run("client.py", "-id", "5", "-revproc", proxy.port, "-pkt", pkt,
               "-tls-ca", pki["rogue.pem"])
    line = one_line_failure(done)
    assert "CERTIFICATE_VERIFY_FAILED" in line, line
    print(f"client, rogue CA: {line}")
    assert_clean_log(proxy)


def test_mutual_tls_registration_needs_a_client_certificate(nodes, pki, tmp_path):
    proxy = tls_proxy(nodes, pki)
    no_cert = nodes.server("nc", "mp", proxy.port, "-tls-ca", pki["ca.pem"], wait=False)
    assert no_cert.wait() == 1
    no_cert.wait_for(r"^server\.py: the reverse proxy refused registration: UNAUTHORIZED: "
                     r"registration needs a TLS client certificate")
    proxy.wait_for(r"unauthorized: registration needs a TLS client certificate.*"
                   r"\(from 127\.0\.0\.1:\d+\)")
    # A certificate from another authority fails the handshake: never registered.
    rogue = nodes.server("rg", "mp", proxy.port, "-tls-cert", pki["rogueleaf.pem"],
                         "-tls-key", pki["rogueleaf.key"], "-tls-ca", pki["ca.pem"],
                         wait=False)
    rogue.wait_for(r"(Lost the session|Cannot reach the reverse proxy).*TLS error")
    rogue.kill()
    pkt = write_packets(tmp_path, "m.json", [data("5", "mp", "mutual")])
    refused = run("client.py", "-id", "5", "-revproc", proxy.port, "-pkt", pkt,
                  "-tls-ca", pki["ca.pem"])
    assert refused.returncode == 1
    assert "NO_SERVER" in refused.stdout
    good = tls_server(nodes, pki, "mc", "mp", proxy.port)
    proxy.wait_for(r"setup message from server id mc privacy policy mp")
    assert proxy.count(r"setup message from server id (nc|rg)") == 0
    done = run("client.py", "-id", "5", "-revproc", proxy.port, "-pkt", pkt,
               "-tls-ca", pki["ca.pem"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Receiving a response from the server mc" in done.stdout
    assert_clean_log(proxy)
    assert_clean_log(good)


# --- Key reload on SIGHUP ------------------------------------------------------------

def test_sighup_reloads_the_policy_keys_keeping_registrations_and_connections(
        nodes, tmp_path, fake_servers):
    keys = tmp_path / "policy.keys"
    keys.write_text("pA alpha-1\npB bravo-1\n", encoding="utf-8")
    proxy = nodes.proxy("-policy-keys", keys)
    a = fake_servers("a1")
    session = Wire(proxy.port)
    setup = protocol.setup("a1", "pA", a.port, heartbeat=30)
    session.send(proven(setup, b"alpha-1", challenge(session, setup)))
    assert session.receive()["type"] == protocol.MessageType.REGISTERED
    client = Wire(proxy.port)
    client.send(data("c", "pA", "before"))
    assert client.receive()["payload"] == sha1("before")

    # pA's key changes, pB goes, pC comes.
    keys.write_text("pA alpha-2\npC charlie-1\n", encoding="utf-8")
    mark = len(proxy.lines)
    proxy.signal(signal.SIGHUP)
    proxy.wait_for(r"^Policy keys reloaded from .*: added pC; removed pB; changed pA$",
                   start=mark)
    # Registered servers stay, open connections stay.
    client.send(data("c", "pA", "after"))
    assert client.receive()["payload"] == sha1("after")
    session.send({"type": 5})
    assert session.receive() == {"type": 6}
    # New registrations are checked against the new keys.
    for key, policy, expected in ((b"alpha-1", "pA", "UNAUTHORIZED"),
                                  (b"alpha-2", "pA", "REGISTERED"),
                                  (b"charlie-1", "pC", "REGISTERED")):
        wire = Wire(proxy.port)
        setup = protocol.setup(f"n-{policy}-{key.decode()}", policy, a.port)
        nonce = challenge(wire, setup)
        wire.send(proven(setup, key, nonce))
        answer = wire.receive()
        assert answer.get("code", answer["type"].name) == expected, (policy, key, answer)
        wire.close()
    # pB has no key any more: refused at once, with no nonce to prove anything with.
    wire = Wire(proxy.port)
    wire.send(protocol.setup("n-pB", "pB", a.port))
    answer = wire.receive()
    assert (answer["code"], "nonce" in answer) == ("UNAUTHORIZED", False), answer
    assert answer["message"] == "no server may register for privacy policy pB: it has no key"
    wire.close()

    # A file that cannot be read or parsed keeps the keys in force, and says why.
    keys.write_text("pA alpha-2 extra-field\n", encoding="utf-8")
    mark = len(proxy.lines)
    proxy.signal(signal.SIGHUP)
    proxy.wait_for(r"keeping the policy keys in force: .* line 1: expected 'POLICY KEY', "
                   r"got 3 fields", start=mark)
    wire = Wire(proxy.port)
    setup = protocol.setup("late", "pC", a.port)
    wire.send(proven(setup, b"charlie-1", challenge(wire, setup)))
    assert wire.receive()["type"] == protocol.MessageType.REGISTERED
    for open_wire in (wire, client, session):
        open_wire.close()
    assert_clean_log(proxy)


def test_sighup_with_a_key_file_that_blocks_leaves_sigterm_working(nodes, tmp_path):
    # A FIFO (or a hung network file) in place of the key file: its open blocks for
    # good. The reload must not take the signals with it.
    keys = tmp_path / "policy.keys"
    keys.write_text("pA alpha-1\n", encoding="utf-8")
    proxy = nodes.proxy("-policy-keys", keys)
    keys.unlink()
    os.mkfifo(keys)
    ignored = r"^SIGHUP ignored: the reading of .*policy\.keys for the last one has not " \
              r"finished \(the file does not answer\)$"
    deadline = time.monotonic() + WAIT
    while not proxy.count(ignored):  # signals sent together may arrive as one
        assert time.monotonic() < deadline, proxy.output
        proxy.signal(signal.SIGHUP)
        time.sleep(0.1)
    started = time.monotonic()
    proxy.signal(signal.SIGTERM)
    assert proxy.wait() == 0
    assert time.monotonic() - started < 5
    assert_clean_log(proxy)
