"""The proxy's I/O: one selector loop thread that owns every socket it serves.

``protocol.py`` knows frames and nothing of sockets; this module knows sockets and
nothing of messages beyond their framing. It is the proxy's only door to its client
and data connections, after HAProxy's event loop with ``nbthread 1``:

* ``EventLoop`` runs in one thread. Each turn it waits on a ``selectors`` selector
  (epoll on Linux), reads every ready socket, fires due timers and the callbacks
  other threads ``post``ed, and then flushes, once, everything written during the
  turn. Frames read from many connections in one turn therefore leave for each
  upstream server in one ``send``: the batching that lets a Python proxy keep pace
  with one written in C.
* ``Channel`` is one framed connection, plain or TLS, non-blocking: received bytes
  go through a ``protocol.FrameDecoder`` and whole frames reach ``frames_received``
  in batches; ``write`` queues bytes; ``close`` flushes first, and a lingering close
  keeps reading for a moment so that an ERROR frame is not destroyed by a reset
  (PROTOCOL.md section 1). Subclasses override the hooks.
* ``Listener`` accepts in batches and, when the process runs out of descriptors
  (EMFILE, ENFILE, ENOBUFS, ENOMEM), stops accepting for a growing pause instead of
  spinning, says so once, and comes back by itself.
* Outgoing channels connect without blocking; a host name (not an IP literal) is
  resolved by a small thread pool, since ``getaddrinfo`` blocks.

Why one loop and not a thread per connection: measured on the 2-core development
machine (16 connections x 4 frames in flight, the same servers, one run), a thread
per client connection, each with its own selector, forwarded 6,000-14,000 frames/s
and threads with a reader per upstream connection 8,000-16,000, while one loop
forwarded 30,000-40,000, as fast as HAProxy: under the GIL every hand-off between
threads costs more than the work of a frame.

Threads and ownership: only the loop thread touches a Channel, a Listener, the
selector and the timer heap. Other threads talk to the loop only through ``post``
(a deque and a wake-up socket pair; ``deque.append`` is atomic), which is how the
resolver pool hands back addresses and how ``stop`` is asked for.
"""

import collections
from concurrent.futures import ThreadPoolExecutor
import errno
import heapq
import ipaddress
import itertools
import logging
import os
import selectors
import socket
import ssl
import threading
import time

import cli
import protocol
from netio import describe_error

log = logging.getLogger("rproxy")

__all__ = ["EventLoop", "Channel", "Listener", "ConnectTimeout", "Exhausted", "EXHAUSTED",
           "exhausted", "listen_socket", "refuse"]

# Bytes asked of the kernel per recv(): 256 KiB holds a few thousand small frames,
# or a quarter of the largest default frame. Linux's default TCP receive buffer
# (tcp_rmem) starts at 128 KiB.
RECV_SIZE = 262144
# Connections accepted per readiness event before the loop serves the others;
# nginx's multi_accept takes them all, HAProxy's tune.maxaccept defaults to 64.
ACCEPT_BATCH = 64
# The listen backlog. socketserver's 5 drops SYNs under a burst of connections and
# costs the peers a one-second retry; nginx uses 511, HAProxy its maxconn.
BACKLOG = 511
# How long a lingering close waits for the peer to finish sending, in seconds.
# nginx's lingering_timeout is 5 s; a peer here is a program, not a slow browser.
LINGER_SECONDS = 1.0
# Pauses of a listener out of descriptors: doubled from the first to the last, in
# seconds. Go's net/http backs off accept errors from 5 ms doubling to 1 s.
FIRST_ACCEPT_PAUSE = 0.005
MAX_ACCEPT_PAUSE = 1.0
# Most buffers handed to one sendmsg(); Linux's IOV_MAX is 1024.
IOV_MAX = 1024
# Bytes joined for one TLS send; ssl has no sendmsg.
TLS_SEND_SIZE = 262144
# Output up to this size is joined into one buffer for send(); larger output goes out
# with sendmsg(), which copies nothing in user space.
JOIN_SIZE = 65536
# The timer heap is rebuilt without its dead entries once there are more than this
# many and they are more than half of it: asyncio's limits for cancelled timers
# (_MIN_SCHEDULED_TIMER_HANDLES 100, _MIN_CANCELLED_TIMER_HANDLES_FRACTION 0.5).
STALE_TIMERS_MIN = 100

