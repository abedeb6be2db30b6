"""GPU worker pods behind one Deployment: start-up, consuming, SIGTERM drain, victim choice.

The HPA and KEDA only write `replicas`; which pod dies is the ReplicaSet's ranking (keda.md §4.7)
and it knows nothing about busy pods, except through pod-deletion-cost, which our worker sets
while it holds a job. A victim stops consuming on SIGTERM and finishes its jobs; whatever is still
running when its drain timeout expires is stopped and requeued, and the worker exits (keda.md
§6.1, §8 "scale-in"). The drain timeout is the chart's FACEFLEET_DRAIN_TIMEOUT_S =
terminationGracePeriodSeconds - workers.drainMarginSeconds (consumer/worker.py `_drain`), so the
worker, not SIGKILL, ends the pod; the stop at the job's next checkpoint is taken as immediate.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from facefleet.keda.simulator.dist import Distribution
from facefleet.keda.simulator.queue import Broker, Message


@dataclass
class Pod:
    pod_id: int
    created_s: int
    ready_at_s: int
    """Created + start-up delay (scheduling, image pull, model preload, warm-up)."""
    jobs: list[tuple[Message, int]] = field(default_factory=list)
    """(message, finish second) for each job in flight; len <= prefetch."""
    sigterm_s: int | None = None

    def is_ready(self, now_s: int) -> bool:
        """Ready and serving: started up and not terminating (readiness fails on deletion)."""
        return self.sigterm_s is None and now_s >= self.ready_at_s

    def deletion_rank(self, now_s: int, use_cost: bool) -> tuple[int, int, int, int, int]:
        """ActivePodsWithRanks order, lowest deleted first (keda.md §4.7): Pending/not-Ready
        before Ready; lower pod-deletion-cost; shorter ready time; newer pod."""
        ready = self.is_ready(now_s)
        cost = len(self.jobs) if use_cost else 0  # the worker marks itself busy
        ready_since = self.ready_at_s if ready else 0
        return (int(ready), cost, -ready_since, -self.created_s, -self.pod_id)


@dataclass
class FleetStats:
    gpu_seconds: int = 0
    killed_on_scale_in: int = 0
    waits: dict[int, int] = field(default_factory=dict)
    """job_id -> seconds from arrival to the start of its last (successful) attempt."""
    completed: int = 0
    busy_pods_terminated: int = 0
    """Pods sent SIGTERM while running a job (they drain it; `killed_on_scale_in` counts the
    jobs a drain timeout then stopped)."""
    arrivals: dict[int, int] = field(default_factory=dict)
    """job_id -> arrival second, for waits within a time-of-day window."""


class Fleet:
    """The Deployment's pods, reconciled to `spec` replicas at once (controller latency ~0)."""

    def __init__(
        self,
        prefetch: int,
        drain_timeout_s: int,
        pod_deletion_cost: bool,
        startup: Distribution,
        rng: random.Random,
    ) -> None:
        self.prefetch, self.use_cost = prefetch, pod_deletion_cost
        self.drain_timeout_s = drain_timeout_s
        """Seconds from SIGTERM until the worker requeues what it still runs and exits."""
        self.startup, self.rng = startup, rng
        self.pods: list[Pod] = []
        self.stats = FleetStats()
        self._next_id = 0
        self._rr = 0

    # --- Deployment / ReplicaSet -------------------------------------------------------------

    def active(self) -> list[Pod]:
        """Pods the ReplicaSet counts in status.replicas: not terminating (keda.md §4.2)."""
        return [p for p in self.pods if p.sigterm_s is None]

    def add_pods(self, n: int, now_s: int, warm: bool = False) -> None:
        for _ in range(n):
            delay = 0 if warm else self.startup.sample(self.rng)
            self.pods.append(Pod(self._next_id, now_s, now_s + delay))
            self._next_id += 1

    def scale_to(self, spec: int, now_s: int, broker: Broker) -> None:
        active = self.active()
        if spec > len(active):
            self.add_pods(spec - len(active), now_s)
            return
        victims = sorted(active, key=lambda p: p.deletion_rank(now_s, self.use_cost))
        for pod in victims[: len(active) - spec]:
            pod.sigterm_s = now_s
            self.stats.busy_pods_terminated += bool(pod.jobs)
        self._reap(now_s, broker)

    # --- per-second work ---------------------------------------------------------------------

    def finish_jobs(self, now_s: int, broker: Broker) -> None:
        """Ack jobs whose service time is over, then end pods whose drain is done or expired."""
        for pod in self.pods:
            done = [j for j in pod.jobs if j[1] <= now_s]
            for _ in done:
                broker.ack()
                self.stats.completed += 1
            pod.jobs = [j for j in pod.jobs if j[1] > now_s]
        self._reap(now_s, broker)

    def _reap(self, now_s: int, broker: Broker) -> None:
        keep = []
        for pod in self.pods:
            if pod.sigterm_s is None:
                keep.append(pod)
            elif pod.jobs and now_s < pod.sigterm_s + self.drain_timeout_s:
                keep.append(pod)  # draining: finishing its jobs inside the drain timeout
            else:
                for msg, _ in pod.jobs:  # drain deadline: the worker requeues them and exits
                    broker.requeue(msg)
                    self.stats.killed_on_scale_in += 1
                    self.stats.waits.pop(msg.job_id, None)
        self.pods = keep

    def dispatch(self, now_s: int, broker: Broker) -> None:
        """Deliver ready messages to consumers with free prefetch slots, round-robin."""
        consumers = [p for p in self.pods if p.is_ready(now_s)]
        if not consumers:
            return
        free = sum(self.prefetch - len(p.jobs) for p in consumers)
        i = self._rr
        while free and broker.ready:
            pod = consumers[i % len(consumers)]
            i += 1
            if len(pod.jobs) < self.prefetch:
                msg = broker.deliver()
                assert msg is not None
                msg.attempts += 1
                pod.jobs.append((msg, now_s + msg.service_s))
                self.stats.waits[msg.job_id] = now_s - msg.arrived_s
                self.stats.arrivals[msg.job_id] = msg.arrived_s
                free -= 1
        self._rr = i % len(consumers)

    def account(self) -> None:
        """Charge one GPU-second per pod that exists (starting, serving or draining)."""
        self.stats.gpu_seconds += len(self.pods)

    def ready_count(self, now_s: int) -> int:
        return sum(p.is_ready(now_s) for p in self.pods)

    def busy_count(self) -> int:
        return sum(bool(p.jobs) for p in self.pods)
