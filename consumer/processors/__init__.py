"""Processors: what a worker does with a job. One module per processor, one interface.

Each module exposes `create(settings: WorkerSettings) -> Processor`; PROCESSORS maps the name a
user passes to `facefleet worker --processor` to that module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from facefleet.consumer.processors.base import Processor
    from facefleet.settings import WorkerSettings

PROCESSORS: dict[str, str] = {
    "sleep": "facefleet.consumer.processors.sleep",
    "noop": "facefleet.consumer.processors.noop",
    "faceswap": "facefleet.consumer.processors.faceswap",
}


def create_processor(name: str, settings: WorkerSettings) -> Processor:
    if name not in PROCESSORS:
        raise ValueError(f"unknown processor {name!r}; available: {', '.join(PROCESSORS)}")
    module = importlib.import_module(PROCESSORS[name])
    processor: Processor = module.create(settings)
    return processor
