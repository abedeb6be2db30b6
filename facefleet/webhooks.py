"""`facefleet webhooks`: POST every job's events to its webhook_url, signed (Standard Webhooks).

A process of its own (the chart runs it as a Deployment, so it scales apart from the GPU
workers). What it does with one event:

    facefleet.events ──job.#──▶ facefleet.webhooks (quorum) ──▶ this process
                                     ▲                          │ POST, signed
                                     │ TTL expired,             │ 2xx: ack     410: ack, job off
                                     │ dead-lettered back       │ refused: park
                                     │                          ▼ else: retry copy, then ack
                     facefleet.webhooks.retry.<delay> ◀── facefleet.webhooks (direct exchange)
                                                        └─▶ facefleet.webhooks.failed (parked)

- **Which URL.** A job's `queued` event carries `webhook_url` / `webhook_events` in its payload
  (wire.queued_event); for any later event they come from the job store (the job's recorded
  `queued` event, its first), cached per job in a bounded LRU. No URL: the event is acked.
  `webhook_events` None means every type but `progress`.
- **What is sent.** The event's own JSON (`JobEvent.encode()`: the same bytes on every attempt)
  with `content-type: application/json`, `webhook-id: <job_id>.<seq>` (the same on every attempt
  and from every replica: receivers dedupe on it), `webhook-timestamp` (this attempt, Unix
  seconds) and `webhook-signature` = `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, one per
  secret in FACEFLEET_WEBHOOK_SECRET (space-separated, for rotations). It goes through
  facefleet.fetch, so the SSRF rules of https:// inputs hold: the host is resolved once, every
  address must be public unless FACEFLEET_FETCH_ALLOW lists it, the vetted IP is dialled, no
  proxy from the environment, no redirect followed (a 3xx counts as a failed attempt).
- **Outcomes.** 2xx: delivered. 410 Gone: the receiver wants no more of this job's events (this
  process sends it none; the event is acked). A refused target (`fetch_refused`: private,
  loopback, metadata address, bad scheme) is parked at once: retrying cannot change the answer.
  Everything else is retried on the schedule: 5xx, 408, 429, timeouts, connection and TLS
  errors, DNS failures, and also other 3xx/4xx (a 401 from a receiver with a stale secret or a
  404 from one not yet deployed is usually fixed within hours; Standard Webhooks senders retry
  any non-2xx). After the last step the delivery is parked in `<queue>.failed` with
  `x-facefleet-webhook-reason`, and logged.
- **Backoff without head-of-line blocking.** One delay queue per distinct delay, each with a
  fixed `x-message-ttl` and dead-lettering back to the sender's queue: every message in it
  waits the same time, so the oldest always expires first (per-message TTLs in one queue would
  wait behind the head). The attempt number rides in `x-facefleet-webhook-attempt`.
- **At least once.** The original delivery is acked only after its retry (or parked) copy is
  confirmed by the broker; the delay queues dead-letter at-least-once (quorum, 3.10+). A crash
  mid-POST means a redelivery, so a receiver may see one webhook-id twice: dedupe on it. A
  bounded in-memory set of delivered ids drops the duplicates one process can see (the worker
  publishes a job's `queued` again when it records it).
- **Order.** One job's events are POSTed one at a time in delivery order (seq order), by a
  bounded pool of FACEFLEET_WEBHOOK_CONCURRENCY threads; a retried event arrives after later
  ones of its job, so receivers order by the body's `seq`.
- **SIGTERM** stops consuming, lets taken POSTs finish within FACEFLEET_WEBHOOK_DRAIN_TIMEOUT_S
  (what has not started by then goes back to the queue unposted), and exits 0. A lost broker
  connection is re-established with backoff. The consume loop, the drain and the thread-safe
  acks are facefleet/consuming.py, shared with the worker.
"""

from __future__ import annotations

import argparse
import collections
import enum
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any, Literal

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

