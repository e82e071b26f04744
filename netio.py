"""Sockets, threads and TLS shared by the three programs.

``protocol.py`` knows frames and messages and nothing of sockets; this module is the
thread-per-connection layer on top of it (after ``websockets.sync``):

* ``Connection`` wraps one TCP or TLS socket: ``send`` a message, ``receive`` the
  next one with an idle timeout between frames and a frame timeout inside one, and
  ``close`` with a lingering close after a fatal error (PROTOCOL.md section 1).
* ``FramedServer`` is CPython's ``socketserver.ThreadingTCPServer`` with the knobs a
  proxy needs: a cap on open connections answered with ``OVERLOADED``, TLS, a
  record of live connections so that ``drain`` can wake and join every handler, and
  errors logged in one line instead of a traceback.
* ``run_until_stopped`` runs such a server until SIGTERM or Ctrl-C.

The command line, the output streams and the log are ``cli.py``'s.
"""

import collections
import errno
import logging
import select
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time

import protocol

log = logging.getLogger("rproxy")

# Bytes asked of the kernel per recv(): 64 KiB, the common socket buffer quantum.
RECV_SIZE = 65536
# Seconds a send may wait for a peer that takes no bytes. nginx's send_timeout is
# 60 s, between two successive writes.
SEND_TIMEOUT = 60.0
# How long a lingering close waits for the peer to finish sending, in seconds.
# nginx's lingering_timeout is 5 s; a peer here is a program, not a slow browser.
LINGER_SECONDS = 1.0


class Deadline:
    """A moment after which a bounded wait gives up, after websockets' ``Deadline``
    (``sync/utils.py``): the time left is asked for at each step of a wait made of
    several, instead of computed by hand at each.

    Args:
        seconds: from now; None for no deadline.
    """

    __slots__ = ("at",)

    def __init__(self, seconds):
        self.at = None if seconds is None else time.monotonic() + seconds

    def left(self):
        """Seconds left, 0.0 once passed; None when there is no deadline."""
        return None if self.at is None else max(0.0, self.at - time.monotonic())


def _tightest(*bounds):
    """The smallest of ``(seconds or None, name)`` pairs, as ``(seconds, name)``;
    ``(None, None)`` when every one is None (no bound)."""
    given = [pair for pair in bounds if pair[0] is not None]
    return min(given, key=lambda pair: pair[0]) if given else (None, None)


class ConnectionTimeout(TimeoutError):
    """No frame came in time.

    Attributes:
        mid_frame: True if part of a frame had arrived.
        bound: the limit that ran out: ``"idle"`` (the idle timeout), ``"frame"``
            (the frame timeout) or ``"deadline"``.
    """

    def __init__(self, message, mid_frame, bound):
        super().__init__(message)
        self.mid_frame = mid_frame
        self.bound = bound


class HeadDecoder(protocol.FrameDecoder):
    """A ``protocol.FrameDecoder`` that keeps the first bytes of the stream in ``head``
    (bytes, up to ``HEAD_SIZE``), to tell what kind of peer answered when the stream
    turns out not to be frames (``may_speak_tls``)."""

    HEAD_SIZE = 2

    def __init__(self, max_frame=protocol.DEFAULT_MAX_FRAME):
        super().__init__(max_frame)
        self.head = b""

    def feed(self, chunk):
        if len(self.head) < self.HEAD_SIZE:
            self.head += bytes(chunk[:self.HEAD_SIZE - len(self.head)])
        super().feed(chunk)


def may_speak_tls(head):
    """Whether a peer reached over plain TCP may be a TLS server, from ``head``, the
    first bytes (up to 2) it sent before the connection ended.

    True for nothing at all (CPython's ``ssl``, and so a proxy of this project run
    with ``-tls-cert``, resets a connection whose first bytes are not a TLS
    ClientHello, without a word) and for the start of a TLS record: content type
    alert (21) or handshake (22), then major version 3 (RFC 8446 section 5.1; what
    OpenSSL-based servers such as HAProxy and nginx send). False for anything else:
    that peer speaks something, and not TLS."""
    return not head or (head[0] in (0x15, 0x16) and head[1:2] in (b"", b"\x03"))


