"""Tests of the programs' output plumbing (``cli.py``): any stdout encoding, a closed
stdout, a stuck stdout, ``-timestamps`` and ``-log-format json``.

The formatters, the drop counter and the log writer are tested in this process; the
rest with the real programs on 127.0.0.1, port 0, whose stdout is a pipe this test
holds: closed before they write (``| true``), closed after one line (``| head -n
1``), or never read (``| { head -n 1; sleep 1000; }``).
"""

import calendar
import contextlib
import json
import logging
import os
import queue
import re
import select
import signal
import subprocess
import threading
import time

import pytest

import cli
import protocol
from conftest import PYTHON, ROOT, WAIT, Wire, run, sha1, write_packets

STAMP = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z"
PAYLOAD = "日本"
ESCAPED = "\\u65e5\\u672c"  # PAYLOAD as backslashreplace writes it
ENCODINGS = {"latin-1": {"PYTHONIOENCODING": "latin-1"},
             "C locale": {"LC_ALL": "C", "PYTHONUTF8": "0"}}


def record(message, *args, level=logging.INFO, created=None, extra=None):
    """A LogRecord as a logger makes it; ``extra`` as ``cli.event`` gives it."""
    made = logging.LogRecord("rproxy", level, __file__, 1, message, args, None)
    if created is not None:
        made.created = created
    made.__dict__.update(extra or {})
    return made


# --- Formatters and events, in this process ---------------------------------------------

def test_iso_utc_is_iso_8601_in_utc_with_milliseconds():
    at = calendar.timegm((2026, 11, 30, 2, 20, 48)) + 0.123
    assert cli.iso_utc(at) == "2026-11-30T02:20:48.123Z"
    assert cli.iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert cli.iso_utc(59.9996) == "1970-01-01T00:01:00.000Z"


def test_text_formatter_is_the_message_alone_or_after_the_time_on_every_line():
    at = calendar.timegm((2026, 11, 30, 2, 20, 48)) + 0.123
    line = record("Running the reverse proxy on port %d", 2100, created=at)
    assert cli.TextFormatter().format(line) == "Running the reverse proxy on port 2100"
    assert cli.TextFormatter(timestamps=True).format(line) == (
        "2026-11-30T02:20:48.123Z Running the reverse proxy on port 2100")
    status = record("policy 111\n  -> server 100", created=at)
    assert cli.TextFormatter(timestamps=True).format(status) == (
        "2026-11-30T02:20:48.123Z policy 111\n2026-11-30T02:20:48.123Z   -> server 100")


def test_json_formatter_gives_ts_level_event_fields_and_message_on_one_ascii_line():
    at = calendar.timegm((2026, 11, 30, 2, 20, 48)) + 0.123

    class Opaque:
        def __str__(self):
            return "opaque\nthing"

    line = cli.JsonFormatter().format(record(
        "Received setup message from server id %s", "1\n00", level=logging.WARNING,
        created=at, extra=cli.event("registered", id="1\n00", policy=111, port=2105,
                                    weight=float("nan"), peer=Opaque(),
                                    hosts=("a", 1), payload=PAYLOAD)))
    assert "\n" not in line and line.isascii()
    assert json.loads(line) == {
        "ts": "2026-11-30T02:20:48.123Z", "level": "warning", "event": "registered",
        "id": "1\n00", "policy": 111, "port": 2105, "weight": "nan",
        "peer": "opaque\nthing", "hosts": ["a", 1], "payload": PAYLOAD,
        "message": "Received setup message from server id 1\n00"}
    assert list(json.loads(line)) == ["ts", "level", "event", "id", "policy", "port",
                                      "weight", "peer", "hosts", "payload", "message"]


def test_a_line_without_an_event_is_the_generic_event_log():
    line = json.loads(cli.JsonFormatter().format(record("Reverse proxy stopped", created=0)))
    assert line == {"ts": "1970-01-01T00:00:00.000Z", "level": "info", "event": "log",
                    "message": "Reverse proxy stopped"}


