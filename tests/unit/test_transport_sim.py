"""The simulated transport: one step laid out on the links, checked against hand-computed times.

The custom links have no jitter and no loss, so every time below is exact arithmetic:
a transfer of B bytes at bw bit/s over one-way latency L takes L + 8 B / bw.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edgeddl.config.loader import scenario_from_dict
from edgeddl.fleet.fleet import Fleet
from edgeddl.fleet.timeline import PipelineRequest, StepRequest, StepTimeline
from edgeddl.runtime.sim.network import SimNetwork

LINKS = {
    "a": {"up_bps": 8e6, "down_bps": 16e6, "latency_s": 0.01},
    "b": {"up_bps": 4e6, "down_bps": 8e6, "latency_s": 0.02},
    "fat": {"up_bps": 80e6, "down_bps": 80e6, "latency_s": 0.005},
    "thin": {"up_bps": 8e6, "down_bps": 8e6, "latency_s": 0.005},
}
AGG_FLOPS = 1e8  # 0.1 s per contribution on the 1 GFLOP/s coordinator
D_BYTES = 1_000_000  # model state down
U_BYTES = 500_000  # gradient up


def _fleet(links: list[str], coordinator_link: str = "fat", detect_s: float = 1.5) -> Fleet:
    raw: dict[str, Any] = {
        "fleet": {
            "devices": [
                {"name": f"d{i}", "profile": "dev", "link": x} for i, x in enumerate(links)
            ],
            "coordinator": {"profile": "coord", "link": coordinator_link},
            "failure_detection_s": detect_s,
        },
        "profiles": {
            "dev": {"flops_per_s": 1e9, "memory_bytes": 1e9},
            "coord": {"flops_per_s": 1e9, "memory_bytes": 1e9},
        },
        "links": LINKS,
    }
    return Fleet.from_scenario(scenario_from_dict(raw))


def _step(
    transport: SimNetwork,
    data_s: list[float],
    compute_s: list[float],
    *,
    start_s: float = 0.0,
    crash_at_s: dict[int, float] | None = None,
    needs_model: list[bool] | None = None,
    idx: list[int] | None = None,
    up_bytes: int = U_BYTES,
    down_bytes: int = D_BYTES,
    deadline_s: float = 0.0,
) -> StepTimeline:
    n = len(data_s)
    devices = np.arange(n) if idx is None else np.array(idx)
    crashes = crash_at_s or {}
    return transport.step(
        StepRequest(
            start_s=start_s,
            devices=devices,
            data_s=np.array(data_s, dtype=np.float64),
            compute_s=np.array(compute_s, dtype=np.float64),
            up_bytes=up_bytes,
            down_bytes=down_bytes,
            crash_at_s=np.array([crashes.get(int(i), np.inf) for i in devices]),
            needs_model=np.array(needs_model if needs_model is not None else [False] * n),
            agg_flops=AGG_FLOPS,
            deadline_s=deadline_s,
        )
    )


def _phase_sums(tl: StepTimeline) -> np.ndarray:
    return sum((d for _, d in tl.phases), np.zeros(len(tl.devices)))


def _approx(x: Any) -> Any:
    return pytest.approx(x, rel=1e-12, abs=1e-12)


def test_unknown_topology_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown topology"):
        SimNetwork(_fleet(["a"]), "mesh", seed=0)


# --- star -------------------------------------------------------------------------------------


def test_star_one_device_is_the_sum_of_its_parts() -> None:
    tl = _step(SimNetwork(_fleet(["a"]), "star", 0), [0.3], [0.7], start_s=10.0)
    # Both access links' latencies add (0.01 + 0.005); the slower side sets the bandwidth.
    download = 0.015 + 8 * D_BYTES / min(16e6, 80e6)  # 0.515
    upload = 0.015 + 8 * U_BYTES / min(8e6, 80e6)  # 0.515
    aggregation = AGG_FLOPS / 1e9  # 0.1
    total = download + 0.3 + 0.7 + upload + aggregation
    assert tl.start_s == 10.0
    assert tl.end_s - tl.start_s == _approx(total)
    assert [s for s, _ in tl.phases] == [
        "communication",
        "data_loading",
        "compute",
        "communication",
        "idle",
    ]
    assert [float(d[0]) for _, d in tl.phases] == _approx([download, 0.3, 0.7, upload, aggregation])
    assert tl.seconds("communication")[0] == _approx(download + upload)
    assert tl.contributed.tolist() == [True]
    assert tl.bytes_up.tolist() == [U_BYTES] and tl.bytes_down.tolist() == [D_BYTES]


def test_star_expected_link_time_matches_an_uncontended_step() -> None:
    transport = SimNetwork(_fleet(["a"]), "star", 0)
    tl = _step(transport, [0.0], [0.0])
    expected = transport.expected_link_s(np.array([0]), U_BYTES, D_BYTES)
    assert expected[0] == _approx(tl.seconds("communication")[0])
    ring = SimNetwork(_fleet(["a", "b"]), "ring", 0)
    assert ring.expected_link_s(np.array([0, 1]), U_BYTES, D_BYTES).tolist() == [0.0, 0.0]


def test_star_deadline_drops_a_straggler_and_ends_the_step_there() -> None:
    transport = SimNetwork(_fleet(["a", "a", "a"]), "star", 0)
    late = _step(transport, [0.0, 0.0, 0.0], [0.2, 5.0, 0.3], crash_at_s={2: 1.0})
    assert late.end_s > 6.0  # without a deadline the server waits for the slow device
    tl = _step(
        transport,
        [0.0, 0.0, 0.0],
        [0.2, 5.0, 0.3],
        start_s=10.0,
        deadline_s=3.0,
        crash_at_s={2: 11.0},
    )
    assert tl.end_s == _approx(13.0)  # neither the straggler nor crash detection is waited for
    assert tl.contributed.tolist() == [True, False, False]
    assert tl.dropped is not None and tl.dropped.tolist() == [False, True, False]  # 2 crashed
    assert tl.bytes_up.tolist() == [U_BYTES, 0, 0]
    np.testing.assert_allclose(_phase_sums(tl), [3.0, 3.0, 1.0], rtol=1e-12)
    assert tl.seconds("compute")[1] == _approx(3.0 - tl.phases[0][1][1])  # cut at the deadline
    on_time = _step(transport, [0.0, 0.0, 0.0], [0.2, 0.2, 0.2], deadline_s=3.0)
    assert on_time.dropped is not None and not on_time.dropped.any()
    assert on_time.end_s < 3.0  # all in: the step ends when the last update is taken in


def test_star_coordinator_serves_fastest_link_first_and_queues() -> None:
    # A thin coordinator link (8 Mbit/s each way) is a shared server: 1 s per model copy out.
    transport = SimNetwork(_fleet(["b", "a"], coordinator_link="thin"), "star", 0)
    tl = _step(transport, [0.1, 0.1], [0.2, 0.4], idx=[0, 1])
    # Own paths: b 0.025 + 1.0, a 0.015 + 1.0; a is first, b waits for a's copy: 1.015 + 1.0.
    recv = np.array([2.015, 1.015])
    done = recv + np.array([0.3, 0.5])  # b 2.315, a 1.515
    # Up: b 0.025 + 4e6 / 4e6 = 1.025 s; a 0.015 + 4e6 / 8e6 = 0.515 s (>= 0.5 s of service).
    arrive = done + np.array([1.025, 0.515])  # b 3.34, a 2.03: no queueing on the way in
    end = arrive.max() + 2 * 0.1
    assert tl.end_s == _approx(end)
    np.testing.assert_allclose(tl.phases[0][1], recv, rtol=1e-12)
    np.testing.assert_allclose(tl.phases[3][1], arrive - done, rtol=1e-12)
    np.testing.assert_allclose(tl.phases[4][1], end - arrive, rtol=1e-12)


def test_star_uploads_queue_on_the_coordinator_downlink() -> None:
    transport = SimNetwork(_fleet(["a", "a"], coordinator_link="thin"), "star", 0)
    tl = _step(transport, [0.0, 0.0], [1.0, 0.0])
    # Down: 1.015 for d0, then d1 behind it at 2.015 (ties keep the device order).
    # Both are done at 2.015; their own upload paths end at 2.53, but the coordinator's
    # downlink takes 0.5 s per gradient: d1's arrives at 3.03.
    np.testing.assert_allclose(tl.phases[0][1], [1.015, 2.015], rtol=1e-12)
    np.testing.assert_allclose(tl.phases[3][1], [0.515, 1.015], rtol=1e-12)
    assert tl.end_s == _approx(3.03 + 0.2)
    np.testing.assert_allclose(tl.phases[4][1], [0.7, 0.2], rtol=1e-12)


def test_star_crash_mid_step_loses_the_device_and_waits_for_detection() -> None:
    fleet = _fleet(["a", "a"], detect_s=1.5)
    start, crash = 100.0, 101.0
    tl = _step(
        SimNetwork(fleet, "star", 0), [0.0, 0.0], [1.0, 1.0], start_s=start, crash_at_s={1: crash}
    )
    # d1 receives the model at 0.615 (behind d0's 0.1 s copy on the coordinator uplink) and
    # crashes 0.385 s into its compute. d0's gradient is in at 0.515 + 1.0 + 0.515 = 2.03, but
    # the step cannot end before the crash is noticed at 1.0 + 1.5 = 2.5; then one aggregation.
    assert tl.contributed.tolist() == [True, False]
    assert tl.end_s >= crash + fleet.failure_detection_s
    assert tl.end_s - start == _approx(2.5 + 0.1)
    sums = _phase_sums(tl)
    assert sums[0] == _approx(2.6)
    assert sums[1] == _approx(crash - start)  # its time stops at the crash
    assert [float(d[1]) for _, d in tl.phases] == _approx([0.615, 0.0, 0.385, 0.0, 0.0])
    assert tl.bytes_up.tolist() == [U_BYTES, 0]
    assert tl.bytes_down.tolist() == [D_BYTES, D_BYTES]


def test_star_crash_before_the_model_arrives_downloads_nothing() -> None:
    tl = _step(
        SimNetwork(_fleet(["a", "a"]), "star", 0), [0.0, 0.0], [1.0, 1.0], crash_at_s={1: 0.3}
    )
    assert tl.contributed.tolist() == [True, False]
    assert tl.bytes_down.tolist() == [D_BYTES, 0]
    assert _phase_sums(tl)[1] == _approx(0.3)
    assert tl.end_s == _approx(2.03 + 0.1)  # detection (1.8) came before d0's gradient


def test_star_crash_after_the_gradient_is_in_still_contributes() -> None:
    tl = _step(
        SimNetwork(_fleet(["a", "a"]), "star", 0), [0.0, 0.0], [1.0, 1.0], crash_at_s={1: 2.2}
    )
    # d1's gradient arrived at 0.615 + 1.0 + 0.515 = 2.13 < 2.2.
    assert tl.contributed.tolist() == [True, True]
    assert tl.end_s == _approx(2.13 + 0.2)
    assert _phase_sums(tl)[1] == _approx(2.2)


# --- ring -------------------------------------------------------------------------------------


def _ring_phase_s(links: list[str], num_bytes: float) -> float:
    """One ring phase by hand: the slowest hop i -> i+1 moving num_bytes / m."""
    m = len(links)
    hops = []
    for i in range(m):
        src, dst = LINKS[links[i]], LINKS[links[(i + 1) % m]]
        bw = min(src["up_bps"], dst["down_bps"])
        hops.append(8 * num_bytes / m / bw + src["latency_s"] + dst["latency_s"])
    return max(hops)


@pytest.mark.parametrize("links", [["a", "a"], ["a", "b"], ["a", "a", "b"], ["b", "a", "a", "b"]])
def test_ring_time_is_two_m_minus_one_phases_by_hand(links) -> None:
    m = len(links)
    compute = [0.5 + 0.1 * i for i in range(m)]
    tl = _step(SimNetwork(_fleet(links), "ring", 0), [0.05] * m, compute, start_s=3.0)
    ring_s = 2 * (m - 1) * _ring_phase_s(links, U_BYTES)
    assert tl.end_s - 3.0 == _approx(0.05 + max(compute) + ring_s)
    np.testing.assert_allclose(_phase_sums(tl), tl.end_s - 3.0, rtol=1e-12)
    np.testing.assert_allclose(tl.seconds("idle"), max(compute) - np.array(compute), atol=1e-12)
    np.testing.assert_allclose(tl.seconds("communication"), ring_s, rtol=1e-12)
    # Each device sends (and receives) 2 (m - 1) chunks of U / m.
    ring_bytes = round(2 * (m - 1) / m * U_BYTES)
    assert tl.bytes_up.tolist() == [ring_bytes] * m
    assert tl.bytes_down.tolist() == [ring_bytes] * m
    assert tl.contributed.all()


def test_ring_by_hand_three_devices() -> None:
    # Chunks of 200 kB: a->a 0.2 + 0.02 s, a->b 0.2 + 0.03 s, b->a 0.4 + 0.03 s: 4 x 0.43 s.
    tl = _step(
        SimNetwork(_fleet(["a", "a", "b"]), "ring", 0),
        [0.0] * 3,
        [1.0, 1.0, 1.0],
        up_bytes=600_000,
    )
    assert tl.end_s == _approx(1.0 + 4 * 0.43)
    assert tl.bytes_up.tolist() == [800_000] * 3


def test_ring_of_one_device_has_no_exchange() -> None:
    tl = _step(SimNetwork(_fleet(["a"]), "ring", 0), [0.1], [0.4])
    assert tl.end_s == _approx(0.5)
    assert tl.bytes_up.tolist() == [0] and tl.bytes_down.tolist() == [0]


def test_ring_joiner_downloads_the_model_first() -> None:
    transport = SimNetwork(_fleet(["a", "a", "b"]), "ring", 0)
    plain = _step(transport, [0.0] * 3, [1.0] * 3)
    joined = _step(transport, [0.0] * 3, [1.0] * 3, needs_model=[False, False, True])
    fetch = 2 * 0.02 + 8 * D_BYTES / 8e6  # 1.04 s over b's downlink
    assert joined.phases[0][1].tolist() == _approx([0.0, 0.0, fetch])
    assert joined.end_s - plain.end_s == _approx(fetch)
    assert (joined.bytes_down - plain.bytes_down).tolist() == [0, 0, D_BYTES]
    assert joined.bytes_up.tolist() == plain.bytes_up.tolist()
    np.testing.assert_allclose(_phase_sums(joined), joined.end_s, rtol=1e-12)


def test_ring_crash_before_done_runs_the_all_reduce_among_survivors() -> None:
    fleet = _fleet(["a", "a", "b"], detect_s=1.5)
    tl = _step(SimNetwork(fleet, "ring", 0), [0.0] * 3, [1.0, 1.0, 1.2], crash_at_s={2: 0.5})
    assert tl.contributed.tolist() == [True, True, False]
    # Survivors are done at 1.0, the crash is noticed at 2.0; then a 2-device ring of a, a.
    assert tl.end_s == _approx(2.0 + 2 * _ring_phase_s(["a", "a"], U_BYTES))
    assert _phase_sums(tl)[2] == _approx(0.5)
    ring_bytes = round(2 * 1 / 2 * U_BYTES)
    assert tl.bytes_up.tolist() == [ring_bytes, ring_bytes, 0]


@pytest.mark.parametrize("topology", ["star", "ring"])
def test_crashed_device_time_stops_at_the_crash_even_if_its_work_was_long(topology) -> None:
    # d1 would compute for 10 s but crashes at 0.5 s; the step ends once the crash is noticed
    # (2.0 s) and d0's work is in, long before d1 would have been done. d1's phases must still
    # be non-negative and add up to the 0.5 s it lived.
    fleet = _fleet(["a", "a"], detect_s=1.5)
    tl = _step(SimNetwork(fleet, topology, 0), [0.0, 0.0], [1.0, 10.0], crash_at_s={1: 0.5})
    assert tl.contributed.tolist() == [True, False]
    assert tl.end_s < 10.0
    for state, d in tl.phases:
        assert d[1] >= 0.0, (state, d[1])
    assert _phase_sums(tl)[1] == _approx(0.5)


def test_ring_crash_during_the_all_reduce_runs_it_again() -> None:
    fleet = _fleet(["a", "a", "b"], detect_s=1.5)
    tl = _step(SimNetwork(fleet, "ring", 0), [0.0] * 3, [1.0] * 3, crash_at_s={2: 1.5})
    # The 3-device ring would end at 1.0 + 4 x 0.43; d2 crashes during it; it is noticed at
    # 3.0 and the two survivors run theirs.
    assert tl.contributed.tolist() == [True, True, False]
    assert tl.end_s == _approx(3.0 + 2 * _ring_phase_s(["a", "a"], U_BYTES))
    assert tl.end_s >= 1.5 + fleet.failure_detection_s
    assert _phase_sums(tl)[2] == _approx(1.5)


def test_ring_crash_while_waiting_for_slower_peers_does_not_cut_their_compute() -> None:
    # d0 is done at 1.0 and crashes idle at 1.5 (noticed at 3.0); d1 and d2 compute until 10 s.
    # The all-reduce cannot start before the survivors are done.
    fleet = _fleet(["a", "a", "b"], detect_s=1.5)
    tl = _step(SimNetwork(fleet, "ring", 0), [0.0] * 3, [1.0, 10.0, 10.0], crash_at_s={0: 1.5})
    assert tl.contributed.tolist() == [False, True, True]
    assert tl.seconds("compute")[1:].tolist() == [10.0, 10.0]
    assert tl.end_s == _approx(10.0 + 2 * _ring_phase_s(["a", "b"], U_BYTES))
    for _, d in tl.phases:
        assert np.all(d >= 0)


# --- every step: phases add up ----------------------------------------------------------------


@pytest.mark.parametrize("topology", ["star", "ring"])
@pytest.mark.parametrize("seed", range(8))
def test_phases_add_up_to_each_device_s_time_on_real_links(topology, seed) -> None:
    # Built-in links with jitter and loss: times are random, the bookkeeping is not.
    raw = {
        "fleet": {
            "devices": [
                {"name": "pi", "profile": "rpi4", "link": "wifi", "count": 3},
                {"name": "phone", "profile": "jetson_nano", "link": "lte", "count": 2},
                {"name": "pc", "profile": "pc", "link": "lan"},
            ],
            "coordinator": {"profile": "pc", "link": "lan"},
        }
    }
    fleet = Fleet.from_scenario(scenario_from_dict(raw))
    rng = np.random.default_rng(seed)
    n = fleet.num_devices
    data_s, compute_s = rng.uniform(0, 0.2, n), rng.uniform(0.1, 2.0, n)
    needs_model = rng.random(n) < 0.3
    victim = int(rng.integers(n))
    # A crash somewhere before the victim's own work is done (or none at all).
    crash = {victim: 5.0 + rng.uniform(0, data_s[victim] + compute_s[victim])} if seed % 2 else {}
    transport = SimNetwork(fleet, topology, seed)
    tl = transport.step(
        StepRequest(
            start_s=5.0,
            devices=np.arange(n),
            data_s=data_s,
            compute_s=compute_s,
            up_bytes=4_000_000,
            down_bytes=4_000_000,
            crash_at_s=np.array([crash.get(i, np.inf) for i in range(n)]),
            needs_model=needs_model,
            agg_flops=2e6,
        )
    )
    length = tl.end_s - tl.start_s
    limit = np.array([min(crash.get(i, np.inf) - 5.0, length) for i in range(n)])
    np.testing.assert_allclose(_phase_sums(tl), limit, rtol=1e-9)
    for _, d in tl.phases:
        assert np.all(d >= -1e-12)
    assert tl.contributed.tolist() == [i not in crash for i in range(n)]
    if crash:
        assert tl.end_s >= crash[victim] + fleet.failure_detection_s
    # The step is never shorter than anyone's local work.
    assert np.all(length >= (data_s + compute_s)[tl.contributed])


@pytest.mark.parametrize("topology", ["star", "ring"])
def test_everyone_lost_with_instant_detection_never_counts_time_past_the_crash(topology) -> None:
    fleet = _fleet(["a"], detect_s=0.0)
    tl = _step(SimNetwork(fleet, topology, 0), [0.001], [0.01], crash_at_s={0: 0.002})
    assert tl.contributed.tolist() == [False]
    assert _phase_sums(tl)[0] == _approx(0.002)
    assert all(d[0] >= 0.0 for _, d in tl.phases)


def test_ring_second_crash_during_the_rerun_is_lost_too() -> None:
    fleet = _fleet(["a", "a", "a"], detect_s=0.5)
    ring3 = 4 * _ring_phase_s(["a", "a", "a"], U_BYTES)
    ring2 = 2 * _ring_phase_s(["a", "a"], U_BYTES)
    # All done at 1.0; d0 crashes inside the first all-reduce, d1 inside the re-run.
    first = 1.0 + ring3 / 2
    second = first + 0.5 + ring2 / 2  # the re-run starts once d0's crash is noticed
    tl = _step(SimNetwork(fleet, "ring", 0), [0.0] * 3, [1.0] * 3, crash_at_s={0: first, 1: second})
    assert tl.contributed.tolist() == [False, False, True]
    assert tl.end_s == _approx(second + 0.5)  # alone after that: a ring of one moves nothing
    assert tl.bytes_up.tolist() == [0, 0, 0]
    assert _phase_sums(tl).tolist() == _approx([first, second, tl.end_s])


def test_lossless_ring_draws_per_kind_of_hop_match_drawing_every_hop() -> None:
    # Two kinds of hop among 50 devices; the phase maximum drawn per kind must have the
    # same distribution as the maximum over every hop drawn one by one.
    fleet = _fleet(["a"] * 30 + ["b"] * 20)
    transport = SimNetwork(fleet, "ring", seed=1)
    rng = np.random.default_rng(2)
    base = np.r_[np.full(30, 0.010), np.full(20, 0.030)]
    jit = np.r_[np.full(30, 0.002), np.full(20, 0.001)]
    phases = 20_000
    fast = [transport._ring_time_lossless(0.0, np.ones(50), base, jit, 1) for _ in range(phases)]
    brute = (base + jit * rng.exponential(size=(phases, 50))).max(axis=1)
    assert np.mean(fast) == pytest.approx(brute.mean(), rel=2e-3)
    assert np.quantile(fast, 0.99) == pytest.approx(np.quantile(brute, 0.99), rel=1e-2)
    # Without jitter it is exact: the slowest kind's base time, every phase.
    assert transport._ring_time_lossless(0.0, np.ones(50), base, 0 * jit, 7) == _approx(7 * 0.03)


# --- compressed payloads: per-device sizes, several rounds ------------------------------------


def _rounds_step(
    transport: SimNetwork,
    up: np.ndarray,
    down: np.ndarray | int,
    mid: tuple[int, ...] = (),
    crash_at_s: dict[int, float] | None = None,
) -> StepTimeline:
    n = up.shape[-1]
    crashes = crash_at_s or {}
    return transport.step(
        StepRequest(
            start_s=0.0,
            devices=np.arange(n),
            data_s=np.zeros(n),
            compute_s=np.ones(n),
            up_bytes=up,
            down_bytes=down,
            crash_at_s=np.array([crashes.get(i, np.inf) for i in range(n)]),
            needs_model=np.zeros(n, dtype=bool),
            agg_flops=0.0,
            mid_down_bytes=mid,
        )
    )


def test_star_per_device_payload_sizes_set_each_upload() -> None:
    tl = _rounds_step(SimNetwork(_fleet(["a", "a"]), "star", 0), np.array([1000, 100_000]), 0)
    up = tl.phases[3][1]
    # 8 Mbit/s uplink, 15 ms path latency: each device's own size (no queueing on 80 Mbit/s).
    assert up[0] == _approx(0.015 + 8 * 1000 / 8e6)
    assert tl.bytes_up.tolist() == [1000, 100_000]
    assert tl.bytes_down.tolist() == [0, 0]


def test_star_two_rounds_wait_for_the_reduction_in_between() -> None:
    up = np.array([[10_000], [20_000]])
    tl = _rounds_step(SimNetwork(_fleet(["a"]), "star", 0), up, 0, mid=(40_000,))
    first = 0.015 + 8 * 10_000 / 8e6
    back = 0.015 + 8 * 40_000 / 16e6
    second = 0.015 + 8 * 20_000 / 8e6
    assert tl.end_s == _approx(1.0 + first + back + second)
    assert tl.bytes_up.tolist() == [30_000] and tl.bytes_down.tolist() == [40_000]


def test_star_crash_in_the_second_round_loses_the_device() -> None:
    up = np.array([[10_000, 10_000], [20_000, 20_000]])
    transport = SimNetwork(_fleet(["a", "a"]), "star", 0)
    tl = _rounds_step(transport, up, 0, mid=(40_000,), crash_at_s={1: 1.05})
    assert tl.contributed.tolist() == [True, False]
    assert tl.bytes_up.tolist() == [30_000, 0]
    # Its first-round share was already reduced: once the crash is noticed (1.5 s later),
    # the survivor runs both rounds again.
    first = 0.015 + 8 * 10_000 / 8e6
    back = 0.015 + 8 * 40_000 / 16e6
    second = 0.015 + 8 * 20_000 / 8e6
    assert tl.end_s == _approx(1.05 + 1.5 + first + back + second)


def test_ring_runs_one_all_reduce_per_round() -> None:
    one = _rounds_step(SimNetwork(_fleet(["a", "a"]), "ring", 0), np.array([[30_000] * 2]), 0)
    two = _rounds_step(
        SimNetwork(_fleet(["a", "a"]), "ring", 0), np.array([[10_000] * 2, [20_000] * 2]), 0
    )
    # Each round pays the hop latencies again; the bytes moved are the same.
    hop_latency = 2 * 0.01
    assert two.end_s - one.end_s == _approx(2 * hop_latency)
    assert two.bytes_up.tolist() == one.bytes_up.tolist() == [30_000, 30_000]


def test_link_estimate_sees_the_path_and_the_loss() -> None:
    raw_links = {
        **LINKS,
        "lossy": {"up_bps": 1e9, "down_bps": 1e9, "latency_s": 0.05, "loss": 0.01},
    }
    raw: dict[str, Any] = {
        "fleet": {
            "devices": [
                {"name": "d0", "profile": "pc", "link": "a"},
                {"name": "d1", "profile": "pc", "link": "lossy"},
            ],
            "coordinator": {"profile": "pc", "link": "fat"},
        },
        "links": raw_links,
    }
    est = SimNetwork(Fleet.from_scenario(scenario_from_dict(raw)), "star", 0).link_estimate(
        np.array([0, 1])
    )
    assert est.up_goodput_bps[0] == 8e6  # the device's own uplink is the narrow side
    assert est.latency_s.tolist() == _approx([0.015, 0.055])
    # 1 % loss on a 110 ms round trip caps TCP far below the 80 Mbit/s path (Mathis).
    assert est.up_goodput_bps[1] == _approx(1.22 * 1448 * 8 / (0.11 * 0.1))


@pytest.mark.parametrize("topology", ["star", "ring"])
def test_step_sync_cost_ends_every_step_and_counts_as_communication(topology: str) -> None:
    import dataclasses

    plain = _step(SimNetwork(_fleet(["a", "b"]), topology, 0), [0.1, 0.2], [0.3, 0.1])
    fleet = dataclasses.replace(_fleet(["a", "b"]), step_sync_s=0.011)
    synced = _step(SimNetwork(fleet, topology, 0), [0.1, 0.2], [0.3, 0.1])
    assert synced.end_s - plain.end_s == _approx(0.011)
    comm = synced.seconds("communication") - plain.seconds("communication")
    assert comm.tolist() == _approx([0.011, 0.011])
    assert _phase_sums(synced).tolist() == _approx([synced.end_s - synced.start_s] * 2)


# --- chained steps (split learning): legs, shared coordinator resources, crashes ------------


def _chain(
    fleet: Fleet, crash_at_s: dict[int, float] | None = None, each_s: float = 0.0
) -> StepTimeline:
    """data 0.1 s, front 0.2 s, 100 kB up, 0.05 s on the coordinator, 160 kB down, back
    0.1 s; 0.04 s rear update at the end."""
    n = fleet.num_devices
    crash = np.full(n, np.inf)
    for k, at in (crash_at_s or {}).items():
        crash[k] = at

    def same(v: float) -> np.ndarray:
        return np.full(n, v)

    req = PipelineRequest(
        start_s=0.0,
        devices=np.arange(n),
        legs=[
            ("down", same(0.0)),
            ("data", same(0.1)),
            ("device", same(0.2)),
            ("up", same(100_000.0)),
            ("coordinator", same(0.05)),
            ("down", same(160_000.0)),
            ("device", same(0.1)),
        ],
        crash_at_s=crash,
        end_work_s=0.04,
        end_work_each_s=each_s,
    )
    return SimNetwork(fleet, "star", seed=0).pipeline(req)


def test_chained_step_on_one_device_adds_up_by_hand() -> None:
    # Path up: min(8, 80) Mbit/s, 15 ms; down: min(16, 80) Mbit/s, 15 ms.
    tl = _chain(_fleet(["a"]))
    up_s, down_s = 0.015 + 0.1, 0.015 + 0.08
    end = 0.1 + 0.2 + up_s + 0.05 + down_s + 0.1 + 0.04
    assert tl.end_s == pytest.approx(end)
    assert tl.contributed.tolist() == [True]
    assert tl.seconds("communication")[0] == pytest.approx(up_s + down_s)
    assert tl.seconds("compute")[0] == pytest.approx(0.3)
    assert tl.seconds("idle")[0] == pytest.approx(0.05 + 0.04)
    assert tl.bytes_up.tolist() == [100_000] and tl.bytes_down.tolist() == [160_000]


def test_chained_steps_share_the_coordinator_first_come_first_served() -> None:
    tl = _chain(_fleet(["a", "a"]), each_s=0.01)
    # Uploads arrive at 0.415 and, behind it on the coordinator's downlink (10 ms each),
    # 0.425; the coordinator serves 0.415-0.465 and 0.465-0.515; the second device's
    # gradient is back at 0.61 and its front done at 0.71.
    assert tl.end_s == pytest.approx(0.71 + 0.04 + 2 * 0.01)
    second = {s: tl.seconds(s)[1] for s in ("communication", "idle", "compute")}
    assert second["communication"] == pytest.approx(0.125 + 0.095)
    assert second["idle"] == pytest.approx(0.09 + 0.06)
    assert second["compute"] == pytest.approx(0.3)
    for k in range(2):  # every device's phases add up to the step
        assert sum(d[k] for _, d in tl.phases) == pytest.approx(tl.end_s)


def test_a_device_crashing_mid_chain_is_lost_and_noticed() -> None:
    tl = _chain(_fleet(["a", "a"], detect_s=1.5), crash_at_s={1: 0.45}, each_s=0.01)
    assert tl.contributed.tolist() == [True, False]
    assert tl.end_s == pytest.approx(0.45 + 1.5 + 0.04 + 0.01)
    assert sum(d[1] for _, d in tl.phases) == pytest.approx(0.45)  # cut at its crash
    assert tl.bytes_up.tolist() == [100_000, 100_000]  # its upload had arrived
    assert tl.bytes_down.tolist() == [160_000, 0]
