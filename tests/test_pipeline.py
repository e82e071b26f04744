"""The pipelined data path of the proxy (PROTOCOL.md sections 3, 4 and 6), against a
ReverseProxy in a thread of the test and scriptable servers: order, exact round robin
and failover of the frames in flight, with many frames on one connection."""

import random
import socket
import struct
import threading
import time

import protocol
from conftest import WAIT, Wire, frame, sha1, wait_until


def pipelined(port, frames, timeout=WAIT):
    """Send ``frames`` (messages) on one connection from one thread while another reads
    the answers; return the answers (dicts) in the order they came."""
    wire = Wire(port, timeout=timeout)
    answers = []

    def read():
        for _ in frames:
            answer = wire.receive()
            if answer is None:
                return
            answers.append(answer)

    reader = threading.Thread(target=read)
    reader.start()
    wire.send_bytes(b"".join(protocol.encode_frame(frame) for frame in frames))
    reader.join(timeout)
    wire.close()
    return answers


def delayed(server_id, seed, longest):
    """A behaviour answering like server.py after a random delay of up to ``longest``
    seconds, so that the answers of two servers come back interleaved at random."""
    rnd = random.Random(seed)
    lock = threading.Lock()

    def behaviour(message, count):
        with lock:
            pause = rnd.random() * longest
        time.sleep(pause)  # the scripted server's own slowness, not a wait of the test
        if message["type"] == protocol.MessageType.PING:
            return protocol.pong()
        return protocol.ack_for(server_id, message)
    return behaviour


def test_10000_frames_on_one_connection_answered_in_order_round_robin(proxies, fake_servers):
    proxy = proxies()
    first = fake_servers("A", delayed("A", 1, 0.0003))
    second = fake_servers("B", delayed("B", 2, 0.001))
    first.register(proxy.port, "111")
    second.register(proxy.port, "111")
    frames = [protocol.data("c", "111", f"frame {index}") for index in range(10000)]
    answers = pipelined(proxy.port, frames, timeout=60)
    assert len(answers) == 10000
    assert [answer["payload"] for answer in answers] == [sha1(f"frame {i}") for i in range(10000)]
    assert [answer["srcid"] for answer in answers] == ["A", "B"] * 5000
    assert (first.count, second.count) == (5000, 5000)


def test_frames_in_flight_on_a_connection_that_breaks_go_to_the_next_server(proxies,
                                                                            fake_servers):
    proxy = proxies()
    # A holds 20 frames without answering, then closes: all 20 were in flight.
    held = []

    def hold_then_close(message, count):
        held.append(message)
        return "close" if count == 20 else None

    first = fake_servers("A", hold_then_close)
    second = fake_servers("B")
    first.register(proxy.port, "111")
    second.register(proxy.port, "111")
    frames = [protocol.data("c", "111", f"p{index}") for index in range(40)]
    answers = pipelined(proxy.port, frames)
    assert [answer["payload"] for answer in answers] == [sha1(f"p{i}") for i in range(40)]
    assert {answer["srcid"] for answer in answers} == {"B"}
    # Each frame reached A at most once and B exactly once.
    assert sorted(m["payload"] for m in held) == sorted(f"p{i}" for i in range(0, 40, 2))
    assert sorted(m["payload"] for m in second.received) == sorted(f"p{i}" for i in range(40))
    assert proxy.totals.failovers == 20


def test_upstream_timeout_bounds_frames_in_flight_and_moves_them(proxies, fake_servers):
    proxy = proxies(upstream_timeout=0.3)
    silent = fake_servers("S", lambda message, count: None)
    honest = fake_servers("H")
    silent.register(proxy.port, "111")
    honest.register(proxy.port, "111")
    started = time.monotonic()
    answers = pipelined(proxy.port, [protocol.data("c", "111", f"t{i}") for i in range(10)])
    elapsed = time.monotonic() - started
    assert [answer["payload"] for answer in answers] == [sha1(f"t{i}") for i in range(10)]
    assert [answer["srcid"] for answer in answers] == ["H"] * 10
    assert 0.3 <= elapsed < 0.3 + 1.0
    assert silent.count == 5 and honest.count == 10


