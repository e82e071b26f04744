"""The proxy's stats over HTTP: a page for people, JSON and Prometheus for programs.

``StatsServer`` is CPython's ``http.server.ThreadingHTTPServer`` answering four
read-only routes, three from a ``snapshot()`` callable that the proxy provides (the
dict ``/stats.json`` serves; schema in README.md, "Observability"):

===============  ===================================================================
``/``            HTML page for people, complete as served (``render_page``) and
                 kept current by an inline script that fetches ``/stats.json``
                 every second
``/stats.json``  the snapshot as JSON
``/metrics``     Prometheus text format 0.0.4 (``metrics.render_prometheus``)
``/healthz``     ``200 ok`` while the proxy runs, ``503 draining`` once it drains,
                 from the ``draining()`` callable alone: no snapshot
===============  ===================================================================

Any other path is 404; any method but GET and HEAD is 405. The page loads nothing
from elsewhere: its CSS and script are inline and allowed by hash in its
Content-Security-Policy, so a value that escaped the HTML escaping still could not
run a script.

Strategy: a reader must never cost the proxy's routing more than a bounded, small
amount, whatever it sends and however many readers there are.

* **Snapshots are shared, one at a time.** A snapshot costs the proxy's loop thread
  a few microseconds a server, so readers do not each take one: a request is
  answered from the latest snapshot if it was taken at most ``max_age`` seconds
  (``MAX_AGE``, 0.5 s) before the request came, and otherwise takes a new one,
  which the requests that come meanwhile wait for and share, with its rendered
  answers. Whatever the number of readers, the proxy takes at most one snapshot at
  a time and about one per ``max_age``; one that cost T seconds to take and render
  (the interpreter's lock, which routing needs, is held meanwhile) is served for at
  least T / ``COST_SHARE`` seconds, so that stats never take more than a tenth of
  the proxy's time, however large the registry. A failed snapshot is shared the same way
  (500), so a stalled proxy is not asked again by every waiting reader.
* **Names are bounded** (``shorten``): policy ids, server ids and addresses come
  from the network, and a server id may be as long as a frame (1 MiB). Each is cut
  to at most ``NAME_LIMIT`` (128) characters, in the page, ``/stats.json`` and
  ``/metrics`` alike, and stays unique (``shorten`` says how).
* **A request has a deadline and a size.** Its request line, headers and any body
  must all arrive within ``request_timeout`` (``REQUEST_TIMEOUT``, 5 s) of the
  connection, however slowly the bytes trickle in (408 otherwise); the request line
  and each header line may be 8 KiB (414, 431), the whole head 32 KiB (431). The
  answer must be taken within ``SEND_TIMEOUT`` (10 s).
* **Slots go to the readers who need them.** At most ``max_connections``
  (``MAX_CONNECTIONS``, 40) connections are served at once. Past that, a new
  connection takes the slot of the oldest connection still sending its request
  (silent, slow, or a slowloris), which is closed, as nginx reuses its idle
  connections when it runs out (``ngx_drain_connections``); failing that, the slot
  of the oldest connection whose answer has not been taken within
  ``ANSWER_GRACE`` (1 s: a reader that does not read its answer). Only when every
  slot is answering a request for less than that does the new connection get
  ``503 too many stats readers``. So ``/healthz`` tells the truth however many
  idle or non-reading connections an attacker holds open.

Threads: ``start`` runs the accept loop in one thread ("stats"); each connection is
served in a daemon thread of its own. The server's lock guards the table of
connections served; the snapshots' lock is held while one snapshot is taken and
while an answer is rendered from it. ``snapshot()`` is called from a request's
thread, one call at a time; ``draining()`` from any request's thread, at any time.
"""

import base64
import decimal
import hashlib
import html
import http.server
import io
import json
import socket
import socketserver
import sys
import threading
import time
import urllib.parse

import cli
import metrics
import netio

__all__ = ["StatsServer", "render_page", "shorten", "bounded"]

