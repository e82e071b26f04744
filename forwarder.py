"""Forwarding: routing, data connections, failover and health checks (PROTOCOL.md
sections 3, 4, 6 and 8), run by the proxy's loop thread.

The path of one DATA frame:

1. A client channel hands the frame to ``Forwarder.route`` with its sequence number
   on that connection. The registry chooses the upstream server (the k-th frame of a
   policy goes to server k mod n, in the order frames arrive at the proxy).
2. The frame joins the queue of one of that server's data connections (a
   ``DataChannel``): it is written at once, pipelined behind the frames already in
   flight, and leaves with every other frame written to that server in the same
   turn of the loop, in one send. The bytes are the client's own (see
   ``protocol.parse_passable``), so the server reads exactly what was routed on.
3. A server answers the frames of one connection in order, so each answer belongs to
   the frame at the head of that connection's queue. A valid answer goes back to the
   client channel, which puts answers back into the order of its frames (a reorder
   buffer) before writing them.
4. A data connection fails when it is refused, reset or closed with frames in
   flight, when an answer is malformed, or when the frame at the head of its queue is
   not answered within the upstream timeout of the moment the server could start on
   it (sent, or the answer before it came). Every frame in flight on it then goes to
   the next live server of its policy, each server at most once per frame; the
   server is marked down (health checks follow) or, without a session, dropped. The
   client gets UPSTREAM_FAILED only when every live server failed it.

Health checks (section 6): a DOWN server gets a PING on a fresh data connection every
``check_interval`` seconds, and comes back UP after ``rise`` PONGs in a row.

The proxy's own exhaustion (no descriptor for a new data connection: EMFILE and the
like) is not the server's fault: the frames waiting for that connection are answered
OVERLOADED and the server stays in its rotation.
"""

import collections
import logging

import cli
import eventloop
import protocol
from protocol import MessageType, ServiceError, policy_text, show
from netio import describe_error
from registry import DOWN, LEFT, UP

log = logging.getLogger("rproxy")
packets = logging.getLogger("rproxy.packets")

__all__ = ["Pending", "Forwarder", "DataChannel", "PING_FRAME", "PONG_FRAME"]

PING_FRAME = protocol.encode_frame(protocol.ping())
PONG_FRAME = protocol.encode_frame(protocol.pong())

# Frames queued on one data connection before the next frame to that server opens
# another connection (up to the pool size). Deep enough that a loaded server gets
# batches (one connection per server at tens of thousands of frames per second);
# shallow enough that a server that works one connection at a time still sees
# several when many frames wait. HTTP/2 servers advertise 100 to 128 streams.
PIPELINE_DEPTH = 64


# The fields of an answer that the protocol defines (PROTOCOL.md section 2): what is
# passed on when the whole answer, written again, would exceed -max-frame.
_ANSWER_FIELDS = {
    MessageType.ACK: ("type", "srcid", "destid", "payloadsize", "payload"),
    MessageType.ERROR: ("type", "code", "message", "destid"),
}


class Pending:
    """One DATA frame on its way: whose it is, its bytes, where it has been.

    Attributes:
        client: the client channel it came on (has ``answered(pending, frame, code)``,
            and ``wants(seq)``: False once the answer is no longer owed).
        seq: its sequence number on that connection.
        frame: the whole frame to send (bytes).
        message: the validated DATA message (dict).
        srcid: its ``srcid``.
        tried: ``{Upstream: why it failed}`` for the servers tried so far, or None.
        sent_at: loop time it was queued to its current server, seconds.
    """

    __slots__ = ("client", "seq", "frame", "message", "srcid", "tried", "sent_at",
                 "resent")

    def __init__(self, client, seq, frame, message):
        self.client = client
        self.seq = seq
        self.frame = frame
        self.message = message
        self.srcid = message["srcid"]
        self.tried = None
        self.sent_at = 0.0
        self.resent = False


