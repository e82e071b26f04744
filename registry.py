"""The registry of upstream servers and the rotation of each policy: pure state.

This module implements PROTOCOL.md sections 4 (load balancing), 6 (liveness) and 8
(weights and leastconn) and nothing else: no sockets, no threads of its own, no
clock. The proxy's loop thread changes it; any thread may read a ``snapshot``.

Choosing a server, after nginx's smooth weighted round robin
(``ngx_http_upstream_get_peer`` in ``ngx_http_upstream_round_robin.c``):

* Every live server of the policy adds its weight to its ``current`` credit; the one
  with the most credit is chosen and pays back the sum of the weights. With weights
  5, 1, 1 that gives a a b a c a a: the heavy server's turns are spread out, not
  bunched.
* Every change of the policy's members or of their states (join, leave, down, up,
  replace) sets every credit back to 0 and the *anchor* to the *cursor*, which
  stands just past the server chosen last. Ties go to the first server at or after
  the anchor.
* So with every weight 1 the choice is exactly section 4's "server k mod n": every
  credit ties in turn and the servers are taken one after another from the cursor,
  which goes on from where it was after any change. With any weights the order from
  zero credits repeats every W frames (W: the sum of the live weights), so from a
  change on each server gets exactly its weight in every W consecutive frames, and a
  server that comes back gets no burst of frames owed to it.
* ``leastconn`` (HAProxy's ``balance leastconn``) chooses the live server with the
  fewest frames in flight per unit of weight; ties are broken from the cursor, so
  equally loaded servers take turns, as HAProxy's round robin within a load group.

Choosing and moving the cursor are one step under the registry's lock, so the k-th
frame of a policy goes to server k mod n whatever the concurrency.
"""

import threading

import protocol
from protocol import ServiceError, policy_text, show

__all__ = ["UP", "DOWN", "LEFT", "ROUNDROBIN", "LEASTCONN", "BALANCES", "Upstream",
           "Rotation", "Registry"]

# Server states. DOWN: a forward failed; health checks run. LEFT: its session ended
# or, for a legacy server, a forward failed; it keeps its place in the rotation
# order so that it takes it again when it registers anew.
UP, DOWN, LEFT = "up", "down", "left"

# Balancing algorithms, named as HAProxy's ``balance`` keyword names them.
ROUNDROBIN, LEASTCONN = "roundrobin", "leastconn"
BALANCES = (ROUNDROBIN, LEASTCONN)


class Upstream:
    """One registration of an upstream server (PROTOCOL.md sections 2, 6 and 8).

    A new SETUP for the same id makes a new ``Upstream`` in the old one's place, so
    identity tells a current registration from a replaced one.

    Attributes:
        id, policy: the id and policy as received (str or int).
        key, policy_key: their text, by which they compare.
        host, port: where the proxy connects for data connections.
        heartbeat: seconds between the server's PINGs, or None (legacy server).
        weight: its share of the rotation, int 1..256.
        session: the registration connection kept as its session (an object of the
            caller's), or None.
        state: UP, DOWN or LEFT.
        served: DATA frames it answered (int).
        failures: forwards to it that failed (int).
        in_flight: DATA frames sent to it and not answered yet (int); the caller keeps
            it, leastconn reads it.
        good_checks: health checks passed in a row while DOWN.
        current: the smooth weighted round robin credit.
        latency: whatever ``latency_factory`` of the registry made, or None.
    """

    __slots__ = ("id", "policy", "key", "policy_key", "host", "port", "heartbeat",
                 "weight", "session", "state", "served", "failures", "in_flight",
                 "good_checks", "current", "latency")

    def __init__(self, message, host, session=None, latency=None):
        self.id = message["id"]
        self.policy = message["privPolyId"]
        self.key = policy_text(self.id)
        self.policy_key = policy_text(self.policy)
        self.host = host
        self.port = message["listenport"]
        self.heartbeat = message.get("heartbeat")
        self.weight = message.get("weight", 1)
        self.session = session if self.heartbeat is not None else None
        self.state = UP
        self.served = 0
        self.failures = 0
        self.in_flight = 0
        self.good_checks = 0
        self.current = 0
        self.latency = latency

    def __repr__(self):
        return f"<Upstream {self.key} policy {self.policy_key} {self.address} {self.state}>"

    @property
    def address(self):
        """``"host:port"`` of its data port (``"[v6]:port"`` for IPv6)."""
        return protocol.format_address(self.host, self.port)


