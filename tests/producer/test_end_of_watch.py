"""When a watch ends (producer.watch.EndOfWatch): at the terminal event, but a dead letter read
from history waits to see whether `facefleet dead replay` opened the job again."""

from __future__ import annotations

import pytest

from facefleet.producer.watch import EndOfWatch
from facefleet.wire import EventType, JobEvent, utcnow


def event(seq: int, kind: EventType) -> JobEvent:
    return JobEvent(job_id="00000000-0000-4000-8000-000000000001", seq=seq, type=kind, ts=utcnow())


@pytest.mark.parametrize(
    ("kinds", "polls", "ends_at"),
    [
        pytest.param(["queued", "started", "completed"], [], "completed", id="completed"),
        pytest.param(["queued", "failed"], [], "failed", id="failed"),
        pytest.param(["queued", "cancelled"], [], "cancelled", id="cancelled"),
        pytest.param(
            ["queued", "dead_lettered"], [True], "dead_lettered", id="dead letter, caught up"
        ),
        pytest.param(
            ["queued", "dead_lettered"], [False, False], None, id="dead letter, still reading"
        ),
        pytest.param(
            ["queued", "dead_lettered", "replayed", "started", "completed"],
            [],
            "completed",
            id="replayed after the dead letter",
        ),
        pytest.param(
            ["queued", "dead_lettered", "replayed", "started"],
            [True],
            None,
            id="replayed, running: a quiet stream does not end it",
        ),
    ],
)
def test_where_a_watch_ends(kinds: list[EventType], polls: list[bool], ends_at: str | None) -> None:
    end = EndOfWatch(grace_s=60)
    ended: str | None = None
    for seq, kind in enumerate(kinds, 1):
        if end.saw(event(seq, kind)):
            ended = kind
            break
    for caught_up in polls:
        if ended is None and end.idle(caught_up=caught_up):
            ended = kinds[-1]
    assert ended == ends_at


def test_a_dead_letter_ends_the_watch_after_the_grace_without_a_quiet_stream() -> None:
    end = EndOfWatch(grace_s=0.0)
    assert not end.saw(event(1, "dead_lettered"))
    assert end.pending
    assert end.idle(caught_up=False)
