"""server.py as a program: several proxies, weights, IPv6, running out of descriptors.

Real processes on loopback with port 0 (``conftest.Nodes``), since the command line,
the signals and the exit status are the point:

* ``-revproc A,B``: one session per proxy, each registered and routed through; a
  proxy killed and restarted costs nothing with the other and is rejoined; SIGTERM
  leaves every proxy; a refusal stops only the session with the proxy that refused.
* ``-weight N`` reaches the proxy: the order of answers is nginx's smooth weighted
  round robin (the team's PROTOCOL.md section 8).
* ``-host ::1`` / ``-host ::`` and ``-revproc [::1]:PORT``.
* Descriptor exhaustion: the accept loop pauses instead of spinning, and serves again
  once descriptors are free (``netio.FramedServer``).
* Faults of a proxy: part of a frame then silence on the session (lost within 3
  heartbeats, from a scripted proxy, ``test_client_failover.Peer``), a full proxy
  (OVERLOADED at SETUP: asked again until it has room), two servers with one id.
* SIGUSR1 prints the sessions, SIGHUP says there is nothing to reload, and the stop
  line counts the proxies the server is registered with.
"""

import os
import re
import resource
import signal
import socket
import threading
import time

import pytest

from conftest import (WAIT, Wire, assert_no_traceback, cpu_seconds, free_port, ipv6_loopback,
                      read_frame, read_to_eof, run, sha1, wait_until)
import protocol

ACK = protocol.MessageType.ACK


def answered_by(port, policy, count, host="127.0.0.1"):
    """Send ``count`` DATA frames of ``policy`` to the proxy, pipelined on one
    connection; return the answering server ids in order (an ERROR's code instead).
    Every ACK's hash is checked."""
    wire = Wire(port, host)
    try:
        for index in range(count):
            wire.send(protocol.data("c1", policy, f"d{index}"))
        result = []
        for index in range(count):
            answer = wire.receive()
            if answer["type"] == ACK:
                assert answer["payload"] == sha1(f"d{index}"), answer
                result.append(answer["srcid"])
            else:
                result.append(answer["code"])
        return result
    finally:
        wire.close()


def left(proxy, server_id, policy):
    proxy.wait_for(rf"^server id {server_id} of privacy policy {policy} left: its "
                   rf"session closed$")


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(),
                                reason="no IPv6 loopback here: binding ::1 fails")


# --- Several proxies ----------------------------------------------------------------

def test_registers_with_every_proxy_and_sigterm_leaves_them_all(nodes):
    a, b = nodes.proxy(), nodes.proxy()
    server = nodes.server("s1", "111", f"{a.port},127.0.0.1:{b.port}", wait=False)
    for proxy in (a, b):
        server.wait_for(rf"^Connecting to the reverse proxy on port {proxy.port} at "
                        r"127\.0\.0\.1$")
        server.wait_for(rf"^Registered with the reverse proxy at 127\.0\.0\.1:{proxy.port} "
                        rf"as server id s1 for privacy policy 111 \(heartbeat 1 s\)$")
        proxy.wait_for(rf"^Received setup message from server id s1 privacy policy 111 "
                       rf"port {server.port}\b")
        assert answered_by(proxy.port, "111", 2) == ["s1", "s1"]
    began = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - began < 5
    for proxy in (a, b):
        left(proxy, "s1", "111")
    server.wait_for(r"^Stopping: leaving the rotation of 2 proxies, then answering")
    assert_no_traceback(server)


