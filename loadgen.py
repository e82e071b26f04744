"""The load generator of ``client.py -bench``: a closed loop of connections that keeps
frames in flight through a proxy (or straight to servers), checks every answer, and
measures packets per second and latency, as ``redis-benchmark`` does for Redis.

It must leave the CPU to the programs it measures, so:

* it runs on the project's own I/O layer, ``eventloop``: one thread, one selector
  loop over non-blocking connections (TCP or TLS), and the frames a connection is
  owed go out together, at the end of the loop's turn;
* the payloads, their frames and their SHA-1 are made once, in advance, as a pool;
  each answer is still compared with the hash of its own payload. Answers come back
  in order (PROTOCOL.md section 3), so the n-th answer on a connection is for its n-th
  frame;
* latencies are counted in a fixed histogram (``LatencyHistogram``), so any number
  of packets takes bounded memory.

Each connection goes to the first address that accepts it, starting from its place
in the round robin over the addresses: one that refuses a connection (at the TCP
level, or with the OVERLOADED refusal of a full proxy, see ``refusal``) is skipped from
then on, with a warning.

It prints a progress line each second (and one for the last part of a second) and,
at the end, a summary; it counts as errors every wrong hash, ERROR answer, answer it
cannot read, and answer missing (a connection closed, or no answer within the
timeout). The first error of each kind is printed, and every lost connection.
"""

import collections
import json
import math
import string

import cli
import eventloop
import netio
import protocol
from protocol import MessageType, show

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


# Added to the reason a plain-TCP connection failed when the peer may be a TLS
# server (``netio.may_speak_tls``).
TLS_HINT = " (a proxy that serves TLS needs -tls-ca)"


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
    kind = message_type(answer.get("type"))
    if kind == MessageType.ERROR:
        code = show(answer.get("code"))
        return f"ERROR {code}", f"ERROR answer: {code}: {show(answer.get('message'), 200)}"
    if kind != MessageType.ACK:
        return "unexpected answer", (f"a message of type {show(answer.get('type'))} "
                                     "instead of an ACK")
    if protocol.policy_text(answer.get("destid")) != srcid:
        return "ACK for another client", (f"an ACK for client {show(answer.get('destid'))} "
                                          f"instead of {show(srcid)}")
    if answer.get("payload") != expected_hash:
        return "wrong hash", (f"wrong hash from server {show(answer.get('srcid'))}: expected "
                              f"{expected_hash}, got {show(answer.get('payload'))}")
    return None


_TYPES = {**{kind.value: kind for kind in MessageType},
          **{str(kind.value): kind for kind in MessageType}}


def message_type(value):
    """The ``MessageType`` that a decoded ``type`` field names, read as
    ``protocol.validate_message`` reads it: the number, or its digit as a string
    (PROTOCOL.md section 2); None for anything else."""
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        return _TYPES.get(value)
    return None


def refusal(message):
    """The text of a proxy's refusal of a connection, if ``message`` (a validated
    message, the first one that came on the connection) is one: an OVERLOADED ERROR
    without ``destid``, which a proxy with ``-max-conns`` connections open sends
    before it closes a new one (PROTOCOL.md section 2; the OVERLOADED answer to one
    DATA frame names the client in ``destid``). Else None."""
    if (message["type"] == MessageType.ERROR and message["code"] == protocol.OVERLOADED
            and "destid" not in message):
        return f"{message['code']}: {message['message']}"
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


# The error kinds (the keys of ``error_kinds``, which stay as they are) as the
# summary line says more than one of them; an ERROR code is its own plural.
_PLURALS = {"missing answer": "missing answers", "wrong hash": "wrong hashes",
            "connection lost": "connections lost", "connection refused": "connections refused"}


def summary_lines(summary):
    """The summary of a load as text lines; ``summary`` as ``LoadGenerator.run``
    returns it."""
    kinds = ", ".join(f"{count:,} {_PLURALS.get(kind, kind) if count != 1 else kind}"
                      for kind, count in summary["error_kinds"].items())
    latency = "  ".join(f"{name} {_ms(summary[name + '_ms'])}"
                        for name in ("p50", "p90", "p99", "max"))
    return [
        f"packets {summary['packets']:,} answered correctly in {summary['seconds']:.2f} s: "
        f"{summary['packets_per_s']:,.0f} packets/s, "
        f"{summary['payload_bytes_per_s'] / 1e6:,.2f} MB/s of payload",
        f"latency {latency}",
        f"errors {summary['errors']:,}" + (f": {kinds}" if kinds else ""),
    ]