class Totals:
    """Counters of the data path, written by the loop thread only (a reader in another
    thread sees values at most one turn old).

    Attributes:
        packets: DATA frames received.
        answers: ``{code: count}``: ``"ACK"`` and each error code answered to clients;
            ``"OTHER"`` counts the codes outside PROTOCOL.md that servers sent (relayed
            as they came).
        failovers: frames sent again to another server after a failed forward.
        registrations: ``{"registered": count, "refused": count}`` of SETUPs.
    """

    def __init__(self):
        self.packets = 0
        self.failovers = 0
        self.registrations = {"registered": 0, "refused": 0}
        self.answers = dict.fromkeys(("ACK",) + protocol.ERROR_CODES + ("OTHER",), 0)

    def count(self, code):
        """Count one answer with ``code`` ("ACK" or an error code) to a client."""
        try:
            self.answers[code] += 1
        except KeyError:
            self.answers["OTHER"] += 1


class DataChannel(eventloop.Channel):
    """A data connection to one upstream server (PROTOCOL.md section 3), owned by the
    ``Forwarder``: DATA frames out, one answer each back, in order."""

    def __init__(self, forwarder, upstream):
        super().__init__(forwarder.loop, None, upstream.address, forwarder.max_frame,
                         forwarder.upstream_tls)
        self.forwarder = forwarder
        self.upstream = upstream
        self.queue = collections.deque()
        self.retiring = False
        self.peer_closing = False
        self.was_connected = False
        self.answered = 0
        self.busy_from = 0

    @property
    def stale(self):
        """True when it answered before, then lay idle in the pool, and has answered
        nothing since: a failure now may be the server closing an idle connection
        just as a frame went out, not a fault of the server."""
        return 0 < self.answered == self.busy_from

    def enqueue(self, pending):
        """Send ``pending`` on this connection, behind the frames in flight."""
        now = self.loop.now
        if not self.queue:
            self.busy_from = self.answered
            self.set_deadline(now + self.forwarder.upstream_timeout)
        pending.sent_at = now
        self.queue.append(pending)
        self.write(pending.frame)
        self.upstream.in_flight += 1

    def connection_made(self):
        self.was_connected = True
        # The server can start on the first frame now.
        if self.queue:
            self.set_deadline(self.loop.now + self.forwarder.upstream_timeout)

    def frames_received(self, bodies):
        if not bodies:
            # Part of an answer: the frame's deadline stands. A server that trickles
            # bytes is not answering, and the upstream timeout bounds each frame.
            return
        queue = self.queue
        upstream = self.upstream
        forwarder = self.forwarder
        now = self.loop.now
        latency = upstream.latency
        logged = packets.isEnabledFor(logging.INFO)
        for body in bodies:
            if not queue:
                self.abort(protocol.MessageError("sent a frame when no DATA frame was waiting "
                                                 "for an answer"))
                return
            pending = queue[0]
            try:
                answer, frame = protocol.parse_passable(body)
            except protocol.MessageError as exc:
                self.abort(protocol.MessageError(f"malformed answer: {exc.message}"))
                return
            kind = answer["type"]
            if kind is MessageType.ACK:
                destid = answer["destid"]
                if destid != pending.srcid and policy_text(destid) != policy_text(pending.srcid):
                    self.abort(protocol.MessageError(
                        f"malformed answer: an ACK for client {show(destid)} instead of the "
                        f"ACK for client {show(pending.srcid)}"))
                    return
            elif kind is MessageType.ERROR:
                answer["destid"] = pending.srcid
                frame = protocol.encode_frame(answer)
                if answer["code"] in protocol.CLOSING_CODES:
                    # The server closes after this answer (a frame it found too large,
                    # say); the frames behind it were never read. Not a fault of the
                    # server: they go to it again on a fresh connection.
                    self.peer_closing = True
            else:
                self.abort(protocol.MessageError(
                    f"malformed answer: a {kind.name} message instead of the ACK for client "
                    f"{show(pending.srcid)}"))
                return
            if len(frame) - protocol.HEADER_SIZE > forwarder.max_frame:
                # Written again (a string type, the destid of an ERROR), numbers in
                # fields the proxy does not know may grow (1e9 becomes 1000000000.0):
                # the client gets the fields the protocol defines, if they fit.
                frame = protocol.encode_frame(
                    {field: answer[field] for field in _ANSWER_FIELDS[kind] if field in answer})
                if len(frame) - protocol.HEADER_SIZE > forwarder.max_frame:
                    self.abort(protocol.MessageError(
                        f"malformed answer: its {kind.name} takes {len(frame)} bytes with "
                        f"the client's destid, above -max-frame ({forwarder.max_frame})"))
                    return
            queue.popleft()
            self.answered += 1
            upstream.in_flight -= 1
            upstream.served += 1
            if latency is not None:
                latency.record(now - pending.sent_at, now)
            if logged:
                text = show(answer.get("payload", answer.get("message")))
                packets.info("Received a data message from server id %s payload: %s",
                             show(upstream.id), text,
                             extra=cli.event("answer", server=upstream.key, payload=text))
                packets.info("Forwarding a data message to client id %s payload: %s",
                             show(pending.srcid), text,
                             extra=cli.event("reply", client=pending.srcid, payload=text))
            pending.client.answered(pending, frame, "ACK" if kind is MessageType.ACK
                                    else answer["code"])
            if self.peer_closing:
                self.abort()
                return
        if queue:
            self.set_deadline(now + forwarder.upstream_timeout)
        else:
            self.set_deadline(None)
            if self.retiring:
                self.close()

    def timed_out(self, now):
        self.abort(TimeoutError(f"no answer within {self.forwarder.upstream_timeout:g} s"))

    def eof_received(self):
        self.abort(ConnectionError("closed the connection without answering")
                   if self.queue else None)

    def closed(self, exc):
        self.forwarder.data_channel_closed(self, exc)


