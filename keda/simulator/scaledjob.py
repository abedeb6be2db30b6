"""ScaledJob tiers: how many Jobs KEDA creates per poll, and the Jobs themselves.

There is no HPA and no scale-in: each poll KEDA creates Jobs by its scaling strategy
(keda.md §5.1), and each Job pod starts up, pulls one message, runs it and exits. The strategy
must match the counting (§5.1 "Which strategy for RabbitMQ"): `default` when the queue count
includes running jobs (management API), `accurate` when it excludes them (AMQP).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from facefleet.keda.simulator.config import TierConfig
from facefleet.keda.simulator.dist import Distribution
from facefleet.keda.simulator.keda_operator import is_active
from facefleet.keda.simulator.pods import FleetStats
from facefleet.keda.simulator.queue import Broker, Message

DEFAULT_MAX_REPLICAS = 100


def max_replica_count(min_count: int, max_count: int | None) -> int:
    """ScaledJob.MaxReplicaCount() (keda.md §5): max - min when max is set, or max itself if
    min > max; 100 when max is unset."""
    if max_count is None:
        return DEFAULT_MAX_REPLICAS
    if min_count > max_count:
        return max_count
    return max_count - min_count


def jobs_to_create(tier: TierConfig, queue: float, running: int, pending: int) -> int:
    """New Jobs for one poll with one RabbitMQ trigger (keda.md §5.1, code not docs)."""
    min_count = min(tier.min_replicas, tier.max_replicas)
    mrc = max_replica_count(tier.min_replicas, tier.max_replicas)
    target = tier.jobs_per_replica
    mv = min(queue / target, mrc) if target != 0 else 0.0
    active = is_active(queue, tier.activation_jobs) or min_count > 0
    scale_to = math.ceil(queue)
    max_scale = math.ceil(min(mv, mrc))
    strategy = tier.strategy
    if strategy == "custom" and tier.custom_percentage is None:
        strategy = "default"  # an unparsable percentage falls back to default (§5)
    if running < min_count:
        eff_max = scale_to = min_count - running
    else:
        r = running - min_count
        if strategy == "custom":
            pct = tier.custom_percentage or 0.0
            deduction = tier.custom_deduction or 0
            eff_max = min(max_scale - deduction - int(r * pct), mrc)
        elif strategy == "accurate":
            eff_max = mrc - r if max_scale + r - pending > mrc else max_scale - pending
        elif strategy == "eager":
            eff_max = min(mrc - r - pending, max_scale)
            scale_to = mrc
        else:
            eff_max = max_scale - r
    eff_max = max(eff_max, 0)
    return min(scale_to, eff_max) if active and eff_max > 0 else 0


@dataclass
class Job:
    created_s: int
    ready_at_s: int
    in_flight: list[tuple[Message, int]] = field(default_factory=list)
    taken: int = 0
    last_busy_s: int = 0
    done: bool = False


class JobRunner:
    """Jobs created by the ScaledJob; never killed (no scale-in, §5.1).

    The chart's Job worker (FACEFLEET_MAX_JOBS = jobsPerReplica, FACEFLEET_IDLE_EXIT_S =
    idleExitSeconds) runs up to `prefetch` messages at once, exits after `jobsPerReplica` of them,
    or after `idleExitSeconds` without a delivery (another Job took the message it was made for).
    """

    def __init__(self, tier: TierConfig, startup: Distribution, rng: random.Random) -> None:
        self.startup, self.rng = startup, rng
        self.prefetch, self.idle_exit_s = tier.prefetch, tier.idle_exit_s
        self.max_jobs = max(1, math.ceil(tier.jobs_per_replica))
        self.jobs: list[Job] = []
        self.stats = FleetStats()

    def running(self) -> list[Job]:
        """Jobs without Complete/Failed; includes those whose pod is still starting."""
        return [j for j in self.jobs if not j.done]

    def pending(self, now_s: int) -> int:
        """Running Jobs whose pod is neither Running nor Succeeded yet."""
        return sum(1 for j in self.running() if now_s < j.ready_at_s)

    def create(self, n: int, now_s: int) -> None:
        for _ in range(n):
            ready = now_s + self.startup.sample(self.rng)
            self.jobs.append(Job(now_s, ready, last_busy_s=ready))

    def step(self, now_s: int, broker: Broker) -> None:
        """Ack finished work, take new messages, and let done or idle workers exit."""
        for job in self.running():
            if now_s < job.ready_at_s:
                continue
            for _ in [j for j in job.in_flight if j[1] <= now_s]:
                broker.ack()
                self.stats.completed += 1
            job.in_flight = [j for j in job.in_flight if j[1] > now_s]
            while len(job.in_flight) < self.prefetch and job.taken < self.max_jobs:
                msg = broker.deliver()
                if msg is None:
                    break
                msg.attempts += 1
                job.taken += 1
                job.in_flight.append((msg, now_s + msg.service_s))
                self.stats.waits[msg.job_id] = now_s - msg.arrived_s
            if job.in_flight:
                job.last_busy_s = now_s
            elif job.taken >= self.max_jobs or now_s >= job.last_busy_s + self.idle_exit_s:
                job.done = True
        self.jobs = [j for j in self.jobs if not j.done]
        self.stats.gpu_seconds += len(self.jobs)