def open_file_limit(needed):
    """Make room for ``needed`` open files (1,000 connections pass the common soft
    limit of 1,024): the soft limit goes up to the hard one.

    Raises:
        BenchError: even the hard limit is below ``needed``.
    """
    limit = cli.descriptor_limit()
    if limit < needed:
        raise BenchError(f"{needed} open files are needed, above this system's limit of "
                         f"{limit} (ulimit -Hn)")


# Connections being opened at once: enough to open a thousand in well under a second,
# few enough not to overflow a listen backlog (socketserver's is 5, ours 511).
OPENING = 32
# Seconds of load after the last progress line below which the end of the load gets
# no line of its own: a tick and the end that fall together print one line, as
# redis-benchmark prints one line per interval.
LAST_PART = 0.05


class _LoadChannel(eventloop.Channel):
    """One connection of the load, to ``generator.addresses[at]``; a sending one keeps
    ``depth`` frames in flight."""

    def __init__(self, generator, number, at, sending, first):
        super().__init__(generator.loop, None, netio.format_address(generator.addresses[at]),
                         generator.max_frame, generator.tls)
        self.decoder = netio.HeadDecoder(generator.max_frame)  # for hint()
        self.generator = generator
        self.number = number
        self.at = at
        self.sending = sending
        self.next = first  # pool index of the next frame
        self.inflight = collections.deque()  # (pool index, time sent), oldest first
        self.accepted = False  # a frame came that is not the proxy's refusal

    def hint(self):
        """``TLS_HINT`` when this plain-TCP connection failed in a way a TLS server
        would make it fail (``netio.may_speak_tls``) and no connection to the same
        address ever got a frame (then that peer speaks frames), else ""."""
        generator = self.generator
        if (generator.tls or self.at in generator.framed
                or not netio.may_speak_tls(self.decoder.head)):
            return ""
        return TLS_HINT

    def connection_made(self):
        self.generator._opened(self)

    def frames_received(self, bodies):
        if bodies:
            self.generator._answers(self, bodies)

    def frame_error(self, exc):
        self.generator._lost(self, f"bad answer frame: {exc.message}{self.hint()}")

    def eof_received(self):
        self.generator._lost(self, f"the peer closed the connection{self.hint()}")

    def closed(self, exc):
        if exc is not None:
            # Not open yet: the connection was refused; no frame was sent to speak of.
            opening = self not in self.generator.conns
            self.generator._lost(self, netio.describe_error(exc) + ("" if opening
                                                                    else self.hint()), exc)


