"""The producer side: the job SDK (sync on pika, async on aio-pika), the CLI and the gateway.

Never imports `facefleet.consumer` (enforced by import-linter).
"""

if __name__ != "facefleet.producer":  # the folder producer/ is the package facefleet.producer
    raise ImportError(f"import facefleet.producer, not {__name__} (see README 'Packaging')")

from facefleet.producer.errors import (
    PublishNackedError,
    SubmitError,
    TierFullError,
    UnroutableJobError,
)
from facefleet.producer.sdk import JobClient, SubmitResult

__all__ = [
    "JobClient",
    "PublishNackedError",
    "SubmitError",
    "SubmitResult",
    "TierFullError",
    "UnroutableJobError",
]