# Seconds a connection may take to send its whole request (line, headers, any body):
# 5 s. HAProxy's packaged configuration has `timeout http-request 10s` and nginx's
# client_header_timeout is 60 s, each for any client of a web site; a stats reader
# (a browser tab, a scraper, a health check) sends its request in one packet.
REQUEST_TIMEOUT = 5.0
# Seconds an answer may take to be written (socket.sendall bounds the whole write):
# 10 s, the proxy's -frame-timeout; /metrics of 1000 servers is about 5 MB.
SEND_TIMEOUT = 10.0
# Seconds an answer may take to be taken before its slot may go to a new connection
# when every slot is taken: 1 s. A page's poll takes milliseconds; a scrape of
# /metrics of 2,000 servers (25 MB) about a second over loopback, and it is only cut
# when 40 other readers wait.
ANSWER_GRACE = 1.0
# Connections served at once: 40, the default of the Prometheus exporters'
# --web.max-requests; a page polls once a second over one connection at a time.
MAX_CONNECTIONS = 40
# Connections the kernel may hold ready before they are accepted: 511, nginx's
# default listen backlog on Linux (socketserver's default is 5, and a burst of
# readers past it waits for SYN retries: 1 s, 3 s, 7 s...).
LISTEN_BACKLOG = 511
# Seconds a snapshot is served again to the requests that come after it was taken:
# half the page's one-second refresh, so that a page still sees every second's
# numbers. Prometheus scrapes every minute by default (scrape_interval), and
# Envoy's admin serves the histograms of its last stats flush (every 5 s).
MAX_AGE = 0.5
# A snapshot and its answers may cost the proxy at most this share of its time: one
# that took T seconds to take and render is served for at least T / COST_SHARE
# seconds. Rendering holds the interpreter's lock, which the loop thread needs to
# route: /metrics of 2,000 servers takes ~0.35 s, and a scraper polling it without
# pause would otherwise hold the lock most of the time. 0.1: the loop keeps at least
# 90 % of its time, and a small registry (a few ms) still refreshes every 0.5 s.
COST_SHARE = 0.1
# Seconds the page's script waits for /stats.json before it says "stats
# unavailable": three refresh periods, so one slow answer is not an outage.
FETCH_TIMEOUT_SECONDS = 3
# Seconds a request waits for the snapshot another one is taking before it gets
# 503: as long as the page's script waits for its answer.
SNAPSHOT_WAIT = FETCH_TIMEOUT_SECONDS
# Bytes of the request line and of each header line, line end included, and of the
# whole head: nginx's large_client_header_buffers default, 4 buffers of 8k (and it
# answers 414 for a longer request line). Python's http.server takes 100 lines of
# 64 KiB, 6.4 MB a request.
LINE_LIMIT = 8192
HEAD_LIMIT = 4 * LINE_LIMIT
# Characters of a policy id, server id or address as served: a Prometheus label
# value and a table cell, not a frame (README.md, "Observability").
NAME_LIMIT = 128
# Seconds between two polls of the page's script; the issue asks for every second.
REFRESH_SECONDS = 1
# Seconds between reloads of the page when its script cannot run (<noscript>).
NOSCRIPT_REFRESH_SECONDS = 5
# After a refusal (405, 408, 414, 431), what the client still sends is read and
# dropped until it closes, for up to LINGER_TIME seconds and DISCARD_LIMIT bytes:
# closing with unread bytes would reset the connection, and the client could lose
# the answer (a lingering close, as nginx's lingering_close; its lingering_timeout
# is 5 s, but a stats slot is worth more than a late refusal). PROTOCOL.md section 1
# does the same for frames.
LINGER_TIME = 1.0
DISCARD_LIMIT = 65536
# The whole answer to a connection past max_connections when no slot can be freed.
BUSY_ANSWER = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
               b"Content-Length: 23\r\nConnection: close\r\n\r\n"
               b"too many stats readers\n")

JSON_CONTENT_TYPE = "application/json"
HTML_CONTENT_TYPE = "text/html; charset=utf-8"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"