class LoadGenerator:
    """A closed-loop load over the connections of one ``eventloop.EventLoop``, run in
    the calling thread (see the module docstring).

    Args:
        frames, hashes: the pool, from ``bench_frames``.
        payload_size: bytes of each payload, for the rate in bytes per second.
        srcid: the ``destid`` every ACK must carry (str).
        depth: frames in flight per sending connection.
        timeout: seconds each connection may take to open, and each answer to come.
        max_frame: the largest answer accepted, bytes.
        out, err: ``f(line)`` for progress lines, and for errors (the first of each
            kind, every lost connection, every address skipped).

    Attributes:
        skipped: ``{(host, port): why}``, the addresses skipped because they refused
            a connection (filled by ``open`` and ``run``).
    """

    def __init__(self, frames, hashes, payload_size, srcid, depth, timeout, max_frame,
                 out, err):
        self.frames = frames
        self.hashes = hashes
        self.payload_size = payload_size
        self.srcid = srcid
        self.depth = depth
        self.timeout = timeout
        self.max_frame = max_frame
        self.out = out
        self.err = err
        self.loop = eventloop.EventLoop()
        self.tls = None
        self.addresses = []
        self.skipped = {}
        self.framed = set()  # indexes of the addresses that sent a frame on a connection
        self.conns = set()  # every open connection
        self.senders = set()  # the open ones that send
        self.errors = 0
        self.error_kinds = collections.Counter()
        self.second = LatencyHistogram()
        self.total = LatencyHistogram()
        self.running = False  # run() has begun
        self.sending = False
        self._waiting = []  # connections still to open: (number, sending, first frame)
        self._opening = 0
        self._failed = None
        self._total = 0

    def open(self, addresses, conns, idle, tls):
        """Open ``idle`` silent connections, then ``conns`` sending ones. Connection
        ``n`` (from 1) goes to the first of ``addresses`` (``(host, port)`` tuples)
        that accepts it, from address ``n - 1`` round robin on; one that refuses a
        connection is skipped by every later one (``skipped``).

        Returns:
            dict: ``{(host, port): connections opened there}``, in the order of
            ``addresses``, without those that got none.

        Raises:
            BenchError: a connection cannot be opened at any address; the text names
                which and why.
        """
        total = idle + conns
        open_file_limit(total + 64)  # 64: the interpreter's own files
        self.tls = tls
        self.addresses = list(addresses)
        # A prime spreads the connections' first frames over the pool.
        self._waiting = [(number, number > idle, number * 7919 % len(self.frames))
                         for number in range(total, 0, -1)]
        self._total = total
        for _ in range(OPENING):
            self._open_next()
        self.loop.run()
        if self._failed:
            raise BenchError(self._failed)
        opened = collections.Counter(channel.at for channel in self.conns)
        return {address: opened[at] for at, address in enumerate(self.addresses)
                if opened[at]}

    def _open_next(self):
        if self._waiting:
            number, sending, first = self._waiting.pop()
            self._opening += 1
            self._connect(number, sending, first, (number - 1) % len(self.addresses))

    def _connect(self, number, sending, first, at):
        # Open connection ``number`` at the first address from index ``at`` on that
        # has not been skipped.
        count = len(self.addresses)
        for step in range(count):
            index = (at + step) % count
            if self.addresses[index] not in self.skipped:
                channel = _LoadChannel(self, number, index, sending, first)
                channel.connect(*self.addresses[index], self.timeout)
                return
        self._opening -= 1
        if count == 1:
            ((address, why),) = self.skipped.items()
            text = (f"cannot open connection {number} of {self._total} to "
                    f"{netio.format_address(address)}: {why}")
        else:
            text = (f"cannot open connection {number} of {self._total}: no reverse proxy "
                    "accepted it (" + "; ".join(
                        f"{netio.format_address(address)}: {self.skipped[address]}"
                        for address in self.addresses) + ")")
        if not self.running:
            self._failed = self._failed or text
            self.loop.stop()
            return
        self._error("connection refused", text, None, every=True)
        if not self.senders and not self._opening:
            self.loop.stop()

    def _skip(self, channel, why):
        """``channel`` was refused: skip its address from now on, and open the
        connection again at the next address."""
        address = self.addresses[channel.at]
        if address not in self.skipped:
            self.skipped[address] = why
            if len(self.addresses) > 1:
                self.err(f"client.py: connection {channel.number} to {channel.peer} "
                         f"refused: {why}; using the other reverse proxies")
        self._opening += 1
        self._connect(channel.number, channel.sending, channel.next, channel.at)

    def _opened(self, channel):
        self._opening -= 1
        self.conns.add(channel)
        if channel.sending:
            self.senders.add(channel)
            if self.sending:  # a connection opened again during the load
                self._top_up(channel, self.loop.now)
        if self._waiting:
            self._open_next()
        elif not self._opening and not self.running:
            self.loop.stop()

    def close(self):
        """Close every connection and the loop. Never raises."""
        for channel in list(self.conns):
            self.conns.discard(channel)
            channel.abort()
        self.loop.close()

    def run(self, seconds):
        """Run the load for ``seconds``, then wait for the answers in flight.

        Returns:
            dict: ``packets`` answered correctly, ``seconds`` from the first frame to
            the last answer, ``packets_per_s``, ``payload_bytes_per_s``, ``errors``,
            ``error_kinds`` (``{kind: count}``), ``p50_ms``, ``p90_ms``, ``p99_ms``,
            ``max_ms`` (float, or None without answers).
        """
        loop = self.loop
        loop.now = start = eventloop.time.monotonic()
        self._start = self._last_tick = start
        self.running = self.sending = True
        for channel in list(self.senders):
            self._top_up(channel, start)
        loop.call_later(1, self._tick, 1)
        loop.call_later(seconds, self._stop_sending, seconds)
        if self.senders:
            loop.run()
        elapsed = eventloop.time.monotonic() - start
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

    def _progress(self, label, now):
        # The progress line of the time since the last one, which ``label`` ends.
        self.out(progress_line(label, self.second.count / (now - self._last_tick),
                               self.second, self.errors))
        self.total.merge(self.second)
        self.second = LatencyHistogram()
        self._last_tick = now

    def _tick(self, second):
        now = self.loop.now
        if self.sending:
            self._progress(second, now)
            self.loop.call_later(max(0.0, self._start + second + 1 - now), self._tick,
                                 second + 1)
        self._expire(now)

    def _expire(self, now):
        for channel in list(self.senders):
            if channel.inflight and now - channel.inflight[0][1] > self.timeout:
                self._lost(channel, f"no answer within {self.timeout:g} s (-timeout)")
        self._maybe_done()

    def _stop_sending(self, seconds):
        now = self.loop.now
        # The last part of a second has its line too (time 3 s of -bench 3, time
        # 2.5 s of -bench 2.5), unless the tick of that very moment printed it.
        if now - self._last_tick >= LAST_PART:
            self._progress(f"{seconds:g}", now)
        self.sending = False
        self.loop.call_later(self.timeout, self._expire, eventloop.time.monotonic() + 1e9)
        self._maybe_done()

    def _maybe_done(self):
        if not self.sending and not any(channel.inflight for channel in self.senders):
            self.loop.stop()

    def _top_up(self, channel, now):
        owed = self.depth - len(channel.inflight)
        if owed > 0:
            frames, index = self.frames, channel.next
            for _ in range(owed):
                channel.inflight.append((index, now))
                channel.write(frames[index])
                index = index + 1 if index + 1 < len(frames) else 0
            channel.next = index

    def _answers(self, channel, bodies):
        if not channel.accepted:
            self.framed.add(channel.at)
            try:
                refused = refusal(protocol.parse_message(bodies[0]))
            except protocol.MessageError:
                refused = None
            if refused:
                self._refused(channel, refused)
                return
            channel.accepted = True
        now = self.loop.now
        hashes, srcid, record = self.hashes, self.srcid, self.second.record
        inflight = channel.inflight
        for body in bodies:
            if not inflight:
                self._lost(channel, "a frame that answers no DATA frame: "
                           + show(body.decode("utf-8", "replace"), 200))
                return
            index, sent = inflight.popleft()
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
                self._error(*verdict, channel)
        if self.sending:
            self._top_up(channel, now)
        else:
            self._maybe_done()

    def _refused(self, channel, why):
        # The proxy did not accept the connection: the frames sent on it were never
        # taken, so none is an error; the connection is opened elsewhere.
        self.conns.discard(channel)
        self.senders.discard(channel)
        channel.inflight.clear()
        channel.abort()
        self._skip(channel, why)
        self._maybe_done()

    def _error(self, kind, text, channel, count=1, every=False):
        """Count ``count`` errors of ``kind``; print ``text`` for the first of the
        kind, or for each when ``every``."""
        self.errors += count
        if every or not self.error_kinds[kind]:
            where = "" if channel is None else f"connection {channel.number} to {channel.peer}: "
            self.err(f"client.py: {where}{text}")
        self.error_kinds[kind] += count

    def _lost(self, channel, why, exc=None):
        """``channel`` failed: while opening, its address is skipped and it is opened
        at the next one; else its answers still owed are errors, and so is the loss
        of a connection that should be sending or held open (``exc``: the exception
        that closed it, if any)."""
        if channel not in self.conns:
            if exc is not None:  # a channel closed after it was open has no reason
                self._opening -= 1
                self._skip(channel, why)
            return
        self.conns.discard(channel)
        self.senders.discard(channel)
        owed = len(channel.inflight)
        if owed:
            self._error("missing answer", f"{why}; {owed} answer{'s' if owed > 1 else ''} "
                        "missing", channel, owed, every=True)
        elif self.sending or not channel.sending:
            self._error("connection lost", why, channel, every=True)
        channel.inflight.clear()
        channel.abort()
        if not self.senders and not self._opening:
            self.loop.stop()
        else:
            self._maybe_done()
