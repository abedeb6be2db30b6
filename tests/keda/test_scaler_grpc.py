"""`facefleet scaler` as KEDA meets it: a real process, real gRPC calls (GetMetricSpec,
GetMetrics, IsActive, StreamIsActive) shaped the way KEDA's external scaler client sends them,
fed by the real broker (management API counts, the events stream) and real job state (the
file job store's logs publishing `started`/`completed` like a worker's)."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pika
import pytest

from facefleet import broker as brokers
from facefleet.amqp import publish_event
from facefleet.keda.scaler import externalscaler_pb2 as pb
from facefleet.keda.scaler import externalscaler_pb2_grpc as pb_grpc
from facefleet.management import ManagementUnavailable, default_management_url, read_queues
from facefleet.producer.sdk import JobClient
from facefleet.settings import ProducerSettings
from facefleet.wire import EventPayload, JobRequest, WorkEstimate, job_queue, queued_event
from tests.conftest import Env, delete_tier_queues, free_port

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

W = 60.0


@pytest.fixture(scope="module")
def mgmt_broker(broker: brokers.Broker) -> Iterator[tuple[str, str]]:
    """(AMQP URL, management URL) of a broker whose management API answers: the session's, or
    a private rabbitmq-server node with the plugin when the session's broker has none."""
    mgmt = broker.management_url or default_management_url(broker.url)
    try:
        read_queues(broker.url, mgmt)
        yield broker.url, mgmt
        return
    except ManagementUnavailable:
        pass
    private = brokers._local_binary()
    if private is None or private.management_url is None:
        if private is not None:
            private.stop()
        if os.environ.get("CI") == "true":
            pytest.fail("CI needs a broker with the management API for the scaler tests")
        pytest.skip("no broker with the management API here")
    try:
        yield private.url, private.management_url
    finally:
        private.stop()


@pytest.fixture
def env(mgmt_broker: tuple[str, str], tmp_path: Path) -> Iterator[Env]:
    url, mgmt = mgmt_broker
    tier = "t" + os.urandom(5).hex()
    world = Env(url, tier, tmp_path, [{"name": tier, "max_job_s": 60, "delivery_limit": 5}])
    world.management_url = mgmt  # type: ignore[attr-defined]
    yield world
    world.stop_all()
    delete_tier_queues(url, tier)


class ScalerProcess:
    def __init__(self, env: Env) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.log = env.data_root / "scaler.log"
        self._fh = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "facefleet.cli", "scaler"],
            env=env.vars(
                FACEFLEET_SCALER_PORT=str(self.port),
                FACEFLEET_HEALTH_PORT=str(self.metrics_port),
                FACEFLEET_SCALER_FORECAST_DAYS="1",
                FACEFLEET_SCALER_BROKER_TTL_S="0",
                FACEFLEET_SCALER_STREAM_INTERVAL_S="0.2",
                FACEFLEET_MANAGEMENT_URL=env.management_url,  # type: ignore[attr-defined]
            ),
            stdout=self._fh,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while b"listening on" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"scaler did not start:\n{self.log.read_text()}")
            time.sleep(0.1)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.ExternalScalerStub(self.channel)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as resp:
            return str(resp.read().decode())

    def stop(self) -> None:
        self.channel.close()
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._fh.close()


@pytest.fixture
def scaler(env: Env) -> Iterator[ScalerProcess]:
    assert env.cli("topology", "apply").returncode == 0
    proc = ScalerProcess(env)
    yield proc
    proc.stop()


def ref(env: Env, **metadata: str) -> Any:
    """A ScaledObjectRef as KEDA sends it: the trigger's metadata map, scalerAddress included."""
    meta = {"scalerAddress": "facefleet-scaler:6000", "tier": env.tier, **metadata}
    return pb.ScaledObjectRef(name="facefleet-worker", namespace="default", scalerMetadata=meta)


def metric(scaler: ScalerProcess, env: Env, trigger: str) -> float:
    request = pb.GetMetricsRequest(
        scaledObjectRef=ref(env, trigger=trigger, waitObjectiveSeconds=str(int(W))),
        metricName=f"s0-facefleet-{env.tier}-{trigger}",  # KEDA prefixes the trigger index
    )
    response = scaler.stub.GetMetrics(request, timeout=10)
    (value,) = response.metricValues
    assert value.metricName == request.metricName
    assert value.metricValue == int(np.ceil(value.metricValueFloat))
    return float(value.metricValueFloat)