def test_every_server_failing_a_frame_in_flight_gives_upstream_failed_naming_each(
        proxies, fake_servers):
    proxy = proxies()
    for server_id in ("A", "B"):
        fake_servers(server_id, lambda message, count: "close").register(proxy.port, "111")
    answers = pipelined(proxy.port, [protocol.data("c", "111", "x")])
    assert answers[0]["code"] == "UPSTREAM_FAILED"
    assert answers[0]["destid"] == "c"
    assert answers[0]["message"] == (
        "all 2 live servers of privacy policy 111 failed (server id A: closed the "
        "connection without answering; server id B: closed the connection without "
        "answering)")


def test_a_frame_naming_a_field_twice_is_refused_and_never_reaches_a_server(proxies,
                                                                            fake_servers):
    proxy = proxies()
    server = fake_servers("A")
    server.register(proxy.port, "111")
    wire = Wire(proxy.port)
    wire.send_body(b'{"type":0,"srcid":"c","privPoliId":"111","privPoliId":"222",'
                   b'"payload":"x"}')
    answer = wire.receive()
    assert (answer["code"], answer["message"]) == (
        "BAD_MESSAGE", "frame body names field privPoliId twice in one object; a repeated "
        "name is ambiguous")
    wire.send(protocol.data("c", "111", "after"))
    assert wire.receive()["payload"] == sha1("after")
    assert [m["payload"] for m in server.received] == ["after"]
    wire.close()


def test_string_type_is_passed_on_with_an_integer_type_other_frames_byte_for_byte(
        proxies, fake_servers):
    proxy = proxies()
    server = fake_servers("A")
    server.register(proxy.port, "111")
    wire = Wire(proxy.port)
    body = b'{"type":0, "srcid":"c","privPoliId":"111","payload":"\\u00e9","extra":[1,2]}'
    wire.send_body(body)
    assert wire.receive()["payload"] == sha1("\u00e9")
    wire.send_body(b'{"type":"0","srcid":"c","privPoliId":"111","payload":"s"}')
    assert wire.receive()["payload"] == sha1("s")
    wire.close()
    assert bytes(server.raw) == (len(body).to_bytes(4, "big") + body
                      + protocol.encode_frame({"type": 0, "srcid": "c", "privPoliId": "111",
                                               "payload": "s"}))


def test_a_client_that_reads_nothing_stops_being_read(proxies, fake_servers):
    proxy = proxies()
    # 10 KB answers: the kernel's socket buffers (a few MB on loopback, grown by
    # Linux) fill after a few hundred, and then the proxy's own limits stop it.
    big = "h" * 10000
    server = fake_servers("A", lambda message, count: protocol.ack("A", message["srcid"], big))
    server.register(proxy.port, "111")
    wire = Wire(proxy.port)
    frame = protocol.encode_frame(protocol.data("c", "111", "x"))
    total = 200000  # 10 MB of frames: more than the kernel buffers hold
    def send():
        try:
            wire.sock.sendall(frame * total)
        except OSError:
            pass  # the test closes the connection under the blocked send, at its end
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    # The proxy reads while it may, then stops: the frames it forwarded stop growing
    # well before all were sent, and the sender blocks (nothing is read from it).
    deadline = time.monotonic() + WAIT
    last = -1
    while server.count != last:
        assert time.monotonic() < deadline, "the proxy never stopped reading"
        last = server.count
        time.sleep(0.3)  # the interval over which "stopped growing" is judged
    # Answers it could not write are at most 1 MiB in the proxy (MAX_OUTPUT_BYTES),
    # the rest in the kernel's buffers: far fewer than the frames sent.
    assert last < total // 4
    assert sender.is_alive()
    wire.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked send (a close would not)
    sender.join(WAIT)
    wire.close()


