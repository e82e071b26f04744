"""In-process tests of eventloop: the proxy's selector loop, its channels and its
listener (PROTOCOL.md sections 1, 3 and 5).

An ``EventLoop`` runs in a thread of the test (``LoopThread``); the test reaches it
only through ``post``, as the proxy's other threads do, and waits for what it posted.
A ``Recorder`` channel records every hook call; it serves one end of a
``socket.socketpair()`` or a socket accepted by a ``Listener`` on 127.0.0.1 port 0,
and the test plays the peer on the other end with a blocking socket. TLS uses a
throwaway CA and leaf made at run time (the ``pki`` fixture of conftest.py).

Every wait is bounded by ``WAIT``; a passing test takes well under a second or two,
and every socket, channel, listener and thread is closed or joined at its end. All
traffic stays on loopback: the connect timeout is made with a full listen backlog on
127.0.0.1, and the bad host name fails in the IDNA codec, before any lookup.
"""

import errno
import fcntl
import os
import queue
import resource
import socket
import ssl
import termios
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eventloop
import netio
import protocol
from conftest import WAIT, free_port
from protocol import FrameError, frame_of

# Hypothesis: about a second in all, no example database written to the work tree.
# The examples share one loop thread (a function-scoped fixture); each makes and
# closes its own channel.
FAST = settings(deadline=None, max_examples=150, database=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])

# More than any socketpair or loopback buffer holds, so that a peer that reads
# nothing leaves output queued (Linux's AF_UNIX buffer is about 200 KiB).
BIG = 4 << 20