class StatsServer:
    """The stats listener: an HTTP server in a thread of its own.

    Args:
        address: ``(host, port)``; port 0 picks a free port (see ``port``). A host
            with a ``:`` is an IPv6 literal (``"::1"``), without brackets.
        snapshot: ``f()`` returning the stats dict (schema: README.md,
            "Observability"; policy ids, server ids and addresses are str); called
            from a request's thread, one call at a time, at most about once per
            ``max_age`` seconds. It may raise (the request gets 500).
        draining: ``f()`` returning True once the proxy drains; ``/healthz`` calls
            it and nothing else, from any request's thread: it must be cheap and
            thread-safe (the proxy's: ``lambda: proxy.stopping``).
        logger: a ``logging.Logger`` for the ready line (``Stats on
            http://HOST:PORT/``, event ``stats_listening`` {url}) and for each
            failure (``stats_unavailable`` {path, error, reason}: a snapshot or an
            answer that could not be made; ``stats_request_failed`` {peer, error,
            reason}); None for silence. A reader that goes away or is too slow is
            no failure.
        request_timeout: seconds a connection may take to send its whole request.
        max_connections: connections served at once (see the module docstring).
        max_age: seconds a snapshot is served again to requests that come after it
            was taken; 0: each request gets one taken after it came (shared only
            with the requests that came before it was taken).

    Raises:
        OSError: the address cannot be bound (port busy, no such address).
    """

    def __init__(self, address, snapshot, draining, *, logger=None,
                 request_timeout=REQUEST_TIMEOUT, max_connections=MAX_CONNECTIONS,
                 max_age=MAX_AGE):
        self._logger = logger
        snapshots = _Snapshots(snapshot, max_age, self._unavailable)
        self._httpd = _HTTPServer(address, snapshots, draining, logger, request_timeout,
                                  max_connections)
        self._thread = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def port(self):
        """The port listened on (the one picked, for port 0)."""
        return self._httpd.server_address[1]

    @property
    def url(self):
        """``http://HOST:PORT/``, brackets around an IPv6 host."""
        host = self._httpd.server_address[0]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    def start(self):
        """Serve in a daemon thread; log ``Stats on URL``."""
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._httpd.serve_forever,
                                            name="stats", daemon=True)
            self._thread.start()
        if self._logger is not None:
            self._logger.info("Stats on %s", self.url,
                              extra=cli.event("stats_listening", url=self.url))

    def close(self):
        """Stop accepting and close the listener; safe to call twice. Requests being
        served finish in their own threads (at most ``request_timeout`` +
        ``SNAPSHOT_WAIT`` + ``SEND_TIMEOUT`` later)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is not None:
            try:
                # Wakes the accept loop now rather than at its next 0.5 s poll: a
                # listening socket shut for reading is readable and its accept()
                # fails, so serve_forever sees the stop request at once (Linux).
                self._httpd.socket.shutdown(socket.SHUT_RD)
            except OSError:
                pass  # refused elsewhere (macOS): the loop stops within 0.5 s
            # shutdown() waits for serve_forever to return: never without a thread.
            self._httpd.shutdown()
            thread.join()
        self._httpd.server_close()

    def _unavailable(self, path, exc):
        if self._logger is not None:
            self._logger.warning("stats: cannot serve %s: %s: %s", path, type(exc).__name__,
                                 exc, extra=cli.event("stats_unavailable", path=path,
                                                      error=type(exc).__name__,
                                                      reason=str(exc)))


def shorten(name):
    """``name`` (str) as the stats serve it: at most ``NAME_LIMIT`` (128)
    characters, and still telling names apart.

    A name shorter than ``NAME_LIMIT`` is kept. A longer one becomes exactly
    ``NAME_LIMIT`` characters: its first 95, an ellipsis (U+2026) and 32 hex digits
    of the SHA-256 of its UTF-8 form. So a kept name never equals a shortened one
    (their lengths differ), and two long names are served alike only if they share
    their first 95 characters and 128 bits of SHA-256.
    """
    if len(name) < NAME_LIMIT:
        return name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:32]
    return name[:NAME_LIMIT - 33] + "\u2026" + digest


def bounded(snapshot):
    """``snapshot`` (the stats dict) with every policy id, server id and address
    shortened (``shorten``): a new dict; ``snapshot`` is not changed.

    Raises:
        KeyError, TypeError: ``snapshot`` does not follow the schema.
    """
    return dict(snapshot, policies=[
        dict(policy, policy=shorten(policy["policy"]), servers=[
            dict(server, id=shorten(server["id"]), address=shorten(server["address"]))
            for server in policy["servers"]])
        for policy in snapshot["policies"]])


class _Snapshots:
    """The latest snapshot, bounded, and the answers rendered from it, shared by
    the requests that come at most ``max_age`` seconds after it was taken; one
    snapshot is taken at a time, and the requests that come meanwhile wait for it.

    Args:
        take: ``f()`` returning a snapshot; it may raise.
        max_age: seconds.
        unavailable: ``f(path, exc)``, called once for each snapshot or answer that
            could not be made.
        clock: ``f()`` returning monotonic seconds.
    """

    def __init__(self, take, max_age, unavailable, clock=time.monotonic):
        self._take = take
        self._max_age = max_age
        self._unavailable = unavailable
        self._clock = clock
        self._lock = threading.Lock()  # held while a snapshot is taken or rendered
        self._taken_at = None          # when the latest one was asked for
        self._snapshot = None          # the latest one, or None if it failed
        self._answers = {}             # route -> its answer from _snapshot
        self._cost = 0.0               # seconds spent taking and rendering it

    def answer(self, route, path):
        """The answer of ``route`` (``f(snapshot)`` returning ``(status, content
        type, body bytes, headers dict)``) for a request for ``path`` that comes
        now: 500 if no snapshot or answer could be made, 503 if the snapshot being
        taken does not come within ``SNAPSHOT_WAIT`` seconds."""
        came = self._clock()
        if not self._lock.acquire(timeout=SNAPSHOT_WAIT):
            return (503, TEXT_CONTENT_TYPE, b"stats busy: a snapshot is still being "
                    b"taken; try again\n", {"Retry-After": "1"})
        try:
            # max_age 0 asks for a snapshot per request (tests): no stretching then.
            max_age = self._max_age and max(self._max_age, self._cost / COST_SHARE)
            if self._taken_at is None or self._taken_at < came - max_age:
                self._taken_at = began = self._clock()
                self._answers = {}
                try:
                    self._snapshot = bounded(self._take())
                except Exception as exc:  # the proxy's trouble costs these requests only
                    self._snapshot = None
                    self._unavailable(path, exc)
                self._cost = self._clock() - began
            answer = self._answers.get(route)
            if answer is None:
                began = self._clock()
                answer = (500, TEXT_CONTENT_TYPE,
                          b"stats unavailable: the proxy could not take a snapshot\n", {})
                if self._snapshot is not None:
                    try:
                        answer = route(self._snapshot)
                    except Exception as exc:
                        self._unavailable(path, exc)
                self._answers[route] = answer
                self._cost += self._clock() - began
            return answer
        finally:
            self._lock.release()


class _HTTPServer(http.server.ThreadingHTTPServer):
    """``ThreadingHTTPServer`` with the address family of its host, a listen
    backlog of ``LISTEN_BACKLOG``, at most ``max_connections`` connections served
    (the oldest one still sending its request, or else the oldest whose answer has
    waited ``ANSWER_GRACE`` to be taken, makes room for a new one) and errors logged
    in one line."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, snapshots, draining, logger, request_timeout,
                 max_connections):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.snapshots = snapshots
        self.draining = draining
        self.logger = logger
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._lock = threading.Lock()
        # The connections served, oldest first: the monotonic time its answer began
        # once the request has come whole, None while it is still being read.
        self._served = {}
        super().__init__(address, _Handler)

    def server_bind(self):
        # HTTPServer.server_bind looks up the host's fully qualified name, a DNS
        # query that can take seconds; nothing here uses it.
        socketserver.TCPServer.server_bind(self)
        self.server_name = self.server_address[0]
        self.server_port = self.server_address[1]

    def process_request(self, request, client_address):
        with self._lock:
            full = len(self._served) >= self.max_connections
            oldest = None
            if full:
                stuck = time.monotonic() - ANSWER_GRACE
                oldest = next((sock for sock, since in self._served.items()
                               if since is None), None) or next(
                    (sock for sock, since in self._served.items() if since < stuck), None)
            if oldest is not None:
                del self._served[oldest]
                try:
                    # Its thread's read returns at once and the thread ends.
                    oldest.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # closed by its thread already
            if not full or oldest is not None:
                self._served[request] = None
        if full and oldest is None:
            try:
                request.sendall(BUSY_ANSWER)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def answering(self, request):
        """Mark ``request`` (its socket) as being answered, so that no newcomer takes
        its slot; False if it was closed to make room already."""
        with self._lock:
            if request not in self._served:
                return False
            self._served[request] = time.monotonic()
            return True

    def _forget(self, request):
        with self._lock:
            self._served.pop(request, None)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        # A reader that goes away mid-answer (a closed tab) or does not take its
        # answer in time is no fault to report.
        if self.logger is not None and not isinstance(exc, (ConnectionError, socket.timeout)):
            self.logger.warning("stats: request from %s failed: %s: %s", client_address[0],
                                type(exc).__name__, exc,
                                extra=cli.event("stats_request_failed", peer=client_address[0],
                                                error=type(exc).__name__, reason=str(exc)))


