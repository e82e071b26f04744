"""Upstream server: registers with reverse proxies and answers DATA with its SHA-1.

    python server.py -id ID -pp PPID -listen LPORT -revproc RPPORT[,RPPORT...]

It binds its data port first (IPv4 or IPv6, as ``-host`` says), then registers
(SETUP) with every proxy of ``-revproc``, each through a ``Registrar`` thread of its
own that keeps that connection as its heartbeat session (PROTOCOL.md section 6): a
PING every ``-heartbeat`` seconds, and a new registration, after a growing pause,
whenever the session is lost or the proxy is not up yet. The sessions are
independent: one proxy down or restarting costs nothing with the others. The SETUP
carries ``-weight``, this server's share of its policy's rotation (the team's
PROTOCOL.md section 8). Each data connection from a proxy gets a thread that answers
every DATA frame with the ACK of section 2 and every PING with a PONG (the proxy's
health check).

A proxy that refuses the SETUP (UNAUTHORIZED: no key or a wrong one) is not asked
again; the server goes on with the others, and exits 1 when every proxy refused.

On SIGTERM or Ctrl-C it leaves gracefully: it closes every session and waits for the
proxies to close them too (so they choose it no more), answers the frames it has
already received, and exits 0. SIGUSR1 prints each session (proxy and state) and the
packets answered; SIGHUP says that there is nothing to reload.

Threads: the main thread waits for signals (``netio.Signals``) and does their work;
``accept`` runs the data port's accept loop (``netio.FramedServer``); one thread per
data connection, which adds its ACKs to ``UpstreamServer.answered`` under a lock, once
per batch; one ``Registrar`` per proxy, which alone owns its session connection
(``leave`` only half-closes it) and keeps its state under its own lock for the main
thread to read.
"""

import ipaddress
import logging
import signal
import threading
import time

import cli
import gate
import netio
import protocol
from protocol import MessageType, show

log = logging.getLogger("rproxy")
packets = logging.getLogger("rproxy.packets")

# Pauses between registration attempts, in seconds: doubled from the first to the
# cap. The cap keeps "registered within 3 s of the proxy being up" (issue 3); Envoy's
# default reconnect backoff is 0.5 s doubling to 5 s.
FIRST_PAUSE = 0.1
MAX_PAUSE = 1.0
# A session that lasted this long (seconds) resets the pause to FIRST_PAUSE.
STABLE_SESSION = 5.0
# Seconds a stopping server waits, for all its sessions together, for the proxies
# to close their side. A live proxy closes at once; 2 s bounds one that hangs, and
# leaves room for netio.run_until_stopped's drain in the 5 s exit (HAProxy's
# `timeout client-fin`, the same wait for a peer's close, is commonly 1 to 30 s).
LEAVE_TIMEOUT = 2.0
# The SETUP weight when -weight is not given: 1, as nginx's and HAProxy's default
# server weight; a weight of 1 is the SETUP without the field (PROTOCOL.md, team's
# section 8), so a default server sends the assignment's SETUP unchanged.
DEFAULT_WEIGHT = 1


class RegistrationRefused(Exception):
    """The proxy answered the SETUP with an ERROR; the text is that ERROR."""


class SessionLost(Exception):
    """The heartbeat session ended; the text says how."""


class SessionClosed(SessionLost):
    """The proxy closed the heartbeat session, with no ERROR before."""


