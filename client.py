"""Client: sends the packets of a file through the reverse proxy and checks each hash.

    python client.py -id ID -revproc RPPORT -pkt PKTFILE
    python client.py -id ID -revproc RPPORT -pkt PKTFILE -bench SECONDS
                     [-conns N] [-depth N] [-size BYTES] [-idle N] [-json]

PKTFILE holds one packet (a JSON object), a JSON array of packets, or one packet per
line (JSON lines), in the format of the course assignment::

    {"type": "0", "srcid": "1", "privPoliId": "111", "payload": "xyz1"}

Every packet is sent over one connection, pipelined (PROTOCOL.md section 3): up to
``WINDOW`` frames go out ahead of their answers, which come back in order; after the
last frame the client half-closes (over plain TCP). One thread does both, because an
``ssl.SSLSocket`` must not be read and written from two threads at once. The
``srcid`` of every packet is this client's ``-id``.

With several proxies (``-revproc A,B``) it uses the first that accepts the connection:
one that cannot be reached within ``-connect-timeout``, or whose first answer is its
refusal (OVERLOADED: ``-max-conns`` reached), is skipped. When that connection fails
before the last answer (closed, reset, silent or taking no bytes for ``-timeout``), the
packets not answered yet go through the next proxy.

With ``-bench SECONDS`` it is a load generator instead (``loadgen.py``): random
payloads for the policies of the packet file, every hash checked, a progress line
each second and a summary at the end.

Exit status (section 5): 0 when every answer is an ACK with the right SHA-1; 1 for
an ERROR answer, a wrong hash, or a proxy that cannot be reached, drops the
connection or stays silent past ``-timeout``; 2 for a usage error, including a
packet file that cannot be read or holds no valid packet.
"""

import argparse
import json
import random
import socket

import cli
import loadgen
import netio
import protocol
from protocol import MessageType, show


# Frames sent ahead of their answers. Enough to keep the proxy busy; few enough that
# the answers waiting to be read always fit in the socket buffers.
WINDOW = 32


class ExchangeFailed(Exception):
    """The connection to a proxy failed before every packet was answered.

    Attributes:
        answered: how many packets, from the first, got an answer before it failed.
        correct: how many of those answers were ACKs with the right hash.
        reason: one line saying how it failed, for the proxy named in it.
    """

    def __init__(self, reason, answered, correct):
        super().__init__(reason)
        self.reason = reason
        self.answered = answered
        self.correct = correct


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


def exchange(conn, packets, timeout, out, where, via=""):
    """Send ``packets`` pipelined on ``conn`` and check every answer.

    Args:
        conn: a ``netio.Connection`` to the proxy, whose ``send_timeout`` is
            ``timeout``.
        packets: DATA messages.
        timeout: seconds the proxy may stay silent while answers are owed, or take
            no bytes of the packets sent.
        out: ``f(line, event)`` that prints one line (``cli.say``; ``event`` a
            ``cli.event(...)``).
        where: the proxy's ``host:port``, for the failure's text.
        via: text added to each answer's line (which proxy answered), or "".

    Returns:
        int: how many answers were ACKs with the right hash.

    Raises:
        ExchangeFailed: the proxy did not accept the connection (its refusal, see
            ``loadgen.refusal``), closed or reset it, stayed silent or took nothing for
            ``timeout`` seconds, or sent what is not an answer, before the last
            answer.
    """
    correct = sent = index = 0
    try:
        for index, packet in enumerate(packets):
            while sent < len(packets) and sent - index < WINDOW:
                conn.send(packets[sent])
                sent += 1
                if sent == len(packets):
                    conn.half_close()
            answer = conn.receive(idle_timeout=timeout, frame_timeout=timeout)
            if answer is None:
                raise ExchangeFailed(f"the reverse proxy at {where} closed the connection "
                                     f"after {index} of {len(packets)} answers"
                                     f"{tls_hint(conn)}", index, correct)
            refused = loadgen.refusal(answer) if index == 0 else None
            if refused:
                raise ExchangeFailed(f"the reverse proxy at {where} did not accept the "
                                     f"connection: {refused}", 0, 0)
            correct += report(answer, packet, out, where, via)
    except netio.ConnectionTimeout:
        reason = f"no answer from the reverse proxy at {where} within {timeout:g} s (-timeout)"
    except socket.timeout:  # after ConnectionTimeout, a TimeoutError too (3.10+)
        reason = (f"the reverse proxy at {where} took no bytes of the packets for "
                  f"{timeout:g} s (-timeout)")
    except protocol.ProtocolError as exc:
        reason = f"bad answer from the reverse proxy at {where}: {exc}{tls_hint(conn)}"
    except OSError as exc:
        # A proxy that refuses the connection closes it at once: the packets sent
        # meanwhile meet a reset, and its refusal may be waiting to be read.
        refused = pending_refusal(conn) if index == 0 else None
        if refused:
            reason = f"the reverse proxy at {where} did not accept the connection: {refused}"
        elif isinstance(exc, BrokenPipeError):
            # The socket's EPIPE: a closed stdout never gets here (cli ends the program).
            reason = (f"the reverse proxy at {where} closed the connection before every "
                      f"packet was sent{tls_hint(conn)}")
        else:
            reason = (f"connection to the reverse proxy at {where} failed: "
                      f"{netio.describe_error(exc)}{tls_hint(conn)}")
    else:
        return correct
    raise ExchangeFailed(reason, index, correct)


