"""stats.py: the stats listener in the test process, on loopback port 0, fed by fake
snapshots; and its page in a real headless Chromium."""

import errno
import hashlib
import http.client
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import metrics
import stats
from conftest import CODES, WAIT, ipv6_loopback, wait_until

EVIL = '<script>alert("x")</script>'


def server(server_id, port, state="up", served=0, next_=False, p99=1.2475):
    window = metrics.LatencyWindow()
    if served:
        window.record(0.0011, 1.0)
    return {"id": server_id, "address": f"127.0.0.1:{port}", "state": state, "weight": 1,
            "served": served, "in_flight": 0, "failures": 0 if state == "up" else 2,
            "latency_ms": {"p50": 1.125 if served else None,
                           "p99": p99 if served else None},
            "latency_histogram": window.read(1.0).histogram(), "next": next_}


def make_snapshot(served=(5, 4, 7, 3), down=("400",), draining=False, extra_server=None):
    """The demo's registry: policies 111 (servers 100, 300) and 222 (200, 400)."""
    servers_111 = [server("100", 2105, served=served[0], next_=True),
                   server("300", 2110, "down" if "300" in down else "up", served[1])]
    if extra_server is not None:
        servers_111.append(extra_server)
    return {
        "uptime_s": 3725.5, "draining": draining, "connections": 9,
        "connections_by_kind": {"client": 3, "server": 4, "registration": 2},
        "totals": {"packets": sum(served), "answers": {code: 0 for code in CODES} | {
            "ACK": sum(served) - 1, "TIMEOUT": 1}, "failovers": 2,
            "registrations": {"registered": 4, "refused": 1}},
        "policies": [
            {"policy": "111", "balance": "roundrobin", "servers": servers_111},
            {"policy": "222", "balance": "roundrobin", "servers": [
                server("200", 2115, served=served[2], next_=True, p99=10000.0),
                server("400", 2120, "down" if "400" in down else "up", served[3])]}]}


@pytest.fixture
def serve():
    """``serve(snapshot_fn, host="127.0.0.1", draining=f, **options)`` starts a
    StatsServer on port 0 (never draining unless ``draining`` says so); every one
    started is closed at the end."""
    started = []

    def start(snapshot_fn, host="127.0.0.1", draining=lambda: False, **options):
        stats_server = stats.StatsServer((host, 0), snapshot_fn, draining, **options)
        started.append(stats_server)
        stats_server.start()
        return stats_server

    yield start
    for stats_server in started:
        stats_server.close()


def request(stats_server, method, path, body=None, host="127.0.0.1"):
    """One HTTP request; returns ``(status, headers dict, body bytes)``."""
    conn = http.client.HTTPConnection(host, stats_server.port, timeout=WAIT)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


# --- Routes -------------------------------------------------------------------------

def test_stats_json_is_the_snapshot(serve):
    snapshot = make_snapshot()
    stats_server = serve(lambda: snapshot)
    status, headers, body = request(stats_server, "GET", "/stats.json")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    assert json.loads(body) == snapshot


def test_metrics_is_prometheus_text(serve):
    stats_server = serve(make_snapshot)
    status, headers, body = request(stats_server, "GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {family.name: family
                for family in text_string_to_metric_families(body.decode())}
    assert {(sample.labels["server"], sample.value)
            for sample in families["rproxy_server_up"].samples} == {
        ("100", 1), ("300", 1), ("200", 1), ("400", 0)}
    assert body.decode() == metrics.render_prometheus(make_snapshot())


def test_healthz_is_ok_then_503_while_draining_and_takes_no_snapshot(serve):
    draining = threading.Event()
    calls = []
    stats_server = serve(lambda: calls.append(1) or make_snapshot(),
                         draining=draining.is_set)
    assert request(stats_server, "GET", "/healthz")[::2] == (200, b"ok\n")
    draining.set()
    assert request(stats_server, "GET", "/healthz")[::2] == (503, b"draining\n")
    assert request(stats_server, "HEAD", "/healthz")[0] == 503
    assert calls == []


