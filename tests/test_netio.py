"""In-process tests of netio's blocking I/O layer (PROTOCOL.md sections 1, 3 and 9).

After websockets' ``tests/sync/test_connection.py``: a ``Connection`` is built over one
end of ``socket.socketpair()`` (or of a loopback TCP pair where TCP's reset matters),
the test plays the peer on the other end, and every edge is reached without a
process: frames split anywhere, idle and stalled-frame timeouts (the idle timeout
bounds a wait inside a frame too), bad messages, fatal errors and the lingering
close, half-close, wake, send timeout, the first bytes that tell a TLS peer, and TLS
files that are not what they should be (named in the error). ``Signals`` is tested
in the main thread with its handlers restored after each test, and ``FramedServer``
runs in a thread of the test.

Where a test needs time to pass inside ``Connection`` it moves a fake clock
(``clock``) instead of sleeping; where it needs the kernel to hand over bytes in
given pieces it uses ``ShortReads``, a real socket whose ``recv`` returns short reads
of the sizes the test chose (the kernel may return any). Every wait is bounded by
``WAIT``; a passing test takes well under a second. A bound on how long something
took is set halfway between the time it must take and the time a wrong code path
would take, so that a loaded machine does not fail it.
"""

import bisect
import collections
import fcntl
import itertools
import os
import select
import signal
import socket
import termios
import threading
import time
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import netio
import protocol
from conftest import WAIT
from protocol import FrameError, FrameTooLarge, MessageError, MessageType, encode_frame

# Hypothesis: about a second in all, no example database written to the work tree.
FAST = settings(deadline=None, max_examples=200, database=None,
                suppress_health_check=[HealthCheck.too_slow])

PAIR_KINDS = ["socketpair", "tcp"]


# --- Helpers ------------------------------------------------------------------------

def nth_data(n):
    """DATA message number ``n``: a different payload each."""
    return protocol.data("c1", "111", f"payload {n}")


BAD_BODY = b"not json"
BAD_BODY_MESSAGE = "frame body is not valid JSON: Expecting value: line 1 column 1 (char 0)"
BAD_BODY_ERROR = f"BAD_MESSAGE: {BAD_BODY_MESSAGE}"


def tcp_pair():
    """Two connected TCP sockets on 127.0.0.1 (the listening socket is closed)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname(), timeout=WAIT)
        far, _ = listener.accept()
    near.settimeout(None)
    return near, far


def read_to_end(sock, timeout=WAIT):
    """Read frames from ``sock`` until the peer's end; return ``(messages, ending)``:
    the parsed messages in order, and ``"eof"`` for a clean end, ``"reset"`` for a
    reset. Bounded by ``timeout`` seconds."""
    decoder = protocol.FrameDecoder()
    messages = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no end of stream within {timeout} s; got {messages}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return messages, "reset"
        if not chunk:
            assert not decoder.in_frame, f"the stream ended inside a frame after {messages}"
            return messages, "eof"
        decoder.feed(chunk)
        bodies, error = decoder.frames()
        assert error is None, error
        messages.extend(protocol.parse_message(body) for body in bodies)


def unread_bytes(sock):
    """Bytes waiting in the kernel to be read from ``sock`` (FIONREAD)."""
    return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"),
                          "little")


class ShortReads(socket.socket):
    """A real socket whose ``recv`` stops at the given byte offsets of the stream: the
    kernel may end a read anywhere, this socket ends them where the test says.

    Args:
        sock: a connected socket, taken over (detached).
        ends: offsets in the received stream (increasing) at which a read ends.

    Attributes:
        before_read: None, or ``f(position)`` called as each ``recv`` begins with the
            number of bytes read so far (a test moves its clock there).
    """

    def __init__(self, sock, ends):
        super().__init__(fileno=sock.detach())
        self.ends = collections.deque(ends)
        self.position = 0
        self.before_read = None

    def _limit(self, size):
        if self.before_read is not None:
            self.before_read(self.position)
        while self.ends and self.ends[0] <= self.position:
            self.ends.popleft()
        return min(size, self.ends[0] - self.position) if self.ends else size

    def recv(self, bufsize, flags=0):
        chunk = super().recv(self._limit(bufsize), flags)
        self.position += len(chunk)
        return chunk

    def recv_into(self, buffer, nbytes=0, flags=0):
        size = super().recv_into(buffer, self._limit(nbytes or len(buffer)), flags)
        self.position += size
        return size


class Kit:
    """The sockets and threads of one test, all closed or joined at its end."""

    def __init__(self):
        self.sockets = []
        self.threads = []

    def pair(self, kind="socketpair", max_frame=protocol.DEFAULT_MAX_FRAME, ends=None,
             send_timeout=netio.SEND_TIMEOUT):
        """A ``Connection`` over one end of a fresh pair, and the other end (a blocking
        socket, the peer). ``kind``: "socketpair" or "tcp"; ``ends``: wrap the
        connection's end in ``ShortReads(sock, ends)``."""
        near, far = socket.socketpair() if kind == "socketpair" else tcp_pair()
        if ends is not None:
            near = ShortReads(near, ends)
        self.sockets += [near, far]
        return netio.Connection(near, max_frame=max_frame, peer="peer:1",
                                send_timeout=send_timeout), far

    def spawn(self, target, *args):
        """Run ``target(*args)`` in a thread; return a handle whose ``result()`` joins
        it (bounded) and returns its value or raises its exception."""
        handle = types.SimpleNamespace(value=None, error=None)
        thread = threading.Thread(target=self._run, args=(handle, target, args), daemon=True)
        handle.thread = thread

        def result(timeout=WAIT):
            thread.join(timeout)
            assert not thread.is_alive(), f"{target.__name__} still running after {timeout} s"
            if handle.error is not None:
                raise handle.error
            return handle.value

        handle.result = result
        self.threads.append(thread)
        thread.start()
        return handle

    @staticmethod
    def _run(handle, target, args):
        try:
            handle.value = target(*args)
        except BaseException as exc:  # handed to the test thread by result()
            handle.error = exc

    def close(self):
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked on it
            except OSError:
                pass
        for thread in self.threads:
            thread.join(WAIT)
        for sock in self.sockets:
            sock.close()
        stuck = [thread.name for thread in self.threads if thread.is_alive()]
        assert not stuck, f"threads still running at the end of the test: {stuck}"