def pattern(size):
    """``size`` bytes that show where a byte was lost or reordered."""
    return (bytes(range(251)) * (size // 251 + 1))[:size]


# --- The loop thread and the recording channel ----------------------------------------

class LoopThread:
    """An EventLoop run by a thread of the test; ``call`` runs code in it."""

    def __init__(self):
        self.loop = eventloop.EventLoop()
        self.thread = threading.Thread(target=self.loop.run, name="test loop", daemon=True)
        self.owned = []  # channels and listeners, closed in the loop thread at the end
        self.sockets = []  # the test's own sockets
        self.thread.start()

    def call(self, function, *args, timeout=WAIT):
        """Run ``function(*args)`` in the loop thread; return its value or raise its
        exception, within ``timeout`` seconds."""
        done = threading.Event()
        box = {}

        def run():
            try:
                box["value"] = function(*args)
            except BaseException as exc:  # handed to the test thread below
                box["error"] = exc
            finally:
                done.set()

        self.loop.post(run)
        assert done.wait(timeout), f"the loop did not run {function} within {timeout} s"
        if "error" in box:
            raise box["error"]
        return box["value"]

    def turn(self):
        """Return after the loop has served, in a whole turn, whatever was ready now."""
        self.call(lambda: None)
        self.call(lambda: None)

    def own(self, thing):
        self.owned.append(thing)
        return thing

    def accepted(self, channel_class=None, **options):
        """A started channel over one end of a socketpair, and the other end."""
        near, far = socket.socketpair()
        far.settimeout(WAIT)
        self.sockets.append(far)

        def start():
            channel = self.own((channel_class or Recorder)(self.loop, near, "peer:1",
                                                            **options))
            channel.start()
            return channel

        return self.call(start), far

    def serve(self, channel_class=None, **options):
        """A Listener on 127.0.0.1 port 0 that starts a channel for each connection;
        return ``(listener, queue of those channels)``."""
        channels = queue.Queue()

        def on_accept(sock, address):
            channel = self.own((channel_class or Recorder)(
                self.loop, sock, netio.format_address(address), **options))
            channels.put(channel)
            channel.start()

        listener = self.call(lambda: self.own(eventloop.Listener(
            self.loop, eventloop.listen_socket("127.0.0.1", 0), on_accept)))
        return listener, channels

    def connecting(self, host, port, timeout=WAIT, first_write=None, **options):
        """A Recorder connecting to ``host``:``port``, with ``first_write`` (bytes)
        written before the connection is made."""
        def start():
            channel = self.own(Recorder(self.loop, None, f"{host}:{port}", **options))
            channel.connect(host, port, timeout)
            if first_write is not None:
                channel.write(first_write)
            return channel

        return self.call(start)

    def cpu_over(self, seconds):
        """CPU seconds the loop thread uses over the next ``seconds`` of its own time."""
        done = threading.Event()
        box = {}

        def begin():
            start = time.thread_time()

            def end():
                box["cpu"] = time.thread_time() - start
                done.set()

            self.loop.call_later(seconds, end)

        self.loop.post(begin)
        assert done.wait(WAIT + seconds)
        return box["cpu"]

    def close(self):
        if self.thread.is_alive():
            def close_owned():
                for thing in self.owned:
                    if isinstance(thing, eventloop.Channel):
                        thing.abort()
                    else:
                        thing.close()

            self.call(close_owned)
            self.loop.stop()
            self.thread.join(WAIT)
        for thing in self.owned:  # when a test stopped the loop itself
            if thing.sock is not None:
                thing.sock.close()
        resolver = self.loop._resolver
        self.loop.close()
        if resolver is not None:
            resolver.shutdown(wait=True)  # close() does not wait for its threads
        for sock in self.sockets:
            sock.close()
        assert not self.thread.is_alive(), "the loop thread did not stop"


@pytest.fixture
def lt():
    """A running LoopThread, stopped and closed at the end of the test."""
    loop_thread = LoopThread()
    yield loop_thread
    loop_thread.close()


class Recorder(eventloop.Channel):
    """A Channel that records its hook calls as ``(name, value)``, in order.

    ``on_frame_error`` and ``on_eof``, when set, replace the default reaction (the
    hook is recorded either way). ``fail_on_frames`` makes ``frames_received`` raise.
    """

    on_frame_error = None
    on_eof = None
    fail_on_frames = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events = []
        self._changed = threading.Condition()

    def record(self, name, value=None):
        with self._changed:
            self.events.append((name, value))
            self._changed.notify_all()

    def values(self, name):
        with self._changed:
            return [value for event, value in self.events if event == name]

    def names(self):
        with self._changed:
            return [event for event, _ in self.events]

    def wait_for(self, name, count=1, timeout=WAIT):
        """Wait until ``count`` calls of hook ``name`` are recorded; return the values."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                values = [value for event, value in self.events if event == name]
                if len(values) >= count:
                    return values
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{count} x {name} not recorded within {timeout} "
                                         f"s; recorded: {self.events}")
                self._changed.wait(left)

    def connection_made(self):
        self.record("made")

    def frames_received(self, bodies):
        self.record("frames", (list(bodies), self.decoder.in_frame))
        if self.fail_on_frames is not None:
            raise self.fail_on_frames

    def frame_error(self, exc):
        self.record("frame_error", exc)
        if self.on_frame_error is None:
            super().frame_error(exc)
        else:
            self.on_frame_error(exc)

    def eof_received(self):
        self.record("eof")
        if self.on_eof is None:
            super().eof_received()
        else:
            self.on_eof()

    def timed_out(self, now):
        self.record("timed_out", now)

    def drained(self):
        self.record("drained")

    def closed(self, exc):
        self.record("closed", exc)


def read_exactly(sock, size):
    """Read ``size`` bytes from a blocking ``sock`` (its timeout bounds each read)."""
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(size - got, 1 << 20))
        assert chunk, f"end of stream after {got} of {size} bytes"
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_to_end(sock):
    """Read until the end of the stream; return ``(bytes, "eof" or "reset")``."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return b"".join(chunks), "reset"
        if not chunk:
            return b"".join(chunks), "eof"
        chunks.append(chunk)


def wait_until_sent(sock):
    """Wait until the peer's kernel has every byte written to TCP socket ``sock``
    (its send queue, TIOCOUTQ, is empty)."""
    deadline = time.monotonic() + WAIT
    while int.from_bytes(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4),
                         "little"):
        assert time.monotonic() < deadline, f"bytes still unsent after {WAIT} s"
        time.sleep(0.001)


# --- EventLoop ------------------------------------------------------------------------

def test_loop_runs_posted_callbacks_in_its_thread_in_order_until_stopped(lt):
    ran = []
    done = threading.Event()
    for i in range(200):
        lt.loop.post(lambda i=i: ran.append((i, threading.current_thread())))
    lt.loop.post(done.set)
    assert done.wait(WAIT)
    assert ran == [(i, lt.thread) for i in range(200)]
    assert lt.loop.thread is lt.thread
    lt.loop.stop()
    lt.thread.join(WAIT)
    assert not lt.thread.is_alive()


def test_posts_from_many_threads_all_run_each_thread_in_its_order(lt):
    ran = []

    def poster(name):
        for i in range(100):
            lt.loop.post(ran.append, (name, i))

    posters = [threading.Thread(target=poster, args=(name,)) for name in "abcd"]
    for thread in posters:
        thread.start()
    for thread in posters:
        thread.join(WAIT)
    lt.turn()
    assert sorted(ran) == [(name, i) for name in "abcd" for i in range(100)]
    for name in "abcd":
        assert [i for who, i in ran if who == name] == list(range(100))


def test_call_later_fires_in_time_order_equal_times_in_call_order_and_cancel_holds(lt):
    fired = []
    done = threading.Event()

    def schedule():
        start = lt.loop.now
        for delay, name in [(0.04, "a"), (0.01, "b"), (0.02, "c"), (0.01, "d")]:
            lt.loop.call_later(delay, lambda name=name: fired.append((name, lt.loop.now)))
        lt.loop.call_later(0.02, fired.append, ("cancelled", 0)).cancel()
        lt.loop.call_later(0.04, done.set)
        return start

    start = lt.call(schedule)
    assert done.wait(WAIT)
    assert [name for name, _ in fired] == ["b", "d", "c", "a"]
    delays = dict(b=0.01, d=0.01, c=0.02, a=0.04)
    assert all(now >= start + delays[name] for name, now in fired), (start, fired)


def test_a_failing_callback_is_logged_in_one_line_and_the_loop_goes_on(lt, log_watch):
    def boom():
        raise ValueError("boom")

    lt.loop.post(boom)
    assert lt.call(lambda: "still running") == "still running"
    log_watch.wait_for("internal error")
    assert [line for line in log_watch.lines if "internal error" in line] == [
        f"internal error in {boom.__qualname__}: ValueError: boom"]


def test_a_failing_channel_hook_closes_that_channel_only(lt, log_watch):
    failing, failing_peer = lt.accepted()
    healthy, healthy_peer = lt.accepted()
    failing.fail_on_frames = RuntimeError("hook failed")
    failing_peer.sendall(frame_of(b"x"))
    (exc,) = failing.wait_for("closed")
    assert exc is failing.fail_on_frames
    assert read_to_end(failing_peer) == (b"", "eof")
    healthy_peer.sendall(frame_of(b"y"))
    assert healthy.wait_for("frames") == [([b"y"], False)]
    assert log_watch.count("internal error") == 1


# --- Channel: frames in ------------------------------------------------------------------

@FAST
@given(bodies=st.lists(st.binary(min_size=1, max_size=80), max_size=8),
       tail=st.sampled_from(["none", "partial", "bad_length"]),
       data_=st.data())
def test_frames_received_gets_exactly_the_frames_each_read_completes(lt, bodies, tail, data_):
    stream = b"".join(frame_of(body) for body in bodies)
    ends, position = [], 0
    for body in bodies:
        position += 4 + len(body)
        ends.append(position)
    error_at = None
    if tail == "partial":
        stream += frame_of(b"partial body")[:data_.draw(st.integers(1, 10), "partial")]
    elif tail == "bad_length":
        error_at = len(stream)
        stream += b"\0\0\0\0" + frame_of(b"after")
    if not stream:
        return
    splits = data_.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=10),
                        "split points")
    reads = sorted(splits | {len(stream)})
    channel, peer = lt.accepted()
    try:
        start = 0
        for count, end in enumerate(reads, 1):
            peer.sendall(stream[start:end])  # alone in the kernel until it is read
            completed = [body for body, body_end in zip(bodies, ends) if start < body_end <= end]
            if error_at is not None and end >= error_at + 4:
                assert channel.wait_for("closed") == [channel.values("frame_error")[0]]
                assert channel.values("frames")[-1][0] == completed
                (exc,) = channel.values("frame_error")
                assert isinstance(exc, FrameError) and exc.code == "BAD_FRAME"
                assert len(channel.values("frames")) == count
                return
            got = channel.wait_for("frames", count)[-1]
            assert got == (completed, end not in ends)
            start = end
        peer.shutdown(socket.SHUT_WR)
        assert channel.wait_for("closed") == [None]
        assert channel.names()[-2:] == ["eof", "closed"]
        assert len(channel.values("frames")) == len(reads)
    finally:
        lt.call(channel.abort)
        peer.close()


