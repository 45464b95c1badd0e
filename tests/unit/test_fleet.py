"""The fleet layer: virtual clock, membership schedule, link timing maths, fleet arrays."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeddl.config.loader import scenario_from_dict
from edgeddl.config.profiles import DEVICE_PROFILES, LINK_PROFILES
from edgeddl.config.schema import Scenario
from edgeddl.fleet.clock import FleetSchedule, VirtualClock
from edgeddl.fleet.fleet import Fleet
from edgeddl.fleet.link import MATHIS_C, MSS_BYTES, fifo_finish_s, transfer_time_s


def _scenario(events: list[tuple[float, str, str]] = (), **extra: Any) -> Scenario:
    raw: dict[str, Any] = {
        "fleet": {
            "devices": [
                {"name": "pi", "profile": "rpi4", "link": "wifi", "count": 3},
                {"name": "box", "profile": "mine", "link": "slow"},
                {"name": "pc", "profile": "pc"},
            ],
            "coordinator": {"profile": "cloud_gpu", "link": "wan"},
            "failure_detection_s": 2.5,
        },
        "profiles": {
            "mine": {
                "flops_per_s": 2e9,
                "memory_bytes": 1e6,
                "step_overhead_s": 0.5,
                "op_overhead_s": 0.01,
                "io_bytes_per_s": 1e3,
            }
        },
        "links": {"slow": {"up_bps": 1e6, "down_bps": 2e6, "latency_s": 0.1, "loss": 0.25}},
        "events": [{"at_s": t, "device": d, "action": a} for t, d, a in events],
        **extra,
    }
    return scenario_from_dict(raw)


# Device order: pi-0, pi-1, pi-2, box, pc.
PI0, PI1, PI2, BOX, PC = range(5)


# --- VirtualClock -----------------------------------------------------------------------------


def test_clock_moves_forward_and_refuses_to_go_back() -> None:
    clock = VirtualClock()
    assert clock.now_s == 0.0
    clock.advance_to(2.5)
    assert clock.now_s == 2.5
    clock.advance_to(2.5)  # staying put is fine
    assert clock.now_s == 2.5
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance_to(1.0)
    assert clock.now_s == 2.5


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.floats(min_value=0.0, max_value=1e6, allow_nan=False), max_size=30))
def test_clock_never_goes_back(targets: list[float]) -> None:
    clock = VirtualClock()
    high = 0.0
    for t in targets:
        before = clock.now_s
        try:
            clock.advance_to(t)
        except ValueError:
            assert t < before
        assert clock.now_s >= before
        high = max(high, t) if t >= before else high
        assert clock.now_s == high


# --- FleetSchedule ----------------------------------------------------------------------------


def test_first_event_join_means_absent_at_start() -> None:
    schedule = FleetSchedule(_scenario([(5.0, "pc", "join"), (1.0, "box", "leave")]))
    assert schedule.members() == [PI0, PI1, PI2, BOX]
    schedule.advance_to(1.0)
    assert schedule.members() == [PI0, PI1, PI2]
    schedule.advance_to(5.0)
    assert schedule.members() == [PI0, PI1, PI2, PC]


def test_group_name_expands_to_every_member() -> None:
    schedule = FleetSchedule(_scenario([(2.0, "pi", "leave"), (3.0, "pi", "join")]))
    applied = schedule.advance_to(2.0)
    assert sorted(ev.device for ev in applied) == [PI0, PI1, PI2]
    assert all(ev.action == "leave" and ev.at_s == 2.0 for ev in applied)
    assert schedule.members() == [BOX, PC]
    assert [ev.device for ev in schedule.advance_to(10.0)] == [PI0, PI1, PI2]
    assert schedule.members() == [PI0, PI1, PI2, BOX, PC]


def test_group_join_as_first_event_makes_the_whole_group_absent() -> None:
    schedule = FleetSchedule(_scenario([(4.0, "pi", "join")]))
    assert schedule.members() == [BOX, PC]


def test_next_crash_is_each_devices_next_crash_still_to_come() -> None:
    events = [
        (1.0, "pi-0", "leave"),
        (2.0, "pi-1", "crash"),
        (3.0, "box", "crash"),
        (4.0, "pi-0", "join"),
        (6.0, "pi-0", "crash"),
        (8.0, "pi-1", "join"),
        (9.0, "pi-1", "crash"),
    ]
    schedule = FleetSchedule(_scenario(events))
    crash = schedule.next_crash_s
    assert (crash[PI0], crash[PI1], crash[BOX]) == (6.0, 2.0, 3.0)  # a leave is not a crash
    assert crash[PC] == math.inf
    schedule.advance_to(3.0)  # applied crashes are no longer in flight: the next one is
    assert (crash[PI0], crash[PI1], crash[BOX]) == (6.0, 9.0, math.inf)
    assert schedule.num_crashes == 2


def test_advance_to_applies_events_in_time_order_whatever_the_file_order() -> None:
    events = [
        (6.0, "pi-0", "join"),
        (1.0, "pi-0", "leave"),
        (3.0, "box", "crash"),
        (3.0, "pc", "leave"),
        (2.0, "pi-2", "leave"),
    ]
    schedule = FleetSchedule(_scenario(events))
    assert schedule.next_event_s() == 1.0
    applied = schedule.advance_to(3.0)
    assert [(ev.at_s, ev.device, ev.action) for ev in applied] == [
        (1.0, PI0, "leave"),
        (2.0, PI2, "leave"),
        (3.0, BOX, "crash"),  # a tie keeps the file's order
        (3.0, PC, "leave"),
    ]
    assert schedule.members() == [PI1]
    assert schedule.next_event_s() == 6.0
    assert schedule.advance_to(5.0) == []
    assert [ev.device for ev in schedule.advance_to(6.0)] == [PI0]
    assert schedule.members() == [PI0, PI1]
    assert schedule.next_event_s() is None


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    times=st.lists(st.floats(min_value=0.0, max_value=100.0), min_size=1, max_size=8, unique=True),
    stops=st.lists(st.floats(min_value=0.0, max_value=120.0), max_size=5),
)
def test_advance_to_returns_every_event_once_in_time_order(times, stops) -> None:
    # pc alternates leave/join in time order, which is always valid; the file lists them reversed.
    ordered = sorted(times)
    events = [(t, "pc", "leave" if i % 2 == 0 else "join") for i, t in enumerate(ordered)]
    schedule = FleetSchedule(_scenario(events[::-1]))
    seen = []
    for stop in [*sorted(stops), math.inf]:
        applied = schedule.advance_to(stop)
        assert all(ev.at_s <= stop for ev in applied)
        assert schedule.next_event_s() is None or schedule.next_event_s() > stop
        seen += applied
    assert [ev.at_s for ev in seen] == ordered
    assert [ev.action for ev in seen] == [a for _, _, a in events]


# --- link maths -------------------------------------------------------------------------------


def test_transfer_time_is_latency_plus_serialization_exactly() -> None:
    # 1 MB over 8 Mbit/s is one second; plus 50 ms of latency.
    assert float(transfer_time_s(1e6, 8e6, 0.05)) == 1.05
    t = transfer_time_s(np.array([0.0, 1e6, 2e6]), np.array([8e6, 16e6, 8e6]), 0.01)
    np.testing.assert_allclose(t, [0.01, 0.51, 2.01], rtol=1e-15)


def test_transfer_time_without_rng_ignores_jitter_and_loss() -> None:
    a = transfer_time_s(1e6, 8e6, 0.05, jitter_s=0.5, loss=0.1)
    b = transfer_time_s(1e6, 8e6, 0.05, jitter_s=0.5, loss=0.1)
    assert float(a) == float(b) == 1.05


def test_transfer_time_is_reproducible_for_a_seed() -> None:
    def draw(seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return transfer_time_s(np.full(50, 1e5), 1e7, 0.02, 0.01, 0.02, rng)

    np.testing.assert_array_equal(draw(3), draw(3))
    assert not np.array_equal(draw(3), draw(4))


def test_jitter_adds_its_mean_on_average() -> None:
    rng = np.random.default_rng(0)
    n, jitter = 40_000, 0.02
    t = transfer_time_s(np.full(n, 1e6), 8e6, 0.05, jitter_s=jitter, rng=rng)
    extra = t - 1.05
    assert extra.min() >= 0.0  # jitter only delays
    # Exponential: standard error of the mean is jitter / sqrt(n) = 1e-4; allow 5 %.
    assert extra.mean() == pytest.approx(jitter, rel=0.05)
    assert extra.std() == pytest.approx(jitter, rel=0.1)  # exponential: std equals mean


def test_loss_makes_transfers_slower_on_average() -> None:
    rng = np.random.default_rng(1)
    n, num_bytes, lat = 5_000, 1e5, 0.02
    lossless = transfer_time_s(np.full(n, num_bytes), 1e7, lat, loss=0.0, rng=rng)
    lossy = transfer_time_s(np.full(n, num_bytes), 1e7, lat, loss=0.05, rng=rng)
    assert np.all(lossless == lat + 8 * num_bytes / 1e7)
    assert np.all(lossy >= lossless)
    assert lossy.mean() > lossless.mean() * 1.05


def test_a_lost_packet_costs_one_round_trip() -> None:
    # One packet (1000 B) at 10 Mbit/s, 20 ms one way, 10 % loss. Delivered first time: the
    # Mathis bound (RTT sqrt(p) / 1.22 per packet) exceeds the 0.8 ms serialization; lost: one
    # extra round trip on top of serialization.
    num_bytes, bw, lat, p = 1000.0, 1e7, 0.02, 0.1
    rtt = 2 * lat
    clean = lat + max(
        8 * num_bytes / bw, 8 * num_bytes * rtt * math.sqrt(p) / (MATHIS_C * MSS_BYTES * 8)
    )
    resent = lat + 8 * num_bytes / bw + rtt
    n = 20_000
    t = transfer_time_s(np.full(n, num_bytes), bw, lat, loss=p, rng=np.random.default_rng(5))
    is_clean, is_resent = np.isclose(t, clean, rtol=1e-12), np.isclose(t, resent, rtol=1e-12)
    assert np.all(is_clean | is_resent)
    # Binomial(20000, 0.1): standard deviation of the fraction is 0.002.
    assert is_resent.mean() == pytest.approx(p, abs=0.01)


def test_mathis_bound_dominates_large_payloads() -> None:
    # 100 MB over 100 Mbit/s, 50 ms one way, 1 % loss: retransmissions cost ~69 s but the steady
    # TCP throughput 1.22 MSS / (RTT sqrt(p)) ~ 1.4 Mbit/s makes it ~566 s.
    num_bytes, bw, lat, p = 100e6, 100e6, 0.05, 0.01
    mathis_bps = MATHIS_C * MSS_BYTES * 8 / (2 * lat * math.sqrt(p))
    expected = lat + 8 * num_bytes / mathis_bps
    t = transfer_time_s(np.full(20, num_bytes), bw, lat, loss=p, rng=np.random.default_rng(2))
    np.testing.assert_allclose(t, expected, rtol=1e-12)
    assert expected > 5 * (lat + 8 * num_bytes / bw)


def test_loss_with_zero_latency_has_no_round_trip_cost() -> None:
    t = transfer_time_s(1e6, 8e6, 0.0, loss=0.5, rng=np.random.default_rng(0))
    assert float(t) == 1.0


def _fifo_loop(ready: list[float], service: list[float]) -> list[float]:
    out, prev = [], -math.inf
    for r, s in zip(ready, service, strict=True):
        prev = max(r, prev + s)
        out.append(prev)
    return out


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=1e3, allow_nan=False),
            st.floats(min_value=0.0, max_value=1e2, allow_nan=False),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_fifo_finish_matches_a_brute_force_loop(jobs: list[tuple[float, float]]) -> None:
    ready = [r + s for r, s in jobs]  # a job is never ready before its own service time
    service = [s for _, s in jobs]
    got = fifo_finish_s(np.array(ready), np.array(service))
    np.testing.assert_allclose(got, _fifo_loop(ready, service), rtol=1e-12, atol=1e-9)
    assert np.all(got >= np.array(ready) - 1e-9)
    assert np.all(np.diff(got) >= np.array(service[1:]) - 1e-9)


def test_fifo_finish_small_case_by_hand() -> None:
    # Three 1-second jobs ready at 1, 1.5 and 5: the second waits for the first.
    got = fifo_finish_s(np.array([1.0, 1.5, 5.0]), np.array([1.0, 1.0, 1.0]))
    np.testing.assert_allclose(got, [1.0, 2.0, 5.0])


# --- Fleet arrays -----------------------------------------------------------------------------


def test_fleet_from_scenario_builds_one_entry_per_device() -> None:
    scenario = _scenario()
    fleet = Fleet.from_scenario(scenario)
    assert fleet.num_devices == 5
    assert fleet.names == ["pi-0", "pi-1", "pi-2", "box", "pc"]
    assert fleet.profile_names == ["rpi4"] * 3 + ["mine", "pc"]
    assert fleet.link_names == ["wifi"] * 3 + ["slow", "lan"]
    rpi4, pc, wifi, lan = (
        DEVICE_PROFILES["rpi4"],
        DEVICE_PROFILES["pc"],
        LINK_PROFILES["wifi"],
        LINK_PROFILES["lan"],
    )
    np.testing.assert_array_equal(fleet.flops_per_s, [rpi4.flops_per_s] * 3 + [2e9, pc.flops_per_s])
    np.testing.assert_array_equal(
        fleet.memory_bytes, [rpi4.memory_bytes] * 3 + [1e6, pc.memory_bytes]
    )
    np.testing.assert_array_equal(
        fleet.step_overhead_s, [rpi4.step_overhead_s] * 3 + [0.5, pc.step_overhead_s]
    )
    np.testing.assert_array_equal(
        fleet.io_bytes_per_s, [rpi4.io_bytes_per_s] * 3 + [1e3, pc.io_bytes_per_s]
    )
    np.testing.assert_array_equal(fleet.up_bps, [wifi.up_bps] * 3 + [1e6, lan.up_bps])
    np.testing.assert_array_equal(fleet.down_bps, [wifi.down_bps] * 3 + [2e6, lan.down_bps])
    np.testing.assert_array_equal(fleet.latency_s, [wifi.latency_s] * 3 + [0.1, lan.latency_s])
    np.testing.assert_array_equal(fleet.jitter_s, [wifi.jitter_s] * 3 + [0.0, lan.jitter_s])
    np.testing.assert_array_equal(fleet.loss, [wifi.loss] * 3 + [0.25, lan.loss])
    for a in (fleet.flops_per_s, fleet.up_bps, fleet.loss):
        assert a.dtype == np.float64
    assert fleet.coordinator == DEVICE_PROFILES["cloud_gpu"]
    assert fleet.coordinator_link == LINK_PROFILES["wan"]
    assert fleet.failure_detection_s == 2.5


def test_custom_profile_with_a_builtin_name_replaces_it() -> None:
    mine = {"flops_per_s": 2e9, "memory_bytes": 1e6}
    pc = {"flops_per_s": 3.0, "memory_bytes": 4.0}
    fleet = Fleet.from_scenario(_scenario(profiles={"mine": mine, "pc": pc}))
    assert fleet.flops_per_s[PC] == 3.0 and fleet.memory_bytes[PC] == 4.0


def test_work_time_maths() -> None:
    fleet = Fleet.from_scenario(_scenario())
    idx = np.array([BOX, PI0])
    flops, sample_bytes, ops = 1e6, 100.0, 10
    data, compute = fleet.work_time_s(idx, np.array([4, 0]), flops, sample_bytes, ops)
    # box: 4 samples * 100 B at 1 kB/s; fixed 0.5 + 10 ops * 0.01 s, plus 4 * 1e6 / 2e9.
    np.testing.assert_allclose(data, [0.4, 0.0], rtol=1e-15)
    np.testing.assert_allclose(compute, [0.5 + 0.1 + 0.002, 0.0], rtol=1e-15)
    # Zero samples cost nothing, not even the fixed per-step cost.
    data, compute = fleet.work_time_s(np.arange(5), np.zeros(5, dtype=np.int64), flops, 100.0, ops)
    assert np.all(data == 0.0) and np.all(compute == 0.0)


def test_work_time_is_linear_in_samples_with_the_fixed_cost_once() -> None:
    fleet = Fleet.from_scenario(_scenario())
    idx = np.arange(5)
    per = fleet.seconds_per_sample(3e7, 160.0)
    fixed = fleet.fixed_step_s(25)
    for n in (1, 7, 64):
        data, compute = fleet.work_time_s(idx, np.full(5, n), 3e7, 160.0, 25)
        np.testing.assert_allclose(data + compute, fixed + n * per, rtol=1e-12)
    np.testing.assert_allclose(fixed, fleet.step_overhead_s + 25 * fleet.op_overhead_s, rtol=1e-15)
    assert fixed[BOX] == pytest.approx(0.75)


def test_max_samples_is_the_memory_room_over_per_sample_bytes() -> None:
    fleet = Fleet.from_scenario(_scenario())
    caps = fleet.max_samples(fixed_bytes=2e5, bytes_per_sample=3e3)
    assert caps[BOX] == 266  # (1e6 - 2e5) / 3e3 = 266.7
    assert caps.dtype == np.int64
    # A model that does not fit leaves no room (never a negative batch).
    assert np.all(fleet.max_samples(fixed_bytes=1e15, bytes_per_sample=1.0) == 0)
