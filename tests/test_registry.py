"""Rotation and Registry of reverse_proxy.py without sockets (PROTOCOL.md sections 4, 6
and 7): a fake pool factory, exact choices."""

import collections
import threading

import pytest

import protocol
import reverse_proxy
from protocol import ServiceError
from reverse_proxy import DOWN, LEFT, UP, Registry, Rotation


class FakePool:
    """Stands in for a ConnectionPool: records its address and whether it was closed."""

    def __init__(self, host, port):
        self.host = host
        self.port = port
        self.closed = False

    def close(self):
        self.closed = True


class FakeUpstream:
    """What Rotation needs of an Upstream: a state, identity hashing."""

    def __init__(self, name):
        self.name = name
        self.state = UP


@pytest.fixture
def registry():
    return Registry(FakePool)


def setup(server_id, policy="p", port=9000, heartbeat=None, host=None):
    """A validated SETUP message, as the proxy hands it to the registry."""
    return protocol.validate_message(
        protocol.setup(server_id, policy, port, heartbeat=heartbeat, host=host))


def join(registry, server_id, policy="p", port=9000, heartbeat=None, host="127.0.0.1",
         **kwargs):
    """Register ``server_id``; return the new Upstream."""
    upstream, _ = registry.register(setup(server_id, policy, port, heartbeat), host, **kwargs)
    return upstream


def picks(registry, policy, count, exclude=frozenset()):
    """The ids of the next ``count`` servers chosen for ``policy``."""
    return [registry.choose(policy, exclude).key for _ in range(count)]


# --- Round robin (section 4) --------------------------------------------------------

def test_fifth_choice_of_four_servers_wraps_to_the_first(registry):
    for server_id in ("s1", "s2", "s3", "s4"):
        join(registry, server_id)
    assert picks(registry, "p", 5) == ["s1", "s2", "s3", "s4", "s1"]


def test_rotation_follows_first_registration_order_not_id_order(registry):
    for server_id in ("zeta", "alpha", 7, "mid"):
        join(registry, server_id)
    assert picks(registry, "p", 8) == ["zeta", "alpha", "7", "mid"] * 2


def test_policies_have_independent_cursors(registry):
    join(registry, "a1", "A")
    join(registry, "a2", "A")
    join(registry, "b1", "B")
    join(registry, "b2", "B")
    assert picks(registry, "A", 1) == ["a1"]
    assert picks(registry, "B", 3) == ["b1", "b2", "b1"]
    assert picks(registry, "A", 1) == ["a2"]


def test_rotation_chooses_server_k_mod_n_for_the_kth_choice():
    rotation = Rotation()
    servers = [FakeUpstream(f"s{i}") for i in range(4)]
    rotation.order.extend(servers)
    assert [rotation.choose(set()).name for _ in range(11)] == [
        f"s{k % 4}" for k in range(11)]


def test_joining_server_is_appended_and_rotation_goes_on_from_where_it_was(registry):
    for server_id in ("a", "b", "c"):
        join(registry, server_id)
    assert picks(registry, "p", 2) == ["a", "b"]
    join(registry, "d")
    assert picks(registry, "p", 5) == ["c", "d", "a", "b", "c"]


def test_server_joining_after_a_full_cycle_is_chosen_next(registry):
    for server_id in ("a", "b", "c"):
        join(registry, server_id)
    assert picks(registry, "p", 3) == ["a", "b", "c"]
    join(registry, "d")
    # The one after "c" in the order a, b, c, d is "d"; and over the 4 frames since
    # the join every server then has floor/ceil(4/4) = 1 of them.
    assert picks(registry, "p", 4) == ["d", "a", "b", "c"]


def test_leaving_server_is_skipped_and_rotation_goes_on_from_where_it_was(registry):
    servers = {server_id: join(registry, server_id, heartbeat=1)
               for server_id in ("a", "b", "c", "d")}
    assert picks(registry, "p", 1) == ["a"]
    assert registry.end_session(servers["b"]) is True
    assert servers["b"].state == LEFT
    assert picks(registry, "p", 4) == ["c", "d", "a", "c"]


def test_leaving_of_an_already_chosen_server_does_not_shift_the_rotation(registry):
    servers = {server_id: join(registry, server_id, heartbeat=1)
               for server_id in ("a", "b", "c", "d")}
    assert picks(registry, "p", 2) == ["a", "b"]
    assert registry.end_session(servers["a"]) is True
    assert picks(registry, "p", 4) == ["c", "d", "b", "c"]


