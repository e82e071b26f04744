"""Client: sends the packets of a file through the reverse proxy and checks each hash.

    python client.py -id ID -revproc RPPORT -pkt PKTFILE

PKTFILE holds one packet (a JSON object), a JSON array of packets, or one packet per
line (JSON lines), in the format of the course assignment::

    {"type": "0", "srcid": "1", "privPoliId": "111", "payload": "xyz1"}

Every packet is sent over one connection, pipelined (PROTOCOL.md section 3): up to
``WINDOW`` frames go out ahead of their answers, which come back in order; after the
last frame the client half-closes (over plain TCP). One thread does both, because an
``ssl.SSLSocket`` must not be read and written from two threads at once. The
``srcid`` of every packet is this client's ``-id``.

Exit status (section 5): 0 when every answer is an ACK with the right SHA-1; 1 for
an ERROR answer, a wrong hash, or a proxy that cannot be reached, drops the
connection or stays silent past ``-timeout``; 2 for a usage error, including a
packet file that cannot be read or holds no valid packet.
"""

import json
import sys
import time

import netio
import protocol
from protocol import MessageType, show


# Frames sent ahead of their answers. Enough to keep the proxy busy; few enough that
# the answers waiting to be read always fit in the socket buffers.
WINDOW = 32


class ProxyClosed(Exception):
    """The proxy closed the connection before every answer came."""


class PacketFileError(ValueError):
    """The packet file cannot be read or is not valid; the text names file and place."""


def parse_packets(text, name="packet file", srcid=None):
    """Parse the text of a packet file into validated DATA messages.

    Args:
        text: one JSON object, a JSON array of objects, or JSON lines.
        name: the file's name, for error messages.
        srcid: when given, the ``srcid`` set on every packet (the client's ``-id``).

    Returns:
        list of dict: DATA messages (``protocol.validate_message``), at least one.

    Raises:
        PacketFileError: not JSON, not packets, or a packet that is not valid DATA.
    """
    try:
        document = json.loads(text)
    except RecursionError:
        raise PacketFileError(f"{name} is JSON nested too deeply") from None
    except ValueError:
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append((f"line {number}", json.loads(line)))
                except (ValueError, RecursionError) as exc:
                    raise PacketFileError(f"{name} line {number} is not JSON: {exc}") from None
    else:
        items = document if isinstance(document, list) else [document]
        entries = [(f"packet {number}", packet) for number, packet in enumerate(items, 1)]
    if not entries:
        raise PacketFileError(f"{name} holds no packet")
    for place, packet in entries:
        if isinstance(packet, dict):
            if srcid is not None:
                packet["srcid"] = srcid
            kind = packet.get("type", 0)
            if isinstance(kind, bool) or kind not in (0, "0"):
                raise PacketFileError(f"{name} {place}: only DATA packets (type 0) can be "
                                      f"sent, not type {show(kind)}")
        try:
            protocol.validate_message(packet)
        except protocol.MessageError as exc:
            raise PacketFileError(f"{name} {place}: {exc.message}") from None
    return [packet for place, packet in entries]


