"""The per-second loop: one tick runs every control loop due at that second, in a fixed order.

Order within second t (keda.md §8 "clocks"):

    1. arrivals(t) are published (ready)
    2. jobs whose service time ended are acked; drained/expired terminating pods go away
    3. ready consumers with free prefetch slots receive messages (wait = t - arrival)
    4. the broker's management stats refresh every 5 s at the run's stats phase (§1.2)
    5. KEDA polls if due (every pollingInterval from t=0, §2.1) and may write replicas
    6. the HPA syncs if due (every 15 s from its phase, §3.2, §4.4) and may write replicas

With `scaling.trigger` work, latency or predictive, steps 5 and 6 read `facefleet scaler`'s
answer instead of the queue count: keda/scaling.py's `read` on a TierView built from what the
scaler would see (the management API's stale ready/unacked snapshot; each ready job's cost and
each running job's elapsed time from the events stream, live; the oldest ready job's age), and
for `predictive` a SeasonalForecast fed every arrival's work. The estimate of a job's cost is its
true service time: the cost model's error is not modelled.
    7. one GPU-second is charged per existing pod; a timeline row is recorded

Every random draw comes from a `random.Random` seeded from (seed, purpose), so a run is a pure
function of its inputs and the planner compares candidates on the very same jobs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from facefleet.keda.scaling import Params, Reading, Running, SeasonalForecast, TierView, read
from facefleet.keda.simulator.config import TierConfig
from facefleet.keda.simulator.dist import Distribution
from facefleet.keda.simulator.hpa import Hpa
from facefleet.keda.simulator.keda_operator import KedaOperator
from facefleet.keda.simulator.pods import Fleet, FleetStats
from facefleet.keda.simulator.queue import STATS_INTERVAL_S, Broker, Counting, Message
from facefleet.keda.simulator.scaledjob import JobRunner, jobs_to_create
from facefleet.keda.simulator.traffic import Traffic

TIMELINE_COLUMNS = (
    "t",
    "arrivals",
    "ready",
    "unacked",
    "desired_replicas",
    "replicas",
    "ready_replicas",
    "busy_pods",
)
Row = tuple[int, int, int, int, int, int, int, int]


@dataclass(frozen=True)
class SimInput:
    tier: TierConfig
    traffic: Traffic
    service: Distribution
    startup: Distribution
    seed: int = 0
    counting: Counting = "management"
    hpa_phase_s: int = 0
    stats_phase_s: int | None = None
    """Second (0..4) of the broker's first stats refresh; None derives it from the seed."""
    initial_replicas: int | None = None
    """Warm pods at t=0; None = the steady state for an empty queue (minReplicas)."""
    static_replicas: int | None = None
    """Set to simulate a fixed, always-warm fleet with no autoscaler (the cost baseline)."""


@dataclass
class SimResult:
    rows: list[Row]
    stats: FleetStats
    jobs: int
    unstarted_waits: list[int]
    """Censored waits (end - arrival) of jobs still queued when the run ended."""


def _rng(seed: int, purpose: str) -> random.Random:
    return random.Random(f"{seed}:{purpose}")


def stats_phase(sim: SimInput) -> int:
    """The management API's refresh phase: explicit, or drawn from the seed (keda.md §1.2)."""
    if sim.stats_phase_s is not None:
        return sim.stats_phase_s % STATS_INTERVAL_S
    return _rng(sim.seed, "stats-phase").randrange(STATS_INTERVAL_S)


def simulate(sim: SimInput) -> SimResult:
    """Run the tier through the traffic; deterministic for a given input."""
    broker = Broker(stats_phase(sim))
    service_rng = _rng(sim.seed, "service")
    rows: list[Row] = []
    tick: _JobTick | _DeploymentTick
    if sim.tier.mode == "job" and sim.static_replicas is None:
        tick = _JobTick(sim, broker)
    else:
        tick = _DeploymentTick(sim, broker)
    forecast = tick.forecast if isinstance(tick, _DeploymentTick) else None
    job_id = 0
    for t, n in enumerate(sim.traffic.arrivals):
        for _ in range(n):
            msg = Message(job_id, t, max(1, sim.service.sample(service_rng)))
            broker.publish(msg)
            if forecast is not None:
                forecast.add(t, msg.service_s)
            job_id += 1
        rows.append((t, n, *tick(t)))
    end = len(sim.traffic.arrivals)
    return SimResult(
        rows=rows,
        stats=tick.stats,
        jobs=job_id,
        unstarted_waits=[end - m.arrived_s for m in broker.ready],
    )