@pytest.fixture
def kit():
    made = Kit()
    yield made
    made.close()


class FakeClock:
    """``time.monotonic`` plus an offset the test moves: netio sees time pass at once."""

    def __init__(self):
        self.offset = 0.0

    def monotonic(self):
        return time.monotonic() + self.offset

    def advance(self, seconds):
        self.offset += seconds


@pytest.fixture
def clock(monkeypatch):
    """A FakeClock that netio reads as its ``time`` module."""
    fake = FakeClock()
    monkeypatch.setattr(netio, "time", types.SimpleNamespace(monotonic=fake.monotonic))
    return fake


def timed(call, *args, **kwargs):
    """Call ``call``; return ``(exception raised or None, seconds it took)``."""
    start = time.monotonic()
    try:
        call(*args, **kwargs)
    except Exception as exc:
        return exc, time.monotonic() - start
    return None, time.monotonic() - start


# --- Receiving across any split (section 1: "however the bytes were split") --------

_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=24)
_IDS = st.one_of(st.integers(0, 2 ** 31), _TEXT.filter(bool))
_MESSAGES = st.one_of(
    st.builds(protocol.data, _IDS, _IDS, _TEXT),
    st.builds(protocol.error, st.sampled_from([protocol.BAD_MESSAGE, protocol.TIMEOUT]), _TEXT),
    st.builds(protocol.ack_for, _IDS, st.builds(protocol.data, _IDS, _IDS, _TEXT)),
    st.just(protocol.ping()),
    st.just(protocol.pong()),
)
# Mostly valid messages, some bodies that are not (random bytes: BAD_MESSAGE items).
_BODIES = st.one_of(_MESSAGES.map(lambda message: encode_frame(message)[4:]),
                    st.binary(min_size=1, max_size=40))
MAX_FRAME = 1024


def expected_item(body):
    """What the connection must hand out for ``body``: the message or its MessageError."""
    try:
        return protocol.parse_message(body)
    except MessageError as exc:
        return exc


def same_item(got, want):
    if isinstance(want, MessageError):
        return type(got) is MessageError and str(got) == str(want)
    return got == want


def model_batches(frame_ends, error_at, read_ends):
    """What ``receive_batch`` must return, call after call, when the reads end at
    ``read_ends``: lists of frame indexes (the frames one read completed, and only
    those), then ``"error"`` (FrameError: a bad length prefix starts at ``error_at``)
    or ``"eof"``."""
    calls, done, position = [], 0, 0
    reads = iter(read_ends)
    while True:
        complete = bisect.bisect_right(frame_ends, position)
        if complete > done:
            calls.append(list(range(done, complete)))
            done = complete
            continue
        if error_at is not None and position >= error_at + protocol.HEADER_SIZE:
            return calls + ["error"]
        position = next(reads, None)
        if position is None:
            return calls + ["eof"]


@FAST
@given(bodies=st.lists(_BODIES, max_size=8),
       tail=st.sampled_from(["none", "partial", "bad_length", "too_large"]),
       data_=st.data())
