"""client.py failing over between proxies (``-revproc A,B``): every way a proxy can
fail a client, and what the client says about it.

Each test runs ``client.py`` as a process against a scripted peer of this process
(``Peer``: a listening socket on 127.0.0.1 port 0 whose connections follow a script:
send some bytes, stay silent, close) or a proxy that refuses, and a working proxy B
(an in-thread ``reverse_proxy.ReverseProxy`` with a ``FakeServer`` registered) that
must then answer every packet. Waits are bounded by ``-timeout`` (1 s here) and by
``conftest.WAIT``; a client that hangs fails the test through ``run``'s timeout.

* A proxy that sends part of a frame and falls silent is silent: ``-timeout`` bounds
  the wait (a partial frame used to make the client wait for ever).
* A proxy that stops reading (SIGSTOP) fails the client's sends after ``-timeout``
  seconds without progress, not after netio's 60 s send timeout.
* A full proxy's refusal (OVERLOADED without ``destid``, before any answer) means
  "did not accept": the packets go to the next proxy; an OVERLOADED answer to one
  packet (with ``destid``) is that packet's answer.
* The TLS hint follows a connection that a TLS server could have ended that way, and
  no other.
"""

import json
import re
import signal
import time

import pytest

import netio
import protocol
from conftest import free_port, read_frame, read_to_eof, run, sha1, write_packets

TIMEOUT = 1.0  # the client's -timeout in these tests, seconds
# Seconds a client may take beyond the bound under test: an interpreter's start and
# the other proxy's answers, on a loaded machine.
SLACK = 3.0
TLS_HINT = " (a proxy that serves TLS needs -tls-ca)"


def packets(count, policy="111", size=0):
    """``count`` DATA packets of ``policy``, payloads ``p0``, ``p1``... padded to
    ``size`` characters."""
    return [{"type": "0", "srcid": "c1", "privPoliId": policy,
             "payload": f"p{index}".ljust(size, "x")} for index in range(count)]


def client(pkt, *revproc, options=()):
    """Run client.py with ``-timeout 1`` through ``revproc`` (ports); return
    ``(CompletedProcess, seconds it took)``."""
    began = time.monotonic()
    done = run("client.py", "-id", "c1", "-revproc", ",".join(str(p) for p in revproc),
               "-pkt", pkt, "-timeout", TIMEOUT, *options)
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    return done, time.monotonic() - began


@pytest.fixture
def good_proxy(proxies, fake_servers):
    """Proxy B: an in-thread proxy where FakeServer 900 serves policy 111."""
    proxy = proxies()
    fake_servers("900").register(proxy.port, "111").close()
    return proxy


def answered_via(stdout, count, port):
    """The answer lines for payloads p0..p(count-1), all through 127.0.0.1:``port``."""
    lines = []
    for index in range(count):
        lines += [f"Receiving a response from the server 900 payload: {sha1(f'p{index}')} "
                  f"(via 127.0.0.1:{port})", "Hash of payload is correct"]
    return [line for line in stdout.splitlines()
            if line.startswith(("Receiving", "Hash"))] == lines


# --- Silence: -timeout bounds every wait ----------------------------------------------

def test_half_a_length_prefix_then_silence_fails_over_within_timeout(
        peers, good_proxy, tmp_path):
    def half_prefix(sock):
        sock.sendall(b"\x00\x00")  # half a length prefix, then nothing
        return "hold"

    fake = peers(half_prefix)
    pkt = write_packets(tmp_path, "one.json", packets(1))
    done, took = client(pkt, fake.port, good_proxy.port)
    assert done.returncode == 0, done.stdout + done.stderr
    assert took < TIMEOUT + SLACK
    assert done.stdout.splitlines()[:3] == [
        f"Sending message p0 to privacy policy 111 through reverse proxy running on "
        f"127.0.0.1:{fake.port}",
        f"no answer from the reverse proxy at 127.0.0.1:{fake.port} within 1 s "
        f"(-timeout); sending the 1 packet not answered through the next reverse proxy",
        f"Sending message p0 to privacy policy 111 through reverse proxy running on "
        f"127.0.0.1:{good_proxy.port}"]
    assert answered_via(done.stdout, 1, good_proxy.port)
    assert done.stderr == ""


def test_a_proxy_that_stops_reading_fails_the_sends_within_timeout(
        nodes, good_proxy, tmp_path):
    stopped = nodes.proxy()
    stopped.signal(signal.SIGSTOP)  # the kernel still accepts; nothing reads
    # 40 packets of 256 KiB: far more than the socket buffers of a connection hold.
    pkt = write_packets(tmp_path, "big.json", packets(40, size=256 << 10))
    done, took = client(pkt, stopped.port, good_proxy.port)
    assert done.returncode == 0, done.stderr
    assert took < TIMEOUT + SLACK  # not netio.SEND_TIMEOUT, 60 s
    assert (f"the reverse proxy at 127.0.0.1:{stopped.port} took no bytes of the packets "
            f"for 1 s (-timeout); sending the 40 packets not answered through the next "
            f"reverse proxy") in done.stdout.splitlines()
    assert done.stdout.count("Hash of payload is correct") == 40


# --- Refusal by a full proxy -----------------------------------------------------------

FULL = "OVERLOADED: the proxy has 1 connection open, its maximum (-max-conns); try again later"


@pytest.fixture
def full_proxy(proxies, wires):
    """A proxy with -max-conns 1, its one connection held by an idle client."""
    proxy = proxies(max_conns=1)
    holder = wires(proxy.port)
    holder.send(protocol.ping())
    assert holder.receive() == {"type": protocol.MessageType.PONG}  # it holds the slot
    return proxy


