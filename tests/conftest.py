"""Test harness: real processes on 127.0.0.1, port 0, readiness read from their output.

* ``Node`` runs one program (``reverse_proxy.py``, ``server.py``, ...) with its output
  collected line by line; ``wait_for`` waits on a regular expression, bounded.
* The ``nodes`` fixture starts nodes and kills whatever is left at the end of a test.
* ``Wire`` is a raw framed socket for black-box tests: bytes or messages out,
  messages in, every read bounded.
* ``FakeServer`` is a scriptable upstream server in the test process (answer, delay,
  never answer, close after N frames, wrong answer) for the fault cases.
* ``Peer`` (the ``peers`` fixture) is a scripted listener of any kind: a proxy that
  sends half a frame, refuses, falls silent...; ``read_frame`` and ``read_to_eof``
  read a raw socket.
* Helpers every test module shares, defined here once: ``sha1``, ``frame``, ``data``,
  ``free_port``, ``wait_until``, ``cpu_seconds``, ``ipv6_loopback``, and the
  no-traceback checks (``assert_no_traceback``, ``assert_clean_log``, and the
  ``no_traceback_in_nodes`` fixture a module opts in to).
"""

import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import protocol  # noqa: E402

PYTHON = sys.executable
WAIT = 10.0  # seconds any single wait in a test may take before it fails
POLL = 0.05  # seconds between two looks at a state in wait_until: a twentieth of a
# second is below any delay a test here measures, and light enough for a condition
# that runs a program (xwininfo) or scans /proc
PROGRAMS = ("reverse_proxy.py", "server.py", "client.py")  # the three command lines
# The answers a stats snapshot counts: ACK and the ERROR codes (PROTOCOL.md section 2)
CODES = ("ACK", "BAD_FRAME", "FRAME_TOO_LARGE", "BAD_MESSAGE", "NO_SERVER",
         "UPSTREAM_FAILED", "TIMEOUT", "OVERLOADED", "UNAUTHORIZED")


class Node:
    """One program run as a child process, its stdout and stderr merged and kept."""

    def __init__(self, args, name=None, python=True, preexec=None):
        self.args = [PYTHON, *args] if python else list(args)
        self.name = name or os.path.basename(args[0])
        self.proc = subprocess.Popen(
            self.args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True, encoding="utf-8", errors="replace",
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=preexec)
        self.lines = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = None

    def _read(self):
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self):
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern, timeout=WAIT, start=0):
        """Wait for a line matching ``pattern`` (regex) among lines[start:]; return the
        match. Fails the test with the output so far after ``timeout`` seconds."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    match = regex.search(line)
                    if match:
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    pytest.fail(f"{self.name}: no line matching {pattern!r} within "
                                f"{timeout} s; output:\n" + "\n".join(self.lines[-40:]))
                self._changed.wait(min(left, 0.2))

    def count(self, pattern):
        """How many output lines match ``pattern`` (regex) so far."""
        regex = re.compile(pattern)
        with self._changed:
            return sum(1 for line in self.lines if regex.search(line))

    def signal(self, signum):
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout=WAIT):
        """Wait for the process to exit; return its exit status."""
        status = self.proc.wait(timeout)
        self._reader.join(timeout)
        return status

    def stop(self, timeout=WAIT):
        """SIGTERM, then wait; return the exit status."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        try:
            self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            pass


class Nodes:
    """Factory of nodes for one test; ``cleanup`` kills the ones still running."""

    def __init__(self):
        self.started = []

    def start(self, *args, name=None, preexec=None):
        """Start a Python program of the project; ``preexec`` runs in the child first
        (a lower descriptor limit, say)."""
        node = Node([str(arg) for arg in args], name, preexec=preexec)
        self.started.append(node)
        return node

    def start_command(self, command, name):
        """Start any command (a list: HAProxy, say), not a Python program."""
        node = Node(command, name, python=False)
        self.started.append(node)
        return node

    def proxy(self, *options, port=0):
        """Start reverse_proxy.py with ``options``; wait until it prints its port."""
        node = self.start("reverse_proxy.py", "-port", port, *options, name="proxy")
        node.port = int(node.wait_for(r"Running the reverse proxy on port (\d+)").group(1))
        return node

    def server(self, server_id, policy, proxy_port, *options, listen=0, wait=True):
        """Start server.py; wait until it is registered (unless ``wait`` is False)."""
        node = self.start("server.py", "-id", server_id, "-pp", policy, "-listen", listen,
                          "-revproc", proxy_port, *options, name=f"server {server_id}")
        node.port = int(node.wait_for(r"Listening on port (\d+)").group(1))
        if wait:
            node.wait_for(r"Registered with the reverse proxy")
        return node

    def client(self, client_id, proxy_port, pktfile, *options):
        """Start client.py; the caller waits for it."""
        return self.start("client.py", "-id", client_id, "-revproc", proxy_port,
                          "-pkt", pktfile, *options, name=f"client {client_id}")

    def cleanup(self):
        for node in self.started:
            node.kill()