class _Refusal(Exception):
    """A request refused before it is parsed: ``status`` and a one-line ``text``."""

    def __init__(self, status, text):
        super().__init__(text)
        self.status = status
        self.text = text


class _DeadlineReader(io.RawIOBase):
    """The raw reader of a connection whose reads all end by one ``deadline``
    (``netio.Deadline``): each waits only for the time left, so a client that sends
    a byte at a time gets no more time than one that sends nothing."""

    def __init__(self, sock, deadline):
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self._deadline.left()
        if not left:
            raise socket.timeout("the request's deadline has passed")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _Handler(http.server.BaseHTTPRequestHandler):
    """One request: read it within its deadline and size limits, answer it (from the
    shared snapshot, or from ``draining()`` for ``/healthz``). HTTP/1.0, one request
    per connection: a poll a second costs one loopback connect, and no idle
    keep-alive connection holds a thread."""

    server_version = "rproxy-stats"
    # What an answer sent before the request is parsed (408, 414, 431) knows of it.
    requestline = ""
    request_version = "HTTP/1.0"
    command = None
    # http.server's own refusals (a request line it cannot read, HTTP/2.0) are one
    # line of text, as every other answer here, not an HTML page.
    error_content_type = "text/plain; charset=utf-8"
    error_message_format = "%(code)d %(message)s\n"

    def version_string(self):
        return self.server_version  # no Python version for the curious

    def setup(self):
        super().setup()
        self.rfile.close()  # the plain reader: every read goes by the deadline instead
        self.rfile = io.BufferedReader(_DeadlineReader(
            self.connection, netio.Deadline(self.server.request_timeout)))

    def handle(self):
        try:
            lines = self._read_head()
        except _Refusal as refusal:
            self._refuse(refusal.status, refusal.text)
            return
        except socket.timeout:
            self._refuse(408, f"the request did not come whole within "
                              f"{self.server.request_timeout:g} s")
            return
        if not lines or not self.server.answering(self.request):
            return  # closed before a whole request came, or to make room for another
        self.raw_requestline = lines[0]
        stream, self.rfile = self.rfile, io.BytesIO(b"".join(lines[1:]))
        try:
            # http.server's own rules from here: 400, 505, HTTP/0.9, the headers.
            parsed = self.parse_request()
        finally:
            self.rfile = stream  # what follows the head: a body, read by the deadline
        if parsed:
            getattr(self, "do_" + self.command)()

    def _read_head(self):
        """The request line and the header lines up to the blank line that ends them
        (bytes, each with its line end); the request line alone when it has fewer
        than three words (HTTP/0.9, which has no headers, or junk: ``parse_request``
        answers either at once); [] if the connection closed first.

        Raises:
            _Refusal: 414 for a request line over ``LINE_LIMIT`` bytes, 431 for a
                header line over ``LINE_LIMIT`` or a head over ``HEAD_LIMIT``.
            socket.timeout: the deadline passed.
        """
        line = self.rfile.readline(LINE_LIMIT + 1)
        if len(line) > LINE_LIMIT:
            raise _Refusal(414, f"request line longer than {LINE_LIMIT} bytes")
        if not line.endswith(b"\n"):
            return []
        lines = [line]
        if len(line.split()) < 3:
            return lines
        size = len(line)
        while lines[-1] not in (b"\r\n", b"\n"):
            line = self.rfile.readline(LINE_LIMIT + 1)
            size += len(line)
            if len(line) > LINE_LIMIT:
                raise _Refusal(431, f"header line longer than {LINE_LIMIT} bytes")
            if size > HEAD_LIMIT:
                raise _Refusal(431, f"request line and headers longer than {HEAD_LIMIT} "
                                    "bytes")
            if not line.endswith(b"\n"):
                return []
            lines.append(line)
        return lines

    def do_GET(self):
        self._answer(head=False)

    def do_HEAD(self):
        self._answer(head=True)

    def __getattr__(self, name):
        # BaseHTTPRequestHandler answers a method without a do_METHOD with 501;
        # every method but GET and HEAD is 405 here.
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self):
        self._refuse(405, f"method {self.command} not allowed: use GET or HEAD",
                     {"Allow": "GET, HEAD"})

    def _refuse(self, status, text, extra=None):
        """Answer ``status`` with the one line ``text``, then close lingering (see
        ``LINGER_TIME``)."""
        self._send(status, TEXT_CONTENT_TYPE, f"{text}\n".encode(), False, extra)
        try:
            self.connection.shutdown(socket.SHUT_WR)
            deadline = netio.Deadline(LINGER_TIME)
            dropped = 0
            while dropped < DISCARD_LIMIT and deadline.left():
                self.connection.settimeout(deadline.left())
                chunk = self.connection.recv(DISCARD_LIMIT)
                if not chunk:
                    break
                dropped += len(chunk)
        except OSError:
            pass  # reset, or silent past the linger time: nothing more is owed

    def _answer(self, head):
        path = urllib.parse.urlsplit(self.path).path
        if path == "/healthz":
            answer = _healthz(self.server.draining())
        elif path in _ROUTES:
            answer = self.server.snapshots.answer(_ROUTES[path], path)
        else:
            answer = (404, TEXT_CONTENT_TYPE, f"no such page: {path}\n".encode(), {})
        self._send(*answer[:3], head, answer[3])

    def _send(self, status, content_type, body, head, extra=None):
        self.connection.settimeout(SEND_TIMEOUT)  # for the whole answer: sendall
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format, *args):
        # A page polls every second; an access log line per poll would drown the
        # proxy's own lines. Failures are logged by the server.
        pass


