"""Policy-routed reverse proxy with round-robin load balancing.

    python reverse_proxy.py -port PORT

Upstream servers register (SETUP) into a registry keyed by privacy policy; clients
send DATA frames; each DATA frame goes to the next live server of its policy's
rotation, and the server's answer goes back to the client, in order (PROTOCOL.md).

Units, each testable alone:

* ``registry.Registry``: the servers and one rotation per policy (round robin,
  weights, leastconn), pure state behind one lock.
* ``gate.RegistrationGate``: who may register (policy keys, nonces), pure.
* ``forwarder.Forwarder``: routing, pipelined data connections, failover and health
  checks.
* ``eventloop``: the selector loop, channels and listeners: the only door to sockets.
* This module: ``FrontChannel`` (one accepted connection: a client's, whose frames
  it hands to the forwarder and whose answers it puts back in order, or a server's
  registration and session), and ``ReverseProxy``, which wires them together.

Threads and locks:

* The main thread parses the command line, then waits for signals
  (``netio.Signals``: the handlers do nothing, the signal numbers come through a
  socket): SIGTERM and Ctrl-C drain and stop the proxy, SIGUSR1 prints the registry
  (read under the registry's lock), SIGHUP starts the key reload. It touches nothing
  else.
* A "reload" thread (one at a time, guarded by ``_reload_lock``) reads the key file,
  which may block (a FIFO, a slow mount), and posts the new keys to the loop.
* The loop thread (``ReverseProxy.start``) owns every socket: the listeners, every
  client, registration and data connection, every health check, and all per-
  connection state, the counters (``forwarder.Totals``) and the registration gate.
  It is the only writer of the registry. Other threads reach it only through
  ``EventLoop.post``.
* The registry's lock guards the registry and its rotations; it is held for
  microseconds (a choice, a state change, a snapshot), never across I/O.
* With ``-stats``, the stats listener's threads (``stats.StatsServer``: one accepts,
  one per request) ask for a snapshot with ``ReverseProxy.stats``, which the loop
  thread takes between two turns and hands back: they read nothing of the loop's.
* The resolver pool of the event loop (up to two threads, only for SETUP host names
  that are not IP literals) resolves names and posts the result to the loop.
* Log lines are queued by whichever thread logs, without waiting, and written by
  the log writer thread (``cli.setup_output``): no thread here waits for stdout.
"""

import ipaddress
import logging
import signal
import threading
import time

import cli
import eventloop
import forwarder
import gate
import metrics
import netio
import protocol
import proxy_protocol
from protocol import MessageType, ServiceError, show
from registry import BALANCES, ROUNDROBIN, Registry

log = logging.getLogger("rproxy")
packets = logging.getLogger("rproxy.packets")

# Connection roles (PROTOCOL.md section 3), decided by the first DATA or SETUP frame.
CLIENT, REGISTRATION = "client", "registration"

# Descriptors kept out of -max-conns: the standard streams, the listeners, the
# selector, the wake-up pairs of the loop and of the signals, resolver threads and
# health checks (about 10 at rest; and, with -stats, its readers:
# stats.MAX_CONNECTIONS more). Each connection counted by -max-conns may need a data
# connection too, so the default is half of what is left.
RESERVED_DESCRIPTORS = 16

# Back-pressure on one client connection. It stops reading when this many frames
# wait for their answers to be written, when this many bytes of its frames are at the
# servers, or when this many bytes of answers wait for it to read them; it reads
# again at half of each. HTTP/2 servers allow 100 to 128 concurrent streams by
# default; 1 MiB is the default largest frame, which always gets through alone.
MAX_PENDING = 128
MAX_IN_FLIGHT_BYTES = 1 << 20
MAX_OUTPUT_BYTES = 1 << 20

# Stopping (SIGTERM): the answers to the frames received have DRAIN_TIMEOUT seconds to
# come; then the frames still unanswered are answered TIMEOUT, and the connections
# have GIVE_UP_WAIT seconds to take those answers. With the log's cli.FINISH_WAIT
# (1 s) the proxy exits within 5 s, below docker stop's 10 s before SIGKILL and
# within HAProxy's usual hard-stop-after budgets.
DRAIN_TIMEOUT = 3.5
GIVE_UP_WAIT = 0.5