class UpstreamServer(netio.FramedServer):
    """The data side: one thread per connection from the proxy.

    Args:
        address: ``(host, port)`` to listen on; port 0 picks a free port.
        server_id: this server's id (str), the ``srcid`` of its ACKs.
        frame_timeout, idle_timeout: seconds, see ``netio.Connection.receive``.
        name_peer: end each per-packet text line with `` (from PEER)``, the data
            connection's peer (with several proxies: which one the packet came
            through); the JSON events always carry it as ``peer``.
        **server_options: passed to ``netio.FramedServer``.
    """

    def __init__(self, address, server_id, *, frame_timeout=10.0, idle_timeout=300.0,
                 name_peer=False, **server_options):
        super().__init__(address, **server_options)
        self.server_id = server_id
        self.name_peer = name_peer
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self._answered = 0  # DATA frames answered with an ACK, over every connection
        self._answered_lock = threading.Lock()

    @property
    def answered(self):
        """DATA frames answered with an ACK since the start (int)."""
        with self._answered_lock:
            return self._answered

    def handle_connection(self, conn):
        """Answer every DATA with its ACK and every PING with a PONG, in order: all the
        frames one read brings are answered together, in one write."""
        try:
            while True:
                try:
                    items = conn.next_batch(self.idle_timeout, self.frame_timeout)
                except netio.ConnectionTimeout as exc:
                    log.info("closing connection from %s: %s", conn.peer, exc,
                             extra=cli.event("idle_timeout", peer=conn.peer))
                    return
                if items is None:
                    return
                answers = [self.answer(item, conn.peer) for item in items]
                # Counted before they leave: a peer that has its answers and asks
                # (SIGUSR1) must find them counted.
                acks = sum(1 for answer in answers if answer["type"] == MessageType.ACK)
                if acks:
                    with self._answered_lock:  # one lock per batch, not per frame
                        self._answered += acks
                conn.send_frames([protocol.encode_frame(answer) for answer in answers])
        except OSError:
            pass

    def answer(self, item, peer):
        """Return the answer to one received item: the ACK of a DATA message
        (PROTOCOL.md section 2), the PONG of a PING, or an ERROR.

        Args:
            item: a validated message (dict), or the ``protocol.MessageError`` of a bad
                frame.
            peer: the connection's label, for the log line of a bad frame.
        """
        if isinstance(item, protocol.MessageError):
            log.warning("%s (from %s)", item, peer,
                        extra=cli.event("bad_message", peer=peer, reason=item.message))
            return protocol.error_message(item)
        kind = item["type"]
        if kind == MessageType.DATA:
            reply = protocol.ack_for(self.server_id, item)
            if packets.isEnabledFor(logging.INFO):
                via = f" (from {peer})" if self.name_peer else ""
                packets.info("Received a message from client %s payload: %s%s",
                             show(item["srcid"]), show(item["payload"]), via,
                             extra=cli.event("received", client=item["srcid"],
                                             payload=show(item["payload"]), peer=peer))
                packets.info("Sending a response to the client %s payload: %s%s",
                             show(item["srcid"]), reply["payload"], via,
                             extra=cli.event("answer", client=item["srcid"],
                                             payload=reply["payload"], peer=peer))
            return reply
        if kind == MessageType.PING:
            return protocol.pong()
        return protocol.error(protocol.BAD_MESSAGE, f"a server answers DATA and PING, not "
                              f"{kind.name} (type {kind.value})")