def test_with_several_proxies_each_packet_line_names_the_connection_it_came_on(nodes):
    # Issue 10: the log says which proxy each line is about; the proxies here share
    # a host, so the data connection's address tells them apart.
    a, b = nodes.proxy(), nodes.proxy()
    server = nodes.server("s5", "111", f"{a.port},{b.port}", wait=False)
    for proxy in (a, b):
        server.wait_for(rf"Registered with the reverse proxy at 127\.0\.0\.1:{proxy.port} ")
    peers = []
    for proxy in (a, b):
        mark = len(server.lines)
        assert answered_by(proxy.port, "111", 1) == ["s5"]
        peers.append(server.wait_for(r"^Received a message from client c1 payload: d0 "
                                     r"\(from (127\.0\.0\.1:\d+)\)$", start=mark).group(1))
        server.wait_for(rf"^Sending a response to the client c1 payload: {sha1('d0')} "
                        rf"\(from {re.escape(peers[-1])}\)$", start=mark)
    assert peers[0] != peers[1]  # two proxies, two data connections
    assert server.stop() == 0


def test_one_proxy_killed_and_restarted_leaves_the_other_session_alone(nodes):
    a, b = nodes.proxy(), nodes.proxy()
    server = nodes.server("s2", "111", f"{a.port},{b.port}", "-quiet", wait=False)
    for proxy in (a, b):
        server.wait_for(rf"Registered with the reverse proxy at 127\.0\.0\.1:{proxy.port} ")
    a.proc.kill()
    a.wait()
    server.wait_for(rf"^Lost the session with the reverse proxy at 127\.0\.0\.1:{a.port} "
                    r"\((the proxy closed the session|Connection reset by peer)\); "
                    r"registering again in [\d.]+ s$")
    server.wait_for(rf"^Cannot reach the reverse proxy at 127\.0\.0\.1:{a.port} "
                    r"\(Connection refused\); retrying in [\d.]+ s$")
    assert answered_by(b.port, "111", 3) == ["s2"] * 3
    assert server.count(rf"(Lost the session with|Cannot reach) the reverse proxy at "
                        rf"127\.0\.0\.1:{b.port}") == 0
    mark = len(server.lines)
    restarted = nodes.proxy(port=a.port)
    server.wait_for(rf"^Registered with the reverse proxy at 127\.0\.0\.1:{a.port} as "
                    r"server id s2", timeout=3, start=mark)
    assert answered_by(restarted.port, "111", 2) == ["s2", "s2"]
    assert answered_by(b.port, "111", 1) == ["s2"]
    assert server.count(rf"Registered with the reverse proxy at 127\.0\.0\.1:{b.port} ") == 1
    assert server.stop() == 0
    left(restarted, "s2", "111")
    left(b, "s2", "111")
    assert_no_traceback(server)


@pytest.fixture
def policy_keys(tmp_path):
    """Files: ``right`` and ``other`` policy-key files for policy pK, ``key`` the
    server's key file, which matches ``right`` only."""
    files = {}
    for name, text in (("right", "pK right-key\n"), ("other", "pK other-key\n"),
                       ("key", "right-key\n")):
        files[name] = tmp_path / name
        files[name].write_text(text, encoding="utf-8")
    return files


def test_a_refusal_stops_only_the_session_with_the_proxy_that_refused(nodes, policy_keys):
    refusing = nodes.proxy("-policy-keys", policy_keys["other"])
    good = nodes.proxy("-policy-keys", policy_keys["right"])
    server = nodes.server("s3", "pK", f"{refusing.port},{good.port}",
                          "-key-file", policy_keys["key"], wait=False)
    server.wait_for(rf"^The reverse proxy at 127\.0\.0\.1:{refusing.port} refused "
                    r"registration: UNAUTHORIZED: wrong proof for privacy policy pK "
                    r"\(server id s3\); not asking it again$")
    server.wait_for(rf"^Registered with the reverse proxy at 127\.0\.0\.1:{good.port} ")
    assert answered_by(good.port, "pK", 2) == ["s3", "s3"]
    assert answered_by(refusing.port, "pK", 1) == ["NO_SERVER"]
    assert server.proc.poll() is None
    assert server.stop() == 0
    left(good, "s3", "pK")
    assert refusing.count(r"unauthorized: wrong proof") == 1
    assert_no_traceback(server)


