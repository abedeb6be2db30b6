"""The tier's RabbitMQ queue as the scaler sees it (keda.md §1.2).

Two counts matter and they differ exactly when pods are busy:

* AMQP (`protocol: amqp`): passive declare's message-count = READY only, read live.
* Management API (`protocol: http`, the chart's default): `messages` = ready + unacknowledged,
  refreshed by the broker every collect_statistics_interval = 5 s, so the value is up to 5 s old.
  The broker's 5 s clock has its own phase: KEDA's polls and the HPA's 15 s syncs are all
  multiples of 5 s from t=0, so a refresh aligned with them would make the staleness always 0.

A delivered message is unacked until its job finishes (prefetch = worker concurrency, so every
unacked message is a running job).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

Counting = Literal["management", "amqp"]

STATS_INTERVAL_S = 5
"""RabbitMQ collect_statistics_interval default, 5000 ms (keda.md §1.2)."""


@dataclass
class Message:
    job_id: int
    arrived_s: int
    service_s: int
    attempts: int = 0


class Broker:
    """One queue: FIFO ready messages, a count of unacked ones, and a stale stats snapshot."""

    def __init__(self, stats_phase_s: int = 0) -> None:
        self.stats_phase_s = stats_phase_s % STATS_INTERVAL_S
        """Seconds after t=0 of the first stats emission; then every STATS_INTERVAL_S."""
        self.ready: deque[Message] = deque()
        self.unacked = 0
        # "Queues start without any stats and emit them after 5 seconds" (§1.2).
        self._stats_messages = 0
        self.stats_ready = 0
        self.stats_unacked = 0
        """The last snapshot's two parts: `facefleet scaler` reads them (TierView.ready,
        .unacked) from the same management API, just as stale."""

    def publish(self, msg: Message) -> None:
        self.ready.append(msg)

    def deliver(self) -> Message | None:
        """basic.deliver to a consumer with a free prefetch slot."""
        if not self.ready:
            return None
        self.unacked += 1
        return self.ready.popleft()

    def ack(self) -> None:
        self.unacked -= 1

    def requeue(self, msg: Message) -> None:
        """Connection dropped or consumer killed: the delivery returns to ready, at the head
        (approximately its original position) so it is the next one delivered."""
        self.unacked -= 1
        self.ready.appendleft(msg)

    def tick_stats(self, now_s: int) -> None:
        """The management plugin's periodic stats emission (§1.2), at its own phase."""
        if (now_s - self.stats_phase_s) % STATS_INTERVAL_S == 0:
            self.stats_ready, self.stats_unacked = len(self.ready), self.unacked
            self._stats_messages = self.stats_ready + self.stats_unacked

    def metric(self, counting: Counting) -> int:
        """The queue count the RabbitMQ scaler returns (§1.2, §1.3: queue-wide, not per pod)."""
        if counting == "amqp":
            return len(self.ready)
        return self._stats_messages
