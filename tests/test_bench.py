"""Tests of the load mode, ``client.py -bench``, and of the pure parts of
``bench/compare.py``.

The load mode runs as a process against real programs (``reverse_proxy.py``,
``server.py``) or against a ``FakeServer`` whose answers are scripted: every wrong,
ERROR or missing answer must be counted, exactly, and fail the run (exit 1), and each
lost connection says how many answers it lost; usage errors exit 2. With several
addresses, one that refuses (TCP, or a full proxy's OVERLOADED) is skipped, and the
run fails only when none accepts. Each run lasts about a second. ``bench/compare.py`` itself takes a
minute and more, so only its pure parts (``/proc`` parsing, medians, tables, targets)
are tested here, in-process.
"""

import importlib.util
import json
import os
import random
import re

import pytest

import loadgen
import netio
import protocol
from conftest import ROOT, free_port, run, write_packets

BENCH = ("client.py", "-id", "7", "-pkt", "pktfiles/1.json")  # policy 111


# Seconds of load in most tests: enough for hundreds of answers on loopback; the
# progress line of each second is checked in one test that runs longer.
SHORT = 0.3


def bench(*options, revproc, seconds=SHORT):
    """Run ``client.py -bench``; return (CompletedProcess, the JSON summary or None)."""
    done = run(*BENCH, "-revproc", revproc, "-bench", seconds, "-json", *options,
               timeout=30)
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    last = done.stdout.splitlines()[-1] if done.stdout else ""
    return done, json.loads(last) if last.startswith("{") else None


def assert_consistent(summary, conns, depth, size, idle=0, seconds=SHORT):
    """The figures of a summary agree with each other and with the load asked for."""
    assert (summary["conns"], summary["depth"], summary["size"], summary["idle"]) == (
        conns, depth, size, idle)
    assert summary["packets_per_s"] == pytest.approx(summary["packets"] / summary["seconds"])
    assert summary["payload_bytes_per_s"] == pytest.approx(summary["packets_per_s"] * size)
    assert seconds <= summary["seconds"] < seconds + 4.0
    assert 0 < summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"] <= summary["max_ms"]


# --- client.py -bench against real programs -----------------------------------------------

def test_bench_through_proxy_and_server_every_answer_right(nodes):
    proxy = nodes.proxy("-quiet")
    nodes.server("100", "111", proxy.port, "-quiet")
    nodes.server("200", "111", proxy.port, "-quiet")
    done, summary = bench("-conns", 3, "-depth", 2, "-size", 100, revproc=proxy.port,
                          seconds=1)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    assert summary["errors"] == 0 and summary["error_kinds"] == {}
    assert summary["packets"] > 0
    assert_consistent(summary, 3, 2, 100, seconds=1)
    lines = done.stdout.splitlines()
    assert lines[0] == (f"load: 3 connections x 2 in flight, 100-byte payloads, privacy "
                        f"policy 111, 1 s, to 127.0.0.1:{proxy.port}")
    assert re.fullmatch(r"time 1 s  packets/s [\d,]+  p50 \d+\.\d\d ms  p99 \d+\.\d\d ms  "
                        r"errors 0", lines[1]), lines[1]
    assert [line for line in lines if line.startswith("time ")] == [lines[1]]  # once