def test_refused_by_every_proxy_exits_1_naming_each(nodes, policy_keys):
    a = nodes.proxy("-policy-keys", policy_keys["other"])
    b = nodes.proxy("-policy-keys", policy_keys["right"])
    server = nodes.server("s4", "pK", f"{a.port},{b.port}", wait=False)
    assert server.wait() == 1
    needs = (r"UNAUTHORIZED: registration for privacy policy pK needs a proof[^;]*"
             r"\(the proxy requires a key: give -key-file\)")
    server.wait_for(rf"^server\.py: every reverse proxy refused registration: "
                    rf"127\.0\.0\.1:{a.port}: {needs}; 127\.0\.0\.1:{b.port}: {needs}$")
    assert_no_traceback(server)


# --- Weights --------------------------------------------------------------------------

def test_weight_reaches_the_proxy_as_smooth_weighted_round_robin(nodes):
    proxy = nodes.proxy()
    nodes.server("a", "333", proxy.port, "-weight", "3", "-quiet")
    nodes.server("b", "333", proxy.port, "-quiet")
    # nginx's smooth weighted round robin with weights 3, 1: a a b a, then again.
    assert answered_by(proxy.port, "333", 8) == ["a", "a", "b", "a"] * 2


@pytest.mark.parametrize("weight", ["0", "257", "x", "2.5"])
def test_a_weight_outside_1_to_256_is_a_usage_error(weight):
    result = run("server.py", "-id", "1", "-pp", "111", "-weight", weight)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"server.py: error: argument -weight: '{weight}' is not a whole number from 1 "
        f"to 256")
    assert result.stdout == ""


@pytest.mark.parametrize("revproc, message", [
    ("2100,2101,2100", "'2100' is listed twice"),
    ("2100,127.0.0.1:2100", "'127.0.0.1:2100' names the same reverse proxy as '2100'"),
    ("[::1]:2100,[0::1]:2100", "'[0::1]:2100' names the same reverse proxy as '[::1]:2100'"),
    ("2100,,2101", "'2100,,2101' has an empty entry (a comma too many)"),
])
def test_a_proxy_listed_twice_is_a_usage_error(revproc, message):
    result = run("server.py", "-id", "1", "-pp", "111", "-revproc", revproc)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == f"server.py: error: argument -revproc: {message}"
    assert result.stdout == ""


def test_help_tells_of_several_proxies_weights_and_ipv6():
    result = run("server.py", "--help")
    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    for said in ("several, comma-separated, to register with each of them (default: 2100)",
                 "-weight N this server's share of its policy's rotation, 1 to 256",
                 ":: on every IPv6 and IPv4 one"):
        assert said in text, result.stdout


# --- IPv6 -------------------------------------------------------------------------------

@needs_ipv6
def test_ipv6_loopback_end_to_end(nodes, tmp_path):
    proxy = nodes.proxy("-host", "::1")
    server = nodes.server("s6", "111", f"[::1]:{proxy.port}", "-host", "::1", wait=False)
    server.wait_for(rf"^Registered with the reverse proxy at \[::1\]:{proxy.port} as "
                    r"server id s6")
    pkt = tmp_path / "p.json"
    pkt.write_text('{"type": 0, "srcid": "9", "privPoliId": "111", "payload": "v6"}',
                   encoding="utf-8")
    done = run("client.py", "-id", "9", "-revproc", f"[::1]:{proxy.port}", "-pkt", pkt)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Receiving a response from the server s6 payload: {sha1('v6')}" in done.stdout
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=WAIT).close()
    assert server.stop() == 0
    left(proxy, "s6", "111")


@needs_ipv6
def test_any_address_listens_on_ipv6_and_ipv4_and_the_proxy_uses_what_it_sees(nodes):
    proxy = nodes.proxy()
    server = nodes.server("s7", "111", proxy.port, "-host", "::")
    # No host in the SETUP: the proxy connects to the address the SETUP came from.
    assert answered_by(proxy.port, "111", 2) == ["s7", "s7"]
    for host in ("::1", "127.0.0.1"):
        wire = Wire(server.port, host)
        wire.send(protocol.ping())
        assert wire.receive()["type"] == protocol.MessageType.PONG
        wire.close()
    assert server.stop() == 0