def test_page_shows_every_server_in_rotation_order(serve):
    stats_server = serve(make_snapshot)
    status, headers, body = request(stats_server, "GET", "/")
    page = body.decode()
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    rows = re.findall(r'<tr class="st-(\w+)( next)?" data-server="(\w+)"', page)
    assert rows == [("up", " next", "100"), ("up", "", "300"),
                    ("up", " next", "200"), ("down", "", "400")]
    assert page.count("\u25b6 next") == 2
    assert '<span class="badge down" data-f="state">DOWN</span>' in page
    assert re.findall(r'data-f="served">([\d,]+)<', page) == ["5", "4", "7", "3"]
    assert re.findall(r'data-f="p99">([^<]+)<', page) == [
        "1.25 ms", "1.25 ms", "\u2265 10000 ms", "1.25 ms"]  # 10 s: the largest bucket
    assert ">1.13 ms<" in page and ">\u2013<" not in page


def test_page_loads_nothing_from_elsewhere(serve):
    stats_server = serve(make_snapshot)
    status, headers, body = request(stats_server, "GET", "/")
    page = body.decode()
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "@import" not in page and "url(" not in page
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy


def test_server_ids_are_escaped_everywhere(serve):
    snapshot = make_snapshot(extra_server=server(EVIL, 2125, served=1))
    snapshot["policies"][1]["policy"] = EVIL
    stats_server = serve(lambda: snapshot)
    page = request(stats_server, "GET", "/")[2].decode()
    assert EVIL not in page
    assert "alert" in page
    # The server id and the policy id, each in an attribute and in a text.
    assert page.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;") == 4
    assert page.count("<script>") == 1  # the page's own


def test_unknown_path_is_404(serve):
    stats_server = serve(make_snapshot)
    for path in ("/nope", "/metrics/", "/stats.json.bak", "/../etc/passwd"):
        status, _, body = request(stats_server, "GET", path)
        assert status == 404, path
        assert body.startswith(b"no such page")


def test_query_strings_are_ignored(serve):
    stats_server = serve(make_snapshot)
    assert request(stats_server, "GET", "/healthz?probe=1")[::2] == (200, b"ok\n")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"])
def test_every_method_but_get_and_head_is_405(serve, method):
    calls = []
    stats_server = serve(lambda: calls.append(1) or make_snapshot())
    status, headers, body = request(stats_server, method, "/", body=b"x=1")
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"
    assert body == f"method {method} not allowed: use GET or HEAD\n".encode()
    assert calls == []


@pytest.mark.parametrize("path", ["/", "/stats.json", "/metrics", "/healthz", "/nope"])
def test_head_sends_the_headers_of_get_without_a_body(serve, path):
    stats_server = serve(make_snapshot)
    get_status, get_headers, get_body = request(stats_server, "GET", path)
    status, headers, body = request(stats_server, "HEAD", path)
    assert status == get_status
    assert headers["Content-Length"] == str(len(get_body)) == get_headers["Content-Length"]
    assert headers["Content-Type"] == get_headers["Content-Type"]
    assert body == b""


