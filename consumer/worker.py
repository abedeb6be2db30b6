"""`facefleet worker`: consume one tier's queue and run a processor, at least once, done once.

Threads (pika connections are not thread-safe, and GPU work must never block heartbeats):

    main thread      consumer connection: deliveries, heartbeats, acks (via add_callback_threadsafe);
                     the consume loop, pump and drain are facefleet/consuming.py, shared with the
                     webhooks sender
    job threads      concurrency x pipeline_depth, running consumer.runner.JobRunner: decode,
                     claim, process, commit the result, emit events; with --batch N a thread
                     takes whatever deliveries wait (up to N) and runs them as one batch

The pipeline across jobs (FACEFLEET_PIPELINE_DEPTH = D): each GPU slot has D jobs in flight, and
their model calls take the slot's inference lane (the processor's Device, first come first
served) while the other jobs' CPU steps run: job N on the GPU, N+1 fetched and decoded, N-1
encoded, committed and acked. D = 1 is the sequential worker: one code path, one job per slot.
Prefetch = concurrency x D x batch, so every delivery held has a thread; one that has not
started when the worker drains is given back at once (the runner checks before claiming).
    publisher        ThreadedPublisher: events and dead letters, with confirms
    health server    /healthz, /readyz, /metrics

Life cycle (WorkerState): STARTING -> READY -> DRAINING -> STOPPED. SIGTERM moves to DRAINING:
the consumer is cancelled (no new jobs), running jobs get drain_timeout_s to finish, whatever is
still running then stops at its next checkpoint and is given back for another worker (a fresh
confirmed copy, then the original is acked, so drains never spend the delivery limit), and the
process exits 0. This is what makes KEDA scale-in safe. The worker owns these shutdown flags
(`_draining`, `stop_jobs`) and hands them to the runner, whose claim waits, backoff sleeps and
processor checkpoints obey them; it also does the giving back (consumer/giveback.py).

Ack discipline (at-least-once, completed once): a job is acked only after its result directory
was renamed into place (fsynced) and `completed` is in the journal and the stream; a crash before
that means redelivery, and the redelivered copy finds the journal's terminal event (or the
committed result) and is acked without running again.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic

from facefleet.amqp import (
    Backoff,
    ThreadedPublisher,
    connect,
    connection_endpoint,
    declare_topology,
)
from facefleet.consumer.delivery import Action, Delivery
from facefleet.consumer.device import Device
from facefleet.consumer.giveback import give_back
from facefleet.consumer.metrics import WorkerMetrics
from facefleet.consumer.processors.base import Processor
from facefleet.consumer.runner import JobRunner
from facefleet.consuming import ConsumerIO, call_threadsafe
from facefleet.jobstore import JobStore, store_outage
from facefleet.media import MediaStore
from facefleet.settings import WorkerSettings
from facefleet.storage import Storage
from facefleet.wire import (
    CANCEL_BINDING,
    CONTROL_EXCHANGE,
    CancelRequest,
    DecodeError,
    consumer_timeout_warning,
    control_pending_queue,
    dead_notify_queue,
    job_queue,
)

log = logging.getLogger(__name__)

DRAIN_PUMP_S = 0.2
"""One wait of the drain loop for broker I/O (acks of finishing jobs, heartbeats)."""
DRAIN_STUCK_S = 10.0
"""After the drain deadline, how long jobs get to reach a checkpoint and be given back before
the connection is closed under them (the broker then requeues them)."""
STORE_PROBE_S = 2.0
"""How often a paused worker asks whether the job store answers again."""
PROBE_JOB_ID = "00000000-0000-0000-0000-000000000000"


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


_ALLOWED = {
    WorkerState.STARTING: {WorkerState.READY, WorkerState.DRAINING, WorkerState.STOPPED},
    WorkerState.READY: {WorkerState.DRAINING, WorkerState.STOPPED},
    WorkerState.DRAINING: {WorkerState.STOPPED},
    WorkerState.STOPPED: set(),
}


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        processor: Processor,
        *,
        storage: Storage | None = None,
        media: MediaStore | None = None,
        store: JobStore | None = None,
        metrics: WorkerMetrics | None = None,
        on_busy: Callable[[bool], None] | None = None,
    ) -> None:
        self.settings = settings
        self.tier = settings.tier_spec(settings.tier)
        self.processor = processor

        self.metrics = metrics or WorkerMetrics()
        self.on_busy = on_busy
        self.name = f"{socket.gethostname()}-{os.getpid()}"
        self.state = WorkerState.STARTING
        self._state_lock = threading.Lock()
        self.job_threads = settings.concurrency * settings.pipeline_depth
        """Job threads: a GPU slot's D jobs in flight each have one (see the module docstring)."""
        self._executor = ThreadPoolExecutor(self.job_threads, thread_name_prefix="job")
        self._inflight: dict[int, str] = {}
        """Deliveries being handled (by Delivery.key) and their job ids once decoded."""
        self._inflight_lock = threading.Lock()
        self._waiting: collections.deque[Delivery] = collections.deque()
        """Batch lane: deliveries no slot has taken yet."""
        self._batchers = 0
        """Batch lane: slots taking from _waiting now (guarded by _inflight_lock)."""
        self._unsettled: set[int] = set()
        """Delivery tags of the current channel not yet acked or nacked (I/O thread only)."""
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._consumer_tag: str | None = None
        self._pending: BlockingChannel | None = None
        self._pending_tag: str | None = None
        self._draining = threading.Event()
        """Set on SIGTERM (or FACEFLEET_MAX_JOBS / idle exit): the consumer is cancelled, no
        claim waits or backoff sleeps go on (the runner gives those jobs back), drain begins."""
        self.stop_jobs = threading.Event()
        """Set when the drain deadline passed: running jobs stop at their next checkpoint and
        are given back."""
        self._store_down = threading.Event()
        """Set by job threads when the job store stopped answering: the main loop pauses."""
        self.paused: str | None = None
        """Why the worker takes no jobs now although it runs (shown by /readyz), or None."""
        self.publisher = ThreadedPublisher(settings.amqp_urls, f"facefleet-worker-{self.name}")
        self._failed: str | None = None
        """host:port of the node whose link was lost last: the next connect tries it last."""
        self.runner = JobRunner(
            settings,
            self.tier,
            processor,
            storage,
            self.metrics,
            self.publisher,
            self.name,
            media=media or settings.media_store(),
            store=store or settings.job_store(),
            draining=self._draining,
            stop_jobs=self.stop_jobs,
            on_store_outage=self._on_store_outage,
        )
        self.io = ConsumerIO(pump_s=DRAIN_PUMP_S, stuck_s=DRAIN_STUCK_S)
        self.last_activity = time.monotonic()
        self.handled = 0
        self.received = 0
        """Deliveries taken from the job queue (FACEFLEET_MAX_JOBS counts these)."""
        self._timeout_checked = False
        device = getattr(processor, "device", None)
        if isinstance(device, Device):
            self.metrics.watch_device(device)

    # --- state ---------------------------------------------------------------------------------

    def _set_state(self, new: WorkerState) -> None:
        with self._state_lock:
            if new == self.state:
                return
            if new not in _ALLOWED[self.state]:
                raise RuntimeError(f"worker cannot go from {self.state.value} to {new.value}")
            log.info("worker %s: %s -> %s", self.name, self.state.value, new.value)
            self.state = new
            self.metrics.ready.set(1 if new == WorkerState.READY else 0)

    def request_shutdown(self, *_args: object) -> None:
        """SIGTERM/SIGINT handler: begin draining (safe to call more than once)."""
        self._draining.set()

    @property
    def last_tick(self) -> float:
        """When the main loop last served its connection (/healthz)."""
        return self.io.last_tick

    # --- main loop -----------------------------------------------------------------------------

    def run(self) -> int:
        """Warm up, consume until drained, return the exit code."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_shutdown)
            signal.signal(signal.SIGINT, self.request_shutdown)
        self.processor.warm_up()
        self.publisher.start()
        backoff = Backoff(0.2, 30.0)
        while not self._draining.is_set():
            try:
                self._consume()
                backoff.reset()
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as exc:
                if self._connection is not None:
                    self._failed = connection_endpoint(self._connection) or self._failed
                if self._draining.is_set():
                    break
                delay = backoff.next_s()  # the next connect tries the other nodes first
                log.warning(
                    "broker connection lost (%s, node %s); reconnecting in %.1f s",
                    exc,
                    self._failed,
                    delay,
                )
                self._draining.wait(delay)
        self._drain()
        self._set_state(WorkerState.STOPPED)
        self.publisher.close()
        self.runner.store.close()
        return 0

    def _consume(self) -> None:
        self._connection = None
        conn = connect(self.settings.amqp_urls, f"facefleet-worker-{self.name}", avoid=self._failed)
        self._connection = conn
        feats = declare_topology(conn, self.settings.tiers(), self.settings.placement())
        if not self._timeout_checked:
            self._timeout_checked = True
            warning = consumer_timeout_warning(self.tier, feats)
            if warning is not None:
                log.warning("%s", warning)
        ch = conn.channel()
        self._channel = ch
        self._unsettled = set()
        ch.basic_qos(prefetch_count=self.job_threads * self.settings.batch)
        # Cancels: live ones for running jobs on an exclusive queue; durable ones (sent while a
        # job was queued, maybe with no worker up) recorded in the job state before any job is
        # taken, then as they come.
        control = conn.channel()
        ctl = control.queue_declare("", exclusive=True, auto_delete=True)
        control.queue_bind(ctl.method.queue, CONTROL_EXCHANGE, CANCEL_BINDING)
        control.basic_consume(ctl.method.queue, self._on_control, auto_ack=True)
        pending = conn.channel()
        pending.basic_qos(prefetch_count=50)
        self._pending = pending
        if self._record_pending_cancels(pending):
            self._pending_tag = pending.basic_consume(
                control_pending_queue(self.tier.name), self._on_pending_cancel
            )
            if self.settings.max_jobs is None or self.received < self.settings.max_jobs:
                self._consumer_tag = ch.basic_consume(job_queue(self.tier.name), self._on_job)
        else:
            self._store_down.set()  # the loop below pauses, probes, records them, then consumes
        # Broker-side dead letters (delivery limit after crashes) get their event here.
        notify = conn.channel()
        notify.basic_qos(prefetch_count=10)
        notify.basic_consume(dead_notify_queue(self.tier.name), self._on_dead_letter)
        if self.state == WorkerState.STARTING:
            self._set_state(WorkerState.READY)
        log.info("worker %s consuming %s", self.name, job_queue(self.tier.name))

        def each_turn() -> None:
            self._check_exit_conditions()
            if self._store_down.is_set():
                self._pause_for_store(conn, ch)

        self.io.consume(conn, self._draining, each_turn)

    def _on_store_outage(self, _exc: BaseException) -> None:
        self._store_down.set()

    def _pause_for_store(self, conn: pika.BlockingConnection, ch: BlockingChannel) -> None:
        """The job store stopped answering: take no more jobs (deliveries still held are given
        back by the runner), keep the connection's heartbeats and acks going, probe the store
        every STORE_PROBE_S in a thread, and consume again once it answers. /readyz says why."""
        if self._consumer_tag is not None:
            with contextlib.suppress(pika.exceptions.AMQPError):
                ch.basic_cancel(self._consumer_tag)
            self._consumer_tag = None
        pending = self._pending
        if pending is not None and self._pending_tag is not None:
            with contextlib.suppress(pika.exceptions.AMQPError):
                pending.basic_cancel(self._pending_tag)  # its cancels wait on the broker
            self._pending_tag = None
        self.paused = "job store unavailable"
        self.metrics.ready.set(0)
        log.warning("worker %s paused: the job store does not answer", self.name)
        answered = threading.Event()

        def probe() -> None:
            while not answered.is_set() and not self._draining.is_set():
                try:
                    self.runner.store.get_job(PROBE_JOB_ID)
                    answered.set()
                    return
                except Exception as exc:
                    log.info("job store still unavailable: %s", exc)
                    self._draining.wait(STORE_PROBE_S)

        threading.Thread(target=probe, name="store-probe", daemon=True).start()
        while not answered.is_set() and not self._draining.is_set():
            conn.process_data_events(time_limit=0.5)
            self.io.tick()
        answered.set()  # stops the probe when draining
        self._store_down.clear()
        if self._draining.is_set():
            return
        if pending is not None and pending.is_open and not self._record_pending_cancels(pending):
            self._store_down.set()  # still failing: pause again
            return
        self.paused = None
        if pending is not None and pending.is_open:
            self._pending_tag = pending.basic_consume(
                control_pending_queue(self.tier.name), self._on_pending_cancel
            )
        if self.settings.max_jobs is None or self.received < self.settings.max_jobs:
            self._consumer_tag = ch.basic_consume(job_queue(self.tier.name), self._on_job)
        self.metrics.ready.set(1 if self.state == WorkerState.READY else 0)
        log.info("worker %s resumed: the job store answers again", self.name)

    def _check_exit_conditions(self) -> None:
        """ScaledJob mode: leave after max_jobs deliveries, or when idle for idle_exit_s."""
        s = self.settings
        if s.max_jobs is not None and self.handled >= s.max_jobs:
            log.info("handled %d job(s) (FACEFLEET_MAX_JOBS); exiting", self.handled)
            self._draining.set()
        elif (
            s.idle_exit_s is not None
            and self._inflight_count() == 0
            and time.monotonic() - self.last_activity > s.idle_exit_s
        ):
            log.info("idle for %.0f s (FACEFLEET_IDLE_EXIT_S); exiting", s.idle_exit_s)
            self._draining.set()

    def _drain(self) -> None:
        self._set_state(WorkerState.DRAINING)

        def deadline_reached(count: int) -> None:
            log.warning("drain deadline reached; giving back %d job(s)", count)
            self.stop_jobs.set()

        self.io.drain(
            self._connection,
            self._channel,
            self._consumer_tag,
            inflight=self._inflight_count,
            timeout_s=self.settings.drain_timeout_s,
            on_deadline=deadline_reached,
            before_close=lambda: self._executor.shutdown(wait=False, cancel_futures=True),
        )

    def _inflight_count(self) -> int:
        with self._inflight_lock:
            return len(self._inflight)

    # --- broker callbacks (main thread) ------------------------------------------------------

    def _on_job(
        self,
        ch: BlockingChannel,
        method: Basic.Deliver,
        props: pika.BasicProperties,
        body: bytes,
    ) -> None:
        delivery = Delivery(method.delivery_tag, body, props, bool(method.redelivered))
        self._unsettled.add(delivery.tag)
        self.last_activity = time.monotonic()
        self.received += 1
        with self._inflight_lock:
            self._inflight[delivery.key] = ""
        max_jobs = self.settings.max_jobs
        if max_jobs is not None and self.received > max_jobs:
            # Prefetched before the cancel below took effect: not this pod's share.
            self._executor.submit(self._finish, ch, delivery, "give_back")
            return
        if max_jobs is not None and self.received == max_jobs and self._consumer_tag is not None:
            # A ScaledJob pod takes exactly its share. Cancel now, from this callback: waiting
            # for the loop's exit check lets the next job arrive between the last ack and the
            # check (pika nacks whatever reaches it after the cancel, undispatched).
            tag, self._consumer_tag = self._consumer_tag, None
            with contextlib.suppress(pika.exceptions.AMQPError):
                ch.basic_cancel(tag)
        if self.on_busy is not None:
            self.on_busy(True)
        if self.settings.batch == 1:
            self._executor.submit(self._handle_safely, ch, delivery)
            return
        with self._inflight_lock:
            self._waiting.append(delivery)
            if self._batchers >= self.job_threads:
                return  # a busy slot takes it with its next batch
            self._batchers += 1
        self._executor.submit(self._take_batches, ch)

    def _on_control(
        self, _ch: BlockingChannel, _m: Basic.Deliver, _p: pika.BasicProperties, body: bytes
    ) -> None:
        try:
            req = CancelRequest.decode(body)
        except DecodeError as exc:
            log.warning("ignoring malformed control message: %s", exc.reason)
            return
        self.runner.note_cancel(req)

    def _record_pending_cancels(self, ch: BlockingChannel, limit: int = 100_000) -> bool:
        """Before taking jobs: record every waiting cancel request in the job state, so a job
        cancelled while queued (perhaps while its tier had no worker) is cancelled when taken.
        False if the job store could not record one (it stays on the broker)."""
        for _ in range(limit):
            method, props, body = ch.basic_get(control_pending_queue(self.tier.name))
            if method is None:
                return True
            if not self._on_pending_cancel(ch, method, props, body):
                return False
        return True

    def _on_pending_cancel(
        self,
        ch: BlockingChannel,
        method: Basic.Deliver | Basic.GetOk,
        _p: pika.BasicProperties,
        body: bytes,
    ) -> bool:
        try:
            req = CancelRequest.decode(body)
        except DecodeError as exc:
            log.warning("dropping malformed cancel request: %s", exc.reason)
            ch.basic_ack(method.delivery_tag)
            return True
        if self.runner.note_cancel(req):
            ch.basic_ack(method.delivery_tag)
            return True
        ch.basic_nack(method.delivery_tag, requeue=True)
        return False

    def _on_dead_letter(
        self, ch: BlockingChannel, method: Basic.Deliver, props: pika.BasicProperties, body: bytes
    ) -> None:
        task = self.runner.broker_dead_letter(props.headers or {}, body)
        if task is None:
            ch.basic_ack(method.delivery_tag)
        else:
            self._executor_free(task, ch, method.delivery_tag)

    def _executor_free(self, fn: Callable[[], Any], ch: BlockingChannel, tag: int) -> None:
        """Run a small publishing task off the I/O thread, then ack on it."""

        def task() -> None:
            try:
                fn()
                self._threadsafe(lambda: ch.basic_ack(tag))
            except Exception as exc:
                log.error("dead-letter notification failed: %s", exc)
                if store_outage(exc):
                    self._store_down.set()
                self._threadsafe(lambda: ch.basic_nack(tag, requeue=True))

        threading.Thread(target=task, daemon=True).start()

    # --- job threads ---------------------------------------------------------------------------

    def _threadsafe(self, fn: Callable[[], None]) -> None:
        call_threadsafe(self._connection, fn)

    def _finish(self, ch: BlockingChannel, delivery: Delivery, action: Action) -> None:
        self._finish_many(ch, [delivery], [action])

    def _finish_many(
        self, ch: BlockingChannel, deliveries: list[Delivery], actions: list[Action]
    ) -> None:
        """Settle handled deliveries with the broker: one hop to the I/O thread for all."""
        settle: list[tuple[int, bool]] = []  # (tag, ack?)
        for delivery, action in zip(deliveries, actions, strict=True):
            if action == "give_back":
                # On this job thread, the copy is confirmed before the original is acked. With
                # the channel gone the broker has requeued the original already; a copy would be
                # a duplicate.
                action = (
                    give_back(self.publisher, self.tier.name, delivery, self.metrics)
                    if ch.is_open
                    else "requeue"
                )
            if action == "ack":
                settle.append((delivery.tag, True))
            elif action == "requeue":
                settle.append((delivery.tag, False))

        def apply() -> None:
            self._settle(ch, settle)

        if settle:
            self._threadsafe(apply)
        with self._inflight_lock:
            for delivery in deliveries:
                self._inflight.pop(delivery.key, None)
            idle = not self._inflight
            self.handled += len(deliveries)
            self.last_activity = time.monotonic()
        if idle and self.on_busy is not None:
            self.on_busy(False)

    def _settle(self, ch: BlockingChannel, settle: list[tuple[int, bool]]) -> None:
        """On the I/O thread: nack what is requeued; ack the rest with one multiple-ack when
        they are the oldest unsettled deliveries (a batch usually is), else one by one."""
        acks = sorted(tag for tag, ack in settle if ack)
        current = ch is self._channel
        for tag, ack in settle:
            if not ack:
                ch.basic_nack(tag, requeue=True)
            if current:
                self._unsettled.discard(tag)
        if not acks:
            return
        if current and len(acks) > 1 and (not self._unsettled or min(self._unsettled) > acks[-1]):
            ch.basic_ack(acks[-1], multiple=True)
            return
        for tag in acks:
            ch.basic_ack(tag)

    def _take_batches(self, ch: BlockingChannel) -> None:
        """A slot of the batch lane: run whatever waits (up to --batch) until nothing does."""
        while True:
            with self._inflight_lock:
                if not self._waiting:
                    self._batchers -= 1
                    return
                n = min(len(self._waiting), self.settings.batch)
                batch = [self._waiting.popleft() for _ in range(n)]
            self._handle_batch_safely(ch, batch)

    def _handle_batch_safely(self, ch: BlockingChannel, batch: list[Delivery]) -> None:
        self._run_safely(ch, batch, lambda on_job: self.runner.handle_batch(batch, on_job))

    def _handle_safely(self, ch: BlockingChannel, delivery: Delivery) -> None:
        self._run_safely(
            ch,
            [delivery],
            lambda on_job: [self.runner.handle(delivery, lambda job_id: on_job(delivery, job_id))],
        )

    def _run_safely(
        self,
        ch: BlockingChannel,
        deliveries: list[Delivery],
        run: Callable[[Callable[[Delivery, str], None]], list[Action]],
    ) -> None:
        """Run deliveries through the runner; anything unexpected requeues them all."""
        actions: list[Action] = ["requeue"] * len(deliveries)

        def on_job(delivery: Delivery, job_id: str) -> None:
            with self._inflight_lock:
                self._inflight[delivery.key] = job_id

        try:
            actions = run(on_job)
        except Exception:
            log.exception("unexpected error handling %d delivery(ies); requeueing", len(deliveries))
            time.sleep(1.0)
        finally:
            self._finish_many(ch, deliveries, actions)