def test_an_event_field_never_overwrites_a_key_of_the_line():
    line = json.loads(cli.JsonFormatter().format(record(
        "Error from the reverse proxy", created=0, extra=cli.event(
            "error_answer", ts=1, level=2, event=3, message="NO_SERVER", code="NO_SERVER"))))
    assert line == {"ts": "1970-01-01T00:00:00.000Z", "level": "info",
                    "event": "error_answer", "ts_": 1, "level_": 2, "event_": 3,
                    "message_": "NO_SERVER", "code": "NO_SERVER",
                    "message": "Error from the reverse proxy"}


def test_drop_counter_counts_until_taken():
    drops = cli.DropCounter()
    assert drops.take() == 0
    for _ in range(3):
        drops.add()
    assert drops.take() == 3
    assert drops.take() == 0


def test_dropped_record_names_the_count_in_both_formats():
    dropped = cli.dropped_record(7)
    assert cli.TextFormatter().format(dropped) == (
        "7 log lines dropped (standard output was not read fast enough)")
    line = json.loads(cli.JsonFormatter().format(dropped))
    assert (line["level"], line["event"], line["count"]) == ("warning", "dropped", 7)


# --- The log writer, in this process -------------------------------------------------------

class StuckStream:
    """A text stream whose writes block until ``release()``; ``stuck`` is set while
    a write waits."""

    def __init__(self):
        self.lines = []
        self.stuck = threading.Event()
        self._open = threading.Event()

    def write(self, text):
        self.stuck.set()
        if not self._open.wait(WAIT):
            raise TimeoutError("the test never released the stream")
        self.lines.extend(text.splitlines())

    def flush(self):
        pass

    def release(self):
        self._open.set()


def writer_pipeline(stream, size):
    """A logger whose records go through a ``size``-record queue to ``stream``."""
    drops = cli.DropCounter()
    log_queue = queue.Queue(size)
    sink = cli.LineHandler(stream, closed=lambda stream: None)
    sink.setFormatter(cli.TextFormatter())
    writer = cli.LogWriter(log_queue, sink, drops)
    logger = logging.Logger("pipeline")
    logger.addHandler(cli.DroppingQueueHandler(log_queue, drops))
    writer.start()
    return logger, writer


def test_a_stuck_stream_never_blocks_the_logging_thread_and_drops_are_reported():
    stream = StuckStream()
    logger, writer = writer_pipeline(stream, size=3)
    try:
        logger.info("line 0")
        assert stream.stuck.wait(WAIT)  # the writer holds line 0, blocked
        began = time.monotonic()
        for number in range(1, 10):
            logger.info("line %d", number)
        assert time.monotonic() - began < 1.0  # 9 records, none waited for the stream
    finally:
        stream.release()
    assert writer.drain(WAIT)
    # Lines 1-3 waited in the queue; 4-9 found it full.
    assert stream.lines == [
        "line 0", "6 log lines dropped (standard output was not read fast enough)",
        "line 1", "line 2", "line 3"]


def test_drain_gives_up_on_a_writer_stuck_in_a_write():
    stream = StuckStream()
    logger, writer = writer_pipeline(stream, size=3)
    try:
        logger.info("line 0")
        assert stream.stuck.wait(WAIT)
        began = time.monotonic()
        assert writer.drain(0.3) is False
        assert 0.3 <= time.monotonic() - began < 0.3 + 1.0
    finally:
        stream.release()


def test_line_handler_reports_a_closed_stream():
    class ClosedStream:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    closed = []
    stream = ClosedStream()
    handler = cli.LineHandler(stream, closed=closed.append)
    handler.handle(record("Listening on port 1"))
    assert closed == [stream]


# --- Real programs: helpers --------------------------------------------------------------

