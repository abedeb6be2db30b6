"""What `facefleet scaler` knows: open jobs and arrivals from the job events, counts from the
broker.

Job state reaches the scaler through the events stream (facefleet.events.log): every job
store (file journals or PostgreSQL) publishes each event it records there, and producers
publish each job's `queued` event there, so jobs submitted by the SDK (which never touch the
store) are seen too, and the scaler needs no database connection or per-poll query. On start
it replays the stream from `lookback` ago (the forecast's days), then follows it live.

- `queued` (carries the job's WorkEstimate) opens a job, priced by the cost model, and adds its
  work to the tier's arrival history (SeasonalForecast);
- `started`/`progress` mark it running (progress fraction refines what is left);
- `completed` feeds timings_s.total to the cost model's fit; every terminal event closes it;
  `replayed` opens a dead-lettered job again.

The broker's counts (management API: ready, unacked, consumers per tier queue) stay the
authority on how many jobs there are; events only say which ones and how big (TierView).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pika.exceptions

from facefleet.amqp import connect
from facefleet.costmodel import CostModel
from facefleet.keda.scaling import Running, SeasonalForecast, TierView
from facefleet.management import read_queues
from facefleet.wire import EVENTS_STREAM, DecodeError, JobEvent, WorkEstimate, job_queue

log = logging.getLogger("facefleet.scaler")

ENDED_MEMORY = 100_000
"""Closed job ids remembered, so a duplicate `queued` (the producer's and the first worker's
copy of seq 1) arriving after the job ended does not open it again."""


@dataclass
class OpenJob:
    tier: str
    created_s: float
    estimate: WorkEstimate | None
    started_s: float | None = None
    fraction: float | None = None


@dataclass(frozen=True)
class QueueCounts:
    ready: int
    unacked: int
    consumers: int


class ScalerState:
    """Thread-safe: the stream thread writes, gRPC threads read."""

    def __init__(self, tiers: tuple[str, ...], cost_model: CostModel, forecast_days: int) -> None:
        self.tiers = tiers
        self.cost_model = cost_model
        self._lock = threading.Lock()
        self._jobs: dict[str, OpenJob] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()
        self.forecasts = {t: SeasonalForecast(days=forecast_days) for t in tiers}
        self.events_seen = 0
        self.caught_up = threading.Event()
        """Set once the replay reached the stream's end (the first idle poll after it)."""

    # --- events -------------------------------------------------------------------------------

    def on_event(self, event: JobEvent) -> None:
        with self._lock:
            self.events_seen += 1
            job = self._jobs.get(event.job_id)
            ts = event.ts.timestamp()
            if event.type == "queued":
                tier = event.payload.tier
                if job is not None or event.job_id in self._ended or tier not in self.forecasts:
                    return
                self._jobs[event.job_id] = OpenJob(tier, ts, event.payload.estimate)
                cost = self.cost_model.seconds(tier, event.payload.estimate)
                self.forecasts[tier].add(ts, cost)
                self.forecasts[tier].prune(ts)
            elif event.type == "replayed":
                tier = self._ended.pop(event.job_id, None)
                if tier is not None and job is None:
                    self._jobs[event.job_id] = OpenJob(tier, ts, None)
            elif job is None:
                return
            elif event.type == "started":
                job.started_s, job.fraction = ts, None
            elif event.type == "progress":
                if job.started_s is None:
                    job.started_s = ts
                job.fraction = event.payload.fraction
            elif event.terminal:
                if event.type == "completed" and event.payload.timings_s:
                    total = event.payload.timings_s.get("total")
                    if total is not None:
                        self.cost_model.observe(job.tier, job.estimate, float(total))
                del self._jobs[event.job_id]
                self._ended[event.job_id] = job.tier
                while len(self._ended) > ENDED_MEMORY:
                    self._ended.popitem(last=False)

    # --- reads --------------------------------------------------------------------------------

    def view(self, tier: str, counts: QueueCounts, now_s: float) -> TierView:
        """The tier as keda/scaling.py sees it: the broker's counts, the events' sizes. Of the
        jobs known as queued, the newest `ready` are the ready ones (the queue is FIFO); the
        others were delivered and have not reported `started` yet: they count as running."""
        model = self.cost_model
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.tier == tier]
        queued = sorted((j for j in jobs if j.started_s is None), key=lambda j: j.created_s)
        ready_jobs = queued[len(queued) - min(counts.ready, len(queued)) :]
        delivered = queued[: len(queued) - len(ready_jobs)]
        running = [
            Running(
                model.seconds(tier, j.estimate),
                max(now_s - (j.started_s if j.started_s is not None else now_s), 0.0),
                j.fraction,
            )
            for j in [*delivered, *(j for j in jobs if j.started_s is not None)]
        ]
        return TierView(
            ready=counts.ready,
            unacked=counts.unacked,
            consumers=counts.consumers,
            ready_costs=[model.seconds(tier, j.estimate) for j in ready_jobs],
            oldest_ready_age_s=max(now_s - ready_jobs[0].created_s, 0.0) if ready_jobs else 0.0,
            running=running[: max(counts.unacked, 0)] if counts.unacked else [],
            default_cost_s=model.seconds(tier, None),
            known_open=len(jobs),
        )

    def forecast(self, tier: str, now_s: float, horizon_s: float, cap_s: float) -> float:
        """`predictive`'s forecast term: work (each job at most cap_s = W) forecast to arrive
        within horizon_s, times the forecast's trust (SeasonalForecast.ahead)."""
        with self._lock:
            return self.forecasts[tier].ahead(now_s, horizon_s, cap_s)

    def open_jobs(self) -> int:
        with self._lock:
            return len(self._jobs)


