"""Sockets, threads, TLS and command-line plumbing shared by the three programs.

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
* ``ArgumentParser`` and the ``arg_*`` types give every program the same usage
  errors (exit status 2, PROTOCOL.md section 5).
"""

import argparse
import logging
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
# How long a lingering close waits for the peer to finish sending, in seconds.
# nginx's lingering_timeout is 5 s; a peer here is a program, not a slow browser.
LINGER_SECONDS = 1.0


class ConnectionTimeout(TimeoutError):
    """No frame came in time. ``mid_frame`` is True if part of a frame had arrived."""

    def __init__(self, message, mid_frame):
        super().__init__(message)
        self.mid_frame = mid_frame


class Connection:
    """One framed connection over a connected socket (PROTOCOL.md section 1).

    Not thread-safe for two concurrent readers or two concurrent writers; one reader
    and one writer at a time is fine.

    Args:
        sock: a connected ``socket.socket`` or ``ssl.SSLSocket``.
        max_frame: the largest frame body accepted, in bytes.
        peer: a ``"host:port"`` label for log lines.
    """

    def __init__(self, sock, max_frame=protocol.DEFAULT_MAX_FRAME, peer=None):
        self.sock = sock
        self.decoder = protocol.FrameDecoder(max_frame)
        self.peer = peer or format_address(sock.getpeername())
        self._frame_started = None

    def send(self, message):
        """Send one message (``dict``) as a frame. Raises ``OSError`` on failure."""
        self.sock.sendall(protocol.encode_frame(message))

    def receive(self, idle_timeout=None, frame_timeout=None, deadline=None):
        """Receive the next message.

        Args:
            idle_timeout: seconds to wait for the first byte of a frame; None: forever.
            frame_timeout: seconds a frame may take from its first byte to its last;
                None: forever.
            deadline: a ``time.monotonic()`` instant after which to give up whatever
                the two timeouts say; None: none.

        Returns:
            dict: the validated message (see ``protocol.parse_message``), or None when
            the peer closed the connection (a partly received frame is dropped).

        Raises:
            protocol.FrameError: bad length prefix; the connection must be closed.
            protocol.MessageError: one bad frame, already consumed; go on reading.
            ConnectionTimeout: a timeout above ran out.
            OSError: the connection failed.
        """
        decoder = self.decoder
        while True:
            body = decoder.next_frame()
            if body is not None:
                self._frame_started = time.monotonic() if decoder.in_frame else None
                return protocol.parse_message(body)
            if self._frame_started is None:
                timeout = idle_timeout
            elif frame_timeout is None:
                timeout = None
            else:
                timeout = max(0.0, self._frame_started + frame_timeout - time.monotonic())
            if deadline is not None:
                left = max(0.0, deadline - time.monotonic())
                timeout = left if timeout is None else min(timeout, left)
            try:
                if timeout is not None and timeout <= 0:
                    # settimeout(0) would mean "do not block", not "time is up".
                    raise socket.timeout
                self.sock.settimeout(timeout)
                chunk = self.sock.recv(RECV_SIZE)
            except socket.timeout:
                mid = self._frame_started is not None
                raise ConnectionTimeout(
                    f"timed out waiting for {'the rest of a frame' if mid else 'a frame'} "
                    f"from {self.peer}", mid) from None
            if not chunk:
                return None
            if self._frame_started is None:
                self._frame_started = time.monotonic()
            decoder.feed(chunk)

    def next_message(self, idle_timeout=None, frame_timeout=None):
        """Receive the next valid message, answering faults as PROTOCOL.md section 1
        says: a bad message gets a BAD_MESSAGE frame and reading goes on; a bad length
        prefix, or a frame that takes longer than ``frame_timeout``, gets one ERROR
        frame and a lingering close.

        Returns:
            dict, or None when the connection is over (closed by the peer, or closed
            here after a fatal fault).

        Raises:
            ConnectionTimeout: no frame began within ``idle_timeout`` seconds.
            OSError: the connection failed.
        """
        while True:
            try:
                return self.receive(idle_timeout, frame_timeout)
            except protocol.ProtocolError as exc:
                log.warning("%s (from %s)", exc, self.peer)
                self.send(protocol.error_message(exc))
                if exc.fatal:
                    self.close(linger=True)
                    return None
            except ConnectionTimeout as exc:
                if not exc.mid_frame:
                    raise
                log.warning("closing connection from %s: %s", self.peer, exc)
                self.send(protocol.error(
                    protocol.TIMEOUT, f"a frame took longer than {frame_timeout:g} s to "
                    "arrive (frame timeout); closing"))
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
                deadline = time.monotonic() + LINGER_SECONDS
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    sock.settimeout(left)
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
    """Return ``"host:port"`` for a socket address tuple."""
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect(host, port, timeout, max_frame=protocol.DEFAULT_MAX_FRAME, tls=None):
    """Open a framed connection to ``host``:``port``.

    Args:
        timeout: seconds allowed for the TCP connect and the TLS handshake.
        tls: an ``ssl.SSLContext`` for the client side, or None for plain TCP.

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
        return Connection(sock, max_frame, peer=format_address((host, port)))
    except BaseException:
        sock.close()
        raise


def server_tls_context(cert, key, ca=None):
    """TLS context for a listening side. With ``ca``, peers may present a certificate,
    and one that does not verify against ``ca`` fails the handshake.

    Raises:
        OSError, ssl.SSLError: a file is missing or not a certificate or key.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if ca is not None:
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_tls_context(ca, cert=None, key=None):
    """TLS context for a connecting side that checks the peer against ``ca``, and
    presents ``cert``/``key`` when given (mutual TLS).

    Raises:
        OSError, ssl.SSLError: a file is missing or not a certificate or key.
    """
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def describe_error(exc):
    """One line for an OSError or ssl error, without the Python class noise."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, socket.timeout):
        return "timed out"
    return exc.strerror or str(exc) or type(exc).__name__


class FramedServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """Thread-per-connection TCP server for framed connections.

    ``handle_connection(conn)`` of the subclass is called in a thread of its own for
    each accepted ``Connection``. Knobs (class variables, as in socketserver):

    * ``allow_reuse_address = True``: a restarted program gets its port back at once.
    * ``request_queue_size = 128``: the listen backlog; socketserver's 5 drops SYNs
      under a burst of connections and costs the peers a one-second retry.
    * ``daemon_threads = True``: ``drain`` joins handlers itself, with a bound.

    Args:
        address: ``(host, port)``; port 0 picks a free port (see ``port``).
        max_frame: largest frame body accepted, bytes.
        max_conns: open connections allowed at once; past it a new connection gets
            one ``OVERLOADED`` frame and is closed.
        tls: an ``ssl.SSLContext`` for the server side, or None.
        handshake_timeout: seconds allowed for a TLS handshake.

    Raises:
        OSError: the address cannot be bound (port busy, bad address).
    """

    allow_reuse_address = True
    request_queue_size = 128
    daemon_threads = True
    block_on_close = False

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
        super().__init__(address, socketserver.BaseRequestHandler)

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
                f"the server has {self.max_conns} connections open, its maximum; try again later")))
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
        deadline = time.monotonic() + timeout
        with self._lock:
            self._draining = True
            for conn in list(self.connections):
                conn.wake()
            while self._accepting:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True


def stop_on_signals():
    """Return a ``threading.Event`` that SIGTERM and Ctrl-C (SIGINT) set.

    Call it before printing that the program is ready, so that a signal sent as soon
    as the ready line appears finds the handler in place.
    """
    stop = threading.Event()

    def request_stop(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop


def run_until_stopped(server, on_stop, stop, drain_timeout=4.0):
    """Serve ``server`` (a FramedServer) until ``stop`` is set, then stop gracefully.

    The accept loop runs in a thread; the main thread sleeps until then. Then
    ``on_stop()`` runs first (a server closes its session there), the accept loop
    stops, and ``drain`` lets handlers answer what they hold, for up to
    ``drain_timeout`` seconds (PROTOCOL.md section 6: the issue asks for an exit
    within 5 s).

    Args:
        stop: a ``threading.Event``, from ``stop_on_signals``; another thread may set
            it too.
    """
    accept_thread = threading.Thread(target=server.serve_forever, name="accept", daemon=True)
    accept_thread.start()
    while not stop.wait(3600):
        pass
    on_stop()
    server.shutdown()
    server.drain(drain_timeout)
    server.server_close()


def setup_logging():
    """Send log lines to standard output, one line each, flushed as written.

    Per-packet lines go to the ``rproxy.packets`` logger, so ``-quiet`` can silence
    them alone. An exception that escapes a thread is logged in one line, never as a
    traceback.
    """
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    # A closed stdout (a launcher gone) must not print logging's own tracebacks.
    logging.raiseExceptions = False

    def one_line(args):
        if args.exc_type is not SystemExit:
            log.error("internal error in thread %s: %s: %s",
                      args.thread.name if args.thread else "?", args.exc_type.__name__,
                      args.exc_value)

    threading.excepthook = one_line


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # Show "(default: ...)" only where there is a default worth reading.
    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default:" in action.help:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the assignment's single-dash options; usage errors exit 2."""

    def __init__(self, description, **kwargs):
        super().__init__(description=description, allow_abbrev=False,
                         formatter_class=_HelpFormatter, **kwargs)

    def add_limit_options(self):
        """Add the limits of a listening program: ``-max-conns``, ``-frame-timeout``
        and ``-idle-timeout`` (defaults: 1024 connections, 10 s, 300 s; nginx's
        ``client_header_timeout`` is 60 s, HAProxy's ``timeout client`` is commonly
        30 s to a few minutes)."""
        self.add_argument("-max-conns", type=arg_count, default=1024, metavar="N",
                          help="open connections allowed; more are answered OVERLOADED")
        self.add_argument("-frame-timeout", type=arg_seconds, default=10.0,
                          metavar="SECONDS", help="time a frame may take to arrive")
        self.add_argument("-idle-timeout", type=arg_seconds, default=300.0,
                          metavar="SECONDS",
                          help="time a connection may stay idle between frames")

    def add_tls_options(self, cert_help, ca_help):
        """Add ``-tls-cert``/``-tls-key`` (when ``cert_help``) and ``-tls-ca``."""
        if cert_help:
            self.add_argument("-tls-cert", metavar="FILE", help=cert_help)
            self.add_argument("-tls-key", metavar="FILE",
                              help="private key of -tls-cert (PEM)")
        self.add_argument("-tls-ca", metavar="FILE", help=ca_help)

    def parse_program_args(self, argv, check_peers=False):
        """Parse the command line of a listening program (the proxy, a server), set up
        logging (``-quiet`` silences the per-packet lines) and load the TLS files.

        Args:
            check_peers: with ``-tls-ca``, the listening side checks the certificates
                its peers present (the proxy, for mutual TLS).

        Returns:
            (args, listen_tls, connect_tls): the parsed arguments, the server-side
            ``ssl.SSLContext`` (``-tls-cert``) and the client-side one (``-tls-ca``),
            each None when not asked for. A usage error exits 2.
        """
        args = self.parse_args(argv)
        if (args.tls_cert is None) != (args.tls_key is None):
            self.error("-tls-cert and -tls-key go together")
        setup_logging()
        if args.quiet:
            logging.getLogger("rproxy.packets").setLevel(logging.WARNING)
        try:
            listen_tls = connect_tls = None
            if args.tls_cert:
                listen_tls = server_tls_context(args.tls_cert, args.tls_key,
                                                args.tls_ca if check_peers else None)
            if args.tls_ca:
                connect_tls = client_tls_context(args.tls_ca, args.tls_cert, args.tls_key)
        except (OSError, ValueError) as exc:
            self.error(f"cannot load TLS files: {describe_error(exc)}")
        return args, listen_tls, connect_tls

    def exit_cannot_listen(self, host, port, exc):
        """Report an address that cannot be bound (busy port) and exit 1."""
        self.exit(1, f"{self.prog}: cannot listen on {format_address((host, port))}: "
                     f"{describe_error(exc)}\n")


def _arg_type(parse):
    def convert(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


@_arg_type
def arg_port(text):
    """A listening port, 0..65535 (0: pick a free port)."""
    return protocol.parse_port(text)


@_arg_type
def arg_hostport(text):
    """``PORT`` or ``HOST:PORT`` of a peer."""
    return protocol.parse_hostport(text)


@_arg_type
def arg_id(text):
    """An id or policy id: any non-empty text."""
    if not text:
        raise ValueError("must not be empty")
    return text


@_arg_type
def arg_seconds(text):
    """A duration in seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"'{text}' is not a number of seconds above 0")
    return value


@_arg_type
def arg_count(text):
    """A whole number of at least 1."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError(f"'{text}' is not a whole number of at least 1")
    return int(text)