def _page(snapshot):
    return 200, HTML_CONTENT_TYPE, render_page(snapshot).encode("utf-8"), {
        "Content-Security-Policy": _PAGE_POLICY, "Referrer-Policy": "no-referrer"}


def _json(snapshot):
    return 200, JSON_CONTENT_TYPE, json.dumps(snapshot).encode("utf-8"), {}


def _metrics(snapshot):
    return (200, metrics.PROMETHEUS_CONTENT_TYPE,
            metrics.render_prometheus(snapshot).encode("utf-8"), {})


def _healthz(draining):
    if draining:
        return 503, TEXT_CONTENT_TYPE, b"draining\n", {}
    return 200, TEXT_CONTENT_TYPE, b"ok\n", {}


# The routes answered from a snapshot; /healthz is answered from draining() alone.
_ROUTES = {"/": _page, "/stats.json": _json, "/metrics": _metrics}


# --- The page ----------------------------------------------------------------------
#
# The server renders the whole page (it works without its script); the script then
# fills the same elements from /stats.json. Both sides share the markup: the
# script clones the <template> rows that render_page writes, and finds every value
# by its data-f (field) attribute. The formats (_count, _ms, _uptime, ...) exist
# twice, here and in _SCRIPT, and must agree.

# (field, column heading, class of its cells): the columns of a policy's table.
_COLUMNS = (("next", "", "nx"), ("id", "server", "id"), ("state", "state", ""),
            ("address", "address", "addr"), ("weight", "weight", "n"),
            ("served", "served", "n"), ("in_flight", "in flight", "n"),
            ("failures", "failures", "n"), ("p50", "p50 (1 min)", "n"),
            ("p99", "p99 (1 min)", "n"))

_BALANCE_NAMES = {"roundrobin": "round robin", "leastconn": "leastconn"}

# Milliseconds from which a latency is shown as "\u2265 10000 ms": the largest bucket
# bound, past which a percentile is reported as the bound itself
# (metrics.LatencyCounts.percentiles).
_LATENCY_CAP_MS = round(metrics.LATENCY_BOUNDS[-1] * 1000)