def load_packets(path, srcid=None):
    """Read and parse a packet file (see ``parse_packets``).

    Raises:
        PacketFileError: the file cannot be read, or see ``parse_packets``.
    """
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        raise PacketFileError(f"cannot read packet file '{path}': {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PacketFileError(f"packet file '{path}' is not UTF-8 text") from None
    return parse_packets(text, f"packet file '{path}'", srcid)


def exchange(conn, packets, timeout, out):
    """Send ``packets`` pipelined on ``conn`` and check every answer.

    Args:
        conn: a ``netio.Connection`` to the proxy.
        packets: DATA messages.
        timeout: seconds for the whole exchange.
        out: ``f(line)`` that prints one line.

    Returns:
        int: how many answers were ACKs with the right hash.

    Raises:
        ProxyClosed: the proxy closed the connection before answering them all.
        netio.ConnectionTimeout: ``timeout`` ran out first.
        protocol.ProtocolError, OSError: the proxy's answers could not be read.
    """
    deadline = time.monotonic() + timeout
    correct = sent = 0
    for index, packet in enumerate(packets):
        while sent < len(packets) and sent - index < WINDOW:
            conn.send(packets[sent])
            sent += 1
            if sent == len(packets):
                conn.half_close()
        answer = conn.receive(deadline=deadline)
        if answer is None:
            raise ProxyClosed(f"the reverse proxy closed the connection after {index} "
                              f"of {len(packets)} answers")
        if answer["type"] == MessageType.ACK:
            expected = protocol.sha1_hex(packet["payload"])
            out(f"Receiving a response from the server {show(answer['srcid'])} payload: "
                f"{show(answer['payload'])}")
            if answer["payload"] == expected:
                out("Hash of payload is correct")
                correct += 1
            else:
                out(f"Hash of payload is NOT correct: expected {expected}")
        elif answer["type"] == MessageType.ERROR:
            out(f"Error from the reverse proxy for payload {show(packet['payload'])}: "
                f"{answer['code']}: {answer['message']}")
        else:
            out(f"Unexpected {answer['type'].name} message from the reverse proxy instead "
                f"of the answer for payload {show(packet['payload'])}")
    return correct


def build_parser():
    parser = netio.ArgumentParser(
        "Client: sends the packets of a JSON file through the reverse proxy and checks "
        "that each answer carries the SHA-1 of its payload (PROTOCOL.md).")
    parser.add_argument("-id", required=True, type=netio.arg_id,
                        help="this client's id (the srcid it sends)")
    parser.add_argument("-revproc", type=netio.arg_hostport, default=("127.0.0.1", 2100),
                        metavar="RPPORT", help="the reverse proxy: PORT or HOST:PORT "
                        "(default: 2100)")
    parser.add_argument("-pkt", required=True, metavar="PKTFILE",
                        help="JSON file: one packet, an array of packets, or JSON lines")
    parser.add_argument("-timeout", type=netio.arg_seconds, default=10.0, metavar="SECONDS",
                        help="time allowed for connecting and for all the answers")
    parser.add_argument("-max-frame", type=netio.arg_count, default=protocol.DEFAULT_MAX_FRAME,
                        metavar="BYTES", help="largest answer frame accepted")
    parser.add_tls_options(None, "CA (PEM) that checks the proxy: connect over TLS")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        packets = load_packets(args.pkt, args.id)
    except PacketFileError as exc:
        parser.error(f"argument -pkt: {exc}")
    try:
        tls = netio.client_tls_context(args.tls_ca) if args.tls_ca else None
    except (OSError, ValueError) as exc:
        parser.error(f"cannot load -tls-ca: {netio.describe_error(exc)}")

    def out(line):
        print(line, flush=True)

    host, port = args.revproc
    where = netio.format_address((host, port))
    running_on = f"port {port}" if host == "127.0.0.1" else f"{where}"
    for packet in packets:
        out(f"Sending message {show(packet['payload'])} to privacy policy "
            f"{show(packet['privPoliId'])} through reverse proxy running on {running_on}")
    try:
        conn = netio.connect(host, port, args.timeout, args.max_frame, tls)
    except OSError as exc:
        print(f"client.py: cannot reach the reverse proxy at {where}: "
              f"{netio.describe_error(exc)}", file=sys.stderr)
        return 1
    tls_hint = "" if tls else " (a proxy that serves TLS needs -tls-ca)"
    try:
        correct = exchange(conn, packets, args.timeout, out)
    except netio.ConnectionTimeout:
        print(f"client.py: no answer from the reverse proxy at {where} within "
              f"{args.timeout:g} s (-timeout)", file=sys.stderr)
        return 1
    except ProxyClosed as exc:
        print(f"client.py: {exc}{tls_hint}", file=sys.stderr)
        return 1
    except protocol.ProtocolError as exc:
        print(f"client.py: bad answer from the reverse proxy at {where}: {exc}",
              file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"client.py: connection to the reverse proxy at {where} failed: "
              f"{netio.describe_error(exc)}{tls_hint}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    if len(packets) > 1:
        out(f"{correct} of {len(packets)} packets answered with a correct hash")
    return 0 if correct == len(packets) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
