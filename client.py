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

Load mode (``-bench``), for measuring a deployment as ``redis-benchmark`` measures
Redis: a closed loop in which each of ``-conns`` connections keeps ``-depth`` DATA
frames in flight for ``SECONDS`` seconds, with random UTF-8 payloads of ``-size``
bytes for the policies of the packet file (its payloads are not used); ``-idle``
more connections are opened and held open, silent. It must leave the CPU to the
programs it measures, so:

* one thread drives every connection through a ``selectors`` loop over non-blocking
  sockets, TCP or TLS;
* the frames a connection is owed go out in one ``send``;
* the payloads, their frames and their SHA-1 are made once, in advance, as a pool;
  each answer is still compared with the hash of its own payload. Answers come back
  in order (section 3), so the n-th answer on a connection is for its n-th frame.

It prints a progress line each second, a summary at the end (text, or one JSON
object with ``-json``), and counts as errors every wrong hash, ERROR answer, answer
it cannot read, and answer missing (a connection closed, or no answer within
``-timeout``).

Exit status (section 5): 0 when every answer is an ACK with the right SHA-1; 1 for
an ERROR answer, a wrong hash, or a proxy that cannot be reached, drops the
connection or stays silent past ``-timeout``; 2 for a usage error, including a
packet file that cannot be read or holds no valid packet.
"""

import argparse
import collections
import json
import math
import random
import resource
import selectors
import ssl
import string
import time

import cli
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
        conn: a ``netio.Connection`` to the proxy.
        packets: DATA messages.
        timeout: seconds the proxy may stay silent while answers are owed.
        out: ``f(line, event)`` that prints one line (``cli.say``; ``event`` a
            ``cli.event(...)``).
        where: the proxy's ``host:port``, for the failure's text.
        via: text added to each answer's line (which proxy answered), or "".

    Returns:
        int: how many answers were ACKs with the right hash.

    Raises:
        ExchangeFailed: the proxy closed or reset the connection, stayed silent for
            ``timeout`` seconds or sent what is not an answer, before the last answer.
    """
    correct = sent = index = 0
    tls_hint = "" if isinstance(conn.sock, ssl.SSLSocket) else (
        " (a proxy that serves TLS needs -tls-ca)")
    try:
        for index, packet in enumerate(packets):
            while sent < len(packets) and sent - index < WINDOW:
                conn.send(packets[sent])
                sent += 1
                if sent == len(packets):
                    conn.half_close()
            answer = conn.receive(idle_timeout=timeout)
            if answer is None:
                raise ExchangeFailed(f"the reverse proxy at {where} closed the connection "
                                     f"after {index} of {len(packets)} answers{tls_hint}",
                                     index, correct)
            correct += report(answer, packet, out, via)
    except netio.ConnectionTimeout:
        reason = f"no answer from the reverse proxy at {where} within {timeout:g} s (-timeout)"
    except protocol.ProtocolError as exc:
        reason = f"bad answer from the reverse proxy at {where}: {exc}"
    except BrokenPipeError:
        # The socket's EPIPE: a closed stdout never gets here (cli ends the program).
        reason = (f"the reverse proxy at {where} closed the connection before every "
                  f"packet was sent{tls_hint}")
    except OSError as exc:
        reason = (f"connection to the reverse proxy at {where} failed: "
                  f"{netio.describe_error(exc)}{tls_hint}")
    else:
        return correct
    raise ExchangeFailed(reason, index, correct)


def report(answer, packet, out, via):
    """Print the lines of one answer to ``packet``; return 1 if it is the right ACK."""
    if answer["type"] == MessageType.ACK:
        expected = protocol.sha1_hex(packet["payload"])
        server, received = answer["srcid"], show(answer["payload"])
        out(f"Receiving a response from the server {show(server)} payload: {received}{via}",
            cli.event("answer", server=server, payload=received))
        if answer["payload"] == expected:
            out("Hash of payload is correct",
                cli.event("verified", server=server, payload=received))
            return 1
        out(f"Hash of payload is NOT correct: expected {expected}",
            cli.event("wrong_hash", server=server, payload=received, expected=expected))
    elif answer["type"] == MessageType.ERROR:
        out(f"Error from the reverse proxy for payload {show(packet['payload'])}: "
            f"{answer['code']}: {answer['message']}{via}",
            cli.event("error_answer", code=answer["code"], error=answer["message"],
                      payload=show(packet["payload"])))
    else:
        out(f"Unexpected {answer['type'].name} message from the reverse proxy instead "
            f"of the answer for payload {show(packet['payload'])}{via}",
            cli.event("unexpected", type=answer["type"].name,
                      payload=show(packet["payload"])))
    return 0


