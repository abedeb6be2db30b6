"""`noop`: does nothing but write an empty result; measures the spine's own overhead (bench/)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from facefleet.consumer.processors.base import JobContext, ProcessorOutput
from facefleet.settings import WorkerSettings


@dataclass
class NoopProcessor:
    name: str = "noop"

    def warm_up(self) -> None:
        return None

    def run(self, ctx: JobContext) -> ProcessorOutput:
        fd = os.open(ctx.output_dir / "result.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"{}")
        finally:
            os.close(fd)
        return ProcessorOutput("result.json")


def create(settings: WorkerSettings) -> NoopProcessor:
    return NoopProcessor()
