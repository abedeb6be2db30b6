"""Whole-loop behaviour: counting modes (keda.md §1.2, §6.2), victim choice (§4.7), SIGTERM drain
and grace (§6.1), determinism, and the seed spike against a static fleet."""

from __future__ import annotations

import dataclasses
import random

import pytest

from facefleet.keda.simulator.config import Strategy, TierConfig, load_tier
from facefleet.keda.simulator.dist import parse_spec
from facefleet.keda.simulator.engine import SimInput, SimResult, simulate, stats_phase
from facefleet.keda.simulator.pods import Fleet
from facefleet.keda.simulator.queue import Broker, Counting, Message
from facefleet.keda.simulator.stats import drain_time, percentile, summarize
from facefleet.keda.simulator.traffic import Traffic, parse_pattern

FIXED_0 = parse_spec("0")


def _one_long_job(counting: Counting, drain_s: int) -> SimResult:
    """One warm pod, min 0, one 200 s job at t=0, then nothing for 400 s. The worker's drain
    timeout is `drain_s` (grace = drain_s + the 15 s margin); stats refresh at t % 5 == 0."""
    tier = TierConfig(name="t", min_replicas=0, cooldown_s=30, grace_s=drain_s + 15)
    traffic = Traffic((1,) + (0,) * 399, "one job")
    sim = SimInput(
        tier,
        traffic,
        parse_spec("200"),
        parse_spec("20"),
        counting=counting,
        initial_replicas=1,
        stats_phase_s=0,
    )
    return simulate(sim)


@pytest.mark.parametrize(
    ("counting", "drain_s", "zero_while_busy", "killed"),
    [
        # AMQP counts ready only: the busy pod's queue reads 0, never active -> 0 at t=5 while
        # the job runs; the drain finishes it inside the 615 s drain timeout.
        pytest.param("amqp", 615, True, 0, id="amqp-counting-scales-busy-pod-away"),
        # Same, but the job outlives a 60 s drain timeout: the reactivation loop of §6.2.
        # Requeued at 5 + 60 (ready 1) -> active at the t=65 poll -> new pod ready at 85 takes
        # it -> inactive again, 65 + 30 < 100 -> 0 at t=100 -> requeued at 160; then 255, 350:
        # 4 kills.
        pytest.param("amqp", 60, True, 4, id="amqp-counting-kill-requeue-reactivation-loop"),
        # Management counting sees ready + unacked = 1: active until the job is acked.
        pytest.param("management", 60, False, 0, id="management-counting-keeps-busy-pod"),
    ],
)
def test_counting_mode_and_busy_pod(
    counting: Counting, drain_s: int, zero_while_busy: bool, killed: int
) -> None:
    result = _one_long_job(counting, drain_s)
    busy_at_zero = [r for r in result.rows if r[4] == 0 and r[7] > 0]
    assert bool(busy_at_zero) is zero_while_busy
    assert result.stats.killed_on_scale_in == killed


def test_management_counting_scales_to_zero_after_job_and_cooldown() -> None:
    rows = _one_long_job("management", 615).rows
    # Acked at t=200; stats show 0 from t=200; last active poll t=195; 195 + 30 < 225 is false,
    # < 230 is true.
    assert next(r[0] for r in rows if r[4] == 0) == 230


@pytest.mark.parametrize(
    ("phase", "counted_at_203", "zero_at"),
    [
        # One 201 s job on a warm pod (acked at t=201); KEDA polls every 7 s (196, 203, 210),
        # cooldown 0. Phase 0: refreshes at 200 (1 unacked) and 205, so the poll at t=203 still
        # counts the acked job -> active -> zero only at the t=210 poll.
        pytest.param(0, True, 210, id="stats-phase-0-ack-201-still-counted-by-poll-203"),
        # Phase 4: refreshes at 199 and 204: t=203 reads the 199 snapshot, 4 s old.
        pytest.param(4, True, 210, id="stats-phase-4-poll-203-reads-4s-old-count"),
        # Phase 3: a refresh at 203 itself (before the poll) sees the ack -> zero at 203.
        pytest.param(3, False, 203, id="stats-phase-3-refresh-at-203-sees-ack"),
        # Phase 1: the refresh at 201 runs after the ack in that tick.
        pytest.param(1, False, 203, id="stats-phase-1-refresh-after-ack-same-second"),
    ],
)
def test_management_stats_staleness(phase: int, counted_at_203: bool, zero_at: int) -> None:
    tier = TierConfig(name="t", min_replicas=0, cooldown_s=0, polling_interval_s=7)
    sim = SimInput(
        tier,
        Traffic((1,) + (0,) * 219, "one job"),
        parse_spec("201"),
        FIXED_0,
        initial_replicas=1,
        stats_phase_s=phase,
    )
    rows = simulate(sim).rows
    assert rows[201][3] == 0  # acked at t=201 (unacked column)
    assert (rows[203][4] == 1) is counted_at_203
    assert next(r[0] for r in rows if r[4] == 0) == zero_at


def test_stats_phase_comes_from_seed_unless_given() -> None:
    sim = SimInput(TierConfig(name="t"), Traffic((0,), "none"), FIXED_0, FIXED_0)
    phases = [stats_phase(dataclasses.replace(sim, seed=s)) for s in range(10)]
    assert set(phases) <= set(range(5))
    assert len(set(phases)) > 1  # not always aligned with the 5 s polls
    assert phases == [stats_phase(dataclasses.replace(sim, seed=s)) for s in range(10)]
    assert stats_phase(dataclasses.replace(sim, seed=3, stats_phase_s=0)) == 0