def test_frame_error_by_default_closes_after_the_frames_before_the_bad_length(lt):
    channel, peer = lt.accepted()
    peer.sendall(frame_of(b"one") + frame_of(b"two") + b"\0\0\0\0" + frame_of(b"three"))
    (exc,) = channel.wait_for("closed")
    assert isinstance(exc, FrameError) and str(exc) == (
        "BAD_FRAME: frame length is 0; a frame body holds at least 1 byte")
    assert channel.events == [("made", None), ("frames", ([b"one", b"two"], False)),
                              ("frame_error", exc), ("closed", exc)]


def test_after_a_frame_error_a_channel_kept_open_reads_nothing_more(lt):
    channel, peer = lt.accepted()
    channel.on_frame_error = lambda exc: None  # the owner keeps it open (to answer)
    peer.sendall(frame_of(b"one") + (2 << 20).to_bytes(4, "big"))
    (exc,) = channel.wait_for("frame_error")
    assert exc.code == "FRAME_TOO_LARGE"
    peer.sendall(frame_of(b"two"))
    lt.turn()
    assert lt.call(lambda: (channel.reading, channel.is_closed)) == (False, False)
    assert channel.names() == ["made", "frames", "frame_error"]


def test_eof_received_then_the_answer_written_still_reaches_the_half_closed_peer(lt):
    channel, peer = lt.accepted()

    def answer_then_close():
        channel.write(frame_of(b"answer"))
        channel.close()

    channel.on_eof = answer_then_close
    peer.sendall(frame_of(b"question"))
    peer.shutdown(socket.SHUT_WR)
    assert read_to_end(peer) == (frame_of(b"answer"), "eof")
    assert channel.wait_for("closed") == [None]
    assert channel.names() == ["made", "frames", "eof", "closed"]
    assert channel.values("frames") == [([b"question"], False)]


