"""The proxy's stats (README.md, "Observability") against known traffic: a
ReverseProxy in a thread of the test, its StatsServer, scripted servers; every
endpoint checked with exact counts, also after a server fails and leaves; what a
snapshot costs the loop thread (nothing for /healthz, a copy for the rest, nothing for
a reader that gave up); and the page in a real headless Chromium while traffic goes
through the proxy."""

import http.client
import json
import re
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import metrics
import protocol
import stats
from conftest import WAIT, Wire, sha1, wait_until
from test_stats import chromium, needs_chromium


@pytest.fixture
def observed(proxies):
    """``observed(**options)`` -> (proxy, get): a proxy in this process with its stats
    listener; ``get(path)`` returns (status, body text)."""
    boards = []

    def make(**options):
        proxy = proxies(**options)
        board = stats.StatsServer(("127.0.0.1", 0), proxy.stats, lambda: proxy.stopping)
        board.start()
        boards.append(board)

        def get(path):
            conn = http.client.HTTPConnection("127.0.0.1", board.port, timeout=WAIT)
            try:
                conn.request("GET", path)
                answer = conn.getresponse()
                return answer.status, answer.read().decode("utf-8")
            finally:
                conn.close()
        return proxy, get, board

    yield make
    for board in boards:
        board.close()


def exchange(port, frames):
    """Send frames (messages, or bytes for a raw body) on one connection; return the
    answers in order."""
    wire = Wire(port)
    try:
        for frame in frames:
            if isinstance(frame, bytes):
                wire.send_body(frame)
            else:
                wire.send(frame)
        return [wire.receive() for _ in frames]
    finally:
        wire.close()


