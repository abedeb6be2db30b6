"""Where a watch resumes and how long it keeps trying (producer.watch.StreamCursor and
ReconnectWindow), the rules the sync watch and the async SDK share. A fake clock and a fixed
backoff; tests/reliability and tests/producer/test_aio.py run both watches on real brokers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from facefleet.amqp import Backoff
from facefleet.producer.watch import STREAM_START_MARGIN, ReconnectWindow, StreamCursor
from facefleet.wire import BrokerFeatures

JOB = "00000000-0000-4000-8000-000000000001"
SINCE = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
OLD = BrokerFeatures.from_server_properties({"version": "3.10.8"})


@pytest.mark.parametrize(
    ("since", "offsets", "start"),
    [
        pytest.param(None, [], "first", id="fresh, no since: the stream's start"),
        pytest.param(SINCE, [], SINCE - STREAM_START_MARGIN, id="fresh: near since"),
        pytest.param(SINCE, [7, 8, 12], 13, id="after the last offset read, not since"),
        pytest.param(None, [0], 1, id="offset 0 counts"),
        pytest.param(None, [7, None, 9], 10, id="a delivery without the header changes nothing"),
        pytest.param(None, [7, 9, 8], 10, id="a late delivery of an old channel does not go back"),
        pytest.param(None, ["12"], "first", id="a header that is not an int is ignored"),
    ],
)
def test_stream_cursor(since: datetime | None, offsets: list[Any], start: object) -> None:
    cursor = StreamCursor(JOB, since)
    for offset in offsets:
        cursor.took(None if offset is None else {"x-stream-offset": offset})
    assert cursor.arguments(OLD)["x-stream-offset"] == start


def test_stream_cursor_keeps_the_filter_on_a_resume() -> None:
    new = BrokerFeatures.from_server_properties({"version": "3.13.7"})
    cursor = StreamCursor(JOB, SINCE)
    cursor.took({"x-stream-offset": 41})
    assert cursor.arguments(new) == {
        "x-stream-offset": 42,
        "x-stream-filter": JOB,
        "x-stream-match-unfiltered": False,
    }


class FixedBackoff(Backoff):
    """Counts its steps; the delay is the step number (jitter is Backoff's own test)."""

    def next_s(self) -> float:
        self.attempt += 1
        return float(self.attempt)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# Steps: ("lost"), ("consuming"), ("refused", seconds later, the delay expected or None).
@pytest.mark.parametrize(
    "steps",
    [
        pytest.param(
            [("refused", 0, 1.0), ("refused", 5, 2.0), ("refused", 5, 3.0)],
            id="refusals back off within the window",
        ),
        pytest.param(
            [("refused", 0, 1.0), ("refused", 10, 2.0), ("refused", 0.1, None)],
            id="the window ends reconnect_s after the first refusal",
        ),
        pytest.param(
            [("refused", 0, 1.0), ("refused", 9, 2.0), ("consuming",), ("refused", 9, 1.0)],
            id="consuming again closes the window and resets the backoff",
        ),
        pytest.param(
            [("lost",), ("refused", 9, 1.0), ("refused", 2, None)],
            id="a lost link opens the window at the loss",
        ),
        pytest.param(
            [("refused", 0, 1.0), ("refused", 9, 2.0), ("lost",), ("refused", 9, 3.0)],
            id="a loss mid-window starts a fresh one",
        ),
    ],
)
def test_reconnect_window(steps: list[tuple[Any, ...]]) -> None:
    clock = Clock()
    window = ReconnectWindow(10.0, backoff=FixedBackoff(), clock=clock)
    for step in steps:
        if step[0] == "lost":
            window.lost()
        elif step[0] == "consuming":
            window.consuming()
        else:
            _, later, expected = step
            clock.now += later
            assert window.delay_s() == expected, step