from facefleet import health
from facefleet.amqp import PublishLost, ThreadedPublisher, _declare_queue, connect, features
from facefleet.consuming import ConsumerIO, call_threadsafe
from facefleet.fetch import FetchError, FetchPolicy, Reply, parse_allow, redact
from facefleet.fetch import request as http_request
from facefleet.jobstore import JobStore
from facefleet.logs import configure as configure_logs
from facefleet.settings import SettingsError, WebhookSettings, die
from facefleet.wire import (
    CONTENT_TYPE,
    EVENT_TYPES,
    EVENTS_EXCHANGE,
    HEADER_JOB_ID,
    HEADER_SCHEMA,
    HEADER_WEBHOOK_ATTEMPT,
    HEADER_WEBHOOK_REASON,
    HEADER_WEBHOOK_URL,
    SCHEMA_VERSION,
    WEBHOOKS_BINDING,
    WEBHOOKS_EXCHANGE,
    WEBHOOKS_QUEUE,
    BrokerFeatures,
    DecodeError,
    EventPayload,
    JobEvent,
    webhook_failed_queue,
    webhook_id,
    webhook_retry_queue,
)

log = logging.getLogger(__name__)

DELIVERY_LIMIT = 50
"""Deliveries of one message to this sender (crashes, drains) before the broker parks it in the
failed queue: a message that kills the process every time must not stop the fleet. Retries on
the schedule are fresh copies and do not count."""
PREFETCH_PER_THREAD = 4
DRAIN_PUMP_S = 0.1
"""One wait of the drain loop for broker I/O (acks of finishing POSTs, heartbeats)."""
DRAIN_STUCK_S = 5.0
"""After the drain deadline, how long a POST still running gets before the connection is closed
under it (its delivery goes back to the queue)."""
USER_AGENT = "facefleet-webhooks/1"
DEFAULT_EVENTS: frozenset[str] = frozenset(EVENT_TYPES) - {"progress"}
"""What a job gets when its webhook_events is None: every event type but progress."""

Action = Literal["ack", "requeue"]