def pending_refusal(conn):
    """The refusal (see ``loadgen.refusal``) that ``conn`` has received and not read
    yet, taken without waiting, or None. Never raises."""
    try:
        answer = conn.receive(deadline=netio.Deadline(0))
    except (netio.ConnectionTimeout, protocol.ProtocolError, OSError):
        return None
    return None if answer is None else loadgen.refusal(answer)


def tls_hint(conn):
    """What to try when ``conn`` ended badly: ``loadgen.TLS_HINT`` when it is plain
    TCP and what the proxy sent suggests a TLS server (``netio.may_speak_tls``),
    else ""."""
    return "" if conn.tls or not netio.may_speak_tls(conn.head) else loadgen.TLS_HINT


def report(answer, packet, out, where, via):
    """Print the lines of one answer to ``packet``, which came through the proxy at
    ``where`` (``via`` says so in the text lines when there are several); return 1 if
    it is the right ACK."""
    if answer["type"] == MessageType.ACK:
        expected = protocol.sha1_hex(packet["payload"])
        server, received = answer["srcid"], show(answer["payload"])
        out(f"Receiving a response from the server {show(server)} payload: {received}{via}",
            cli.event("answer", server=server, payload=received, proxy=where))
        if answer["payload"] == expected:
            out("Hash of payload is correct",
                cli.event("verified", server=server, payload=received, proxy=where))
            return 1
        out(f"Hash of payload is NOT correct: expected {expected}",
            cli.event("wrong_hash", server=server, payload=received, expected=expected,
                      proxy=where))
    elif answer["type"] == MessageType.ERROR:
        out(f"Error from the reverse proxy for payload {show(packet['payload'])}: "
            f"{answer['code']}: {answer['message']}{via}",
            cli.event("error_answer", code=answer["code"], error=answer["message"],
                      payload=show(packet["payload"]), proxy=where))
    else:
        out(f"Unexpected {answer['type'].name} message from the reverse proxy instead "
            f"of the answer for payload {show(packet['payload'])}{via}",
            cli.event("unexpected", type=answer["type"].name,
                      payload=show(packet["payload"]), proxy=where))
    return 0