class Records(logging.Handler):
    """The records of a logger of its own: ``(level, event, fields, message)``."""

    def __init__(self):
        super().__init__()
        self.logger = logging.getLogger(f"test-stats-{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        self.seen = []

    def emit(self, record):
        self.seen.append((record.levelname, getattr(record, "event", None),
                          getattr(record, "fields", None), record.getMessage()))


def test_a_failing_snapshot_is_500_and_one_log_line_for_the_requests_that_share_it(serve):
    records = Records()
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("registry gone")

    stats_server = serve(broken, logger=records.logger, max_age=WAIT)
    for path in ("/metrics", "/stats.json", "/"):
        status, _, body = request(stats_server, "GET", path)
        assert status == 500
        assert body == b"stats unavailable: the proxy could not take a snapshot\n"
    assert calls == [1]  # the failure is shared, not asked for again at once
    assert records.seen == [
        ("INFO", "stats_listening", {"url": stats_server.url}, f"Stats on {stats_server.url}"),
        ("WARNING", "stats_unavailable",
         {"path": "/metrics", "error": "RuntimeError", "reason": "registry gone"},
         "stats: cannot serve /metrics: RuntimeError: registry gone")]
    assert request(stats_server, "GET", "/nope")[0] == 404  # still serving


# --- The listener -------------------------------------------------------------------

def test_port_url_and_ready_line(serve):
    records = Records()
    stats_server = serve(make_snapshot, logger=records.logger)
    assert stats_server.port > 0
    assert stats_server.url == f"http://127.0.0.1:{stats_server.port}/"
    url = f"http://127.0.0.1:{stats_server.port}/"
    assert records.seen == [("INFO", "stats_listening", {"url": url}, f"Stats on {url}")]


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_ipv6_loopback(serve):
    stats_server = serve(make_snapshot, host="::1")
    assert stats_server.url == f"http://[::1]:{stats_server.port}/"
    assert request(stats_server, "GET", "/healthz", host="::1")[::2] == (200, b"ok\n")


def test_busy_port_raises_oserror(serve):
    stats_server = serve(make_snapshot)
    with pytest.raises(OSError):
        stats.StatsServer(("127.0.0.1", stats_server.port), make_snapshot, never)


def never():
    return False


def connect(stats_server):
    return socket.create_connection(("127.0.0.1", stats_server.port), timeout=WAIT)


def receive_all(sock):
    """Every byte ``sock`` receives until the server closes it (each read bounded)."""
    answer = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return answer
        answer += chunk


def raw(stats_server, data):
    """Send ``data`` on a fresh connection; return what comes back until the close."""
    with connect(stats_server) as sock:
        sock.sendall(data)
        return receive_all(sock)


def test_a_silent_client_gets_408_at_the_request_deadline(serve):
    stats_server = serve(make_snapshot, request_timeout=0.2)
    with connect(stats_server) as silent:
        answer = receive_all(silent)  # well before WAIT
    assert answer.startswith(b"HTTP/1.0 408 Request Timeout\r\n")
    assert answer.endswith(b"\r\n\r\nthe request did not come whole within 0.2 s\n")


def test_a_request_trickling_in_gets_408_at_the_deadline_of_the_whole_request(serve):
    # A slowloris: a byte at a time, each well within any per-read timeout. The
    # deadline counts from the connection, not from the last byte.
    stats_server = serve(make_snapshot, request_timeout=0.5)
    stop = threading.Event()
    with connect(stats_server) as slow:
        slow.sendall(b"GET /healthz HTTP/1.0\r\nX-Slow: ")

        def trickle():
            try:
                while not stop.wait(0.05):  # the attacker's pace, not a wait on the server
                    slow.send(b"x")
            except OSError:
                pass

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        try:
            answer = receive_all(slow)
        finally:
            stop.set()
            thread.join(WAIT)
    assert answer.startswith(b"HTTP/1.0 408 Request Timeout\r\n")


def test_junk_without_a_line_end_gets_408_at_the_deadline(serve):
    stats_server = serve(make_snapshot, request_timeout=0.3)
    answer = raw(stats_server, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # TLS
    assert answer.startswith(b"HTTP/1.0 408 Request Timeout\r\n")


def test_an_http_0_9_request_is_answered_at_once_without_waiting_for_headers(serve):
    # HTTP/0.9 has no headers: its request line is the whole request. The deadline
    # is far beyond every read of the test, so only an answer at once passes.
    stats_server = serve(make_snapshot, request_timeout=3 * WAIT)
    assert raw(stats_server, b"GET /healthz\r\n") == b"ok\n"  # 0.9: the body alone
    # A 0.9 request other than GET is refused at once (as a 0.9 answer: no status line).
    assert raw(stats_server, b"HEAD /healthz\r\n") == b"400 Bad HTTP/0.9 request type ('HEAD')\n"


def test_a_request_line_http_server_cannot_read_is_refused_in_one_line_of_text(serve):
    # http.server answers what it cannot read as HTTP/0.9 (no status line): the
    # body, at least, is one line of text and not an HTML page.
    stats_server = serve(make_snapshot)
    assert raw(stats_server, b"GET / HTTP/2.0\r\n\r\n") == b"505 Invalid HTTP version (2.0)\n"


@pytest.mark.parametrize("length, status", [(stats.LINE_LIMIT, 404), (stats.LINE_LIMIT + 1, 414)])
def test_the_request_line_may_be_8_kib(serve, length, status):
    stats_server = serve(make_snapshot)
    line = b"GET /" + b"a" * (length - len(b"GET / HTTP/1.0\r\n")) + b" HTTP/1.0\r\n"
    assert len(line) == length
    answer = raw(stats_server, line + b"\r\n")
    assert answer.startswith(f"HTTP/1.0 {status} ".encode())
    if status == 414:
        assert answer.endswith(b"\r\n\r\nrequest line longer than 8192 bytes\n")


@pytest.mark.parametrize("length, status", [(stats.LINE_LIMIT, 200), (stats.LINE_LIMIT + 1, 431)])
def test_each_header_line_may_be_8_kib(serve, length, status):
    stats_server = serve(make_snapshot)
    header = b"X-Big: " + b"b" * (length - len(b"X-Big: \r\n")) + b"\r\n"
    assert len(header) == length
    answer = raw(stats_server, b"GET /healthz HTTP/1.0\r\n" + header + b"\r\n")
    assert answer.startswith(f"HTTP/1.0 {status} ".encode())
    if status == 431:
        assert answer.endswith(b"\r\n\r\nheader line longer than 8192 bytes\n")


@pytest.mark.parametrize("extra, status", [(0, 200), (1, 431)])
def test_the_request_head_may_be_32_kib(serve, extra, status):
    stats_server = serve(make_snapshot)
    request_line = b"GET /healthz HTTP/1.0\r\n"
    line = b"X-H: " + b"h" * 8000 + b"\r\n"
    headers = [line] * 4
    last = stats.HEAD_LIMIT + extra - len(request_line) - 4 * len(line) - len(b"\r\n")
    headers.append(b"X-L: " + b"l" * (last - len(b"X-L: \r\n")) + b"\r\n")
    head = request_line + b"".join(headers) + b"\r\n"
    assert len(head) == stats.HEAD_LIMIT + extra
    answer = raw(stats_server, head)
    assert answer.startswith(f"HTTP/1.0 {status} ".encode())
    if status == 431:
        assert answer.endswith(b"\r\n\r\nrequest line and headers longer than 32768 bytes\n")


def test_a_new_connection_takes_the_slot_of_the_oldest_one_still_sending(serve):
    stats_server = serve(make_snapshot, max_connections=2, request_timeout=3 * WAIT)
    oldest, younger = connect(stats_server), connect(stats_server)
    try:
        oldest.sendall(b"GET /heal")  # a request that has not come whole
        assert request(stats_server, "GET", "/healthz")[::2] == (200, b"ok\n")
        assert oldest.recv(1) == b""  # closed to make room, without an answer
        younger.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")  # it kept its slot
        assert receive_all(younger).endswith(b"\r\n\r\nok\n")
    finally:
        oldest.close()
        younger.close()


def test_healthz_stays_truthful_while_slow_readers_hold_every_slot(serve):
    stats_server = serve(make_snapshot, max_connections=3, request_timeout=3 * WAIT)
    slow = [connect(stats_server) for _ in range(3)]
    try:
        for sock in slow:
            sock.sendall(b"G")
        for _ in range(5):
            assert request(stats_server, "GET", "/healthz")[::2] == (200, b"ok\n")
        assert slow[0].recv(1) == b""
    finally:
        for sock in slow:
            sock.close()


def test_connections_past_the_cap_get_503_only_while_every_slot_is_answering(serve):
    entered = threading.Semaphore(0)
    release = threading.Event()

    def draining():
        entered.release()
        release.wait(WAIT)
        return False

    stats_server = serve(make_snapshot, draining=draining, max_connections=2)
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(
        request(stats_server, "GET", "/healthz")[::2])) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for _ in threads:
            assert entered.acquire(timeout=WAIT)  # both are being answered
        answer = raw(stats_server, b"GET /healthz HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 503 Service Unavailable\r\n")
        assert answer.endswith(b"\r\n\r\ntoo many stats readers\n")
    finally:
        release.set()
        for thread in threads:
            thread.join(WAIT)
    assert answers == [(200, b"ok\n")] * 2


def test_a_slot_whose_answer_is_not_taken_in_time_goes_to_a_new_connection(
        serve, monkeypatch):
    # Readers that ask and never read hold their slots in the answer: past
    # ANSWER_GRACE, /healthz gets one of them all the same.
    monkeypatch.setattr(stats, "ANSWER_GRACE", 0.1)
    entered = threading.Semaphore(0)
    release = threading.Event()
    calls = []

    def draining():
        calls.append(1)
        if len(calls) <= 2:  # the first two answers never get out
            entered.release()
            release.wait(WAIT)
        return False

    stats_server = serve(make_snapshot, draining=draining, max_connections=2)

    def stuck():
        try:
            request(stats_server, "GET", "/healthz")
        except (OSError, http.client.HTTPException):
            pass  # its slot was taken: closed under it

    threads = [threading.Thread(target=stuck) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for _ in threads:
            assert entered.acquire(timeout=WAIT)
        answer = wait_until(
            lambda: (lambda got: got if not got.startswith(b"HTTP/1.0 503") else None)(
                raw(stats_server, b"GET /healthz HTTP/1.0\r\n\r\n")),
            "a slot freed from an answer not taken")
        assert answer.startswith(b"HTTP/1.0 200 OK\r\n") and answer.endswith(b"\r\n\r\nok\n")
    finally:
        release.set()
        for thread in threads:
            thread.join(WAIT)


def test_the_listen_backlog_holds_a_burst_of_300_connections():
    # Not started: nothing accepts, so every connection must wait in the backlog.
    # With socketserver's default of 5, most connects would wait for SYN retries.
    stats_server = stats.StatsServer(("127.0.0.1", 0), make_snapshot, never)
    socks = [socket.socket() for _ in range(300)]
    try:
        for sock in socks:
            sock.setblocking(False)
            assert sock.connect_ex(("127.0.0.1", stats_server.port)) in (
                0, errno.EINPROGRESS)
        waiting = set(socks)
        deadline = time.monotonic() + WAIT
        while waiting:
            left = deadline - time.monotonic()
            assert left > 0, f"{len(waiting)} of 300 connects did not complete"
            _, writable, _ = select.select([], list(waiting), [], left)
            for sock in writable:
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                waiting.discard(sock)
    finally:
        for sock in socks:
            sock.close()
        stats_server.close()


def test_close_is_safe_twice_and_before_start():
    stats_server = stats.StatsServer(("127.0.0.1", 0), make_snapshot, never)
    stats_server.close()
    stats_server.close()
    started = stats.StatsServer(("127.0.0.1", 0), make_snapshot, never)
    started.start()
    port = started.port
    started.close()
    started.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()


# --- Shared snapshots ---------------------------------------------------------------

class Counted:
    """A snapshot callable that counts its calls and the most of them running at
    once; ``hold`` makes each call wait until ``release`` is set."""

    def __init__(self, hold=False, fail=False):
        self.calls = 0
        self.running = 0
        self.most = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self.hold = hold
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            self.calls += 1
            self.running += 1
            self.most = max(self.most, self.running)
        self.entered.set()
        if self.hold:
            self.release.wait(WAIT)
        with self._lock:
            self.running -= 1
        if self.fail:
            raise RuntimeError("loop stalled")
        return make_snapshot(served=(self.calls, 4, 7, 3))


def test_requests_within_max_age_share_one_snapshot(serve):
    snapshots = Counted()
    stats_server = serve(snapshots, max_age=3 * WAIT)
    bodies = [request(stats_server, "GET", path)[2]
              for path in ("/stats.json", "/metrics", "/", "/stats.json", "/metrics")]
    assert snapshots.calls == 1
    assert bodies[0] == bodies[3] and bodies[1] == bodies[4]  # rendered once, too
    assert json.loads(bodies[0])["policies"][0]["servers"][0]["served"] == 1


def test_a_costly_snapshot_is_served_ten_times_as_long_as_it_took():
    # Taking and rendering hold the interpreter's lock that routing needs: a large
    # registry's snapshot is kept for at least its cost / COST_SHARE (a tenth).
    now = [0.0]
    taken = []

    def take():
        taken.append(now[0])
        now[0] += 0.2  # a snapshot that takes 0.2 s (2,000 servers, say)
        return make_snapshot()

    snapshots = stats._Snapshots(take, 0.5, lambda path, exc: None, clock=lambda: now[0])
    route = stats._ROUTES["/stats.json"]
    assert snapshots.answer(route, "/stats.json")[0] == 200
    for moment in (0.8, 1.9):  # past max_age, within 0.2 / 0.1 = 2 s of the first
        now[0] = moment
        snapshots.answer(route, "/stats.json")
    assert taken == [0.0]
    now[0] = 2.1
    snapshots.answer(route, "/stats.json")
    assert taken == [0.0, 2.1]


def test_with_max_age_0_each_request_gets_a_snapshot_taken_after_it_came(serve):
    snapshots = Counted()
    stats_server = serve(snapshots, max_age=0)
    served = [json.loads(request(stats_server, "GET", "/stats.json")[2])
              ["policies"][0]["servers"][0]["served"] for _ in range(3)]
    assert served == [1, 2, 3]


def test_one_snapshot_at_a_time_and_the_requests_that_wait_share_it(serve):
    snapshots = Counted(hold=True)
    stats_server = serve(snapshots, max_age=3 * WAIT)
    answers = []
    first = threading.Thread(target=lambda: answers.append(
        request(stats_server, "GET", "/stats.json")))
    first.start()
    assert snapshots.entered.wait(WAIT)
    others = [threading.Thread(target=lambda: answers.append(
        request(stats_server, "GET", "/stats.json"))) for _ in range(5)]
    for thread in others:
        thread.start()
    snapshots.release.set()
    for thread in [first, *others]:
        thread.join(WAIT)
    assert snapshots.calls == 1 and snapshots.most == 1
    assert len(answers) == 6 and len({(status, body) for status, _, body in answers}) == 1


def test_a_request_waits_for_a_snapshot_being_taken_at_most_snapshot_wait(serve, monkeypatch):
    monkeypatch.setattr(stats, "SNAPSHOT_WAIT", 0.2)
    snapshots = Counted(hold=True)
    stats_server = serve(snapshots)
    first = threading.Thread(target=request, args=(stats_server, "GET", "/metrics"))
    first.start()
    try:
        assert snapshots.entered.wait(WAIT)
        status, headers, body = request(stats_server, "GET", "/stats.json")
        assert (status, headers["Retry-After"]) == (503, "1")
        assert body == b"stats busy: a snapshot is still being taken; try again\n"
    finally:
        snapshots.release.set()
        first.join(WAIT)
    assert snapshots.calls == 1


# --- Bounded names ------------------------------------------------------------------

def test_shorten_keeps_names_below_128_characters():
    assert stats.shorten("100") == "100"
    assert stats.shorten("\u65e5" * 127) == "\u65e5" * 127


@pytest.mark.parametrize("length", [128, 129, 1 << 20])
def test_shorten_cuts_longer_names_to_128_characters_ending_in_a_hash(length):
    name = "s" * (length - 1) + "\u00e9"
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:32]
    assert stats.shorten(name) == "s" * 95 + "\u2026" + digest
    assert len(stats.shorten(name)) == 128


def test_shortened_names_stay_apart():
    common = "p" * 500
    assert stats.shorten(common + "1") != stats.shorten(common + "2")
    # A name kept as it is never equals a shortened one: their lengths differ.
    long_name = "q" * 200
    assert stats.shorten(stats.shorten(long_name)) != stats.shorten(long_name)


def test_every_output_shows_the_same_bounded_names(serve):
    # The breaker's case: ids as long as a frame made /metrics 220 MB a scrape.
    ids = ["x" * 400_000 + str(n) for n in range(3)]
    snapshot = make_snapshot()
    snapshot["policies"][0]["servers"] = [server(server_id, 2105 + n, served=1)
                                          for n, server_id in enumerate(ids)]
    snapshot["policies"][0]["policy"] = "y" * 300_000
    stats_server = serve(lambda: snapshot)
    shown_ids = [stats.shorten(server_id) for server_id in ids]
    policy = stats.shorten("y" * 300_000)

    text = request(stats_server, "GET", "/metrics")[2].decode()
    assert len(text) < 100_000
    labels = {(sample.labels["policy"], sample.labels["server"])
              for family in text_string_to_metric_families(text)
              if family.name == "rproxy_packets" for sample in family.samples}
    assert labels == {(policy, shown) for shown in shown_ids} | {
        ("222", "200"), ("222", "400")}

    document = json.loads(request(stats_server, "GET", "/stats.json")[2])
    assert [s["id"] for s in document["policies"][0]["servers"]] == shown_ids
    assert document["policies"][0]["policy"] == policy

    page = request(stats_server, "GET", "/")[2].decode()
    assert len(page) < 100_000
    assert [row for row in re.findall(r'data-server="([^"]*)"', page)][:3] == shown_ids
    assert snapshot["policies"][0]["servers"][0]["id"] == ids[0]  # the caller's is kept


# --- In a real browser --------------------------------------------------------------

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not found: apt-get install chromium")
# Seconds one Chromium run may take; it needs about 1.5 s here.
CHROMIUM_WAIT = 60
# Virtual milliseconds the page runs before Chromium dumps or shoots it: room for
# two polls at 1 s (virtual time stands still while a fetch is pending).
BUDGET_MS = 2500


def chromium(tmp_path, url, *options):
    """Run headless Chromium on ``url`` in a fresh profile; return its stdout. Every
    process it starts is killed at the end, and the run is bounded."""
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--hide-scrollbars",
            f"--virtual-time-budget={BUDGET_MS}", *options, url]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=CHROMIUM_WAIT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish {url} within {CHROMIUM_WAIT} s")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its helpers, if any outlived it
        except ProcessLookupError:
            pass
        proc.wait(WAIT)
    assert proc.returncode == 0, err[-2000:]
    return out


