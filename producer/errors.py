"""Why a submission failed, so callers (and the gateway's HTTP mapping) can act on it.

SubmitError
├── TierFullError        the tier's queue is at max-length (reject-publish): retry later; HTTP 429
├── UnroutableJobError   no queue is bound for the tier: topology not applied or tier unknown
├── PublishNackedError   the broker refused the message for another reason
├── InvalidJobError      the request itself is invalid (bad URI, option, tier name); HTTP 400
├── BrokerBlockedError   the broker blocks publishers (memory or disk alarm) longer than
│                        FACEFLEET_BLOCKED_TIMEOUT_S: retry later; HTTP 503, CLI exit 75
└── BatchSubmitError     some jobs of a `submit_many` failed (each with one of the above);
                         the others were queued
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class SubmitError(Exception):
    pass


class TierFullError(SubmitError):
    def __init__(self, tier: str, depth: int | None) -> None:
        super().__init__(
            f"tier {tier!r} is full ({depth if depth is not None else '?'} jobs waiting); retry later"
        )
        self.tier = tier
        self.depth = depth


class UnroutableJobError(SubmitError):
    pass


class PublishNackedError(SubmitError):
    pass


class InvalidJobError(SubmitError):
    pass


class BrokerBlockedError(SubmitError):
    """The broker refuses to read from publishers: a resource alarm (memory high watermark or
    disk free limit) is on somewhere in the cluster. Nothing is wrong with the job; retry it
    (with the same idempotency key: a job the broker takes in late runs once) when the alarm
    clears. Consumers keep working meanwhile, which is what frees memory and disk."""

    def __init__(self, reason: str, waited_s: float) -> None:
        self.reason = reason
        """The broker's words (connection.blocked), e.g. "low on memory" or "low on disk"."""
        self.alarm = alarm_kind(reason)
        """memory, disk or unknown."""
        self.waited_s = waited_s
        super().__init__(
            f"the broker blocks publishers: {self.alarm} alarm ({reason}); gave up after "
            f"{waited_s:.0f} s (FACEFLEET_BLOCKED_TIMEOUT_S). {ALARM_ADVICE[self.alarm]} "
            "Then submit again with the same idempotency key."
        )


ALARM_ADVICE = {
    "memory": "The broker is above its memory high watermark: let consumers drain queues, add "
    "memory, or raise vm_memory_high_watermark (`rabbitmq-diagnostics alarms` shows the node).",
    "disk": "The broker is below its disk free limit: free disk space on the node or raise its "
    "disk (`rabbitmq-diagnostics alarms` shows the node; disk_free_limit sets the limit).",
    "unknown": "A resource alarm is on: `rabbitmq-diagnostics alarms` shows which and where.",
}


def alarm_kind(reason: str) -> str:
    """memory / disk / unknown, from a connection.blocked reason ("low on memory", ...)."""
    text = reason.lower()
    if "memory" in text:
        return "memory"
    if "disk" in text:
        return "disk"
    return "unknown"


class BatchSubmitError(SubmitError):
    def __init__(self, results: Sequence[Any], errors: dict[str, SubmitError]) -> None:
        first = next(iter(errors.values()))
        super().__init__(
            f"{len(errors)} of {len(results) + len(errors)} jobs were not queued (first: {first})"
        )
        self.results = results
        """The SubmitResults of the jobs that were queued (or were duplicates)."""
        self.errors = errors
        """Why each other job was not queued, by job id."""


def unroutable(tier: str) -> UnroutableJobError:
    """The broker returned the job: no queue is bound for its tier."""
    return UnroutableJobError(
        f"no queue is bound for tier {tier!r}: run `facefleet topology apply` "
        "or check FACEFLEET_TIERS"
    )


def full_threshold(max_length: int) -> int:
    """Depth from which a nack means "tier full". The depth is read after the nack, and workers
    may have taken a few jobs meanwhile: allow 1% of max_length below it."""
    return max_length - max_length // 100


def refused(tier: str, job_id: str, depth: int | None, max_length: int | None) -> SubmitError:
    """The broker nacked the job: "tier full" (reject-publish) only when the queue's depth
    reached the tier's max_length; any other nack (or an unknown depth or limit) is a
    PublishNackedError, never a 429 that would tell the client to just retry."""
    if depth is not None and max_length is not None and depth >= full_threshold(max_length):
        return TierFullError(tier, depth)
    seen = "" if depth is None else f" ({depth} jobs waiting"
    if seen:
        seen += ")" if max_length is None else f" of at most {max_length})"
    return PublishNackedError(f"broker refused job {job_id} on tier {tier!r}{seen}")