@pytest.fixture
def nodes():
    group = Nodes()
    yield group
    group.cleanup()


def run(*args, timeout=WAIT, stdin=None):
    """Run a program to its end; return the CompletedProcess (text output)."""
    return subprocess.run([PYTHON, *[str(arg) for arg in args]], cwd=ROOT, timeout=timeout,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL
                          if stdin is None else stdin)


class Wire:
    """A raw framed TCP connection for black-box tests."""

    def __init__(self, port, host="127.0.0.1", timeout=WAIT):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self.decoder = protocol.FrameDecoder(1 << 30)

    def send_bytes(self, data):
        self.sock.sendall(data)

    def send(self, message):
        self.sock.sendall(protocol.encode_frame(message))

    def send_body(self, body):
        """Send ``body`` (bytes) as one well-framed frame."""
        self.sock.sendall(frame(body))

    def receive(self, timeout=None):
        """Return the next message as a plain dict (type an int), or None at EOF."""
        self.sock.settimeout(timeout or self.timeout)
        while True:
            body = self.decoder.next_frame()
            if body is not None:
                return protocol.parse_message(body)
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.decoder.feed(chunk)

    def closed(self, timeout=None):
        """True when the peer closes (EOF or reset) before sending anything more."""
        self.sock.settimeout(timeout or self.timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()


@pytest.fixture
def wires():
    opened = []

    def open_wire(port, **kwargs):
        wire = Wire(port, **kwargs)
        opened.append(wire)
        return wire

    yield open_wire
    for wire in opened:
        wire.close()


class FakeServer:
    """A scriptable upstream server on 127.0.0.1 in the test process.

    ``behaviour(message, count)`` is called for each frame received (``count`` from 1)
    and returns the message to answer, bytes to send as they are, None to answer
    nothing, the string ``"close"`` to close the connection, or a list of those to do
    in turn. The default answers
    like server.py.
    ``received`` lists every message received, ``raw`` the bytes as they came.
    """

    def __init__(self, server_id="900", behaviour=None):
        self.server_id = server_id
        self.behaviour = behaviour or self.honest
        self.received = []
        self.raw = bytearray()
        self.count = 0
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._conns = []
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def honest(self, message, count):
        if message["type"] == protocol.MessageType.PING:
            return protocol.pong()
        return protocol.ack_for(self.server_id, message)

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        decoder = protocol.FrameDecoder()
        try:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                with self._lock:
                    self.raw += chunk
                decoder.feed(chunk)
                while (body := decoder.next_frame()) is not None:
                    message = protocol.parse_message(body)
                    with self._lock:
                        self.received.append(message)
                        self.count += 1
                        count = self.count
                    answer = self.behaviour(message, count)
                    for step in answer if isinstance(answer, list) else [answer]:
                        if step == "close":
                            return
                        if isinstance(step, bytes):
                            conn.sendall(step)
                        elif step is not None:
                            conn.sendall(protocol.encode_frame(step))
        except OSError:
            pass
        finally:
            conn.close()

    def drop_connections(self):
        """End every connection from the proxy now (the proxy sees them close)."""
        for conn in list(self._conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def register(self, proxy_port, policy, heartbeat=None, server_id=None):
        """Register with the proxy the legacy way (or with a session when
        ``heartbeat``); return the registration Wire, left open."""
        wire = Wire(proxy_port)
        wire.send(protocol.setup(server_id or self.server_id, policy, self.port,
                                 heartbeat=heartbeat))
        answer = wire.receive()
        assert answer["type"] == protocol.MessageType.REGISTERED, answer
        return wire

    def close(self):
        """Stop listening and end every connection (as a killed server would).
        ``shutdown`` first: a ``close`` from this thread would not wake the accept or
        the reads blocked in the server's threads, and their sockets would live on."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.drop_connections()
        for conn in self._conns:
            try:
                conn.close()
            except OSError:
                pass


@pytest.fixture
def fake_servers():
    made = []

    def make(*args, **kwargs):
        fake = FakeServer(*args, **kwargs)
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.close()


class LogWatch(logging.Handler):
    """Collects the lines of the "rproxy" logger in this process (a proxy or loop in a
    thread of the test); ``wait_for`` one matching a regular expression."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []
        self._changed = threading.Condition()

    def emit(self, record):
        with self._changed:
            self.lines.append(record.getMessage())
            self._changed.notify_all()

    def wait_for(self, pattern, timeout=WAIT):
        """Wait for a line matching ``pattern``; return the match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    match = regex.search(line)
                    if match:
                        return match
                left = deadline - time.monotonic()
                assert left > 0, f"no log line matching {pattern!r} in {timeout} s: {self.lines}"
                self._changed.wait(left)

    def count(self, pattern):
        """How many lines match ``pattern`` so far."""
        regex = re.compile(pattern)
        with self._changed:
            return sum(1 for line in self.lines if regex.search(line))


@pytest.fixture
def log_watch():
    watch = LogWatch()
    logger = logging.getLogger("rproxy")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(watch)
    yield watch
    logger.removeHandler(watch)
    logger.setLevel(level)


# --- Waits and checks ------------------------------------------------------------------

def wait_until(condition, what, timeout=WAIT):
    """Poll ``condition()`` every POLL seconds until it returns a true value, and
    return that value; after ``timeout`` seconds, fail the test naming ``what`` (a
    string, or a function that returns one then, to show the state at that time)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what() if callable(what) else what}")
        time.sleep(POLL)


def _name_and_output(holder):
    """(name, text) of what ``holder`` printed or logged: a CompletedProcess (stdout
    then stderr), a Node, a LogWatch, or a proxy in a thread of the test (its
    ``.log``)."""
    if isinstance(holder, subprocess.CompletedProcess):
        streams = [stream.decode("utf-8", "replace") if isinstance(stream, bytes) else stream
                   for stream in (holder.stdout, holder.stderr) if stream]
        return " ".join(map(str, holder.args)), "".join(streams)
    name = getattr(holder, "name", None) or type(holder).__name__
    if hasattr(holder, "log"):
        return name, "\n".join(holder.log.lines)
    if isinstance(holder, Node):
        return name, holder.output
    return name, "\n".join(holder.lines)


def assert_no_traceback(*holders):
    """No Python traceback ("Traceback" anywhere) in what any of ``holders`` printed
    or logged (CompletedProcess, Node, LogWatch, or a proxy with a ``.log``)."""
    for holder in holders:
        name, output = _name_and_output(holder)
        at = output.find("Traceback")
        assert at < 0, f"{name} printed a traceback:\n{output[max(0, at - 500):at + 3000]}"


def assert_clean_log(*holders):
    """``assert_no_traceback``, and no one-line "internal error" (a failure the
    program caught but did not expect) either."""
    assert_no_traceback(*holders)
    for holder in holders:
        name, output = _name_and_output(holder)
        assert "internal error" not in output, (name, [
            line for line in output.splitlines() if "internal error" in line][:5])


@pytest.fixture
def no_traceback_in_nodes(nodes):
    """No node started by the test printed a traceback (checked at its end); a module
    opts in with ``pytestmark = pytest.mark.usefixtures("no_traceback_in_nodes")``."""
    yield
    assert_no_traceback(*nodes.started)


def cpu_seconds(pid):
    """User plus system CPU time of process ``pid`` so far, in seconds (from /proc)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ipv6_loopback():
    """True when this machine can bind ::1."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def proxies(log_watch):
    """Start ``reverse_proxy.ReverseProxy`` in a thread of the test process: call
    ``proxies(**options)`` for one listening on 127.0.0.1 port 0 (``.port``; its log
    lines in ``.log``, a LogWatch); every one is stopped at the end of the test, and
    none may have logged an internal error."""
    import reverse_proxy
    made = []

    def make(**options):
        proxy = reverse_proxy.ReverseProxy(("127.0.0.1", 0), **options)
        proxy.log = log_watch
        proxy.start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.stop(drain_timeout=1.0)
    assert not log_watch.count("internal error"), log_watch.lines


# --- Messages and frames ------------------------------------------------------------

def sha1(text):
    """The lowercase hex SHA-1 of the UTF-8 bytes of ``text``: an ACK's payload,
    computed here with hashlib rather than ``protocol.sha1_hex`` so that the servers'
    hashes are checked against an oracle of the test's own."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def frame(body):
    """One well-framed frame around ``body`` (bytes): its 4-byte big-endian length,
    then it (PROTOCOL.md section 1), written out here rather than taken from
    ``protocol`` so that the tests of the framing have their own oracle."""
    return len(body).to_bytes(4, "big") + body


def data(srcid, policy, payload, **extra):
    """A DATA message (PROTOCOL.md section 2) as a plain dict, written out here rather
    than made by ``protocol.data`` so that what goes on the wire is the test's own;
    ``extra`` fields are added as they are."""
    return {"type": 0, "srcid": srcid, "privPoliId": policy, "payload": payload, **extra}


def write_packets(tmp_path, name, packets):
    """Write ``packets`` (list of dicts) as a JSON array file; return its path."""
    import json
    path = tmp_path / name
    path.write_text(json.dumps(packets), encoding="utf-8")
    return path


# --- Raw peers ----------------------------------------------------------------------

def free_port():
    """A TCP port on 127.0.0.1 where nothing listens: bound, then released. A
    connection to it is refused, and a program may be started on it (the race with
    another program taking it in between is the price of a port chosen in advance)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Peer:
    """A scripted proxy on 127.0.0.1: ``script(sock)`` runs in a thread of its own for
    each accepted connection, which is closed when the script returns (unless it
    returns ``"hold"``: then at the end of the test)."""

    def __init__(self, script):
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self._held = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock):
        sock.settimeout(WAIT)
        try:
            if self.script(sock) == "hold":
                self._held.append(sock)
                return
        except OSError:
            pass
        sock.close()

    def close(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for sock in self._held:
            sock.close()
        for thread in self._threads:
            thread.join(WAIT)


@pytest.fixture
def peers():
    made = []

    def make(script):
        made.append(Peer(script))
        return made[-1]

    yield make
    for peer in made:
        peer.close()


def read_frame(sock):
    """Read one whole frame from ``sock``; return its message (None at EOF)."""
    decoder = protocol.FrameDecoder()
    while True:
        body = decoder.next_frame()
        if body is not None:
            return protocol.parse_message(body)
        chunk = sock.recv(65536)
        if not chunk:
            return None
        decoder.feed(chunk)


def read_to_eof(sock):
    while sock.recv(65536):
        pass


# --- Test certificates -----------------------------------------------------------------

def openssl(*args, cwd):
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr


def make_ca(directory, name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN={name} test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)


def make_leaf(directory, name, ca):
    ext = directory / f"{name}.ext"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n"
                   "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n",
                   encoding="ascii")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", "/CN=localhost",
            cwd=directory)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", ext.name,
            cwd=directory)


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A CA and a leaf certificate for 127.0.0.1/localhost, and a rogue CA with its
    own leaf, made with openssl at run time (private keys never committed)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: it makes the test certificates")
    directory = tmp_path_factory.mktemp("pki")
    make_ca(directory, "ca")
    make_leaf(directory, "leaf", "ca")
    make_ca(directory, "rogue")
    make_leaf(directory, "rogueleaf", "rogue")
    paths = {name: str(directory / name) for name in
             ("ca.pem", "leaf.pem", "leaf.key", "rogue.pem", "rogueleaf.pem", "rogueleaf.key")}
    ssl.create_default_context(cafile=paths["ca.pem"])  # the CA loads
    return paths