_STYLE = """
:root{--bg:#f5f6f8;--card:#fff;--fg:#1b2230;--muted:#5f6b7d;--line:#e2e6ec;
--up:#05603a;--up-bg:#d3f8df;--down:#fff;--down-bg:#c01c28;--down-row:#fde8e7;
--left:#3f4856;--left-bg:#e4e7ec;--warn:#7a3d00;--warn-bg:#fedf89;--accent:#2557c7;
--hot:#b42318;--flash:#ffd54a;--mono:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",
"Liberation Mono",monospace}
@media (prefers-color-scheme:dark){:root{--bg:#0e1117;--card:#161b24;--fg:#e6e9ef;
--muted:#98a2b3;--line:#283040;--up:#a6f4c5;--up-bg:#0b4228;--down-row:#3b1114;
--left:#cfd4dc;--left-bg:#323a48;--warn-bg:#b54708;--warn:#fff;--accent:#84adff;
--hot:#fda29b;--flash:#8a6d00}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.45 system-ui,
-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"DejaVu Sans",sans-serif}
.wrap{max-width:1180px;margin:0 auto;padding:16px}
header{display:flex;flex-wrap:wrap;align-items:center;gap:6px 12px;margin-bottom:14px}
h1{font-size:20px;margin:0}
.status{margin:0 0 0 auto;color:var(--muted);font-size:13px}
.status.bad{color:var(--down);background:var(--down-bg);padding:2px 8px;border-radius:4px;
font-weight:600}
body.stale main,body.stale .tiles{opacity:.55}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(160px,1fr));gap:10px}
.tile{background:var(--card);border:1px solid var(--line);border-radius:10px;
padding:10px 14px}
.k{display:block;color:var(--muted);font-size:12px;text-transform:uppercase;
letter-spacing:.05em}
.v{display:block;font:600 22px/1.3 var(--mono)}
.sub{display:block;color:var(--muted);font:12px var(--mono)}
.codes{display:flex;flex-wrap:wrap;align-items:center;gap:6px;margin:12px 0 0;padding:0;
list-style:none}
.codes .k{margin-right:4px}
.codes li[data-code]{background:var(--card);border:1px solid var(--line);border-radius:999px;
padding:2px 10px;font-size:12px}
.codes b{font:600 12px var(--mono);margin-left:6px}
.codes li.hot{border-color:var(--hot);color:var(--hot);background:var(--down-row)}
.policy{background:var(--card);border:1px solid var(--line);border-radius:10px;
margin-top:14px;overflow:hidden}
.policy h2{font-size:16px;margin:0;padding:10px 14px;border-bottom:1px solid var(--line);
display:flex;flex-wrap:wrap;gap:4px 12px;align-items:baseline}
.policy h2 .muted{color:var(--muted);font-size:13px;font-weight:400}
.scroll{overflow-x:auto}
table{width:100%;border-collapse:collapse}
th,td{padding:7px 14px;text-align:left;border-bottom:1px solid var(--line);white-space:nowrap}
th{font-size:11px;color:var(--muted);font-weight:600;text-transform:uppercase;
letter-spacing:.05em}
tbody tr:last-child td{border-bottom:0}
td.n,th.n{text-align:right;font-family:var(--mono)}
td.id{font-weight:600;font-family:var(--mono)}
td.addr{font-family:var(--mono);color:var(--muted)}
td.id,td.addr{white-space:normal;overflow-wrap:anywhere}
td.id{min-width:20ch}td.addr{min-width:24ch}
.policy h2 span{overflow-wrap:anywhere;min-width:0}
td.nx{width:5.5em;color:var(--accent);font-weight:700}
tr.next td.nx{box-shadow:inset 4px 0 var(--accent)}
tr.st-down{background:var(--down-row)}
tr.st-left td{color:var(--muted)}
.badge{display:inline-block;min-width:4.2em;text-align:center;border-radius:4px;
padding:1px 6px;font:700 11px/1.6 var(--mono);letter-spacing:.06em}
.badge.up,.badge.running{color:var(--up);background:var(--up-bg)}
.badge.down{color:var(--down);background:var(--down-bg)}
.badge.left{color:var(--left);background:var(--left-bg)}
.badge.draining{color:var(--warn);background:var(--warn-bg)}
tr.flash{animation:flash .7s ease-in-out 4}
@keyframes flash{50%{background:var(--flash)}}
.empty{color:var(--muted);padding:14px}
footer{margin-top:18px;color:var(--muted);font-size:12px}
footer a{color:inherit}
footer p{margin:4px 0}
@media (max-width:640px){
.wrap{padding:10px}.status{margin-left:0;width:100%}
.tiles{grid-template-columns:repeat(2,1fr);gap:8px}.tile{padding:8px 12px}.v{font-size:18px}
table,tbody,td{display:block}thead{display:none}
tbody tr{display:grid;grid-template-columns:repeat(3,1fr);gap:6px 10px;padding:10px 14px;
border-bottom:1px solid var(--line)}
tbody tr:last-child{border-bottom:0}
td,td.id,td.addr{border:0;padding:0;white-space:normal;overflow-wrap:anywhere;min-width:0}
td.n{text-align:left}
td::before{content:attr(data-label);display:block;color:var(--muted);
font:11px system-ui,sans-serif;text-transform:uppercase;letter-spacing:.05em}
td.id{grid-area:1/1;font-size:17px}td.st{grid-area:1/2}
td.nx{grid-area:1/3;text-align:right;width:auto}
td.id::before,td.st::before,td.nx::before{content:none}
td.addr{grid-column:1/-1}
tr.next td.nx{box-shadow:none}tr.next{box-shadow:inset 4px 0 var(--accent)}}
"""

