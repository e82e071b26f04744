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

It prints a progress line each second and, at the end, a summary; it counts as
errors every wrong hash, ERROR answer, answer it cannot read, and answer missing (a
connection closed, or no answer within the timeout).
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


class _LoadChannel(eventloop.Channel):
    """One connection of the load; a sending one keeps ``depth`` frames in flight."""

    def __init__(self, generator, number, host, port, sending, first):
        super().__init__(generator.loop, None, netio.format_address((host, port)),
                         generator.max_frame, generator.tls)
        self.generator = generator
        self.number = number
        self.address = (host, port)
        self.sending = sending
        self.next = first  # pool index of the next frame
        self.inflight = collections.deque()  # (pool index, time sent), oldest first

    def connection_made(self):
        self.generator._opened(self)

    def frames_received(self, bodies):
        if bodies:
            self.generator._answers(self, bodies)

    def frame_error(self, exc):
        self.generator._lost(self, f"bad answer frame: {exc.message}")

    def eof_received(self):
        self.generator._lost(self, f"the peer closed the connection{self.generator.hint}")

    def closed(self, exc):
        if exc is not None:
            self.generator._lost(self, netio.describe_error(exc), exc)


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
        out, err: ``f(line)`` for progress lines, and for the first error of each kind.
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
        self.hint = ""  # what to try when a connection fails
        self.conns = set()  # every open connection
        self.senders = set()  # the open ones that send
        self.errors = 0
        self.error_kinds = collections.Counter()
        self.second = LatencyHistogram()
        self.total = LatencyHistogram()
        self.sending = False
        self._waiting = []  # connections still to open
        self._opening = 0
        self._failed = None

    def open(self, addresses, conns, idle, tls):
        """Open ``idle`` silent connections, then ``conns`` sending ones, spread over
        ``addresses`` (``(host, port)`` tuples) round robin.

        Raises:
            BenchError: a connection cannot be opened; the text names which and why.
        """
        total = idle + conns
        open_file_limit(total + 64)  # 64: the interpreter's own files
        self.tls = tls
        self.hint = "" if tls else " (a proxy that serves TLS needs -tls-ca)"
        self._waiting = [
            _LoadChannel(self, number, *addresses[(number - 1) % len(addresses)],
                         number > idle, number * 7919 % len(self.frames))  # a prime
            for number in range(total, 0, -1)]                             # spreads starts
        self._total = total
        for _ in range(OPENING):
            self._open_next()
        self.loop.run()
        if self._failed:
            raise BenchError(self._failed)

    def _open_next(self):
        if self._waiting:
            channel = self._waiting.pop()
            self._opening += 1
            channel.connect(*channel.address, self.timeout)

    def _opened(self, channel):
        self._opening -= 1
        self.conns.add(channel)
        if channel.sending:
            self.senders.add(channel)
        if self._waiting:
            self._open_next()
        elif not self._opening:
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
        self.sending = True
        for channel in list(self.senders):
            self._top_up(channel, start)
        loop.call_later(1, self._tick, 1)
        loop.call_later(seconds, self._stop_sending)
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

    def _tick(self, second):
        now = self.loop.now
        if self.sending:
            self.out(progress_line(second, self.second.count / (now - self._last_tick),
                                   self.second, self.errors))
            self.total.merge(self.second)
            self.second = LatencyHistogram()
            self._last_tick = now
            self.loop.call_later(max(0.0, self._start + second + 1 - now), self._tick,
                                 second + 1)
        self._expire(now)

    def _expire(self, now):
        for channel in list(self.senders):
            if channel.inflight and now - channel.inflight[0][1] > self.timeout:
                self._lost(channel, f"no answer within {self.timeout:g} s (-timeout)")
        self._maybe_done()

    def _stop_sending(self):
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

    def _error(self, kind, text, channel, count=1):
        self.errors += count
        if not self.error_kinds[kind]:
            self.err(f"client.py: connection {channel.number} to {channel.peer}: {text}")
        self.error_kinds[kind] += count

    def _lost(self, channel, why, exc=None):
        """``channel`` failed: while opening, the load cannot start; else its answers
        still owed are errors, and so is the loss of a connection that should be
        sending or held open."""
        if channel not in self.conns:
            if self._failed is None and channel.number and exc is not None:
                self._failed = (f"cannot open connection {channel.number} of {self._total} "
                                f"to {channel.peer}: {why}")
                self.loop.stop()
            return
        self.conns.discard(channel)
        self.senders.discard(channel)
        owed = len(channel.inflight)
        if owed:
            self._error("missing answer", f"{why}; {owed} answer{'s' if owed > 1 else ''} "
                        "missing", channel, owed)
        elif self.sending or not channel.sending:
            self._error("connection lost", why + (self.hint if exc is not None else ""),
                        channel)
        channel.inflight.clear()
        channel.abort()
        if not self.senders:
            self.loop.stop()
        else:
            self._maybe_done()