class Changing:
    """Snapshots that change with each request: the page's first render shows served
    counts (5, 4, 7, 3) with server 400 down; the first /stats.json adds 1 to each,
    the second adds 2 and brings 400 up and takes 300 down; later ones repeat the
    second, so the page settles whatever the number of polls."""

    def __init__(self):
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            self.calls += 1
            step = min(self.calls - 1, 2)
        return make_snapshot(served=tuple(n + step for n in (5, 4, 7, 3)),
                             down=("300",) if step == 2 else ("400",))


@needs_chromium
def test_page_updates_in_place_in_a_browser(serve, tmp_path):
    snapshots = Changing()
    stats_server = serve(snapshots, max_age=0)  # virtual time: polls come at once
    dom = chromium(tmp_path, stats_server.url, "--dump-dom")
    assert snapshots.calls >= 3  # the page, then at least two polls
    assert re.findall(r'data-f="served">([\d,]+)<', dom) == ["7", "6", "9", "5"]
    rows = re.findall(r'<tr class="([^"]*)" data-server="(\w+)" data-state="(\w+)"', dom)
    assert [(server_id, state) for _, server_id, state in rows] == [
        ("100", "up"), ("300", "down"), ("200", "up"), ("400", "up")]
    assert [classes.split()[0] for classes, _, _ in rows] == [
        "st-up", "st-down", "st-up", "st-up"]
    # The two rows whose state changed flash (2.8 s, longer than the budget left).
    assert ["flash" in classes.split() for classes, _, _ in rows] == [False, True, False, True]
    badges = re.findall(r'<span class="badge (\w+)" data-f="state">(\w+)</span>', dom)
    assert badges == [("up", "UP"), ("down", "DOWN"), ("up", "UP"), ("up", "UP")]
    assert re.search(r'class="status"[^>]*>live \u00b7 updated \d\d:\d\d:\d\d<', dom)
    # The script writes every value as the server's render of the same snapshot does.
    settled = stats.render_page(snapshots())
    assert shown(dom) == shown(settled)
    assert shown(dom) != shown(stats.render_page(make_snapshot()))