def test_receive_batch_hands_out_each_frame_once_in_order_however_the_reads_split(
        bodies, tail, data_):
    stream = b"".join(protocol.frame_of(body) for body in bodies)
    frame_ends = list(itertools.accumulate(len(body) + 4 for body in bodies))
    error_at = None
    if tail == "partial":
        stream += encode_frame(nth_data(1))[:data_.draw(st.integers(1, 20), "partial bytes")]
    elif tail == "bad_length":
        error_at = len(stream)
        stream += b"\0\0\0\0" + encode_frame(nth_data(2))
    elif tail == "too_large":
        error_at = len(stream)
        stream += (MAX_FRAME + 1).to_bytes(4, "big") + b"x" * 8
    splits = data_.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=12)
                        if stream else st.just(set()), "split points")
    read_ends = sorted(splits | {len(stream)}) if stream else []
    kit = Kit()
    try:
        conn, peer = kit.pair(max_frame=MAX_FRAME, ends=read_ends)
        for start, end in zip([0] + read_ends, read_ends):
            peer.sendall(stream[start:end])  # fed from the other end, piece by piece
        peer.shutdown(socket.SHUT_WR)
        for call in model_batches(frame_ends, error_at, read_ends):
            if call == "eof":
                assert conn.receive_batch(WAIT, WAIT) == []
            elif call == "error":
                with pytest.raises(FrameError) as caught:
                    conn.receive_batch(WAIT, WAIT)
                assert caught.value.code == ("BAD_FRAME" if tail == "bad_length"
                                             else "FRAME_TOO_LARGE")
            else:
                items = conn.receive_batch(WAIT, WAIT)
                wanted = [expected_item(bodies[i]) for i in call]
                assert len(items) == len(wanted), (items, wanted)
                assert all(map(same_item, items, wanted)), (items, wanted)
    finally:
        kit.close()


@FAST
@given(bodies=st.lists(_BODIES, min_size=1, max_size=8), data_=st.data())
def test_receive_hands_out_one_item_at_a_time_and_raises_each_bad_message_in_place(
        bodies, data_):
    stream = b"".join(protocol.frame_of(body) for body in bodies)
    splits = data_.draw(st.sets(st.integers(1, len(stream) - 1), max_size=12), "splits")
    read_ends = sorted(splits | {len(stream)})
    kit = Kit()
    try:
        conn, peer = kit.pair(ends=read_ends)
        peer.sendall(stream)
        peer.shutdown(socket.SHUT_WR)
        for body in bodies:
            want = expected_item(body)
            if isinstance(want, MessageError):
                with pytest.raises(MessageError) as caught:
                    conn.receive(WAIT, WAIT)
                assert str(caught.value) == str(want)
            else:
                assert conn.receive(WAIT, WAIT) == want
        assert conn.receive(WAIT, WAIT) is None
    finally:
        kit.close()


def test_receive_batch_returns_a_frame_sent_a_byte_at_a_time_by_a_live_peer(kit):
    conn, peer = kit.pair()
    whole = encode_frame(nth_data(1))

    def dribble():
        for i in range(len(whole)):
            peer.sendall(whole[i:i + 1])

    feeder = kit.spawn(dribble)
    assert conn.receive_batch(WAIT, WAIT) == [nth_data(1)]
    feeder.result()


# --- Bad messages and bad length prefixes (section 1) --------------------------------

def test_receive_batch_returns_the_bad_message_error_in_order_and_reading_goes_on(kit):
    conn, peer = kit.pair()
    peer.sendall(encode_frame(nth_data(1)) + protocol.frame_of(BAD_BODY)
                 + encode_frame(nth_data(2)))
    items = conn.receive_batch(WAIT, WAIT)
    assert [type(item) for item in items] == [dict, MessageError, dict]
    assert (items[0], str(items[1]), items[2]) == (nth_data(1), BAD_BODY_ERROR, nth_data(2))
    assert items[1].code == "BAD_MESSAGE"
    peer.sendall(encode_frame(nth_data(3)))
    assert conn.receive_batch(WAIT, WAIT) == [nth_data(3)]


def test_receive_raises_the_bad_message_and_the_next_receive_returns_the_next_frame(kit):
    conn, peer = kit.pair()
    peer.sendall(encode_frame(nth_data(1)) + protocol.frame_of(BAD_BODY)
                 + encode_frame(nth_data(2)))
    assert conn.receive(WAIT, WAIT) == nth_data(1)
    with pytest.raises(MessageError) as caught:
        conn.receive(WAIT, WAIT)
    assert str(caught.value) == BAD_BODY_ERROR
    assert conn.receive(WAIT, WAIT) == nth_data(2)
    peer.sendall(encode_frame(nth_data(3)))
    assert conn.receive(WAIT, WAIT) == nth_data(3)