class Rotation:
    """The servers of one policy in first-registration order, the cursor and the
    balancing algorithm. Not thread-safe: the ``Registry`` lock guards it.

    Args:
        balance: ROUNDROBIN or LEASTCONN.
    """

    def __init__(self, balance=ROUNDROBIN):
        self.order = []
        self.cursor = 0
        self.anchor = 0
        self.balance = balance

    def choose(self, exclude=()):
        """Return the next UP server not in ``exclude`` and move the cursor past it,
        or return None when there is none (the cursor stays)."""
        index = self._pick(exclude, commit=True)
        if index is None:
            return None
        self.cursor = index + 1
        if exclude:
            # A failover choice skips servers out of turn; from here the smooth order
            # starts again, as after any change, so that every weight 1 stays k mod n.
            self.changed()
        return self.order[index]

    def peek(self):
        """Return the server ``choose`` would return next, changing nothing."""
        index = self._pick((), commit=False)
        return None if index is None else self.order[index]

    def _pick(self, exclude, commit):
        order = self.order
        count = len(order)
        best = best_index = None
        if self.balance == LEASTCONN:
            start = self.cursor
            for step in range(count):
                index = (start + step) % count
                upstream = order[index]
                if upstream.state != UP or upstream in exclude:
                    continue
                # in_flight / weight, compared without division.
                if (best is None or upstream.in_flight * best.weight
                        < best.in_flight * upstream.weight):
                    best, best_index = upstream, index
            return best_index
        total = best_credit = 0
        credits = []
        start = self.anchor
        for step in range(count):
            index = (start + step) % count
            upstream = order[index]
            if upstream.state != UP or upstream in exclude:
                continue
            credit = upstream.current + upstream.weight
            credits.append((upstream, credit))
            total += upstream.weight
            if best is None or credit > best_credit:
                best, best_index, best_credit = upstream, index, credit
        if commit and best is not None:
            for upstream, credit in credits:
                upstream.current = credit
            best.current -= total
        return best_index

    def changed(self):
        """Members or states changed: every credit goes back to 0 and ties start from
        the cursor, which stays where it is."""
        for upstream in self.order:
            upstream.current = 0
        self.anchor = self.cursor

    def remove(self, upstream):
        """Take ``upstream`` out of the order; the cursor keeps pointing at the same next
        server (the rotation goes on from where it was, section 4)."""
        index = self.order.index(upstream)
        del self.order[index]
        if index < self.cursor:
            self.cursor -= 1
        self.changed()