def samples(text):
    """Prometheus text -> {(name, frozenset(labels.items())): value}."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_every_endpoint_counts_known_traffic_exactly(observed, fake_servers):
    proxy, get, _ = observed()
    a, b, c = fake_servers("A"), fake_servers("B"), fake_servers("C")
    a.register(proxy.port, "111")
    b.register(proxy.port, "111")
    c.register(proxy.port, 222)
    frames = ([protocol.data("c1", "111", f"x{i}") for i in range(10)]
              + [protocol.data("c1", "222", f"y{i}") for i in range(3)]
              + [protocol.data("c1", "333", "z"), protocol.data("c1", 333, "z"), b"{not json"])
    answers = exchange(proxy.port, frames)
    assert [answer.get("code", "ACK") for answer in answers] == (
        ["ACK"] * 13 + ["NO_SERVER", "NO_SERVER", "BAD_MESSAGE"])

    status, body = get("/stats.json")
    assert status == 200
    document = json.loads(body)
    assert document["totals"]["packets"] == 15
    assert document["totals"]["answers"] == {
        "ACK": 13, "BAD_FRAME": 0, "FRAME_TOO_LARGE": 0, "BAD_MESSAGE": 1, "NO_SERVER": 2,
        "UPSTREAM_FAILED": 0, "TIMEOUT": 0, "OVERLOADED": 0, "UNAUTHORIZED": 0, "OTHER": 0}
    assert document["totals"]["failovers"] == 0
    assert document["totals"]["registrations"] == {"registered": 3, "refused": 0}
    assert document["draining"] is False and document["uptime_s"] > 0
    assert document["connections_by_kind"]["server"] == 3  # one data connection each
    policies = {p["policy"]: p for p in document["policies"]}
    assert list(policies) == ["111", "222"]
    assert [(s["id"], s["address"], s["state"], s["weight"], s["served"], s["in_flight"],
             s["failures"], s["next"]) for s in policies["111"]["servers"]] == [
        ("A", f"127.0.0.1:{a.port}", "up", 1, 5, 0, 0, True),
        ("B", f"127.0.0.1:{b.port}", "up", 1, 5, 0, 0, False)]
    assert policies["222"]["balance"] == "roundrobin"
    assert [s["served"] for s in policies["222"]["servers"]] == [3]
    for server in policies["111"]["servers"]:
        assert server["latency_histogram"]["count"] == 5
        assert 0 < server["latency_ms"]["p50"] <= server["latency_ms"]["p99"] < 1000

    status, text = get("/metrics")
    assert status == 200
    values = samples(text)
    assert values[("rproxy_packets_total", frozenset({"policy": "111", "server": "A"}.items()))] == 5
    assert values[("rproxy_packets_total", frozenset({"policy": "222", "server": "C"}.items()))] == 3
    assert values[("rproxy_answers_total", frozenset({"code": "NO_SERVER"}.items()))] == 2
    assert values[("rproxy_answers_total", frozenset({"code": "ACK"}.items()))] == 13
    assert values[("rproxy_registrations_total", frozenset({"result": "registered"}.items()))] == 3
    assert values[("rproxy_server_up", frozenset({"policy": "111", "server": "B"}.items()))] == 1
    assert values[("rproxy_upstream_latency_seconds_count",
                   frozenset({"policy": "111", "server": "B"}.items()))] == 5
    assert values[("rproxy_failovers_total", frozenset())] == 0

    assert get("/healthz") == (200, "ok\n")
    status, page = get("/")
    assert status == 200 and "<html" in page and ">A<" in page


def test_a_failed_server_shows_down_with_its_failures_and_the_failovers(observed,
                                                                        fake_servers):
    proxy, get, _ = observed(check_interval=30)
    a, b = fake_servers("A"), fake_servers("B")
    session = a.register(proxy.port, "111", heartbeat=60)
    b.register(proxy.port, "111")
    assert [x["srcid"] for x in exchange(proxy.port, [protocol.data("c", "111", "1"),
                                                      protocol.data("c", "111", "2")])] == ["A", "B"]
    a.close()  # killed: its data port refuses, its session is still open
    answers = exchange(proxy.port, [protocol.data("c", "111", "3")])
    assert answers[0]["srcid"] == "B"  # A failed, the frame went to B
    document = json.loads(get("/stats.json")[1])
    [policy] = document["policies"]
    assert [(s["id"], s["state"], s["served"], s["failures"]) for s in policy["servers"]] == [
        ("A", "down", 1, 1), ("B", "up", 2, 0)]
    assert document["totals"]["failovers"] == 1
    values = samples(get("/metrics")[1])
    assert values[("rproxy_server_up", frozenset({"policy": "111", "server": "A"}.items()))] == 0
    assert values[("rproxy_failures_total", frozenset({"policy": "111", "server": "A"}.items()))] == 1
    assert values[("rproxy_failovers_total", frozenset())] == 1
    session.close()  # its session ends: it has left
    wait_until(lambda: json.loads(get("/stats.json")[1])["policies"][0]["servers"][0]["state"]
               == "left", "server A shown as left")


def test_healthz_is_503_while_the_proxy_drains(observed, fake_servers):
    proxy, get, _ = observed()
    release = threading.Event()

    def slow(message, count):
        release.wait(WAIT)
        return protocol.ack_for("S", message)

    fake_servers("S", slow).register(proxy.port, "111")
    wire = Wire(proxy.port)
    wire.send(protocol.data("c", "111", "held"))
    wait_until(lambda: json.loads(get("/stats.json")[1])["policies"][0]["servers"][0]
               ["in_flight"] == 1, "the frame in flight")
    assert get("/healthz")[0] == 200
    stopper = threading.Thread(target=proxy.stop)
    stopper.start()
    wait_until(lambda: get("/healthz")[0] == 503, "healthz 503 while draining")
    assert get("/healthz")[1] == "draining\n"
    release.set()
    assert wire.receive()["payload"] == sha1("held")  # answered before the proxy stopped
    stopper.join(WAIT)
    wire.close()


def count_snapshots(proxy, monkeypatch):
    """The list that gets one item each time the loop thread takes a snapshot."""
    taken = []
    real = proxy._stats_now
    monkeypatch.setattr(proxy, "_stats_now", lambda: taken.append(1) or real())
    return taken


def block_the_loop(proxy):
    """Hold the proxy's loop thread; returns the Event that lets it go."""
    blocked, release = threading.Event(), threading.Event()
    proxy.loop.post(lambda: (blocked.set(), release.wait(WAIT)))
    assert blocked.wait(WAIT)
    return release


def test_healthz_answers_while_the_loop_is_busy_and_takes_no_snapshot(observed,
                                                                     monkeypatch):
    proxy, get, _ = observed()
    taken = count_snapshots(proxy, monkeypatch)
    release = block_the_loop(proxy)
    try:
        assert get("/healthz") == (200, "ok\n")  # the loop could not have answered
    finally:
        release.set()
    assert taken == []