# The errors of a process (not a peer) out of resources, on accept() or socket().
EXHAUSTED = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))

# Channel states.
_PREAMBLE, _CONNECTING, _HANDSHAKE, _OPEN, _LINGER, _CLOSED = range(6)


class ConnectTimeout(TimeoutError):
    """An outgoing channel did not connect (or finish its TLS handshake) in time."""


class Exhausted(OSError):
    """This process, not its peer, could not do it: out of descriptors or memory
    (see ``exhausted``)."""


def exhausted(exc):
    """True when ``exc`` says this process is out of resources (EMFILE, ENFILE,
    ENOBUFS, ENOMEM, or an ``Exhausted``), not that a peer failed."""
    return isinstance(exc, Exhausted) or (isinstance(exc, OSError) and exc.errno in EXHAUSTED)


class _Timer:
    __slots__ = ("callback", "args", "cancelled")

    def __init__(self, callback, args):
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self):
        """Do not run the callback."""
        self.cancelled = True

    def _timer_live(self, generation):
        return not self.cancelled

    def _timer_fired(self, generation, now):
        if not self.cancelled:
            self.callback(*self.args)


class EventLoop:
    """A selector loop run by one thread (see the module docstring).

    Attributes:
        now: ``time.monotonic()`` read once at the start of each turn's work, in
            seconds: what the loop's code uses as the time, for one clock read a turn.
        thread: the thread running ``run``, or None.
    """

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self._waker, self._wake = socket.socketpair()
        self._waker.setblocking(False)
        self._wake.setblocking(False)
        self.selector.register(self._waker, selectors.EVENT_READ, self._woken)
        self._posted = collections.deque()
        self._timers = []
        self._stale_timers = 0  # heap entries that will fire for nothing
        self._sequence = itertools.count()
        self._dirty = []
        self._running = False
        self._resolver = None
        self.now = time.monotonic()
        self.thread = None
        # Every channel reads into this one buffer, and its decoder copies the bytes
        # out: a recv() of RECV_SIZE would allocate (and with glibc, mmap and unmap)
        # that much for each read.
        self.receive_buffer = memoryview(bytearray(RECV_SIZE))

    # --- Used from any thread -----------------------------------------------------

    def post(self, callback, *args):
        """Run ``callback(*args)`` in the loop thread soon. Thread-safe."""
        self._posted.append((callback, args))
        try:
            self._wake.send(b"\0")
        except OSError:
            pass  # a wake-up is pending already (buffer full), or the loop is closed

    def stop(self):
        """Make ``run`` return after the current turn. Thread-safe."""
        self.post(self._stop)

    # --- Used from the loop thread --------------------------------------------------

    def call_later(self, delay, callback, *args):
        """Run ``callback(*args)`` in the loop thread after ``delay`` seconds.

        Returns:
            a handle whose ``cancel()`` keeps the callback from running.
        """
        timer = _Timer(callback, args)
        self._schedule(self.now + delay, timer, 0)
        return timer

    def _schedule(self, when, target, generation):
        heapq.heappush(self._timers, (when, next(self._sequence), target, generation))

    def resolve(self, host, port, callback):
        """Resolve ``host`` in the resolver pool and call ``callback(addrinfo list or
        exception)`` in the loop thread. An IP literal needs no resolver: the callback
        runs at once."""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            callback([(family, socket.SOCK_STREAM, 0, "", (host, port))])
            return
        if self._resolver is None:
            # Two threads: resolutions are rare (registration-time host names) and a
            # slow DNS server must not hold more. glibc's resolver is thread-safe.
            self._resolver = ThreadPoolExecutor(
                max_workers=2, thread_name_prefix="resolver")

        def lookup():
            try:
                result = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:  # the name's fault: unknown, no address
                result = exc
            except OSError as exc:
                # The system failed the resolver (glibc reports EMFILE as EBUSY):
                # this process's trouble, not the name's.
                result = Exhausted(exc.errno, f"cannot resolve {host}: {exc.strerror or exc}")
            except Exception as exc:  # UnicodeError from the IDNA codec, and the like
                result = exc
            self.post(callback, result)

        self._resolver.submit(lookup)

    def mark_dirty(self, channel):
        # A channel with output to flush at the end of this turn.
        self._dirty.append(channel)

    def run(self):
        """Serve until ``stop``; call from the thread that will own every channel."""
        self.thread = threading.current_thread()
        self._running = True
        select = self.selector.select
        timers = self._timers
        posted = self._posted
        while self._running:
            if posted or self._dirty:
                timeout = 0
            elif timers:
                timeout = max(0.0, timers[0][0] - time.monotonic())
            else:
                timeout = None
            events = select(timeout)
            self.now = now = time.monotonic()
            for key, mask in events:
                try:
                    key.data(mask)
                except Exception as exc:
                    self._failed(key.data, exc)
            while timers and timers[0][0] <= now:
                _, _, target, generation = heapq.heappop(timers)
                self._dispatch(target._timer_fired, generation, now)
            if self._stale_timers > STALE_TIMERS_MIN and 2 * self._stale_timers > len(timers):
                self._compact_timers()
            while posted:
                callback, args = posted.popleft()
                self._dispatch(callback, *args)
            while self._dirty:
                dirty, self._dirty = self._dirty, []
                for channel in dirty:
                    channel._queued = False
                    self._dispatch(channel._flush)

    def _compact_timers(self):
        # Closed channels and moved deadlines leave entries behind (a heap cannot drop
        # one in the middle); with many short connections and a long idle timeout they
        # would pile up. Drop them all at once, as asyncio does with cancelled timers.
        timers = self._timers
        timers[:] = [entry for entry in timers if entry[2]._timer_live(entry[3])]
        heapq.heapify(timers)
        self._stale_timers = 0

    def _dispatch(self, callback, *args):
        try:
            callback(*args)
        except Exception as exc:
            self._failed(callback, exc)

    @staticmethod
    def _failed(callback, exc):
        # One failing callback must not stop the loop: it is logged in one line, its
        # channel is closed, and the loop goes on (socketserver's handle_error does
        # the same for a request).
        where = getattr(callback, "__qualname__", str(callback))
        log.error("internal error in %s: %s: %s", where, type(exc).__name__, exc,
                  extra=cli.event("internal_error", where=where, error=type(exc).__name__,
                                  reason=str(exc)))
        owner = getattr(callback, "__self__", None)
        if isinstance(owner, Channel):
            owner.abort(exc)

    def _woken(self, mask):
        try:
            while self._waker.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _stop(self):
        self._running = False

    def close(self):
        """Release the selector, the wake-up sockets and the resolver pool (after
        ``run`` returned)."""
        if self._resolver is not None:
            self._resolver.shutdown(wait=False)
        self.selector.close()
        self._waker.close()
        self._wake.close()


