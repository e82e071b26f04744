"""Across real network hosts (README.md, "Scaling out"): Linux network namespaces, one
per host, on a bridge of their own; two proxies, four servers registered with both,
six clients given both; then one proxy's link is cut and comes back.

Addresses 10.211.0.0/24 exist only inside the namespaces this test makes; the bridge
lives in a namespace of its own, so the machine's own network is never touched. Every
namespace (and with it every veth) is removed at the end, also when the test fails.
Needs root and iproute2's ``ip``; skipped otherwise, saying why.
"""

import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from conftest import PYTHON, WAIT, write_packets

IP = shutil.which("ip")
pytestmark = pytest.mark.skipif(
    IP is None or os.geteuid() != 0,
    reason="needs root and the ip command (Debian: apt-get install iproute2)")

PREFIX = "rptest"
SUBNET = "10.211.0"
# A short heartbeat: a session to a cut-off proxy times out in 3 x 0.5 s.
HEARTBEAT = "0.5"


def ip(*args):
    subprocess.run([IP, *args], check=True, capture_output=True, timeout=WAIT)


class Network:
    """Hosts on one bridge: ``add(name, last_octet)`` makes a namespace whose eth0 has
    10.211.0.<last_octet>/24; ``cut(name)``/``mend(name)`` take its link down/up."""

    def __init__(self):
        self.tag = f"{PREFIX}{os.getpid()}"
        self.switch = f"{self.tag}sw"
        self.hosts = {}
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")

    def add(self, name, octet):
        namespace = f"{self.tag}{name}"
        port = f"p{name}"
        ip("netns", "add", namespace)
        self.hosts[name] = namespace
        # Made inside the switch's namespace, its peer moved straight into the host's.
        ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
           "netns", namespace)
        ip("-n", self.switch, "link", "set", port, "master", "br0")
        ip("-n", self.switch, "link", "set", port, "up")
        ip("-n", namespace, "link", "set", "lo", "up")
        ip("-n", namespace, "addr", "add", f"{SUBNET}.{octet}/24", "dev", "eth0")
        ip("-n", namespace, "link", "set", "eth0", "up")
        return f"{SUBNET}.{octet}"

    def command(self, name, *args):
        """The command line that runs a Python program of the project on host ``name``."""
        return [IP, "netns", "exec", self.hosts[name], PYTHON, *[str(arg) for arg in args]]

    def cut(self, name):
        ip("-n", self.switch, "link", "set", f"p{name}", "down")

    def mend(self, name):
        ip("-n", self.switch, "link", "set", f"p{name}", "up")

    def remove(self):
        for namespace in [*self.hosts.values(), self.switch]:
            subprocess.run([IP, "netns", "del", namespace], capture_output=True, timeout=WAIT)


@pytest.fixture
def network():
    # Namespaces left by a test run that was killed are removed first; those of a run
    # still going (its process id is in their names) are not.
    listed = subprocess.run([IP, "netns", "list"], capture_output=True, text=True,
                            timeout=WAIT).stdout
    for stale, pid in re.findall(rf"^({PREFIX}(\d+)\S*)", listed, re.M):
        if not os.path.exists(f"/proc/{pid}"):
            subprocess.run([IP, "netns", "del", stale], capture_output=True, timeout=WAIT)
    net = Network()
    try:
        yield net
    finally:
        net.remove()


