"""Prometheus metrics of one gateway process, on a registry of its own (one per app, so tests
can run several apps in one interpreter)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge(
            "facefleet_gateway_ws_connections", "Open WebSocket event subscriptions", registry=r
        )
        self.fanned_out = Counter(
            "facefleet_gateway_events_fanned_out",
            "Event frames sent to WebSocket clients",
            registry=r,
        )
        self.direct_frames = Counter(
            "facefleet_gateway_direct_frames",
            "Event frames written straight to a caught-up client's socket (of fanned_out)",
            registry=r,
        )
        self.stream_events = Counter(
            "facefleet_gateway_stream_events",
            "Events read by the shared stream consumer",
            registry=r,
        )
        self.lag = Histogram(
            "facefleet_gateway_event_lag_seconds",
            "From an event's timestamp to its arrival at the gateway's fan-out",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60),
            registry=r,
        )
        self.stream_offset = Gauge(
            "facefleet_gateway_stream_offset", "Last events-stream offset consumed", registry=r
        )
        self.dropped_slow = Counter(
            "facefleet_gateway_slow_clients_dropped",
            "Clients closed for falling behind",
            registry=r,
        )
        self.auth_refused = Counter(
            "facefleet_gateway_auth_refused", "Refused credentials", ["reason"], registry=r
        )
        self.replays = Counter(
            "facefleet_gateway_history_loads",
            "Job histories read from the events stream",
            registry=r,
        )
        self.submits = Counter(
            "facefleet_gateway_submits",
            "Job submissions, by API key id and outcome (queued, duplicate, tier_full, "
            "limit_active, limit_per_minute, invalid, unroutable, broker_error)",
            ["api_key_id", "outcome"],
            registry=r,
        )
        self.store_errors = Counter(
            "facefleet_gateway_store_errors",
            "Queued jobs the gateway could not record in the job store (the worker records them)",
            registry=r,
        )