def send_through(proxies, packets, args, tls):
    """Send ``packets`` through the first proxy of ``proxies`` (a list of ``(host,
    port)``) that accepts the connection; when that connection fails before every
    packet is answered, send the packets not answered yet through the next proxy
    (safe: an answer is a hash). Each packet is answered once in the output.

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
            conn = netio.connect(host, port, args.connect_timeout, args.max_frame, tls)
        except OSError as exc:
            failures.append(f"cannot reach the reverse proxy at {where}: "
                            f"{netio.describe_error(exc)}")
        else:
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
            cli.say(f"{failures[-1]}; sending the {len(remaining)} packets not answered "
                    "through the next reverse proxy",
                    cli.event("failover", proxy=where, reason=failures[-1],
                              packets=len(remaining)))
    return correct, failures


# --- Load mode (-bench) -----------------------------------------------------------

# Defaults of the load: the main load, 16 connections x 4 frames in flight
# with 64-byte payloads (redis-benchmark's are 50 clients, a pipeline of 1, 3-byte
# values).
BENCH_CONNS = 16
BENCH_DEPTH = 4
BENCH_SIZE = 64
# The payload pool: at most 1,024 payloads and 4 MiB, so that 64 KiB payloads still
# give 64 different ones and making the pool takes well under a second.
POOL_COUNT = 1024
POOL_BYTES = 4 << 20
# Characters of the random payloads: mostly ASCII, with 2-, 3- and 4-byte UTF-8
# characters so that every program's text handling is exercised, and none that JSON
# escapes (a payload of N bytes makes a frame of N bytes plus the same overhead).
PAYLOAD_CHARS = string.ascii_letters + string.digits + "    éßñ€中文✓😀"


class BenchError(Exception):
    """The load cannot run (a connection that cannot be opened, too few file
    descriptors); the text is one line naming the value at fault."""


class LatencyHistogram:
    """Latencies counted in buckets, for percentiles of any number of packets in
    bounded memory: HdrHistogram's scheme with three significant digits, exact up to
    2,048 µs, then 1,024 buckets per power of two (0.1 % wide).

    Attributes:
        count: latencies recorded (int).
        max: the largest, in microseconds (int).
    """

    _BITS = 10  # 2**_BITS buckets per power of two

    def __init__(self):
        self.counts = collections.Counter()
        self.count = 0
        self.max = 0

    def record(self, micros):
        """Add one latency, ``micros`` (int, microseconds, >= 0)."""
        shift = micros.bit_length() - self._BITS - 1
        bucket = micros if shift <= 0 else (shift << self._BITS) + (micros >> shift)
        self.counts[bucket] += 1
        self.count += 1
        if micros > self.max:
            self.max = micros

    def merge(self, other):
        """Add every latency of ``other`` (a LatencyHistogram) to this one."""
        self.counts.update(other.counts)
        self.count += other.count
        self.max = max(self.max, other.max)

    def percentile(self, fraction):
        """Return the latency (int, microseconds) that ``fraction`` (0 < f <= 1) of
        the recorded ones are at or below, to 0.1 %; ``max`` for 1; None when empty."""
        if not self.count:
            return None
        if fraction >= 1:
            return self.max
        # The 1e-9 keeps a product such as 0.07 x 100 = 7.000000000000001 at rank 7.
        rank = max(1, math.ceil(fraction * self.count - 1e-9))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                shift = max(0, (bucket >> self._BITS) - 1)
                return (bucket - (shift << self._BITS)) << shift
        return self.max


def make_payloads(size, count, rng):
    """Return ``count`` random texts (str) of exactly ``size`` UTF-8 bytes each.

    Args:
        size: bytes per payload, >= 1.
        count: payloads, >= 1.
        rng: a ``random.Random``.
    """
    payloads = []
    for _ in range(count):
        raw = "".join(rng.choices(PAYLOAD_CHARS, k=size)).encode("utf-8")[:size]
        text = raw.decode("utf-8", "ignore")  # drops a character cut in two
        payloads.append(text + "x" * (size - len(text.encode("utf-8"))))
    return payloads


def bench_frames(srcid, policies, payloads):
    """Encode the DATA frame of each payload, the policies taken in turn.

    Args:
        srcid: the client's id (str).
        policies: policy ids, at least one.
        payloads: str.

    Returns:
        (frames, hashes): the frames (bytes, PROTOCOL.md section 1) and the SHA-1 hex
        each one's ACK must carry (section 2), index for index.
    """
    frames = [protocol.encode_frame(protocol.data(srcid, policies[i % len(policies)], text))
              for i, text in enumerate(payloads)]
    return frames, [protocol.sha1_hex(text) for text in payloads]


def judge_answer(answer, expected_hash, srcid):
    """Judge one answer (a decoded JSON value) to a DATA frame.

    Returns:
        None when it is the ACK of section 2 for ``srcid`` with ``expected_hash``;
        else ``(kind, text)``: a short error kind for the summary (``"wrong hash"``,
        ``"ERROR NO_SERVER"``, ...) and one line that says what came.
    """
    if not isinstance(answer, dict):
        return "unreadable answer", f"an answer that is not a JSON object: {show(answer)}"
    kind = answer.get("type")
    if kind == MessageType.ERROR:
        code = show(answer.get("code"))
        return f"ERROR {code}", f"ERROR answer: {code}: {show(answer.get('message'), 200)}"
    if kind != MessageType.ACK or isinstance(kind, bool):
        return "unexpected answer", f"a message of type {show(kind)} instead of an ACK"
    if protocol.policy_text(answer.get("destid")) != srcid:
        return "ACK for another client", (f"an ACK for client {show(answer.get('destid'))} "
                                          f"instead of {show(srcid)}")
    if answer.get("payload") != expected_hash:
        return "wrong hash", (f"wrong hash from server {show(answer.get('srcid'))}: expected "
                              f"{expected_hash}, got {show(answer.get('payload'))}")
    return None


def _ms(millis):
    return "-" if millis is None else f"{millis:.2f} ms"


def progress_line(second, rate, histogram, errors):
    """The line printed each second: ``time 3 s  packets/s 41,230  p50 1.21 ms
    p99 3.40 ms  errors 0``; ``rate`` in packets/s, ``histogram`` the latencies of
    that second, ``errors`` counted since the start."""
    p50, p99 = (histogram.percentile(fraction) for fraction in (0.5, 0.99))
    return (f"time {second} s  packets/s {rate:,.0f}  p50 {_ms(p50 and p50 / 1000)}  "
            f"p99 {_ms(p99 and p99 / 1000)}  errors {errors:,}")


def summary_lines(summary):
    """The summary of a load as text lines; ``summary`` as ``LoadGenerator.run``
    returns it."""
    kinds = ", ".join(f"{count:,} {kind}" for kind, count in summary["error_kinds"].items())
    latency = "  ".join(f"{name} {_ms(summary[name + '_ms'])}"
                        for name in ("p50", "p90", "p99", "max"))
    return [
        f"packets {summary['packets']:,} answered correctly in {summary['seconds']:.2f} s: "
        f"{summary['packets_per_s']:,.0f} packets/s, "
        f"{summary['payload_bytes_per_s'] / 1e6:,.2f} MB/s of payload",
        f"latency {latency}",
        f"errors {summary['errors']:,}" + (f": {kinds}" if kinds else ""),
    ]


def raise_open_file_limit(needed):
    """Raise this process's soft limit of open files to ``needed`` when it is lower
    (1,000 connections pass the common soft limit of 1,024).

    Raises:
        BenchError: the hard limit is below ``needed``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchError(f"{needed} open files are needed, above this system's limit of "
                         f"{hard} (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class _Conn:
    """One connection of the load and what it owes."""

    __slots__ = ("number", "sock", "where", "decoder", "sending", "inflight", "queued",
                 "out", "next", "events")

    def __init__(self, number, sock, where, max_frame, sending, first):
        self.number = number
        self.sock = sock
        self.where = where
        self.decoder = protocol.FrameDecoder(max_frame)
        self.sending = sending
        self.inflight = collections.deque()  # (pool index, time sent), oldest first
        self.queued = []  # frames not yet handed to send()
        self.out = b""  # the bytes of the send() under way
        self.next = first  # pool index of the next frame
        self.events = selectors.EVENT_READ


class LoadGenerator:
    """A closed-loop load over non-blocking connections, driven by one thread (see
    the module docstring).

    Args:
        frames, hashes: the pool, from ``bench_frames``.
        payload_size: bytes of each payload, for the rate in bytes per second.
        srcid: the ``destid`` every ACK must carry (str).
        depth: frames in flight per sending connection.
        timeout: seconds each connection may take to open, and each answer to come.
        max_frame: the largest answer accepted, bytes.
        out, err: ``f(line)`` for progress lines, and for the first error of each kind.
        clock: seconds, monotonic (``time.perf_counter``).
    """

    def __init__(self, frames, hashes, payload_size, srcid, depth, timeout, max_frame, out,
                 err, clock=time.perf_counter):
        self.frames = frames
        self.hashes = hashes
        self.payload_size = payload_size
        self.srcid = srcid
        self.depth = depth
        self.timeout = timeout
        self.max_frame = max_frame
        self.out = out
        self.err = err
        self.clock = clock
        self.tls = False
        self._hint = ""  # what to try when a connection fails
        self.selector = selectors.DefaultSelector()
        self.conns = set()  # every open connection
        self.senders = set()  # the open ones that send
        self.errors = 0
        self.error_kinds = collections.Counter()
        self.second = LatencyHistogram()
        self.total = LatencyHistogram()
        self.sending = False

    def open(self, addresses, conns, idle, tls):
        """Open ``idle`` silent connections, then ``conns`` sending ones, one after
        another, spread over ``addresses`` (``(host, port)`` tuples) round robin.

        Raises:
            BenchError: a connection cannot be opened; the text names which and why.
        """
        total = idle + conns
        raise_open_file_limit(total + 64)  # 64: the interpreter's own files
        self.tls = tls is not None
        self._hint = "" if self.tls else " (a proxy that serves TLS needs -tls-ca)"
        for number in range(1, total + 1):
            host, port = addresses[(number - 1) % len(addresses)]
            where = netio.format_address((host, port))
            try:
                sock = netio.connect(host, port, self.timeout, self.max_frame, tls).sock
            except OSError as exc:
                raise BenchError(f"cannot open connection {number} of {total} to "
                                 f"{where}: {netio.describe_error(exc)}") from None
            sock.setblocking(False)
            conn = _Conn(number, sock, where, self.max_frame, number > idle,
                         number * 7919 % len(self.frames))  # 7919, a prime: spread starts
            self.conns.add(conn)
            if conn.sending:
                self.senders.add(conn)
            self.selector.register(sock, conn.events, conn)

    def close(self):
        """Close every connection. Never raises."""
        for conn in self.conns:
            conn.sock.close()
        self.conns.clear()
        self.senders.clear()
        self.selector.close()

    def run(self, seconds):
        """Run the load for ``seconds``, then wait for the answers in flight.

        Returns:
            dict: ``packets`` answered correctly, ``seconds`` from the first frame to
            the last answer, ``packets_per_s``, ``payload_bytes_per_s``, ``errors``,
            ``error_kinds`` (``{kind: count}``), ``p50_ms``, ``p90_ms``, ``p99_ms``,
            ``max_ms`` (float, or None without answers).
        """
        clock = self.clock
        start = last_tick = clock()
        end = start + seconds
        next_tick = start + 1
        self.sending = True
        for conn in list(self.senders):
            self._top_up(conn, start)
            self._flush(conn)
        while True:
            now = clock()
            if self.sending and now >= next_tick:
                self._tick(round(next_tick - start), now - last_tick, now)
                last_tick, next_tick = now, max(next_tick + 1, now)
            if self.sending and now >= end:
                self.sending = False
                drain_deadline = now + self.timeout
            if not self.sending:
                owed = [conn for conn in self.senders if conn.inflight]
                if not owed:
                    break
                if now >= drain_deadline:
                    for conn in owed:
                        self._lost(conn, f"no answer within {self.timeout:g} s (-timeout)")
                    break
            if not self.senders:
                break
            wait = min(next_tick, end) if self.sending else drain_deadline
            for key, mask in self.selector.select(max(0.0, wait - now)):
                conn = key.data
                if mask & selectors.EVENT_READ:
                    self._read(conn)
                if conn in self.conns:
                    self._flush(conn)
        elapsed = clock() - start
        self.total.merge(self.second)
        packets = self.total.count
        rate = packets / elapsed if elapsed > 0 else 0.0
        summary = {"packets": packets, "seconds": elapsed, "packets_per_s": rate,
                   "payload_bytes_per_s": rate * self.payload_size,
                   "errors": self.errors, "error_kinds": dict(self.error_kinds)}
        for name, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1)):
            micros = self.total.percentile(fraction)
            summary[name + "_ms"] = None if micros is None else micros / 1000
        return summary

    def _tick(self, second, interval, now):
        self.out(progress_line(second, self.second.count / interval, self.second,
                               self.errors))
        self.total.merge(self.second)
        self.second = LatencyHistogram()
        for conn in list(self.senders):
            if conn.inflight and now - conn.inflight[0][1] > self.timeout:
                self._lost(conn, f"no answer within {self.timeout:g} s (-timeout)")

    def _top_up(self, conn, now):
        owed = self.depth - len(conn.inflight)
        if owed > 0:
            frames, index = self.frames, conn.next
            for _ in range(owed):
                conn.inflight.append((index, now))
                conn.queued.append(frames[index])
                index = index + 1 if index + 1 < len(frames) else 0
            conn.next = index

    def _flush(self, conn):
        sock = conn.sock
        while conn.out or conn.queued:
            if not conn.out:
                conn.out = memoryview(b"".join(conn.queued))
                conn.queued.clear()
            try:
                sent = sock.send(conn.out)
            except (BlockingIOError, ssl.SSLWantWriteError):
                break
            except ssl.SSLWantReadError:
                # TLS must read before it writes: the next read event retries, with
                # the same bytes, as OpenSSL requires.
                self._watch(conn, selectors.EVENT_READ)
                return
            except OSError as exc:
                self._lost(conn, f"sending failed: {netio.describe_error(exc)}{self._hint}")
                return
            conn.out = conn.out[sent:]
            if conn.out:
                break  # the socket's buffer is full
        self._watch(conn, selectors.EVENT_READ | selectors.EVENT_WRITE
                    if conn.out or conn.queued else selectors.EVENT_READ)

    def _watch(self, conn, events):
        if conn.events != events:
            conn.events = events
            self.selector.modify(conn.sock, events, conn)

    def _receive(self, sock):
        # Returns the bytes there are, b"" at the end of the stream, None for none
        # yet. A TLS socket is read until it would block: a record already taken
        # from the kernel (pending()) raises no read event.
        if not self.tls:
            try:
                return sock.recv(netio.RECV_SIZE)
            except BlockingIOError:
                return None
        chunks = []
        while True:
            try:
                chunk = sock.recv(netio.RECV_SIZE)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return b"".join(chunks) if chunks else None
            chunks.append(chunk)
            if not chunk:
                return b"".join(chunks)

    def _read(self, conn):
        try:
            chunk = self._receive(conn.sock)
        except OSError as exc:
            self._lost(conn, f"receiving failed: {netio.describe_error(exc)}{self._hint}")
            return
        if chunk is None:
            return
        if not chunk:
            self._lost(conn, f"the peer closed the connection{self._hint}")
            return
        now = self.clock()
        decoder = conn.decoder
        decoder.feed(chunk)
        hashes, srcid, record = self.hashes, self.srcid, self.second.record
        while True:
            try:
                body = decoder.next_frame()
            except protocol.FrameError as exc:
                self._lost(conn, f"bad answer frame: {exc.message}")
                return
            if body is None:
                break
            if not conn.inflight:
                self._lost(conn, "a frame that answers no DATA frame: "
                           + show(body.decode("utf-8", "replace"), 200))
                return
            index, sent = conn.inflight.popleft()
            try:
                answer = json.loads(body.decode("utf-8"))  # str: skips detect_encoding
            except ValueError:
                answer = body.decode("utf-8", "replace")
            # The common case first, in line; judge_answer has the whole rule.
            if (type(answer) is dict and answer.get("payload") == hashes[index]
                    and answer.get("type") == 2 and answer.get("destid") == srcid):
                record(int((now - sent) * 1e6))
                continue
            verdict = judge_answer(answer, hashes[index], srcid)
            if verdict is None:
                record(int((now - sent) * 1e6))
            else:
                self._error(*verdict, conn)
        if self.sending:
            self._top_up(conn, now)

    def _error(self, kind, text, conn, count=1):
        self.errors += count
        if not self.error_kinds[kind]:
            self.err(f"client.py: connection {conn.number} to {conn.where}: {text}")
        self.error_kinds[kind] += count

    def _lost(self, conn, why):
        """Close ``conn``; its answers still owed are errors, and so is the loss of a
        connection that should be sending or held open."""
        owed = len(conn.inflight)
        if owed:
            self._error("missing answer", f"{why}; {owed} answer{'s' if owed > 1 else ''} "
                        "missing", conn, owed)
        elif self.sending or not conn.sending:
            self._error("connection lost", why, conn)
        self.selector.unregister(conn.sock)
        conn.sock.close()
        self.conns.discard(conn)
        self.senders.discard(conn)


