"""`facefleet scaler`: KEDA's external scaler (externalscaler.proto of KEDA v2.20.2) for the
`external` and `external-push` triggers, one answer per tier and mode (keda/scaling.py).

Trigger metadata read (the whole `metadata` map reaches us as scalerMetadata):

    tier                       required; one of FACEFLEET_TIERS
    trigger                    work (default) | latency | predictive
    waitObjectiveSeconds       W, default 60
    startupSeconds             predictive's look-ahead (pod start-up), default 90
    activationForecastSeconds  predictive: forecast work that activates an idle tier (default W)

A bad value is INVALID_ARGUMENT naming the key; an unreachable management API is UNAVAILABLE
(KEDA then applies the ScaledObject's fallback, keda.md §3.4).
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from datetime import timedelta
from typing import Any

import grpc

from facefleet.keda.scaler import externalscaler_pb2 as pb
from facefleet.keda.scaler import externalscaler_pb2_grpc as pb_grpc
from facefleet.keda.scaler.state import BrokerCounts, ScalerState, follow_stream
from facefleet.keda.scaling import ParameterError, Params, Reading, params_from_metadata, read
from facefleet.logs import configure as configure_logs
from facefleet.management import ManagementUnavailable
from facefleet.settings import ScalerSettings, SettingsError, die

log = logging.getLogger("facefleet.scaler")


class BadRequest(Exception):
    """Metadata the scaler cannot serve: INVALID_ARGUMENT with this message."""


class Scaler(pb_grpc.ExternalScalerServicer):
    def __init__(
        self,
        state: ScalerState,
        broker: BrokerCounts,
        *,
        stream_interval_s: float = 1.0,
        clock: Any = time.time,
    ) -> None:
        self.state = state
        self.broker = broker
        self.stream_interval_s = stream_interval_s
        self.clock = clock
        self.stopping = threading.Event()
        self.last: dict[tuple[str, str], Reading] = {}
        """The latest reading per (tier, trigger), for the metrics."""

    # --- the arithmetic, with errors mapped -----------------------------------------------------

    def params(self, ref: Any) -> tuple[str, Params]:
        metadata = dict(ref.scalerMetadata)
        tier = metadata.get("tier", "")
        if not tier:
            raise BadRequest("tier: missing from the trigger metadata")
        if tier not in self.state.tiers:
            raise BadRequest(
                f"tier: unknown tier {tier!r}; this scaler serves {', '.join(self.state.tiers)} "
                "(FACEFLEET_TIERS)"
            )
        try:
            return tier, params_from_metadata(metadata)
        except ParameterError as exc:
            raise BadRequest(str(exc)) from None

    def reading(self, ref: Any) -> tuple[str, Params, Reading]:
        tier, params = self.params(ref)
        now = self.clock()
        view = self.state.view(tier, self.broker.counts(tier), now)
        forecast = (
            self.state.forecast(tier, now, params.startup_s, params.wait_objective_s)
            if params.trigger == "predictive"
            else 0.0
        )
        result = read(view, params, forecast)
        self.last[(tier, params.trigger)] = result
        return tier, params, result

    def _guard(self, context: Any, call: Any) -> Any:
        try:
            return call()
        except BadRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ManagementUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    @staticmethod
    def metric_name(tier: str, params: Params) -> str:
        return f"facefleet-{tier}-{params.trigger}"

    # --- the four RPCs --------------------------------------------------------------------------

    def GetMetricSpec(self, request: Any, context: Any) -> Any:
        def call() -> Any:
            tier, params = self.params(request)
            spec = pb.MetricSpec(
                metricName=self.metric_name(tier, params),
                targetSize=math.ceil(params.target),
                targetSizeFloat=params.target,
            )
            return pb.GetMetricSpecResponse(metricSpecs=[spec])

        return self._guard(context, call)

    def GetMetrics(self, request: Any, context: Any) -> Any:
        def call() -> Any:
            tier, params, result = self.reading(request.scaledObjectRef)
            value = pb.MetricValue(
                metricName=request.metricName or self.metric_name(tier, params),
                metricValue=math.ceil(result.metric),
                metricValueFloat=result.metric,
            )
            return pb.GetMetricsResponse(metricValues=[value])

        return self._guard(context, call)

    def IsActive(self, request: Any, context: Any) -> Any:
        return self._guard(
            context, lambda: pb.IsActiveResponse(result=self.reading(request)[2].active)
        )

    def StreamIsActive(self, request: Any, context: Any) -> Iterator[Any]:
        """external-push: the current activity at once, then every change (checked each
        stream_interval_s) until KEDA closes the stream or the scaler stops."""
        self._guard(context, lambda: self.params(request))
        previous: bool | None = None
        while context.is_active() and not self.stopping.is_set():
            try:
                active = self.reading(request)[2].active
            except ManagementUnavailable as exc:
                log.warning("StreamIsActive: %s", exc)
                active = None
            if active is not None and active != previous:
                previous = active
                yield pb.IsActiveResponse(result=active)
            self.stopping.wait(self.stream_interval_s)


def metrics_collector(scaler: Scaler) -> Any:
    """Prometheus collector read at scrape time: the cost model's fit and the last readings."""
    from prometheus_client.core import GaugeMetricFamily

    class Collector:
        def collect(self) -> Iterator[Any]:
            scale = GaugeMetricFamily(
                "facefleet_cost_model_scale",
                "Fitted multiplier of the default cost model (median measured/estimated)",
                labels=["tier", "kind"],
            )
            samples = GaugeMetricFamily(
                "facefleet_cost_model_samples",
                "Completed jobs in the cost model's fitting window",
                labels=["tier", "kind"],
            )
            for tier, kind, n, s in scaler.state.cost_model.samples():
                scale.add_metric([tier, kind], s)
                samples.add_metric([tier, kind], n)
            metric = GaugeMetricFamily(
                "facefleet_scaler_metric",
                "Last metric value answered to KEDA (replicas x target)",
                labels=["tier", "trigger"],
            )
            backlog = GaugeMetricFamily(
                "facefleet_scaler_backlog_gpu_seconds",
                "GPU-seconds queued or left running at the last reading",
                labels=["tier", "trigger"],
            )
            forecast = GaugeMetricFamily(
                "facefleet_scaler_forecast_gpu_seconds",
                "Work forecast to arrive within the start-up time, each job capped at W, times the "
                "forecast's trust (predictive)",
                labels=["tier", "trigger"],
            )
            for (tier, trigger), r in sorted(scaler.last.items()):
                metric.add_metric([tier, trigger], r.metric)
                backlog.add_metric([tier, trigger], r.backlog_s)
                forecast.add_metric([tier, trigger], r.forecast_s)
            open_jobs = GaugeMetricFamily(
                "facefleet_scaler_open_jobs", "Jobs queued or running known from their events"
            )
            open_jobs.add_metric([], scaler.state.open_jobs())
            yield from (scale, samples, metric, backlog, forecast, open_jobs)

    return Collector()