class Child:
    """A program whose stdout is the write end of a pipe this test holds (``fd``:
    the read end, or None once closed); its stderr is kept apart."""

    def __init__(self, args, env, read_end_closed=False):
        read, write = os.pipe()
        if read_end_closed:
            os.close(read)
            read = None
        self.fd = read
        self.buffer = b""
        self.proc = subprocess.Popen(
            [PYTHON, *[str(arg) for arg in args]], cwd=ROOT, stdin=subprocess.DEVNULL,
            stdout=write, stderr=subprocess.PIPE, env={**os.environ, **env})
        os.close(write)

    def read_until(self, pattern, timeout=WAIT):
        """Read stdout until a line matches ``pattern`` (bytes regex); return the match."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern, re.M)
        while True:
            match = regex.search(self.buffer)
            if match:
                return match
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(0.0, left))
            chunk = os.read(self.fd, 65536) if ready else b""
            if not chunk:
                pytest.fail(f"no {pattern!r} from {self.proc.args[1]} within {timeout} s; "
                            f"stdout so far: {self.buffer[-2000:]!r}")
            self.buffer += chunk

    def close_read_end(self):
        os.close(self.fd)
        self.fd = None

    def finish(self, timeout=WAIT):
        """Wait for the exit; return (status, stderr text)."""
        try:
            _, errors = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.proc.args[1]} still running {timeout} s later")
        return self.proc.returncode, errors.decode("utf-8", "replace")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)
        if self.proc.stderr:
            self.proc.stderr.close()
        if self.fd is not None:
            self.close_read_end()


@pytest.fixture
def children():
    started = []

    def start(*args, env=None, read_end_closed=False):
        child = Child(args, env or {}, read_end_closed)
        started.append(child)
        return child

    yield start
    for child in started:
        child.kill()


def ready_proxy(children, *options):
    """A proxy whose stdout pipe this test holds; returns (child, port)."""
    proxy = children("reverse_proxy.py", "-port", 0, *options)
    port = int(proxy.read_until(rb"Running the reverse proxy on port (\d+)").group(1))
    return proxy, port


def send_packets(port, count, payload="p"):
    """Send ``count`` DATA frames on one connection, pipelined; return the seconds it
    took until every one was answered, after checking every answer."""
    wire = Wire(port)
    began = time.monotonic()
    try:
        wire.send_bytes(b"".join(protocol.encode_frame(protocol.data("1", "111", f"{payload}{n}"))
                                 for n in range(count)))
        for n in range(count):
            answer = wire.receive()
            assert answer is not None, f"the proxy closed after {n} of {count} answers"
            assert answer["type"] == protocol.MessageType.ACK, answer
            assert answer["payload"] == sha1(f"{payload}{n}")
    finally:
        wire.close()
    return time.monotonic() - began


# --- 1. Any stdout encoding -------------------------------------------------------------------

@pytest.mark.parametrize("env", ENCODINGS.values(), ids=ENCODINGS.keys())
def test_every_program_prints_every_line_on_any_stdout_encoding(
        nodes, tmp_path, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    proxy = nodes.proxy()
    server = nodes.server("100", "111", proxy.port)
    packets = write_packets(tmp_path, "p.json", [
        {"type": "0", "srcid": "1", "privPoliId": "111", "payload": PAYLOAD}])
    done = run("client.py", "-id", "1", "-revproc", proxy.port, "-pkt", packets)
    assert (done.returncode, done.stderr) == (0, ""), done
    assert done.stdout.splitlines() == [
        f"Sending message {ESCAPED} to privacy policy 111 through reverse proxy running "
        f"on port {proxy.port}",
        f"Receiving a response from the server 100 payload: {sha1(PAYLOAD)}",
        "Hash of payload is correct"]
    for line in (f"Received a data message from client 1 privacy policy 111 payload: "
                 f"{ESCAPED}", f"Forwarding a data message to server id 100 payload: {ESCAPED}"):
        proxy.wait_for("^" + re.escape(line) + "$")
    server.wait_for("^" + re.escape(f"Received a message from client 1 payload: {ESCAPED}")
                    + "$")
    assert server.stop() == 0
    assert proxy.stop() == 0
    assert "Traceback" not in proxy.output + server.output


def test_ids_typed_under_a_c_locale_reach_the_proxy_as_the_utf_8_typed(
        proxies, nodes, monkeypatch):
    # Python decodes such arguments to lone surrogates (PEP 383), which no frame can
    # carry; they are decoded again as the UTF-8 they were typed in.
    for name, value in ENCODINGS["C locale"].items():
        monkeypatch.setenv(name, value)
    proxy = proxies()
    nodes.server("sérveur", "pólicy", proxy.port)
    [policy] = proxy.stats()["policies"]
    assert (policy["policy"], [s["id"] for s in policy["servers"]]) == ("pólicy", ["sérveur"])


# --- 2. A closed stdout ---------------------------------------------------------------------

@pytest.fixture
def one_packet(nodes, tmp_path):
    """A quiet proxy whose server 100 serves policy 111, and a file of one packet of
    that policy: ``(proxy node, packet file path)``."""
    proxy = nodes.proxy("-quiet")
    nodes.server("100", "111", proxy.port, "-quiet")
    return proxy, write_packets(tmp_path, "p.json", [
        {"type": "0", "srcid": "1", "privPoliId": "111", "payload": "xyz1"}])


@pytest.mark.parametrize("program", ["client", "client --help", "server", "proxy"])
def test_a_program_whose_stdout_is_closed_ends_quietly_with_141(
        one_packet, children, program):
    # `PROGRAM | true`: the read end is closed before the program writes.
    proxy, packets = one_packet
    args = {"client": ("client.py", "-id", 1, "-revproc", proxy.port, "-pkt", packets),
            "client --help": ("client.py", "--help"),
            "server": ("server.py", "-id", 200, "-pp", "111", "-revproc", proxy.port),
            "proxy": ("reverse_proxy.py", "-port", 0)}[program]
    child = children(*args, read_end_closed=True)
    assert child.finish() == (141, "")


@pytest.mark.parametrize("stdout, reason", [
    ("/dev/full", "No space left on device"),
    (None, "it was closed when the program started")])
def test_a_client_whose_result_cannot_be_written_says_so_and_exits_1(
        one_packet, stdout, reason):
    # `client.py ... >/dev/full`, `client.py ... >&-`: its lines are its result, so
    # losing them is no success (as `ls >&-` fails), and is said on stderr.
    proxy, packets = one_packet
    with open(stdout, "w") if stdout else contextlib.nullcontext() as sink:
        done = subprocess.run(
            [PYTHON, "client.py", "-id", "1", "-revproc", str(proxy.port), "-pkt", str(packets)],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.PIPE,
            text=True, timeout=WAIT, pass_fds=(), close_fds=True,
            preexec_fn=None if sink else lambda: os.close(1))
    assert (done.returncode, done.stderr) == (
        1, f"client.py: cannot write its standard output: {reason}; lines were lost\n")


def test_client_piped_into_head_ends_quietly_with_141_not_a_network_error(
        nodes, children, tmp_path):
    # `client.py ... | head -n 1`, the pipe closed while the answers are printed: more
    # answer lines follow than a pipe holds (64 KiB), so one of them meets the close.
    proxy = nodes.proxy("-quiet")
    nodes.server("100", "111", proxy.port, "-quiet")
    packets = write_packets(tmp_path, "p.json", [
        {"type": "0", "srcid": "1", "privPoliId": "111", "payload": f"x{n}"}
        for n in range(2000)])
    client = children("client.py", "-id", 1, "-revproc", proxy.port, "-pkt", packets)
    client.read_until(rb"^Receiving a response")
    client.close_read_end()
    assert client.finish() == (141, "")


def test_proxy_piped_into_head_stops_gracefully_with_141(children):
    proxy, port = ready_proxy(children)
    proxy.close_read_end()
    try:
        # Registering makes the proxy log a line, which meets the closed pipe (if
        # the line after the first one has not already).
        wire = Wire(port)
    except OSError:
        pass
    else:
        wire.send(protocol.setup("100", "111", 9))
        wire.close()
    assert proxy.finish() == (141, "")


def test_client_reports_a_proxy_that_closes_the_connection_not_a_broken_pipe(
        tmp_path, peers):
    # The socket's EPIPE is the network's: named as a closed connection.
    closer = peers(lambda sock: None)  # closes every connection at once
    packets = write_packets(tmp_path, "p.json", [
        {"type": 0, "srcid": "7", "privPoliId": "111", "payload": "x" * 100000}] * 50)
    done = run("client.py", "-id", "7", "-revproc", closer.port, "-pkt", packets,
               "-timeout", 5)
    assert done.returncode == 1, done
    [error] = done.stderr.splitlines()
    assert "Broken pipe" not in error
    assert re.search(r"closed the connection|reset", error), error


# --- 3. A stuck stdout ---------------------------------------------------------------------

# Packets that fill the pipe (64 KiB: ~700 of the proxy's lines) and the log queue
# (cli.QUEUE_LINES), 4 lines each, with as many again dropped.
STUCK_PACKETS = 2 * cli.QUEUE_LINES // 4 + 1000
BATCH = 500


def fill_stuck_proxy(children):
    """A proxy with one server, whose stdout is read up to its first line and then
    no more, after STUCK_PACKETS packets, each answered; returns (proxy, server)."""
    proxy, port = ready_proxy(children)
    server = children("server.py", "-id", 100, "-pp", 111, "-revproc", port, "-quiet")
    server.read_until(rb"^Registered with the reverse proxy")
    for first in range(0, STUCK_PACKETS, BATCH):
        # Every batch answered in well under the time one blocked write would hold
        # the proxy (forever); the old proxy stopped answering after ~150 packets.
        assert send_packets(port, BATCH, payload=f"b{first}-") < 5.0
    return proxy, server, port


def test_a_stuck_stdout_never_stops_routing_nor_sigterm(children):
    proxy, server, port = fill_stuck_proxy(children)
    began = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    status, errors = proxy.finish()
    assert time.monotonic() - began < 5.0
    assert (status, errors) == (0, "")


def test_dropped_lines_are_counted_once_the_stdout_is_read(children):
    proxy, server, port = fill_stuck_proxy(children)
    count = int(proxy.read_until(rb"^(\d+) log lines dropped \(standard output was not "
                                 rb"read fast enough\)$").group(1))
    assert count > 0
    # One more packet: once its last line is read, the writer has caught up.
    send_packets(port, 1, payload="last-")
    proxy.read_until(b"^Forwarding a data message to client id 1 payload: "
                     + sha1("last-0").encode() + b"$")
    proxy.proc.send_signal(signal.SIGTERM)
    proxy.read_until(rb"^Reverse proxy stopped$")
    assert proxy.finish() == (0, "")
    lines = proxy.buffer.decode().splitlines()
    dropped = [int(match.group(1)) for match in (
        re.fullmatch(r"(\d+) log lines dropped \(standard output was not read fast "
                     r"enough\)", line) for line in lines) if match]
    assert dropped[0] == count
    # Every line logged was written or counted: 3 at the start (ready, limits,
    # registration open), the registration, 4 a packet, 2 at the stop.
    assert len(lines) - len(dropped) + sum(dropped) == 3 + 1 + 4 * (STUCK_PACKETS + 1) + 2


# --- 4. -timestamps and -log-format json --------------------------------------------------

def utc_seconds(stamp):
    """The instant an ISO 8601 UTC stamp with milliseconds names (float seconds)."""
    return calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) + int(
        stamp[20:23]) / 1000


def test_timestamps_put_the_utc_time_before_every_line(nodes, monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Tokyo")  # local time 9 h away from UTC would show
    proxy = nodes.proxy("-timestamps")
    server = nodes.server("100", "111", proxy.port, "-timestamps")
    began = time.time()
    done = run("client.py", "-id", 1, "-revproc", proxy.port, "-pkt", "pktfiles/1.json",
               "-timestamps")
    ended = time.time()
    assert (done.returncode, done.stderr) == (0, ""), done
    lines = done.stdout.splitlines()
    assert [re.fullmatch(f"{STAMP} (.*)", line).group(1) for line in lines] == [
        f"Sending message xyz1 to privacy policy 111 through reverse proxy running on "
        f"port {proxy.port}",
        f"Receiving a response from the server 100 payload: {sha1('xyz1')}",
        "Hash of payload is correct"]
    for line in lines:
        assert began - 0.001 <= utc_seconds(line) <= ended, (line, began, ended)
    proxy.wait_for(f"^{STAMP} " + re.escape(
        f"Forwarding a data message to client id 1 payload: {sha1('xyz1')}") + "$")
    assert server.stop() == 0
    assert proxy.stop() == 0
    assert re.fullmatch(f"{STAMP} Running the reverse proxy on port {proxy.port}",
                        proxy.lines[0])
    assert f"Listening on port {server.port}" in server.lines[2]
    for line in proxy.lines + server.lines:
        assert re.fullmatch(f"{STAMP} .+", line), line


def test_log_format_json_writes_one_object_per_line_with_its_event(nodes, tmp_path):
    proxy = nodes.proxy("-log-format", "json")
    server = nodes.server("100", "111", proxy.port, "-log-format", "json")
    payload = 'a\nb\u2028"}' + PAYLOAD  # a newline, a line separator, a quote
    packets = write_packets(tmp_path, "p.json", [
        {"type": "0", "srcid": "1", "privPoliId": "111", "payload": payload}])
    done = run("client.py", "-id", 1, "-revproc", proxy.port, "-pkt", packets,
               "-log-format", "json")
    assert (done.returncode, done.stderr) == (0, ""), done
    client_lines = [json.loads(line) for line in done.stdout.splitlines()]
    for line in client_lines:
        assert re.fullmatch(STAMP, line.pop("ts")) and line.pop("level") == "info"
    shown, digest = protocol.show(payload), sha1(payload)
    assert client_lines == [
        {"event": "sent", "payload": shown, "policy": "111",
         "proxy": f"127.0.0.1:{proxy.port}",
         "message": f"Sending message {shown} to privacy policy 111 through reverse proxy "
                    f"running on port {proxy.port}"},
        {"event": "answer", "server": "100", "payload": digest,
         "proxy": f"127.0.0.1:{proxy.port}",
         "message": f"Receiving a response from the server 100 payload: {digest}"},
        {"event": "verified", "server": "100", "payload": digest,
         "proxy": f"127.0.0.1:{proxy.port}", "message": "Hash of payload is correct"}]
    proxy.wait_for(re.escape(f"Forwarding a data message to client id 1 payload: {digest}"))
    assert server.stop() == 0
    assert proxy.stop() == 0
    for node, ready in ((proxy, "Running the reverse proxy on port"),
                        (server, "Listening on port")):
        objects = [json.loads(line) for line in node.lines]
        for line in objects:
            assert re.fullmatch(STAMP, line["ts"]), line
            assert line["level"] in ("info", "warning", "error"), line
            assert isinstance(line["event"], str) and isinstance(line["message"], str)
        assert [(line["port"], line["message"]) for line in objects
                if line["event"] == "listening"] == [(node.port, f"{ready} {node.port}")]
    assert f"Received a data message from client 1 privacy policy 111 payload: {shown}" in [
        json.loads(line)["message"] for line in proxy.lines]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_quiet_silences_the_per_packet_lines_in_both_formats(nodes, log_format):
    proxy = nodes.proxy("-quiet", "-log-format", log_format)
    server = nodes.server("100", "111", proxy.port, "-quiet", "-log-format", log_format)
    done = run("client.py", "-id", 1, "-revproc", proxy.port, "-pkt", "pktfiles/1.json")
    assert done.returncode == 0, done
    assert server.stop() == 0
    assert proxy.stop() == 0
    assert proxy.count("Reverse proxy stopped") == 1 and server.count("Server stopped") == 1
    assert proxy.count("data message") == 0 and server.count("client 1 payload") == 0