class Registrar(threading.Thread):
    """Keeps this server registered with one proxy (PROTOCOL.md sections 3 and 6).

    Args:
        proxy: ``(host, port)`` of the proxy.
        setup_message: the SETUP to send (``protocol.setup(...)``), without proof.
        key: the policy key (bytes) for a registration proof, or None.
        tls: ``ssl.SSLContext`` for the connection to the proxy, or None.
        connect_timeout: seconds for connecting and for each answer.
        on_refused: called with this Registrar (from its thread) when the proxy
            refuses the SETUP; the refusal is then in ``refused``, and the thread ends.

    Attributes:
        where: the proxy's ``"host:port"`` (``"[v6]:port"``), as log lines name it.
        refused: None, or the refusal: ``"CODE: message"`` (str).
    """

    def __init__(self, proxy, setup_message, key=None, tls=None, connect_timeout=2.0,
                 on_refused=lambda registrar: None):
        self.where = netio.format_address(proxy)
        super().__init__(name=f"registrar {self.where}", daemon=True)
        self.proxy = proxy
        self.setup_message = setup_message
        self.key = key
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.heartbeat = setup_message.get("heartbeat")
        self.refused = None
        self.on_refused = on_refused
        self._stopping = threading.Event()
        # Guards _session and _state, which the main thread reads (leave, status).
        self._lock = threading.Lock()
        self._session = None  # the live session's connection, or None
        self._state = "connecting"

    @property
    def registered(self):
        """True while the proxy counts this server in: a live session, or a
        registration without a session (``-heartbeat 0``)."""
        with self._lock:
            return self._state.startswith("registered")

    def status(self):
        """One line: the proxy and the state of this server's registration with it."""
        with self._lock:
            return f"reverse proxy at {self.where}: {self._state}"

    def _set_state(self, state, session=None):
        with self._lock:
            self._state = state
            self._session = session

    def run(self):
        pause = FIRST_PAUSE
        # True when the last session ended by the proxy's close (no ERROR before it),
        # and the proxy was reachable at once afterwards.
        closed_before = False
        while not self._stopping.is_set():
            try:
                conn = netio.connect(*self.proxy, self.connect_timeout, tls=self.tls)
            except OSError as exc:
                why = netio.describe_error(exc)
                closed_before = False
                self._set_state(f"unreachable ({why}); retrying")
                log.info("Cannot reach the reverse proxy at %s (%s); retrying in %g s",
                         self.where, why, pause,
                         extra=cli.event("unreachable", proxy=self.where, reason=why,
                                         retry_s=pause))
            else:
                began = None
                try:
                    self._register(conn)
                    if self.heartbeat is None or self._stopping.is_set():
                        return
                    began = time.monotonic()
                    try:
                        self._keep_session(conn)
                    finally:
                        # A session that ends at once (another server took this id, say)
                        # must not turn into a tight loop of registrations.
                        if time.monotonic() - began > STABLE_SESSION:
                            pause = FIRST_PAUSE
                except RegistrationRefused as exc:
                    self.refused = str(exc)
                    self._set_state(f"refused registration: {exc}")
                    self.on_refused(self)
                    return
                except (SessionLost, OSError, protocol.ProtocolError) as exc:
                    if self._stopping.is_set():
                        return
                    why = netio.describe_error(exc) if isinstance(exc, OSError) else str(exc)
                    closed = began is not None and isinstance(
                        exc, (SessionClosed, ConnectionResetError, BrokenPipeError))
                    if closed and closed_before and time.monotonic() - began < STABLE_SESSION:
                        # What the proxy does to the older session when a server
                        # registers with the same id: each of the two closes the other's.
                        why += "; another server registered with the same id?"
                    closed_before = closed
                    self._set_state(f"session lost ({why}); registering again")
                    log.info("Lost the session with the reverse proxy at %s (%s); "
                             "registering again in %g s", self.where, why, pause,
                             extra=cli.event("session_lost", proxy=self.where, reason=why,
                                             retry_s=pause))
                finally:
                    conn.close()
            if self._stopping.wait(pause):
                return
            pause = min(pause * 2, MAX_PAUSE)

    def _register(self, conn):
        message = dict(self.setup_message)
        conn.send(message)
        answer = self._answer(conn)
        if (answer["type"] == MessageType.ERROR and answer["code"] == protocol.UNAUTHORIZED
                and isinstance(answer.get("nonce"), str) and self.key is not None):
            message["nonce"] = answer["nonce"]
            message["proof"] = protocol.setup_proof(self.key, answer["nonce"], message)
            conn.send(message)
            answer = self._answer(conn)
        if answer["type"] == MessageType.ERROR:
            if answer["code"] == protocol.OVERLOADED:
                # "Try again later" (PROTOCOL.md section 2): a full proxy, not a refusal.
                raise SessionLost(f"the proxy is full: {answer['code']}: {answer['message']}")
            hint = ""
            if answer.get("nonce") is not None and self.key is None:
                hint = " (the proxy requires a key: give -key-file)"
            raise RegistrationRefused(f"{answer['code']}: {answer['message']}{hint}")
        if answer["type"] != MessageType.REGISTERED:
            raise protocol.MessageError(
                f"the proxy answered SETUP with {answer['type'].name}, not REGISTERED")
        if self.heartbeat is None:
            self._set_state("registered without a session (-heartbeat 0)")
        else:
            self._set_state(f"registered, heartbeat {self.heartbeat:g} s", conn)
        log.info("Registered with the reverse proxy at %s as server id %s for privacy "
                 "policy %s%s", self.where, show(answer["id"]),
                 show(answer["privPolyId"]),
                 f" (heartbeat {self.heartbeat:g} s)" if self.heartbeat else "",
                 extra=cli.event("registered", proxy=self.where, id=answer["id"],
                                 policy=answer["privPolyId"], heartbeat=self.heartbeat))

    def _answer(self, conn):
        answer = conn.receive(deadline=netio.Deadline(self.connect_timeout))
        if answer is None:
            raise SessionLost("the proxy closed the connection before answering SETUP")
        return answer

    def _keep_session(self, conn):
        """PING every heartbeat until ``leave``.

        Raises:
            SessionClosed: the proxy closed the session without an ERROR first.
            SessionLost: the session ended otherwise: no whole frame for 3 heartbeats
                (none, or part of one: every wait is bounded by the heartbeat), or
                closed after an ERROR.
        """
        beat = self.heartbeat
        ping_due = netio.Deadline(0)
        silence = netio.Deadline(3 * beat)  # moved on by every frame heard
        partial = errors = False
        while not self._stopping.is_set():
            if not ping_due.left():
                conn.send(protocol.ping())
                ping_due = netio.Deadline(beat)
            if not silence.left():
                raise SessionLost(f"no answer to PING for {3 * beat:g} s (3 heartbeats)"
                                  + ("; part of a frame came, not the rest" if partial else ""))
            try:
                message = conn.receive(idle_timeout=min(ping_due.left(), silence.left()))
            except netio.ConnectionTimeout as exc:
                partial = exc.mid_frame
                continue
            if message is None:
                if errors:
                    raise SessionLost("the proxy closed the session after an ERROR")
                raise SessionClosed("the proxy closed the session")
            silence = netio.Deadline(3 * beat)
            if message["type"] == MessageType.ERROR:
                errors = True
                log.warning("The reverse proxy at %s reported on the session: %s: %s",
                            self.where, message["code"], message["message"],
                            extra=cli.event("session_error", proxy=self.where,
                                            code=message["code"], reason=message["message"]))

    def leave(self):
        """Begin leaving: stop registering and close the session. ``join`` then waits
        until the proxy has closed its side too: from then on it sends this server
        nothing new (section 6). Returns at once, so that every session of a server
        closes in parallel.

        Over plain TCP the half-close tells the proxy at once; over TLS the session
        thread closes it when it next wakes, within one heartbeat."""
        self._stopping.set()
        with self._lock:
            session = self._session
        if session is not None:
            session.half_close()