class CheckChannel(eventloop.Channel):
    """One health check of a DOWN server: connect, PING, expect PONG (section 6)."""

    def __init__(self, forwarder, upstream):
        super().__init__(forwarder.loop, None, upstream.address, forwarder.max_frame,
                         forwarder.upstream_tls)
        self.forwarder = forwarder
        self.upstream = upstream
        self.started = forwarder.loop.now
        self.ok = False

    def connection_made(self):
        self.write(PING_FRAME)
        self.set_deadline(self.loop.now + self.forwarder.check_timeout)

    def frames_received(self, bodies):
        if bodies:
            try:
                self.ok = protocol.parse_message(bodies[0])["type"] is MessageType.PONG
            except protocol.MessageError:
                pass
            self.abort()

    def timed_out(self, now):
        self.abort()

    def closed(self, exc):
        self.forwarder.check_done(self.upstream, self.ok, self.started)


class Forwarder:
    """Routes DATA frames to upstream servers and answers back (module docstring).

    Runs in the loop thread; only the registry it shares is locked.

    Args:
        loop: the EventLoop.
        registry: the ``registry.Registry``.
        totals: the ``Totals`` it counts into.
        upstream_timeout: seconds a server may take to connect, and to answer the frame
            at the head of a data connection's queue.
        check_interval: seconds between health checks of a DOWN server.
        rise: good checks in a row that bring a server back.
        pool_size: data connections at most per server.
        max_frame: largest answer frame accepted, bytes.
        upstream_tls: ``ssl.SSLContext`` for data connections, or None.
    """

    def __init__(self, loop, registry, totals, *, upstream_timeout=2.0, check_interval=1.0,
                 rise=2, pool_size=8, max_frame=protocol.DEFAULT_MAX_FRAME,
                 upstream_tls=None):
        self.loop = loop
        self.registry = registry
        self.totals = totals
        self.upstream_timeout = upstream_timeout
        self.check_interval = check_interval
        self.check_timeout = min(upstream_timeout, check_interval)
        self.rise = rise
        self.pool_size = pool_size
        self.max_frame = max_frame
        self.upstream_tls = upstream_tls
        self.pools = {}
        self.stopping = False

    # --- Routing -------------------------------------------------------------------

    def route(self, client, seq, message, frame):
        """Forward one validated DATA ``message`` (its whole ``frame``, bytes) that came
        as frame ``seq`` on ``client``; its answer reaches ``client.answered``."""
        pending = Pending(client, seq, frame, message)
        if packets.isEnabledFor(logging.INFO):
            packets.info("Received a data message from client %s privacy policy %s payload: %s",
                         show(pending.srcid), show(message["privPoliId"]),
                         show(message["payload"]),
                         extra=cli.event("received", client=pending.srcid,
                                         policy=message["privPoliId"],
                                         payload=show(message["payload"]), peer=client.peer))
        try:
            upstream = self.registry.choose(message["privPoliId"])
        except ServiceError as exc:
            self._refuse(pending, exc)
            return
        self._send(upstream, pending)

    def _send(self, upstream, pending):
        if packets.isEnabledFor(logging.INFO):
            packets.info("Forwarding a data message to server id %s payload: %s",
                         show(upstream.id), show(pending.message["payload"]),
                         extra=cli.event("forward", client=pending.srcid, server=upstream.key,
                                         policy=upstream.policy_key,
                                         payload=show(pending.message["payload"])))
        pool = self.pools.get(upstream, ())
        channel = None
        for candidate in pool:
            if not candidate.retiring and (channel is None
                                           or len(candidate.queue) < len(channel.queue)):
                channel = candidate
        if channel is None or (len(channel.queue) >= PIPELINE_DEPTH
                               and len(pool) < self.pool_size):
            self._open(upstream, [pending])
        else:
            channel.enqueue(pending)

    def _open(self, upstream, frames):
        # A new data connection to ``upstream`` for ``frames`` (Pending), queued before
        # it connects, so that a connection that fails at once fails them over.
        channel = DataChannel(self, upstream)
        self.pools.setdefault(upstream, []).append(channel)
        for pending in frames:
            channel.enqueue(pending)
        try:
            channel.connect(upstream.host, upstream.port, self.upstream_timeout)
        except Exception as exc:  # a fault here fails this connection, never the client's
            channel.abort(exc)

    def _refuse(self, pending, exc):
        tried = pending.tried
        if tried:
            reasons = "; ".join(f"server id {show(u.id)}: {why}" for u, why in tried.items())
            which = "the only live server" if len(tried) == 1 else f"all {len(tried)} live servers"
            exc = ServiceError(f"{which} of privacy policy {show(pending.message['privPoliId'])} failed "
                               f"({reasons})", protocol.UPSTREAM_FAILED)
        if exc.code != protocol.OVERLOADED:
            log.warning("%s (client %s)", exc, show(pending.srcid),
                        extra=cli.event(exc.code.lower(), client=pending.srcid,
                                        policy=pending.message["privPoliId"],
                                        reason=exc.message, peer=pending.client.peer))
        pending.client.answered(pending, protocol.encode_frame(
            protocol.error_message(exc, pending.srcid)), exc.code)

    # --- Failures ------------------------------------------------------------------

    def data_channel_closed(self, channel, exc):
        """A data connection closed; fail over what it still had in flight."""
        upstream = channel.upstream
        pool = self.pools.get(upstream)
        if pool is not None and channel in pool:
            pool.remove(channel)
            if not pool:
                del self.pools[upstream]
        frames = list(channel.queue)
        channel.queue.clear()
        if not frames:
            return
        upstream.in_flight -= len(frames)
        # The server failed all the same; but a frame whose answer nobody wants any
        # more (its client has gone, or was answered TIMEOUT) goes nowhere else.
        owed = [pending for pending in frames if pending.client.wants(pending.seq)]
        if channel.peer_closing:
            if owed:
                self._open(upstream, owed)
            return
        if eventloop.exhausted(exc):
            log.warning("cannot open a data connection to server id %s at %s: %s; %d "
                        "frame(s) answered OVERLOADED", show(upstream.id), upstream.address,
                        describe_error(exc), len(frames),
                        extra=cli.event("exhausted", id=upstream.key, address=upstream.address,
                                        reason=describe_error(exc), frames=len(frames)))
            for pending in owed:
                self._refuse(pending, ServiceError(
                    f"the proxy is out of descriptors ({describe_error(exc)}); try again "
                    "later", protocol.OVERLOADED))
            return
        if (channel.stale and not any(pending.resent for pending in frames)
                and (exc is None or isinstance(exc, ConnectionError))):
            # As the blocking proxy before it did with a pooled connection: once, on a
            # fresh connection to the same server, without counting a failure.
            for pending in owed:
                pending.resent = True
            if owed:
                self._open(upstream, owed)
            return
        why = _failure_text(exc, channel)
        upstream.failures += len(frames)
        self._failed(upstream, why)
        for pending in owed:
            if pending.tried is None:
                pending.tried = {}
            pending.tried[upstream] = why
            try:
                following = self.registry.choose(pending.message["privPoliId"], pending.tried)
            except ServiceError as refusal:
                self._refuse(pending, refusal)
                continue
            self.totals.failovers += 1
            self._send(following, pending)

    def _failed(self, upstream, why):
        state = self.registry.mark_failed(upstream)
        if state == DOWN:
            log.warning("server id %s of privacy policy %s at %s is down: %s; health "
                        "checks every %g s", show(upstream.id), show(upstream.policy),
                        upstream.address, why, self.check_interval,
                        extra=cli.event("server_down", id=upstream.key,
                                        policy=upstream.policy_key, address=upstream.address,
                                        reason=why))
            self.loop.call_later(self.check_interval, self._check, upstream)
        elif state == LEFT:
            log.warning("server id %s of privacy policy %s at %s dropped: %s (it has no "
                        "heartbeat session)", show(upstream.id), show(upstream.policy),
                        upstream.address, why,
                        extra=cli.event("server_dropped", id=upstream.key,
                                        policy=upstream.policy_key, address=upstream.address,
                                        reason=why))
        if state is not None:
            self.retire(upstream)

    def retire(self, upstream):
        """``upstream`` is out of its rotation (down, left or replaced): close its idle
        data connections now and the others once their frames are answered."""
        for channel in list(self.pools.get(upstream, ())):
            channel.retiring = True
            if not channel.queue:
                channel.close()

    # --- Health checks -------------------------------------------------------------

    def _check(self, upstream):
        if self.stopping or upstream.state != DOWN or not self.registry.is_current(upstream):
            return
        check = CheckChannel(self, upstream)
        try:
            check.connect(upstream.host, upstream.port, self.check_timeout)
        except Exception as exc:
            check.abort(exc)

    def check_done(self, upstream, ok, started):
        """Record one health check of ``upstream``, begun at loop time ``started``, and
        plan the next: checks start every ``check_interval``, however long one took."""
        state = self.registry.record_check(upstream, ok, self.rise)
        if state == UP:
            log.info("server id %s of privacy policy %s at %s is back up after %d good "
                     "health checks", show(upstream.id), show(upstream.policy),
                     upstream.address, self.rise,
                     extra=cli.event("server_up", id=upstream.key, policy=upstream.policy_key,
                                     address=upstream.address))
        elif state == DOWN and not self.stopping:
            self.loop.call_later(max(0.0, started + self.check_interval - self.loop.now),
                                 self._check, upstream)

    def close(self, why="the proxy stopped before the server answered"):
        """Close every data connection and answer each frame still in flight with
        TIMEOUT (``why``: one sentence): the proxy stops, and its drain time is over."""
        self.stopping = True
        for pool in list(self.pools.values()):
            for channel in list(pool):
                frames = list(channel.queue)
                channel.queue.clear()
                channel.upstream.in_flight -= len(frames)
                for pending in frames:
                    pending.client.answered(pending, protocol.encode_frame(protocol.error(
                        protocol.TIMEOUT, why, pending.srcid)), protocol.TIMEOUT)
                channel.abort()


def _failure_text(exc, channel):
    if isinstance(exc, eventloop.ConnectTimeout):
        return f"cannot connect to {channel.peer}: timed out"
    if isinstance(exc, protocol.ProtocolError):
        return exc.message
    if isinstance(exc, (TimeoutError, ConnectionError)) and not exc.errno:
        return str(exc)
    if exc is None:
        return "closed the connection without answering"
    if not channel.was_connected:
        return f"cannot connect to {channel.peer}: {describe_error(exc)}"
    return f"connection failed: {describe_error(exc)}"