def serve(settings: ScalerSettings) -> tuple[grpc.Server, int, Scaler, threading.Event]:
    """Start the stream follower and the gRPC server; returns (server, port, scaler, stop)."""
    tiers = tuple(t.name for t in settings.tiers())
    state = ScalerState(tiers, settings.cost_model(), settings.scaler_forecast_days)
    stop = threading.Event()
    threading.Thread(
        target=follow_stream,
        args=(state, settings.amqp_url, timedelta(days=settings.scaler_forecast_days), stop),
        name="events-stream",
        daemon=True,
    ).start()
    broker = BrokerCounts(
        settings.amqp_url,
        str(settings.management_url),
        ttl_s=settings.scaler_broker_ttl_s,
    )
    scaler = Scaler(state, broker, stream_interval_s=settings.scaler_stream_interval_s)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    pb_grpc.add_ExternalScalerServicer_to_server(scaler, server)  # type: ignore[no-untyped-call]
    address = f"{settings.scaler_host}:{settings.scaler_port}"
    if settings.scaler_tls_cert is not None and settings.scaler_tls_key is not None:
        try:
            pair = (settings.scaler_tls_key.read_bytes(), settings.scaler_tls_cert.read_bytes())
            ca = (
                settings.scaler_tls_client_ca.read_bytes()
                if settings.scaler_tls_client_ca
                else None
            )
        except OSError as exc:
            raise SettingsError(f"FACEFLEET_SCALER_TLS_*: {exc}") from exc
        creds = grpc.ssl_server_credentials(
            [pair], root_certificates=ca, require_client_auth=ca is not None
        )
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise SettingsError(f"FACEFLEET_SCALER_PORT: cannot listen on {address}")
    server.start()
    if settings.health_port:
        from prometheus_client import REGISTRY, start_http_server

        REGISTRY.register(metrics_collector(scaler))
        start_http_server(settings.health_port, addr=settings.health_host)
    return server, port, scaler, stop


def register(sub: Any, name: str) -> None:
    p = sub.add_parser(
        name,
        help="run KEDA's external scaler (work, latency and predictive triggers per tier)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=cmd_scaler)


def cmd_scaler(_args: argparse.Namespace) -> int:
    try:
        settings = ScalerSettings.load()
        configure_logs(settings.log_level, settings.log_format)
        server, port, scaler, stop = serve(settings)
    except SettingsError as exc:
        die(exc)
        return 2
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    # One parseable line: tests and people read the port from it.
    print(f"facefleet scaler listening on {settings.scaler_host}:{port}", flush=True)
    done.wait()
    scaler.stopping.set()
    stop.set()
    server.stop(grace=5).wait()
    return 0
