"""Rotation and Registry of registry.py without sockets (PROTOCOL.md sections 4, 6, 7
and 8): exact choices, weights and leastconn included."""

import collections
import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol
import registry as registry_module
from protocol import ServiceError
from registry import DOWN, LEASTCONN, LEFT, UP, Registry, Rotation


class FakeUpstream:
    """What Rotation needs of an Upstream: a state, a weight, a credit, frames in
    flight, identity hashing."""

    def __init__(self, name, weight=1):
        self.name = name
        self.state = UP
        self.weight = weight
        self.current = 0
        self.in_flight = 0

    def __repr__(self):
        return self.name


@pytest.fixture
def registry():
    return Registry()


def setup(server_id, policy="p", port=9000, heartbeat=None, host=None, weight=None):
    """A validated SETUP message, as the proxy hands it to the registry."""
    return protocol.validate_message(
        protocol.setup(server_id, policy, port, heartbeat=heartbeat, host=host,
                       weight=weight))


def join(registry, server_id, policy="p", port=9000, heartbeat=None, host="127.0.0.1",
         weight=None, **kwargs):
    """Register ``server_id``; return the new Upstream."""
    upstream, _ = registry.register(setup(server_id, policy, port, heartbeat, weight=weight),
                                    host, **kwargs)
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
    [policy] = registry.snapshot()
    assert [server["id"] for server in policy["servers"]] == ["a", "b", "c"]  # never twice