def test_eof_received_by_default_closes_the_channel(lt):
    channel, peer = lt.accepted()
    peer.shutdown(socket.SHUT_WR)
    assert channel.wait_for("closed") == [None]
    assert channel.names() == ["made", "eof", "closed"]
    assert read_to_end(peer) == (b"", "eof")


def test_resume_reading_after_eof_does_not_report_the_end_again(lt):
    channel, peer = lt.accepted()
    channel.on_eof = lambda: None  # the owner still has answers to write
    peer.shutdown(socket.SHUT_WR)
    channel.wait_for("eof")
    lt.call(channel.resume_reading)  # say, from drained(): back-pressure relieved
    lt.turn()
    assert channel.names() == ["made", "eof"]
    assert lt.call(lambda: channel.reading) is False


def test_pause_reading_holds_frames_until_resume_reading(lt):
    channel, peer = lt.accepted()
    lt.call(channel.pause_reading)
    peer.sendall(frame_of(b"held"))
    lt.turn()
    assert lt.call(lambda: channel.reading) is False
    assert channel.values("frames") == []
    lt.call(channel.resume_reading)
    assert channel.wait_for("frames") == [([b"held"], False)]
    assert lt.call(lambda: channel.reading) is True


# --- Channel: frames out ------------------------------------------------------------------