class _DeploymentTick:
    """ScaledObject tiers: KEDA operator + HPA + Deployment."""

    def __init__(self, sim: SimInput, broker: Broker) -> None:
        tier = sim.tier
        self.sim, self.broker = sim, broker
        self.fleet = Fleet(
            tier.prefetch,
            tier.drain_timeout_s,
            tier.pod_deletion_cost,
            sim.startup,
            _rng(sim.seed, "startup"),
        )
        self.stats = self.fleet.stats
        self.keda = KedaOperator(tier)
        self.hpa = Hpa(tier, phase_s=sim.hpa_phase_s)
        if sim.static_replicas is not None:
            self.spec = sim.static_replicas
        elif sim.initial_replicas is not None:
            self.spec = sim.initial_replicas
        else:
            self.spec = tier.min_replicas
        self.fleet.add_pods(self.spec, 0, warm=True)
        self.params: Params | None = None
        self.forecast: SeasonalForecast | None = None
        if tier.trigger != "queueLength" and sim.static_replicas is None:
            self.params = Params(
                trigger=tier.trigger,  # type: ignore[arg-type]
                wait_objective_s=tier.wait_objective_s,
                startup_s=tier.lookahead_s,
            )
            if tier.trigger == "predictive":
                self.forecast = SeasonalForecast()
        self.default_cost_s = sim.service.mean()

    def scaler_reading(self, t: int) -> Reading:
        """What `facefleet scaler` answers at second t (keda/scaling.py, not a copy of it)."""
        assert self.params is not None
        broker, fleet = self.broker, self.fleet
        running = [
            Running(float(msg.service_s), float(t - (end - msg.service_s)))
            for pod in fleet.pods
            for msg, end in pod.jobs
        ]
        view = TierView(
            ready=broker.stats_ready,
            unacked=broker.stats_unacked,
            consumers=fleet.ready_count(t),
            ready_costs=[float(m.service_s) for m in broker.ready],
            oldest_ready_age_s=float(t - broker.ready[0].arrived_s) if broker.ready else 0.0,
            running=running,
            default_cost_s=self.default_cost_s,
            known_open=len(broker.ready) + len(running),
        )
        ahead = 0.0
        if self.forecast is not None:
            if t % 3600 == 0:
                self.forecast.prune(t)
            ahead = self.forecast.ahead(
                t, self.params.startup_s, cap_s=self.params.wait_objective_s
            )
        return read(view, self.params, ahead)

    def __call__(self, t: int) -> tuple[int, int, int, int, int, int]:
        fleet, broker = self.fleet, self.broker
        fleet.finish_jobs(t, broker)
        fleet.dispatch(t, broker)
        broker.tick_stats(t)
        if self.sim.static_replicas is None:
            poll, sync = self.keda.is_poll(t), self.hpa.is_sync(t)
            metric: float = 0.0
            target: float | None = None
            active: bool | None = None
            if self.params is None:
                metric = broker.metric(self.sim.counting)
            elif poll or sync:
                reading = self.scaler_reading(t)
                metric, target, active = reading.metric, reading.target, reading.active
            if poll:
                self._write(self.keda.poll(t, metric, self.spec, active), t)
            if sync:
                status = len(fleet.active())
                self._write(self.hpa.reconcile(t, self.spec, status, metric, target), t)
        fleet.account()
        return (
            len(broker.ready),
            broker.unacked,
            self.spec,
            len(fleet.pods),
            fleet.ready_count(t),
            fleet.busy_count(),
        )

    def _write(self, replicas: int | None, t: int) -> None:
        if replicas is not None and replicas != self.spec:
            self.spec = replicas
            self.fleet.scale_to(replicas, t, self.broker)


class _JobTick:
    """ScaledJob tiers: KEDA creates Jobs each poll; no HPA (keda.md §5.1)."""

    def __init__(self, sim: SimInput, broker: Broker) -> None:
        self.sim, self.broker = sim, broker
        self.runner = JobRunner(sim.tier, sim.startup, _rng(sim.seed, "startup"))
        self.stats = self.runner.stats
        self.keda = KedaOperator(sim.tier)

    def __call__(self, t: int) -> tuple[int, int, int, int, int, int]:
        runner, broker = self.runner, self.broker
        runner.step(t, broker)
        broker.tick_stats(t)
        if self.keda.is_poll(t):
            running = len(runner.running())
            q = broker.metric(self.sim.counting)
            runner.create(jobs_to_create(self.sim.tier, q, running, runner.pending(t)), t)
        jobs = runner.running()
        return (
            len(broker.ready),
            broker.unacked,
            len(jobs),
            len(jobs),
            sum(1 for j in jobs if t >= j.ready_at_s),
            sum(1 for j in jobs if j.in_flight),
        )