class Connection:
    """One framed connection over a connected, blocking socket (PROTOCOL.md
    section 1), for a thread that owns it: ``server.py``'s handlers and session,
    ``client.py``.

    Not thread-safe for two concurrent readers or two concurrent writers. Reads and
    writes each set the socket's timeout they need before the call, so a send never
    inherits the last receive's timeout.

    Args:
        sock: a connected ``socket.socket`` or ``ssl.SSLSocket``.
        max_frame: the largest frame body accepted, in bytes.
        peer: a ``"host:port"`` label for log lines.
        send_timeout: seconds a send may wait for the peer to take more bytes.

    Attributes:
        head: the first bytes received (up to 2, ``HeadDecoder``), for
            ``may_speak_tls``.
    """

    def __init__(self, sock, max_frame=protocol.DEFAULT_MAX_FRAME, peer=None,
                 send_timeout=SEND_TIMEOUT):
        self.sock = sock
        self.decoder = HeadDecoder(max_frame)
        self.peer = peer or format_address(sock.getpeername())
        self.send_timeout = send_timeout
        self._ready = collections.deque()
        self._frame_deadline = None  # while part of a frame has come: the frame timeout
        # Read into, and copied out by the decoder: no allocation per recv().
        self._received = memoryview(bytearray(RECV_SIZE))

    @property
    def tls(self):
        """True over TLS."""
        return isinstance(self.sock, ssl.SSLSocket)

    @property
    def head(self):
        """The first bytes received, up to 2 (``HeadDecoder.head``)."""
        return self.decoder.head

    def send(self, message):
        """Send one message (``dict``) as a frame. Raises as ``send_frames``."""
        self.send_frames([protocol.encode_frame(message)])

    def send_frames(self, frames):
        """Send whole frames (a list of bytes) in one write.

        ``send_timeout`` bounds each wait for the peer to take more bytes, not the
        whole write (nginx's ``send_timeout``, "between two successive write
        operations"): a large write to a slow reader goes on as long as the reader
        takes bytes, and one to a reader that takes nothing fails after
        ``send_timeout`` seconds.

        Raises:
            socket.timeout: the peer took nothing for ``send_timeout`` seconds.
            OSError: the connection failed.
        """
        sock = self.sock
        sock.settimeout(self.send_timeout)
        data = memoryview(frames[0] if len(frames) == 1 else b"".join(frames))
        while data:
            # send(), not sendall(): sendall's timeout bounds the whole write.
            data = data[sock.send(data):]

    def receive_batch(self, idle_timeout=None, frame_timeout=None, deadline=None):
        """Receive every frame that has arrived: at least one, after one ``recv``.

        Each wait for bytes is bounded by ``idle_timeout``, inside a frame as between
        frames (a peer that sends part of a frame and falls silent is silent), and
        inside a frame also by what is left of ``frame_timeout``: the smallest bound
        applies.

        Args:
            idle_timeout: seconds the peer may stay silent, whether a frame has
                begun or not; None: forever.
            frame_timeout: seconds a frame may take from its first byte to its last;
                None: forever.
            deadline: a ``Deadline`` after which to give up whatever the two timeouts
                say; None: none.

        Returns:
            list: in order, each item a validated message (``dict``, see
            ``protocol.parse_message``) or the ``protocol.MessageError`` of a bad
            frame (answer it, the stream is still in step); empty when the peer
            closed the connection (a partly received frame is dropped).

        Raises:
            protocol.FrameError: bad length prefix (after the frames before it were
                returned); the connection must be closed.
            ConnectionTimeout: a bound above ran out (its ``bound`` says which).
            OSError: the connection failed.
        """
        if self._ready:
            items = list(self._ready)
            self._ready.clear()
            return items
        decoder = self.decoder
        while True:
            bodies, error = decoder.frames()
            if bodies:
                self._frame_deadline = Deadline(frame_timeout) if decoder.in_frame else None
                items = []
                for body in bodies:
                    try:
                        items.append(protocol.parse_message(body))
                    except protocol.MessageError as exc:
                        items.append(exc)
                return items
            if error is not None:
                raise error
            mid = self._frame_deadline is not None
            timeout, bound = _tightest(
                (idle_timeout, "idle"), (self._frame_deadline.left() if mid else None, "frame"),
                (None if deadline is None else deadline.left(), "deadline"))
            try:
                # Time up: bytes that came in time may still wait in the kernel (the
                # caller was busy answering); take them without waiting.
                # settimeout(0) means "do not block", not "time is up".
                self.sock.settimeout(0.0 if timeout is not None and timeout <= 0 else timeout)
                size = self.sock.recv_into(self._received)
            except (socket.timeout, BlockingIOError, ssl.SSLWantReadError):
                raise ConnectionTimeout(
                    f"timed out waiting for {'the rest of a frame' if mid else 'a frame'} "
                    f"from {self.peer}", mid, bound) from None
            if not size:
                return []
            if not mid:
                self._frame_deadline = Deadline(frame_timeout)
            decoder.feed(self._received[:size])

    def receive(self, idle_timeout=None, frame_timeout=None, deadline=None):
        """Receive the next message (arguments as ``receive_batch``).

        Returns:
            dict: the validated message, or None when the peer closed the connection.

        Raises:
            protocol.MessageError: one bad frame, already consumed; go on reading.
            protocol.FrameError, ConnectionTimeout, OSError: as ``receive_batch``.
        """
        if not self._ready:
            items = self.receive_batch(idle_timeout, frame_timeout, deadline)
            if not items:
                return None
            self._ready.extend(items)
        item = self._ready.popleft()
        if isinstance(item, protocol.ProtocolError):
            raise item
        return item

    def next_batch(self, idle_timeout=None, frame_timeout=None):
        """Receive every frame that has arrived, answering the faults that end a
        connection as PROTOCOL.md section 1 says: a bad length prefix, or a frame
        that takes longer than ``frame_timeout``, gets one ERROR frame and a
        lingering close.

        Returns:
            list of items as ``receive_batch`` (bad messages are the caller's to
            answer, in order), or None when the connection is over (closed by the
            peer, or closed here after a fatal fault).

        A peer silent for ``idle_timeout`` seconds in the middle of a frame gets the
        same TIMEOUT ERROR, saying so.

        Raises:
            ConnectionTimeout: no frame began within ``idle_timeout`` seconds.
            OSError: the connection failed.
        """
        try:
            return self.receive_batch(idle_timeout, frame_timeout) or None
        except protocol.FrameError as exc:
            log.warning("%s (from %s)", exc, self.peer)
            answer = protocol.error_message(exc)
        except ConnectionTimeout as exc:
            if not exc.mid_frame:
                raise
            log.warning("closing connection from %s: %s", self.peer, exc)
            if exc.bound == "frame":
                why = f"a frame took longer than {frame_timeout:g} s to arrive (frame timeout)"
            else:
                why = (f"nothing came for {idle_timeout:g} s in the middle of a frame "
                       "(idle timeout)")
            answer = protocol.error(protocol.TIMEOUT, f"{why}; closing")
        self.send(answer)
        self.close(linger=True)
        return None

    def close(self, linger=False):
        """Close the socket. ``linger``: shut down sending first, then drain input for
        up to ``LINGER_SECONDS`` so that an ERROR frame just sent is not destroyed by a
        reset (PROTOCOL.md section 1). Never raises."""
        sock = self.sock
        try:
            if linger:
                sock.shutdown(socket.SHUT_WR)
                deadline = Deadline(LINGER_SECONDS)
                while deadline.left():
                    sock.settimeout(deadline.left())
                    if not sock.recv(RECV_SIZE):
                        break
        except OSError:
            pass
        finally:
            sock.close()

    def half_close(self):
        """Tell the peer that nothing more will be sent (a TCP half-close), and go on
        reading (PROTOCOL.md section 3). TLS has no half-close that leaves the stream
        readable, so over TLS this does nothing and returns False. Never raises."""
        if isinstance(self.sock, ssl.SSLSocket):
            return False
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return True

    def wake(self):
        """Make a blocked ``receive`` in another thread return what is buffered, then
        None: the peer is read no further. Never raises."""
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass


def format_address(address):
    """Return ``"host:port"`` (``"[v6]:port"``) for a socket address tuple."""
    return protocol.format_address(*address[:2])


def connect(host, port, timeout, max_frame=protocol.DEFAULT_MAX_FRAME, tls=None,
            send_timeout=SEND_TIMEOUT):
    """Open a framed connection to ``host``:``port``.

    Args:
        timeout: seconds allowed for the TCP connect and the TLS handshake.
        tls: an ``ssl.SSLContext`` for the client side, or None for plain TCP.
        send_timeout: see ``Connection``.

    Returns:
        Connection

    Raises:
        OSError: refused, unreachable or timed out (``ssl.SSLError`` for TLS faults).
    """
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
        return Connection(sock, max_frame, peer=format_address((host, port)),
                          send_timeout=send_timeout)
    except BaseException:
        sock.close()
        raise


def server_tls_context(cert, key, ca=None):
    """TLS context for a listening side. With ``ca``, peers may present a certificate,
    and one that does not verify against ``ca`` fails the handshake.

    Raises:
        ValueError: a file cannot be read or is not what it should be; the text names
            the file at fault (OpenSSL's own errors, ``[SSL] PEM lib``, name none).
    """
    _check_readable(cert, key, ca)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_cert_chain(context, cert, key)
    if ca is not None:
        try:
            context.load_verify_locations(ca)
        except ssl.SSLError:
            raise ValueError(f"'{ca}' holds no PEM certificate") from None
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_tls_context(ca, cert=None, key=None):
    """TLS context for a connecting side that checks the peer against ``ca``, and
    presents ``cert``/``key`` when given (mutual TLS).

    Raises:
        ValueError: as ``server_tls_context``.
    """
    _check_readable(ca, cert, key)
    try:
        context = ssl.create_default_context(cafile=ca)
    except ssl.SSLError:
        raise ValueError(f"'{ca}' holds no PEM certificate") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        _load_cert_chain(context, cert, key)
    return context