def test_many_writes_in_one_turn_reach_the_peer_in_order_in_one_flush(lt):
    channel, peer = lt.accepted()
    frames = [frame_of(b"frame %d" % i) for i in range(1000)]

    def write_all():
        for one in frames:
            channel.write(one)
        return channel.out_size

    assert lt.call(write_all) == sum(map(len, frames))  # queued until the end of the turn
    wanted = b"".join(frames)
    assert read_exactly(peer, len(wanted)) == wanted
    lt.turn()
    assert lt.call(lambda: channel.out_size) == 0
    assert channel.values("drained") == [None]  # one flush for the thousand writes


def test_output_to_a_peer_that_does_not_read_queues_and_drained_comes_once_it_reads(lt):
    channel, peer = lt.accepted()
    data = pattern(BIG)
    lt.call(channel.write, data)
    lt.turn()
    queued = lt.call(lambda: channel.out_size)
    assert 0 < queued < BIG
    assert channel.values("drained") == []
    more = pattern(1000)
    lt.call(channel.write, more)
    lt.turn()
    assert lt.call(lambda: channel.out_size) == queued + len(more)  # it grows
    assert channel.values("drained") == []
    assert read_exactly(peer, BIG + len(more)) == data + more
    assert channel.wait_for("drained") == [None]
    assert lt.call(lambda: channel.out_size) == 0


def test_close_sends_the_queued_output_then_closes(lt):
    channel, peer = lt.accepted()
    data = pattern(BIG)

    def write_and_close():
        channel.write(data)
        channel.close()

    lt.call(write_and_close)
    lt.turn()
    assert lt.call(lambda: channel.is_closed) is False  # waiting for the peer to read
    assert read_to_end(peer) == (data, "eof")
    assert channel.wait_for("closed") == [None]
    assert channel.names() == ["made", "closed"]


def test_abort_drops_the_queued_output_and_closes_at_once(lt):
    channel, peer = lt.accepted()
    data = pattern(BIG)
    lt.call(channel.write, data)
    lt.turn()

    def abort():
        dropped = channel.out_size
        channel.abort()
        return dropped, channel.out_size

    dropped, left = lt.call(abort)
    assert dropped > 0 and left == 0
    assert channel.values("closed") == [None]
    assert read_to_end(peer) == (data[:BIG - dropped], "eof")


def test_lingering_close_sends_everything_then_reads_and_drops_until_the_peer_closes(lt):
    channel, peer = lt.accepted()
    frames = [frame_of(b"last %d" % i) for i in range(3)]

    def write_and_linger():
        for one in frames:
            channel.write(one)
        channel.close(linger=True)

    lt.call(write_and_linger)
    assert read_to_end(peer) == (b"".join(frames), "eof")  # the channel shut down writes
    assert lt.call(lambda: channel.is_closed) is False  # and still reads
    peer.sendall(pattern(BIG))  # taken and dropped, never refused
    peer.close()
    assert channel.wait_for("closed") == [None]
    assert channel.names() == ["made", "closed"]


def test_lingering_close_gives_up_after_linger_seconds_on_a_silent_peer(lt, monkeypatch):
    monkeypatch.setattr(eventloop, "LINGER_SECONDS", 0.2)
    channel, peer = lt.accepted()
    start = lt.call(lambda: (channel.close(linger=True), time.monotonic())[1])
    assert read_to_end(peer) == (b"", "eof")
    assert channel.wait_for("closed") == [None]
    assert 0.2 <= time.monotonic() - start < 1.0


# --- Channel: deadlines -------------------------------------------------------------------