def test_bench_text_summary(nodes):
    proxy = nodes.proxy("-quiet")
    nodes.server("100", "111", proxy.port, "-quiet")
    done = run(*BENCH, "-revproc", proxy.port, "-bench", SHORT, "-conns", 2, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("load: 2 connections x 4 in flight, 64-byte payloads, ")
    assert re.fullmatch(r"packets [\d,]+ answered correctly in \d+\.\d\d s: [\d,]+ "
                        r"packets/s, \d+\.\d\d MB/s of payload", lines[-3]), lines[-3]
    assert re.fullmatch(r"latency p50 \d+\.\d\d ms  p90 \d+\.\d\d ms  p99 \d+\.\d\d ms  "
                        r"max \d+\.\d\d ms", lines[-2]), lines[-2]
    assert lines[-1] == "errors 0"


def test_bench_idle_connections_are_opened_and_stay_silent(fake_servers):
    fake = fake_servers("900")
    done, summary = bench("-conns", 2, "-depth", 1, "-idle", 5, revproc=fake.port)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_consistent(summary, 2, 1, 64, idle=5)
    assert len(fake._conns) == 7
    assert fake.count == summary["packets"]
    assert "(+5 idle)" in done.stdout.splitlines()[0]


def test_bench_spreads_connections_over_several_addresses(fake_servers):
    first, second = fake_servers("901"), fake_servers("902")
    done, summary = bench("-conns", 4, "-depth", 1, revproc=f"{first.port},127.0.0.1:{second.port}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (len(first._conns), len(second._conns)) == (2, 2)
    assert first.count + second.count == summary["packets"]


def test_bench_payloads_have_the_size_asked_and_the_file_s_policy(fake_servers, tmp_path):
    fake = fake_servers("900")
    pkt = write_packets(tmp_path, "two.json", [
        {"type": "0", "srcid": "1", "privPoliId": "p1", "payload": "a"},
        {"type": "0", "srcid": "1", "privPoliId": "p2", "payload": "b"}])
    done = run("client.py", "-id", "7", "-pkt", pkt, "-revproc", fake.port, "-bench", SHORT,
               "-conns", 1, "-depth", 1, "-size", 300, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {len(m["payload"].encode("utf-8")) for m in fake.received} == {300}
    assert {m["privPoliId"] for m in fake.received} == {"p1", "p2"}
    assert {m["srcid"] for m in fake.received} == {"7"}


def test_bench_over_tls(nodes, pki):
    proxy = nodes.proxy("-quiet", "-tls-cert", pki["leaf.pem"], "-tls-key", pki["leaf.key"])
    nodes.server("100", "111", proxy.port, "-quiet", "-tls-ca", pki["ca.pem"])
    done, summary = bench("-conns", 2, "-depth", 4, "-size", 20000, "-tls-ca", pki["ca.pem"],
                          revproc=proxy.port)
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary["errors"] == 0 and summary["packets"] > 0
    assert_consistent(summary, 2, 4, 20000)
    assert done.stdout.splitlines()[0].endswith(" over TLS")


# --- Wrong, ERROR and missing answers: counted exactly, exit 1 --------------------------

def test_bench_every_wrong_hash_counted_and_exit_1(nodes, fake_servers):
    proxy = nodes.proxy("-quiet")
    fake = fake_servers("666", lambda message, count: protocol.ack("666", message["srcid"],
                                                                   "0" * 40))
    fake.register(proxy.port, "111").close()
    done, summary = bench("-conns", 2, "-depth", 2, revproc=proxy.port)
    assert done.returncode == 1
    assert summary["packets"] == 0
    assert summary["errors"] == fake.count > 0
    assert summary["error_kinds"] == {"wrong hash": fake.count}
    (line,) = done.stderr.splitlines()  # the first error of each kind, once
    assert re.fullmatch(rf"client\.py: connection \d to 127\.0\.0\.1:{proxy.port}: wrong hash "
                        rf"from server 666: expected [0-9a-f]{{40}}, got {'0' * 40}", line), line


def test_bench_one_wrong_hash_among_many_fails_the_run(fake_servers):
    def one_wrong(message, count):
        payload = "f" * 40 if count == 5 else protocol.sha1_hex(message["payload"])
        return protocol.ack("900", message["srcid"], payload)

    fake = fake_servers("900", one_wrong)
    done, summary = bench("-conns", 1, "-depth", 3, revproc=fake.port)
    assert done.returncode == 1
    assert summary["errors"] == 1
    assert summary["error_kinds"] == {"wrong hash": 1}
    assert summary["packets"] == fake.count - 1


def test_bench_error_answers_counted_and_exit_1(nodes):
    proxy = nodes.proxy("-quiet")  # no server: every packet gets NO_SERVER
    done, summary = bench("-conns", 1, "-depth", 2, revproc=proxy.port)
    assert done.returncode == 1
    assert summary["packets"] == 0
    assert list(summary["error_kinds"]) == ["ERROR NO_SERVER"]
    assert summary["errors"] == summary["error_kinds"]["ERROR NO_SERVER"] > 0
    assert re.search(r"ERROR answer: NO_SERVER: .*111", done.stderr), done.stderr


def test_bench_connection_closed_counts_its_answers_missing(fake_servers):
    fake = fake_servers("900", lambda message, count: "close" if count == 3 else
                        protocol.ack_for("900", message))
    done, summary = bench("-conns", 1, "-depth", 4, revproc=fake.port)
    assert done.returncode == 1
    assert summary["packets"] == 2
    # Answers 1 and 2 came, so 4 frames were in flight when the connection closed.
    assert summary["error_kinds"] == {"missing answer": 4}
    assert summary["errors"] == 4
    assert "4 answers missing" in done.stderr


def test_bench_silent_server_answers_missing_after_timeout(fake_servers):
    fake = fake_servers("900", lambda message, count: None)
    done, summary = bench("-conns", 2, "-depth", 3, "-timeout", 0.5, revproc=fake.port)
    assert done.returncode == 1
    assert summary["packets"] == 0
    assert summary["error_kinds"] == {"missing answer": 6}
    assert "no answer within 0.5 s (-timeout)" in done.stderr
    assert "TLS" not in done.stderr  # silence is no sign of a TLS server


def test_bench_plain_to_a_tls_proxy_hints_at_tls_ca(proxies, pki):
    proxy = proxies(tls=netio.server_tls_context(pki["leaf.pem"], pki["leaf.key"]))
    done, summary = bench("-conns", 1, "-depth", 2, revproc=proxy.port)
    assert done.returncode == 1
    assert summary["error_kinds"] == {"missing answer": 2}
    assert re.fullmatch(rf"client\.py: connection 1 to 127\.0\.0\.1:{proxy.port}: (Connection "
                        r"reset by peer|the peer closed the connection) \(a proxy that "
                        r"serves TLS needs -tls-ca\); 2 answers missing", done.stderr.strip()), (
        done.stderr)


def test_bench_unreachable_proxy_one_line_exit_1():
    port = free_port()
    done = run(*BENCH, "-revproc", port, "-bench", 1, "-conns", 2)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"client.py: cannot open connection 1 of 2 to 127.0.0.1:{port}: Connection refused"]


# --- Several proxies: failover when opening, losses reported per connection ---------------

def test_bench_skips_a_proxy_that_refuses_and_says_so(fake_servers):
    down, fake = free_port(), fake_servers("900")
    done, summary = bench("-conns", 2, "-depth", 1, revproc=f"{down},{fake.port}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary["errors"] == 0 and summary["packets"] == fake.count > 0
    assert len(fake._conns) == 2  # connection 1 went to the next address
    assert done.stderr.splitlines() == [
        f"client.py: connection 1 to 127.0.0.1:{down} refused: Connection refused; using "
        f"the other reverse proxies"]
    assert done.stdout.splitlines()[0].endswith(
        f", to 127.0.0.1:{fake.port} (127.0.0.1:{down} skipped: Connection refused)")


def test_bench_exits_1_when_no_proxy_accepts_naming_each():
    first, second = free_port(), free_port()
    done = run(*BENCH, "-revproc", f"{first},{second}", "-bench", 1, "-conns", 2)
    assert done.returncode == 1
    assert done.stdout == ""
    assert re.fullmatch(
        rf"client\.py: cannot open connection [12] of 2: no reverse proxy accepted it "
        rf"\(127\.0\.0\.1:{first}: Connection refused; 127\.0\.0\.1:{second}: Connection "
        rf"refused\)", done.stderr.splitlines()[-1]), done.stderr


def test_bench_moves_the_connections_a_full_proxy_refuses(proxies, wires, fake_servers):
    full = proxies(max_conns=1)
    holder = wires(full.port)
    holder.send(protocol.ping())
    assert holder.receive()["type"] == protocol.MessageType.PONG  # the one slot is taken
    fake = fake_servers("900")
    done, summary = bench("-conns", 2, "-depth", 1, revproc=f"{full.port},{fake.port}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary["errors"] == 0 and summary["packets"] == fake.count > 0
    assert len(fake._conns) == 2
    assert done.stderr.splitlines() == [
        f"client.py: connection 1 to 127.0.0.1:{full.port} refused: OVERLOADED: the proxy "
        f"has 1 connection open, its maximum (-max-conns); try again later; using the "
        f"other reverse proxies"]


def test_bench_a_peer_lost_under_load_reports_the_missing_answers_of_every_connection(
        fake_servers):
    fake = None

    def all_lost_at_ten(message, count):
        if count == 10:
            fake.drop_connections()  # as a proxy that dies: every connection at once
            return "close"
        return protocol.ack_for("900", message)

    fake = fake_servers("900", all_lost_at_ten)
    done, summary = bench("-conns", 2, "-depth", 4, revproc=fake.port)
    assert done.returncode == 1
    # Each connection keeps 4 frames in flight (topped up after each answer), so each
    # loses 4 answers; each says so, and the lines add up to the summary.
    lines = sorted(done.stderr.splitlines())
    # The close is met by a read (EOF), or a send (reset, or EPIPE once it was seen).
    closed = r"the peer closed the connection|Connection reset by peer|Broken pipe"
    assert [re.sub(closed, "closed", line) for line in lines] == [
        f"client.py: connection {number} to 127.0.0.1:{fake.port}: closed; 4 answers missing"
        for number in (1, 2)], done.stderr
    assert summary["error_kinds"] == {"missing answer": 8}
    assert summary["errors"] == 8


def test_bench_takes_acks_whose_type_is_the_digit_as_a_string(fake_servers):
    fake = fake_servers("900", lambda message, count: {
        **protocol.ack_for("900", message), "type": "2"})
    done, summary = bench("-conns", 1, "-depth", 2, revproc=fake.port)
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary["errors"] == 0 and summary["packets"] == fake.count > 0


def test_bench_prints_a_progress_line_for_the_last_part_of_a_second(fake_servers):
    fake = fake_servers("900")
    done, summary = bench("-conns", 1, "-depth", 1, revproc=fake.port, seconds=1.5)
    assert done.returncode == 0, done.stdout + done.stderr
    progress = [line.split("  ")[0] for line in done.stdout.splitlines()
                if line.startswith("time ")]
    assert progress == ["time 1 s", "time 1.5 s"]


# --- Usage errors: exit 2, naming the value ----------------------------------------------

USAGE_ERRORS = {
    "-bench 0": (["-bench", "0"], "'0'"),
    "-bench abc": (["-bench", "abc"], "'abc'"),
    "-conns 0": (["-bench", "1", "-conns", "0"], "'0'"),
    "-depth x": (["-bench", "1", "-depth", "x"], "'x'"),
    "-size -5": (["-bench", "1", "-size", "-5"], "-size"),
    "-idle -1": (["-bench", "1", "-idle", "-1"], "-idle"),
    "-conns without -bench": (["-conns", "4"], "-conns: only with -bench"),
    "-json without -bench": (["-json"], "-json: only with -bench"),
    "bad second address": (["-bench", "1", "-revproc", "2100,host:abc"], "'abc'"),
    "-size above -max-frame": (["-bench", "1", "-size", "2000", "-max-frame", "1000"],
                               "argument -size: a 2000-byte payload makes a DATA frame of"),
}


@pytest.mark.parametrize("options, named", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_bench_usage_error_exits_2(options, named):
    done = run("client.py", "-id", "7", "-pkt", "pktfiles/1.json", *options)
    assert done.returncode == 2, done
    assert done.stderr.startswith("usage: client.py ")
    assert named in done.stderr.splitlines()[-1], done.stderr
    assert done.stdout == ""


def test_help_describes_the_load_options():
    done = run("client.py", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for option in ("-bench SECONDS", "-conns N", "-depth N", "-size BYTES", "-idle N",
                   "-json"):
        assert option in text
    assert "connections that send (default: 16)" in text
    assert "DATA frames in flight on each of them (default: 4)" in text
    assert "UTF-8 bytes of each payload (default: 64)" in text


# --- Pure parts of the load mode -----------------------------------------------------------

def test_histogram_exact_below_2048_us():
    histogram = loadgen.LatencyHistogram()
    for micros in range(1, 101):
        histogram.record(micros)
    assert histogram.count == 100 and histogram.max == 100
    assert [histogram.percentile(f) for f in (0.01, 0.5, 0.9, 0.99, 1)] == [1, 50, 90, 99, 100]


def test_histogram_within_a_tenth_of_a_percent_above():
    histogram = loadgen.LatencyHistogram()
    values = [2048, 4095, 4096, 123_456, 10 ** 7]
    for micros in values:
        histogram.record(micros)
    assert histogram.percentile(0.2) == 2048
    assert histogram.percentile(0.4) == 4094  # 4094 and 4095 share a bucket
    assert histogram.percentile(0.6) == 4096
    assert 0 <= 123_456 - histogram.percentile(0.8) < 123_456 / 1000
    assert histogram.percentile(1) == 10 ** 7


def test_histogram_empty_and_merge():
    first, second = loadgen.LatencyHistogram(), loadgen.LatencyHistogram()
    assert first.percentile(0.5) is None
    for micros in (10, 20):
        first.record(micros)
    for micros in (30, 40, 50):
        second.record(micros)
    first.merge(second)
    assert (first.count, first.max, first.percentile(0.5), first.percentile(0.99)) == (
        5, 50, 30, 50)


def test_histogram_rank_is_not_pushed_up_by_rounding():
    histogram = loadgen.LatencyHistogram()
    for micros in range(1, 101):
        histogram.record(micros)
    assert histogram.percentile(0.07) == 7  # 0.07 x 100 is 7.000000000000001 in floats


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 64, 1000])
def test_payloads_exact_utf8_size(size):
    payloads = loadgen.make_payloads(size, 50, random.Random(size))
    assert len(payloads) == 50
    assert {len(text.encode("utf-8")) for text in payloads} == {size}
    assert all(json.dumps(text, ensure_ascii=False) == f'"{text}"' for text in payloads)


def test_payloads_hold_non_ascii_text():
    text = "".join(loadgen.make_payloads(64, 100, random.Random(1)))
    assert not text.isascii()
    assert len(set(loadgen.make_payloads(64, 100, random.Random(1)))) == 100


def test_bench_frames_and_hashes():
    frames, hashes = loadgen.bench_frames("7", ["a", "b"], ["x", "y", "z"])
    decoder = protocol.FrameDecoder()
    decoder.feed(b"".join(frames))
    messages = [protocol.parse_message(decoder.next_frame()) for _ in frames]
    assert [(m["srcid"], m["privPoliId"], m["payload"]) for m in messages] == [
        ("7", "a", "x"), ("7", "b", "y"), ("7", "a", "z")]
    assert hashes == [protocol.sha1_hex(text) for text in "xyz"]


GOOD = protocol.sha1_hex("x")
JUDGED = {
    "right": ({"type": 2, "srcid": "1", "destid": "7", "payload": GOOD}, None),
    "destid as an integer": ({"type": 2, "srcid": "1", "destid": 7, "payload": GOOD}, None),
    "wrong hash": ({"type": 2, "srcid": "1", "destid": "7", "payload": "0" * 40},
                   ("wrong hash", f"wrong hash from server 1: expected {GOOD}, got {'0' * 40}")),
    "other client": ({"type": 2, "srcid": "1", "destid": "8", "payload": GOOD},
                     ("ACK for another client", "an ACK for client 8 instead of 7")),
    "error": ({"type": 3, "code": "NO_SERVER", "message": "none"},
              ("ERROR NO_SERVER", "ERROR answer: NO_SERVER: none")),
    "pong": ({"type": 6}, ("unexpected answer", "a message of type 6 instead of an ACK")),
    "not an object": ([1], ("unreadable answer", "an answer that is not a JSON object: [1]")),
}


@pytest.mark.parametrize("answer, verdict", JUDGED.values(), ids=JUDGED.keys())
def test_judge_answer(answer, verdict):
    assert loadgen.judge_answer(answer, GOOD, "7") == verdict


def test_progress_line_and_summary_text():
    histogram = loadgen.LatencyHistogram()
    for micros in (1000, 1210, 3400):
        histogram.record(micros)
    assert loadgen.progress_line(3, 41230.4, histogram, 0) == (
        "time 3 s  packets/s 41,230  p50 1.21 ms  p99 3.40 ms  errors 0")
    assert loadgen.progress_line(4, 0, loadgen.LatencyHistogram(), 2) == (
        "time 4 s  packets/s 0  p50 -  p99 -  errors 2")
    summary = {"packets": 412300, "seconds": 10.0, "packets_per_s": 41230.0,
               "payload_bytes_per_s": 2638720.0, "errors": 3,
               "error_kinds": {"wrong hash": 2, "ERROR NO_SERVER": 1},
               "p50_ms": 1.21, "p90_ms": 2.02, "p99_ms": 3.4, "max_ms": 12.5}
    assert loadgen.summary_lines(summary) == [
        "packets 412,300 answered correctly in 10.00 s: 41,230 packets/s, 2.64 MB/s of payload",
        "latency p50 1.21 ms  p90 2.02 ms  p99 3.40 ms  max 12.50 ms",
        "errors 3: 2 wrong hashes, 1 ERROR NO_SERVER"]


# --- Pure parts of bench/compare.py ----------------------------------------------------------

def load_compare():
    spec = importlib.util.spec_from_file_location(
        "bench_compare", os.path.join(ROOT, "bench", "compare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = load_compare()


def test_cpu_seconds_counts_fields_after_the_command_name():
    # A command name may hold spaces and parentheses; utime 250, stime 50 ticks.
    fields = ["S", "1", "2", "3", "0", "-1", "4194560", "10", "0", "0", "0", "250", "50",
              "0", "0", "20", "0", "5", "0", "100"]
    stat = "4242 (evil ) (name) " + " ".join(fields) + "\n"
    assert compare.cpu_seconds(stat, 100) == 3.0


def test_cpu_seconds_of_this_process():
    with open("/proc/self/stat", encoding="utf-8") as file:
        seconds = compare.cpu_seconds(file.read(), os.sysconf("SC_CLK_TCK"))
    assert seconds > 0


def test_rss_bytes():
    assert compare.rss_bytes("Name:\tpython3\nVmPeak:\t  20 kB\nVmRSS:\t   42696 kB\n"
                             "Threads:\t5\n") == 42696 * 1024
    with pytest.raises(ValueError):
        compare.rss_bytes("Name:\tzombie\n")


def test_haproxy_config():
    text = compare.haproxy_config(8080, [("127.0.0.1", 9001), ("127.0.0.1", 9002)], 2, 4096)
    lines = [line.strip() for line in text.splitlines()]
    for line in ("nbthread 2", "maxconn 4096", "mode tcp", "balance roundrobin",
                 "bind 127.0.0.1:8080", "server s1 127.0.0.1:9001", "server s2 127.0.0.1:9002"):
        assert line in lines


def figures(rate, p99=1.0, cpu=None, rss=None, size=64):
    return {"packets_per_s": rate, "payload_bytes_per_s": rate * size, "p50_ms": p99 / 2,
            "p99_ms": p99, "cpu_us": cpu, "rss": rss}


def test_summarize_takes_medians_and_the_largest_memory():
    runs = [figures(100, 3.0, 10.0, 5e6), figures(300, 1.0, 30.0, 9e6),
            figures(200, 2.0, 20.0, 7e6)]
    assert compare.summarize(runs) == {
        "packets_per_s": 200, "payload_bytes_per_s": 200 * 64, "p50_ms": 1.0, "p99_ms": 2.0,
        "cpu_us": 20.0, "rss": 9e6}
    assert compare.summarize([figures(1), figures(3)])["cpu_us"] is None


def test_best_haproxy_by_the_load_s_metric():
    medians = {"HAProxy nbthread 1": figures(100, p99=0.3),
               "HAProxy nbthread 2": figures(200, p99=0.5), "proxy": figures(50)}
    rate = compare.Load("r", 1, 1, 64, 0, "rate")
    latency = compare.Load("l", 1, 1, 64, 0, "latency")
    assert compare.best_haproxy(rate, medians) == "HAProxy nbthread 2"
    assert compare.best_haproxy(latency, medians) == "HAProxy nbthread 1"
    assert compare.best_haproxy(rate, {"proxy": figures(1)}) is None


def test_render_table_aligns_columns():
    assert compare.render_table(["load", "rate"], [["16 x 4", "41,230"], ["1 x 1", "7"]]) == [
        "load      rate",
        "------  ------",
        "16 x 4  41,230",
        "1 x 1        7"]


def all_medians(proxy_rate=30000, proxy_p99=0.5, proxy_cpu=20.0, proxy_rss=60e6,
                haproxy=True):
    medians = {}
    for load in compare.LOADS:
        by_target = {"direct": figures(40000, size=load.size),
                     "relay": figures(20000, 0.4, 12.0, 20e6, size=load.size),
                     "proxy": figures(proxy_rate, proxy_p99, proxy_cpu, proxy_rss,
                                      size=load.size)}
        if haproxy:
            by_target["HAProxy nbthread 1"] = figures(25000, 0.3, 10.0, 15e6, size=load.size)
            by_target["HAProxy nbthread 2"] = figures(24000, 0.4, 11.0, 16e6, size=load.size)
        medians[load.name] = by_target
    return medians


def test_targets_met_and_not_met():
    met = compare.check_targets(compare.LOADS, all_medians())
    assert [(value, ok) for target, value, ok in met] == [
        ("1.20 x", True), ("1.20 x", True), ("0.50 ms vs 0.30 ms", True), ("1.20 x", True),
        ("20.0 µs", True), ("0 errors, 60.0 MB", True)]
    missed = compare.check_targets(compare.LOADS, all_medians(
        proxy_rate=20000, proxy_p99=0.51, proxy_cpu=25.1, proxy_rss=150e6))
    assert [(value, ok) for target, value, ok in missed] == [
        ("0.80 x", False), ("0.80 x", False), ("0.51 ms vs 0.30 ms", False),
        ("0.80 x", False), ("25.1 µs", False), ("0 errors, 150.0 MB", False)]
    assert [target for target, value, ok in met] == [
        "16 x 4: proxy >= 1 x HAProxy packets/s", "1 x 32: proxy >= 1 x HAProxy packets/s",
        "1 x 1: proxy p99 <= HAProxy p99 + 0.2 ms",
        "4 x 4, 64 KiB: proxy >= 1 x HAProxy bytes/s",
        "16 x 4: proxy CPU <= 25 µs per packet",
        "1,000 open, 100 sending: every answer right, proxy RSS < 150 MB"]


def test_targets_without_haproxy_are_not_measured():
    checks = compare.check_targets(compare.LOADS, all_medians(haproxy=False))
    assert [ok for target, value, ok in checks] == [None, None, None, None, True, True]
    assert checks[0][1] == "HAProxy not measured"


def test_report_tables():
    lines = compare.report(compare.LOADS, all_medians())
    row = next(line for line in lines if line.startswith("16 x 4 ") and "nbthread" in line)
    assert row.split() == ["16", "x", "4", "40,000", "25,000", "(nbthread", "1)", "20,000",
                           "30,000", "1.20", "0.75"]
    row = next(line for line in lines if line.startswith("4 x 4, 64 KiB") and "MB/s" in line)
    assert "2,621.4 MB/s" in row  # 40,000 packets/s x 65,536 bytes
    latency = [line for line in lines if line.startswith("1 x 1 ")][1]
    assert latency.split() == ["1", "x", "1", "0.50", "/", "1.00", "0.15", "/", "0.30",
                               "0.20", "/", "0.40", "0.25", "/", "0.50"]
    boxes = [line for line in lines if line.startswith("16 x 4 ")][2]
    assert boxes.split()[3:] == ["10.0", "12.0", "20.0", "15.0", "20.0", "60.0"]


def test_soak_seconds():
    assert compare.soak_seconds(100_000, 0.0) == 1.0  # no rate known yet
    assert compare.soak_seconds(100_000, 10_000) == pytest.approx(10.0)
    assert compare.soak_seconds(100_000, 1_000) == 10.0
    assert compare.soak_seconds(10, 10_000) == 0.5
