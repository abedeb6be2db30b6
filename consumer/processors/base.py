"""The processor interface every processor implements, and the job context it works through.

A processor is built once per worker process (models loaded, sessions created, warm-up run in
`warm_up()`), then `run()` is called once per job, possibly from several threads at once when
the worker's concurrency is above 1. A processor never touches AMQP: it reports through the
context and raises `facefleet.consumer.errors` exceptions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from facefleet.wire import JobRequest


class JobContext(Protocol):
    """What a running job may do besides computing."""

    job: JobRequest
    source_path: Path
    """Local path of the source media (resolved and confined to the data root)."""
    target_path: Path
    output_dir: Path
    """Empty private directory; everything written here becomes the result, atomically."""

    def progress(
        self,
        fraction: float,
        stage: str,
        *,
        eta_s: float | None = None,
        frames_done: int | None = None,
        frames_total: int | None = None,
    ) -> None:
        """Report progress (rate-limited by the worker). Also a cancellation point."""

    def checkpoint(self) -> None:
        """Raise JobCancelled or ShutdownRequested if the job must stop now."""


@dataclass
class ProcessorOutput:
    """What a finished job produced: the main file (inside output_dir) and facts for the manifest."""

    result_file: str
    timings_s: dict[str, float] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)


class Processor(Protocol):
    """May also have a `device` attribute (consumer.device.Device): the lanes its model calls
    take; the worker then exports how long the device was held (its duty cycle)."""

    name: str

    def warm_up(self) -> None:
        """Load models and run one inference so the worker only reports ready when it is."""

    def run(self, ctx: JobContext) -> ProcessorOutput:
        """Process one job; raise PermanentJobError / TransientJobError on failure."""
        ...


@dataclass(frozen=True)
class Step:
    """A named pipeline step; a list of these gives 'step i of n' progress for free."""

    name: str
    weight: float
    run: Callable[[], None]


def run_steps(ctx: JobContext, steps: Sequence[Step]) -> dict[str, float]:
    """Run steps in order with a progress event and a cancellation point at each boundary."""
    import time

    total = sum(s.weight for s in steps) or 1.0
    done = 0.0
    timings: dict[str, float] = {}
    for step in steps:
        ctx.checkpoint()
        ctx.progress(done / total, step.name)
        t0 = time.perf_counter()
        step.run()
        timings[step.name] = round(time.perf_counter() - t0, 4)
        done += step.weight
    ctx.progress(1.0, steps[-1].name if steps else "done")
    return timings