@pytest.mark.parametrize("prefix, error, code", [
    (b"\0\0\0\0", FrameError, "BAD_FRAME"),
    ((MAX_FRAME + 1).to_bytes(4, "big"), FrameTooLarge, "FRAME_TOO_LARGE"),
])
def test_bad_length_prefix_raises_frame_error_after_the_good_frames_before_it(
        kit, prefix, error, code):
    conn, peer = kit.pair(max_frame=MAX_FRAME)
    peer.sendall(encode_frame(nth_data(1)) + encode_frame(nth_data(2)) + prefix
                 + encode_frame(nth_data(3)))
    assert conn.receive_batch(WAIT, WAIT) == [nth_data(1), nth_data(2)]
    for _ in range(2):  # the stream is out of step for good
        with pytest.raises(error) as caught:
            conn.receive_batch(WAIT, WAIT)
        assert caught.value.code == code


def test_receive_at_eof_in_the_middle_of_a_frame_drops_it_and_returns_none(kit):
    conn, peer = kit.pair()
    peer.sendall(encode_frame(nth_data(1)) + encode_frame(nth_data(2))[:9])
    peer.shutdown(socket.SHUT_WR)
    assert conn.receive(WAIT, WAIT) == nth_data(1)
    assert conn.receive(WAIT, WAIT) is None


# --- Idle timeout, frame timeout, deadline (section 10) --------------------------------

def test_idle_timeout_between_frames_raises_connection_timeout_not_mid_frame(kit):
    conn, peer = kit.pair()
    exc, took = timed(conn.receive_batch, idle_timeout=0.05, frame_timeout=WAIT)
    assert isinstance(exc, netio.ConnectionTimeout) and exc.mid_frame is False
    assert str(exc) == "timed out waiting for a frame from peer:1"
    assert 0.05 <= took < WAIT / 2


def test_stalled_frame_raises_connection_timeout_mid_frame_after_frame_timeout(kit):
    conn, peer = kit.pair()
    peer.sendall(encode_frame(nth_data(1))[:6])
    exc, took = timed(conn.receive_batch, idle_timeout=WAIT, frame_timeout=0.05)
    assert isinstance(exc, netio.ConnectionTimeout) and exc.mid_frame is True
    assert str(exc) == "timed out waiting for the rest of a frame from peer:1"
    assert 0.05 <= took < WAIT / 2  # the frame timeout, not the idle timeout


def test_frame_timeout_counts_from_the_first_byte_not_from_the_last(kit, clock):
    conn, peer = kit.pair(ends=[1, 2])  # two reads of one byte each, then a wait
    peer.sendall(encode_frame(nth_data(1))[:2])

    def second_byte_late(position):
        if position == 1:
            clock.advance(1.9)  # the second byte comes 1.9 s after the first...

    conn.sock.before_read = second_byte_late
    # ... so 0.1 s of the 2 s frame timeout is left for the rest, not 2 s.
    exc, took = timed(conn.receive_batch, idle_timeout=WAIT, frame_timeout=2.0)
    assert isinstance(exc, netio.ConnectionTimeout) and exc.mid_frame is True
    assert took < 1.0


def test_deadline_bounds_an_idle_wait_with_no_idle_timeout(kit):
    conn, peer = kit.pair()
    exc, took = timed(conn.receive_batch, deadline=netio.Deadline(0.05))
    assert isinstance(exc, netio.ConnectionTimeout) and exc.mid_frame is False
    assert 0.04 <= took < WAIT / 2


def test_deadline_cuts_a_longer_frame_timeout_short_mid_frame(kit):
    conn, peer = kit.pair()
    peer.sendall(encode_frame(nth_data(1))[:3])
    exc, took = timed(conn.receive_batch, idle_timeout=WAIT, frame_timeout=WAIT,
                      deadline=netio.Deadline(0.05))
    assert isinstance(exc, netio.ConnectionTimeout) and exc.mid_frame is True
    assert 0.04 <= took < WAIT / 2


def test_deadline_already_passed_raises_at_once(kit):
    conn, peer = kit.pair()
    exc, took = timed(conn.receive_batch, deadline=netio.Deadline(-1.0))
    assert isinstance(exc, netio.ConnectionTimeout) and exc.mid_frame is False
    assert took < WAIT / 2