def test_a_pooled_connection_the_server_closed_as_a_frame_left_is_retried_once(
        proxies, fake_servers):
    proxy = proxies()

    def closes_the_second(message, count):
        # As a server closing an idle connection just as the next frame arrives.
        return "close" if count == 2 else protocol.ack_for("A", message)

    server = fake_servers("A", closes_the_second)
    server.register(proxy.port, "111")
    wire = Wire(proxy.port)
    wire.send(protocol.data("c", "111", "first"))
    assert wire.receive()["payload"] == sha1("first")
    wire.send(protocol.data("c", "111", "second"))
    assert wire.receive()["payload"] == sha1("second")  # once more, on a new connection
    assert [m["payload"] for m in server.received] == ["first", "second", "second"]
    [policy] = proxy.stats()["policies"]
    assert [(s["state"], s["failures"]) for s in policy["servers"]] == [("up", 0)]
    wire.close()


def test_a_fresh_connection_that_fails_is_not_retried_but_failed_over(proxies,
                                                                       fake_servers):
    proxy = proxies()
    closing = fake_servers("A", lambda message, count: "close")
    closing.register(proxy.port, "111")
    honest = fake_servers("B")
    honest.register(proxy.port, "111")
    wire = Wire(proxy.port)
    wire.send(protocol.data("c", "111", "x"))
    assert wire.receive()["srcid"] == "B"
    assert closing.count == 1  # no second try on A
    wire.close()


# --- The kinds of fault a breaker found (each example is a test) ----------------------

def test_a_string_type_frame_that_grows_past_max_frame_when_encoded_is_refused(
        proxies, fake_servers):
    # "1e9" is written 1000000000.0 with the integer type: 300 bytes become 1200.
    proxy = proxies(max_frame=1000)
    server = fake_servers("A")
    server.register(proxy.port, "111")
    wire = Wire(proxy.port)
    body = (b'{"type":"0","srcid":"c","privPoliId":"111","payload":"p","n":['
            + b",".join([b"1e9"] * 80) + b"]}")
    assert len(body) <= 1000
    wire.send_body(body)
    answer = wire.receive()
    assert (answer["code"], answer["message"]) == (
        "BAD_MESSAGE", "with type 0 as an integer, this message takes 1101 bytes, above "
        "the maximum frame size of 1000 bytes; send type as an integer")
    wire.send(protocol.data("c", "111", "next"))  # the connection stays in step
    assert wire.receive()["payload"] == sha1("next")
    assert server.count == 1
    wire.close()


def test_a_server_that_closes_after_a_framing_error_keeps_its_place_and_gets_the_rest(
        proxies, fake_servers):
    # A server with a smaller -max-frame than the proxy answers FRAME_TOO_LARGE and
    # closes: the client gets that answer, the frames behind it go to the same server
    # on a fresh connection, and the server is not marked down.
    proxy = proxies()

    def small_frames(message, count):
        if len(message["payload"]) > 100:
            return [protocol.error("FRAME_TOO_LARGE", "frame length 212 bytes is above "
                                   "the maximum of 150 bytes"), "close"]
        return protocol.ack_for("A", message)

    server = fake_servers("A", small_frames)
    server.register(proxy.port, "111")
    frames = [protocol.data("c", "111", "x" * 150)] + [
        protocol.data("c", "111", f"p{i}") for i in range(5)]
    answers = pipelined(proxy.port, frames)
    assert [a.get("code", "ACK") for a in answers] == ["FRAME_TOO_LARGE"] + ["ACK"] * 5
    assert answers[0]["destid"] == "c"
    assert [a["payload"] for a in answers[1:]] == [sha1(f"p{i}") for i in range(5)]
    [policy] = proxy.stats()["policies"]
    assert [(s["state"], s["failures"]) for s in policy["servers"]] == [("up", 0)]
    assert proxy.stats()["totals"]["failovers"] == 0


