"""metrics.py: latency windows and the Prometheus text format, pure (no sockets,
no clock: every ``now`` is made up)."""

import bisect

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import metrics
from conftest import CODES
from metrics import LATENCY_BOUNDS, WINDOW_SECONDS, LatencyWindow

MS = 1e-3


def exactly(value):
    """Equal up to float rounding of the interpolation arithmetic."""
    return pytest.approx(value, rel=1e-12, abs=0)


# --- Bucket bounds ------------------------------------------------------------------

def test_bounds_run_from_50_us_to_10_s_ten_per_decade():
    assert LATENCY_BOUNDS[0] == 50e-6
    assert LATENCY_BOUNDS[-1] == 10.0
    assert len(LATENCY_BOUNDS) == 54
    assert LATENCY_BOUNDS[:7] == (50e-6, 63e-6, 80e-6, 100e-6, 125e-6, 160e-6, 200e-6)
    ratios = [b / a for a, b in zip(LATENCY_BOUNDS, LATENCY_BOUNDS[1:])]
    assert min(ratios) > 1.2 and max(ratios) < 1.3


# --- Percentiles --------------------------------------------------------------------

def test_no_answer_gives_no_percentiles():
    assert LatencyWindow().read(1000.0).percentiles() == (None, None)


def test_percentiles_interpolate_inside_one_bucket():
    window = LatencyWindow()
    for _ in range(100):
        window.record(1.1 * MS, 500.25)  # bucket (1 ms, 1.25 ms]
    p50, p99 = window.read(500.5).percentiles()
    assert p50 == exactly(1.125 * MS)   # 1 ms + 0.25 ms x 50/100
    assert p99 == exactly(1.2475 * MS)  # 1 ms + 0.25 ms x 99/100


def test_percentiles_across_buckets():
    window = LatencyWindow()
    for _ in range(98):
        window.record(0.9 * MS, 10.0)   # bucket (0.8 ms, 1 ms]
    window.record(90 * MS, 10.0)        # bucket (80 ms, 100 ms]
    window.record(95 * MS, 10.0)
    p50, p99 = window.read(10.0).percentiles()
    assert p50 == exactly(0.8 * MS + 0.2 * MS * 50 / 98)
    assert p99 == exactly(80 * MS + 20 * MS * 1 / 2)  # rank 99: the first of the 2


def test_a_value_equal_to_a_bound_counts_in_that_bucket():
    window = LatencyWindow()
    window.record(1 * MS, 0.0)
    assert window.read(0.0).percentiles() == (exactly(0.9 * MS), exactly(0.998 * MS))
    assert window.read(0.0).histogram()["counts"][LATENCY_BOUNDS.index(1 * MS)] == 1
    assert window.read(0.0).histogram()["counts"][LATENCY_BOUNDS.index(1 * MS) - 1] == 0


def test_below_50_us_interpolates_from_zero_and_above_10_s_reports_10_s():
    window = LatencyWindow()
    window.record(10e-6, 0.0)
    assert window.read(0.5).percentiles() == (exactly(25e-6), exactly(49.5e-6))
    slow = LatencyWindow()
    for _ in range(10):
        slow.record(30.0, 0.0)
    assert slow.read(0.5).percentiles() == (10.0, 10.0)


def test_window_keeps_an_answer_until_60_whole_seconds_have_passed():
    window = LatencyWindow()
    window.record(2 * MS, 100.5)  # bucket (1.6 ms, 2 ms]
    assert window.read(100.5).percentiles()[0] == exactly(1.8 * MS)
    assert window.read(159.99).percentiles()[0] == exactly(1.8 * MS)
    assert window.read(160.0).percentiles() == (None, None)
    assert window.read(160.0).histogram()["count"] == 1  # the histogram never forgets