_SCRIPT = """
(function () {
  "use strict";
  var REFRESH_MS = %(refresh_ms)d, TIMEOUT_MS = %(timeout_ms)d;
  var LATENCY_CAP_MS = %(latency_cap_ms)d;
  var BALANCE_NAMES = %(balance_names)s;
  var main = document.getElementById("policies");
  var status = document.getElementById("status");
  var states = new Map();  // policy + "\\n" + server id -> state last shown

  function count(n) { return n.toLocaleString("en-US"); }
  function ms(v) {
    if (v === null || v === undefined) { return "\\u2013"; }
    if (v >= LATENCY_CAP_MS) { return "\\u2265 " + LATENCY_CAP_MS + " ms"; }
    return v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0) + " ms";
  }
  function two(n) { return (n < 10 ? "0" : "") + n; }
  function uptime(s) {
    s = Math.floor(s);
    var d = Math.floor(s / 86400), clock = two(Math.floor(s / 3600) %% 24) + ":" +
      two(Math.floor(s / 60) %% 60) + ":" + two(s %% 60);
    return d ? d + " d " + clock : clock;
  }
  function fields(root) {
    var found = {};
    if (root.dataset && root.dataset.f) { found[root.dataset.f] = root; }
    root.querySelectorAll("[data-f]").forEach(function (el) { found[el.dataset.f] = el; });
    return found;
  }
  function put(el, text) { if (el && el.textContent !== text) { el.textContent = text; } }
  function byData(parent, name) {
    var map = new Map();
    Array.prototype.forEach.call(parent.children, function (el) {
      if (el.dataset[name] !== undefined) { map.set(el.dataset[name], el); }
    });
    return map;
  }
  function place(parent, el, index) {
    if (parent.children[index] !== el) {
      parent.insertBefore(el, parent.children[index] || null);
    }
  }
  function clone(id) {
    return document.getElementById(id).content.firstElementChild.cloneNode(true);
  }

  // The states shown by the server's render, so that the first poll can flash a change.
  main.querySelectorAll("section[data-policy]").forEach(function (section) {
    section.querySelectorAll("tr[data-server]").forEach(function (tr) {
      states.set(section.dataset.policy + "\\n" + tr.dataset.server, tr.dataset.state);
    });
  });

  function renderServer(policy, tr, s) {
    var f = fields(tr), key = policy + "\\n" + s.id, before = states.get(key);
    tr.className = "st-" + s.state + (s.next ? " next" : "") +
      (tr.classList.contains("flash") ? " flash" : "");
    tr.dataset.state = s.state;
    put(f.next, s.next ? "\\u25b6 next" : "");
    put(f.id, s.id);
    put(f.state, s.state.toUpperCase());
    f.state.className = "badge " + s.state;
    put(f.address, s.address);
    put(f.weight, count(s.weight));
    put(f.served, count(s.served));
    put(f.in_flight, count(s.in_flight));
    put(f.failures, count(s.failures));
    put(f.p50, ms(s.latency_ms.p50));
    put(f.p99, ms(s.latency_ms.p99));
    if (before !== undefined && before !== s.state) {
      tr.classList.remove("flash");
      void tr.offsetWidth;  // a reflow, so that a running flash starts again
      tr.classList.add("flash");
    }
    states.set(key, s.state);
  }

  function renderPolicy(section, p) {
    var f = fields(section), up = 0, rows = byData(f.rows, "server");
    put(f.policy, p.policy);
    put(f.balance, BALANCE_NAMES[p.balance] || p.balance);
    p.servers.forEach(function (s, i) {
      var tr = rows.get(s.id);
      if (!tr) { tr = clone("tpl-server"); tr.dataset.server = s.id; }
      rows.delete(s.id);
      renderServer(p.policy, tr, s);
      place(f.rows, tr, i);
      if (s.state === "up") { up += 1; }
    });
    rows.forEach(function (tr) { tr.remove(); });
    put(f.summary, up + " of " + p.servers.length + " up");
  }

  function render(snap) {
    var t = snap.totals, f = fields(document.body), sections = byData(main, "policy");
    put(f.run, snap.draining ? "DRAINING" : "RUNNING");
    f.run.className = "badge " + (snap.draining ? "draining" : "running");
    put(f.uptime, uptime(snap.uptime_s));
    put(f.packets, count(t.packets));
    put(f.failovers, count(t.failovers));
    put(f.connections, count(snap.connections));
    put(f.kinds, Object.keys(snap.connections_by_kind).map(function (k) {
      return k + " " + count(snap.connections_by_kind[k]);
    }).join(" \\u00b7 "));
    put(f.registered, count(t.registrations.registered));
    put(f.refused, "refused " + count(t.registrations.refused));
    document.querySelectorAll("[data-code]").forEach(function (li) {
      var n = t.answers[li.dataset.code] || 0;
      put(li.querySelector("b"), count(n));
      li.classList.toggle("hot", li.dataset.code !== "ACK" && n > 0);
    });
    snap.policies.forEach(function (p, i) {
      var section = sections.get(p.policy);
      if (!section) { section = clone("tpl-policy"); section.dataset.policy = p.policy; }
      sections.delete(p.policy);
      renderPolicy(section, p);
      place(main, section, i);
    });
    sections.forEach(function (section) { section.remove(); });
    f.empty.hidden = snap.policies.length > 0;
  }

  main.addEventListener("animationend", function (e) { e.target.classList.remove("flash"); });

  function poll() {
    var control = new AbortController();
    var timer = setTimeout(function () { control.abort(); }, TIMEOUT_MS);
    fetch("stats.json", { cache: "no-store", signal: control.signal })
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      })
      .then(function (snap) {
        render(snap);
        document.body.classList.remove("stale");
        status.className = "status";
        status.textContent = "live \\u00b7 updated " + new Date().toLocaleTimeString("en-GB");
      })
      .catch(function (e) {
        document.body.classList.add("stale");
        status.className = "status bad";
        status.textContent = "stats unavailable (" + (e.name === "AbortError" ?
          "no answer" : e.message) + "); retrying";
      })
      .then(function () { clearTimeout(timer); setTimeout(poll, REFRESH_MS); });
  }
  setTimeout(poll, REFRESH_MS);
})();
""" % {"refresh_ms": REFRESH_SECONDS * 1000, "timeout_ms": FETCH_TIMEOUT_SECONDS * 1000,
       "latency_cap_ms": _LATENCY_CAP_MS,
       "balance_names": json.dumps(_BALANCE_NAMES)}