# --- Running out of descriptors ----------------------------------------------------

@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux's /proc")
def test_out_of_descriptors_the_accept_loop_pauses_then_serves_again(nodes):
    limit = 40
    proxy = nodes.proxy()
    server = nodes.server("s8", "111", proxy.port, "-quiet")
    pid = server.proc.pid
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
    idle = []
    try:
        # More than the limit: the last ones wait in the listen backlog.
        for _ in range(limit + 5):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=WAIT))
        wait_until(lambda: len(os.listdir(f"/proc/{pid}/fd")) >= limit,
                   what="the server holding all its descriptors")
        began, cpu = time.monotonic(), cpu_seconds(pid)
        time.sleep(1.0)  # a measuring window, not a wait for readiness
        share = (cpu_seconds(pid) - cpu) / (time.monotonic() - began)
        assert share < 0.2, f"the server used {share:.0%} of a core while out of descriptors"
        server.wait_for(r"^cannot accept connections: Too many open files \(\d+ "
                        r"connections open\); pausing accept until some close$")
    finally:
        for sock in idle:
            sock.close()
    server.wait_for(r"^accepting connections again$")
    wire = Wire(server.port)
    wire.send(protocol.ping())
    assert wire.receive()["type"] == protocol.MessageType.PONG
    wire.close()
    assert answered_by(proxy.port, "111", 2) == ["s8", "s8"]
    assert server.count(r"cannot accept connections") == 1
    assert server.stop() == 0
    assert_no_traceback(server)


# --- Faults of a proxy, seen from the server ---------------------------------------------

def test_part_of_a_frame_then_silence_on_the_session_is_lost_within_3_heartbeats(
        nodes, peers):
    setups = []
    arrived = threading.Condition()

    def registered_then_two_stray_bytes(sock):
        setup = read_frame(sock)
        with arrived:
            setups.append(time.monotonic())
            arrived.notify_all()
        sock.sendall(protocol.encode_frame(protocol.registered(setup["id"],
                                                               setup["privPolyId"]))
                     + b"\x00\x00")  # half a length prefix, and never the rest
        read_to_eof(sock)  # the PINGs, unanswered, until the server gives up

    fake = peers(registered_then_two_stray_bytes)
    server = nodes.server("s9", "111", fake.port, "-heartbeat", "0.5", "-quiet", wait=False)
    with arrived:
        assert arrived.wait_for(lambda: len(setups) >= 2, WAIT), server.output
    # 3 heartbeats of silence, the first pause (0.1 s), and room for a loaded machine.
    assert 1.5 <= setups[1] - setups[0] < 1.5 + 0.1 + 2.0
    server.wait_for(rf"^Lost the session with the reverse proxy at 127\.0\.0\.1:{fake.port} "
                    r"\(no answer to PING for 1\.5 s \(3 heartbeats\); part of a frame "
                    r"came, not the rest\); registering again in 0\.1 s$")


FULL = (r"\(the proxy is full: OVERLOADED: the proxy has 1 connection open, its "
        r"maximum \(-max-conns\); try again later\); registering again in [\d.]+ s$")


def hold_the_only_connection(wires, proxy):
    """Open an idle client connection to ``proxy`` (run with -max-conns 1) and make
    sure that the proxy serves it: the proxy is full. Returns the Wire."""
    holder = wires(proxy.port)
    holder.send(protocol.ping())
    assert holder.receive()["type"] == protocol.MessageType.PONG
    return holder