def test_window_sums_the_seconds_it_covers():
    window = LatencyWindow()
    for second in range(100, 160):       # one answer a second for a minute
        window.record(0.9 * MS, second + 0.5)
    for _ in range(60):                  # and 60 slow ones in the last second
        window.record(90 * MS, 159.7)
    # 120 answers: ranks 60 and 118.8 fall in (0.8, 1] and (80, 100] ms.
    assert window.read(159.9).percentiles() == (exactly(1 * MS),
                                         exactly(80 * MS + 20 * MS * 58.8 / 60))
    # One second later the answer of second 100 has left: 59 fast, 60 slow.
    assert window.read(160.0).percentiles() == (exactly(80 * MS + 20 * MS * 0.5 / 60),
                                         exactly(80 * MS + 20 * MS * 58.81 / 60))


def test_a_slot_reused_a_minute_later_starts_empty():
    window = LatencyWindow()
    window.record(0.9 * MS, 100.2)
    window.record(90 * MS, 160.3)  # same slot (100 % 60 == 160 % 60)
    assert window.read(160.5).percentiles() == (exactly(80 * MS + 20 * MS * 0.5),
                                         exactly(80 * MS + 20 * MS * 0.99))
    assert window.read(160.5).histogram()["count"] == 2


def test_answers_recorded_out_of_order_land_in_their_second():
    window = LatencyWindow()
    window.record(0.9 * MS, 101.1)
    window.record(0.9 * MS, 100.9)  # a thread that read the clock earlier
    window.record(0.9 * MS, 101.2)
    assert window.read(101.5).percentiles() == (exactly(0.9 * MS),
                                         exactly(0.8 * MS + 0.2 * MS * 2.97 / 3))
    assert window.read(160.5).percentiles() == (exactly(0.8 * MS + 0.2 * MS * 1 / 2),
                                         exactly(0.8 * MS + 0.2 * MS * 1.98 / 2))


def test_an_answer_older_than_the_window_counts_in_the_histogram_only():
    window = LatencyWindow()
    window.record(0.9 * MS, 200.0)
    window.record(90 * MS, 140.0)  # 60 s older than slot 20's second 200
    assert window.read(200.5).percentiles() == (exactly(0.9 * MS), exactly(0.998 * MS))
    assert window.read(200.5).histogram()["count"] == 2


def test_an_answer_for_a_second_already_read_out_of_the_window_never_shows():
    window = LatencyWindow()
    window.record(0.9 * MS, 100.5)
    assert window.read(160.0).percentiles() == (None, None)  # second 100 has left
    window.record(90 * MS, 100.7)  # late: second 100 again, into the same slot
    assert window.read(160.0).percentiles() == (None, None)
    window.record(2 * MS, 160.2)
    assert window.read(160.5).percentiles() == (exactly(1.8 * MS), exactly(1.996 * MS))
    assert window.read(160.5).histogram()["count"] == 3


def test_a_read_is_a_copy_that_later_answers_do_not_change():
    window = LatencyWindow()
    window.record(0.9 * MS, 10.0)
    counts = window.read(10.0)
    window.record(90 * MS, 10.0)
    window.record(90 * MS, 75.0)  # and second 10 leaves the window at the next read
    assert counts.percentiles() == (exactly(0.9 * MS), exactly(0.998 * MS))
    assert counts.histogram()["count"] == 1
    assert window.read(75.0).percentiles() == (exactly(90 * MS), exactly(99.8 * MS))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([40e-6, 0.9 * MS, 90 * MS, 30.0]),
                          st.floats(0, 3), st.booleans()), max_size=80),
       st.floats(0, 200))