def test_an_error_code_outside_the_contract_is_relayed_and_counted_as_other(
        proxies, fake_servers):
    proxy = proxies()

    def internal_then_honest(message, count):
        if count == 1:
            return protocol.error("INTERNAL", "try later", message["srcid"])
        return protocol.ack_for("A", message)

    server = fake_servers("A", internal_then_honest)
    server.register(proxy.port, "111")
    answers = pipelined(proxy.port, [protocol.data("c", "111", f"p{i}") for i in range(3)])
    assert [a.get("code", "ACK") for a in answers] == ["INTERNAL", "ACK", "ACK"]
    assert answers[0]["message"] == "try later"
    counted = proxy.stats()["totals"]["answers"]
    assert (counted["OTHER"], counted["ACK"]) == (1, 2)


def test_frames_unanswered_for_the_idle_timeout_get_timeout_then_the_connection_closes(
        proxies, fake_servers, log_watch):
    # An idle timeout below the upstream timeout: the client is not left waiting for
    # good, and every packet is answered all the same.
    proxy = proxies(idle_timeout=0.5, upstream_timeout=60)

    def first_answered_then_silence(message, count):
        return protocol.ack_for("A", message) if count == 1 else None

    server = fake_servers("A", first_answered_then_silence)
    server.register(proxy.port, "111")
    answers = pipelined(proxy.port, [protocol.data("c", "111", f"p{i}") for i in range(3)])
    timeout = {"type": protocol.MessageType.ERROR, "code": "TIMEOUT", "message":
               "no answer and no frame for 0.5 s (the proxy's idle timeout); closing"}
    assert answers == [protocol.ack_for("A", protocol.data("c", "111", "p0")),
                       timeout, timeout]
    log_watch.wait_for(r"closing connection from 127\.0\.0\.1:\d+: 2 frame\(s\) unanswered "
                       r"for 0\.5 s; answering them TIMEOUT")
    assert proxy.stats()["totals"]["answers"]["TIMEOUT"] == 2


def test_a_frame_answered_timeout_at_the_idle_timeout_is_counted_once_and_not_failed_over(
        proxies, fake_servers):
    proxy = proxies(idle_timeout=0.5, upstream_timeout=1.5)

    def first_only(message, count):
        return protocol.ack_for("A", message) if count == 1 else None

    silent_after_one = fake_servers("A", first_only)
    honest = fake_servers("B")
    silent_after_one.register(proxy.port, "111")
    honest.register(proxy.port, "111")
    answers = pipelined(proxy.port, [protocol.data("c", "111", f"p{i}") for i in range(3)])
    assert [a["code"] if "code" in a else a["srcid"] for a in answers] == ["A", "B", "TIMEOUT"]

    def server_a():
        return proxy.stats()["policies"][0]["servers"][0]

    # At the upstream timeout server A is out (a legacy server: dropped), and p2,
    # whose client has its answer, is not sent to B.
    wait_until(lambda: server_a()["state"] != "up", "server A out of the rotation")
    totals = proxy.stats()["totals"]
    assert (totals["answers"]["ACK"], totals["answers"]["TIMEOUT"], totals["failovers"]) == (
        2, 1, 0)
    assert honest.count == 1


def test_a_server_that_trickles_an_answer_is_timed_out_and_the_frame_moves_on(
        proxies, fake_servers):
    # Each byte of a never-ending answer must not move the frame's deadline.
    proxy = proxies(upstream_timeout=0.5, idle_timeout=30)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(struct.pack(">I", 100000))  # a long answer announced...
        while not stop.wait(0.05):  # ...and a byte of it every 50 ms, for ever
            try:
                conn.sendall(b" ")
            except OSError:
                break
        conn.close()

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    registration = Wire(proxy.port)
    registration.send(protocol.setup("T", "111", listener.getsockname()[1]))
    assert registration.receive()["type"] == protocol.MessageType.REGISTERED
    fake_servers("H").register(proxy.port, "111")
    started = time.monotonic()
    answers = pipelined(proxy.port, [protocol.data("c", "111", "p")])
    assert time.monotonic() - started < 0.5 + 1.0
    assert answers == [protocol.ack_for("H", protocol.data("c", "111", "p"))]
    stop.set()
    trickler.join(WAIT)
    registration.close()
    listener.close()