@pytest.mark.parametrize("frame_timeout", [None, WAIT])
def test_idle_timeout_bounds_the_wait_inside_a_frame_too(kit, frame_timeout):
    # A peer that sends half a length prefix and falls silent is silent: with no
    # frame timeout (a client's -timeout, a server's session) the wait used to be
    # unbounded.
    conn, peer = kit.pair()
    peer.sendall(b"\x00\x00")
    exc, took = timed(conn.receive_batch, idle_timeout=0.05, frame_timeout=frame_timeout)
    assert isinstance(exc, netio.ConnectionTimeout)
    assert (exc.mid_frame, exc.bound) == (True, "idle")
    assert str(exc) == "timed out waiting for the rest of a frame from peer:1"
    assert 0.05 <= took < WAIT / 2
    # Each wait is bounded again, and the frame goes on where it was.
    exc, took = timed(conn.receive_batch, idle_timeout=0.05, frame_timeout=frame_timeout)
    assert (exc.mid_frame, exc.bound) == (True, "idle") and took < WAIT / 2
    peer.sendall(encode_frame(nth_data(1))[2:])
    assert conn.receive_batch(idle_timeout=0.05, frame_timeout=frame_timeout) == [nth_data(1)]


def test_the_frame_timeout_bounds_a_frame_whose_bytes_keep_coming(kit, clock):
    conn, peer = kit.pair(ends=[1, 2, 3])  # one byte per read
    peer.sendall(encode_frame(nth_data(1))[:3])

    def each_byte_late(position):
        if position:
            clock.advance(0.6)  # every byte within the idle timeout of the one before

    conn.sock.before_read = each_byte_late
    exc, _ = timed(conn.receive_batch, idle_timeout=1.0, frame_timeout=1.0)
    assert (exc.mid_frame, exc.bound) == (True, "frame")


def test_the_bound_that_ran_out_is_named(kit):
    conn, peer = kit.pair()
    exc, _ = timed(conn.receive_batch, idle_timeout=WAIT, deadline=netio.Deadline(0.01))
    assert (exc.mid_frame, exc.bound) == (False, "deadline")
    exc, _ = timed(conn.receive_batch, idle_timeout=0.01, deadline=netio.Deadline(WAIT))
    assert (exc.mid_frame, exc.bound) == (False, "idle")


def test_a_receive_after_a_timeout_goes_on_with_the_bytes_already_read(kit):
    conn, peer = kit.pair()
    whole = encode_frame(nth_data(1))
    peer.sendall(whole[:5])
    with pytest.raises(netio.ConnectionTimeout):
        conn.receive_batch(idle_timeout=WAIT, frame_timeout=0.02)
    peer.sendall(whole[5:])
    assert conn.receive_batch(WAIT, WAIT) == [nth_data(1)]


def test_frame_whose_rest_came_in_time_is_received_after_a_slow_caller(kit, clock):
    first, second = encode_frame(nth_data(1)), encode_frame(nth_data(2))
    # The first read brings frame 1 and the start of frame 2, the second the rest.
    conn, peer = kit.pair(ends=[len(first) + 3])
    peer.sendall(first + second)
    assert conn.receive_batch(idle_timeout=WAIT, frame_timeout=1.0) == [nth_data(1)]
    clock.advance(2.0)  # answering frame 1 took 2 s; frame 2 arrived long before
    assert conn.receive_batch(idle_timeout=WAIT, frame_timeout=1.0) == [nth_data(2)]


# --- next_batch: fatal faults get one ERROR frame and a lingering close -----------------

@pytest.mark.parametrize("kind", PAIR_KINDS)
def test_next_batch_answers_a_bad_length_with_one_error_then_a_lingering_close(kit, kind):
    conn, peer = kit.pair(kind)
    # Bytes the connection will never read follow the bad prefix: without a lingering
    # close they would turn the close into a reset.
    unread = b"\0\0\0\0" + b"u" * 300_000
    sender = kit.spawn(peer.sendall, encode_frame(nth_data(1)) + unread)
    assert conn.next_batch(WAIT, WAIT) == [nth_data(1)]

    def read_then_close():
        try:
            ending = read_to_end(peer)
            sender.result()  # every byte the peer sent was taken, none refused by a reset
            return ending
        finally:
            peer.close()  # the end of the lingering close

    reader = kit.spawn(read_then_close)
    assert conn.next_batch(WAIT, WAIT) is None
    messages, ending = reader.result()
    assert messages == [protocol.error(
        "BAD_FRAME", "frame length is 0; a frame body holds at least 1 byte")]
    assert ending == "eof"
    assert conn.sock.fileno() == -1


@pytest.mark.parametrize("sent, timeouts, why", [
    (7, {"idle_timeout": WAIT, "frame_timeout": 0.05},
     "a frame took longer than 0.05 s to arrive (frame timeout)"),
    (3, {"idle_timeout": 0.05, "frame_timeout": WAIT},
     "nothing came for 0.05 s in the middle of a frame (idle timeout)"),
], ids=["frame timeout", "silence inside a frame"])
def test_next_batch_answers_a_stalled_frame_with_one_timeout_error_naming_it_then_closes(
        kit, sent, timeouts, why):
    conn, peer = kit.pair()
    peer.sendall(encode_frame(nth_data(1))[:sent])

    def read_then_close():
        try:
            return read_to_end(peer)
        finally:
            peer.close()

    reader = kit.spawn(read_then_close)
    assert conn.next_batch(**timeouts) is None
    assert reader.result() == ([protocol.error("TIMEOUT", f"{why}; closing")], "eof")
    assert conn.sock.fileno() == -1