def test_the_window_read_equals_the_sum_of_the_last_minute(steps, start):
    """A running sum must agree with counting every answer of the 60 whole seconds up
    to the read, whatever the gaps, the late answers and the reads in between."""
    window = LatencyWindow()
    recorded = []
    now = start
    for value, step, late in steps:
        now += step
        at = max(0.0, now - 61) if late else now  # a late answer: a minute before
        window.record(value, at)
        recorded.append((value, at))
        counts = window.read(now)
        expected = [0] * (len(LATENCY_BOUNDS) + 1)
        for value_seen, second in recorded:
            if int(now) - WINDOW_SECONDS < int(second) <= int(now):
                expected[bisect.bisect_left(LATENCY_BOUNDS, value_seen)] += 1
        # A late answer whose slot holds a later second counts in the histogram only,
        # so the window may hold fewer than the ones from its 60 seconds, never more.
        assert all(got <= want for got, want in zip(counts.window, expected))
        if not late:
            assert counts.window == expected
        assert sum(counts.counts) == len(recorded)


# --- Histogram ----------------------------------------------------------------------

def test_histogram_is_cumulative_since_start():
    window = LatencyWindow()
    samples = [40e-6, 50e-6, 0.3 * MS, 0.3 * MS, 1.1 * MS, 2.5, 12.0]
    for index, value in enumerate(samples):
        window.record(value, 1000.0 + index * 30)
    histogram = window.read(1200.0).histogram()
    assert histogram["le"] == list(LATENCY_BOUNDS)
    expected = [sum(1 for value in samples if value <= bound) for bound in LATENCY_BOUNDS]
    assert histogram["counts"] == expected
    assert histogram["counts"][0] == 2 and histogram["counts"][-1] == 6
    assert histogram["count"] == 7
    assert histogram["sum"] == exactly(sum(samples))


def test_histogram_of_no_answer_is_zeros():
    assert LatencyWindow().read(0.0).histogram() == {"le": list(LATENCY_BOUNDS), "counts": [0] * 54,
                                           "count": 0, "sum": 0.0}


# --- Prometheus text format ---------------------------------------------------------

def server(server_id, state="up", served=0, in_flight=0, failures=0, window=None):
    histogram = (window or LatencyWindow()).read(5.0).histogram()
    return {"id": server_id, "address": "127.0.0.1:2105", "state": state, "weight": 1,
            "served": served, "in_flight": in_flight, "failures": failures,
            "latency_ms": {"p50": None, "p99": None}, "latency_histogram": histogram,
            "next": False}


def snapshot(policies):
    return {"uptime_s": 12.5, "draining": False, "connections": 7,
            "connections_by_kind": {"client": 3, "server": 2, "registration": 2},
            "totals": {"packets": 30, "answers": {code: 0 for code in CODES} | {"ACK": 27,
                                                                                "TIMEOUT": 3},
                       "failovers": 4, "registrations": {"registered": 5, "refused": 1}},
            "policies": policies}


def families(text):
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family):
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for sample in family.samples}


def test_prometheus_totals():
    parsed = families(metrics.render_prometheus(snapshot([])))
    assert samples(parsed["rproxy_uptime_seconds"]) == {("rproxy_uptime_seconds", ()): 12.5}
    assert samples(parsed["rproxy_received_packets"]) == {
        ("rproxy_received_packets_total", ()): 30}
    assert samples(parsed["rproxy_failovers"]) == {("rproxy_failovers_total", ()): 4}
    answers = samples(parsed["rproxy_answers"])
    assert answers == {("rproxy_answers_total", (("code", code),)):
                       {"ACK": 27, "TIMEOUT": 3}.get(code, 0) for code in CODES}
    assert samples(parsed["rproxy_registrations"]) == {
        ("rproxy_registrations_total", (("result", "registered"),)): 5,
        ("rproxy_registrations_total", (("result", "refused"),)): 1}
    assert samples(parsed["rproxy_connections"]) == {
        ("rproxy_connections", (("kind", "client"),)): 3,
        ("rproxy_connections", (("kind", "server"),)): 2,
        ("rproxy_connections", (("kind", "registration"),)): 2}