# --- signing (Standard Webhooks v1) ---------------------------------------------------------


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`."""
    import base64
    import hashlib
    import hmac

    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(
    keys: Sequence[bytes], msg_id: str, body: bytes, timestamp: int
) -> dict[str, str]:
    """The headers of one POST: one signature per key, space-separated."""
    return {
        "content-type": CONTENT_TYPE,
        "user-agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(k, msg_id, timestamp, body) for k in keys),
    }


# --- topology ---------------------------------------------------------------------------------


def quorum_message_ttl(feats: BrokerFeatures) -> bool:
    """Quorum queues honour x-message-ttl since RabbitMQ 3.10 (checked on 3.10.8: expired
    messages are dead-lettered at-least-once, in order). Older brokers get classic delay queues."""
    return feats.version >= (3, 10)


@dataclass(frozen=True)
class WebhookQueues:
    """The names of one sender's queues (FACEFLEET_WEBHOOK_QUEUE names the set)."""

    main: str = WEBHOOKS_QUEUE

    @property
    def failed(self) -> str:
        return webhook_failed_queue(self.main)

    def retry(self, delay_ms: int) -> str:
        return webhook_retry_queue(delay_ms, self.main)


def main_queue_arguments(queues: WebhookQueues, feats: BrokerFeatures) -> dict[str, Any]:
    args: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": WEBHOOKS_EXCHANGE,
        "x-dead-letter-routing-key": queues.failed,
    }
    if feats.at_least_once_dead_lettering:
        # No x-max-length: a full queue would nack the workers' event publishes themselves.
        args["x-overflow"] = "reject-publish"
        args["x-dead-letter-strategy"] = "at-least-once"
    return args


def retry_queue_arguments(
    queues: WebhookQueues, delay_ms: int, feats: BrokerFeatures
) -> dict[str, Any]:
    """A delay step: every message waits `delay_ms`, then is dead-lettered to the main queue.

    Quorum with at-least-once dead-lettering where the broker supports message TTL on quorum
    queues (3.10+); classic durable before that (its dead-lettering is at-most-once: a broker
    crash at the moment of expiry could lose a retry)."""
    args: dict[str, Any] = {
        "x-message-ttl": delay_ms,
        "x-dead-letter-exchange": WEBHOOKS_EXCHANGE,
        "x-dead-letter-routing-key": queues.main,
    }
    if quorum_message_ttl(feats):
        args.update(
            {
                "x-queue-type": "quorum",
                "x-overflow": "reject-publish",
                "x-dead-letter-strategy": "at-least-once",
            }
        )
    else:
        args["x-queue-type"] = "classic"
    return args


FAILED_QUEUE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum"}


def declare_webhook_topology(
    connection: pika.BlockingConnection,
    queues: WebhookQueues,
    schedule_ms: Sequence[int],
) -> BrokerFeatures:
    """Declare the sender's exchange and queues and their bindings; idempotent. A queue that
    exists with other arguments is kept (with a warning), as `facefleet topology apply` does."""
    feats = features(connection)
    ch = connection.channel()
    try:
        ch.exchange_declare(EVENTS_EXCHANGE, "topic", durable=True)
        ch.exchange_declare(WEBHOOKS_EXCHANGE, "direct", durable=True)
        _declare_queue(connection, queues.failed, FAILED_QUEUE_ARGUMENTS)
        ch.queue_bind(queues.failed, WEBHOOKS_EXCHANGE, queues.failed)
        _declare_queue(connection, queues.main, main_queue_arguments(queues, feats))
        ch.queue_bind(queues.main, WEBHOOKS_EXCHANGE, queues.main)
        ch.queue_bind(queues.main, EVENTS_EXCHANGE, WEBHOOKS_BINDING)
        for delay in sorted(set(schedule_ms)):
            name = queues.retry(delay)
            _declare_queue(connection, name, retry_queue_arguments(queues, delay, feats))
            ch.queue_bind(name, WEBHOOKS_EXCHANGE, name)
    finally:
        if ch.is_open:
            ch.close()
    return feats


def schedule_ms(settings: WebhookSettings) -> tuple[int, ...]:
    return tuple(max(1, round(s * 1000)) for s in settings.webhook_retry_schedule)


def fetch_policy(settings: WebhookSettings) -> FetchPolicy:
    """Webhook POSTs go through the fetch guard (a bad allow list stops the process)."""
    try:
        allow = parse_allow(settings.fetch_allow)
    except ValueError as exc:
        raise SettingsError(f"FACEFLEET_FETCH_ALLOW: {exc}") from exc
    t = settings.webhook_timeout_s
    return FetchPolicy(
        allow=allow,
        allow_http=settings.webhook_allow_http,
        connect_timeout=min(10.0, t),
        read_timeout=t,
        deadline=t + min(10.0, t),
        max_redirects=0,
        user_agent=USER_AGENT,
    )


# --- which URL, which events -------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookTarget:
    url: str
    events: frozenset[str]

    def wants(self, event_type: str) -> bool:
        return event_type in self.events


def target_of(payload: EventPayload) -> WebhookTarget | None:
    """A job's webhook from its `queued` payload; None when it has none."""
    if not payload.webhook_url:
        return None
    wanted = DEFAULT_EVENTS if payload.webhook_events is None else payload.webhook_events
    return WebhookTarget(payload.webhook_url, frozenset(wanted))


class _Lru:
    """A bounded map, least recently used out first; thread-safe."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key]

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: str, value: Any = True) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


_MISSING = object()


class TargetCache:
    """job id -> its WebhookTarget (or None), from `queued` payloads and the job store."""

    def __init__(self, store: JobStore, size: int) -> None:
        self.store = store
        self._cache = _Lru(size)
        self._warned = _Lru(1000)

    def lookup(self, event: JobEvent) -> WebhookTarget | None:
        """Raises whatever the job store raises (the caller retries the delivery later)."""
        if event.type == "queued":
            target = target_of(event.payload)
            self._cache.put(event.job_id, target)
            return target
        cached = self._cache.get(event.job_id, _MISSING)
        if cached is not _MISSING:
            hit: WebhookTarget | None = cached
            return hit
        queued = next(
            (e for e in self.store.log(event.job_id).events() if e.type == "queued"), None
        )
        if queued is None:
            # Every writer records `queued` before its own first event, so this store has
            # never seen the job: most likely this process reads another store than the workers.
            if event.job_id in self._warned:
                return None
            self._warned.put(event.job_id)
            log.warning(
                "job %s (%s event) has no record in the job store %s: its webhook, if any, "
                "cannot be found. Does this process read the workers' FACEFLEET_STORE_URL?",
                event.job_id,
                event.type,
                redact(self.store.url),
            )
            return None
        target = target_of(queued.payload)
        self._cache.put(event.job_id, target)
        return target


# --- one job's events in order, many jobs at once ----------------------------------------------


class KeyedLanes:
    """Runs tasks on a bounded pool, one at a time per key and in submission order."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="webhook")
        self._lock = threading.Lock()
        self._queues: dict[str, collections.deque[Callable[[], None]]] = {}

    def submit(self, key: str, task: Callable[[], None]) -> None:
        with self._lock:
            queue = self._queues.get(key)
            if queue is not None:
                queue.append(task)
                return
            self._queues[key] = collections.deque([task])
        self._pool.submit(self._run, key)

    def _run(self, key: str) -> None:
        while True:
            with self._lock:
                queue = self._queues[key]
                if not queue:
                    del self._queues[key]
                    return
                task = queue.popleft()
            try:
                task()
            except Exception:  # tasks handle their own errors; never lose the lane
                log.exception("webhook task failed")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# --- metrics and health -------------------------------------------------------------------------


class WebhookMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.deliveries = Counter(
            "facefleet_webhook_deliveries_total",
            "Webhook deliveries by outcome: delivered (2xx), retried (scheduled again), failed "
            "(parked), gone (410), skipped (no webhook or filtered), duplicate",
            ["outcome"],
            registry=self.registry,
        )
        self.attempts = Counter(
            "facefleet_webhook_attempts_total",
            "POST attempts by result: 2xx, 3xx, 4xx, 5xx, error (timeout, connection, TLS, DNS), "
            "refused (SSRF guard)",
            ["result"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "facefleet_webhook_post_seconds",
            "Time of one POST attempt, until the status line",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.inflight = Gauge(
            "facefleet_webhook_inflight",
            "Deliveries taken from the queue and not yet settled",
            registry=self.registry,
        )
        self.ready = Gauge("facefleet_webhook_ready", "1 while consuming", registry=self.registry)


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


def serve_health(sender: WebhookSender, host: str, port: int) -> ThreadingHTTPServer:
    """/healthz (the consume loop ticks), /readyz (consuming), /metrics (Prometheus)."""
    return health.serve_health(
        host,
        port,
        last_tick=lambda: sender.last_tick,
        readiness=lambda: (sender.state == State.READY and sender.connected, sender.state.value),
        registry=sender.metrics.registry,
    )


# --- the sender ---------------------------------------------------------------------------------

Post = Callable[..., Reply]


def _status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "error"


class WebhookSender:
    """Consumes the webhook queue and POSTs; see the module docstring for the rules.

    Threads: the main thread owns the consumer connection (deliveries, heartbeats, acks via
    add_callback_threadsafe); POSTs run on KeyedLanes (one job at a time per lane); retry and
    parked copies go through a ThreadedPublisher (its own connection, confirms).
    """

    def __init__(
        self,
        settings: WebhookSettings,
        *,
        store: JobStore | None = None,
        metrics: WebhookMetrics | None = None,
        post: Post = http_request,
    ) -> None:
        self.settings = settings
        self.keys = settings.webhook_keys()
        self.schedule = schedule_ms(settings)
        self.queues = WebhookQueues(settings.webhook_queue)
        self.policy = fetch_policy(settings)
        self.store = store or settings.job_store()
        self.targets = TargetCache(self.store, settings.webhook_cache_size)
        self.metrics = metrics or WebhookMetrics()
        self._post = post
        self.name = f"facefleet-webhooks-{socket.gethostname()}-{os.getpid()}"
        self.publisher: ThreadedPublisher | None = None
        self.lanes = KeyedLanes(settings.webhook_concurrency)
        self.delivered = _Lru(settings.webhook_cache_size)
        """webhook-ids this process delivered: duplicates it sees are acked unposted."""
        self.gone = _Lru(settings.webhook_cache_size)
        """Jobs whose receiver answered 410 Gone."""
        self.state = State.STARTING
        self.io = ConsumerIO(pump_s=DRAIN_PUMP_S, stuck_s=DRAIN_STUCK_S)
        self._stopping = threading.Event()
        self._no_more_posts = threading.Event()
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._consumer_tag: str | None = None
        self.connected = False
        self._inflight = 0
        self._inflight_lock = threading.Lock()

    # --- life cycle --------------------------------------------------------------------------

    def request_shutdown(self, *_args: object) -> None:
        self._stopping.set()

    @property
    def last_tick(self) -> float:
        """When the main loop last served its connection or waited on purpose (/healthz)."""
        return self.io.last_tick

    def _set_state(self, state: State) -> None:
        if state != self.state:
            log.info("webhooks %s: %s -> %s", self.name, self.state.value, state.value)
        self.state = state
        self.metrics.ready.set(1 if state == State.READY else 0)

    def run(self) -> int:
        """Consume until SIGTERM; reconnect with backoff when the broker goes away."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_shutdown)
            signal.signal(signal.SIGINT, self.request_shutdown)
        backoff = 1.0
        try:
            while self.publisher is None and not self._stopping.is_set():
                publisher = ThreadedPublisher(self.settings.amqp_url, self.name)
                try:
                    publisher.start()
                    self.publisher = publisher
                except PublishLost as exc:
                    log.warning("%s; retrying in %.0f s", exc, backoff)
                    self._wait(backoff)
                    backoff = min(backoff * 2, 30.0)
            backoff = 1.0
            while not self._stopping.is_set():
                try:
                    self._consume()
                    backoff = 1.0
                except (
                    pika.exceptions.AMQPConnectionError,
                    pika.exceptions.AMQPChannelError,
                ) as exc:
                    self.connected = False
                    self.metrics.ready.set(0)
                    if self._stopping.is_set():
                        break
                    log.warning("broker connection lost (%s); reconnecting in %.0f s", exc, backoff)
                    self._wait(backoff)
                    backoff = min(backoff * 2, 30.0)
            self._drain()
        finally:
            self._set_state(State.STOPPED)
            self.lanes.shutdown()
            if self.publisher is not None:
                self.publisher.close()
            self.store.close()
        return 0

    def _wait(self, seconds: float) -> None:
        """Back off, still ticking: waiting for the broker is not a stalled loop (/healthz)."""
        deadline = time.monotonic() + seconds
        while not self._stopping.is_set() and (left := deadline - time.monotonic()) > 0:
            self._stopping.wait(min(1.0, left))
            self.io.tick()

    def _consume(self) -> None:
        conn = connect(self.settings.amqp_url, self.name)
        self._connection = conn
        feats = declare_webhook_topology(conn, self.queues, self.schedule)
        if not quorum_message_ttl(feats):
            log.warning(
                "broker %s is older than 3.10: delay queues are classic (at-most-once "
                "dead-lettering)",
                ".".join(map(str, feats.version)),
            )
        ch = conn.channel()
        self._channel = ch
        ch.basic_qos(prefetch_count=self.settings.webhook_concurrency * PREFETCH_PER_THREAD)
        self._consumer_tag = ch.basic_consume(self.queues.main, self._on_delivery)
        self.connected = True
        self._set_state(State.READY)
        log.info(
            "webhooks %s consuming %s (retries: %s)",
            self.name,
            self.queues.main,
            ", ".join(self.queues.retry(d).rsplit(".", 1)[1] for d in self.schedule),
        )
        self.io.consume(conn, self._stopping)

    def _inflight_count(self) -> int:
        with self._inflight_lock:
            return self._inflight

    def _drain(self) -> None:
        self._set_state(State.DRAINING)

        def deadline_reached(count: int) -> None:
            log.warning("drain deadline reached; %d delivery(ies) go back to the queue", count)
            self._no_more_posts.set()

        self.io.drain(
            self._connection,
            self._channel,
            self._consumer_tag,
            inflight=self._inflight_count,
            timeout_s=self.settings.webhook_drain_timeout_s,
            on_deadline=deadline_reached,
        )

    # --- deliveries --------------------------------------------------------------------------

    def _on_delivery(
        self, ch: BlockingChannel, method: Basic.Deliver, props: pika.BasicProperties, body: bytes
    ) -> None:
        headers: dict[str, Any] = dict(props.headers or {})
        key = headers.get(HEADER_JOB_ID)
        if not isinstance(key, str):
            parts = (method.routing_key or "").split(".")
            key = parts[1] if len(parts) == 3 else ""
        with self._inflight_lock:
            self._inflight += 1
        self.metrics.inflight.inc()
        tag = method.delivery_tag
        self.lanes.submit(key, lambda: self._handle_safely(ch, tag, headers, body))

    def _handle_safely(
        self, ch: BlockingChannel, tag: int, headers: dict[str, Any], body: bytes
    ) -> None:
        action: Action = "requeue"
        try:
            if self._no_more_posts.is_set() or not ch.is_open:
                return  # draining past the deadline, or the broker took it back already
            action = self.handle(headers, body)
        except Exception:
            log.exception("unexpected error handling a webhook delivery; requeueing it")
            time.sleep(1.0)
        finally:
            self._settle(ch, tag, action)
            with self._inflight_lock:
                self._inflight -= 1
            self.metrics.inflight.dec()

    def _settle(self, ch: BlockingChannel, tag: int, action: Action) -> None:
        """Ack or requeue on the I/O thread; with the channel gone the broker redelivers it."""
        if not ch.is_open:
            return

        def apply() -> None:
            if action == "ack":
                ch.basic_ack(tag)
            else:
                ch.basic_nack(tag, requeue=True)

        call_threadsafe(self._connection, apply)

    def handle(self, headers: Mapping[str, Any], body: bytes) -> Action:
        """One delivery, start to end (POST, then retry copy or parked copy confirmed)."""
        attempt = _attempt(headers)
        try:
            event = JobEvent.decode(body)
        except DecodeError as exc:
            return self._park(headers, body, attempt, f"not a FaceFleet event: {exc.reason}")
        msg_id = webhook_id(event.job_id, event.seq)
        if msg_id in self.delivered:
            self.metrics.deliveries.labels("duplicate").inc()
            return "ack"
        if event.job_id in self.gone:
            self.metrics.deliveries.labels("gone").inc()
            return "ack"
        try:
            target = self.targets.lookup(event)
        except Exception as exc:
            log.warning("job store lookup for job %s failed: %s", event.job_id, exc)
            return self._retry(event, headers, body, attempt, f"job store unavailable: {exc}", "")
        if target is None or not target.wants(event.type):
            self.metrics.deliveries.labels("skipped").inc()
            return "ack"
        payload = event.encode()
        sent = signed_headers(self.keys, msg_id, payload, int(time.time()))
        started = time.monotonic()
        try:
            reply = self._post(
                "POST", target.url, content=payload, headers=sent, policy=self.policy
            )
        except FetchError as exc:
            self.metrics.latency.observe(time.monotonic() - started)
            if exc.code == "fetch_refused":
                self.metrics.attempts.labels("refused").inc()
                return self._park(headers, body, attempt, exc.message, url=target.url)
            self.metrics.attempts.labels("error").inc()
            return self._retry(event, headers, body, attempt, exc.message, target.url)
        self.metrics.latency.observe(time.monotonic() - started)
        self.metrics.attempts.labels(_status_class(reply.status)).inc()
        if 200 <= reply.status < 300:
            self.delivered.put(msg_id)
            self.metrics.deliveries.labels("delivered").inc()
            log.debug("delivered %s to %s (attempt %d)", msg_id, redact(target.url), attempt)
            return "ack"
        if reply.status == 410:
            self.gone.put(event.job_id)
            self.metrics.deliveries.labels("gone").inc()
            log.info(
                "%s answered 410 Gone for %s: no more events of job %s go there",
                redact(target.url),
                msg_id,
                event.job_id,
            )
            return "ack"
        return self._retry(event, headers, body, attempt, f"HTTP {reply.status}", target.url)

    def _retry(
        self,
        event: JobEvent,
        headers: Mapping[str, Any],
        body: bytes,
        attempt: int,
        reason: str,
        url: str,
    ) -> Action:
        if attempt > len(self.schedule):
            return self._park(
                headers, body, attempt, f"gave up after {attempt} attempts: {reason}", url=url
            )
        delay = self.schedule[attempt - 1]
        queue = self.queues.retry(delay)
        log.warning(
            "webhook %s to %s failed (attempt %d: %s); next attempt in %s",
            webhook_id(event.job_id, event.seq),
            redact(url) if url else "?",
            attempt,
            reason,
            queue.rsplit(".", 1)[1],
        )
        copy = _copy_headers(headers, attempt + 1, reason)
        if not self._publish(queue, body, copy, webhook_id(event.job_id, event.seq)):
            return "requeue"
        self.metrics.deliveries.labels("retried").inc()
        return "ack"

    def _park(
        self,
        headers: Mapping[str, Any],
        body: bytes,
        attempt: int,
        reason: str,
        *,
        url: str = "",
    ) -> Action:
        copy = _copy_headers(headers, attempt, reason)
        if url:
            copy[HEADER_WEBHOOK_URL] = redact(url)
        job = headers.get(HEADER_JOB_ID, "?")
        log.error("webhook delivery for job %s parked in %s: %s", job, self.queues.failed, reason)
        if not self._publish(self.queues.failed, body, copy, None):
            return "requeue"
        self.metrics.deliveries.labels("failed").inc()
        return "ack"

    def _publish(
        self, queue: str, body: bytes, headers: dict[str, Any], message_id: str | None
    ) -> bool:
        """A confirmed copy on `queue`; False (and a pause) when the broker did not take it."""
        props = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=message_id,
            headers=headers,
        )
        try:
            if self.publisher is None:
                raise PublishLost("publisher not started")
            self.publisher.publish(WEBHOOKS_EXCHANGE, queue, body, props, timeout_s=35.0)
            return True
        except Exception as exc:
            log.warning("could not publish to %s (%s); the delivery is requeued", queue, exc)
            time.sleep(1.0)
            return False


def _attempt(headers: Mapping[str, Any]) -> int:
    value = headers.get(HEADER_WEBHOOK_ATTEMPT, 1)
    return value if isinstance(value, int) and value >= 1 else 1


def _copy_headers(headers: Mapping[str, Any], attempt: int, reason: str) -> dict[str, Any]:
    """Headers of a retry or parked copy: ours only (no x-death growing at every step)."""
    copy: dict[str, Any] = {HEADER_SCHEMA: SCHEMA_VERSION}
    if isinstance(job := headers.get(HEADER_JOB_ID), str):
        copy[HEADER_JOB_ID] = job
    copy[HEADER_WEBHOOK_ATTEMPT] = attempt
    copy[HEADER_WEBHOOK_REASON] = reason[:1000]
    return copy


# --- the command ---------------------------------------------------------------------------------


def replay_failed(settings: WebhookSettings, *, limit: int | None = None) -> int:
    """Move parked deliveries back to the sender's queue with a fresh attempt count (after the
    receiver or FACEFLEET_FETCH_ALLOW was fixed); each is acked off the failed queue only once
    its copy is confirmed. Returns how many were moved."""
    queues = WebhookQueues(settings.webhook_queue)
    conn = connect(settings.amqp_url, "facefleet-webhooks-replay")
    moved = 0
    try:
        declare_webhook_topology(conn, queues, schedule_ms(settings))
        ch = conn.channel()
        ch.confirm_delivery()
        while limit is None or moved < limit:
            method, props, body = ch.basic_get(queues.failed)
            if method is None:
                break
            headers = {
                k: v
                for k, v in (props.headers or {}).items()
                if k in (HEADER_SCHEMA, HEADER_JOB_ID)
            }
            headers[HEADER_WEBHOOK_ATTEMPT] = 1
            ch.basic_publish(
                WEBHOOKS_EXCHANGE,
                queues.main,
                body,
                pika.BasicProperties(
                    content_type=CONTENT_TYPE,
                    delivery_mode=pika.DeliveryMode.Persistent,
                    message_id=props.message_id,
                    headers=headers,
                ),
                mandatory=True,
            )
            ch.basic_ack(method.delivery_tag)
            moved += 1
    finally:
        if conn.is_open:
            conn.close()
    return moved


def register(sub: Any, name: str) -> None:
    p = sub.add_parser(
        name,
        help="POST job events to each job's webhook_url (Standard Webhooks, signed, retried)",
        description="Consume facefleet.webhooks and POST each job's events to its webhook_url, "
        "signed with FACEFLEET_WEBHOOK_SECRET, retried on FACEFLEET_WEBHOOK_RETRY_SCHEDULE.",
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=["run", "replay-failed"],
        default="run",
        help="run (default): the sender; replay-failed: move parked deliveries back to the "
        "queue with a fresh attempt count, then exit",
    )
    p.add_argument("--limit", type=int, help="replay-failed: move at most this many")
    p.add_argument("--concurrency", type=int, help="POSTs at once (FACEFLEET_WEBHOOK_CONCURRENCY)")
    p.add_argument("--health-port", type=int, help="0 disables (FACEFLEET_HEALTH_PORT)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = {
        key: value
        for key, value in {
            "webhook_concurrency": args.concurrency,
            "health_port": args.health_port,
        }.items()
        if value is not None
    }
    try:
        settings = WebhookSettings.load(**overrides)
        fetch_policy(settings)
        if args.action == "replay-failed":
            try:
                moved = replay_failed(settings, limit=args.limit)
            except pika.exceptions.AMQPConnectionError as exc:
                print(f"facefleet: cannot reach the broker ({exc!r}); check AMQP_URL")
                return 4
            print(f"moved {moved} parked delivery(ies) from {settings.webhook_queue}.failed back")
            return 0
        configure_logs(settings.log_level, settings.log_format)
        logging.getLogger("pika").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        sender = WebhookSender(settings)
    except SettingsError as exc:
        die(exc)
        return 2
    server = None
    if settings.health_port:
        server = serve_health(sender, settings.health_host, settings.health_port)
    try:
        return sender.run()
    finally:
        if server is not None:
            server.shutdown()
