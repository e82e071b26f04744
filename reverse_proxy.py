"""Policy-routed reverse proxy with round-robin load balancing.

    python reverse_proxy.py -port PORT

Upstream servers register (SETUP) into a registry keyed by privacy policy; clients
send DATA frames; each DATA frame goes to the next live server of its policy's
rotation, and the server's ACK goes back to the client, in order (PROTOCOL.md).

Design:

* One thread per connection (``netio.FramedServer``). A connection's first frame
  says what it is: DATA starts a client connection, SETUP a registration.
* ``Registry`` holds every upstream server and one ``Rotation`` per policy behind a
  single lock, and never does I/O, so it is tested without sockets. Choosing a
  server and moving the policy's cursor is one step under that lock: the k-th DATA
  frame of a policy goes to server k mod n whatever the concurrency (section 4).
* Each upstream server has a small ``ConnectionPool`` of data connections; a client
  thread takes one, sends the DATA frame, waits for the answer and gives it back.
* Failover (section 6): a forward that fails (refused, reset, no answer within the
  upstream timeout, malformed answer) takes the server out of the rotation and the
  same DATA frame goes to the next live server, each at most once. A server with a
  heartbeat session is then health-checked (PING on a data connection) and comes
  back after ``-rise`` good checks in a row; a legacy server is dropped.
* Servers that registered with ``heartbeat`` keep their registration connection as
  a session; its close or 3 heartbeats of silence take the server out.
"""

import logging
import secrets
import signal
import sys
import threading
import time

import netio
import protocol
from protocol import MessageType, ServiceError, policy_text, show

log = logging.getLogger("rproxy")
packets = logging.getLogger("rproxy.packets")

# Server states. DOWN: a forward failed; health checks run. LEFT: its session ended
# or, for a legacy server, a forward failed; it keeps its place in the rotation
# order so that it takes it again when it registers anew (issue 3, "Restarts").
UP, DOWN, LEFT = "up", "down", "left"

# A nonce for a registration proof is good once, for this many seconds.
NONCE_LIFETIME = 10.0
# Failed proofs allowed on one connection before the proxy closes it.
MAX_PROOF_FAILURES = 3


class Upstream:
    """One registration of an upstream server (PROTOCOL.md sections 2 and 6).

    A new SETUP for the same id makes a new ``Upstream`` in the old one's place, so
    identity tells a current registration from a replaced one.

    Attributes:
        id, policy: the id and policy as received (str or int).
        key, policy_key: their text, by which they compare.
        host, port: where the proxy connects for data connections.
        heartbeat: seconds between the server's PINGs, or None (legacy server).
        session: the ``netio.Connection`` of the session, or None.
        state: UP, DOWN or LEFT.
        served: DATA frames this server answered.
        good_checks: health checks passed in a row while DOWN.
        pool: its ``ConnectionPool``.
    """

    def __init__(self, message, host, session, pool_factory):
        self.id = message["id"]
        self.policy = message["privPolyId"]
        self.key = policy_text(self.id)
        self.policy_key = policy_text(self.policy)
        self.host = host
        self.port = message["listenport"]
        self.heartbeat = message.get("heartbeat")
        self.session = session if self.heartbeat is not None else None
        self.state = UP
        self.served = 0
        self.good_checks = 0
        self.pool = pool_factory(host, self.port)

    def __repr__(self):
        return f"<Upstream {self.key} policy {self.policy_key} {self.address} {self.state}>"

    @property
    def address(self):
        """``"host:port"`` of its data port."""
        return netio.format_address((self.host, self.port))


