"""The HAProxy front tier of deploy/haproxy.cfg, with Debian's real HAProxy: two
reverse proxies behind it on their PROXY protocol listeners (PROTOCOL.md section 8),
clients through it, one proxy killed (README.md, "Scaling out")."""

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

import protocol
from conftest import ROOT, WAIT, Wire, free_port, sha1

HAPROXY = shutil.which("haproxy")
pytestmark = pytest.mark.skipif(
    HAPROXY is None, reason="HAProxy not found: apt-get install haproxy")


def front_tier_config(tmp_path, front, backends):
    """deploy/haproxy.cfg with the test's ports and socket, and checks every 200 ms
    instead of 2 s so that the test takes a second, not six."""
    with open(os.path.join(ROOT, "deploy", "haproxy.cfg"), encoding="utf-8") as file:
        text = file.read()
    socket_path = tmp_path / "haproxy.sock"
    text = text.replace("/tmp/haproxy-front-tier.sock", str(socket_path))
    text = text.replace("bind 127.0.0.1:2100", f"bind 127.0.0.1:{front}")
    text = text.replace("server rp1 127.0.0.1:2101", f"server rp1 127.0.0.1:{backends[0]}")
    text = text.replace("server rp2 127.0.0.1:2102", f"server rp2 127.0.0.1:{backends[1]}")
    assert "inter 2s" in text
    text = text.replace("inter 2s", "inter 200ms")
    path = tmp_path / "haproxy.cfg"
    path.write_text(text, encoding="utf-8")
    return path, socket_path


def server_states(socket_path):
    """{server name: status} from HAProxy's stats socket ("show stat")."""
    with socket.socket(socket.AF_UNIX) as admin:
        admin.settimeout(WAIT)
        admin.connect(str(socket_path))
        admin.sendall(b"show stat\n")
        data = b""
        while chunk := admin.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
    return {row["svname"]: row["status"] for row in rows if row["pxname"] == "reverse_proxies"
            and row["svname"] in ("rp1", "rp2")}


def wait_states(socket_path, wanted):
    deadline = time.monotonic() + WAIT
    while True:
        try:
            states = server_states(socket_path)
        except OSError:
            states = None
        if states is not None and all(states.get(name, "").startswith(status)
                                      for name, status in wanted.items()):
            return states
        assert time.monotonic() < deadline, f"HAProxy states {states}, wanted {wanted}"
        time.sleep(0.05)  # polling HAProxy's own check cadence (200 ms), bounded


def test_haproxy_spreads_clients_checks_with_ping_and_routes_around_a_dead_proxy(
        nodes, fake_servers, tmp_path):
    proxies, front_ports = [], []
    for _ in range(2):
        proxy = nodes.proxy("-proxy-protocol-port", 0)
        front_ports.append(int(proxy.wait_for(
            r"Front-tier listener \(PROXY protocol v1 or v2\) on port (\d+)").group(1)))
        proxies.append(proxy)
    servers = [fake_servers("100"), fake_servers("300")]
    for server in servers:
        for proxy in proxies:
            server.register(proxy.port, "111")
    front = free_port()
    config, socket_path = front_tier_config(tmp_path, front, front_ports)
    check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True,
                           text=True, timeout=WAIT)
    assert check.returncode == 0, check.stdout + check.stderr
    haproxy = nodes.start_command([HAPROXY, "-db", "-f", str(config)], name="haproxy")
    wait_states(socket_path, {"rp1": "UP", "rp2": "UP"})

    # Clients through the front tier: every frame answered; each proxy saw the
    # client's own address in the PROXY header, not HAProxy's.
    clients = [Wire(front) for _ in range(6)]
    for index, wire in enumerate(clients):
        wire.send(protocol.data(f"c{index}", "111", f"first {index}"))
        assert wire.receive()["payload"] == sha1(f"first {index}")
    bad = Wire(front)
    bad.send_body(b"not json")
    assert bad.receive()["code"] == "BAD_MESSAGE"
    client_port = bad.sock.getsockname()[1]
    seen = rf"BAD_MESSAGE: .* \(from 127\.0\.0\.1:{client_port}\)$"
    deadline = time.monotonic() + WAIT
    while not any(proxy.count(seen) for proxy in proxies):
        # The line is written by the proxy's log thread, after the answer went out.
        assert time.monotonic() < deadline, [proxy.output for proxy in proxies]
        time.sleep(0.02)
    bad.close()
    for wire in clients:
        wire.close()

    # One proxy dies: HAProxy's PING check marks it down, and new clients are all
    # served by the other.
    proxies[0].proc.send_signal(signal.SIGKILL)
    proxies[0].wait()
    wait_states(socket_path, {"rp1": "DOWN", "rp2": "UP"})
    for index in range(10):
        wire = Wire(front)
        wire.send(protocol.data(f"n{index}", "111", f"after {index}"))
        assert wire.receive()["payload"] == sha1(f"after {index}")
        wire.close()
    assert haproxy.proc.poll() is None
    assert "Traceback" not in proxies[1].output
