"""Black-box tests of the three command lines (PROTOCOL.md section 5).

Usage errors exit 2 with a usage message on stderr; ``--help`` exits 0; the client
exits 1 for a failure at run time (unreachable proxy, ERROR answer, wrong hash, no
answer within -timeout) and 2 for a packet file it cannot use, naming the file. No
output ever holds a Python traceback. Processes run on 127.0.0.1, port 0.
"""

import json
import os
import re
import socket
import time

import pytest

import protocol
from conftest import PROGRAMS, ROOT, assert_no_traceback, free_port, run, sha1, write_packets

pytestmark = pytest.mark.usefixtures("no_traceback_in_nodes")


def add_fake(fake_servers, proxy, server_id, policy, behaviour=None):
    fake = fake_servers(server_id, behaviour)
    fake.register(proxy.port, policy).close()
    return fake


# --- Usage errors: exit 2, usage on stderr ---------------------------------------------

USAGE_ERRORS = {
    "proxy -port abc": (["reverse_proxy.py", "-port", "abc"], "abc"),
    "proxy -port 70000": (["reverse_proxy.py", "-port", "70000"], "70000"),
    "proxy -port -1": (["reverse_proxy.py", "-port", "-1"], "-1"),
    "proxy -port without value": (["reverse_proxy.py", "-port"], "-port"),
    "proxy unknown option": (["reverse_proxy.py", "-port", "0", "-bogus"], "-bogus"),
    "proxy positional": (["reverse_proxy.py", "2100"], "2100"),
    "server no -id": (["server.py", "-pp", "111", "-listen", "0", "-revproc", "1"], "-id"),
    "server no -pp": (["server.py", "-id", "1", "-listen", "0", "-revproc", "1"], "-pp"),
    "server -listen abc": (["server.py", "-id", "1", "-pp", "111", "-listen", "abc"], "abc"),
    "server -listen 70000": (["server.py", "-id", "1", "-pp", "111", "-listen", "70000"],
                             "70000"),
    "server -revproc host:abc": (["server.py", "-id", "1", "-pp", "111", "-revproc",
                                  "localhost:abc"], "abc"),
    "server -revproc 70000": (["server.py", "-id", "1", "-pp", "111", "-revproc", "70000"],
                              "70000"),
    "server unknown option": (["server.py", "-id", "1", "-pp", "111", "-bogus"], "-bogus"),
    "client no -id": (["client.py", "-revproc", "1", "-pkt", "pktfiles/1.json"], "-id"),
    "client no -pkt": (["client.py", "-id", "1", "-revproc", "1"], "-pkt"),
    "client -revproc host:abc": (["client.py", "-id", "1", "-revproc", "localhost:abc",
                                  "-pkt", "pktfiles/1.json"], "abc"),
    "client -revproc abc": (["client.py", "-id", "1", "-revproc", "abc",
                             "-pkt", "pktfiles/1.json"], "abc"),
    "client -revproc 70000": (["client.py", "-id", "1", "-revproc", "70000",
                               "-pkt", "pktfiles/1.json"], "70000"),
    "client -timeout abc": (["client.py", "-id", "1", "-revproc", "1", "-pkt",
                             "pktfiles/1.json", "-timeout", "abc"], "abc"),
    "client unknown option": (["client.py", "-id", "1", "-revproc", "1", "-pkt",
                               "pktfiles/1.json", "-bogus"], "-bogus"),
}


@pytest.mark.parametrize("args, named", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_usage_error_exits_2_with_usage_on_stderr(args, named):
    result = run(*args)
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"usage: {args[0]} "), result.stderr
    assert named in result.stderr.splitlines()[-1], result.stderr
    assert result.stdout == ""
    assert_no_traceback(result)