def shown(page):
    """Every value a page shows: its data-f fields and its answer counts."""
    return (re.findall(r'data-f="(\w+)">([^<]*)<', page),
            re.findall(r'data-code="(\w+)"[^>]*>\w+<b>([^<]*)<', page))


@needs_chromium
def test_page_says_stats_unavailable_when_a_poll_fails(serve, tmp_path):
    calls = []

    def first_only():
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("proxy gone")
        return make_snapshot()

    stats_server = serve(first_only, max_age=0)
    dom = chromium(tmp_path, stats_server.url, "--dump-dom")
    assert len(calls) >= 2
    assert re.search(r'class="status bad"[^>]*>stats unavailable \(HTTP 500\); retrying<', dom)
    assert '<body class="stale">' in dom
    assert re.findall(r'data-f="served">([\d,]+)<', dom) == ["5", "4", "7", "3"]


@needs_chromium
@pytest.mark.parametrize("size", ["1280,700", "390,1200"])
def test_page_screenshot(serve, tmp_path, size):
    stats_server = serve(Changing(), max_age=0)
    shot = tmp_path / f"stats-{size.replace(',', 'x')}.png"
    chromium(tmp_path, stats_server.url, f"--window-size={size}", f"--screenshot={shot}")
    width, height = (int(n) for n in size.split(","))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (
        width, height)


