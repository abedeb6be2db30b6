"""`noop`: does nothing but write an empty result; measures the spine's own overhead (bench/)."""

from __future__ import annotations

from dataclasses import dataclass

from consumer.processors.base import JobContext, ProcessorOutput
from facefleet.settings import WorkerSettings


@dataclass
class NoopProcessor:
    name: str = "noop"

    def warm_up(self) -> None:
        return None

    def run(self, ctx: JobContext) -> ProcessorOutput:
        (ctx.output_dir / "result.json").write_text("{}")
        return ProcessorOutput("result.json")


def create(settings: WorkerSettings) -> NoopProcessor:
    return NoopProcessor()
