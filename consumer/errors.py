"""Job errors, classified by what happens next.

    JobError
    ├── PermanentJobError   bad input, no face...: `failed` at once, acked, never retried
    ├── TransientJobError   GPU OOM, storage hiccup...: `retrying` with backoff, then dead-lettered
    └── JobInterrupted
        ├── JobCancelled    user cancel seen between steps: `cancelled`, acked
        └── ShutdownRequested   SIGTERM drain ran out: requeued for another worker, no event

Processors raise these; third-party exceptions are mapped at the worker boundary by
`classify()`, so a programming error is retried a bounded number of times, then dead-lettered
with code internal_error instead of looping forever.
"""

from __future__ import annotations

from facefleet.wire import ErrorCode


class JobError(Exception):
    code: ErrorCode = "internal_error"
    retryable: bool = False

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class PermanentJobError(JobError):
    retryable = False


class TransientJobError(JobError):
    retryable = True

    def __init__(self, code: ErrorCode, message: str, *, delay_s: float | None = None) -> None:
        super().__init__(code, message)
        self.delay_s = delay_s


class JobInterrupted(Exception):
    """The job stopped between steps on purpose; not a failure of the job."""


class JobCancelled(JobInterrupted):
    def __init__(self, reason: str = "cancelled") -> None:
        super().__init__(reason)
        self.reason = reason


class ShutdownRequested(JobInterrupted):
    pass


def classify(exc: BaseException) -> JobError | JobInterrupted:
    """Map any exception raised by a job to what the worker does next."""
    if isinstance(exc, JobError | JobInterrupted):
        return exc
    if isinstance(exc, MemoryError):
        return TransientJobError("resource_exhausted", "out of memory")
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if "out of memory" in lowered or "cudaerrormemoryallocation" in lowered:
        return TransientJobError("resource_exhausted", text[:500])
    if isinstance(exc, OSError):
        return TransientJobError("storage_error", text[:500])
    return TransientJobError("internal_error", text[:500])
