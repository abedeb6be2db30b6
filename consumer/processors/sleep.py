"""`sleep`: a processor for load and chaos tests. It sleeps options.sleep_s, reporting progress.

It writes a small JSON result so the whole result path (temp dir, manifest, rename) is exercised.
Options: sleep_s (float, default 1), steps (int, default 10), fail (str: "permanent" or
"transient", to test error paths), fail_until (ISO 8601 time with zone: a transient failure on
every attempt before it, then success, e.g. to dead-letter a job and replay it), chaos_kill
(bool: SIGKILL the worker half-way, to test crash redelivery; honoured only when the worker runs
with FACEFLEET_ALLOW_CHAOS=true).
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from facefleet.consumer.errors import PermanentJobError, TransientJobError
from facefleet.consumer.processors.base import JobContext, ProcessorOutput
from facefleet.settings import WorkerSettings


@dataclass
class SleepProcessor:
    name: str = "sleep"
    allow_chaos: bool = False

    def warm_up(self) -> None:
        return None

    def run(self, ctx: JobContext) -> ProcessorOutput:
        opts = ctx.job.options
        try:
            sleep_s = float(opts.get("sleep_s", 1.0) or 0.0)  # type: ignore[arg-type]
            steps = max(1, int(opts.get("steps", 10) or 1))  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise PermanentJobError("invalid_option", f"sleep_s/steps: {exc}") from exc
        if sleep_s < 0 or sleep_s > 24 * 3600:
            raise PermanentJobError(
                "invalid_option", f"sleep_s must be in [0, 86400], got {sleep_s}"
            )
        fail = opts.get("fail")
        if fail == "permanent":
            raise PermanentJobError("invalid_request", "failure requested by options.fail")
        if fail == "transient":
            raise TransientJobError("internal_error", "transient failure requested by options.fail")
        until = opts.get("fail_until")
        if until is not None:
            try:
                when = datetime.fromisoformat(str(until))
                if when.tzinfo is None:
                    raise ValueError("no time zone")
            except ValueError as exc:
                raise PermanentJobError("invalid_option", f"fail_until: {exc}") from exc
            if datetime.now(UTC) < when:
                raise TransientJobError(
                    "internal_error", f"transient failure requested until {when.isoformat()}"
                )
        chaos = bool(opts.get("chaos_kill")) and self.allow_chaos
        start = time.monotonic()
        for i in range(steps):
            if chaos and i >= steps // 2:
                os.kill(os.getpid(), signal.SIGKILL)
            ctx.progress(i / steps, "sleep", eta_s=sleep_s * (steps - i) / steps)
            deadline = start + sleep_s * (i + 1) / steps
            while (left := deadline - time.monotonic()) > 0:
                ctx.checkpoint()
                time.sleep(min(left, 0.2))
        ctx.checkpoint()
        (ctx.output_dir / "result.json").write_text(
            json.dumps({"job_id": ctx.job.job_id, "slept_s": sleep_s})
        )
        return ProcessorOutput("result.json", {"sleep": round(time.monotonic() - start, 4)})


def create(settings: WorkerSettings) -> SleepProcessor:
    return SleepProcessor(allow_chaos=settings.allow_chaos)