@pytest.mark.parametrize("count", [1, 40])
def test_a_full_proxy_s_refusal_sends_every_packet_through_the_next(
        full_proxy, good_proxy, tmp_path, count):
    pkt = write_packets(tmp_path, "p.json", packets(count))
    done, _ = client(pkt, full_proxy.port, good_proxy.port)
    assert done.returncode == 0, done.stdout + done.stderr
    plural = "packet" if count == 1 else "packets"
    assert (f"the reverse proxy at 127.0.0.1:{full_proxy.port} did not accept the "
            f"connection: {FULL}; sending the {count} {plural} not answered through the "
            f"next reverse proxy") in done.stdout.splitlines()
    assert "Error from the reverse proxy" not in done.stdout
    assert answered_via(done.stdout, count, good_proxy.port)


def test_a_single_full_proxy_is_a_failure_naming_its_refusal(full_proxy, tmp_path):
    pkt = write_packets(tmp_path, "p.json", packets(2))
    done, _ = client(pkt, full_proxy.port)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"client.py: the reverse proxy at 127.0.0.1:{full_proxy.port} did not accept the "
        f"connection: {FULL}"]


def test_an_overloaded_answer_to_one_packet_is_its_answer_not_a_refusal(
        peers, good_proxy, tmp_path):
    def overloaded_answer(sock):
        message = read_frame(sock)
        sock.sendall(protocol.encode_frame(protocol.error(
            protocol.OVERLOADED, "out of descriptors; try again later", message["srcid"])))
        read_to_eof(sock)

    busy = peers(overloaded_answer)
    pkt = write_packets(tmp_path, "p.json", packets(1))
    done, _ = client(pkt, busy.port, good_proxy.port)
    assert done.returncode == 1
    assert (f"Error from the reverse proxy for payload p0: OVERLOADED: out of "
            f"descriptors; try again later (via 127.0.0.1:{busy.port})"
            in done.stdout.splitlines())
    assert "next reverse proxy" not in done.stdout
    assert done.stderr == ""


# --- The TLS hint: only where a TLS server could have been the cause --------------------

# Each script reads up to the client's half-close before it answers and closes, so
# that its close is a clean end of stream, not a reset.

def tls_alert(sock):
    read_to_eof(sock)
    sock.sendall(b"\x15\x03\x03\x00\x02\x02\x46")  # a TLS alert record, as OpenSSL sends


def http_error(sock):
    read_to_eof(sock)
    sock.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")


def close_at_once(sock):
    read_to_eof(sock)


def one_answer_then_close(sock):
    message = read_frame(sock)
    read_to_eof(sock)
    sock.sendall(protocol.encode_frame(protocol.ack_for("900", message)))


def silent(sock):
    return "hold"


HINTS = {
    "TLS alert": (tls_alert, "bad answer from the reverse proxy at {where}: "
                  "FRAME_TOO_LARGE: frame length 352518912 bytes is above the maximum of "
                  "1048576 bytes" + TLS_HINT),
    "closed before any byte": (close_at_once, "the reverse proxy at {where} closed the "
                               "connection after 0 of 2 answers" + TLS_HINT),
    "HTTP answer": (http_error, "bad answer from the reverse proxy at {where}: "
                    "FRAME_TOO_LARGE: frame length 1213486160 bytes is above the maximum "
                    "of 1048576 bytes"),
    "closed after an answer": (one_answer_then_close, "the reverse proxy at {where} "
                               "closed the connection after 1 of 2 answers"),
    "silent": (silent, "no answer from the reverse proxy at {where} within 1 s (-timeout)"),
}


@pytest.mark.parametrize("script, reason", HINTS.values(), ids=HINTS.keys())
def test_tls_hint_only_when_the_proxy_may_speak_tls(peers, tmp_path, script, reason):
    peer = peers(script)
    pkt = write_packets(tmp_path, "p.json", packets(2))
    done, _ = client(pkt, peer.port)
    assert done.returncode == 1
    where = f"127.0.0.1:{peer.port}"
    assert done.stderr.splitlines() == [f"client.py: {reason.format(where=where)}"]


def test_tls_hint_for_a_plain_client_reset_by_a_tls_proxy(proxies, pki, tmp_path):
    proxy = proxies(tls=netio.server_tls_context(pki["leaf.pem"], pki["leaf.key"]))
    pkt = write_packets(tmp_path, "p.json", packets(1))
    done, _ = client(pkt, proxy.port)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert re.fullmatch(rf"client\.py: (connection to the reverse proxy at 127\.0\.0\.1:"
                        rf"{proxy.port} failed: Connection reset by peer|the reverse proxy "
                        rf"at 127\.0\.0\.1:{proxy.port} closed the connection after 0 of 1 "
                        rf"answers){re.escape(TLS_HINT)}", line), line


# --- What is printed, and when ----------------------------------------------------------

def test_sending_lines_name_the_proxy_that_accepted_and_counts_agree(good_proxy, tmp_path):
    down = free_port()
    pkt = write_packets(tmp_path, "two.json", packets(2))
    done, _ = client(pkt, down, good_proxy.port, options=("-log-format", "json"))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(line["event"], line["message"]) for line in lines[:3]] == [
        ("failover", f"cannot reach the reverse proxy at 127.0.0.1:{down}: Connection "
                     f"refused; sending the 2 packets not answered through the next "
                     f"reverse proxy"),
        ("sent", f"Sending message p0 to privacy policy 111 through reverse proxy running "
                 f"on 127.0.0.1:{good_proxy.port}"),
        ("sent", f"Sending message p1 to privacy policy 111 through reverse proxy running "
                 f"on 127.0.0.1:{good_proxy.port}")]
    assert lines[1]["proxy"] == f"127.0.0.1:{good_proxy.port}"
    assert lines[0]["packets"] == 2
    assert lines[-1]["message"] == "2 of 2 packets answered with a correct hash"