def test_deadline_calls_timed_out_once_at_its_time_and_a_later_one_reuses_the_entry(lt):
    channel, _ = lt.accepted()

    def arm():
        start = lt.loop.now
        channel.set_deadline(start + 0.02)
        armed = len(lt.loop._timers)
        channel.set_deadline(start + 0.05)  # later: no new heap entry
        return start, armed, len(lt.loop._timers)

    start, armed, after = lt.call(arm)
    assert after == armed
    (now,) = channel.wait_for("timed_out")
    assert start + 0.05 <= now < start + WAIT / 2
    lt.turn()
    assert channel.values("timed_out") == [now]


def test_deadline_none_cancels_and_an_earlier_deadline_re_arms(lt):
    channel, _ = lt.accepted()
    marker = threading.Event()

    def arm_then_cancel():
        channel.set_deadline(lt.loop.now + 0.02)
        channel.set_deadline(None)
        lt.loop.call_later(0.05, marker.set)

    lt.call(arm_then_cancel)
    assert marker.wait(WAIT)
    lt.turn()
    assert channel.values("timed_out") == []

    def arm_late_then_early():
        start = lt.loop.now
        channel.set_deadline(start + 30)
        armed = len(lt.loop._timers)
        channel.set_deadline(start + 0.02)  # earlier: a new heap entry
        return start, armed, len(lt.loop._timers)

    start, armed, after = lt.call(arm_late_then_early)
    assert after == armed + 1
    (now,) = channel.wait_for("timed_out")
    assert start + 0.02 <= now < start + WAIT / 2


def test_closed_channels_leave_no_buffers_and_their_timer_entries_are_compacted(lt):
    # 1000 connections, each with a 300 s deadline and half a 1 MiB frame buffered,
    # closed at once: the heap may not keep 1000 entries (nor 500 MB) for 300 s.
    count = 1000

    def open_and_close():
        start = len(lt.loop._timers)
        channels = []
        for _ in range(count):
            near, far = socket.socketpair()
            far.close()
            channel = Recorder(lt.loop, near, "peer:1")
            channel.start()
            channel.set_deadline(lt.loop.now + 300)
            channel.decoder.feed(b"\x00\x10\x00\x00" + b"x" * 1000)
            channels.append(channel)
        for channel in channels:
            channel.abort()
        return start, channels

    start, channels = lt.call(open_and_close)
    lt.turn()
    assert all(not channel.decoder.in_frame for channel in channels)
    assert len(lt.loop._timers) - start <= eventloop.STALE_TIMERS_MIN


# --- Outgoing connections -------------------------------------------------------------------

def test_connect_to_a_listener_makes_the_connection_then_frames_go_both_ways(lt):
    listener, accepted = lt.serve()
    client = lt.connecting("127.0.0.1", listener.port, first_write=frame_of(b"early"))
    client.wait_for("made")
    server = accepted.get(timeout=WAIT)
    assert server.wait_for("frames") == [([b"early"], False)]  # written before connected
    assert server.names()[0] == "made"
    lt.call(server.write, frame_of(b"back"))
    assert client.wait_for("frames") == [([b"back"], False)]
    assert client.names()[:2] == ["made", "drained"]
    assert lt.call(lambda: client.connected) is True


def test_connect_to_a_closed_port_closes_with_connection_refused(lt):
    client = lt.connecting("127.0.0.1", free_port())
    (exc,) = client.wait_for("closed")
    assert isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED
    assert client.names() == ["closed"]


def test_connect_to_an_invalid_host_name_closes_with_the_error_not_a_loop_error(
        lt, log_watch):
    client = lt.connecting("a" * 64, 2100)  # a label of 64: refused by the IDNA codec
    (exc,) = client.wait_for("closed")
    assert isinstance(exc, UnicodeError) and "label" in str(exc)
    assert client.names() == ["closed"]
    lt.turn()
    assert not any("internal error" in line for line in log_watch.lines), log_watch.lines