def send_through(proxies, packets, args, tls):
    """Send ``packets`` through the first proxy of ``proxies`` (a list of ``(host,
    port)``) that accepts the connection; when that connection fails before every
    packet is answered, send the packets not answered yet through the next proxy
    (safe: an answer is a hash). Each packet is answered once in the output.

    A proxy accepts when the TCP connection (and the TLS handshake) succeeds within
    ``-connect-timeout`` and its first answer is not a refusal (``loadgen.refusal``).
    The ``Sending message`` lines are printed once the connection is open, naming
    the proxy it goes to.

    Returns:
        (correct, failures): how many answers were right, and one line per proxy
        that could not be reached or failed (the empty list when every packet was
        answered).
    """
    several = len(proxies) > 1
    correct, failures, remaining = 0, [], list(packets)
    for host, port in proxies:
        where = netio.format_address((host, port))
        try:
            conn = netio.connect(host, port, args.connect_timeout, args.max_frame, tls,
                                 send_timeout=args.timeout)
        except OSError as exc:
            failures.append(f"cannot reach the reverse proxy at {where}: "
                            f"{netio.describe_error(exc)}")
        else:
            # The assignment's wording names the port of a proxy on this machine.
            running_on = f"port {port}" if not several and host == "127.0.0.1" else where
            for packet in remaining:
                cli.say(f"Sending message {show(packet['payload'])} to privacy policy "
                        f"{show(packet['privPoliId'])} through reverse proxy running on "
                        f"{running_on}",
                        cli.event("sent", payload=show(packet["payload"]),
                                  policy=packet["privPoliId"], proxy=where))
            try:
                correct += exchange(conn, remaining, args.timeout, cli.say, where,
                                    f" (via {where})" if several else "")
                return correct, []
            except ExchangeFailed as exc:
                correct += exc.correct
                remaining = remaining[exc.answered:]
                failures.append(exc.reason)
            finally:
                conn.close()
        if several and (host, port) != proxies[-1]:
            count = len(remaining)
            cli.say(f"{failures[-1]}; sending the {count} packet{'s' if count != 1 else ''} "
                    "not answered through the next reverse proxy",
                    cli.event("failover", proxy=where, reason=failures[-1], packets=count))
    return correct, failures


def arg_idle(text):
    """A whole number of connections, 0 or more."""
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of at least 0")
    return int(text)


# The options of the load mode, each with its default, for the check that they come
# with -bench and for filling in what was not given.
BENCH_OPTIONS = {"conns": loadgen.BENCH_CONNS, "depth": loadgen.BENCH_DEPTH, "size": loadgen.BENCH_SIZE, "idle": 0}


def build_parser():
    parser = cli.ArgumentParser(
        "Client: sends the packets of a JSON file through the reverse proxy and checks "
        "that each answer carries the SHA-1 of its payload (PROTOCOL.md). With -bench, "
        "a load generator instead: random payloads for the policies of the file, every "
        "hash checked, a progress line each second and a summary at the end.")
    parser.add_argument("-id", required=True, type=cli.arg_id,
                        help="this client's id (the srcid it sends)")
    parser.add_argument("-revproc", type=cli.arg_hostports, default=[("127.0.0.1", 2100)],
                        metavar="RPPORT", help="the reverse proxy: PORT or HOST:PORT, "
                        "IPv6 as [ADDR]:PORT (default: 2100); several, comma-separated: "
                        "the first that accepts the connection is used, and the packets "
                        "it leaves unanswered go through the next; in the load mode the "
                        "connections are spread over them round robin")
    parser.add_argument("-pkt", required=True, metavar="PKTFILE",
                        help="JSON file: one packet, an array of packets, or JSON lines")
    parser.add_argument("-timeout", type=cli.arg_seconds, default=10.0, metavar="SECONDS",
                        help="time a proxy may stay silent while answers are owed (then "
                        "the next proxy, if any, gets the rest); with -bench, for "
                        "opening each connection and for each answer")
    parser.add_argument("-connect-timeout", type=cli.arg_seconds, default=2.0,
                        metavar="SECONDS",
                        help="time a proxy may take to accept the connection; one that "
                        "does not counts as down (an unplugged host answers nothing)")
    parser.add_argument("-max-frame", type=cli.arg_frame_size, default=protocol.DEFAULT_MAX_FRAME,
                        metavar="BYTES", help="largest answer frame accepted; with -bench, "
                        "also the largest DATA frame built")
    parser.add_tls_options(None, "CA (PEM) that checks the proxy: connect over TLS")
    parser.add_output_options()
    load = parser.add_argument_group(
        "load mode", "Send random payloads for SECONDS through a closed loop of connections "
        "(exit 1 if any answer is wrong or missing). The packet file gives the policies; "
        "its payloads are not sent.")
    load.add_argument("-bench", type=cli.arg_seconds, metavar="SECONDS",
                      help="run the load for this long")
    load.add_argument("-conns", type=cli.arg_count, metavar="N",
                      help=f"connections that send (default: {loadgen.BENCH_CONNS})")
    load.add_argument("-depth", type=cli.arg_count, metavar="N",
                      help=f"DATA frames in flight on each of them (default: {loadgen.BENCH_DEPTH})")
    load.add_argument("-size", type=cli.arg_count, metavar="BYTES",
                      help=f"UTF-8 bytes of each payload (default: {loadgen.BENCH_SIZE})")
    load.add_argument("-idle", type=arg_idle, metavar="N",
                      help="more connections, opened first and held open without "
                      "sending (default: 0)")
    load.add_argument("-json", action="store_true",
                      help="print the summary as one JSON object (the last line)")
    return parser