def test_a_snapshot_given_up_on_costs_the_loop_nothing(proxies, monkeypatch):
    proxy = proxies()
    taken = count_snapshots(proxy, monkeypatch)
    release = block_the_loop(proxy)
    try:
        for _ in range(5):
            with pytest.raises(TimeoutError):
                proxy.stats(timeout=0.05)
    finally:
        release.set()
    # Posted after the five given up on, so run after them: only this one is taken.
    assert proxy.stats()["totals"]["packets"] == 0
    assert taken == [1]


def test_the_loop_thread_only_copies_and_percentiles_are_rounded(observed, fake_servers,
                                                                monkeypatch):
    proxy, get, _ = observed()
    fake_servers("A").register(proxy.port, "111")
    exchange(proxy.port, [protocol.data("c", "111", f"x{i}") for i in range(3)])
    workers = []
    for name in ("percentiles", "histogram"):
        real = getattr(metrics.LatencyCounts, name)
        monkeypatch.setattr(metrics.LatencyCounts, name, lambda self, real=real: (
            workers.append(threading.current_thread()), real(self))[1])
    [policy] = json.loads(get("/stats.json")[1])["policies"]
    [server] = policy["servers"]
    assert server["latency_histogram"]["count"] == 3
    assert len(workers) == 2 and proxy.loop.thread not in workers
    for value in server["latency_ms"].values():
        assert value > 0 and value == round(value, 3)  # 0.001 ms, no float noise


def test_routing_goes_on_while_readers_poll_every_endpoint(observed, fake_servers):
    # The breaker's case, scaled to a test: many servers (open registration, legacy
    # SETUPs all pointing at one real server), every server with a minute of
    # latencies, and readers polling in tight loops. Before, every request cost the
    # loop a snapshot of every server and they queued behind one another: one packet
    # waited 55 s with 1000 servers and 4 /healthz pollers.
    proxy, get, _ = observed()
    fake = fake_servers("A")
    for n in range(300):
        fake.register(proxy.port, f"p{n}", server_id=f"s{n}").close()
    fake.register(proxy.port, "main").close()
    answers = exchange(proxy.port, [protocol.data("c", f"p{n}", "x") for n in range(300)])
    assert {answer["type"] for answer in answers} == {protocol.MessageType.ACK}
    stop = threading.Event()
    polls = []

    def poll(path):
        while not stop.is_set():
            polls.append(get(path)[0])

    readers = [threading.Thread(target=poll, args=(path,), daemon=True)
               for path in ("/healthz", "/healthz", "/stats.json", "/stats.json", "/metrics",
                            "/")]
    for reader in readers:
        reader.start()
    slowest = 0.0
    wire = Wire(proxy.port)
    try:
        for n in range(200):
            sent = time.monotonic()
            wire.send(protocol.data("c", "main", f"m{n}"))
            assert wire.receive()["type"] == protocol.MessageType.ACK
            slowest = max(slowest, time.monotonic() - sent)
    finally:
        wire.close()
        stop.set()
        for reader in readers:
            reader.join(WAIT)
    assert set(polls) == {200} and len(polls) >= len(readers)
    assert slowest < 2.0, f"a packet waited {slowest:.3f} s behind the stats readers"


@needs_chromium
def test_page_shows_served_counts_moving_with_traffic(observed, fake_servers, tmp_path):
    proxy, get, board = observed()
    for server_id in ("100", "300"):
        fake_servers(server_id).register(proxy.port, "111")
    sent = []

    def with_traffic():
        # Every poll of the page is preceded by 4 more packets through the proxy.
        exchange(proxy.port, [protocol.data("c", "111", f"p{len(sent) + i}") for i in range(4)])
        sent.extend(range(4))
        return proxy.stats()

    # max_age 0: Chromium's virtual time makes the page's polls come at once.
    traffic_board = stats.StatsServer(("127.0.0.1", 0), with_traffic,
                                      lambda: proxy.stopping, max_age=0)
    traffic_board.start()
    try:
        dom = chromium(tmp_path, traffic_board.url, "--dump-dom")
    finally:
        traffic_board.close()
    polls = len(sent) // 4
    assert polls >= 3  # the first render, then at least two refreshes
    shown = [int(count.replace(",", "")) for count in
             re.findall(r'data-f="served">([\d,]+)<', dom)]
    # The page shows what the last poll it finished saw (a later one may have been on
    # its way when Chromium took the page): far more than the first render's 2 + 2,
    # split evenly by the round robin.
    total = sum(shown)
    assert total in (len(sent), len(sent) - 4) and total >= 12
    assert shown == [total // 2, total // 2]