class Channel:
    """One framed, non-blocking connection owned by the loop thread (PROTOCOL.md
    section 1).

    Subclasses override the hooks: ``connection_made``, ``frames_received``,
    ``frame_error``, ``eof_received``, ``timed_out``, ``drained`` and ``closed``.

    Args:
        loop: the EventLoop.
        sock: an accepted socket (then call ``start``), or None for an outgoing
            channel (then call ``connect``).
        peer: a label for log lines, ``"host:port"``.
        max_frame: the largest frame body accepted, in bytes.
        tls: an ``ssl.SSLContext`` (server side for an accepted socket, client side
            for an outgoing one), or None for plain TCP.
        preamble: for an accepted socket, ``f(bytes received so far)`` that reads a
            header sent in the clear before the stream proper (a PROXY protocol
            header): it returns None while the header is incomplete, else
            ``(length, result)``, and raises ``ValueError`` for a bad one. Exactly
            ``length`` bytes are taken from the socket, so that a TLS handshake can
            follow; ``preamble_received(result)`` is called. None: no preamble.

    Attributes:
        peer: the label above.
        out_size: bytes queued and not yet handed to the kernel.
    """

    def __init__(self, loop, sock, peer, max_frame=protocol.DEFAULT_MAX_FRAME, tls=None,
                 preamble=None):
        self.loop = loop
        self.sock = sock
        self.peer = peer
        self.decoder = protocol.FrameDecoder(max_frame)
        self.out_size = 0
        self._out = []
        self._queued = False
        self._tls = tls
        self._tls_chunk = None
        self._interest = 0
        self._reading = True
        self._read_ended = False  # the peer ended, or a framing error: never read again
        self._write_blocked = False
        self._close_when_flushed = None
        self._deadline = None
        self._armed = None
        self._generation = 0
        self._state = _OPEN
        self._preamble = preamble
        self._preamble_bytes = b""

    def start(self):
        """Begin serving an accepted socket: the preamble and the TLS handshake first,
        if any. Call once the subclass is ready for its hooks."""
        self.sock.setblocking(False)
        if self._preamble is not None:
            self._state = _PREAMBLE
            self._update_interest()
            return
        self._begin()

    def _begin(self):
        if self._tls is None:
            self._state = _OPEN
            self._update_interest()
            self.connection_made()
            return
        if self._interest:
            self.loop.selector.unregister(self.sock)
            self._interest = 0
        try:
            self.sock = self._tls.wrap_socket(self.sock, server_side=True,
                                              do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            self.abort(exc)
            return
        self._state = _HANDSHAKE
        self._handshake()

    # --- Hooks ----------------------------------------------------------------------

    def preamble_received(self, result):
        """The preamble (see ``preamble``) arrived; ``result`` is what it read."""

    def connection_made(self):
        """The channel is ready: an outgoing one connected, an accepted one started,
        and for TLS the handshake finished."""

    def frames_received(self, bodies):
        """Bytes arrived: ``bodies`` are the whole frame bodies they completed (a list
        of bytes, in order, maybe empty; ``decoder.in_frame`` tells whether part of a
        frame waits for the rest)."""

    def frame_error(self, exc):
        """A bad length prefix (``protocol.FrameError``): the stream is out of step, and
        reading has stopped. Default: close."""
        self.abort(exc)

    def eof_received(self):
        """The peer will send nothing more. Default: close once the output is out."""
        self.close()

    def timed_out(self, now):
        """The deadline set by ``set_deadline`` came (``now``, loop seconds)."""

    def drained(self):
        """Everything written so far has been handed to the kernel."""

    def closed(self, exc):
        """The channel is closed, once: ``exc`` is None after ``close``/``abort``
        without a reason, else the exception or ``ProtocolError`` that ended it."""

    # --- Used by owners, in the loop thread -------------------------------------------

    @property
    def is_closed(self):
        return self._state == _CLOSED

    @property
    def reading(self):
        """False while reading is paused or the peer has sent its last byte."""
        return self._reading

    @property
    def connected(self):
        """True once open (connected, TLS handshake done) and until closed."""
        return self._state == _OPEN

    def write(self, data):
        """Queue ``data`` (bytes) to send; it leaves at the end of the turn."""
        if self._state >= _LINGER or self._close_when_flushed is not None:
            return
        self._out.append(data)
        self.out_size += len(data)
        if not self._queued:
            self._queued = True
            self.loop.mark_dirty(self)

    def pause_reading(self):
        """Read nothing more until ``resume_reading`` (back-pressure)."""
        if self._reading:
            self._reading = False
            self._update_interest()

    def resume_reading(self):
        if not self._reading and not self._read_ended:
            self._reading = True
            self._update_interest()

    def set_deadline(self, when):
        """Call ``timed_out`` at loop time ``when`` (seconds), or never (None).

        Cheap to call often: a later deadline reuses the heap entry already armed
        (it is re-armed when it fires early), only an earlier one pushes a new one.
        """
        self._deadline = when
        if when is not None and (self._armed is None or when < self._armed):
            if self._armed is not None:
                self.loop._stale_timers += 1
            self._generation += 1
            self._armed = when
            self.loop._schedule(when, self, self._generation)

    def peer_certificate(self):
        """The peer's verified TLS certificate (dict), or None."""
        if self._tls is None or self._state != _OPEN:
            return None
        return self.sock.getpeercert() or None

    def close(self, linger=False):
        """Close once the queued output is out. ``linger``: then shut down the sending
        side and read for up to ``LINGER_SECONDS`` before closing, so that unread
        input does not turn the close into a reset that destroys the last frame
        (PROTOCOL.md section 1)."""
        if self._state == _CLOSED or self._close_when_flushed is not None:
            return
        self._close_when_flushed = "linger" if linger else "close"
        if self._state != _OPEN:
            self.abort()
        elif not self._out:
            self._finish_close()

    def abort(self, exc=None):
        """Close now, dropping any queued output; ``closed(exc)`` is called."""
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self._out = []
        self.out_size = 0
        if self._interest:
            self.loop.selector.unregister(self.sock)
            self._interest = 0
        if self.sock is not None:
            self.sock.close()
        # Its entry may stay in the timer heap until the deadline: nothing big with it.
        self.decoder.clear()
        if self._armed is not None:
            self.loop._stale_timers += 1
        self.closed(exc)

    # --- Outgoing connections ----------------------------------------------------------

    def connect(self, host, port, timeout, server_hostname=None):
        """Connect to ``host``:``port`` without blocking; ``connection_made`` follows,
        or ``closed`` with the error (``ConnectTimeout`` after ``timeout`` seconds,
        TLS handshake included). Output written meanwhile waits."""
        self._state = _CONNECTING
        self._host_name = server_hostname or host
        self.set_deadline(self.loop.now + timeout)
        self.loop.resolve(host, port, self._resolved)

    def _resolved(self, result):
        if self._state != _CONNECTING:
            return
        if isinstance(result, Exception):
            self.abort(result)
            return
        family, kind, proto, _, address = result[0]
        try:
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            self.abort(exc)
            return
        self.sock = sock
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex(address)
        except Exception as exc:  # any fault here fails this connection, and only it
            self.abort(exc)
            return
        if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self.abort(OSError(code, os.strerror(code)))
            return
        self._update_interest()

    def _connected(self):
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.abort(OSError(code, os.strerror(code)))
            return
        if self._tls is not None:
            # wrap_socket takes the descriptor over from the plain socket object, so
            # the selector must forget that object first.
            self.loop.selector.unregister(self.sock)
            self._interest = 0
            self._state = _HANDSHAKE
            try:
                self.sock = self._tls.wrap_socket(self.sock, server_hostname=self._host_name,
                                                  do_handshake_on_connect=False)
            except (OSError, ValueError) as exc:
                self.abort(exc)
                return
            self._handshake()
            return
        self._opened()

    def _opened(self):
        self._state = _OPEN
        self.set_deadline(None)
        self.connection_made()
        if self._state == _OPEN:
            self._update_interest()
            if self._out and not self._queued:
                self._queued = True
                self.loop.mark_dirty(self)

    def _handshake(self):
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._write_blocked = False
        except ssl.SSLWantWriteError:
            self._write_blocked = True
        except (OSError, ValueError) as exc:
            self.abort(exc)
            return
        else:
            self._write_blocked = False
            self._opened()
            return
        self._update_interest()

    # --- Events -------------------------------------------------------------------------

    def _update_interest(self):
        if self._state == _CLOSED:
            return
        if self._state == _PREAMBLE:
            wanted = selectors.EVENT_READ
        elif self._state == _CONNECTING:
            wanted = selectors.EVENT_WRITE if self.sock is not None else 0
        elif self._state == _HANDSHAKE:
            wanted = selectors.EVENT_WRITE if self._write_blocked else selectors.EVENT_READ
        else:
            wanted = (selectors.EVENT_READ if self._reading or self._state == _LINGER else 0) | (
                selectors.EVENT_WRITE if self._write_blocked else 0)
        if wanted == self._interest:
            return
        selector = self.loop.selector
        if not self._interest:
            selector.register(self.sock, wanted, self._on_event)
        elif not wanted:
            selector.unregister(self.sock)
        else:
            selector.modify(self.sock, wanted, self._on_event)
        self._interest = wanted

    def _on_event(self, mask):
        state = self._state
        if state == _OPEN:
            if mask & selectors.EVENT_WRITE:
                self._flush()
            if mask & selectors.EVENT_READ and self._state == _OPEN and self._reading:
                self._read()
        elif state == _CONNECTING:
            self._connected()
        elif state == _HANDSHAKE:
            self._handshake()
        elif state == _LINGER:
            self._linger_read()
        elif state == _PREAMBLE:
            self._read_preamble()

    def _read_preamble(self):
        # Peek, then take from the socket only the bytes of the preamble: what follows
        # stays in the kernel for the TLS handshake or the frame decoder. Bytes that
        # cannot end the preamble yet are all preamble, so they are taken too, and a
        # level-triggered selector does not report them again.
        try:
            peeked = self.sock.recv(RECV_SIZE, socket.MSG_PEEK)
            if not peeked:
                self.abort(ConnectionError("closed before its preamble was complete"))
                return
            found = self._preamble(self._preamble_bytes + peeked)
            take = len(peeked) if found is None else found[0] - len(self._preamble_bytes)
            self._preamble_bytes += self.sock.recv(take)
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, ValueError) as exc:
            self.abort(exc)
            return
        if found is not None:
            self._preamble_bytes = b""
            self.preamble_received(found[1])
            if self._state == _PREAMBLE:
                self._begin()

    def read_now(self):
        """Read and hand on whatever the kernel holds already, without waiting (a proxy
        that stops answers what it has received)."""
        for _ in range(16):
            if self._state != _OPEN or not self._reading or not self._read():
                return

    def _read(self):
        # Returns True when bytes came.
        sock = self.sock
        view = self.loop.receive_buffer
        try:
            size = sock.recv_into(view)
            if self._tls is not None:
                # Records already decrypted raise no read event: take them now.
                while size and size < RECV_SIZE and sock.pending():
                    size += sock.recv_into(view[size:])
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return False
        except ssl.SSLWantWriteError:
            self._write_blocked = True
            self._update_interest()
            return False
        except (OSError, ValueError) as exc:
            self.abort(exc)
            return False
        if not size:
            self._reading = False
            self._read_ended = True
            self._update_interest()
            self.eof_received()
            return False
        decoder = self.decoder
        decoder.feed(view[:size])
        bodies, error = decoder.frames()
        self.frames_received(bodies)
        if error is not None and self._state == _OPEN:
            self._reading = False
            self._read_ended = True
            self._update_interest()
            self.frame_error(error)
        return True

    def _timer_live(self, generation):
        return generation == self._generation and self._state != _CLOSED

    def _timer_fired(self, generation, now):
        if generation != self._generation or self._state == _CLOSED:
            return
        self._armed = None
        deadline = self._deadline
        if deadline is None:
            return
        if deadline > now:
            self.set_deadline(deadline)
            return
        self._deadline = None
        if self._state == _LINGER:
            self.abort()
        elif self._state in (_PREAMBLE, _CONNECTING, _HANDSHAKE):
            self.abort(ConnectTimeout("timed out before the connection was ready"))
        else:
            self.timed_out(now)

    # --- Output ---------------------------------------------------------------------------

    def _flush(self):
        if self._state != _OPEN:
            return
        out = self._out
        sock = self.sock
        try:
            while out:
                if self._tls is not None:
                    if self._tls_chunk is None:
                        chunk = b"".join(out) if len(out) > 1 else bytes(out[0])
                        self._tls_chunk = chunk[:TLS_SEND_SIZE]
                    sent = sock.send(self._tls_chunk)
                    self._tls_chunk = None
                elif self.out_size <= JOIN_SIZE:
                    # Joining a few small frames costs less than a gather list.
                    data = out[0] if len(out) == 1 else b"".join(out)
                    sent = sock.send(data)
                    if sent == len(data):
                        out.clear()
                        self.out_size = 0
                        break
                else:
                    sent = sock.sendmsg(out if len(out) <= IOV_MAX else out[:IOV_MAX])
                self._consume(sent)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError,
                ssl.SSLWantReadError):
            if not self._write_blocked:
                self._write_blocked = True
                self._update_interest()
            return
        except (OSError, ValueError) as exc:
            self.abort(exc)
            return
        if self._write_blocked:
            self._write_blocked = False
            self._update_interest()
        if self._close_when_flushed is not None:
            self._finish_close()
        else:
            self.drained()

    def _consume(self, sent):
        out = self._out
        self.out_size -= sent
        done = 0
        for chunk in out:
            size = len(chunk)
            if sent < size:
                break
            sent -= size
            done += 1
        del out[:done]
        if sent:
            out[0] = memoryview(out[0])[sent:]

    def _finish_close(self):
        if self._close_when_flushed == "linger":
            try:
                # Over TLS too: ssl then skips close_notify and shuts down TCP
                # sending; _linger_read drops what still comes, raw.
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.abort()
                return
            self._state = _LINGER
            self._update_interest()
            self._deadline = None
            self.set_deadline(self.loop.now + LINGER_SECONDS)
        else:
            self.abort()

    def _linger_read(self):
        try:
            if self.sock.recv(RECV_SIZE):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.abort()


