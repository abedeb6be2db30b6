"""Prometheus metrics of one worker, in an explicit registry (no process-global state)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from facefleet.consumer.device import Device


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.jobs = Counter(
            "facefleet_jobs",
            "Jobs by tier and outcome (completed, failed, cancelled, dead_lettered, retried, "
            "requeued, given_back, malformed)",
            ["tier", "outcome"],
            registry=self.registry,
        )
        self.duplicates = Counter(
            "facefleet_duplicate_deliveries",
            "Deliveries of jobs that had already ended, acked without running again",
            ["tier"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "facefleet_job_duration_seconds",
            "Processing time of one attempt",
            ["tier"],
            buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=self.registry,
        )
        self.stage_duration = Histogram(
            "facefleet_stage_duration_seconds",
            "Time in each processing stage of a completed job (its manifest's timings_s: decode, "
            "detect, swap, encode, ..., and total), for the dashboard's per-stage quantiles",
            ["tier", "stage"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "facefleet_queue_wait_seconds",
            "Time from submission to start",
            ["tier"],
            buckets=(0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=self.registry,
        )
        self.gpu_seconds = Counter(
            "facefleet_gpu_seconds",
            "Processing time of the jobs completed here (manifest timings_s.total), by tier and "
            "API key id (empty: submitted without the gateway); what usage is billed by",
            ["tier", "api_key_id"],
            registry=self.registry,
        )
        self.key_jobs = Counter(
            "facefleet_key_jobs",
            "Jobs that ended here, by tier, API key id and outcome (completed, failed, "
            "cancelled, dead_lettered)",
            ["tier", "api_key_id", "outcome"],
            registry=self.registry,
        )
        self.ready = Gauge("facefleet_worker_ready", "1 when consuming", registry=self.registry)
        self.busy = Gauge(
            "facefleet_worker_busy_jobs",
            "Jobs running now (claimed by this worker, from claim to ack or give-back)",
            registry=self.registry,
        )

    def watch_device(self, device: Device) -> None:
        """Export the processor's device: seconds held and model calls (read when scraped)."""
        self.registry.register(_DeviceCollector(device))


class _DeviceCollector(Collector):
    """Reads a Device's counters at scrape time (no thread keeps a gauge up to date)."""

    def __init__(self, device: Device) -> None:
        self.device = device

    def collect(self) -> Iterator[Metric]:
        held = CounterMetricFamily(
            "facefleet_device_held_seconds",
            "Time at least one inference lane of the device was held by a model call; "
            "duty cycle = its rate (held / wall time)",
        )
        held.add_metric([], self.device.held_s)
        yield held
        calls = CounterMetricFamily(
            "facefleet_device_calls", "Model calls that took an inference lane"
        )
        calls.add_metric([], float(self.device.calls))
        yield calls