def test_connect_that_gets_no_answer_closes_with_connect_timeout(lt):
    # A listener whose backlog is full drops new SYNs: the connect hangs, on loopback.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        filler = socket.create_connection(full.getsockname(), timeout=WAIT)
        lt.sockets.append(filler)
        start = time.monotonic()
        client = lt.connecting("127.0.0.1", full.getsockname()[1], timeout=0.2)
        (exc,) = client.wait_for("closed")
        took = time.monotonic() - start
    assert isinstance(exc, eventloop.ConnectTimeout)
    assert str(exc) == "timed out before the connection was ready"
    assert 0.2 <= took < WAIT / 2
    assert client.names() == ["closed"]


# --- TLS ------------------------------------------------------------------------------------

@pytest.fixture
def tls(pki):
    """Server and client contexts with the throwaway CA; both sides show the leaf."""
    return (netio.server_tls_context(pki["leaf.pem"], pki["leaf.key"], pki["ca.pem"]),
            netio.client_tls_context(pki["ca.pem"], pki["leaf.pem"], pki["leaf.key"]))


def test_tls_channels_connect_and_carry_frames_both_ways(lt, tls):
    server_tls, client_tls = tls
    listener, accepted = lt.serve(tls=server_tls)
    client = lt.connecting("127.0.0.1", listener.port, tls=client_tls,
                           first_write=frame_of(b"over tls"))
    client.wait_for("made")
    server = accepted.get(timeout=WAIT)
    assert server.wait_for("frames") == [([b"over tls"], False)]
    lt.call(server.write, frame_of(b"back") * 3)
    assert sum(len(bodies) for bodies, _ in client.wait_for("frames")) == 3
    for channel in (server, client):  # mutual TLS: each side verified the other
        assert lt.call(channel.peer_certificate)["subject"] == (
            (("commonName", "localhost"),),)


def test_a_plain_client_to_a_tls_channel_closes_it_with_an_ssl_error(lt, tls):
    listener, accepted = lt.serve(tls=tls[0])
    plain = socket.create_connection(("127.0.0.1", listener.port), timeout=WAIT)
    lt.sockets.append(plain)
    plain.sendall(frame_of(b'{"type":5}'))
    server = accepted.get(timeout=WAIT)
    (exc,) = server.wait_for("closed")
    assert isinstance(exc, ssl.SSLError)
    assert server.names() == ["closed"]


def test_a_tls_client_that_does_not_trust_the_server_closes_with_a_verify_error(
        lt, tls, pki):
    listener, _ = lt.serve(tls=tls[0])
    client = lt.connecting("127.0.0.1", listener.port,
                           tls=netio.client_tls_context(pki["rogue.pem"]))
    (exc,) = client.wait_for("closed")
    assert isinstance(exc, ssl.SSLCertVerificationError)
    assert client.names() == ["closed"]


def test_tls_lingering_close_lets_the_peer_read_the_error_and_a_clean_end(lt, tls):
    server_tls, client_tls = tls
    listener, accepted = lt.serve(tls=server_tls)
    error = protocol.encode_frame(protocol.error("BAD_FRAME", "frame length is 0"))
    raw = socket.create_connection(("127.0.0.1", listener.port), timeout=WAIT)
    client = client_tls.wrap_socket(raw, server_hostname="127.0.0.1")
    lt.sockets.append(client)
    server = accepted.get(timeout=WAIT)
    server.on_frame_error = lambda exc: None  # answered below, once the input is in
    # A bad length, then more than one TLS record (16 KiB): the channel reads the
    # first record only, and the rest waits in its kernel, unread.
    client.sendall(b"\0\0\0\0" + pattern(40000))
    server.wait_for("frame_error")
    wait_until_sent(client)

    def answer_and_linger():
        server.write(error)
        server.close(linger=True)

    lt.call(answer_and_linger)
    # Without a lingering close the unread input turns the close into a reset, which
    # may destroy the ERROR frame; Python's ssl shows the reset as a plain end.
    assert read_to_end(client) == (error, "eof")
    assert lt.call(lambda: server.is_closed) is False  # still lingering
    client.close()
    assert server.wait_for("closed") == [None]


