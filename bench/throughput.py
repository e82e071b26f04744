"""Throughput, latency and memory of the reverse proxy, against a direct baseline.

    python3 bench/throughput.py [--clients 8] [--packets 2000] [--servers 3]

Starts reverse_proxy.py -quiet and N server.py -quiet on 127.0.0.1 (port 0), then
runs client threads that each send their packets pipelined over one connection
(a window of 32 in flight) and time each answer. The same load is then sent straight
to one server, which bounds what any proxy in Python could do here. Prints packets
per second, latency percentiles, the ratio proxy / direct, the servers' share of the
packets and the proxy's resident memory and thread count afterwards (from /proc).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import netio  # noqa: E402
import protocol  # noqa: E402

WINDOW = 32  # frames in flight per client connection


def start(*args, ready):
    """Start a program; return (process, matches of each pattern of ``ready``, waited
    for in order)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    matches = []
    for line in proc.stdout:
        match = re.search(ready[len(matches)], line)
        if match:
            matches.append(match)
            if len(matches) == len(ready):
                threading.Thread(target=proc.stdout.read, daemon=True).start()
                return proc, matches
    sys.exit(f"bench: {args[0]} exited before printing {ready[len(matches)]!r}")


def client(port, client_id, count, latencies, servers):
    conn = netio.connect("127.0.0.1", port, 10)
    sent_at = []
    frames = [protocol.encode_frame(protocol.data(client_id, "111", f"payload {client_id} {i}"))
              for i in range(count)]
    received = 0
    while received < count:
        while len(sent_at) < count and len(sent_at) - received < WINDOW:
            sent_at.append(time.perf_counter())
            conn.sock.sendall(frames[len(sent_at) - 1])
        answer = conn.receive(deadline=time.monotonic() + 10)
        if answer is None or answer["type"] != protocol.MessageType.ACK:
            sys.exit(f"bench: bad answer {answer}")
        latencies.append(time.perf_counter() - sent_at[received])
        servers[answer["srcid"]] = servers.get(answer["srcid"], 0) + 1
        received += 1
    conn.close()


def load(port, clients, packets):
    latencies, servers = [], {}
    threads = [threading.Thread(target=client, args=(port, str(i), packets, latencies, servers))
               for i in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    return clients * packets / elapsed, sorted(latencies), servers


def proc_status(pid):
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return fields["VmRSS"].strip(), fields["Threads"].strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--packets", type=int, default=2000, help="per client")
    parser.add_argument("--servers", type=int, default=3)
    args = parser.parse_args()
    procs = []
    try:
        proxy, (match,) = start("reverse_proxy.py", "-port", "0", "-quiet",
                                ready=[r"reverse proxy on port (\d+)"])
        procs.append(proxy)
        proxy_port = int(match.group(1))
        server_ports = []
        for i in range(args.servers):
            server, (match, _) = start(
                "server.py", "-id", str(100 + i), "-pp", "111", "-listen", "0",
                "-revproc", str(proxy_port), "-quiet",
                ready=[r"Listening on port (\d+)", r"Registered with the reverse proxy"])
            procs.append(server)
            server_ports.append(int(match.group(1)))
        total = args.clients * args.packets
        print(f"load: {args.clients} clients x {args.packets} packets pipelined "
              f"(window {WINDOW}), {args.servers} servers, payload ~16 bytes")
        results = {}
        for name, port in (("direct to one server", server_ports[0]),
                           ("through the proxy", proxy_port)):
            rate, latencies, servers = load(port, args.clients, args.packets)
            results[name] = rate
            p50 = statistics.median(latencies) * 1000
            p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
            print(f"{name:22} {rate:9.0f} packets/s   latency p50 {p50:6.2f} ms  "
                  f"p99 {p99:6.2f} ms   answered by {dict(sorted(servers.items()))}")
            assert sum(servers.values()) == total
        print(f"ratio proxy / direct: {results['through the proxy'] / results['direct to one server']:.2f}")
        rss, threads = proc_status(proxy.pid)
        print(f"proxy after the load: resident memory {rss}, {threads} threads")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


if __name__ == "__main__":
    main()
