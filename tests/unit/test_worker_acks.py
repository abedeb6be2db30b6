"""How the worker settles a batch with the broker: one multiple-ack only when it is safe.

A multiple-ack up to tag T also acks every older unsettled delivery on the channel, so it must
be used only when nothing older than T is still running or waiting. The channel is a fake
that records what would be sent; the Worker is real (never started, no broker)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from facefleet.consumer.processors.noop import NoopProcessor
from facefleet.consumer.worker import Worker
from facefleet.settings import WorkerSettings


@dataclass
class FakeChannel:
    sent: list[tuple[str, int, bool]] = field(default_factory=list)

    def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.sent.append(("ack", tag, multiple))

    def basic_nack(self, tag: int, requeue: bool = True) -> None:
        self.sent.append(("nack", tag, False))


@dataclass
class Case:
    unsettled: set[int]
    settle: list[tuple[int, bool]]
    sent: list[tuple[str, int, bool]]
    left: set[int]


CASES = {
    "a whole batch, the oldest deliveries": Case(
        {1, 2, 3, 4}, [(1, True), (2, True), (3, True)], [("ack", 3, True)], {4}
    ),
    "an older delivery still running": Case(
        {1, 2, 3}, [(2, True), (3, True)], [("ack", 2, False), ("ack", 3, False)], {1}
    ),
    "a requeue inside the batch": Case(
        {1, 2, 3},
        [(1, True), (2, False), (3, True)],
        [("nack", 2, False), ("ack", 3, True)],
        set(),
    ),
    "one delivery is acked on its own": Case({5, 6}, [(5, True)], [("ack", 5, False)], {6}),
    "nothing to ack": Case({7}, [(7, False)], [("nack", 7, False)], set()),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_batch_is_acked_with_one_frame_only_when_nothing_older_is_open(
    tmp_path: Path, case: Case
) -> None:
    worker = Worker(WorkerSettings(data_root=tmp_path), NoopProcessor())
    channel = FakeChannel()
    worker._channel = channel  # type: ignore[assignment]
    worker._unsettled = set(case.unsettled)
    worker._settle(channel, case.settle)  # type: ignore[arg-type]
    assert channel.sent == case.sent
    assert worker._unsettled == case.left


def test_acks_for_a_channel_that_was_replaced_are_never_multiple(tmp_path: Path) -> None:
    """After a reconnect, tags of the old channel mean nothing on the new one."""
    worker = Worker(WorkerSettings(data_root=tmp_path), NoopProcessor())
    old, new = FakeChannel(), FakeChannel()
    worker._channel = new  # type: ignore[assignment]
    worker._unsettled = {9}
    worker._settle(old, [(1, True), (2, True)])  # type: ignore[arg-type]
    assert old.sent == [("ack", 1, False), ("ack", 2, False)]
    assert worker._unsettled == {9}


@pytest.mark.parametrize(
    ("concurrency", "depth", "batch", "threads", "prefetch"),
    [
        pytest.param(1, 1, 1, 1, 1, id="sequential"),
        pytest.param(1, 3, 1, 3, 3, id="pipelined"),
        pytest.param(2, 3, 4, 6, 24, id="two-slots-pipelined-batched"),
    ],
)
def test_every_delivery_held_has_a_job_thread(
    tmp_path: Path, concurrency: int, depth: int, batch: int, threads: int, prefetch: int
) -> None:
    """Pipeline depth multiplies the job threads and the prefetch alike, so a prefetched
    delivery never waits for a thread (what waits is its model calls, for the lane)."""
    settings = WorkerSettings(
        data_root=tmp_path, concurrency=concurrency, pipeline_depth=depth, batch=batch
    )
    worker = Worker(settings, NoopProcessor())
    assert worker.job_threads == threads
    assert worker._executor._max_workers == threads
    assert worker.job_threads * settings.batch == prefetch


def test_a_processor_device_is_exported_as_held_seconds(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from facefleet.consumer.processors.faceswap import FaceSwapProcessor

    settings = WorkerSettings(
        data_root=tmp_path, processor="faceswap", backend="emulated", emulated_model_ms="swap=50"
    )
    processor = FaceSwapProcessor(settings)
    worker = Worker(settings, processor)
    assert processor.device is not None
    processor.device.occupy(0.05)
    text = generate_latest(worker.metrics.registry).decode()
    held = next(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("facefleet_device_held_seconds_total ")
    )
    assert held >= 0.05
    assert "facefleet_device_calls_total 1.0" in text
