"""Bare byte relay: the ceiling of a proxy written in Python, for bench/compare.py.

    python3 bench/relay.py -port PORT -upstream RPPORT,RPPORT[,...]

Each accepted connection is joined to one upstream server, picked round robin per
connection, and two threads splice bytes between them, one per direction, with no
parsing at all: it does not know frames, policies or hashes. What a proxy that parses
frames in Python spends beyond this relay is the price of parsing and routing.

It prints ``Running the relay on port N`` when it listens (PORT 0 picks a free
port), and runs until SIGTERM or Ctrl-C.
"""

import itertools
import os
import signal
import socket
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402
import netio  # noqa: E402
import protocol  # noqa: E402

# Listen backlog: 1,024, so that a load opening 1,000 connections one after another
# never waits on a dropped SYN (netio.FramedServer takes 128, HAProxy's default is
# its maxconn).
BACKLOG = 1024
# Seconds to connect to an upstream server: HAProxy's `timeout connect` as commonly
# set (5 s); on 127.0.0.1 it takes microseconds.
CONNECT_TIMEOUT = 5.0


def splice(source, sink, done):
    """Copy bytes from ``source`` to ``sink`` until the end of the stream or an error,
    then pass the end on (a half-close) and call ``done()``."""
    try:
        while True:
            chunk = source.recv(netio.RECV_SIZE)
            if not chunk:
                break
            sink.sendall(chunk)
    except OSError:
        pass
    try:
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    done()


def relay(client, upstream_address):
    """Join ``client`` (a connected socket) to a new connection to
    ``upstream_address`` with two splicing threads; both sockets close when both
    directions have ended. A refused upstream closes the client at once."""
    try:
        upstream = socket.create_connection(upstream_address, timeout=CONNECT_TIMEOUT)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    for sock in (client, upstream):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ends = []
    lock = threading.Lock()

    def done():
        with lock:
            ends.append(True)
            last = len(ends) == 2
        if last:
            client.close()
            upstream.close()

    for source, sink in ((client, upstream), (upstream, client)):
        threading.Thread(target=splice, args=(source, sink, done), daemon=True).start()


def main(argv=None):
    parser = cli.ArgumentParser("Bare byte relay: splices each connection to an "
                                "upstream server picked round robin, no parsing.")
    parser.add_argument("-port", type=cli.arg_port, default=0,
                        help="port to listen on, on 127.0.0.1; 0 picks a free port")
    parser.add_argument("-upstream", required=True, metavar="RPPORT,RPPORT",
                        help="the upstream servers: PORT or HOST:PORT, comma-separated")
    args = parser.parse_args(argv)
    try:
        upstreams = [protocol.parse_hostport(part) for part in args.upstream.split(",")]
    except ValueError as exc:
        parser.error(f"argument -upstream: {exc}")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        listener = socket.create_server(("127.0.0.1", args.port), backlog=BACKLOG)
    except OSError as exc:
        parser.exit_cannot_listen("127.0.0.1", args.port, exc)
    print(f"Running the relay on port {listener.getsockname()[1]}", flush=True)
    try:
        for turn in itertools.count():
            client, _ = listener.accept()
            relay(client, upstreams[turn % len(upstreams)])
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