# --- Listener -------------------------------------------------------------------------------

def test_listener_hands_every_connection_of_a_burst_to_on_accept(lt):
    listener, accepted = lt.serve()
    peers = [socket.create_connection(("127.0.0.1", listener.port), timeout=WAIT)
             for _ in range(20)]
    lt.sockets.extend(peers)
    channels = [accepted.get(timeout=WAIT) for _ in peers]
    for channel in channels:
        channel.wait_for("made")
    assert sorted(channel.peer for channel in channels) == sorted(
        netio.format_address(peer.getsockname()) for peer in peers)


def test_listener_out_of_descriptors_pauses_accept_without_spinning_and_comes_back(
        lt, log_watch):
    accepted = queue.Queue()
    listener = lt.call(lambda: lt.own(eventloop.Listener(
        lt.loop, eventloop.listen_socket("127.0.0.1", 0),
        lambda sock, address: accepted.put(sock), name="test connections")))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers = []
    try:
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, hard))
        while True:
            try:
                fillers.append(socket.socket())
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        fillers.pop().close()
        client = socket.socket()  # the last descriptor: accept() has none left
        fillers.append(client)
        client.connect(("127.0.0.1", listener.port))  # the kernel completes it
        log_watch.wait_for("cannot accept test connections")
        assert lt.call(lambda: listener.sock in lt.loop.selector.get_map()) is False
        cpu = lt.cpu_over(0.3)  # retries on a timer: 5 ms, 10 ms, ... not a busy loop
        assert cpu < 0.05, f"the loop thread used {cpu:.3f} s of CPU in 0.3 s"
        # Two descriptors free: the next retry accepts, and the accept() after it
        # finds no connection waiting (with none free it would fail EMFILE again).
        fillers.pop(0).close()
        fillers.pop(0).close()
        accepted.get(timeout=WAIT).close()
        assert lt.call(lambda: listener.sock in lt.loop.selector.get_map()) is True
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for sock in fillers:
            sock.close()
    # Said once (the log may also hold lines of other listeners of this process that
    # the lowered limit touched: only this one's count here).
    assert log_watch.count("cannot accept test connections") == 1


# --- listen_socket --------------------------------------------------------------------------

def accept_one(listening, host):
    """Connect to ``listening`` from ``host``; return the address accept() saw."""
    with listening, socket.create_connection((host, listening.getsockname()[1]),
                                             timeout=WAIT) as client:
        listening.settimeout(WAIT)
        accepted, address = listening.accept()
        with accepted:
            client.sendall(b"x")
            assert accepted.recv(1) == b"x"
        return address


def test_listen_socket_on_127_0_0_1_port_0_gets_a_port_and_accepts():
    listening = eventloop.listen_socket("127.0.0.1", 0)
    host, port = listening.getsockname()
    assert (listening.family, host) == (socket.AF_INET, "127.0.0.1") and port > 0
    assert accept_one(listening, "127.0.0.1")[0] == "127.0.0.1"


def ipv6_listener(host):
    try:
        return eventloop.listen_socket(host, 0)
    except OSError as exc:
        pytest.skip(f"no IPv6 here: cannot listen on {host}: {exc}")


def test_listen_socket_on_ipv6_loopback_accepts():
    if not socket.has_ipv6:
        pytest.skip("Python was built without IPv6")
    listening = ipv6_listener("::1")
    assert listening.family == socket.AF_INET6
    assert accept_one(listening, "::1")[0] == "::1"


def test_listen_socket_on_double_colon_is_dual_stack_and_accepts_ipv4():
    if not socket.has_dualstack_ipv6():
        pytest.skip("no dual-stack IPv6 sockets here")
    listening = ipv6_listener("::")
    assert listening.family == socket.AF_INET6
    assert listening.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    assert accept_one(listening, "127.0.0.1")[0] == "::ffff:127.0.0.1"