HELP_OPTIONS = {
    "reverse_proxy.py": ["-port", "-host", "-max-frame", "-upstream-timeout", "-quiet"],
    "server.py": ["-id", "-pp", "-listen", "-revproc", "-host", "-max-frame"],
    "client.py": ["-id", "-revproc", "-pkt", "-timeout", "-max-frame"],
}


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_exits_0_and_lists_every_option(program):
    result = run(program, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: {program} ")
    listed = set(re.findall(r"^\s+(-[\w-]+)", result.stdout, re.M))
    in_usage = set(re.findall(r"\[?(-[\w-]+)", result.stdout.split("\n\n")[0]))
    assert set(HELP_OPTIONS[program]) <= listed
    assert in_usage - {"-h"} <= listed, in_usage - listed
    assert_no_traceback(result)


@pytest.mark.parametrize("program", ["server.py", "client.py"])
def test_help_shows_defaults_once_and_without_python_reprs(program):
    result = run(program, "--help")
    text = " ".join(result.stdout.split())
    revproc = text[text.index("-revproc RPPORT the"):]
    revproc = revproc[:revproc.index(" -", 1)]
    assert revproc.count("(default:") == 1, revproc
    assert "('" not in result.stdout


# --- Run-time failures of the client: exit 1 -------------------------------------------

def test_client_exits_1_when_the_proxy_cannot_be_reached():
    port = free_port()
    result = run("client.py", "-id", "1", "-revproc", port, "-pkt", "pktfiles/1.json")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(port) in lines[0]
    assert_no_traceback(result)


def test_client_exits_1_on_an_error_answer(nodes):
    proxy = nodes.proxy()
    result = run("client.py", "-id", "1", "-revproc", proxy.port, "-pkt", "pktfiles/1.json")
    assert result.returncode == 1
    assert re.search(r"NO_SERVER.*111", result.stdout), result.stdout
    assert "Hash of payload is correct" not in result.stdout
    assert_no_traceback(result)


def test_client_exits_1_on_a_wrong_hash(nodes, fake_servers):
    proxy = nodes.proxy()
    add_fake(fake_servers, proxy, "666", "111",
             lambda message, count: protocol.ack("666", message["srcid"], "0" * 40))
    result = run("client.py", "-id", "1", "-revproc", proxy.port, "-pkt", "pktfiles/1.json")
    assert result.returncode == 1
    assert f"Receiving a response from the server 666 payload: {'0' * 40}" in result.stdout
    assert "Hash of payload is correct" not in result.stdout
    assert_no_traceback(result)


def test_client_timeout_when_the_server_never_answers(nodes, fake_servers):
    proxy = nodes.proxy("-upstream-timeout", 5)
    fake = add_fake(fake_servers, proxy, "900", "111", lambda message, count: None)
    started = time.monotonic()
    result = run("client.py", "-id", "1", "-revproc", proxy.port, "-pkt", "pktfiles/1.json",
                 "-timeout", 1)
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert elapsed < 3.0
    assert "no answer" in result.stderr
    assert fake.count == 1
    assert_no_traceback(result)


# --- Packet files: exit 2 naming the file ------------------------------------------------

BAD_FILES = {
    "missing": None,
    "empty": "",
    "malformed JSON": '{"type": "0", "srcid": "1",',
    "no payload": '{"type": "0", "srcid": "1", "privPoliId": "111"}',
    "payload not a string": '{"type": "0", "srcid": "1", "privPoliId": "111", "payload": 5}',
    "SETUP packet": '{"type": "1", "id": "1", "privPolyId": "111", "listenport": 2105}',
    "ACK packet": ('{"type": 2, "srcid": "1", "destid": "2", "payloadsize": 40, '
                   '"payload": "' + "0" * 40 + '"}'),
    "array with a bad packet": ('[{"type": "0", "srcid": "1", "privPoliId": "111", '
                                '"payload": "a"}, {"type": "0", "srcid": "1"}]'),
    "not an object": "42",
}


@pytest.mark.parametrize("content", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_client_exits_2_for_an_unusable_packet_file(tmp_path, content):
    path = tmp_path / "packets.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    result = run("client.py", "-id", "1", "-revproc", free_port(), "-pkt", path)
    assert result.returncode == 2, result
    assert str(path) in result.stderr
    assert result.stderr.startswith("usage: client.py ")
    assert_no_traceback(result)


PACKET = {"type": "0", "srcid": "zz", "privPoliId": "111", "payload": "p0"}
FORMATS = {
    "one object": (json.dumps(PACKET), ["p0"]),
    "JSON array": (json.dumps([{**PACKET, "payload": f"p{i}"} for i in range(3)]),
                   ["p0", "p1", "p2"]),
    "JSON lines": ("\n".join(json.dumps({**PACKET, "payload": f"p{i}"}) for i in range(3))
                   + "\n", ["p0", "p1", "p2"]),
}


@pytest.mark.parametrize("content, payloads", FORMATS.values(), ids=FORMATS.keys())
def test_client_packet_file_formats_all_answered_with_srcid_from_id(
        nodes, fake_servers, tmp_path, content, payloads):
    proxy = nodes.proxy()
    fake = add_fake(fake_servers, proxy, "900", "111")
    path = tmp_path / "packets.json"
    path.write_text(content, encoding="utf-8")
    result = run("client.py", "-id", "c42", "-revproc", f"127.0.0.1:{proxy.port}",
                 "-pkt", path)
    assert result.returncode == 0, result
    assert [(m["srcid"], m["payload"]) for m in fake.received] == [
        ("c42", p) for p in payloads]
    assert [line for line in result.stdout.splitlines()
            if line.startswith("Receiving a response")] == [
        f"Receiving a response from the server 900 payload: {sha1(p)}" for p in payloads]
    assert result.stdout.count("Hash of payload is correct") == len(payloads)
    assert_no_traceback(result)


def test_client_sends_non_ascii_payloads(nodes, tmp_path):
    proxy = nodes.proxy()
    nodes.server("100", "111", proxy.port)
    payload = "héllo wörld ✓ 中文"
    path = write_packets(tmp_path, "utf8.json", [{**PACKET, "payload": payload}])
    result = run("client.py", "-id", "1", "-revproc", proxy.port, "-pkt", path)
    assert result.returncode == 0, result
    assert f"Receiving a response from the server 100 payload: {sha1(payload)}" in result.stdout
    assert_no_traceback(result)


# --- The assignment's files and demo -------------------------------------------------------

@pytest.mark.parametrize("number", range(1, 7))
def test_assignment_packet_files(number):
    with open(os.path.join(ROOT, "pktfiles", f"{number}.json"), encoding="utf-8") as file:
        packet = json.load(file)
    assert packet == {"type": "0", "srcid": str(number),
                      "privPoliId": "111" if number in (1, 2, 4) else "222",
                      "payload": f"xyz{number}"}


def test_assignment_demo_with_its_terminal_output(nodes):
    proxy = nodes.proxy()
    assert proxy.lines[0] == f"Running the reverse proxy on port {proxy.port}"
    servers = {}
    for server_id, policy in (("100", "111"), ("200", "222"), ("300", "111"),
                              ("400", "222")):
        revproc = {"100": proxy.port, "200": f"127.0.0.1:{proxy.port}",
                   "300": f"localhost:{proxy.port}", "400": proxy.port}[server_id]
        server = servers[server_id] = nodes.server(server_id, policy, revproc)
        for line in (f"Server running with id {server_id}",
                     f"Server serving privacy policy {policy}",
                     f"Listening on port {server.port}",
                     f"Connecting to the reverse proxy on port {proxy.port}"):
            assert line in server.lines, server.output
        proxy.wait_for(rf"^Received setup message from server id {server_id} privacy "
                       rf"policy {policy} port {server.port}\b")
    expected = {1: "100", 2: "300", 3: "200", 4: "100", 5: "400", 6: "200"}
    for number, server_id in expected.items():
        policy = "111" if number in (1, 2, 4) else "222"
        payload, digest = f"xyz{number}", sha1(f"xyz{number}")
        result = run("client.py", "-id", number, "-revproc", proxy.port,
                     "-pkt", f"pktfiles/{number}.json")
        assert result.returncode == 0, result
        assert result.stdout.splitlines() == [
            f"Sending message {payload} to privacy policy {policy} through reverse proxy "
            f"running on port {proxy.port}",
            f"Receiving a response from the server {server_id} payload: {digest}",
            "Hash of payload is correct"]
        assert_no_traceback(result)
        servers[server_id].wait_for(
            rf"^Sending a response to the client {number} payload: {digest}$")
        assert (f"Received a message from client {number} payload: {payload}"
                in servers[server_id].lines)
        for line in (f"Received a data message from client {number} privacy policy "
                     f"{policy} payload: {payload}",
                     f"Forwarding a data message to server id {server_id} payload: {payload}",
                     f"Received a data message from server id {server_id} payload: {digest}",
                     f"Forwarding a data message to client id {number} payload: {digest}"):
            proxy.wait_for("^" + re.escape(line) + "$")


@pytest.mark.parametrize("args, option", [
    (["reverse_proxy.py", "-port", "0", "-tls-cert", "{bad}", "-tls-key", "{bad}"],
     "cannot load TLS files"),
    (["server.py", "-id", "1", "-pp", "111", "-tls-cert", "{bad}", "-tls-key", "{bad}"],
     "cannot load TLS files"),
    (["client.py", "-id", "1", "-pkt", "pktfiles/1.json", "-tls-ca", "{bad}"],
     "cannot load -tls-ca"),
])
def test_a_tls_file_that_is_not_pem_is_named(tmp_path, args, option):
    bad = tmp_path / "hostname"
    bad.write_text("myhost\n", encoding="ascii")
    result = run(*(arg.format(bad=bad) for arg in args))
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"{args[0]}: error: {option}: '{bad}' holds no PEM certificate")
    assert_no_traceback(result)


def test_server_exits_1_when_its_listen_port_is_busy(nodes):
    proxy = nodes.proxy()
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = run("server.py", "-id", "1", "-pp", "111", "-listen", port,
                     "-revproc", proxy.port)
    assert result.returncode == 1
    assert str(port) in result.stderr
    assert_no_traceback(result)