def eventually(check: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    """Management API counts refresh every 5 s, and the scaler first reads the events stream's
    recent history (on a shared test broker, every test's events: on RabbitMQ < 3.13 nothing
    filters them): poll, never sleep a fixed time."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def test_metric_spec_per_mode_and_invalid_arguments(scaler: ScalerProcess, env: Env) -> None:
    for trigger, target in (("work", 45.0), ("predictive", 45.0), ("latency", 1.0)):
        spec = scaler.stub.GetMetricSpec(ref(env, trigger=trigger, waitObjectiveSeconds="45"))
        (only,) = spec.metricSpecs
        assert (only.metricName, only.targetSizeFloat) == (
            f"facefleet-{env.tier}-{trigger}",
            target,
        )
    for metadata, named in (
        ({"tier": "nosuchtier"}, "nosuchtier"),
        ({"trigger": "queueLength"}, "queueLength"),
        ({"waitObjectiveSeconds": "soon"}, "waitObjectiveSeconds"),
    ):
        for call in (scaler.stub.GetMetricSpec, scaler.stub.IsActive):
            with pytest.raises(grpc.RpcError) as err:
                call(ref(env, **metadata), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert named in str(err.value.details())


def png(path: Path) -> str:
    cv2.imwrite(str(path), np.zeros((8, 8, 3), np.uint8))
    return str(path)


def test_work_latency_activation_follow_broker_and_job_state(
    scaler: ScalerProcess, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.settings_env(monkeypatch)
    settings = ProducerSettings.load()
    src, tgt = png(env.data_root / "s.png"), png(env.data_root / "t.png")
    costs = (100.0, 20.0, 20.0)
    jobs: list[JobRequest] = []
    with JobClient(settings) as client:
        for cost in costs:
            est = WorkEstimate(kind="unknown", gpu_s=cost)  # priced as given (no pixels)
            result = client.submit(env.tier, src, tgt, estimate=est)
            assert result.request is not None
            jobs.append(result.request)

    # KEDA polls IsActive: the scaler learns of the jobs from the events stream within moments
    eventually(lambda: scaler.stub.IsActive(ref(env), timeout=10).result is True, "active")
    # Ready work, each job capped at one replica's share: 60 + 20 + 20 = 100, rounded up to
    # whole replicas of W = 60: 120.
    eventually(lambda: metric(scaler, env, "work") == pytest.approx(120.0), "work = 120")
    assert metric(scaler, env, "predictive") == pytest.approx(120.0)  # no history: no forecast
    eventually(lambda: metric(scaler, env, "latency") > 0, "latency grows with age")

    stream_out: queue.Queue[bool] = queue.Queue()
    call = scaler.stub.StreamIsActive(ref(env, trigger="work"))

    def read_stream() -> None:
        try:
            for response in call:
                stream_out.put(response.result)
        except grpc.RpcError:
            pass

    threading.Thread(target=read_stream, daemon=True).start()
    assert stream_out.get(timeout=10) is True

    # A worker takes all three: unacked 3, `started` recorded in the job store and published.
    conn = pika.BlockingConnection(pika.URLParameters(env.amqp_url))
    ch = conn.channel()
    ch.confirm_delivery()
    tags = []
    for _ in costs:
        method, _props, _body = ch.basic_get(job_queue(env.tier), auto_ack=False)
        assert method is not None
        tags.append(method.delivery_tag)
    store = env.store()

    def publish(event: Any) -> None:
        publish_event(ch, event)

    for job in jobs:
        store.log(job.job_id, queued=queued_event(job)).append(
            "started", EventPayload(worker="test", attempt=1), publish
        )
    # Nothing ready, three running: never fewer replicas than jobs in progress (3 x 60).
    eventually(lambda: metric(scaler, env, "work") == pytest.approx(180.0), "work = 3 x 60")
    assert metric(scaler, env, "latency") == pytest.approx(3.0)
    assert scaler.stub.IsActive(ref(env, trigger="latency"), timeout=10).result is True

    for job, tag in zip(jobs, tags, strict=True):
        store.log(job.job_id).append(
            "completed", EventPayload(timings_s={"total": 50.0}, result_uri="file:///r"), publish
        )
        ch.basic_ack(tag)
    conn.close()
    assert stream_out.get(timeout=30) is False  # pushed once the tier is idle
    assert scaler.stub.IsActive(ref(env), timeout=10).result is False
    eventually(
        lambda: (
            f'facefleet_cost_model_samples{{kind="unknown",tier="{env.tier}"}} 3.0'
            in scaler.metrics()
        ),
        "the cost model saw the three completed timings",
    )
    call.cancel()