def read_key_file(path):
    """Return the key of a key file: its first line that is not blank or a ``#``
    comment, as bytes.

    Raises:
        ValueError: unreadable file or no key in it.
    """
    lines = gate.key_file_lines(path, "key file")
    if not lines:
        raise ValueError(f"key file '{path}' holds no key")
    return lines[0][1].encode("utf-8")


def parse_weight(text):
    """Parse ``-weight``: a whole number from 1 to ``protocol.MAX_WEIGHT`` (256), the
    SETUP ``weight`` of the team's PROTOCOL.md section 8.

    Raises:
        ValueError: anything else; the message names the text.
    """
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= protocol.MAX_WEIGHT:
        raise ValueError(f"'{text}' is not a whole number from 1 to {protocol.MAX_WEIGHT}")
    return int(text)


def is_any_address(host):
    """True when ``host`` (str) means every local address: ``0.0.0.0``, ``::`` or
    empty. The SETUP then carries no ``host`` and each proxy uses the address the
    registration came from (PROTOCOL.md section 2)."""
    try:
        return not host or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def default_host(proxies):
    """The address to listen on when ``-host`` is not given: 127.0.0.1 when every proxy
    (a list of ``(host, port)``) is on this machine, so that the data port stays
    local; else every address (``0.0.0.0``, or ``::`` when a proxy is IPv6), and no
    ``host`` in SETUP, so that each proxy connects back to the address it sees
    (a remote proxy cannot reach this machine's 127.0.0.1)."""
    def local(host):
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False
    if all(local(host) for host, _ in proxies):
        return "127.0.0.1"
    return "::" if any(":" in host for host, _ in proxies) else "0.0.0.0"