def test_next_batch_raises_the_idle_timeout_and_sends_nothing(kit):
    conn, peer = kit.pair()
    with pytest.raises(netio.ConnectionTimeout) as caught:
        conn.next_batch(idle_timeout=0.02, frame_timeout=WAIT)
    assert caught.value.mid_frame is False
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(1)


def test_next_batch_returns_bad_messages_in_order_for_the_caller_to_answer(kit):
    conn, peer = kit.pair()
    peer.sendall(protocol.frame_of(BAD_BODY) + encode_frame(nth_data(1)))
    items = conn.next_batch(WAIT, WAIT)
    assert [str(item) if isinstance(item, MessageError) else item for item in items] == [
        BAD_BODY_ERROR, nth_data(1)]


def test_next_batch_returns_none_when_the_peer_closes(kit):
    conn, peer = kit.pair()
    peer.sendall(encode_frame(nth_data(1)))
    peer.close()
    assert conn.next_batch(WAIT, WAIT) == [nth_data(1)]
    assert conn.next_batch(WAIT, WAIT) is None


# --- What the first bytes say of the peer ------------------------------------------------

@pytest.mark.parametrize("head, tls", [
    (b"", True),            # reset or closed before a word: CPython's ssl server does that
    (b"\x15\x03", True),    # a TLS alert record
    (b"\x16\x03", True),    # a TLS handshake record
    (b"\x15", True),        # the first byte of one, the connection ended there
    (b"\x00\x00", False),   # a length prefix
    (b"\x15\x00", False),
    (b"HT", False),         # an HTTP server
])
def test_may_speak_tls(head, tls):
    assert netio.may_speak_tls(head) is tls


def test_head_keeps_the_first_two_bytes_of_the_stream_however_they_came(kit):
    conn, peer = kit.pair(ends=[1, 5])
    peer.sendall(encode_frame(nth_data(1)) + encode_frame(nth_data(2)))
    assert conn.receive_batch(WAIT, WAIT) == [nth_data(1), nth_data(2)]
    assert conn.head == encode_frame(nth_data(1))[:2]


# --- Half-close, wake, send timeout ---------------------------------------------------

@pytest.mark.parametrize("kind", PAIR_KINDS)
def test_half_close_gives_the_peer_eof_and_the_peer_can_still_answer(kit, kind):
    conn, peer = kit.pair(kind)
    conn.send(nth_data(1))
    assert conn.half_close() is True
    assert read_to_end(peer) == ([nth_data(1)], "eof")
    peer.sendall(encode_frame(nth_data(2)))
    assert conn.receive(WAIT, WAIT) == nth_data(2)


@pytest.mark.parametrize("kind", PAIR_KINDS)
def test_wake_makes_a_blocked_receive_in_another_thread_return_none(kit, kind):
    conn, peer = kit.pair(kind)
    peer.sendall(encode_frame(nth_data(1))[:5])  # the reader is inside a frame, waiting
    reader = kit.spawn(conn.receive, WAIT, WAIT)
    deadline = time.monotonic() + WAIT
    while unread_bytes(conn.sock) and time.monotonic() < deadline:
        time.sleep(0.001)  # until the reader has taken the bytes and waits for more
    start = time.monotonic()
    conn.wake()
    assert reader.result() is None
    assert time.monotonic() - start < WAIT / 2


def test_wake_lets_receive_return_what_is_buffered_first(kit):
    conn, peer = kit.pair()
    peer.sendall(encode_frame(nth_data(1)) + encode_frame(nth_data(2)))
    conn.wake()
    assert conn.receive(WAIT, WAIT) == nth_data(1)
    assert conn.receive(WAIT, WAIT) == nth_data(2)
    assert conn.receive(WAIT, WAIT) is None


# A payload larger than any socket buffer, so that a peer that reads nothing blocks the
# sender (Linux's largest default tcp_wmem is 4 MiB).
BIG = {"type": 0, "srcid": "c1", "privPoliId": "111", "payload": "x" * (8 << 20)}


