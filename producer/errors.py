"""Why a submission failed, so callers (and the gateway's HTTP mapping) can act on it.

SubmitError
├── TierFullError        the tier's queue is at max-length (reject-publish): retry later; HTTP 429
├── UnroutableJobError   no queue is bound for the tier: topology not applied or tier unknown
├── PublishNackedError   the broker refused the message for another reason
└── InvalidJobError      the request itself is invalid (bad URI, option, tier name); HTTP 400
"""

from __future__ import annotations


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


def unroutable(tier: str) -> UnroutableJobError:
    """The broker returned the job: no queue is bound for its tier."""
    return UnroutableJobError(
        f"no queue is bound for tier {tier!r}: run `facefleet topology apply` "
        "or check FACEFLEET_TIERS"
    )


def refused(tier: str, job_id: str, depth: int | None) -> SubmitError:
    """The broker nacked the job: a full tier (reject-publish) when its depth is known."""
    if depth is not None:
        return TierFullError(tier, depth)
    return PublishNackedError(f"broker refused job {job_id}")