def _check_readable(*paths):
    # Raises ValueError naming the first path (None: not given) that cannot be read.
    for path in paths:
        if path is not None:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ValueError(f"cannot read '{path}': {exc.strerror}") from None


def _load_cert_chain(context, cert, key):
    # load_cert_chain, with an error that says which of the two files is at fault.
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"the key '{key}' is not the key of the certificate "
                             f"'{cert}'") from None
        try:
            # Reads every PEM certificate of a file, a leaf as well as a CA, and
            # fails when there is none.
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cert)
        except ssl.SSLError:
            raise ValueError(f"'{cert}' holds no PEM certificate") from None
        raise ValueError(f"'{key}' holds no PEM private key") from None


def describe_error(exc):
    """One line for an OSError, ssl error or other exception, without the Python class
    noise: ``"Connection refused"``, ``"TLS error: CERTIFICATE_VERIFY_FAILED"``."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class FramedServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """Thread-per-connection TCP server for framed connections.

    ``handle_connection(conn)`` of the subclass is called in a thread of its own for
    each accepted ``Connection``. Knobs (class variables, as in socketserver):

    * ``allow_reuse_address = True``: a restarted program gets its port back at once.
    * ``request_queue_size = 128``: the listen backlog; socketserver's 5 drops SYNs
      under a burst of connections and costs the peers a one-second retry.
    * ``daemon_threads = True``: ``drain`` joins handlers itself, with a bound.
    * ``accept_pause_first = 0.005``, ``accept_pause_max = 1.0`` (seconds): when
      accept() fails for want of descriptors or memory (EMFILE, ENFILE, ENOBUFS,
      ENOMEM) the listening socket stays readable, and retrying at once would spin a
      core; the accept thread pauses instead, doubling from the first pause to the
      cap until an accept succeeds. Go's net/http Server pauses 5 ms doubling to 1 s.

    The address family follows the host (``getaddrinfo`` with ``AI_PASSIVE``):
    ``127.0.0.1`` or ``::1``; ``0.0.0.0`` (or an empty host) listens on every IPv4
    address, ``::`` on every IPv6 and IPv4 address (a dual-stack socket).

    Args:
        address: ``(host, port)``; port 0 picks a free port (see ``port``).
        max_frame: largest frame body accepted, bytes.
        max_conns: open connections allowed at once; past it a new connection gets
            one ``OVERLOADED`` frame and is closed.
        tls: an ``ssl.SSLContext`` for the server side, or None.
        handshake_timeout: seconds allowed for a TLS handshake.

    Raises:
        OSError: the address cannot be resolved or bound (port busy, bad address).
    """

    allow_reuse_address = True
    request_queue_size = 128
    daemon_threads = True
    block_on_close = False
    accept_pause_first = 0.005
    accept_pause_max = 1.0

    def __init__(self, address, *, max_frame=protocol.DEFAULT_MAX_FRAME, max_conns=1024,
                 tls=None, handshake_timeout=10.0):
        self.max_frame = max_frame
        self.max_conns = max_conns
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self.connections = set()
        self._lock = threading.Condition()
        self._accepting = 0
        self._draining = False
        # Only the accept thread touches the pause; shutdown() sets the event to cut
        # a pause short.
        self._accept_pause = 0.0
        self._accept_wake = threading.Event()
        host, port = address
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(
                host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                socket.AI_PASSIVE)[0]
        except UnicodeError as exc:  # a label the IDNA codec refuses (over 63 characters)
            raise OSError(f"'{host}' is not a valid host name ({exc})") from None
        self.address_family = family
        super().__init__(sockaddr, socketserver.BaseRequestHandler)

    def server_bind(self):
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            # "Every address" includes IPv4, whatever the system's bindv6only says.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def get_request(self):
        try:
            request = super().get_request()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise
            if not self._accept_pause:
                log.warning("cannot accept connections: %s (%d connections open); pausing "
                            "accept until some close", describe_error(exc), self._accepting)
            self._accept_pause = min(max(2 * self._accept_pause, self.accept_pause_first),
                                     self.accept_pause_max)
            self._accept_wake.wait(self._accept_pause)
            raise  # socketserver skips this round and selects again
        if self._accept_pause:
            self._accept_pause = 0.0
            log.info("accepting connections again")
        return request

    def shutdown(self):
        """Stop the accept loop and wait for it, now rather than at its next 0.5 s poll:
        a listening socket shut for reading is readable and its accept() fails (Linux),
        so serve_forever sees the stop request at once."""
        self._accept_wake.set()
        try:
            self.socket.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # refused elsewhere (macOS): the loop stops within its 0.5 s poll
        super().shutdown()

    @property
    def port(self):
        """The TCP port the server listens on (int)."""
        return self.server_address[1]

    def process_request(self, request, client_address):
        with self._lock:
            refuse = self._draining or self._accepting >= self.max_conns
            if not refuse:
                self._accepting += 1
        if refuse:
            self._refuse(request, client_address)
            return
        super().process_request(request, client_address)

    def _refuse(self, sock, address):
        # Said without TLS and without waiting: a full server must not spend a thread
        # on a peer it turns away.
        log.warning("refusing connection from %s: %d connections open (-max-conns)",
                    format_address(address), self.max_conns)
        try:
            sock.setblocking(False)
            sock.send(protocol.encode_frame(protocol.error(
                protocol.OVERLOADED,
                f"the server has {self.max_conns} connection{'' if self.max_conns == 1 else 's'} "
                "open, its maximum (-max-conns); try again later")))
        except OSError:
            pass
        sock.close()

    def finish_request(self, request, client_address):
        sock = request
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock.settimeout(self.handshake_timeout)
                sock = self.tls.wrap_socket(sock, server_side=True)
            conn = Connection(sock, self.max_frame, peer=format_address(client_address))
        except (OSError, ValueError) as exc:
            log.warning("connection from %s failed before its first frame: %s",
                        format_address(client_address), describe_error(exc))
            sock.close()
            return
        with self._lock:
            self.connections.add(conn)
        try:
            self.handle_connection(conn)
        finally:
            with self._lock:
                self.connections.discard(conn)
            conn.close()

    def shutdown_request(self, request):
        request.close()
        with self._lock:
            self._accepting -= 1
            self._lock.notify_all()

    def handle_connection(self, conn):
        """Serve one connection; override. The connection is closed afterwards."""
        raise NotImplementedError

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        log.error("internal error on connection from %s: %s: %s",
                  format_address(client_address), type(exc).__name__, exc)

    def drain(self, timeout):
        """Stop taking connections, wake every handler so it answers what it has
        received and returns, and wait up to ``timeout`` seconds for them all.

        Call after ``shutdown()``. Returns True when every handler finished."""
        deadline = Deadline(timeout)
        with self._lock:
            self._draining = True
            for conn in list(self.connections):
                conn.wake()
            while self._accepting:
                if not deadline.left():
                    return False
                self._lock.wait(deadline.left())
        return True


class Signals:
    """Signals delivered to the main thread as numbers, with no work in a handler.

    A Python signal handler runs between two bytecodes of the main thread, whatever
    that thread holds: a handler that takes a lock the interrupted code holds
    deadlocks, and one that logs can re-enter logging. Here the handler does
    nothing; the interpreter's C-level handler writes the signal number to a socket
    (``signal.set_wakeup_fd``) and ``wait`` reads it in the main thread, which does
    the work. Create it in the main thread, before printing that the program is
    ready, so that a signal sent as soon as the ready line appears finds it.

    Args:
        signums: the signals to catch (SIGTERM, SIGINT, ...).
    """

    def __init__(self, signums):
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        for signum in signums:
            signal.signal(signum, _no_work)

    def close(self):
        """Stop receiving signal numbers: clear the wake-up fd, close the sockets. The
        handlers stay (they do nothing)."""
        signal.set_wakeup_fd(-1)
        self._reader.close()
        self._writer.close()

    def post(self, signum):
        """Deliver ``signum`` to ``wait`` as if it had been received. Thread-safe."""
        try:
            self._writer.send(bytes((signum,)))
        except OSError:
            pass

    def wait(self, timeout=None):
        """Return the signal numbers received since the last call (a list, in order),
        waiting up to ``timeout`` seconds (None: until one comes) for the first."""
        while True:
            try:
                data = self._reader.recv(256)
            except (BlockingIOError, InterruptedError):
                ready, _, _ = select.select([self._reader], [], [], timeout)
                if not ready:
                    return []
                continue
            return list(data)


def _no_work(signum, frame):
    # The signal number reaches Signals.wait through the wake-up socket.
    pass


def run_until_stopped(server, on_stop, signals, drain_timeout=4.0, on_signal=None):
    """Serve ``server`` (a FramedServer) until SIGTERM or SIGINT, then stop gracefully.

    The accept loop runs in a thread; the main thread waits for the signal. Then
    ``on_stop()`` runs first (a server closes its session there), the accept loop
    stops, and ``drain`` lets handlers answer what they hold, for up to
    ``drain_timeout`` seconds (PROTOCOL.md section 6: the issue asks for an exit
    within 5 s).

    Args:
        signals: a ``Signals`` catching SIGTERM and SIGINT, and any others for
            ``on_signal``; another thread may ``post`` one of them.
        on_signal: None, or ``f(signum)``, called in the main thread for each other
            signal received (SIGUSR1, SIGHUP), in order.
    """
    accept_thread = threading.Thread(target=server.serve_forever, name="accept", daemon=True)
    accept_thread.start()
    stopping = False
    while not stopping:
        for signum in signals.wait():
            if signum in (signal.SIGTERM, signal.SIGINT):
                stopping = True
            elif on_signal is not None:
                on_signal(signum)
    on_stop()
    server.shutdown()
    server.drain(drain_timeout)
    server.server_close()