def _three_ready_pods(use_cost: bool) -> tuple[Fleet, Broker]:
    fleet = Fleet(1, 600, use_cost, FIXED_0, random.Random(0))
    fleet.add_pods(3, 0, warm=True)
    broker = Broker()
    broker.publish(Message(0, 0, 100))
    fleet._rr = 2  # deliver the job to the newest pod (id 2)
    fleet.dispatch(0, broker)
    return fleet, broker


@pytest.mark.parametrize(
    ("use_cost", "victim"),
    [
        # Same ready time: newest first, but a busy pod has a higher deletion cost -> pod 1.
        pytest.param(True, 1, id="deletion-cost-on-removes-idle-pod-first"),
        # Without pod-deletion-cost the ReplicaSet removes the newest pod, busy or not.
        pytest.param(False, 2, id="deletion-cost-off-removes-busy-newest-pod"),
    ],
)
def test_scale_in_victim(use_cost: bool, victim: int) -> None:
    fleet, broker = _three_ready_pods(use_cost)
    assert [p.pod_id for p in fleet.pods if p.jobs] == [2]
    fleet.scale_to(2, 10, broker)
    assert sorted(p.pod_id for p in fleet.active()) == sorted({0, 1, 2} - {victim})


def test_starting_pod_is_removed_before_ready_ones() -> None:
    fleet = Fleet(1, 600, True, parse_spec("90"), random.Random(0))
    fleet.add_pods(1, 0)  # starting until t=90, oldest
    fleet.add_pods(1, 5, warm=True)
    fleet.scale_to(1, 10, Broker())
    assert [p.pod_id for p in fleet.pods] == [1]


@pytest.mark.parametrize(
    ("service_s", "killed", "done_at"),
    [
        # Chart `high`: grace 630, drainMarginSeconds 15 -> FACEFLEET_DRAIN_TIMEOUT_S 615.
        pytest.param(610, 0, 610, id="job-inside-drain-timeout-finishes-and-acks"),
        # 620 s fits the 630 s grace but not the drain timeout: the worker requeues it at 615
        # and exits, before the kubelet's SIGKILL at 630.
        pytest.param(620, 1, None, id="job-past-drain-timeout-requeued-at-615-not-630"),
    ],
)
def test_sigterm_drain(service_s: int, killed: int, done_at: int | None) -> None:
    tier = load_tier(None, "high")
    assert (tier.grace_s, tier.drain_timeout_s) == (630, 615)
    fleet = Fleet(1, tier.drain_timeout_s, True, FIXED_0, random.Random(0))
    fleet.add_pods(1, 0, warm=True)
    broker = Broker()
    broker.publish(Message(0, 0, service_s))
    fleet.dispatch(0, broker)
    fleet.scale_to(0, 0, broker)  # SIGTERM at t=0
    finished = None
    for t in range(1, 700):
        fleet.finish_jobs(t, broker)
        if not fleet.pods and finished is None:
            finished = t
    assert fleet.stats.killed_on_scale_in == killed
    assert (fleet.stats.completed == 1) is (done_at is not None)
    assert finished == (done_at if done_at is not None else tier.drain_timeout_s)
    assert len(broker.ready) == killed  # a requeued job is back in the queue


def test_same_seed_same_timeline_other_seed_differs() -> None:
    tier = load_tier(None, "high")
    traffic = parse_pattern("spike:poisson=1,duration=900", random.Random("7:traffic"))
    sim = SimInput(tier, traffic, parse_spec("uniform:4,8"), parse_spec("uniform:60,120"), seed=7)
    assert simulate(sim).rows == simulate(sim).rows
    assert simulate(sim).rows != simulate(dataclasses.replace(sim, seed=8)).rows


@pytest.mark.parametrize(
    ("strategy", "over_provisioned"),
    [
        # Management counting includes running Jobs' messages: `default` subtracts them ...
        pytest.param("default", False, id="scaledjob-default-matches-management-counting"),
        # ... `accurate` assumes they are excluded and starts a Job per busy one (§5.1).
        pytest.param("accurate", True, id="scaledjob-accurate-overprovisions-with-management"),
    ],
)
def test_scaledjob_strategy_against_counting(strategy: Strategy, over_provisioned: bool) -> None:
    tier = TierConfig(
        name="b",
        mode="job",
        min_replicas=0,
        max_replicas=50,
        jobs_per_replica=1,
        strategy=strategy,
        polling_interval_s=5,
    )
    traffic = Traffic((10,) + (0,) * 299, "10 jobs")
    result = simulate(SimInput(tier, traffic, parse_spec("120"), parse_spec("30")))
    created_max = max(r[4] for r in result.rows)
    assert summarize(result)["jobs_completed"] == 10
    assert (created_max > 10) is over_provisioned


@pytest.mark.parametrize(
    ("ready", "expected"),
    [
        pytest.param([0, 0, 0], 0, id="drain-nothing-queued"),
        pytest.param([0, 1, 3, 2, 0, 0], 3, id="drain-from-first-queued-to-empty"),
        pytest.param([0, 2, 0, 1, 5, 1, 0], 3, id="drain-uses-largest-backlog-episode"),
        pytest.param([0, 1, 2], None, id="drain-never-empties"),
    ],
)
def test_drain_time(ready: list[int], expected: int | None) -> None:
    assert drain_time(ready) == expected


def test_nearest_rank_percentile() -> None:
    assert [percentile(list(range(1, 21)), q) for q in (50, 95, 100)] == [10, 19, 20]