class Registry:
    """Upstream servers by id, and one rotation per policy, behind one lock.

    Pure state: no sockets, no clock. Every method is thread-safe.

    Args:
        balance: ``f(policy text) -> ROUNDROBIN or LEASTCONN``, asked once when a
            policy's rotation is made; default: round robin everywhere.
        latency_factory: ``f()`` whose result becomes ``Upstream.latency`` of each new
            registration (the proxy's latency window), or None.
    """

    def __init__(self, balance=None, latency_factory=None):
        self._balance = balance or (lambda policy: ROUNDROBIN)
        self._latency_factory = latency_factory
        self._lock = threading.Lock()
        self._servers = {}
        self._rotations = {}

    def register(self, message, host, session=None, move_policy=True):
        """Register the server of a validated SETUP ``message`` (sections 2, 6, 8).

        A server already registered under the same id is replaced in its place in the
        rotation order (its old place even if it had left), and keeps its counters
        (``served``, ``failures``, ``latency``) when its policy is the same; a new one
        is appended.

        Args:
            host: the address to connect to (the SETUP's ``host`` or the peer's).
            session: the registration connection; kept only with a heartbeat.
            move_policy: False refuses a SETUP that would move a registered, not-left
                server to another policy (registration with keys, section 7).

        Returns:
            (Upstream, Upstream or None): the new registration and the one it
            replaced; the caller closes the replaced one's session and connections.

        Raises:
            ServiceError: UNAUTHORIZED, when ``move_policy`` is False and the id is
                live in another policy.
        """
        latency = self._latency_factory() if self._latency_factory else None
        upstream = Upstream(message, host, session, latency)
        with self._lock:
            old = self._servers.get(upstream.key)
            if old is not None and old.policy_key != upstream.policy_key:
                if not move_policy and old.state != LEFT:
                    raise ServiceError(
                        f"server id {show(old.id)} is registered for privacy policy "
                        f"{show(old.policy)}; it must leave (close its session) before "
                        f"registering for {show(upstream.policy)}", protocol.UNAUTHORIZED)
                self._rotations[old.policy_key].remove(old)
            rotation = self._rotations.get(upstream.policy_key)
            if rotation is None:
                rotation = self._rotations[upstream.policy_key] = Rotation(
                    self._balance(upstream.policy_key))
            if old is not None and old.policy_key == upstream.policy_key:
                rotation.order[rotation.order.index(old)] = upstream
                # The same server under the same labels: its counters go on (a
                # Prometheus counter never goes backwards), as HAProxy's do across a
                # server's state changes.
                upstream.served = old.served
                upstream.failures = old.failures
                if old.latency is not None:
                    upstream.latency = old.latency
            else:
                rotation.order.append(upstream)
            rotation.changed()
            self._servers[upstream.key] = upstream
        return upstream, old

    def choose(self, policy, exclude=()):
        """Choose the server for the next DATA frame of ``policy`` (sections 4, 8).

        Args:
            policy: the DATA's ``privPoliId`` (str or int).
            exclude: servers already tried for this frame (a set of Upstream).

        Returns:
            Upstream

        Raises:
            ServiceError: NO_SERVER when no live server serves the policy (the caller
                reports UPSTREAM_FAILED instead when it already tried some).
        """
        key = policy if type(policy) is str else policy_text(policy)
        with self._lock:
            rotation = self._rotations.get(key)
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

    def _set_state(self, upstream, state):
        # Call with the lock held.
        upstream.state = state
        self._rotations[upstream.policy_key].changed()

    def mark_failed(self, upstream):
        """A forward to ``upstream`` failed: take it out of the rotation.

        Returns:
            The new state, DOWN (it has a session: health-check it) or LEFT (a legacy
            server is dropped, section 6), or None if it was not UP or not current.
        """
        with self._lock:
            if not self._current(upstream) or upstream.state != UP:
                return None
            self._set_state(upstream, DOWN if upstream.heartbeat is not None else LEFT)
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
                self._set_state(upstream, UP)
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
            self._set_state(upstream, LEFT)
            return True

    def snapshot(self, extra=None):
        """Return the registry for display, read under the lock.

        Args:
            extra: ``f(upstream) -> dict`` of more fields for each server, or None.

        Returns:
            list of dict, policies in order of first registration:
            ``{"policy": str, "balance": str, "servers": [{"id": str, "address": str,
            "state": str, "weight": int, "served": int, "in_flight": int,
            "failures": int, "next": bool, **extra(upstream)}, ...]}``, servers in
            rotation order; ``next`` is True for the server the next frame goes to.
        """
        with self._lock:
            policies = []
            for policy, rotation in self._rotations.items():
                following = rotation.peek()
                servers = []
                for upstream in rotation.order:
                    server = {"id": upstream.key, "address": upstream.address,
                              "state": upstream.state, "weight": upstream.weight,
                              "served": upstream.served, "in_flight": upstream.in_flight,
                              "failures": upstream.failures,
                              "next": upstream is following}
                    if extra is not None:
                        server.update(extra(upstream))
                    servers.append(server)
                policies.append({"policy": policy, "balance": rotation.balance,
                                 "servers": servers})
            return policies

    def upstreams(self):
        """Return every current registration (a list of Upstream)."""
        with self._lock:
            return list(self._servers.values())