def test_end_session_twice_returns_false_the_second_time(registry):
    upstream = join(registry, "a", heartbeat=1)
    assert registry.end_session(upstream) is True
    assert registry.end_session(upstream) is False


# --- Re-registration (sections 2, 6, 7) --------------------------------------------

def test_reregistration_with_same_id_keeps_its_place_and_replaces_the_old(registry):
    a = join(registry, "a", port=9001)
    old_b = join(registry, "b", port=9002, heartbeat=1)
    c = join(registry, "c", port=9003)
    assert picks(registry, "p", 1) == ["a"]
    new_b, replaced = registry.register(setup("b", "p", 9999, heartbeat=1), "10.0.0.9")
    assert replaced is old_b
    assert new_b is not old_b
    assert registry.is_current(new_b) is True
    assert registry.is_current(old_b) is False
    chosen = registry.choose("p")
    assert chosen is new_b
    assert (chosen.host, chosen.port) == ("10.0.0.9", 9999)
    assert [registry.choose("p") for _ in range(3)] == [c, a, new_b]


def test_end_of_replaced_session_does_not_remove_the_new_registration(registry):
    join(registry, "a")
    old_b = join(registry, "b", heartbeat=1)
    new_b = join(registry, "b", heartbeat=1, port=9100)
    assert registry.end_session(old_b) is False
    assert new_b.state == UP
    assert registry.is_current(new_b) is True
    assert picks(registry, "p", 4) == ["a", "b", "a", "b"]
    assert registry.choose("p") is not old_b


def test_server_that_left_and_registers_again_takes_its_old_place(registry):
    join(registry, "a", heartbeat=1)
    b = join(registry, "b", heartbeat=1)
    join(registry, "c", heartbeat=1)
    registry.end_session(b)
    assert picks(registry, "p", 2) == ["a", "c"]
    join(registry, "b", heartbeat=1)
    assert picks(registry, "p", 4) == ["a", "b", "c", "a"]
    [(policy, servers)] = registry.snapshot()
    assert [server[0] for server in servers] == ["a", "b", "c"]  # never twice


def test_integer_and_string_server_ids_are_the_same_server(registry):
    first = join(registry, 7)
    second, replaced = registry.register(setup("7", "p", 9001), "127.0.0.1")
    assert replaced is first
    assert picks(registry, "p", 2) == ["7", "7"]


def test_reregistration_with_another_policy_moves_it_to_the_end_of_that_rotation(registry):
    join(registry, "a", "p1")
    old_b = join(registry, "b", "p1")
    join(registry, "c", "p2")
    new_b, replaced = registry.register(setup("b", "p2"), "127.0.0.1")
    assert replaced is old_b
    assert picks(registry, "p1", 2) == ["a", "a"]
    assert picks(registry, "p2", 3) == ["c", "b", "c"]
    assert [(policy, [s[0] for s in servers]) for policy, servers in registry.snapshot()] == [
        ("p1", ["a"]), ("p2", ["c", "b"])]


def test_moving_the_server_under_the_cursor_keeps_the_next_one_next(registry):
    for server_id in ("a", "b", "c"):
        join(registry, server_id, "p1")
    assert picks(registry, "p1", 1) == ["a"]  # the cursor is on b
    join(registry, "b", "p2")
    assert picks(registry, "p1", 3) == ["c", "a", "c"]


def test_moving_a_server_before_the_cursor_keeps_the_next_one_next(registry):
    for server_id in ("a", "b", "c"):
        join(registry, server_id, "p1")
    assert picks(registry, "p1", 2) == ["a", "b"]  # the cursor is on c
    join(registry, "a", "p2")
    assert picks(registry, "p1", 3) == ["c", "b", "c"]


def test_moving_the_last_server_under_the_cursor_wraps_to_the_first(registry):
    for server_id in ("a", "b", "c"):
        join(registry, server_id, "p1")
    assert picks(registry, "p1", 2) == ["a", "b"]  # the cursor is on c
    join(registry, "c", "p2")
    assert picks(registry, "p1", 3) == ["a", "b", "a"]


