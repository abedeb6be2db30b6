"""The producer side: the job SDK (sync on pika, async on aio-pika), the CLI and the gateway.

Never imports `consumer` (enforced by import-linter).
"""

from producer.errors import PublishNackedError, SubmitError, TierFullError, UnroutableJobError
from producer.sdk import JobClient, SubmitResult

__all__ = [
    "JobClient",
    "PublishNackedError",
    "SubmitError",
    "SubmitResult",
    "TierFullError",
    "UnroutableJobError",
]