class Listener:
    """A listening socket served by the loop (PROTOCOL.md section 5: port 0 picks a
    free port, see ``port``).

    Args:
        loop: the EventLoop.
        sock: a bound, listening socket (``listen_socket``).
        on_accept: ``f(sock, address)`` for each accepted connection (TCP_NODELAY set),
            in the loop thread: it makes a Channel of it, or ``refuse``s it.
        name: what it serves, for the log line of an exhausted process.
    """

    def __init__(self, loop, sock, on_accept, name="connections"):
        self.loop = loop
        self.sock = sock
        self.on_accept = on_accept
        self.name = name
        self._pause = FIRST_ACCEPT_PAUSE
        self._paused = False
        self._complained = False
        sock.setblocking(False)
        loop.selector.register(sock, selectors.EVENT_READ, self._on_event)

    @property
    def port(self):
        return self.sock.getsockname()[1]

    def _on_event(self, mask):
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in EXHAUSTED:
                    self._back_off(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # that peer gave up; the next one may be fine
                log.warning("accept on %s failed: %s", self.name, describe_error(exc),
                            extra=cli.event("accept_failed", listener=self.name,
                                            reason=describe_error(exc)))
                break
            try:
                # Frames are small and answered at once: no Nagle delay.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                sock.close()  # reset before we got to it
                continue
            self.on_accept(sock, address)
        if not self._paused:
            self._pause = FIRST_ACCEPT_PAUSE
            self._complained = False

    def _back_off(self, exc):
        # Not accepting is the only way not to spin: the pending connection stays in
        # the backlog, readable, until a descriptor is free.
        if not self._complained:
            log.warning("cannot accept %s: %s (the process is out of descriptors or "
                        "memory); pausing accept, retrying every %g s at most until it "
                        "recovers", self.name, describe_error(exc), MAX_ACCEPT_PAUSE,
                        extra=cli.event("accept_paused", listener=self.name,
                                        reason=describe_error(exc)))
            self._complained = True
        self._paused = True
        self.loop.selector.unregister(self.sock)
        self.loop.call_later(self._pause, self._resume)
        self._pause = min(self._pause * 2, MAX_ACCEPT_PAUSE)

    def _resume(self):
        if self.sock.fileno() < 0:
            return
        self._paused = False
        self.loop.selector.register(self.sock, selectors.EVENT_READ, self._on_event)

    def close(self):
        """Stop accepting and close the socket."""
        if self.sock.fileno() >= 0:
            if not self._paused:
                self.loop.selector.unregister(self.sock)
            self.sock.close()


def refuse(sock, data):
    """Send ``data`` (one frame) on an accepted socket without waiting, then close it:
    a full proxy spends nothing on a peer it turns away, so a peer that does not read
    misses the frame."""
    try:
        sock.setblocking(False)
        sock.send(data)
    except OSError:
        pass
    sock.close()


def listen_socket(host, port, backlog=BACKLOG):
    """Open a listening TCP socket on ``host``:``port`` (IPv4 or IPv6).

    ``::`` listens on IPv6 and IPv4 both (dual stack), as ``0.0.0.0`` listens on every
    IPv4 address.

    Raises:
        OSError: the address cannot be bound (port busy, unknown host, no IPv6); its
            ``strerror`` is one line naming the address: ``cannot listen on
            127.0.0.1:2100: Address already in use``.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except UnicodeError as exc:  # a label the IDNA codec refuses (over 63 characters)
        raise OSError(f"cannot listen on '{host}': not a valid host name ({exc})") from None
    except socket.gaierror as exc:
        raise OSError(exc.errno, f"cannot listen on {protocol.format_address(host, port)}: "
                      f"{exc.strerror}") from None
    family, _, _, _, address = infos[0]
    dual = family == socket.AF_INET6 and host == "::" and socket.has_dualstack_ipv6()
    try:
        return socket.create_server(address, family=family, backlog=backlog,
                                    dualstack_ipv6=dual)
    except OSError as exc:
        # The address the user gave, and the system's words alone (create_server
        # appends a Python tuple of the address).
        raise OSError(exc.errno, f"cannot listen on {protocol.format_address(host, port)}: "
                      f"{os.strerror(exc.errno) if exc.errno else exc}") from None
