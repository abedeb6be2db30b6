"""Retry policy: how many attempts a job gets, how long it backs off, whether its next attempt
may run on the delivery it came with, and how long a delivery waits for another worker's claim.

The runner (consumer/runner.py) asks; this module decides. Everything here is bounded by the
tier's hold budget (its consumer timeout less a safety minute, `TierSpec.hold_budget_s`): no
delivery is held into the broker's consumer timeout, a job that would be is given back instead.

Attempts are counted from the job's `retrying` events since its last `replayed` (on any worker,
any delivery), never from x-delivery-count: up to RabbitMQ 4.2 every requeue counts there,
drains and give-backs included (anchors.md B7), and a replayed dead letter starts afresh.
"""

from __future__ import annotations

import logging
import random
import threading
import time

from facefleet.consumer.delivery import Delivery
from facefleet.consumer.errors import TransientJobError
from facefleet.jobstore import Claim, JobLog, attempts_since_replay
from facefleet.settings import WorkerSettings
from facefleet.wire import TierSpec

log = logging.getLogger(__name__)

CLAIM_POLL_S = 0.25
"""How often a delivery waiting for another worker's claim tries again (a non-blocking lock)."""


def retry_in_process(tier: TierSpec, held_s: float, delay_s: float) -> bool:
    """May the next attempt run on this delivery? Only if the backoff plus one more full-length
    attempt still ends inside the tier's hold budget (its consumer timeout less a minute);
    otherwise the job is given back, so no delivery is held into the consumer timeout."""
    return held_s + delay_s + tier.max_job_s <= tier.hold_budget_s()


def claim_wait_s(tier: TierSpec) -> float:
    """Longest wait for another worker's claim on a job: whatever of the hold budget one
    full-length attempt after the wait leaves."""
    return max(0.0, tier.hold_budget_s() - tier.max_job_s)


def attempts_so_far(journal: JobLog) -> int:
    """Failed attempts of a job: its `retrying` events (on any worker, any delivery) since its
    last `replayed` (a replayed dead letter starts with a fresh attempt budget)."""
    return attempts_since_replay(journal.events())


class RetryPolicy:
    """One tier's retry and claim-wait policy (settings: max_attempts, retry_base_s,
    retry_max_s; the tier: max_job_s and its hold budget)."""

    def __init__(self, settings: WorkerSettings, tier: TierSpec) -> None:
        self.settings = settings
        self.tier = tier

    def exhausted(self, attempt: int) -> bool:
        """This attempt was the job's last: a transient failure now dead-letters it."""
        return attempt >= self.settings.max_attempts

    def backoff_s(self, err: TransientJobError, attempt: int) -> float:
        """The wait before the attempt after `attempt`: the error's own delay if it names one,
        else exponential from retry_base_s; capped at retry_max_s; ±20% jitter."""
        base = (
            err.delay_s
            if err.delay_s is not None
            else self.settings.retry_base_s * 2 ** (attempt - 1)
        )
        return min(self.settings.retry_max_s, base) * random.uniform(0.8, 1.2)

    def in_process(self, held_s: float, delay_s: float) -> bool:
        """May the next attempt run on this delivery (held for held_s so far)?"""
        return retry_in_process(self.tier, held_s, delay_s)

    def wait_before_give_back_s(self, held_s: float, delay_s: float) -> float:
        """A job given back because its next attempt would not fit: wait out the backoff here
        first if that still fits the hold budget (the fresh copy is then taken no sooner than
        the backoff asked), else give it back at once."""
        return delay_s if held_s + delay_s <= self.tier.hold_budget_s() else 0.0

    def claim_wait_s(self) -> float:
        return claim_wait_s(self.tier)

    def wait_for_claim(self, claim: Claim, delivery: Delivery, draining: threading.Event) -> bool:
        """Another live worker runs this job (a duplicate submit/delivery): wait for its claim,
        while not draining and while a full-length run after the wait still fits the hold
        budget. True once the claim is taken here; False: give the delivery back."""
        limit = self.claim_wait_s()
        while True:
            if claim.try_acquire():
                return True
            if draining.is_set():
                return False
            if time.monotonic() - delivery.received_at > limit:
                log.info(
                    "job %s: still claimed elsewhere after %.0f s; giving it back",
                    claim.job_id,
                    limit,
                )
                return False
            time.sleep(CLAIM_POLL_S)