def test_send_to_a_peer_that_never_reads_times_out_after_send_timeout(kit):
    conn, peer = kit.pair(send_timeout=0.2)
    peer.sendall(encode_frame(nth_data(1)))
    # The last receive left the socket blocking (no timeout): the send must not
    # inherit that and block for ever.
    assert conn.receive(idle_timeout=None) == nth_data(1)
    exc, took = kit.spawn(timed, conn.send, BIG).result(timeout=WAIT / 2)
    assert isinstance(exc, socket.timeout)
    assert 0.2 <= took < WAIT / 2


def test_send_does_not_inherit_the_last_receive_timeout(kit):
    conn, peer = kit.pair(send_timeout=0.3)
    with pytest.raises(netio.ConnectionTimeout):
        conn.receive(idle_timeout=0.01)  # leaves a 0.01 s timeout on the socket
    exc, took = timed(conn.send, BIG)
    assert isinstance(exc, socket.timeout)
    assert 0.3 <= took < WAIT / 2


# --- Signals ------------------------------------------------------------------------

@pytest.fixture
def signals():
    """Make ``netio.Signals`` for the test; restore the handlers and the wake-up fd."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be set in the main thread")
    watched = (signal.SIGUSR1, signal.SIGUSR2)
    saved = {signum: signal.getsignal(signum) for signum in watched}
    made = []

    def make():
        made.append(netio.Signals(watched))
        return made[-1]

    try:
        yield make
    finally:
        signal.set_wakeup_fd(-1)
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        for one in made:  # Signals has no close(): its socket pair is closed here
            one._reader.close()
            one._writer.close()


def test_signals_post_from_another_thread_delivers_the_numbers_to_wait_in_order(
        signals, kit):
    caught = signals()
    kit.spawn(lambda: (caught.post(signal.SIGUSR2), caught.post(signal.SIGUSR1))).result()
    assert caught.wait(WAIT) == [signal.SIGUSR2, signal.SIGUSR1]


def test_signals_wait_with_a_timeout_returns_an_empty_list_when_nothing_comes(signals):
    caught = signals()
    start = time.monotonic()
    assert caught.wait(0.05) == []
    assert 0.05 <= time.monotonic() - start < WAIT / 2


def test_signals_wait_without_timeout_returns_what_another_thread_posts(signals, kit):
    caught = signals()
    kit.spawn(caught.post, signal.SIGUSR1)
    assert caught.wait() == [signal.SIGUSR1]


def test_signals_deliver_a_real_signal_through_the_wakeup_fd(signals):
    caught = signals()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert caught.wait(WAIT) == [signal.SIGUSR1]
    assert signal.getsignal(signal.SIGUSR1) is netio._no_work


def test_run_until_stopped_hands_other_signals_to_on_signal_then_stops(signals):
    caught = signals()
    server = AckServer(("127.0.0.1", 0))
    seen, stops = [], []
    for signum in (signal.SIGUSR1, signal.SIGHUP, signal.SIGUSR2, signal.SIGTERM):
        caught.post(signum)
    netio.run_until_stopped(server, lambda: stops.append(len(seen)), caught,
                            drain_timeout=WAIT, on_signal=seen.append)
    assert seen == [signal.SIGUSR1, signal.SIGHUP, signal.SIGUSR2]
    assert stops == [3]  # once, after the others
    assert server.socket.fileno() == -1


# --- TLS files ----------------------------------------------------------------------------

@pytest.fixture
def not_pem(tmp_path):
    path = tmp_path / "hostname"
    path.write_text("myhost\n", encoding="ascii")
    return str(path)


# Arguments of server_tls_context (names of files), and the error; {0}, {1}, {2}: the
# paths of those arguments.
TLS_FILES = {
    "certificate not PEM": (("not_pem", "leaf.key"), "'{0}' holds no PEM certificate"),
    "key not PEM": (("leaf.pem", "not_pem"), "'{1}' holds no PEM private key"),
    "key of another certificate": (("leaf.pem", "rogueleaf.key"),
                                   "the key '{1}' is not the key of the certificate '{0}'"),
    "CA not PEM": (("leaf.pem", "leaf.key", "not_pem"), "'{2}' holds no PEM certificate"),
    "missing": (("leaf.pem", "missing"), "cannot read '{1}': No such file or directory"),
}


@pytest.mark.parametrize("names, message", TLS_FILES.values(), ids=TLS_FILES.keys())
def test_tls_file_errors_name_the_file_at_fault(pki, not_pem, tmp_path, names, message):
    paths = {**pki, "not_pem": not_pem, "missing": str(tmp_path / "missing.pem")}
    arguments = [paths[name] for name in names]
    with pytest.raises(ValueError) as caught:
        netio.server_tls_context(*arguments)
    assert str(caught.value) == message.format(*arguments)


def test_client_tls_ca_error_names_the_file(not_pem):
    with pytest.raises(ValueError) as caught:
        netio.client_tls_context(not_pem)
    assert str(caught.value) == f"'{not_pem}' holds no PEM certificate"


# --- FramedServer in a thread of the test ----------------------------------------------

class AckServer(netio.FramedServer):
    """Answers every DATA with its ACK (server id "s9"), PING with PONG and a bad message
    with its ERROR, all the frames of one read in one write. ``on_batch(conn, items)``,
    when set, runs before each answer (a test's hook)."""

    on_batch = None

    def handle_connection(self, conn):
        while True:
            items = conn.next_batch(idle_timeout=WAIT, frame_timeout=WAIT)
            if items is None:
                return
            if self.on_batch is not None:
                self.on_batch(conn, items)
            conn.send_frames([encode_frame(self.answer(item)) for item in items])

    @staticmethod
    def answer(item):
        if isinstance(item, MessageError):
            return protocol.error_message(item)
        if item["type"] == MessageType.PING:
            return protocol.pong()
        return protocol.ack_for("s9", item)


@pytest.fixture
def framed_server():
    """Start an AckServer on 127.0.0.1 port 0 serving in a thread; shut down at the end."""
    started = []

    def start(**options):
        server = AckServer(("127.0.0.1", 0), **options)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  name="accept", daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.shutdown()
        server.drain(WAIT)
        server.server_close()
        thread.join(WAIT)
        assert not thread.is_alive()


def test_framed_server_answers_frames_on_a_connection_from_connect(framed_server, kit):
    server = framed_server()
    conn = netio.connect("127.0.0.1", server.port, timeout=WAIT)
    kit.sockets.append(conn.sock)
    assert conn.peer == f"127.0.0.1:{server.port}"
    conn.send_frames([encode_frame(nth_data(1)), encode_frame(protocol.ping()),
                      protocol.frame_of(BAD_BODY)])
    answers = [conn.receive(WAIT, WAIT) for _ in range(3)]
    assert answers == [protocol.ack_for("s9", nth_data(1)), protocol.pong(),
                       protocol.error("BAD_MESSAGE", BAD_BODY_MESSAGE)]


def test_framed_server_past_max_conns_answers_overloaded_and_closes(framed_server, kit):
    server = framed_server(max_conns=1)
    first = netio.connect("127.0.0.1", server.port, timeout=WAIT)
    kit.sockets.append(first.sock)
    first.send(protocol.ping())
    assert first.receive(WAIT, WAIT) == protocol.pong()  # its handler holds the one slot
    second = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    kit.sockets.append(second)
    assert read_to_end(second) == ([protocol.error(
        "OVERLOADED", "the server has 1 connection open, its maximum (-max-conns); try "
        "again later")],
        "eof")
    first.send(nth_data(1))  # the first connection is still served
    assert first.receive(WAIT, WAIT) == protocol.ack_for("s9", nth_data(1))


def test_framed_server_drain_lets_a_handler_answer_what_it_received_then_joins_it(
        framed_server, kit):
    server = framed_server()
    first_batch, woken = threading.Event(), threading.Event()

    def on_batch(conn, items):
        if not first_batch.is_set():
            wake = conn.wake

            def wake_and_tell():  # drain wakes the handler while it is busy
                wake()
                woken.set()

            conn.wake = wake_and_tell
            first_batch.set()
            assert woken.wait(WAIT)

    server.on_batch = on_batch
    client = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    kit.sockets.append(client)
    client.sendall(encode_frame(nth_data(1)))
    assert first_batch.wait(WAIT)
    client.sendall(encode_frame(nth_data(2)))  # received by the kernel, not yet by the handler
    (handler_conn,) = server.connections
    readable, _, _ = select.select([handler_conn.sock], [], [], WAIT)
    assert readable
    server.shutdown()
    start = time.monotonic()
    assert server.drain(WAIT) is True
    assert time.monotonic() - start < WAIT / 2
    assert read_to_end(client) == ([protocol.ack_for("s9", nth_data(1)),
                                    protocol.ack_for("s9", nth_data(2))], "eof")
    assert server.connections == set()


def test_framed_server_drain_returns_false_when_a_handler_does_not_finish_in_time(
        framed_server, kit):
    server = framed_server()
    busy, release = threading.Event(), threading.Event()

    def on_batch(conn, items):
        busy.set()
        release.wait(WAIT)  # a handler stuck in its work, not in a receive

    server.on_batch = on_batch
    client = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    kit.sockets.append(client)
    client.sendall(encode_frame(nth_data(1)))
    assert busy.wait(WAIT)
    server.shutdown()
    try:
        start = time.monotonic()
        assert server.drain(0.1) is False
        assert 0.1 <= time.monotonic() - start < WAIT / 2
    finally:
        release.set()
    assert server.drain(WAIT) is True