class BrokerCounts:
    """Per-tier queue counts from the management API, cached for `ttl_s` (KEDA and the HPA ask
    for the same tier several times within a second)."""

    def __init__(self, amqp_url: str, management_url: str, ttl_s: float = 1.0) -> None:
        self.amqp_url = amqp_url
        self.management_url = management_url
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._at = 0.0
        self._rows: dict[str, dict[str, Any]] = {}

    def counts(self, tier: str) -> QueueCounts:
        """Raises ManagementUnavailable (the gRPC call answers UNAVAILABLE)."""
        with self._lock:
            if time.monotonic() - self._at > self.ttl_s:
                self._rows = read_queues(self.amqp_url, self.management_url)
                self._at = time.monotonic()
            row = self._rows.get(job_queue(tier), {})
        return QueueCounts(
            ready=int(row.get("messages_ready") or 0),
            unacked=int(row.get("messages_unacknowledged") or 0),
            consumers=int(row.get("consumers") or 0),
        )


def follow_stream(
    state: ScalerState, amqp_url: str, lookback: timedelta, stop: threading.Event
) -> None:
    """Replay the events stream from `lookback` ago, then follow it, until `stop`; reconnects
    (from the last offset seen) when the broker goes away."""
    offset: Any = datetime.now(UTC) - lookback
    last: dict[str, int] = {}
    while not stop.is_set():
        try:
            connection = connect(amqp_url, "facefleet-scaler")
        except pika.exceptions.AMQPError as exc:
            log.warning("events stream: cannot connect (%s); retrying", exc)
            stop.wait(2.0)
            continue
        try:
            ch = connection.channel()
            ch.basic_qos(prefetch_count=1000)
            last.clear()

            def on_message(channel: Any, method: Any, props: Any, body: bytes) -> None:
                pos = (props.headers or {}).get("x-stream-offset")
                if isinstance(pos, int):
                    last["offset"] = pos
                channel.basic_ack(method.delivery_tag)
                try:
                    event = JobEvent.decode(body)
                except DecodeError:
                    return
                state.on_event(event)

            ch.basic_consume(EVENTS_STREAM, on_message, arguments={"x-stream-offset": offset})
            while not stop.is_set():
                before = state.events_seen
                connection.process_data_events(time_limit=0.5)
                if state.events_seen == before:
                    state.caught_up.set()
                if "offset" in last:
                    offset = last["offset"] + 1
        except pika.exceptions.AMQPError as exc:
            log.warning("events stream: %s; reconnecting", exc)
            stop.wait(1.0)
        finally:
            try:
                if connection.is_open:
                    connection.close()
            except pika.exceptions.AMQPError:
                pass
