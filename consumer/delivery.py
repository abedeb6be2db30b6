"""One delivery from a job queue, as the worker and the runner see it."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Literal

import pika

Action = Literal["ack", "give_back", "requeue"]
"""What the worker does with a delivery once the runner is done with it: ack it; give it back
on purpose (a fresh confirmed copy, then ack: spends no delivery limit); or nack-requeue it (an
unexpected error: counts towards x-delivery-limit, the crash-loop guard)."""

_DELIVERY_KEYS = itertools.count(1)


@dataclass
class Delivery:
    tag: int
    body: bytes
    properties: pika.BasicProperties
    redelivered: bool
    received_at: float = field(default_factory=time.monotonic)
    key: int = field(default_factory=lambda: next(_DELIVERY_KEYS))
    """Unique in this process: delivery tags restart at 1 on every new channel (reconnect)."""

    @property
    def delivery_count(self) -> int:
        """Earlier returns of this message, from the quorum queue's x-delivery-count header
        (for logs only: up to RabbitMQ 4.2 every requeue counts, so it is no attempt count)."""
        headers = self.properties.headers or {}
        try:
            return int(headers.get("x-delivery-count", 0) or 0)
        except (TypeError, ValueError):
            return 0