def test_move_to_another_policy_is_unauthorized_without_move_policy(registry):
    old = join(registry, "s1", "p1", heartbeat=1)
    pools = []
    refused = Registry(lambda host, port: pools.append(FakePool(host, port)) or pools[-1])
    refused_old = join(refused, "s1", "p1", heartbeat=1)
    with pytest.raises(ServiceError) as caught:
        refused.register(setup("s1", "p2", heartbeat=1), "127.0.0.1", move_policy=False)
    assert caught.value.code == "UNAUTHORIZED"
    assert caught.value.message == ("server id s1 is registered for privacy policy p1; it "
                                    "must leave (close its session) before registering "
                                    "for p2")
    assert [pool.closed for pool in pools] == [False, True]  # the refused one's pool
    assert refused.is_current(refused_old) is True
    assert picks(refused, "p1", 2) == ["s1", "s1"]
    with pytest.raises(ServiceError) as none:
        refused.choose("p2")
    assert none.value.code == "NO_SERVER"
    # The same move with move_policy (no keys in force) is allowed.
    moved, replaced = registry.register(setup("s1", "p2", heartbeat=1), "127.0.0.1")
    assert replaced is old


def test_move_without_move_policy_is_allowed_after_the_server_left(registry):
    old = join(registry, "s1", "p1", heartbeat=1)
    registry.end_session(old)
    moved = join(registry, "s1", "p2", heartbeat=1, move_policy=False)
    assert registry.choose("p2") is moved
    with pytest.raises(ServiceError) as caught:
        registry.choose("p1")
    assert caught.value.code == "NO_SERVER"


def test_same_policy_reregistration_is_allowed_without_move_policy(registry):
    old = join(registry, "s1", "p1", heartbeat=1)
    new = join(registry, "s1", "p1", heartbeat=1, move_policy=False, port=9100)
    assert registry.is_current(new) is True
    assert registry.is_current(old) is False


# --- No server, policy text ---------------------------------------------------------

def test_choose_without_any_server_raises_no_server_naming_the_policy(registry):
    with pytest.raises(ServiceError) as caught:
        registry.choose("999")
    assert caught.value.code == "NO_SERVER"
    assert caught.value.message == "no live server serves privacy policy 999"
    assert str(caught.value) == "NO_SERVER: no live server serves privacy policy 999"


def test_choose_when_every_server_left_raises_no_server(registry):
    upstream = join(registry, "a", "555", heartbeat=1)
    registry.end_session(upstream)
    with pytest.raises(ServiceError) as caught:
        registry.choose(555)
    assert caught.value.code == "NO_SERVER"
    assert caught.value.message == "no live server serves privacy policy 555"


def test_integer_policy_111_equals_string_111(registry):
    join(registry, "a", 111)
    join(registry, "b", "111")
    assert [registry.choose(policy).key for policy in (111, "111", 111, "111")] == [
        "a", "b", "a", "b"]
    assert [policy for policy, _ in registry.snapshot()] == ["111"]


# --- Failures and health checks (section 6) -----------------------------------------

def test_mark_failed_takes_heartbeat_server_down_and_legacy_server_out(registry):
    session = join(registry, "hb", heartbeat=1)
    legacy = join(registry, "legacy")
    join(registry, "ok")
    assert registry.mark_failed(session) == DOWN
    assert registry.mark_failed(legacy) == LEFT
    assert (session.state, legacy.state) == (DOWN, LEFT)
    assert picks(registry, "p", 3) == ["ok", "ok", "ok"]
    assert registry.mark_failed(session) is None  # not UP any more


def test_mark_failed_of_a_replaced_registration_does_nothing(registry):
    old = join(registry, "a", heartbeat=1)
    new = join(registry, "a", heartbeat=1)
    assert registry.mark_failed(old) is None
    assert new.state == UP
    assert registry.choose("p") is new


def test_record_check_needs_rise_good_checks_in_a_row(registry):
    upstream = join(registry, "a", heartbeat=1)
    join(registry, "b")
    registry.mark_failed(upstream)
    results = [registry.record_check(upstream, ok, rise=3)
               for ok in (True, True, False, True, True)]
    assert results == [DOWN, DOWN, DOWN, DOWN, DOWN]
    assert picks(registry, "p", 2) == ["b", "b"]
    assert registry.record_check(upstream, True, rise=3) == UP
    assert upstream.state == UP
    assert picks(registry, "p", 2) == ["a", "b"]
    assert registry.record_check(upstream, True, rise=3) is None  # checks stop