def build_parser():
    parser = cli.ArgumentParser(
        "Upstream server: registers with one or more reverse proxies for one privacy "
        "policy and answers each DATA frame with the SHA-1 of its payload (PROTOCOL.md).")
    parser.add_argument("-id", required=True, type=cli.arg_id, help="this server's id")
    parser.add_argument("-pp", required=True, type=cli.arg_id, metavar="PPID",
                        help="the privacy policy id this server serves")
    parser.add_argument("-listen", type=cli.arg_port, default=0, metavar="LPORT",
                        help="TCP port for data connections; 0 picks a free port")
    parser.add_argument("-revproc", type=cli.arg_hostports,
                        default=[("127.0.0.1", 2100)], metavar="RPPORT",
                        help="the reverse proxy: PORT or HOST:PORT (IPv6: [ADDR]:PORT); "
                             "several, comma-separated, to register with each of them "
                             "(default: 2100)")
    parser.add_argument("-host", type=cli.arg_host,
                        help="address to listen on (IPv4 or IPv6), and to give the "
                             "proxies; 0.0.0.0 listens on every IPv4 address, :: on "
                             "every IPv6 and IPv4 one, and then each proxy uses the "
                             "address it sees (default: 127.0.0.1 when every proxy is "
                             "on this machine, else every address)")
    parser.add_argument("-weight", type=cli.arg_type(parse_weight),
                        default=DEFAULT_WEIGHT, metavar="N",
                        help=f"this server's share of its policy's rotation, 1 to "
                             f"{protocol.MAX_WEIGHT}: a server of weight 3 gets 3 frames "
                             f"for every 1 a server of weight 1 gets")
    parser.add_argument("-heartbeat", type=float, default=1.0, metavar="SECONDS",
                        help="PING the proxy this often on a kept session; 0 registers "
                             "the legacy way (no session)")
    parser.add_argument("-key-file", metavar="FILE",
                        help="file holding this policy's key, for proxies run with "
                             "-policy-keys")
    parser.add_argument("-max-frame", type=cli.arg_frame_size, default=protocol.DEFAULT_MAX_FRAME,
                        metavar="BYTES", help="largest frame body accepted")
    parser.add_limit_options()
    parser.add_output_options("do not print the two lines per packet")
    parser.add_tls_options(
        "serve TLS with this certificate (PEM), and show it to the proxy",
        "CA (PEM) that checks the proxy: register over TLS")
    return parser