def run_bench(args, packets, tls, parser):
    """The load mode: check its options, run the load, print the summary.

    Returns:
        int: the exit status, 0 when every answer was right, else 1. A usage error
        exits 2 through ``parser``.
    """
    for name, default in BENCH_OPTIONS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    policies = list(dict.fromkeys(packet["privPoliId"] for packet in packets))
    overhead = max(len(protocol.encode_frame(protocol.data(args.id, policy, ""))) - 4
                   for policy in policies)
    if args.size + overhead > args.max_frame:
        parser.error(f"argument -size: a {args.size}-byte payload makes a DATA frame of "
                     f"{args.size + overhead} bytes, above -max-frame {args.max_frame}")
    payloads = loadgen.make_payloads(args.size, max(1, min(loadgen.POOL_COUNT, loadgen.POOL_BYTES // args.size)),
                             random.Random())
    frames, hashes = loadgen.bench_frames(args.id, policies, payloads)

    out, err = cli.say, cli.print_error
    generator = loadgen.LoadGenerator(frames, hashes, args.size, args.id, args.depth, args.timeout,
                              args.max_frame, out, err)
    try:
        opened = generator.open(args.revproc, args.conns, args.idle, tls)
        where = ",".join(netio.format_address(address) for address in opened)
        skipped = "; ".join(f"{netio.format_address(address)} skipped: {why}"
                            for address, why in generator.skipped.items())
        # Printed once every connection is open: the load starts now.
        out(f"load: {args.conns} connections x {args.depth} in flight"
            f"{f' (+{args.idle} idle)' if args.idle else ''}, {args.size}-byte payloads, "
            f"privacy policy {', '.join(show(p) for p in policies)}, {args.bench:g} s, "
            f"to {where}{f' ({skipped})' if skipped else ''}{' over TLS' if tls else ''}")
        summary = generator.run(args.bench)
    except loadgen.BenchError as exc:
        err(f"client.py: {exc}")
        return 1
    finally:
        generator.close()
    if args.json:
        out(json.dumps({"conns": args.conns, "depth": args.depth, "size": args.size,
                        "idle": args.idle, **summary}))
    else:
        for line in loadgen.summary_lines(summary):
            out(line)
    return 0 if summary["errors"] == 0 and summary["packets"] > 0 else 1


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.setup_output(args, background=False)
    if args.bench is None:
        given = [name for name in [*BENCH_OPTIONS, "json"] if getattr(args, name)
                 not in (None, False)]
        if given:
            parser.error(f"argument -{given[0]}: only with -bench")
    try:
        packets = load_packets(args.pkt, args.id)
    except PacketFileError as exc:
        parser.error(f"argument -pkt: {exc}")
    try:
        tls = netio.client_tls_context(args.tls_ca) if args.tls_ca else None
    except (OSError, ValueError) as exc:
        parser.error(f"cannot load -tls-ca: {netio.describe_error(exc)}")
    if args.bench is not None:
        return run_bench(args, packets, tls, parser)

    correct, failures = send_through(args.revproc, packets, args, tls)
    if failures:
        cli.print_error("client.py: " + ("; ".join(failures) if len(failures) > 1
                                         else failures[0]))
        return 1
    if len(packets) > 1:
        cli.say(f"{correct} of {len(packets)} packets answered with a correct hash",
                cli.event("summary", correct=correct, packets=len(packets)))
    return 0 if correct == len(packets) else 1


if __name__ == "__main__":
    cli.run(main)
