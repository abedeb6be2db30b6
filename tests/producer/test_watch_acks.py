"""BatchAcker: how a watcher acks stream deliveries. The channel is a fake that records acks
(unit test); tests/spine runs the real watcher on the real broker."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from facefleet.producer.watch import BatchAcker


@dataclass
class FakeChannel:
    is_open: bool = True
    acks: list[tuple[int, bool]] = field(default_factory=list)

    def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.acks.append((tag, multiple))


@pytest.mark.parametrize(
    ("taken", "every", "flush", "expected"),
    [
        pytest.param(3, 2, False, [(2, True)], id="one-batch-full"),
        pytest.param(3, 2, True, [(2, True), (3, True)], id="flush-acks-the-rest"),
        pytest.param(4, 2, True, [(2, True), (4, True)], id="nothing-left-to-flush"),
        pytest.param(0, 2, True, [], id="idle-flush-sends-nothing"),
        pytest.param(5, 200, False, [], id="below-the-batch-nothing-yet"),
    ],
)
def test_acks_go_out_in_batches_with_multiple(
    taken: int, every: int, flush: bool, expected: list[tuple[int, bool]]
) -> None:
    channel = FakeChannel()
    acker = BatchAcker(channel, every=every)
    for tag in range(1, taken + 1):
        acker.took(tag)
    if flush:
        acker.flush()
    assert channel.acks == expected


def test_a_closed_channel_is_not_acked_on() -> None:
    channel = FakeChannel()
    acker = BatchAcker(channel, every=10)
    acker.took(1)
    channel.is_open = False
    acker.flush()
    assert channel.acks == []