def test_a_full_proxy_is_asked_again_until_it_has_room(nodes, wires):
    full, other = nodes.proxy("-max-conns", 1), nodes.proxy()
    holder = hold_the_only_connection(wires, full)
    server = nodes.server("s10", "111", f"{full.port},{other.port}", "-quiet", wait=False)
    server.wait_for(rf"^Registered with the reverse proxy at 127\.0\.0\.1:{other.port} ")
    refused = rf"^Lost the session with the reverse proxy at 127\.0\.0\.1:{full.port} {FULL}"
    wait_until(lambda: server.count(refused) >= 2, what="two registrations refused as full")
    holder.close()
    server.wait_for(rf"^Registered with the reverse proxy at 127\.0\.0\.1:{full.port} as "
                    r"server id s10")
    full.wait_for(r"^Received setup message from server id s10 privacy policy 111 ")
    assert answered_by(other.port, "111", 2) == ["s10", "s10"]
    assert server.stop() == 0
    assert_no_traceback(server)


def test_with_its_only_proxy_full_the_server_keeps_asking_and_registers_once_it_has_room(
        nodes, wires):
    full = nodes.proxy("-max-conns", 1)
    holder = hold_the_only_connection(wires, full)
    server = nodes.server("s11", "111", full.port, "-quiet", wait=False)
    refused = rf"^Lost the session with the reverse proxy at 127\.0\.0\.1:{full.port} {FULL}"
    wait_until(lambda: server.count(refused) >= 3, what="three registrations refused as full")
    assert server.proc.poll() is None  # a full proxy is no refusal: the server stays
    holder.close()
    server.wait_for(rf"^Registered with the reverse proxy at 127\.0\.0\.1:{full.port} as "
                    r"server id s11")
    assert server.stop() == 0
    left(full, "s11", "111")
    assert_no_traceback(server)


def test_two_servers_with_one_id_are_told_that_they_take_turns(nodes):
    proxy = nodes.proxy()
    twins = [nodes.server("twin", "111", proxy.port, "-quiet") for _ in range(2)]
    proxy.wait_for(r"^server id twin registered again from .*: its session from .* is "
                   r"replaced and closed$")
    hint = (rf"^Lost the session with the reverse proxy at 127\.0\.0\.1:{proxy.port} "
            r"\((the proxy closed the session|Connection reset by peer); another server "
            r"registered with the same id\?\); registering again in [\d.]+ s$")
    wait_until(lambda: any(twin.count(hint) for twin in twins),
               what="a twin told of the other")
    for twin in twins:
        assert twin.stop() == 0
        assert_no_traceback(twin)


# --- Signals and the stop ------------------------------------------------------------------

def test_sigusr1_prints_each_session_and_the_answers_sighup_nothing_to_reload(nodes):
    proxy, down = nodes.proxy(), free_port()
    server = nodes.server("s12", "111", f"{proxy.port},{down}", "-quiet", wait=False)
    server.wait_for(rf"^Registered with the reverse proxy at 127\.0\.0\.1:{proxy.port} ")
    server.wait_for(rf"^Cannot reach the reverse proxy at 127\.0\.0\.1:{down} ")
    assert answered_by(proxy.port, "111", 3) == ["s12"] * 3
    mark = len(server.lines)
    server.signal(signal.SIGUSR1)
    server.wait_for(r"^Packets answered: 3 \(all proxies together\)$", start=mark)
    start = server.lines.index("Sessions:", mark)
    assert server.lines[start:start + 4] == [
        "Sessions:",
        f"  reverse proxy at 127.0.0.1:{proxy.port}: registered, heartbeat 1 s",
        f"  reverse proxy at 127.0.0.1:{down}: unreachable (Connection refused); retrying",
        "Packets answered: 3 (all proxies together)"]
    server.signal(signal.SIGHUP)
    server.wait_for(r"^SIGHUP: nothing to reload \(the server reads no file after its "
                    r"start\)$", start=mark)
    assert server.proc.poll() is None
    assert server.stop() == 0
    # Only the proxy it is registered with counts, not the one it never reached.
    server.wait_for(r"^Stopping: leaving the rotation of 1 proxy, then answering the "
                    r"frames already received$")
    left(proxy, "s12", "111")
    assert_no_traceback(server)