def test_a_server_registering_again_keeps_its_counters_in_the_same_policy_only():
    made = []
    registry = Registry(latency_factory=lambda: made.append(object()) or made[-1])
    old = join(registry, "a", heartbeat=1)
    old.served, old.failures = 13, 2
    again = join(registry, "a", heartbeat=1, port=9100)
    assert (again.served, again.failures, again.latency) == (13, 2, old.latency)
    moved = join(registry, "a", "q")  # another policy: other labels, new counters
    assert (moved.served, moved.failures) == (0, 0)
    assert moved.latency is not old.latency


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
    assert [(policy["policy"], [s["id"] for s in policy["servers"]])
            for policy in registry.snapshot()] == [
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
    refused = Registry()
    refused_old = join(refused, "s1", "p1", heartbeat=1)
    with pytest.raises(ServiceError) as caught:
        refused.register(setup("s1", "p2", heartbeat=1), "127.0.0.1", move_policy=False)
    assert caught.value.code == "UNAUTHORIZED"
    assert caught.value.message == ("server id s1 is registered for privacy policy p1; it "
                                    "must leave (close its session) before registering "
                                    "for p2")
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
    assert [policy["policy"] for policy in registry.snapshot()] == ["111"]


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


# --- Snapshot ------------------------------------------------------------------------

def test_snapshot_lists_servers_in_order_and_marks_the_next_live_one(registry):
    s1 = join(registry, "s1", "p1", port=9001, host="10.0.0.1")
    assert registry.choose("p1") is s1
    s2 = join(registry, "s2", "p1", port=9002, host="::1", heartbeat=1, weight=3)
    join(registry, 5, 111, port=9003, host="10.0.0.3")
    s1.served += 1
    registry.end_session(s2)
    # The cursor stands at s2, which left: the next frame goes to s1.
    assert registry.snapshot() == [
        {"policy": "p1", "balance": "roundrobin", "servers": [
            {"id": "s1", "address": "10.0.0.1:9001", "state": "up", "weight": 1,
             "served": 1, "in_flight": 0, "failures": 0, "next": True},
            {"id": "s2", "address": "[::1]:9002", "state": "left", "weight": 3,
             "served": 0, "in_flight": 0, "failures": 0, "next": False}]},
        {"policy": "111", "balance": "roundrobin", "servers": [
            {"id": "5", "address": "10.0.0.3:9003", "state": "up", "weight": 1,
             "served": 0, "in_flight": 0, "failures": 0, "next": True}]},
    ]
    assert registry.choose("p1") is s1


def test_snapshot_adds_the_fields_of_extra_and_the_latency_factory_makes_one_each():
    made = []
    registry = Registry(latency_factory=lambda: made.append(object()) or made[-1])
    first = join(registry, "a")
    second = join(registry, "b")
    assert (first.latency, second.latency) == (made[0], made[1])
    [policy] = registry.snapshot(lambda upstream: {"extra": upstream.key * 2})
    assert [server["extra"] for server in policy["servers"]] == ["aa", "bb"]


def test_states_are_the_documented_strings():
    assert (registry_module.UP, registry_module.DOWN, registry_module.LEFT) == (
        "up", "down", "left")


# --- Weights: smooth weighted round robin (section 8) ---------------------------------

def test_weights_5_1_1_give_nginx_smooth_order(registry):
    for server_id, weight in (("a", 5), ("b", 1), ("c", 1)):
        join(registry, server_id, weight=weight)
    assert "".join(picks(registry, "p", 14)) == "aabacaa" * 2


def test_weight_defaults_to_1_and_every_weight_1_is_plain_round_robin(registry):
    for server_id in ("a", "b", "c"):
        join(registry, server_id)
    assert registry.upstreams()[0].weight == 1
    assert picks(registry, "p", 7) == ["a", "b", "c", "a", "b", "c", "a"]


def window_counts(sequence, size):
    return [collections.Counter(sequence[start:start + size])
            for start in range(len(sequence) - size + 1)]


@settings(deadline=None, max_examples=200, database=None)
@given(weights=st.lists(st.integers(1, 9), min_size=1, max_size=5),
       before=st.integers(0, 30), cursor=st.integers(0, 5))
def test_every_window_of_w_frames_gives_each_server_exactly_its_weight(weights, before,
                                                                        cursor):
    rotation = Rotation()
    servers = [FakeUpstream(f"s{i}", weight) for i, weight in enumerate(weights)]
    rotation.order.extend(servers)
    rotation.cursor = cursor % (len(servers) + 1)
    for _ in range(before):
        rotation.choose()
    rotation.changed()  # a member joined, left or changed state: a change
    total = sum(weights)
    sequence = [rotation.choose().name for _ in range(3 * total)]
    for counts in window_counts(sequence, total):
        assert counts == {server.name: server.weight for server in servers}


def test_a_server_back_from_down_gets_no_burst(registry):
    a = join(registry, "a", weight=3, heartbeat=1)
    join(registry, "b", weight=3)
    assert picks(registry, "p", 6).count("a") == 3
    registry.mark_failed(a)
    assert picks(registry, "p", 30) == ["b"] * 30
    registry.record_check(a, True, rise=1)
    # Back up: over the next 6 frames a gets its 3, not the 18 it missed.
    after = picks(registry, "p", 12)
    assert after.count("a") == 6 and after[:6].count("a") == 3


class OldCursor:
    """The plain cursor round robin of section 4, as a reference."""

    def __init__(self):
        self.order = []
        self.cursor = 0

    def choose(self, exclude=()):
        count = len(self.order)
        for step in range(count):
            index = (self.cursor + step) % count
            upstream = self.order[index]
            if upstream.state == UP and upstream not in exclude:
                self.cursor = index + 1
                return upstream
        return None

    def remove(self, upstream):
        index = self.order.index(upstream)
        del self.order[index]
        if index < self.cursor:
            self.cursor -= 1


@settings(deadline=None, max_examples=300, database=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_every_weight_1_is_exactly_the_cursor_round_robin_under_any_changes(seed):
    rnd = random.Random(seed)
    rotation, reference, servers = Rotation(), OldCursor(), []
    for _ in range(60):
        roll = rnd.random()
        if roll < 0.15 or not servers:
            server = FakeUpstream(f"s{len(servers)}")
            servers.append(server)
            rotation.order.append(server)
            reference.order.append(server)
            rotation.changed()
        elif roll < 0.25:
            server = rnd.choice(servers)
            server.state = UP if server.state != UP else rnd.choice([DOWN, LEFT])
            rotation.changed()
        elif roll < 0.3 and len(rotation.order) > 1:
            server = rnd.choice(rotation.order)
            rotation.remove(server)
            reference.remove(server)
        else:
            exclude = (set(rnd.sample(rotation.order, 1)) if rnd.random() < 0.2 else set())
            assert rotation.choose(exclude) is reference.choose(exclude)


# --- Least connections (section 8) ----------------------------------------------------

def test_leastconn_picks_the_fewest_in_flight_per_weight_ties_from_the_cursor():
    registry = Registry(balance=lambda policy: LEASTCONN)
    a = join(registry, "a")
    b = join(registry, "b", weight=2)
    c = join(registry, "c")
    assert registry.snapshot()[0]["balance"] == "leastconn"
    # All idle: ties taken in turn from the cursor.
    assert picks(registry, "p", 3) == ["a", "b", "c"]
    a.in_flight, b.in_flight, c.in_flight = 2, 3, 2
    # in flight / weight: a 2, b 1.5, c 2.
    assert registry.choose("p") is b
    b.in_flight = 4  # b 2: a, b and c tie; the cursor stands after b
    assert registry.choose("p") is c
    assert registry.choose("p", exclude={a, c}) is b


def test_leastconn_skips_servers_that_are_not_up():
    registry = Registry(balance=lambda policy: LEASTCONN)
    a = join(registry, "a", heartbeat=1)
    join(registry, "b").in_flight = 5
    registry.mark_failed(a)
    assert picks(registry, "p", 2) == ["b", "b"]


def test_balance_is_asked_once_per_policy():
    asked = []
    registry = Registry(balance=lambda policy: asked.append(policy) or "roundrobin")
    join(registry, "a", "p1")
    join(registry, "b", "p1")
    join(registry, "c", "p2")
    assert asked == ["p1", "p2"]