def test_an_error_answer_that_grows_past_max_frame_when_written_again_is_cut_to_its_fields(
        proxies, fake_servers):
    # The proxy writes an ERROR answer again (to set destid); numbers in unknown fields
    # grow then (1e9 is written 1000000000.0), and no frame may exceed -max-frame.
    proxy = proxies(max_frame=2000)
    body = (b'{"type":3,"code":"BAD_MESSAGE","message":"m","destid":"c","z":['
            + b",".join([b"1e9"] * 400) + b"]}")
    assert len(body) < 2000 < len(protocol.encode_frame(protocol.parse_message(body)))

    def swollen(message, count):
        return frame(body)

    fake_servers("A", swollen).register(proxy.port, "111")
    answers = pipelined(proxy.port, [protocol.data("c", "111", "p")])
    assert answers == [{"type": protocol.MessageType.ERROR, "code": "BAD_MESSAGE",
                        "message": "m", "destid": "c"}]


def test_a_string_type_ack_that_grows_past_max_frame_when_written_again_is_cut_to_its_fields(
        proxies, fake_servers):
    proxy = proxies(max_frame=2000)
    digest = sha1("p")
    body = (b'{"type":"2","srcid":"A","destid":"c","payloadsize":40,"payload":"'
            + digest.encode() + b'","z":[' + b",".join([b"1e9"] * 400) + b"]}")
    assert len(body) < 2000 < len(protocol.encode_frame(protocol.parse_message(body)))
    fake_servers("A", lambda message, count: frame(body)).register(proxy.port, "111")
    answers = pipelined(proxy.port, [protocol.data("c", "111", "p")])
    assert answers == [{"type": protocol.MessageType.ACK, "srcid": "A", "destid": "c",
                        "payloadsize": 40, "payload": digest}]


def test_an_error_that_cannot_fit_max_frame_with_the_clients_destid_is_a_failed_answer(
        proxies, fake_servers):
    # A server's ERROR without destid, exactly -max-frame long: with the client's
    # 256-character id added it cannot be passed on whole, nor cut to fit.
    proxy = proxies(max_frame=600)
    envelope = b'{"type":3,"code":"BAD_MESSAGE","message":""}'
    body = envelope[:-2] + b"m" * (600 - len(envelope)) + b'"}'
    assert len(body) == 600
    fake_servers("A", lambda message, count: frame(body)).register(proxy.port, "111")
    srcid = "c" * 256
    answers = pipelined(proxy.port, [protocol.data(srcid, "111", "p")])
    assert [(a["code"], a["destid"]) for a in answers] == [("UPSTREAM_FAILED", srcid)]
    assert answers[0]["message"].startswith(
        "the only live server of privacy policy 111 failed (server id A: malformed answer: "
        "its ERROR takes ")
    assert answers[0]["message"].endswith(" bytes with the client's destid, above -max-frame "
                                          "(600))")