def arg_idle(text):
    """A whole number of connections, 0 or more."""
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of at least 0")
    return int(text)


# The options of the load mode, each with its default, for the check that they come
# with -bench and for filling in what was not given.
BENCH_OPTIONS = {"conns": BENCH_CONNS, "depth": BENCH_DEPTH, "size": BENCH_SIZE, "idle": 0}


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
    parser.add_argument("-max-frame", type=cli.arg_count, default=protocol.DEFAULT_MAX_FRAME,
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
                      help=f"connections that send (default: {BENCH_CONNS})")
    load.add_argument("-depth", type=cli.arg_count, metavar="N",
                      help=f"DATA frames in flight on each of them (default: {BENCH_DEPTH})")
    load.add_argument("-size", type=cli.arg_count, metavar="BYTES",
                      help=f"UTF-8 bytes of each payload (default: {BENCH_SIZE})")
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
    payloads = make_payloads(args.size, max(1, min(POOL_COUNT, POOL_BYTES // args.size)),
                             random.Random())
    frames, hashes = bench_frames(args.id, policies, payloads)

    out, err = cli.say, cli.print_error
    where = ",".join(netio.format_address(address) for address in args.revproc)
    generator = LoadGenerator(frames, hashes, args.size, args.id, args.depth, args.timeout,
                              args.max_frame, out, err)
    try:
        generator.open(args.revproc, args.conns, args.idle, tls)
        # Printed once every connection is open: the load starts now.
        out(f"load: {args.conns} connections x {args.depth} in flight"
            f"{f' (+{args.idle} idle)' if args.idle else ''}, {args.size}-byte payloads, "
            f"privacy policy {', '.join(show(p) for p in policies)}, {args.bench:g} s, "
            f"to {where}{' over TLS' if tls else ''}")
        summary = generator.run(args.bench)
    except BenchError as exc:
        err(f"client.py: {exc}")
        return 1
    finally:
        generator.close()
    if args.json:
        out(json.dumps({"conns": args.conns, "depth": args.depth, "size": args.size,
                        "idle": args.idle, **summary}))
    else:
        for line in summary_lines(summary):
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

    proxies = args.revproc
    addresses = " or ".join(netio.format_address(proxy) for proxy in proxies)
    if len(proxies) == 1 and proxies[0][0] == "127.0.0.1":
        running_on = f"port {proxies[0][1]}"  # the assignment's wording
    else:
        running_on = addresses
    for packet in packets:
        cli.say(f"Sending message {show(packet['payload'])} to privacy policy "
                f"{show(packet['privPoliId'])} through reverse proxy running on {running_on}",
                cli.event("sent", payload=show(packet["payload"]),
                          policy=packet["privPoliId"], proxy=addresses))
    correct, failures = send_through(proxies, packets, args, tls)
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
