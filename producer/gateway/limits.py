"""Per-API-key limits, checked before a submit is queued: jobs at once (queued + running) and
submissions in the last minute. Both are counted in the job store, not in this process, so they
hold across replicas and restarts:

- active: `store.active_count(key)`, the key's jobs whose state is queued or running;
- per minute: the key's jobs created in the last 60 s (a sliding window over `created_at`,
  whatever became of them), read as one page of `list_jobs`; Retry-After is when the oldest of
  them leaves the window.

The gateway records each job it queues in the store right after the broker confirmed it
(`record_submitted`), so both counts include jobs no worker has taken yet. A check and the
record that follows it run under a per-key lock in each replica: one replica's concurrent
submits are counted exactly; replicas racing each other can overshoot a limit by at most the
submits in flight at that moment (no distributed lock). A resubmission of an existing job (its
idempotency key seen before) queues nothing and is never refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from facefleet.jobstore import JobStore
from facefleet.settings import GatewaySettings

WINDOW = timedelta(seconds=60)
PAGE_MAX = 1000
"""list_jobs' largest page; a per-minute limit above it is counted with `usage` instead."""


@dataclass(frozen=True)
class LimitExceeded(Exception):
    """A submit over one of the key's limits: answered 429 with Retry-After."""

    api_key_id: str
    limit: str
    """`active` (jobs queued + running) or `per_minute` (submissions in the last 60 s)."""
    allowed: int
    current: int
    retry_after_s: int

    def body(self) -> dict[str, Any]:
        what = (
            f"{self.current} jobs queued or running, the limit is {self.allowed}"
            if self.limit == "active"
            else f"{self.current} jobs submitted in the last minute, the limit is {self.allowed}"
        )
        return {
            "detail": f"API key {self.api_key_id}: {what}; retry in {self.retry_after_s} s",
            "limit": self.limit,
            "allowed": self.allowed,
            "current": self.current,
            "api_key_id": self.api_key_id,
        }


def has_limits(settings: GatewaySettings, api_key_id: str) -> bool:
    return any(n is not None for n in settings.key_limits(api_key_id))


def check_limits(
    store: JobStore, settings: GatewaySettings, api_key_id: str, now: datetime
) -> None:
    """Raise LimitExceeded when one more job of this key would pass one of its limits
    (blocking: store queries; run it in a thread)."""
    max_active, per_minute = settings.key_limits(api_key_id)
    if max_active is not None:
        active = store.active_count(api_key_id)
        if active >= max_active:
            raise LimitExceeded(api_key_id, "active", max_active, active, settings.retry_after_s)
    if per_minute is not None:
        start = now - WINDOW
        if per_minute <= PAGE_MAX:
            recent = store.list_jobs(api_key_id=api_key_id, since=start, limit=per_minute).jobs
            if len(recent) >= per_minute:
                # newest first: the window has room again once the per_minute-th newest left it
                oldest = recent[-1].created_at or now
                wait = (oldest + WINDOW - now).total_seconds()
                raise LimitExceeded(
                    api_key_id, "per_minute", per_minute, len(recent), max(1, math.ceil(wait))
                )
        else:
            count = store.usage(api_key_id, since=start).total
            if count >= per_minute:
                raise LimitExceeded(api_key_id, "per_minute", per_minute, count, 60)