def test_prometheus_per_server_metrics_in_rotation_order():
    window = LatencyWindow()
    for value in (0.3 * MS, 0.3 * MS, 1.1 * MS, 30.0):
        window.record(value, 5.0)
    text = metrics.render_prometheus(snapshot([
        {"policy": "111", "balance": "roundrobin",
         "servers": [server("300", served=9, in_flight=2, window=window),
                     server("100", state="down", served=8, failures=3)]},
        {"policy": "222", "balance": "leastconn", "servers": [server("200", state="left")]}]))
    parsed = families(text)
    labels = [(("policy", "111"), ("server", "300")), (("policy", "111"), ("server", "100")),
              (("policy", "222"), ("server", "200"))]

    def per_server(name, values, sample_name=None):
        return {(sample_name or name, key): value for key, value in zip(labels, values)}

    assert samples(parsed["rproxy_server_up"]) == per_server("rproxy_server_up", [1, 0, 0])
    assert samples(parsed["rproxy_packets"]) == per_server("rproxy_packets_total", [9, 8, 0])
    assert samples(parsed["rproxy_in_flight"]) == per_server("rproxy_in_flight", [2, 0, 0])
    assert samples(parsed["rproxy_failures"]) == per_server("rproxy_failures_total", [0, 3, 0])
    servers_in_order = [line.split("}")[0] for line in text.splitlines()
                        if line.startswith("rproxy_packets_total")]
    assert servers_in_order == ['rproxy_packets_total{policy="111",server="300"',
                                'rproxy_packets_total{policy="111",server="100"',
                                'rproxy_packets_total{policy="222",server="200"']

    latency = parsed["rproxy_upstream_latency_seconds"]
    assert latency.type == "histogram"
    buckets = {float(sample.labels["le"]): sample.value for sample in latency.samples
               if sample.name.endswith("_bucket") and sample.labels["server"] == "300"}
    assert len(buckets) == 55
    assert buckets[250e-6] == 0 and buckets[315e-6] == 2
    assert buckets[1e-3] == 2 and buckets[1.25e-3] == 3
    assert buckets[10.0] == 3 and buckets[float("inf")] == 4
    ends = {sample.name: sample.value for sample in latency.samples
            if sample.labels["server"] == "300" and not sample.name.endswith("_bucket")}
    assert ends == {"rproxy_upstream_latency_seconds_count": 4,
                    "rproxy_upstream_latency_seconds_sum": exactly(30.0017)}


def test_prometheus_help_type_and_naming_rules():
    text = metrics.render_prometheus(snapshot([
        {"policy": "111", "balance": "roundrobin", "servers": [server("100")]}]))
    lines = text.splitlines()
    assert text.endswith("\n")
    types = {line.split()[2]: line.split()[3] for line in lines if line.startswith("# TYPE")}
    assert types == {
        "rproxy_uptime_seconds": "gauge", "rproxy_received_packets_total": "counter",
        "rproxy_answers_total": "counter", "rproxy_failovers_total": "counter",
        "rproxy_registrations_total": "counter", "rproxy_connections": "gauge",
        "rproxy_server_up": "gauge", "rproxy_packets_total": "counter",
        "rproxy_in_flight": "gauge", "rproxy_failures_total": "counter",
        "rproxy_upstream_latency_seconds": "histogram"}
    helps = [line.split()[2] for line in lines if line.startswith("# HELP")]
    assert helps == list(types)
    for index, line in enumerate(lines):  # every TYPE right after its HELP
        if line.startswith("# TYPE"):
            assert lines[index - 1].startswith("# HELP " + line.split()[2] + " ")


def test_prometheus_label_values_are_escaped():
    nasty = 'a"b\\c\nd'
    text = metrics.render_prometheus(snapshot([
        {"policy": "p\\1", "balance": "roundrobin", "servers": [server(nasty, served=5)]}]))
    assert 'rproxy_packets_total{policy="p\\\\1",server="a\\"b\\\\c\\nd"} 5\n' in text
    parsed = families(text)
    assert samples(parsed["rproxy_packets"]) == {
        ("rproxy_packets_total", (("policy", "p\\1"), ("server", nasty))): 5}
    assert len(parsed["rproxy_upstream_latency_seconds"].samples) == 57