class FrontChannel(eventloop.Channel):
    """One accepted connection: a client's or a server's registration (section 3).

    Client: every DATA frame gets a sequence number and goes to the forwarder; the
    answers, which come back in any order, are written in the order of the frames
    (the reorder buffer ``held``). Registration: SETUP is answered at once; with a
    heartbeat the connection stays as the server's session.
    """

    def __init__(self, proxy, sock, peer, host, proxied=False):
        super().__init__(proxy.loop, sock, peer, proxy.max_frame, proxy.tls,
                         _proxy_header if proxied else None)
        self.proxy = proxy
        self.host = host
        self.role = None
        self.next_seq = 0
        self.next_out = 0
        self.held = {}
        self.in_flight_bytes = 0
        self.attempt = None
        self.session_of = None
        self.last_frame = self.last_answer = proxy.loop.now
        self.partial_since = None
        self.finishing = False
        self.last_seq = None
        self.ready = False
        self.awaiting_header = proxied  # no PROXY protocol header yet (front tier)

    def start(self):
        self.proxy.front.add(self)
        # Until it is ready (a TLS handshake): the frame timeout.
        self.set_deadline(self.loop.now + self.proxy.frame_timeout)
        super().start()

    def preamble_received(self, header):
        # The client's address, as the front tier saw it (PROXY protocol); LOCAL (the
        # front tier's own health check) and UNKNOWN keep the real one.
        self.awaiting_header = False
        if header.source is not None:
            self.host = _unmapped(header.source[0])
            self.peer = protocol.format_address(self.host, header.source[1])

    def connection_made(self):
        self.ready = True
        self._arm()

    # --- Frames in ------------------------------------------------------------------

    def frames_received(self, bodies):
        proxy = self.proxy
        now = self.loop.now
        for body in bodies:
            seq = self.next_seq
            self.next_seq = seq + 1
            try:
                message, frame = protocol.parse_passable(body, self.proxy.max_frame)
            except protocol.MessageError as exc:
                log.warning("%s (from %s)", exc, self.peer,
                            extra=cli.event("bad_message", peer=self.peer, reason=exc.message))
                self.answer(seq, protocol.encode_frame(protocol.error_message(exc)),
                            exc.code)
                continue
            kind = message["type"]
            if kind is MessageType.DATA and self.role != REGISTRATION:
                self.role = CLIENT
                proxy.totals.packets += 1
                self.in_flight_bytes += len(frame)
                proxy.forwarder.route(self, seq, message, frame)
            elif kind is MessageType.PING:
                self.answer(seq, forwarder.PONG_FRAME)
            elif kind is MessageType.SETUP and self.role != CLIENT:
                self.role = REGISTRATION
                proxy.register(self, seq, message)
            else:
                where = f"a {self.role}" if self.role else "a new"
                self.answer(seq, protocol.encode_frame(protocol.error(
                    protocol.BAD_MESSAGE, f"a {kind.name} message (type {kind.value}) is not "
                    f"expected on {where} connection")), protocol.BAD_MESSAGE)
        if bodies:
            self.last_frame = now
        if self.decoder.in_frame:
            if self.partial_since is None:
                self.partial_since = now
        else:
            self.partial_since = None
        if (self.next_seq - self.next_out >= MAX_PENDING
                or self.in_flight_bytes >= MAX_IN_FLIGHT_BYTES
                or self.out_size >= MAX_OUTPUT_BYTES):
            self.pause_reading()
        self._arm()

    def frame_error(self, exc):
        log.warning("%s (from %s)", exc, self.peer,
                    extra=cli.event(exc.code.lower(), peer=self.peer, reason=exc.message))
        self.finishing = True
        self.answer(self.next_seq, protocol.encode_frame(protocol.error_message(exc)),
                    exc.code, linger=True)
        self.next_seq += 1

    def eof_received(self):
        self.finishing = True
        if self.next_seq == self.next_out:
            self.close()

    def timed_out(self, now):
        if self.partial_since is not None and self.reading:
            log.warning("closing connection from %s: timed out waiting for the rest of a "
                        "frame", self.peer, extra=cli.event("frame_timeout", peer=self.peer))
            self.finishing = True
            self.pause_reading()
            self.answer(self.next_seq, protocol.encode_frame(protocol.error(
                protocol.TIMEOUT, f"a frame took longer than {self.proxy.frame_timeout:g} s "
                "to arrive (frame timeout); closing")), protocol.TIMEOUT, linger=True)
            self.next_seq += 1
        elif self.session_of is not None:
            self.proxy.session_silent(self.session_of)
            self.abort()
        elif self.next_seq != self.next_out:
            # Nothing came either way for the idle timeout while frames waited: each
            # gets TIMEOUT, so that every packet is answered, then the connection
            # closes (lingering, so that the answers are not destroyed by a reset).
            waiting = [seq for seq in range(self.next_out, self.next_seq)
                       if seq not in self.held]
            idle = self.proxy.idle_timeout
            log.error("closing connection from %s: %d frame(s) unanswered for %g s; "
                      "answering them TIMEOUT", self.peer, len(waiting), idle,
                      extra=cli.event("idle_timeout", peer=self.peer, unanswered=len(waiting)))
            self.finishing = True
            self.pause_reading()
            self.last_seq = self.next_seq - 1
            timeout = protocol.encode_frame(protocol.error(
                protocol.TIMEOUT, f"no answer and no frame for {idle:g} s (the proxy's idle "
                "timeout); closing"))
            for seq in waiting:
                self.answer(seq, timeout, protocol.TIMEOUT)
        else:
            log.info("closing connection from %s: timed out waiting for a frame", self.peer,
                     extra=cli.event("idle_timeout", peer=self.peer))
            self.abort()

    # --- Answers out ------------------------------------------------------------------

    def wants(self, seq):
        """True while the answer to this connection's frame ``seq`` is still owed: not
        given yet (a TIMEOUT at the idle timeout, say) and the connection open."""
        return seq >= self.next_out and not self.is_closed

    def answered(self, pending, frame, code):
        """The answer to a forwarded DATA frame came (see ``forwarder.Pending``)."""
        self.in_flight_bytes -= len(pending.frame)
        self.answer(pending.seq, frame, code)

    def answer(self, seq, frame, code=None, linger=False):
        """Write ``frame``, the answer to this connection's frame ``seq``, after the
        answers to every frame before it (section 3: answers in the order the frames
        came). ``code`` ("ACK" or an error code) is counted; ``linger``: then close
        with a lingering close."""
        if seq < self.next_out:
            return  # answered already (TIMEOUT: the drain or the idle timeout gave up)
        if code is not None:
            self.proxy.totals.count(code)
        if linger:
            self.last_seq = seq
        if seq != self.next_out:
            self.held[seq] = frame
            return
        held = self.held
        while True:
            self.write(frame)
            if seq == self.last_seq:
                self.next_out = seq + 1
                self.close(linger=True)
                return
            seq += 1
            if not held or seq not in held:
                break
            frame = held.pop(seq)
        self.next_out = seq
        if seq == self.next_seq and self.finishing:
            # Lingering: a client still sending (to a proxy that stops) must not get a
            # reset that destroys the answers just written (section 1).
            self.close(linger=True)
            return
        self.last_answer = self.loop.now
        self._arm()
        if not self.reading and not self.finishing:
            self._maybe_resume()

    def drained(self):
        if not self.reading and not self.finishing:
            self._maybe_resume()

    def _maybe_resume(self):
        if (self.next_seq - self.next_out < MAX_PENDING // 2
                and self.in_flight_bytes < MAX_IN_FLIGHT_BYTES // 2
                and self.out_size < MAX_OUTPUT_BYTES // 2):
            self.resume_reading()
            if self.partial_since is not None:
                # The rest of the frame could not come while the proxy was not reading.
                self.partial_since = self.loop.now
                self._arm()

    def _arm(self):
        # One deadline at a time, the one that applies now. A frame half received
        # while reading is paused (back-pressure) waits for the proxy, not the client.
        proxy = self.proxy
        if self.partial_since is not None and self.reading:
            self.set_deadline(self.partial_since + proxy.frame_timeout)
        elif self.session_of is not None:
            self.set_deadline(self.last_frame + 3 * self.session_of.heartbeat)
        elif self.next_seq == self.next_out:
            self.set_deadline(self.loop.now + proxy.idle_timeout)
        else:
            # The forwarder bounds every frame in flight; this bounds the connection
            # should an answer ever be lost all the same.
            self.set_deadline(max(self.last_frame, self.last_answer) + proxy.idle_timeout)

    def drain(self):
        """The proxy stops: answer what has been received, then close."""
        if self.role == REGISTRATION or (self.role is None and self.next_seq == self.next_out):
            self.close()
            return
        self.read_now()
        self.finishing = True
        self.pause_reading()
        if self.next_seq == self.next_out:
            self.close(linger=True)

    def closed(self, exc):
        self.proxy.front.discard(self)
        self.held.clear()
        if exc is not None and not self.ready:
            log.warning("connection from %s failed before %s: %s", self.peer,
                        "its PROXY protocol header (front-tier port)" if self.awaiting_header
                        else "its first frame", netio.describe_error(exc),
                        extra=cli.event("connection_failed", peer=self.peer,
                                        reason=netio.describe_error(exc)))
        upstream = self.session_of
        if upstream is not None and not self.proxy.stopping:
            self.proxy.session_ended(upstream)
        if (self.attempt is not None and self.attempt.challenged is not None
                and not self.proxy.stopping):
            self.proxy.challenge_unanswered(self, *self.attempt.challenged)


def _proxy_header(received):
    # The preamble of a connection on the front-tier listener (eventloop.Channel).
    header = proxy_protocol.parse(received)
    return None if header is proxy_protocol.NEED_DATA else (header.length, header)


class ReverseProxy:
    """The reverse proxy: a listener, a registry, a gate and a forwarder on one loop.

    Use: ``proxy = ReverseProxy(("127.0.0.1", 0)); proxy.start()``, then
    ``proxy.stop()`` (drains for up to ``drain_timeout`` seconds).

    Args:
        address: ``(host, port)`` to listen on; port 0 picks a free port (see
            ``port``).
        max_frame: largest frame body accepted, bytes.
        max_conns: open client and registration connections allowed; past it a new
            connection gets one OVERLOADED frame and is closed.
        tls: ``ssl.SSLContext`` to serve TLS with, or None.
        upstream_tls: ``ssl.SSLContext`` for data connections, or None.
        policy_keys: ``{policy text or "*": key bytes}``, or None for open
            registration.
        require_client_cert: registration needs a verified TLS client certificate.
        balance: ``{policy text or "*": "roundrobin" or "leastconn"}``.
        upstream_timeout, check_interval, rise, pool_size: see ``forwarder.Forwarder``.
        frame_timeout: seconds a frame may take from its first byte to its last (and a
            TLS handshake, or a PROXY protocol header, may take).
        idle_timeout: seconds a connection may stay idle with nothing in flight.
        proxy_protocol_address: ``(host, port)`` of a second listener for a front
            tier, on which every connection begins with a PROXY protocol header
            (version 1 or 2) whose source address is the client's; None: none.

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(self, address, *, max_frame=protocol.DEFAULT_MAX_FRAME, max_conns=1024,
                 tls=None, upstream_tls=None, policy_keys=None, require_client_cert=False,
                 balance=None, upstream_timeout=2.0, check_interval=1.0, rise=2,
                 pool_size=8, frame_timeout=10.0, idle_timeout=300.0,
                 proxy_protocol_address=None):
        self.max_frame = max_frame
        self.max_conns = max_conns
        self.tls = tls
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self.loop = eventloop.EventLoop()
        balance = balance or {}
        self.registry = Registry(
            balance=lambda policy: balance.get(policy, balance.get("*", ROUNDROBIN)),
            latency_factory=metrics.LatencyWindow)
        self.gate = gate.RegistrationGate(policy_keys, require_certificate=require_client_cert)
        self.totals = forwarder.Totals()
        self.forwarder = forwarder.Forwarder(
            self.loop, self.registry, self.totals, upstream_timeout=upstream_timeout,
            check_interval=check_interval, rise=rise, pool_size=pool_size,
            max_frame=max_frame, upstream_tls=upstream_tls)
        self.front = set()
        self.stopping = False
        self.started = self.loop.now
        self._drained = threading.Event()
        self._reload_lock = threading.Lock()
        self._reloading = False
        self.listeners = []
        try:
            self.listener = eventloop.Listener(
                self.loop, eventloop.listen_socket(*address), self._accept)
            self.listeners.append(self.listener)
            self.front_tier = None
            if proxy_protocol_address is not None:
                self.front_tier = eventloop.Listener(
                    self.loop, eventloop.listen_socket(*proxy_protocol_address),
                    self._accept_proxied, "front-tier connections")
                self.listeners.append(self.front_tier)
        except BaseException:
            for listener in self.listeners:
                listener.close()
            self.loop.close()
            raise
        self._thread = None

    @property
    def port(self):
        """The TCP port the proxy listens on (int)."""
        return self.listener.port

    def start(self):
        """Run the loop in a thread of its own ("loop")."""
        self._thread = threading.Thread(target=self.loop.run, name="loop", daemon=True)
        self._thread.start()

    def stop(self, drain_timeout=DRAIN_TIMEOUT):
        """Stop accepting, answer the frames already received, close every connection
        and stop the loop. The servers' answers have ``drain_timeout`` seconds to come;
        a frame still unanswered then is answered TIMEOUT. Call from another thread
        than the loop's; safe to call twice."""
        if self._thread is None:
            return
        self.loop.post(self._drain)
        if not self._drained.wait(drain_timeout):
            self.loop.post(self.forwarder.close, (
                f"the proxy is stopping, and no answer came within its {drain_timeout:g} s "
                "drain time; send the frame again (to another proxy)"))
            self._drained.wait(GIVE_UP_WAIT)
        self.loop.stop()
        self._thread.join(GIVE_UP_WAIT)
        self._thread = None
        self.loop.close()

    # --- Loop thread ------------------------------------------------------------------

    def _accept_proxied(self, sock, address):
        self._accept(sock, address, proxied=True)

    def _accept(self, sock, address, proxied=False):
        host = _unmapped(address[0])
        peer = protocol.format_address(host, address[1])
        if self.stopping or len(self.front) >= self.max_conns:
            if self.stopping:
                why = "the proxy is stopping; connect to another one or try again later"
            else:
                why = (f"the proxy has {self.max_conns} connection"
                       f"{'' if self.max_conns == 1 else 's'} open, its maximum (-max-conns); "
                       "try again later")
            log.warning("refusing connection from %s: %s", peer, why,
                        extra=cli.event("overloaded", peer=peer, max_conns=self.max_conns))
            eventloop.refuse(sock, protocol.encode_frame(protocol.error(protocol.OVERLOADED,
                                                                        why)))
            self.totals.count(protocol.OVERLOADED)
            return
        FrontChannel(self, sock, peer, host, proxied).start()

    def register(self, channel, seq, message):
        """Answer one SETUP on ``channel`` with REGISTERED or ERROR (sections 3, 6, 7)."""
        if channel.attempt is None:
            channel.attempt = gate.Attempt()
        channel.attempt.challenged = None
        try:
            self.gate.check(channel.attempt, message, channel.peer_certificate() is not None)
            upstream, old = self.registry.register(
                message, _connect_host(message.get("host"), channel.host), channel,
                move_policy=self.gate.open)
        except ServiceError as exc:
            answer, close = self.gate.refusal(channel.attempt, exc)
            if isinstance(exc, gate.Challenge) and not close:
                # The first step of a keyed registration (PROTOCOL.md section 9), which
                # every server with a key goes through: not a refusal.
                log.info("registration challenge sent to %s (server id %s, privacy policy "
                         "%s)", channel.peer, show(message["id"]), show(message["privPolyId"]),
                         extra=cli.event("challenge", peer=channel.peer, id=message["id"],
                                         policy=message["privPolyId"]))
                channel.attempt.challenged = (message["id"], message["privPolyId"])
            else:
                log.warning("unauthorized: %s (from %s)", exc.message, channel.peer,
                            extra=cli.event("refused", peer=channel.peer, reason=exc.message))
                self.totals.registrations["refused"] += 1
            channel.answer(seq, protocol.encode_frame(answer), exc.code, linger=close)
            return
        self.totals.registrations["registered"] += 1
        channel.session_of = upstream if upstream.session is channel else None
        if old is not None:
            self.forwarder.retire(old)
            session = old.session
            if session is not None and session is not channel and not session.is_closed:
                log.info("server id %s registered again from %s: its session from %s is "
                         "replaced and closed", show(upstream.id), channel.peer, session.peer,
                         extra=cli.event("session_replaced", id=upstream.key,
                                         peer=channel.peer, old_peer=session.peer))
                session.session_of = None
                session.abort()
        log.info("Received setup message from server id %s privacy policy %s port %d%s",
                 show(upstream.id), show(upstream.policy), upstream.port,
                 f" (heartbeat {upstream.heartbeat:g} s)" if upstream.heartbeat else
                 " (no heartbeat: legacy registration)",
                 extra=cli.event("registered", id=upstream.key, policy=upstream.policy_key,
                                 port=upstream.port, address=upstream.address,
                                 heartbeat=upstream.heartbeat, weight=upstream.weight,
                                 peer=channel.peer))
        channel.answer(seq, protocol.encode_frame(protocol.registered(upstream.id,
                                                                      upstream.policy)))

    def challenge_unanswered(self, channel, server_id, policy):
        """``channel`` closed while the challenge sent for its SETUP was still owed an
        answer: a refused registration (PROTOCOL.md section 9), most likely a server
        without the policy's key."""
        message = (f"server id {show(server_id)} (privacy policy {show(policy)}) did not "
                   "answer the registration challenge before its connection closed; "
                   "does it have the policy's key (server.py -key-file)?")
        log.warning("unauthorized: %s (from %s)", message, channel.peer,
                    extra=cli.event("refused", peer=channel.peer, reason=message))
        self.totals.registrations["refused"] += 1

    def session_ended(self, upstream):
        """The session of ``upstream`` closed: it leaves its rotation (section 6)."""
        if self.registry.end_session(upstream):
            log.info("server id %s of privacy policy %s left: its session closed",
                     show(upstream.id), show(upstream.policy),
                     extra=cli.event("left", id=upstream.key, policy=upstream.policy_key,
                                     address=upstream.address))
            self.forwarder.retire(upstream)

    def session_silent(self, upstream):
        """No frame came on the session of ``upstream`` for 3 heartbeats (section 6)."""
        if self.registry.end_session(upstream):
            log.info("server id %s of privacy policy %s is down: no frame on its session "
                     "for %g s (3 heartbeats); removed from the rotation",
                     show(upstream.id), show(upstream.policy), 3 * upstream.heartbeat,
                     extra=cli.event("server_down", id=upstream.key,
                                     policy=upstream.policy_key, address=upstream.address,
                                     reason="session silent"))
            self.forwarder.retire(upstream)

    def _drain(self):
        self.stopping = True
        self.forwarder.stopping = True
        for listener in self.listeners:
            listener.close()
        for channel in list(self.front):
            channel.drain()
        self._check_drained()

    def _check_drained(self):
        if self.front:
            self.loop.call_later(0.01, self._check_drained)
            return
        self.forwarder.close()
        self._drained.set()

    def _stats_now(self):
        # The loop thread's part of a snapshot, and all of it is copying: counters,
        # and each server's latency counts (metrics.LatencyWindow.read, about 1 us);
        # stats() works out the percentiles in its caller's thread.
        now = time.monotonic()
        kinds = {"client": 0, "server": 0, "registration": 0}
        for channel in self.front:
            kinds["registration" if channel.role == REGISTRATION else "client"] += 1
        kinds["server"] = sum(len(pool) for pool in self.forwarder.pools.values())
        totals = self.totals
        return {"uptime_s": now - self.started, "draining": self.stopping,
                "connections": sum(kinds.values()), "connections_by_kind": kinds,
                "totals": {"packets": totals.packets, "answers": dict(totals.answers),
                           "failovers": totals.failovers,
                           "registrations": dict(totals.registrations)},
                "policies": self.registry.snapshot(
                    lambda upstream: {"latency": upstream.latency.read(now)})}

    # --- Any thread -----------------------------------------------------------------------

    def reload_keys(self, path):
        """Read the policy key file ``path`` again and put its keys in force for the
        registrations to come (SIGHUP, as ``nginx -s reload``); servers registered
        already stay, and no connection is closed. A file that cannot be read or
        parsed keeps the old keys, and the log says why. Call from any thread; returns
        at once: the file is read by a thread of its own (a FIFO or a hung network
        file may block its read for good), and the keys are swapped in the loop
        thread, which reads them."""
        with self._reload_lock:
            if self._reloading:
                log.warning("SIGHUP ignored: the reading of %s for the last one has not "
                            "finished (the file does not answer)", path,
                            extra=cli.event("keys_kept", file=path, reason="reload under way"))
                return
            self._reloading = True
        threading.Thread(target=self._reload_keys, args=(path,), name="reload",
                         daemon=True).start()

    def _reload_keys(self, path):
        try:
            self._read_keys(path)
        finally:
            with self._reload_lock:
                self._reloading = False

    def _read_keys(self, path):
        try:
            keys = gate.load_policy_keys(path)
        except ValueError as exc:
            log.warning("keeping the policy keys in force: %s", exc,
                        extra=cli.event("keys_kept", file=path, reason=str(exc)))
            return

        def swap():
            added, removed, changed = self.gate.reload(keys)
            log.info("Policy keys reloaded from %s: added %s; removed %s; changed %s", path,
                     ", ".join(added) or "none", ", ".join(removed) or "none",
                     ", ".join(changed) or "none",
                     extra=cli.event("keys_reloaded", file=path, added=added,
                                     removed=removed, changed=changed))
        self.loop.post(swap)

    def stats(self, timeout=2.0):
        """The stats document (README.md, "Observability"; the body of
        ``/stats.json``). Its numbers are copied in the loop thread, which owns what
        it counts, between two turns (a few us a server); the latency percentiles
        (rounded to 0.001 ms) and histograms are worked out here, in the caller's
        thread. A caller that gives up leaves the loop nothing to do: the copy it
        asked for is skipped. Any thread may call it; ``stats.StatsServer`` calls it
        once at a time.

        Raises:
            TimeoutError: the loop did not answer within ``timeout`` seconds.
        """
        if self._thread is None or threading.current_thread() is self.loop.thread:
            document = self._stats_now()
        else:
            taken = []
            done = threading.Event()
            abandoned = threading.Event()

            def take():
                if not abandoned.is_set():
                    taken.append(self._stats_now())
                done.set()

            self.loop.post(take)
            if not done.wait(timeout):
                abandoned.set()
                raise TimeoutError(f"the proxy's loop did not answer within {timeout:g} s")
            document = taken[0]

        def milliseconds(seconds):
            # 0.001 ms: finer than the buckets tell apart (21-28 %), and no float noise.
            return None if seconds is None else round(seconds * 1e3, 3)

        for policy in document["policies"]:
            for server in policy["servers"]:
                latency = server.pop("latency")
                p50, p99 = latency.percentiles()
                server["latency_ms"] = {"p50": milliseconds(p50), "p99": milliseconds(p99)}
                server["latency_histogram"] = latency.histogram()
        return document

    def status_lines(self):
        """The registry as text lines: each policy, its servers in rotation order."""
        lines = ["Registry:"]
        snapshot = self.registry.snapshot()
        if not snapshot:
            lines.append("  (no server registered)")
        for policy in snapshot:
            lines.append(f"  privacy policy {show(policy['policy'])} ({policy['balance']}):")
            for server in policy["servers"]:
                lines.append(f"    {'->' if server['next'] else '  '} server id "
                             f"{show(server['id'])} at {server['address']} {server['state']}, "
                             f"weight {server['weight']}, packets served: {server['served']}")
        return lines


def _connect_host(given, seen):
    """Where to connect to a server: the SETUP's ``host``, or the address its SETUP
    came from when it gave none or gave "every address" (0.0.0.0, ::), which is where
    it listens, not where it can be reached (PROTOCOL.md section 2)."""
    if given is None:
        return seen
    try:
        return seen if ipaddress.ip_address(given).is_unspecified else given
    except ValueError:
        return given


def _unmapped(host):
    # A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d; show and use a.b.c.d.
    try:
        mapped = ipaddress.IPv6Address(host.split("%", 1)[0]).ipv4_mapped
    except ValueError:
        return host
    return str(mapped) if mapped is not None else host


def parse_balance(text):
    """Parse a ``-balance`` value: ``ALG`` or ``POLICY=ALG`` (ALG: roundrobin,
    leastconn). Returns ``(policy or "*", ALG)``.

    Raises:
        ValueError: an unknown algorithm or an empty policy, named.
    """
    policy, sep, algorithm = text.rpartition("=")
    if not sep:
        policy = "*"
    elif not policy:
        raise ValueError(f"'{text}' has no policy before the '='")
    if algorithm not in BALANCES:
        raise ValueError(f"'{algorithm}' is not a balancing algorithm; use "
                         f"{' or '.join(BALANCES)}")
    return policy, algorithm


def build_parser():
    parser = cli.ArgumentParser(
        "Policy-routed reverse proxy: forwards each DATA frame round-robin to a live "
        "upstream server of its privacy policy and relays the answer (PROTOCOL.md).")
    parser.add_argument("-port", type=cli.arg_port, default=2100,
                        help="TCP port to listen on; 0 picks a free port")
    parser.add_argument("-host", type=cli.arg_host, default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 (or ::) serves other machines")
    parser.add_argument("-proxy-protocol-port", type=cli.arg_port, metavar="PORT",
                        help="also listen on PORT (same -host) for a front tier such as "
                             "HAProxy: every connection there begins with a PROXY "
                             "protocol header (v1 or v2) giving the client's address; "
                             "0 picks a free port")
    parser.add_argument("-max-frame", type=cli.arg_frame_size,
                        default=protocol.DEFAULT_MAX_FRAME, metavar="BYTES",
                        help=f"largest frame body accepted (at least {cli.MIN_FRAME_SIZE})")
    parser.add_output_options("do not print the four lines per packet")
    parser.add_argument("-balance", type=cli.arg_type(parse_balance), action="append",
                        default=[], metavar="[POLICY=]ALG",
                        help="roundrobin (the default) or leastconn, for every policy or "
                             "for one; repeatable")
    parser.add_argument("-upstream-timeout", type=cli.arg_seconds, default=2.0,
                        metavar="SECONDS",
                        help="time a server may take to accept a connection, and to "
                             "answer a frame once it can start on it")
    parser.add_argument("-check-interval", type=cli.arg_seconds, default=1.0,
                        metavar="SECONDS", help="time between health checks of a down server")
    parser.add_argument("-rise", type=cli.arg_count, default=2, metavar="N",
                        help="good health checks in a row that bring a server back")
    parser.add_argument("-pool-size", type=cli.arg_count, default=8, metavar="N",
                        help="data connections at most per server")
    parser.add_argument("-stats", type=cli.arg_listen_address, metavar="ADDR",
                        help="serve the stats page, /stats.json, /metrics and /healthz "
                             "over HTTP on PORT or HOST:PORT (host 127.0.0.1 unless "
                             "given; 0 picks a free port)")
    parser.add_limit_options(max_conns=None)
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
    given = {}
    for policy, algorithm in args.balance:
        if policy in given:
            what = "the default algorithm" if policy == "*" else f"privacy policy {policy}"
            parser.error(f"argument -balance: {what} is given twice ({given[policy]}, "
                         f"{algorithm}); give it once")
        given[policy] = algorithm
    listeners = [("-port", args.host, args.port)]
    if args.proxy_protocol_port is not None:
        listeners.append(("-proxy-protocol-port", args.host, args.proxy_protocol_port))
    if args.stats:
        listeners.append(("-stats", *args.stats))
    for index, (option, host, port) in enumerate(listeners):
        for other, other_host, other_port in listeners[:index]:
            # Port 0 picks a free port; two listeners clash on one port when they
            # share a host, or one of them listens on every address.
            if port and port == other_port and (
                    host == other_host or {host, other_host} & {"0.0.0.0", "::"}):
                parser.error(f"argument {option}: port {port} is the proxy's own {other} "
                             "too; choose another")
    if args.stats:
        # Only with -stats: stats.py brings http.server, a fifth of the start-up time.
        import stats
    limit = cli.descriptor_limit()
    reserved = RESERVED_DESCRIPTORS + (stats.MAX_CONNECTIONS if args.stats else 0)
    room = max(1, (limit - reserved) // 2)
    if args.max_conns is None:
        args.max_conns = room
    elif args.max_conns > room:
        log.warning("-max-conns %d is more than the %d open descriptors allowed can serve "
                    "(%d connections, each with a data connection); past that, new "
                    "connections wait and frames get OVERLOADED (raise the limit with "
                    "ulimit -n)", args.max_conns, limit, room,
                    extra=cli.event("limits_low", descriptors=limit, max_conns=args.max_conns,
                                    room=room))
    policy_keys = None
    if args.policy_keys:
        try:
            policy_keys = gate.load_policy_keys(args.policy_keys)
        except ValueError as exc:
            parser.error(str(exc))
    try:
        proxy = ReverseProxy(
            (args.host, args.port), max_frame=args.max_frame, max_conns=args.max_conns,
            tls=tls, upstream_tls=upstream_tls, policy_keys=policy_keys,
            require_client_cert=bool(args.tls_cert and args.tls_ca),
            balance=dict(args.balance), upstream_timeout=args.upstream_timeout,
            check_interval=args.check_interval, rise=args.rise, pool_size=args.pool_size,
            frame_timeout=args.frame_timeout, idle_timeout=args.idle_timeout,
            proxy_protocol_address=None if args.proxy_protocol_port is None else (
                args.host, args.proxy_protocol_port))
    except OSError as exc:
        parser.exit(1, f"{parser.prog}: {exc.strerror or exc}\n")
    board = None
    if args.stats:
        # Bound before the ready line: a busy stats port ends the start, not a
        # proxy that has said it runs.
        try:
            board = stats.StatsServer(args.stats, proxy.stats, lambda: proxy.stopping,
                                      logger=log)
        except OSError as exc:
            parser.exit(1, f"{parser.prog}: cannot serve stats on "
                           f"{protocol.format_address(*args.stats)}: "
                           f"{netio.describe_error(exc)}\n")
    signals = netio.Signals((signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP))
    cli.on_output_closed(lambda: signals.post(signal.SIGTERM))
    log.info("Running the reverse proxy on port %d", proxy.port,
             extra=cli.event("listening", port=proxy.port))
    if proxy.front_tier is not None:
        log.info("Front-tier listener (PROXY protocol v1 or v2) on port %d",
                 proxy.front_tier.port, extra=cli.event("front_tier", port=proxy.front_tier.port))
    log.info("Open descriptors allowed: %d; serving at most %d connection%s at once "
             "(-max-conns)%s", limit, args.max_conns, "" if args.max_conns == 1 else "s",
             ", each with room for a data connection" if args.max_conns <= room else "",
             extra=cli.event("limits", descriptors=limit, max_conns=args.max_conns))
    if policy_keys is None:
        log.info("Registration is open: any server that reaches port %d may serve any "
                 "policy (use -policy-keys to require keys)", proxy.port,
                 extra=cli.event("registration_open"))
    else:
        log.info("Registration needs a key proof for policies: %s",
                 ", ".join(sorted(policy_keys)),
                 extra=cli.event("registration_keyed", policies=sorted(policy_keys)))
    proxy.start()
    if board is not None:
        board.start()
    while True:
        received = signals.wait()
        if signal.SIGUSR1 in received:
            log.info("\n".join(proxy.status_lines()),
                     extra=cli.event("registry", policies=proxy.registry.snapshot()))
        if signal.SIGHUP in received:
            if args.policy_keys:
                proxy.reload_keys(args.policy_keys)
            else:
                log.info("SIGHUP: nothing to reload (no -policy-keys file)",
                         extra=cli.event("nothing_to_reload"))
        if signal.SIGTERM in received or signal.SIGINT in received:
            break
    log.info("Stopping: answering the frames already received, then exiting",
             extra=cli.event("stopping"))
    proxy.stop()
    if board is not None:
        board.close()
    log.info("Reverse proxy stopped", extra=cli.event("stopped"))
    return 0


if __name__ == "__main__":
    cli.run(main)