def test_record_check_stops_for_a_server_that_left_or_was_replaced(registry):
    left = join(registry, "a", heartbeat=1)
    registry.mark_failed(left)
    registry.end_session(left)
    assert registry.record_check(left, True, rise=1) is None
    down = join(registry, "b", heartbeat=1)
    registry.mark_failed(down)
    join(registry, "b", heartbeat=1)
    assert registry.record_check(down, True, rise=1) is None
    assert down.state == DOWN


def test_mark_failed_resets_good_checks(registry):
    upstream = join(registry, "a", heartbeat=1)
    registry.mark_failed(upstream)
    assert registry.record_check(upstream, True, rise=2) == DOWN
    assert registry.record_check(upstream, True, rise=2) == UP
    registry.mark_failed(upstream)
    assert upstream.good_checks == 0
    assert registry.record_check(upstream, True, rise=2) == DOWN


# --- Exclusion (failover) -----------------------------------------------------------

def test_choose_skips_servers_already_tried(registry):
    a = join(registry, "a")
    b = join(registry, "b")
    join(registry, "c")
    assert registry.choose("p", exclude={a}).key == "b"
    assert registry.choose("p", exclude={a, b}).key == "c"
    assert registry.choose("p", exclude={b}).key == "a"


def test_choose_with_every_server_excluded_raises_no_server_and_keeps_the_cursor(registry):
    servers = {join(registry, server_id) for server_id in ("a", "b", "c")}
    assert picks(registry, "p", 1) == ["a"]
    with pytest.raises(ServiceError) as caught:
        registry.choose("p", exclude=servers)
    assert caught.value.code == "NO_SERVER"
    assert picks(registry, "p", 3) == ["b", "c", "a"]


# --- Concurrency (section 4: "under any concurrency") ------------------------------

def test_concurrent_choices_share_one_cursor_and_split_evenly(registry):
    for server_id in ("s1", "s2", "s3"):
        join(registry, server_id)
    threads, per_thread = 8, 500
    start = threading.Barrier(threads)
    counts = [collections.Counter() for _ in range(threads)]

    def worker(counter):
        start.wait()
        for _ in range(per_thread):
            counter[registry.choose("p").key] += 1

    workers = [threading.Thread(target=worker, args=(counts[i],)) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    total = sum(counts, collections.Counter())
    assert sum(total.values()) == 4000
    assert max(total.values()) - min(total.values()) <= 1
    assert total == {"s1": 1334, "s2": 1333, "s3": 1333}


# --- Snapshot, pools -----------------------------------------------------------------

def test_snapshot_lists_servers_in_order_and_marks_the_next_live_one(registry):
    s1 = join(registry, "s1", "p1", port=9001, host="10.0.0.1")
    s2 = join(registry, "s2", "p1", port=9002, host="::1", heartbeat=1)
    join(registry, 5, 111, port=9003, host="10.0.0.3")
    assert registry.choose("p1") is s1
    registry.record_served(s1)
    registry.end_session(s2)
    # The cursor stands at s2, which left: the next frame goes to s1.
    assert registry.snapshot() == [
        ("p1", [("s1", "10.0.0.1:9001", "up", 1, True),
                ("s2", "[::1]:9002", "left", 0, False)]),
        ("111", [("5", "10.0.0.3:9003", "up", 0, True)]),
    ]
    assert registry.choose("p1") is s1


def test_pool_factory_gets_host_and_port_and_close_closes_current_pools(registry):
    old = join(registry, "a", port=9001, host="10.0.0.1")
    new = join(registry, "a", port=9002, host="10.0.0.2")
    other = join(registry, "b", port=9003, host="10.0.0.3")
    assert (new.pool.host, new.pool.port) == ("10.0.0.2", 9002)
    assert new.address == "10.0.0.2:9002"
    registry.close()
    assert (new.pool.closed, other.pool.closed) == (True, True)
    assert old.pool.closed is False  # the caller closes a replaced registration's pool


def test_states_are_the_documented_strings():
    assert (reverse_proxy.UP, reverse_proxy.DOWN, reverse_proxy.LEFT) == ("up", "down", "left")