@needs_chromium
def test_long_names_wrap_instead_of_widening_the_page(tmp_path):
    # The breaker's case: at 1280 px an id of 34 characters pushed the p99 column
    # out of sight. The longest served name is 128 characters (shorten).
    snapshot = make_snapshot(extra_server=server(stats.shorten("server-" + "x" * 300), 2125,
                                                 served=1))
    snapshot["policies"][0]["policy"] = stats.shorten("policy-" + "y" * 300)
    probe = ("<script>window.addEventListener('load', function () {"
             "var over = 0, root = document.documentElement;"
             "document.querySelectorAll('.scroll').forEach(function (el) {"
             "over = Math.max(over, el.scrollWidth - el.clientWidth); });"
             "over = Math.max(over, root.scrollWidth - root.clientWidth);"
             "document.querySelectorAll('td[data-f=p99]').forEach(function (td) {"
             "over = Math.max(over, Math.ceil(td.getBoundingClientRect().right) - "
             "root.clientWidth); });"
             "document.title = 'overflow ' + over; });</script>")
    path = tmp_path / "page.html"
    path.write_text(stats.render_page(snapshot).replace("</body>", probe + "</body>"),
                    encoding="utf-8")
    dom = chromium(tmp_path, path.as_uri(), "--window-size=1280,700", "--dump-dom")
    assert "<title>overflow 0</title>" in dom