class Rotation:
    """The servers of one policy in first-registration order, and the cursor.

    ``choose`` returns the first eligible server at or after the cursor and moves the
    cursor past it, so with n eligible servers the k-th choice is server k mod n.
    The cursor may stand just past the last server: a server that joins then is the
    next one chosen. Not thread-safe: the ``Registry`` lock guards it.
    """

    def __init__(self):
        self.order = []
        self.cursor = 0

    def choose(self, exclude):
        """Return the next UP server not in ``exclude`` (a set), or None."""
        order = self.order
        count = len(order)
        for step in range(count):
            index = (self.cursor + step) % count
            upstream = order[index]
            if upstream.state == UP and upstream not in exclude:
                self.cursor = index + 1
                return upstream
        return None

    def peek(self):
        """Return the server ``choose`` would return next, without moving the cursor."""
        cursor = self.cursor
        upstream = self.choose(frozenset())
        self.cursor = cursor
        return upstream

    def remove(self, upstream):
        """Take ``upstream`` out of the order; the cursor keeps pointing at the same next
        server (the rotation goes on from where it was, section 4)."""
        index = self.order.index(upstream)
        del self.order[index]
        if index < self.cursor:
            self.cursor -= 1


class Registry:
    """Upstream servers by id, and one rotation per policy, behind one lock.

    Pure state: no sockets, no threads, no clock. Every method is thread-safe.

    Args:
        pool_factory: ``f(host, port)`` returning the connection pool of a new
            registration; it must have ``close()``.
    """

    def __init__(self, pool_factory):
        self._pool_factory = pool_factory
        self._lock = threading.Lock()
        self._servers = {}
        self._rotations = {}

    def register(self, message, host, session=None, move_policy=True):
        """Register the server of a validated SETUP ``message`` (section 2, 6).

        A server already registered under the same id is replaced in its place in the
        rotation order (its old place even if it had left); a new one is appended.

        Args:
            host: the address to connect to (the SETUP's ``host`` or the peer's).
            session: the registration ``netio.Connection``; kept only with heartbeat.
            move_policy: False refuses a SETUP that would move a registered, not-left
                server to another policy (registration with keys, section 7).

        Returns:
            (Upstream, Upstream or None): the new registration and the one it
            replaced; the caller closes the replaced one's session and pool.

        Raises:
            ServiceError: UNAUTHORIZED, when ``move_policy`` is False and the id is
                live in another policy.
        """
        upstream = Upstream(message, host, session, self._pool_factory)
        with self._lock:
            old = self._servers.get(upstream.key)
            if old is not None and old.policy_key != upstream.policy_key:
                if not move_policy and old.state != LEFT:
                    upstream.pool.close()
                    raise ServiceError(
                        f"server id {show(old.id)} is registered for privacy policy "
                        f"{show(old.policy)}; it must leave (close its session) before "
                        f"registering for {show(upstream.policy)}", protocol.UNAUTHORIZED)
                self._rotations[old.policy_key].remove(old)
            rotation = self._rotations.setdefault(upstream.policy_key, Rotation())
            if old is not None and old.policy_key == upstream.policy_key:
                rotation.order[rotation.order.index(old)] = upstream
            else:
                rotation.order.append(upstream)
            self._servers[upstream.key] = upstream
        return upstream, old

    def choose(self, policy, exclude=frozenset()):
        """Choose the server for the next DATA frame of ``policy`` (section 4).

        Args:
            policy: the DATA's ``privPoliId`` (str or int).
            exclude: servers already tried for this frame (set of Upstream).

        Returns:
            Upstream

        Raises:
            ServiceError: NO_SERVER when no live server serves the policy (the caller
                reports UPSTREAM_FAILED instead when it already tried some).
        """
        with self._lock:
            rotation = self._rotations.get(policy_text(policy))
            upstream = rotation.choose(exclude) if rotation is not None else None
        if upstream is None:
            raise ServiceError(f"no live server serves privacy policy {show(policy)}",
                               protocol.NO_SERVER)
        return upstream

    def is_current(self, upstream):
        """True while ``upstream`` is the registration in force for its id."""
        with self._lock:
            return self._current(upstream)

    def _current(self, upstream):
        # Call with the lock held. A replaced registration is never acted on.
        return self._servers.get(upstream.key) is upstream

    def record_served(self, upstream):
        """Count one DATA frame answered by ``upstream``."""
        with self._lock:
            upstream.served += 1

    def mark_failed(self, upstream):
        """A forward to ``upstream`` failed: take it out of the rotation.

        Returns:
            The new state, DOWN (it has a session: health-check it) or LEFT (a legacy
            server is dropped, section 6), or None if it was not UP or not current.
        """
        with self._lock:
            if not self._current(upstream) or upstream.state != UP:
                return None
            upstream.state = DOWN if upstream.heartbeat is not None else LEFT
            upstream.good_checks = 0
            return upstream.state

    def record_check(self, upstream, ok, rise):
        """Record one health check of a DOWN server.

        Args:
            ok: whether the check passed.
            rise: good checks in a row that bring it back UP.

        Returns:
            UP when it just came back, DOWN while it stays out, None when checks
            should stop (it left or was replaced).
        """
        with self._lock:
            if not self._current(upstream) or upstream.state != DOWN:
                return None
            upstream.good_checks = upstream.good_checks + 1 if ok else 0
            if upstream.good_checks >= rise:
                upstream.state = UP
            return upstream.state

    def end_session(self, upstream):
        """The session of ``upstream`` closed or fell silent: it leaves the rotation.

        Returns:
            True if it left; False if it had been replaced or had left already (the
            end of an older session never removes a newer registration).
        """
        with self._lock:
            if not self._current(upstream) or upstream.state == LEFT:
                return False
            upstream.state = LEFT
            return True

    def snapshot(self):
        """Return the registry for display: a list of ``(policy, servers)`` in order of
        first registration, each server a ``(id, address, state, served, next)`` tuple
        in rotation order; ``next`` is True for the server the next frame goes to."""
        with self._lock:
            snapshot = []
            for policy, rotation in self._rotations.items():
                following = rotation.peek()
                snapshot.append((policy, [(u.key, u.address, u.state, u.served,
                                           u is following) for u in rotation.order]))
            return snapshot

    def close(self):
        """Close every pool; the registry stays readable."""
        with self._lock:
            servers = list(self._servers.values())
        for upstream in servers:
            upstream.pool.close()