def _csp_hash(text):
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Only this page's own style and script run; it fetches from itself alone.
_PAGE_POLICY = (f"default-src 'none'; style-src {_csp_hash(_STYLE)}; "
                f"script-src {_csp_hash(_SCRIPT)}; connect-src 'self'; img-src data:; "
                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _count(n):
    return f"{n:,}"


def _ms(value):
    if value is None:
        return "\u2013"
    if value >= _LATENCY_CAP_MS:
        return f"\u2265 {_LATENCY_CAP_MS} ms"
    return _fixed(value, 2 if value < 10 else 1 if value < 100 else 0) + " ms"


def _fixed(value, places):
    """``value`` with ``places`` decimals, as JavaScript's ``toFixed`` writes it: a
    tie (on the exact binary value) goes up, where Python's format goes to even."""
    return str(decimal.Decimal(value).quantize(decimal.Decimal(1).scaleb(-places),
                                               decimal.ROUND_HALF_UP))


def _uptime(seconds):
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    clock = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return f"{days} d {clock}" if days else clock


def _e(value):
    return html.escape(str(value), quote=True)


def _server_row(server):
    """One ``<tr>`` of a policy's table; ``server`` None gives the empty template."""
    if server is None:
        cells, state, attrs = {}, "", ""
    else:
        state = server["state"]
        latency = server["latency_ms"]
        cells = {"next": "\u25b6 next" if server["next"] else "", "id": server["id"],
                 "state": state.upper(), "address": server["address"],
                 "weight": _count(server["weight"]), "served": _count(server["served"]),
                 "in_flight": _count(server["in_flight"]),
                 "failures": _count(server["failures"]),
                 "p50": _ms(latency["p50"]), "p99": _ms(latency["p99"])}
        attrs = (f' class="st-{_e(state)}{" next" if server["next"] else ""}"'
                 f' data-server="{_e(server["id"])}" data-state="{_e(state)}"')
    tds = []
    for field, heading, css in _COLUMNS:
        text = _e(cells.get(field, ""))
        if field == "state":
            text = f'<span class="badge {_e(state)}" data-f="state">{text}</span>'
            tds.append(f'<td class="st" data-label="{heading}">{text}</td>')
        else:
            tds.append(f'<td class="{css}" data-label="{heading}" data-f="{field}">'
                       f'{text}</td>')
    return f"<tr{attrs}>{''.join(tds)}</tr>"


def _policy_section(policy):
    """One policy's ``<section>``; ``policy`` None gives the empty template."""
    if policy is None:
        name = balance = summary = attrs = rows = ""
    else:
        servers = policy["servers"]
        up = sum(1 for server in servers if server["state"] == "up")
        name = _e(policy["policy"])
        balance = _e(_BALANCE_NAMES.get(policy["balance"], policy["balance"]))
        summary = f"{up} of {len(servers)} up"
        attrs = f' data-policy="{name}"'
        rows = "".join(_server_row(server) for server in servers)
    heads = "".join(f'<th class="{css}">{heading}</th>' for _, heading, css in _COLUMNS)
    return (f'<section class="policy"{attrs}><h2><span>privacy policy '
            f'<span data-f="policy">{name}</span></span>'
            f'<span class="muted" data-f="balance">{balance}</span>'
            f'<span class="muted" data-f="summary">{summary}</span></h2>'
            f'<div class="scroll"><table><thead><tr>{heads}</tr></thead>'
            f'<tbody data-f="rows">{rows}</tbody></table></div></section>')


def render_page(snapshot):
    """The stats page for ``snapshot``, complete: it reads right without its script.

    Every value from the snapshot is HTML-escaped (server ids and addresses come
    from the network). Policies and servers keep the snapshot's order.

    Args:
        snapshot: the stats dict of ``/stats.json`` (schema: README.md,
            "Observability").

    Returns:
        str, an HTML document with inline CSS and script.

    Raises:
        KeyError, TypeError: ``snapshot`` does not follow the schema.
    """
    totals = snapshot["totals"]
    run_class = "draining" if snapshot["draining"] else "running"
    kinds = " \u00b7 ".join(f"{_e(kind)} {_count(count)}"
                            for kind, count in snapshot["connections_by_kind"].items())
    codes = "".join(
        f'<li data-code="{_e(code)}"{" class=hot" if code != "ACK" and count else ""}>'
        f'{_e(code)}<b>{_count(count)}</b></li>'
        for code, count in totals["answers"].items())
    registrations = totals["registrations"]
    policies = "".join(_policy_section(policy) for policy in snapshot["policies"])

    def tile(label, field, value, sub_field=None, sub=""):
        extra = f'<span class="sub" data-f="{sub_field}">{sub}</span>' if sub_field else ""
        return (f'<div class="tile"><span class="k">{label}</span>'
                f'<span class="v" data-f="{field}">{value}</span>{extra}</div>')

    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Reverse proxy stats</title><link rel="icon" href="data:,">
<noscript><meta http-equiv="refresh" content="{NOSCRIPT_REFRESH_SECONDS}"></noscript>
<style>{_STYLE}</style></head>
<body><div class="wrap">
<header><h1>Reverse proxy</h1>
<span class="badge {run_class}" data-f="run">{run_class.upper()}</span>
<p class="status" id="status" aria-live="polite"><noscript>JavaScript is off: the page
reloads every {NOSCRIPT_REFRESH_SECONDS} s</noscript></p></header>
<div class="tiles">
{tile("uptime", "uptime", _uptime(snapshot["uptime_s"]))}
{tile("packets received", "packets", _count(totals["packets"]))}
{tile("failovers", "failovers", _count(totals["failovers"]))}
{tile("connections open", "connections", _count(snapshot["connections"]), "kinds", kinds)}
{tile("registrations", "registered", _count(registrations["registered"]),
      "refused", f'refused {_count(registrations["refused"])}')}
</div>
<ul class="codes"><li class="k">answers</li>{codes}</ul>
<main id="policies">{policies}</main>
<p class="empty" data-f="empty"{" hidden" if snapshot["policies"] else ""}>No server has
registered yet.</p>
<footer><p>p50 and p99: latency of the answers of the last minute, from buckets up
to {_LATENCY_CAP_MS} ms (\u2265 {_LATENCY_CAP_MS} ms: that long or longer). Names longer
than {NAME_LIMIT - 1} characters are shortened to {NAME_LIMIT}, ending in \u2026 and a
hash.</p>
<p>For programs: <a href="stats.json">/stats.json</a> \u00b7
<a href="metrics">/metrics</a> (Prometheus) \u00b7 <a href="healthz">/healthz</a></p></footer>
</div>
<template id="tpl-policy">{_policy_section(None)}</template>
<template id="tpl-server">{_server_row(None)}</template>
<script>{_SCRIPT}</script>
</body></html>
"""
