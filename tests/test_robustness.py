"""Robust where it runs (the robustness issue's catalogue): host names that no
resolver should see, faults while connecting to a server, descriptor exhaustion,
IPv6, and signal storms. Output encodings and closed or stuck output are in
test_cli_plumbing.py. Each failing example of the issue is a test here."""

import json
import os
import re
import resource
import signal
import socket
import subprocess
import time

import pytest

import protocol
from conftest import PYTHON, ROOT, WAIT, Wire, cpu_seconds, free_port, run, sha1


def has_ipv6():
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback (::1) here")


def descriptors(pid):
    """Open descriptors of process ``pid`` (from /proc)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def setup_answer(port, host):
    wire = Wire(port)
    try:
        body = ('{"type":1,"id":44,"privPolyId":444,"listenport":9,"host":'
                + json.dumps(host) + "}").encode("utf-8", "surrogatepass")
        wire.send_body(body)
        return wire.receive()
    finally:
        wire.close()


# --- A SETUP host that is no IP address and no DNS name -----------------------------------

@pytest.mark.parametrize("host", [
    "a" * 100, "a..b", ".a", "a.", "-a.example", "a-.example", "a b", "[::1]", "a_b",
    "\ud800", "é.example", ("a" * 63 + ".") * 4 + "a", "fe80::1%eth0\x00x", "fe80::1%a b",
    "127.1", "0x7f.1", "2130706433", "0177.0.0.1", "1.2.3.0x4"],
    ids=["label of 100", "empty label", "leading dot", "only a trailing dot is fine?",
         "leading hyphen", "trailing hyphen", "space", "brackets", "underscore",
         "lone surrogate", "not ASCII", "over 253", "NUL in a zone id",
         "space in a zone id", "short IPv4", "hex IPv4", "one-number IPv4",
         "octal IPv4", "hex octet"])
def test_setup_host_that_is_no_address_or_dns_name_is_refused_at_setup(proxies, host):
    proxy = proxies()
    if host == "a.":
        assert setup_answer(proxy.port, host)["type"] == protocol.MessageType.REGISTERED
        return
    answer = setup_answer(proxy.port, host)
    assert answer["code"] == "BAD_MESSAGE", answer
    assert answer["message"].startswith("host must be an IP address or a DNS name") or (
        "lone surrogate" in answer["message"])
    # The example goes on: a DATA frame for that policy is answered, not
    # dropped with the connection.
    wire = Wire(proxy.port)
    wire.send(protocol.data(1, 444, "p"))
    assert wire.receive()["code"] == "NO_SERVER"
    wire.close()


@pytest.mark.parametrize("host", ["::1", "127.0.0.1", "localhost", "example.com",
                                  "xn--bcher-kva.example", "a" * 63 + ".b", "fe80::1%eth0",
                                  "1.2.3.4.example"])
def test_setup_host_that_is_an_address_or_a_dns_name_registers(proxies, host):
    assert setup_answer(proxies().port, host)["type"] == protocol.MessageType.REGISTERED


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_a_setup_host_of_every_address_means_the_address_the_setup_came_from(
        proxies, fake_servers, host):
    # A server that says where it listens (everywhere), not where it can be reached.
    proxy = proxies()
    server = fake_servers("A")
    registration = Wire(proxy.port)
    registration.send(protocol.setup("A", "111", server.port, host=host))
    assert registration.receive()["type"] == protocol.MessageType.REGISTERED
    [policy] = proxy.stats()["policies"]
    assert [s["address"] for s in policy["servers"]] == [f"127.0.0.1:{server.port}"]
    wire = Wire(proxy.port)
    wire.send(protocol.data("c", "111", "p"))
    assert wire.receive()["payload"] == sha1("p")
    wire.close()
    registration.close()


def test_any_fault_while_connecting_to_a_server_is_upstream_failed(proxies, monkeypatch):
    # A name that passes the SETUP check but that the resolver fails on in any way
    # (here: an exception no one expects), as the IDNA codec did with long labels.
    real = socket.getaddrinfo

    def broken(host, *args, **kwargs):
        if host == "broken.example":
            raise RuntimeError("the resolver fell over")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", broken)
    proxy = proxies()
    registration = Wire(proxy.port)
    registration.send(protocol.setup(44, 444, 9, host="broken.example"))
    assert registration.receive()["type"] == protocol.MessageType.REGISTERED
    wire = Wire(proxy.port)
    wire.send(protocol.data(1, 444, "p"))
    answer = wire.receive()
    assert answer["code"] == "UPSTREAM_FAILED"
    assert "the resolver fell over" in answer["message"]
    wire.send(protocol.data(1, 444, "again"))  # the connection lives on
    assert wire.receive()["code"] in ("NO_SERVER", "UPSTREAM_FAILED")
    wire.close()
    registration.close()


# --- Descriptor exhaustion --------------------------------------------------------------

def low_limit(count):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))


def test_too_few_descriptors_to_start_is_one_line_and_status_1():
    # Down from a limit the proxy starts with, to the first it cannot start with:
    # whichever descriptor it then lacks (a listener, the signal pipe), it says so in
    # one line, never a traceback.
    for limit in range(16, 2, -1):
        proc = subprocess.Popen([PYTHON, "reverse_proxy.py", "-port", "0", "-quiet"],
                                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=low_limit(limit))
        line = proc.stdout.readline()
        if line.startswith("Running the reverse proxy on port"):
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=WAIT)
            continue
        out, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 1, (limit, line + out + err)
        assert len(err.splitlines()) == 1, (limit, err)
        assert err.startswith("reverse_proxy.py: ") and "Too many open files" in err, err
        return
    pytest.fail("the proxy started with 3 descriptors")


def test_default_max_conns_fits_the_descriptor_limit_no_spin(nodes, fake_servers):
    proxy = nodes.start("reverse_proxy.py", "-port", 0, "-quiet", name="proxy",
                        preexec=low_limit(64))
    port = int(proxy.wait_for(r"on port (\d+)").group(1))
    # (64 - 16 kept for the proxy itself) / 2, room for a data connection each.
    limit = int(proxy.wait_for(r"Open descriptors allowed: 64; serving at most (\d+) "
                               r"connections").group(1))
    assert limit == 24
    fake = fake_servers("S")
    fake.register(port, "111").close()
    idle = []
    for _ in range(80):
        sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        idle.append(sock)
    before = cpu_seconds(proxy.proc.pid)
    started = time.monotonic()
    time.sleep(1.0)  # the window over which the proxy's CPU time is measured
    used = (cpu_seconds(proxy.proc.pid) - before) / (time.monotonic() - started)
    assert used < 0.2, f"the proxy used {used:.0%} of a core while full"
    # Past the limit, connections were answered OVERLOADED, not left to spin.
    overloaded = 0
    for sock in idle[limit:]:
        sock.settimeout(WAIT)
        decoder = protocol.FrameDecoder()
        decoder.feed(sock.recv(65536))
        body = decoder.next_frame()
        overloaded += body is not None and protocol.parse_message(body)["code"] == "OVERLOADED"
    assert overloaded == 80 - limit
    for sock in idle:
        sock.close()
    wire = Wire(port)
    wire.send(protocol.data("c", "111", "after"))
    assert wire.receive()["payload"] == sha1("after")
    wire.close()
    assert "Traceback" not in proxy.output


def test_out_of_descriptors_backs_off_answers_overloaded_and_keeps_the_server(
        nodes, fake_servers):
    proxy = nodes.start("reverse_proxy.py", "-port", 0, "-max-conns", 1000,
                        name="proxy", preexec=low_limit(64))
    port = int(proxy.wait_for(r"on port (\d+)").group(1))
    # A -max-conns the descriptors cannot serve is accepted, with a warning.
    proxy.wait_for(r"^-max-conns 1000 is more than the 64 open descriptors allowed can "
                   r"serve \(24 connections, each with a data connection\); past that, new "
                   r"connections wait and frames get OVERLOADED \(raise the limit with "
                   r"ulimit -n\)$")
    fake = fake_servers("S")
    fake.register(port, "111").close()
    client = Wire(port)  # accepted while descriptors are free
    client.send(protocol.data("c", "111", "first"))
    assert client.receive()["payload"] == sha1("first")
    # The server ends the pooled data connection, so that the next frame needs a new
    # one; wait until the proxy has closed its end (one descriptor fewer).
    before = descriptors(proxy.proc.pid)
    fake.drop_connections()
    deadline = time.monotonic() + WAIT
    while descriptors(proxy.proc.pid) >= before:
        assert time.monotonic() < deadline, "the proxy kept the dropped data connection"
        time.sleep(0.02)  # polling /proc, bounded
    idle = []
    try:
        for _ in range(80):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=WAIT))
    except OSError:
        pass
    proxy.wait_for(r"cannot accept connections: Too many open files .*pausing accept")
    before = cpu_seconds(proxy.proc.pid)
    started = time.monotonic()
    time.sleep(1.0)  # the window over which the proxy's CPU time is measured
    used = (cpu_seconds(proxy.proc.pid) - before) / (time.monotonic() - started)
    assert used < 0.2, f"the proxy used {used:.0%} of a core while out of descriptors"
    client.send(protocol.data("c", "111", "no descriptor"))
    answer = client.receive()
    assert answer["code"] == "OVERLOADED", answer
    for sock in idle:
        sock.close()
    deadline = time.monotonic() + WAIT
    while descriptors(proxy.proc.pid) > 48:
        assert time.monotonic() < deadline, "the proxy kept the closed connections"
        time.sleep(0.02)  # polling /proc while the proxy sees the closes, bounded
    # Descriptors are free again: the same server serves, it was never taken out.
    client.send(protocol.data("c", "111", "recovered"))
    assert client.receive()["payload"] == sha1("recovered")
    assert proxy.count("is down") == 0 and proxy.count("dropped") == 0
    assert proxy.count("cannot accept") == 1
    client.close()
    assert "Traceback" not in proxy.output


# --- IPv6 -----------------------------------------------------------------------------------

@needs_ipv6
def test_proxy_on_ipv6_loopback_with_an_ipv6_server_and_client(nodes):
    proxy = nodes.proxy("-host", "::1")
    server = nodes.server("6", "666", f"[::1]:{proxy.port}", "-host", "::1")
    proxy.wait_for(r"Received setup message from server id 6 privacy policy 666")
    done = nodes.client("1", f"[::1]:{proxy.port}", "pktfiles/1.json")
    assert done.wait() in (0, 1)
    wire = Wire(proxy.port, host="::1")
    wire.send(protocol.data("c", "666", "six"))
    assert wire.receive()["payload"] == sha1("six")
    wire.close()
    mark = len(proxy.lines)
    proxy.signal(signal.SIGUSR1)
    proxy.wait_for(rf"server id 6 at \[::1\]:{server.port} up", start=mark)


@needs_ipv6
def test_proxy_on_every_address_serves_ipv4_and_ipv6_and_uses_the_address_it_sees(
        nodes, fake_servers):
    proxy = nodes.proxy("-host", "::")
    fake = fake_servers("S")
    fake.register(proxy.port, "111")  # from 127.0.0.1: shown as such, not ::ffff:
    for host in ("127.0.0.1", "::1"):
        wire = Wire(proxy.port, host=host)
        wire.send(protocol.data("c", "111", host))
        assert wire.receive()["payload"] == sha1(host)
        wire.close()
    mark = len(proxy.lines)
    proxy.signal(signal.SIGUSR1)
    proxy.wait_for(rf"server id S at 127\.0\.0\.1:{fake.port} up", start=mark)


# --- Signals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("program", ["reverse_proxy.py", "server.py"])
def test_sigterm_again_and_again_while_stopping_still_ends_with_status_0(program):
    # The first SIGTERM stops the program; the ones after it, up to its very end
    # (the interpreter's teardown included), must not end it by the signal instead.
    args = {"reverse_proxy.py": ("-port", "0"),
            "server.py": ("-id", "1", "-pp", "1", "-listen", "0", "-revproc", str(free_port()))}
    proc = subprocess.Popen([PYTHON, program, *args[program], "-quiet"], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # up to the ready line
            if re.match(r"(Running the reverse proxy|Listening) on port \d+", line):
                break
        deadline = time.monotonic() + WAIT
        while proc.poll() is None and time.monotonic() < deadline:
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.002)  # the pace of the storm, not a wait for an event
        assert proc.wait(WAIT) == 0
        rest = proc.stdout.read()  # a signal met at the very end is no error either
        assert "Traceback" not in rest and "race condition" not in rest, rest
    finally:
        proc.kill()
        proc.wait(WAIT)


def test_a_storm_of_sigusr1_neither_kills_nor_stalls_the_proxy(nodes, fake_servers):
    proxy = nodes.proxy("-quiet")
    fake_servers("S").register(proxy.port, "111")
    wire = Wire(proxy.port)
    sent = 0
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        for _ in range(100):
            os.kill(proxy.proc.pid, signal.SIGUSR1)
            sent += 1
        wire.send(protocol.data("c", "111", f"during {sent}"))
        assert wire.receive(timeout=WAIT)["payload"] == sha1(f"during {sent}")
    assert sent >= 5000
    proxy.wait_for(r"^Registry:$")
    assert proxy.proc.poll() is None
    assert proxy.stop() == 0
    assert "Traceback" not in proxy.output and "RecursionError" not in proxy.output


# --- Settings that cannot work ------------------------------------------------------------

@pytest.mark.parametrize("program, required", [
    ("reverse_proxy.py", ()), ("server.py", ("-id", "1", "-pp", "1")),
    ("client.py", ("-id", "1", "-pkt", "pktfiles/1.json"))])
def test_a_max_frame_below_the_size_of_an_answer_is_a_usage_error(program, required):
    done = run(program, *required, "-max-frame", "100")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        f"{program}: error: argument -max-frame: 100 bytes is too small: every answer must "
        "fit (an ACK takes about 110 bytes plus its ids); use at least 512")


@pytest.mark.parametrize("program, option, required", [
    ("server.py", "-id", ("-pp", "1")), ("server.py", "-pp", ("-id", "1")),
    ("client.py", "-id", ("-pkt", "pktfiles/1.json"))])
def test_an_id_longer_than_a_proxy_takes_is_a_usage_error(program, option, required):
    # A proxy refuses a SETUP id or policy id over 256 characters (PROTOCOL.md
    # section 10): the server would be refused at every start.
    done = run(program, *required, option, "x" * 257)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        f"{program}: error: argument {option}: '{'x' * 20}...' is 257 characters long; "
        "an id has at most 256")


@pytest.mark.parametrize("options, reason", [
    (("-balance", "111=leastconn", "-balance", "111=roundrobin"),
     "argument -balance: privacy policy 111 is given twice (leastconn, roundrobin); "
     "give it once"),
    (("-balance", "leastconn", "-balance", "leastconn"),
     "argument -balance: the default algorithm is given twice (leastconn, leastconn); "
     "give it once"),
    (("-port", "2999", "-stats", "127.0.0.1:2999"),
     "argument -stats: port 2999 is the proxy's own -port too; choose another"),
    (("-port", "2999", "-proxy-protocol-port", "2999"),
     "argument -proxy-protocol-port: port 2999 is the proxy's own -port too; choose another"),
    (("-host", "0.0.0.0", "-port", "2999", "-stats", "127.0.0.1:2999"),
     "argument -stats: port 2999 is the proxy's own -port too; choose another"),
    (("-port", "2998", "-proxy-protocol-port", "2999", "-stats", "2999"),
     "argument -stats: port 2999 is the proxy's own -proxy-protocol-port too; choose "
     "another"),
])
def test_proxy_settings_that_contradict_each_other_are_usage_errors(options, reason):
    done = run("reverse_proxy.py", *options)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == f"reverse_proxy.py: error: {reason}"


@pytest.mark.parametrize("program, required", [
    ("reverse_proxy.py", ()), ("server.py", ("-id", "1", "-pp", "1"))])
@pytest.mark.parametrize("host", ["\u65e5\u672c", "a..b", "a_b"])
def test_a_host_that_is_neither_an_address_nor_a_dns_name_is_a_usage_error(
        program, required, host):
    # It would go to the resolver (a DNS query off this machine) as something else.
    done = run(program, *required, "-host", host)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        f"{program}: error: argument -host: '{host}' is not an IP address or a DNS name")