class ConnectionPool:
    """Idle data connections to one upstream server, reused last-in first-out.

    Args:
        connect: ``f()`` returning a new ``netio.Connection``; may raise ``OSError``.
        max_idle: idle connections kept; more are closed when given back.
    """

    def __init__(self, connect, max_idle):
        self._connect = connect
        self._max_idle = max_idle
        self._idle = []
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self):
        """Return ``(connection, reused)``; opens a new connection when none is idle.

        Raises:
            OSError: a new connection could not be opened.
        """
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._connect(), False

    def release(self, conn):
        """Give back a connection that is in step (its last answer fully read)."""
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self):
        """Close the idle connections; connections given back later are closed."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class UpstreamFailure(Exception):
    """A forward to one upstream server failed; the text says how, for logs and
    for the UPSTREAM_FAILED message."""


class ReverseProxy(netio.FramedServer):
    """The reverse proxy: a ``netio.FramedServer`` with a ``Registry``.

    Args:
        address: ``(host, port)`` to listen on.
        upstream_timeout: seconds one server may take to connect and answer.
        check_interval: seconds between health checks of a DOWN server.
        rise: good checks in a row that bring a server back.
        pool_size: idle data connections kept per server.
        frame_timeout, idle_timeout: seconds, see ``netio.Connection.receive``.
        policy_keys: ``{policy text or "*": key bytes}``, or None for open
            registration.
        upstream_tls: ``ssl.SSLContext`` for data connections, or None.
        require_client_cert: registration needs a verified TLS client certificate.
        **server_options: passed to ``netio.FramedServer``.
    """

    def __init__(self, address, *, upstream_timeout=2.0, check_interval=1.0, rise=2,
                 pool_size=8, frame_timeout=10.0, idle_timeout=300.0, policy_keys=None,
                 upstream_tls=None, require_client_cert=False, **server_options):
        super().__init__(address, **server_options)
        self.upstream_timeout = upstream_timeout
        self.check_interval = check_interval
        self.rise = rise
        self.pool_size = pool_size
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self.policy_keys = policy_keys
        self.upstream_tls = upstream_tls
        self.require_client_cert = require_client_cert
        self.registry = Registry(self._new_pool)
        self.stopping = threading.Event()

    def _new_pool(self, host, port):
        return ConnectionPool(lambda: netio.connect(
            host, port, self.upstream_timeout, self.max_frame, self.upstream_tls),
            self.pool_size)

    # --- Connections ---------------------------------------------------------------

    def handle_connection(self, conn):
        """Serve one connection until it closes: a client or a registration (section 3)."""
        role = None
        registration = _Registration()
        try:
            while True:
                upstream = registration.upstream
                in_session = upstream is not None and upstream.session is conn
                try:
                    message = conn.next_message(
                        3 * upstream.heartbeat if in_session else self.idle_timeout,
                        self.frame_timeout)
                except netio.ConnectionTimeout as exc:
                    if in_session:
                        self._session_silent(upstream)
                    else:
                        log.info("closing connection from %s: %s", conn.peer, exc)
                    return
                if message is None:
                    return
                kind = message["type"]
                if kind == MessageType.DATA and role in (None, "client"):
                    role = "client"
                    conn.send(self.route(message))
                elif kind == MessageType.SETUP and role in (None, "registration"):
                    role = "registration"
                    if not self.register(conn, message, registration):
                        conn.close(linger=True)
                        return
                elif kind == MessageType.PING and role == "registration":
                    conn.send(protocol.pong())
                else:
                    conn.send(protocol.error(protocol.BAD_MESSAGE,
                        f"a {kind.name} message (type {kind.value}) is not expected on "
                        f"{'a ' + role if role else 'a new'} connection"))
        except OSError:
            pass
        finally:
            upstream = registration.upstream
            # While the proxy stops, sessions close together with client connections;
            # the servers stay in their rotations so that the frames already received
            # are still answered.
            if (upstream is not None and upstream.session is conn
                    and not self.stopping.is_set()):
                if self.registry.end_session(upstream):
                    log.info("server id %s of privacy policy %s left: its session closed",
                             show(upstream.id), show(upstream.policy))

    def _session_silent(self, upstream):
        if self.registry.end_session(upstream):
            log.info("server id %s of privacy policy %s is down: no frame on its session "
                     "for %g s (3 heartbeats); removed from the rotation",
                     show(upstream.id), show(upstream.policy), 3 * upstream.heartbeat)

    # --- Routing -------------------------------------------------------------------

    def route(self, message):
        """Answer one DATA message: forward it with failover; return the ACK or ERROR
        message for the client (sections 4 and 6)."""
        srcid = message["srcid"]
        policy = message["privPoliId"]
        if packets.isEnabledFor(logging.INFO):
            packets.info("Received a data message from client %s privacy policy %s payload: %s",
                         show(srcid), show(policy), show(message["payload"]))
        frame = protocol.encode_frame(message)
        tried = {}
        while True:
            try:
                upstream = self.registry.choose(policy, tried)
            except ServiceError as exc:
                if tried:
                    reasons = "; ".join(f"server id {show(u.id)}: {why}" for u, why in tried.items())
                    which = ("the only live server" if len(tried) == 1
                             else f"all {len(tried)} live servers")
                    exc = ServiceError(
                        f"{which} of privacy policy {show(policy)} failed ({reasons})",
                        protocol.UPSTREAM_FAILED)
                log.warning("%s (client %s)", exc, show(srcid))
                return protocol.error_message(exc, srcid)
            if packets.isEnabledFor(logging.INFO):
                packets.info("Forwarding a data message to server id %s payload: %s",
                             show(upstream.id), show(message["payload"]))
            try:
                reply = self.forward(upstream, frame, srcid)
            except UpstreamFailure as exc:
                tried[upstream] = str(exc)
                self._upstream_failed(upstream, exc)
                continue
            self.registry.record_served(upstream)
            if packets.isEnabledFor(logging.INFO):
                packets.info("Received a data message from server id %s payload: %s",
                             show(upstream.id), show(reply.get("payload", reply.get("message"))))
                packets.info("Forwarding a data message to client id %s payload: %s",
                             show(srcid), show(reply.get("payload", reply.get("message"))))
            return reply

    def forward(self, upstream, frame, srcid):
        """Send one DATA ``frame`` to ``upstream`` and return its validated answer.

        A pooled connection that turns out closed (EOF or reset before any answer) is
        retried once on a new connection: the server may have closed it while idle.

        Returns:
            dict: an ACK whose ``destid`` is ``srcid``, or the server's ERROR with
            ``destid`` set to ``srcid``.

        Raises:
            UpstreamFailure: refused, reset, closed, timed out or malformed answer,
                all within ``upstream_timeout`` seconds of the call.
        """
        deadline = time.monotonic() + self.upstream_timeout
        while True:
            try:
                conn, reused = upstream.pool.acquire()
            except OSError as exc:
                raise UpstreamFailure(f"cannot connect to {upstream.address}: "
                                      f"{netio.describe_error(exc)}") from None
            try:
                conn.sock.sendall(frame)
                reply = conn.receive(deadline=deadline)
            except netio.ConnectionTimeout:
                conn.close()
                raise UpstreamFailure(f"no answer within {self.upstream_timeout:g} s") from None
            except protocol.ProtocolError as exc:
                conn.close()
                raise UpstreamFailure(f"malformed answer: {exc.message}") from None
            except OSError as exc:
                conn.close()
                if reused:
                    continue
                raise UpstreamFailure(f"connection failed: {netio.describe_error(exc)}") from None
            if reply is None:
                conn.close()
                if reused:
                    continue
                raise UpstreamFailure("closed the connection without answering")
            break
        kind = reply["type"]
        if kind == MessageType.ACK and policy_text(reply["destid"]) == policy_text(srcid):
            upstream.pool.release(conn)
            return reply
        if kind == MessageType.ERROR:
            upstream.pool.release(conn)
            reply["destid"] = srcid
            return reply
        conn.close()
        what = (f"an ACK for client {show(reply['destid'])}" if kind == MessageType.ACK
                else f"a {kind.name} message")
        raise UpstreamFailure(f"malformed answer: {what} instead of the ACK for client {show(srcid)}")

    def _upstream_failed(self, upstream, exc):
        state = self.registry.mark_failed(upstream)
        if state == DOWN:
            log.warning("server id %s of privacy policy %s at %s is down: %s; health "
                        "checks every %g s", show(upstream.id), show(upstream.policy),
                        upstream.address, exc, self.check_interval)
            threading.Thread(target=self._health_check, args=(upstream,),
                             name=f"check-{upstream.key}", daemon=True).start()
        elif state == LEFT:
            log.warning("server id %s of privacy policy %s at %s dropped: %s (it has no "
                        "heartbeat session)", show(upstream.id), show(upstream.policy),
                        upstream.address, exc)

    def _health_check(self, upstream):
        """Check a DOWN server every ``check_interval`` seconds until it is back UP,
        leaves, is replaced, or the proxy stops (section 6)."""
        pause = self.check_interval
        while not self.stopping.wait(pause):
            began = time.monotonic()
            ok = self._check_once(upstream)
            # Checks start every check_interval, however long a check took.
            pause = max(0.0, self.check_interval - (time.monotonic() - began))
            state = self.registry.record_check(upstream, ok, self.rise)
            if state == UP:
                log.info("server id %s of privacy policy %s at %s is back up after %d "
                         "good health checks", show(upstream.id), show(upstream.policy),
                         upstream.address, self.rise)
            if state != DOWN:
                return

    def _check_once(self, upstream):
        timeout = min(self.upstream_timeout, self.check_interval)
        try:
            conn = netio.connect(upstream.host, upstream.port, timeout, self.max_frame,
                                 self.upstream_tls)
        except OSError:
            return False
        try:
            conn.send(protocol.ping())
            reply = conn.receive(deadline=time.monotonic() + timeout)
            return reply is not None and reply["type"] == MessageType.PONG
        except (OSError, protocol.ProtocolError):
            return False
        finally:
            conn.close()

    # --- Registration --------------------------------------------------------------

    def register(self, conn, message, registration):
        """Answer one SETUP with REGISTERED or ERROR (sections 3, 6, 7).

        Returns:
            False when the connection must be closed (too many failed proofs).
        """
        host = message.get("host") or conn.sock.getpeername()[0]
        try:
            self._authorize(conn, message, registration)
            upstream, old = self.registry.register(
                message, host, conn, move_policy=self.policy_keys is None)
        except ServiceError as exc:
            registration.failures += 1
            log.warning("unauthorized: %s (from %s)", exc.message, conn.peer)
            answer = protocol.error_message(exc)
            if registration.failures >= MAX_PROOF_FAILURES:
                conn.send(answer)
                return False
            if self.policy_keys is not None:
                answer["nonce"] = registration.new_nonce()
            conn.send(answer)
            return True
        registration.upstream = upstream
        if old is not None:
            old.pool.close()
            if old.session is not None and old.session is not conn:
                log.info("server id %s registered again from %s: its session from %s is "
                         "replaced and closed", show(upstream.id), conn.peer, old.session.peer)
                old.session.wake()
        log.info("Received setup message from server id %s privacy policy %s port %d%s",
                 show(upstream.id), show(upstream.policy), upstream.port,
                 f" (heartbeat {upstream.heartbeat:g} s)" if upstream.heartbeat else
                 " (no heartbeat: legacy registration)")
        conn.send(protocol.registered(upstream.id, upstream.policy))
        return True

    def _authorize(self, conn, message, registration):
        """Raise ServiceError(UNAUTHORIZED) unless this SETUP may register."""
        policy = message["privPolyId"]
        if self.require_client_cert and not conn.sock.getpeercert():
            raise ServiceError("registration needs a TLS client certificate signed by the "
                               "proxy's -tls-ca authority", protocol.UNAUTHORIZED)
        if self.policy_keys is None:
            return
        key = self.policy_keys.get(policy_text(policy), self.policy_keys.get("*"))
        if key is None:
            raise ServiceError(f"no server may register for privacy policy {show(policy)}: "
                               "it has no key", protocol.UNAUTHORIZED)
        if "proof" not in message:
            raise ServiceError(f"registration for privacy policy {show(policy)} needs a "
                               "proof: answer with the nonce of this ERROR and the proof "
                               "(HMAC-SHA256)", protocol.UNAUTHORIZED)
        if not registration.take_nonce(message.get("nonce")):
            raise ServiceError("the SETUP's nonce was not issued on this connection, was "
                               "used already or is older than "
                               f"{NONCE_LIFETIME:g} s", protocol.UNAUTHORIZED)
        if not protocol.check_setup_proof(key, message["nonce"], message):
            raise ServiceError(f"wrong proof for privacy policy {show(policy)} (server id "
                               f"{show(message['id'])})", protocol.UNAUTHORIZED)

    # --- Status and shutdown -------------------------------------------------------

    def status_lines(self):
        """The registry as text lines: each policy, its servers in rotation order."""
        lines = ["Registry:"]
        snapshot = self.registry.snapshot()
        if not snapshot:
            lines.append("  (no server registered)")
        for policy, servers in snapshot:
            lines.append(f"  privacy policy {show(policy)}:")
            if not servers:
                lines.append("     (no servers)")
            for key, address, state, served, here in servers:
                lines.append(f"    {'->' if here else '  '} server id {show(key)} at {address} "
                             f"{state}, packets served: {served}")
        return lines

    def stop(self):
        """Stop health checks; the caller then drains connections."""
        self.stopping.set()


class _Registration:
    """Per-connection registration state: the upstream it registered and the nonce
    it was issued (section 7)."""

    def __init__(self):
        self.upstream = None
        self.failures = 0
        self._nonce = None
        self._issued = 0.0

    def new_nonce(self):
        self._nonce = secrets.token_hex(16)
        self._issued = time.monotonic()
        return self._nonce

    def take_nonce(self, nonce):
        """True once for the nonce issued last, within NONCE_LIFETIME seconds."""
        good = (self._nonce is not None and isinstance(nonce, str)
                and secrets.compare_digest(nonce, self._nonce)
                and time.monotonic() - self._issued <= NONCE_LIFETIME)
        self._nonce = None
        return good


def load_policy_keys(path):
    """Read a policy key file: one ``POLICY KEY`` pair per line, ``#`` comments.

    Returns:
        dict: policy text (or ``"*"``) -> key bytes.

    Raises:
        ValueError: unreadable file or a malformed line, named with its number.
    """
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read policy key file '{path}': "
                         f"{getattr(exc, 'strerror', None) or exc}") from None
    keys = {}
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{path} line {number}: expected 'POLICY KEY', got {len(fields)} "
                             "fields")
        keys[fields[0]] = fields[1].encode("utf-8")
    if not keys:
        raise ValueError(f"policy key file '{path}' has no 'POLICY KEY' line")
    return keys


def build_parser():
    parser = netio.ArgumentParser(
        "Policy-routed reverse proxy: forwards each DATA frame round-robin to a live "
        "upstream server of its privacy policy and relays the answer (PROTOCOL.md).")
    parser.add_argument("-port", type=netio.arg_port, default=2100,
                        help="TCP port to listen on; 0 picks a free port")
    parser.add_argument("-host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 serves other machines")
    parser.add_argument("-max-frame", type=netio.arg_count, default=protocol.DEFAULT_MAX_FRAME,
                        metavar="BYTES", help="largest frame body accepted")
    parser.add_argument("-quiet", action="store_true",
                        help="do not print the four lines per packet")
    parser.add_argument("-upstream-timeout", type=netio.arg_seconds, default=2.0,
                        metavar="SECONDS",
                        help="time a server may take to accept and answer one frame")
    parser.add_argument("-check-interval", type=netio.arg_seconds, default=1.0,
                        metavar="SECONDS", help="time between health checks of a down server")
    parser.add_argument("-rise", type=netio.arg_count, default=2, metavar="N",
                        help="good health checks in a row that bring a server back")
    parser.add_argument("-pool-size", type=netio.arg_count, default=8, metavar="N",
                        help="idle data connections kept per server")
    parser.add_limit_options()
    parser.add_argument("-policy-keys", metavar="FILE",
                        help="'POLICY KEY' lines: servers must prove the key of their "
                             "policy to register ('*' for any other policy)")
    parser.add_tls_options(
        "serve TLS with this certificate (PEM)",
        "CA (PEM) that checks servers: data connections use TLS and registration "
        "needs a client certificate signed by it")
    return parser


def main(argv=None):
    parser = build_parser()
    args, tls, upstream_tls = parser.parse_program_args(argv, check_peers=True)
    policy_keys = None
    if args.policy_keys:
        try:
            policy_keys = load_policy_keys(args.policy_keys)
        except ValueError as exc:
            parser.error(str(exc))
    try:
        proxy = ReverseProxy(
            (args.host, args.port), max_frame=args.max_frame, max_conns=args.max_conns,
            tls=tls, handshake_timeout=args.frame_timeout,
            upstream_timeout=args.upstream_timeout, check_interval=args.check_interval,
            rise=args.rise, pool_size=args.pool_size, frame_timeout=args.frame_timeout,
            idle_timeout=args.idle_timeout, policy_keys=policy_keys,
            upstream_tls=upstream_tls, require_client_cert=bool(args.tls_cert and args.tls_ca))
    except OSError as exc:
        parser.exit_cannot_listen(args.host, args.port, exc)
    stop = netio.stop_on_signals()
    signal.signal(signal.SIGUSR1, lambda signum, frame: log.info("\n".join(proxy.status_lines())))
    log.info("Running the reverse proxy on port %d", proxy.port)
    if policy_keys is None:
        log.info("Registration is open: any server that reaches port %d may serve any "
                 "policy (use -policy-keys to require keys)", proxy.port)
    else:
        log.info("Registration needs a key proof for policies: %s",
                 ", ".join(sorted(policy_keys)))

    def on_stop():
        log.info("Stopping: answering the frames already received, then exiting")
        proxy.stop()

    netio.run_until_stopped(proxy, on_stop, stop)
    proxy.registry.close()
    log.info("Reverse proxy stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
