"""stats.py: the stats listener in the test process, on loopback port 0, fed by fake
snapshots; and its page in a real headless Chromium."""

import http.client
import json
import os
import re
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
from conftest import WAIT

CODES = ("ACK", "BAD_FRAME", "FRAME_TOO_LARGE", "BAD_MESSAGE", "NO_SERVER",
         "UPSTREAM_FAILED", "TIMEOUT", "OVERLOADED", "UNAUTHORIZED")
EVIL = '<script>alert("x")</script>'


def server(server_id, port, state="up", served=0, next_=False):
    window = metrics.LatencyWindow()
    if served:
        window.record(0.0011, 1.0)
    return {"id": server_id, "address": f"127.0.0.1:{port}", "state": state, "weight": 1,
            "served": served, "in_flight": 0, "failures": 0 if state == "up" else 2,
            "latency_ms": {"p50": 1.125 if served else None,
                           "p99": 1.2475 if served else None},
            "latency_histogram": window.histogram(), "next": next_}


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
                server("200", 2115, served=served[2], next_=True),
                server("400", 2120, "down" if "400" in down else "up", served[3])]}]}


@pytest.fixture
def serve():
    """``serve(snapshot_fn, host="127.0.0.1", **options)`` starts a StatsServer on
    port 0; every one started is closed at the end."""
    started = []

    def start(snapshot_fn, host="127.0.0.1", **options):
        stats_server = stats.StatsServer((host, 0), snapshot_fn, **options)
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


def test_healthz_is_ok_then_503_while_draining(serve):
    draining = threading.Event()
    stats_server = serve(lambda: make_snapshot(draining=draining.is_set()))
    assert request(stats_server, "GET", "/healthz")[::2] == (200, b"ok\n")
    draining.set()
    assert request(stats_server, "GET", "/healthz")[::2] == (503, b"draining\n")


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
    assert ">1.13 ms<" in page and ">1.25 ms<" in page and ">\u2013<" not in page


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


def test_a_failing_snapshot_is_500_and_one_log_line(serve):
    lines = []

    def broken():
        raise RuntimeError("registry gone")

    stats_server = serve(broken, log=lines.append)
    status, _, body = request(stats_server, "GET", "/metrics")
    assert status == 500
    assert body == b"stats unavailable: the proxy could not take a snapshot\n"
    assert lines == [f"Stats on {stats_server.url}",
                     "stats: cannot serve /metrics: RuntimeError: registry gone"]
    assert request(stats_server, "GET", "/nope")[0] == 404  # still serving


# --- The listener -------------------------------------------------------------------

def test_port_url_and_ready_line(serve):
    lines = []
    stats_server = serve(make_snapshot, log=lines.append)
    assert stats_server.port > 0
    assert stats_server.url == f"http://127.0.0.1:{stats_server.port}/"
    assert lines == [f"Stats on http://127.0.0.1:{stats_server.port}/"]


def ipv6_loopback():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_ipv6_loopback(serve):
    stats_server = serve(make_snapshot, host="::1")
    assert stats_server.url == f"http://[::1]:{stats_server.port}/"
    assert request(stats_server, "GET", "/healthz", host="::1")[::2] == (200, b"ok\n")


def test_busy_port_raises_oserror(serve):
    stats_server = serve(make_snapshot)
    with pytest.raises(OSError):
        stats.StatsServer(("127.0.0.1", stats_server.port), make_snapshot)


def test_a_silent_client_is_dropped_after_the_read_timeout(serve):
    stats_server = serve(make_snapshot, read_timeout=0.2)
    with socket.create_connection(("127.0.0.1", stats_server.port), timeout=WAIT) as silent:
        assert silent.recv(1) == b""  # closed by the server, well before WAIT


def test_connections_past_the_cap_get_503(serve):
    stats_server = serve(make_snapshot, max_connections=2, read_timeout=WAIT)
    held = [socket.create_connection(("127.0.0.1", stats_server.port), timeout=WAIT)
            for _ in range(2)]
    try:
        with socket.create_connection(("127.0.0.1", stats_server.port), timeout=WAIT) as third:
            answer = b""
            while chunk := third.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.0 503 Service Unavailable\r\n")
        assert answer.endswith(b"\r\n\r\ntoo many stats readers\n")
    finally:
        for sock in held:
            sock.close()
    # The slots come back as the two handlers see their connections close.
    deadline = time.monotonic() + WAIT
    while request(stats_server, "GET", "/healthz")[0] != 200:
        assert time.monotonic() < deadline, "the connection slots did not come back"
        threading.Event().wait(0.01)


def test_close_is_safe_twice_and_before_start():
    stats_server = stats.StatsServer(("127.0.0.1", 0), make_snapshot)
    stats_server.close()
    stats_server.close()
    started = stats.StatsServer(("127.0.0.1", 0), make_snapshot)
    started.start()
    port = started.port
    started.close()
    started.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()


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
    stats_server = serve(snapshots)
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

    stats_server = serve(first_only)
    dom = chromium(tmp_path, stats_server.url, "--dump-dom")
    assert len(calls) >= 2
    assert re.search(r'class="status bad"[^>]*>stats unavailable \(HTTP 500\); retrying<', dom)
    assert '<body class="stale">' in dom
    assert re.findall(r'data-f="served">([\d,]+)<', dom) == ["5", "4", "7", "3"]


@needs_chromium
@pytest.mark.parametrize("size", ["1280,700", "390,1200"])
def test_page_screenshot(serve, tmp_path, size):
    stats_server = serve(Changing())
    shot = tmp_path / f"stats-{size.replace(',', 'x')}.png"
    chromium(tmp_path, stats_server.url, f"--window-size={size}", f"--screenshot={shot}")
    width, height = (int(n) for n in size.split(","))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (
        width, height)