def test_a_frame_half_read_while_the_proxy_stops_reading_is_not_timed_out(
        proxies, fake_servers):
    # 130 frames and half of one more in one write: the proxy stops reading after the
    # 128th (back-pressure) with half a frame in hand, and reads again only when the
    # slow server answers, after the frame timeout. That wait is the proxy's, so the
    # rest of the frame then gets a whole frame timeout of its own.
    proxy = proxies(frame_timeout=0.5)
    released = threading.Event()

    def slow_first(message, count):
        if count == 1:
            released.wait(WAIT)
        return protocol.ack_for("A", message)

    server = fake_servers("A", slow_first)
    server.register(proxy.port, "111")
    frames = [protocol.encode_frame(protocol.data("c", "111", f"p{i}")) for i in range(131)]
    wire = Wire(proxy.port)
    wire.send_bytes(b"".join(frames[:130]) + frames[130][:10])
    wait_until(lambda: server.count >= 1, "the first frame at the server")
    time.sleep(1.0)  # past the frame timeout: the proxy is not reading meanwhile
    released.set()
    answers = [wire.receive()]
    wire.send_bytes(frames[130][10:])  # read by the proxy once it reads again
    answers += [wire.receive() for _ in range(130)]
    assert [a["payload"] for a in answers] == [sha1(f"p{i}") for i in range(131)]
    wire.close()


def test_stopping_answers_the_frames_received_and_lingers_for_a_client_still_sending(
        proxies, fake_servers):
    proxy = proxies()
    released = threading.Event()

    def held(message, count):
        released.wait(WAIT)
        return protocol.ack_for("A", message)

    server = fake_servers("A", held)
    server.register(proxy.port, "111")
    wire = Wire(proxy.port)
    wire.send_bytes(b"".join(protocol.encode_frame(protocol.data("c", "111", f"p{i}"))
                             for i in range(3)))
    wait_until(lambda: server.count >= 1, "the first frame at the server")
    stopper = threading.Thread(target=proxy.stop, kwargs={"drain_timeout": WAIT})
    stopper.start()
    wait_until(lambda: proxy.stopping, "the drain begun")
    # The drain is one turn of the loop, which reads what has come and then reads no
    # more: a callback posted now runs after it.
    drained = threading.Event()
    proxy.loop.post(drained.set)
    assert drained.wait(WAIT)
    wire.send_bytes(protocol.encode_frame(protocol.data("c", "111", "late")) * 100)
    released.set()
    answers = [wire.receive() for _ in range(3)]
    assert [a["payload"] for a in answers] == [sha1(f"p{i}") for i in range(3)]
    # A clean end (EOF), not a reset: a reset may destroy answers still in flight.
    assert wire.sock.recv(1) == b""
    stopper.join(WAIT)


def test_at_the_end_of_the_drain_time_frames_still_unanswered_get_timeout(
        proxies, fake_servers):
    proxy = proxies()
    server = fake_servers("A", lambda message, count: None)
    server.register(proxy.port, "111")
    wire = Wire(proxy.port)
    wire.send(protocol.data("c", "111", "p"))
    wait_until(lambda: server.count >= 1, "the first frame at the server")
    started = time.monotonic()
    proxy.stop(drain_timeout=0.3)
    assert time.monotonic() - started < 0.3 + 0.5 + 0.5
    answer = wire.receive()
    assert (answer["code"], answer["destid"], answer["message"]) == (
        "TIMEOUT", "c", "the proxy is stopping, and no answer came within its 0.3 s drain "
        "time; send the frame again (to another proxy)")
    assert wire.closed()


def test_a_server_that_resets_after_connecting_is_said_to_fail_not_to_refuse(proxies):
    # The diagnosis must tell "accepted, then reset" from "cannot connect".
    proxy = proxies()
    listener = socket.create_server(("127.0.0.1", 0))

    def accept_then_reset():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # with a zero linger time: a reset

    resetter = threading.Thread(target=accept_then_reset, daemon=True)
    resetter.start()
    registration = Wire(proxy.port)
    registration.send(protocol.setup("R", "111", listener.getsockname()[1]))
    assert registration.receive()["type"] == protocol.MessageType.REGISTERED
    wire = Wire(proxy.port)
    wire.send(protocol.data("c", "111", "p"))
    answer = wire.receive()
    assert (answer["code"], answer["message"]) == (
        "UPSTREAM_FAILED", "the only live server of privacy policy 111 failed (server id R: "
        "connection failed: Connection reset by peer)")
    resetter.join(WAIT)
    wire.close()
    registration.close()
    listener.close()
