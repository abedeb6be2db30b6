"""ScaledJob Jobs created per poll (keda.md §5.1, the code's formulas, not the docs')."""

from __future__ import annotations

import dataclasses
import random

import pytest

from facefleet.keda.simulator.config import Strategy, TierConfig
from facefleet.keda.simulator.dist import parse_spec
from facefleet.keda.simulator.queue import Broker, Message
from facefleet.keda.simulator.scaledjob import JobRunner, jobs_to_create, max_replica_count


def _tier(
    strategy: Strategy = "default",
    max_r: int = 10,
    min_r: int = 0,
    target: float = 1,
    activation: float = 0,
    deduction: int | None = None,
    pct: float | None = None,
) -> TierConfig:
    return TierConfig(
        name="batch",
        mode="job",
        strategy=strategy,
        max_replicas=max_r,
        min_replicas=min_r,
        jobs_per_replica=target,
        activation_jobs=activation,
        custom_deduction=deduction,
        custom_percentage=pct,
    )


@pytest.mark.parametrize(
    ("tier", "queue", "running", "pending", "expected"),
    [
        # Docs table: Q=10, max 3, T=1, 1 running -> maxScale 3 - 1 = 2 new Jobs.
        pytest.param(_tier(max_r=3), 10, 1, 0, 2, id="default-docs-example"),
        # default subtracts running Jobs: maxScale 6 - 4 = 2.
        pytest.param(_tier(), 6, 4, 0, 2, id="default-subtracts-running"),
        # accurate: 6 + 4 - 0 = 10 is not > 10 -> maxScale - pending = 6.
        pytest.param(_tier("accurate"), 6, 4, 0, 6, id="accurate-ignores-running-below-max"),
        # accurate: 5 + 3 - 2 = 6 <= 10 -> 5 - 2 = 3.
        pytest.param(_tier("accurate"), 5, 3, 2, 3, id="accurate-subtracts-pending"),
        # accurate: 8 + 5 - 0 = 13 > 10 -> MRC - running = 5.
        pytest.param(_tier("accurate"), 8, 5, 0, 5, id="accurate-caps-at-max-minus-running"),
        # eager: min(10 - 4 - 0, 6) = 6, scaleTo = MRC = 10 -> 6.
        pytest.param(_tier("eager"), 6, 4, 0, 6, id="eager-fills-free-slots"),
        # eager: min(10 - 3 - 1, 2) = 2.
        pytest.param(_tier("eager"), 2, 3, 1, 2, id="eager-bounded-by-queue"),
        # custom: min(10 - 1 - int(4 * 0.5), 10) = 7.
        pytest.param(
            _tier("custom", deduction=1, pct=0.5), 10, 4, 0, 7, id="custom-deduction-and-percentage"
        ),
        # custom without a percentage falls back to default: 10 - 4 = 6.
        pytest.param(_tier("custom", deduction=1), 10, 4, 0, 6, id="custom-without-pct-is-default"),
        # Not active: Q == activationValue and minReplicaCount 0.
        pytest.param(
            _tier(activation=2), 2, 0, 0, 0, id="inactive-at-activation-value-creates-none"
        ),
        # running < min: scaleTo = effMax = min - running = 2, even with an empty queue.
        pytest.param(_tier(min_r=2), 0, 0, 0, 2, id="min-replicas-tops-up-empty-queue"),
        # T=2: mv = 2.5 -> maxScale 3; scaleTo = 5 -> 3.
        pytest.param(_tier(target=2), 5, 0, 0, 3, id="target-two-jobs-per-job-rounds-up"),
        # MRC = max - min = 10 - 4 = 6: Q=20 -> maxScale 6; r = 4 - 4 = 0 -> 6.
        pytest.param(_tier(min_r=4), 20, 4, 0, 6, id="max-replica-count-is-max-minus-min"),
    ],
)
def test_jobs_to_create(
    tier: TierConfig, queue: float, running: int, pending: int, expected: int
) -> None:
    assert jobs_to_create(tier, queue, running, pending) == expected


@pytest.mark.parametrize(
    ("min_count", "max_count", "expected"),
    [
        # keda.md §5: MaxReplicaCount() = max - min when max is set ...
        pytest.param(0, 10, 10, id="mrc-max-when-min-zero"),
        pytest.param(4, 10, 6, id="mrc-max-minus-min"),
        pytest.param(10, 10, 0, id="mrc-min-equal-max-leaves-none-above-min"),
        # ... or max itself if min > max (not max - min(min, max) = 0).
        pytest.param(12, 10, 10, id="mrc-min-above-max-is-max"),
        pytest.param(3, None, 100, id="mrc-unset-max-is-100"),
    ],
)
def test_max_replica_count(min_count: int, max_count: int | None, expected: int) -> None:
    assert max_replica_count(min_count, max_count) == expected


@pytest.mark.parametrize(
    ("jobs_per_replica", "idle_exit_s", "queued", "exit_at", "left_in_queue"),
    [
        # FACEFLEET_MAX_JOBS = 2: takes a job at t=0 and t=5 (5 s each), exits at t=10.
        pytest.param(2, 60, 3, 10, 1, id="job-worker-exits-after-jobs-per-replica"),
        # Nothing to take: exits idleExitSeconds after becoming ready.
        pytest.param(1, 60, 0, 60, 0, id="job-worker-idle-exit"),
    ],
)
def test_job_worker_lifecycle(
    jobs_per_replica: int, idle_exit_s: int, queued: int, exit_at: int, left_in_queue: int
) -> None:
    tier = dataclasses.replace(_tier(target=jobs_per_replica), idle_exit_s=idle_exit_s)
    runner = JobRunner(tier, parse_spec("0"), random.Random(0))
    broker = Broker()
    for i in range(queued):
        broker.publish(Message(i, 0, 5))
    runner.create(1, 0)
    exited = None
    for t in range(100):
        runner.step(t, broker)
        if exited is None and not runner.running():
            exited = t
    assert exited == exit_at
    assert len(broker.ready) == left_in_queue