def test_two_proxies_four_servers_six_clients_and_a_cut_link(network, nodes, tmp_path):
    proxies = {name: network.add(name, octet) for name, octet in (("p1", 1), ("p2", 2))}
    servers = {sid: network.add(f"s{sid}", octet) for sid, octet in
               (("100", 11), ("200", 12), ("300", 13), ("400", 14))}
    client = network.add("c", 21)
    both = ",".join(f"{address}:2100" for address in proxies.values())
    started = {}
    for name in proxies:
        started[name] = nodes.start_command(
            network.command(name, "reverse_proxy.py", "-host", "0.0.0.0", "-port", 2100),
            name=name)
        started[name].wait_for(r"Running the reverse proxy on port 2100")
    for sid in servers:
        started[sid] = nodes.start_command(network.command(
            f"s{sid}", "server.py", "-id", sid, "-pp", "111" if sid in ("100", "300") else "222",
            "-listen", 2105, "-revproc", both, "-heartbeat", HEARTBEAT), name=f"server {sid}")
    for name in proxies:
        for sid in servers:
            started[name].wait_for(rf"Received setup message from server id {sid} .*")
        # No -host on the servers: each proxy connects back to the address it saw, the
        # server's own in its namespace (the registry printed on SIGUSR1 shows it).
        mark = len(started[name].lines)
        started[name].signal(signal.SIGUSR1)
        for sid, address in servers.items():
            started[name].wait_for(rf"server id {sid} at {re.escape(address)}:2105 up",
                                   start=mark)

    def clients(tag):
        """Run six clients given both proxies, p1 first; return their outputs."""
        runs = []
        for number in range(1, 7):
            policy = "111" if number in (1, 2, 4) else "222"
            packets = write_packets(tmp_path, f"{tag}{number}.json", [
                {"type": 0, "srcid": str(number), "privPoliId": policy,
                 "payload": f"{tag} {number} {k}"} for k in range(5)])
            runs.append(subprocess.Popen(
                network.command("c", "client.py", "-id", number, "-revproc", both,
                                "-pkt", packets, "-timeout", 3, "-connect-timeout", 1),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outputs = []
        for run in runs:
            out, _ = run.communicate(timeout=4 * WAIT)
            outputs.append((run.returncode, out))
        return outputs

    for status, out in clients("before"):
        assert status == 0, out
        assert "5 of 5 packets answered with a correct hash" in out
        assert out.count(f"(via {proxies['p1']}:2100)") == 5  # the first proxy answered

    # A client whose packets are at p1 when p1's link goes down: p1 is stopped, so the
    # kernel accepts the connection and takes the frames but nothing answers them.
    started["p1"].signal(signal.SIGSTOP)
    stranded_file = write_packets(tmp_path, "stranded.json", [
        {"type": 0, "srcid": "9", "privPoliId": "111", "payload": f"stranded {k}"}
        for k in range(5)])
    stranded = subprocess.Popen(
        network.command("c", "client.py", "-id", 9, "-revproc", both, "-pkt", stranded_file,
                        "-timeout", 2, "-connect-timeout", 1),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + WAIT
    while f"{client}:" not in subprocess.run(
            [IP, "netns", "exec", network.hosts["p1"], "ss", "-tnH", "( sport = :2100 )"],
            capture_output=True, text=True, timeout=WAIT).stdout:
        assert time.monotonic() < deadline, "the client never connected to p1"
        time.sleep(0.02)  # polling the kernel's table, bounded

    # p1's link goes down: clients move to p2, every packet answered exactly once.
    cut_at = time.monotonic()
    network.cut("p1")
    started["p1"].signal(signal.SIGCONT)
    out, _ = stranded.communicate(timeout=4 * WAIT)
    assert stranded.returncode == 0, out
    assert out.count("Hash of payload is correct") == 5
    assert out.count(f"(via {proxies['p2']}:2100)") == 5
    assert (f"no answer from the reverse proxy at {proxies['p1']}:2100 within 2 s "
            f"(-timeout); sending the 5 packets not answered through the next") in out
    for status, out in clients("during"):
        assert status == 0, out
        assert "5 of 5 packets answered with a correct hash" in out
        assert out.count("Hash of payload is correct") == 5  # each exactly once
        assert out.count(f"(via {proxies['p2']}:2100)") == 5
        assert f"cannot reach the reverse proxy at {proxies['p1']}:2100: timed out" in out
    # The servers' sessions to p1 time out (3 heartbeats without PONG).
    for sid in servers:
        started[sid].wait_for(rf"Lost the session with the reverse proxy at "
                              rf"{re.escape(proxies['p1'])}:2100", timeout=WAIT)
    # The link comes back: every server registers with p1 again within a few seconds.
    mended_at = time.monotonic()
    network.mend("p1")
    marks = {sid: len(started["p1"].lines) for sid in servers}
    for sid in servers:
        started["p1"].wait_for(rf"Received setup message from server id {sid} ",
                               start=marks[sid], timeout=WAIT)
    print(f"re-registered with p1 within {time.monotonic() - mended_at:.2f} s of the "
          f"link coming back (cut for {mended_at - cut_at:.2f} s)")
    for status, out in clients("after"):
        assert status == 0, out