def main(argv=None):
    parser = build_parser()
    args, tls, proxy_tls = parser.parse_program_args(argv)
    if not 0 <= args.heartbeat <= protocol.MAX_HEARTBEAT:
        parser.error(f"argument -heartbeat: '{args.heartbeat:g}' is not a number of seconds "
                     f"from 0 to {protocol.MAX_HEARTBEAT}")
    key = None
    if args.key_file:
        try:
            key = read_key_file(args.key_file)
        except ValueError as exc:
            parser.error(str(exc))
    if args.host is None:
        args.host = default_host(args.revproc)
    log.info("Server running with id %s", show(args.id), extra=cli.event("starting", id=args.id))
    log.info("Server serving privacy policy %s", show(args.pp),
             extra=cli.event("policy", policy=args.pp))
    try:
        server = UpstreamServer(
            (args.host, args.listen), args.id, frame_timeout=args.frame_timeout,
            idle_timeout=args.idle_timeout, max_frame=args.max_frame,
            max_conns=args.max_conns, tls=tls, handshake_timeout=args.frame_timeout,
            name_peer=len(args.revproc) > 1)
    except OSError as exc:
        parser.exit_cannot_listen(args.host, args.listen, exc)
    signals = netio.Signals((signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP))
    cli.on_output_closed(lambda: signals.post(signal.SIGTERM))
    log.info("Listening on port %d", server.port, extra=cli.event("listening", port=server.port))
    setup_message = protocol.setup(
        args.id, args.pp, server.port, host=None if is_any_address(args.host) else args.host,
        heartbeat=args.heartbeat or None,
        weight=None if args.weight == DEFAULT_WEIGHT else args.weight)
    several = len(args.revproc) > 1
    registrars = []

    def on_refused(registrar):
        # Called from each registrar's own thread: the last one to be refused stops
        # the server, whatever the order.
        if several:
            log.warning("The reverse proxy at %s refused registration: %s; not asking it "
                        "again", registrar.where, registrar.refused,
                        extra=cli.event("refused", proxy=registrar.where,
                                        reason=registrar.refused))
        if all(other.refused is not None for other in registrars):
            signals.post(signal.SIGTERM)

    for proxy_host, proxy_port in args.revproc:
        # The assignment's wording; with several proxies, the host tells them apart.
        log.info("Connecting to the reverse proxy on port %d%s", proxy_port,
                 f" at {proxy_host}" if several else "",
                 extra=cli.event("connecting", proxy=netio.format_address(
                     (proxy_host, proxy_port))))
        registrars.append(Registrar((proxy_host, proxy_port), setup_message, key=key,
                                    tls=proxy_tls, on_refused=on_refused))
    for registrar in registrars:
        registrar.start()

    def leave():
        staying = [registrar for registrar in registrars if registrar.refused is None]
        if not staying:
            return
        registered = sum(1 for registrar in staying if registrar.registered)
        if args.heartbeat == 0:
            log.info("Stopping: answering the frames already received (registered without "
                     "a session: a proxy drops this server when a forward to it fails)",
                     extra=cli.event("stopping"))
        elif not registered:
            log.info("Stopping: registered with no proxy; answering the frames already "
                     "received", extra=cli.event("stopping"))
        else:
            log.info("Stopping: leaving the rotation of %s, then answering the frames "
                     "already received", "the proxy" if len(registrars) == 1 else
                     f"{registered} prox{'y' if registered == 1 else 'ies'}",
                     extra=cli.event("stopping"))
        for registrar in staying:
            registrar.leave()
        deadline = netio.Deadline(LEAVE_TIMEOUT)
        for registrar in staying:
            registrar.join(deadline.left())

    def on_signal(signum):
        if signum == signal.SIGUSR1:
            lines = [registrar.status() for registrar in registrars]
            log.info("Sessions:\n%s\nPackets answered: %d (all proxies together)",
                     "\n".join(f"  {line}" for line in lines), server.answered,
                     extra=cli.event("sessions", sessions=lines, answered=server.answered))
        elif signum == signal.SIGHUP:
            log.info("SIGHUP: nothing to reload (the server reads no file after its start)",
                     extra=cli.event("nothing_to_reload"))

    netio.run_until_stopped(server, leave, signals, on_signal=on_signal)
    if all(registrar.refused is not None for registrar in registrars):
        if several:
            cli.print_error("server.py: every reverse proxy refused registration: " + "; ".join(
                f"{registrar.where}: {registrar.refused}" for registrar in registrars))
        else:
            cli.print_error(f"server.py: the reverse proxy refused registration: "
                            f"{registrars[0].refused}")
        return 1
    log.info("Server stopped", extra=cli.event("stopped"))
    return 0


if __name__ == "__main__":
    cli.run(main)
