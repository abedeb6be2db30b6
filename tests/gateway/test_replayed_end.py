"""Where a WebSocket session ends, offline: by `EndOfWatch` (producer/watch.py), the rule the
sync watcher and the async SDK follow, on the ASGI path and the direct-write path alike.

A terminal event ends the session, except a `dead_lettered`: `facefleet dead replay` may have
opened the job again, so a session that gave the client a `dead_lettered` goes on when a
`replayed` follows and closes 1000 only once nothing more of the job arrived within the grace.
The real route is driven in memory with scripted history (tests/gateway/test_session.py); every
wait is bounded, so a session that closes too early shows as missing seqs and one that never
closes as a TimeoutError.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from facefleet.producer.gateway.fanout import Delivery, Frame, Signal, Subscriber
from facefleet.wire import EventType
from tests.gateway.test_live_path import FakeSink, armed, converse_live, drain
from tests.gateway.test_session import FakeHistoryFanout, app_with, converse, frame

DEAD: list[EventType] = ["queued", "started", "retrying", "dead_lettered"]
"""seq 1..4: a job whose attempts ran out."""
REPLAYED: list[EventType] = [*DEAD, "replayed", "started", "progress", "completed"]
"""seq 1..8: the same job replayed (seq 5) and completed (seq 8)."""


def frames(job_id: str, kinds: list[EventType]) -> list[Frame]:
    return [frame(job_id, seq, kind) for seq, kind in enumerate(kinds, 1)]


def timed_converse(
    history: list[EventType], after_seq: int, grace_s: float
) -> tuple[list[int], int, str, float]:
    job_id = str(uuid.uuid4())
    fanout = FakeHistoryFanout([frames(job_id, history)])
    fanout.replay_grace_s = grace_s
    started = time.monotonic()
    seqs, code, reason = asyncio.run(converse(app_with(fanout), job_id, after_seq))
    assert fanout.subscriber_count == 0
    return seqs, code, reason, time.monotonic() - started


@pytest.mark.parametrize(
    ("history", "after_seq", "sent", "waits"),
    [
        pytest.param(REPLAYED, 0, list(range(1, 9)), False, id="replayed: on to completed"),
        pytest.param(REPLAYED, 4, [5, 6, 7, 8], False, id="resumed at the dead letter"),
        pytest.param(REPLAYED, 5, [6, 7, 8], False, id="resumed at the replay"),
        pytest.param(REPLAYED, 8, [], False, id="resumed at the end after a replay"),
        pytest.param(DEAD, 0, [1, 2, 3, 4], True, id="dead letter, no replay: after the grace"),
        pytest.param(DEAD, 4, [], True, id="resumed at a dead letter, no replay"),
        pytest.param(
            ["queued", "started", "completed"], 0, [1, 2, 3], False, id="completed: at once"
        ),
    ],
)
def test_where_a_session_ends(
    history: list[EventType], after_seq: int, sent: list[int], waits: bool
) -> None:
    """A session that must not wait has a grace far beyond converse()'s 5 s bound."""
    grace_s = 0.3 if waits else 60.0
    seqs, code, reason, took = timed_converse(history, after_seq, grace_s)
    assert (seqs, code, reason) == (sent, 1000, "job ended")
    if waits:
        assert took >= grace_s


@pytest.mark.parametrize("direct", [True, False], ids=["direct writes", "asgi"])
def test_a_live_dead_letter_then_its_replay_reach_the_client_up_to_completed(
    direct: bool,
) -> None:
    """History ends before the dead letter; the tail then delivers the dead letter and,
    afterwards, the replay and the replayed run: the session stays open through them."""
    job_id = str(uuid.uuid4())
    full = frames(job_id, REPLAYED)
    fanout = FakeHistoryFanout([full[:3]])
    fanout.replay_grace_s = 60.0
    sink = FakeSink() if direct else None
    sent = asyncio.run(converse_live(app_with(fanout), fanout, job_id, full[3:], sink))
    if sink is not None:
        assert sent == ([1, 2, 3], 1000, "job ended")
        assert sink.seqs() == [4, 5, 6, 7, 8]
    else:
        assert sent == (list(range(1, 9)), 1000, "job ended")
    assert fanout.subscriber_count == 0


@pytest.mark.parametrize("direct", [True, False], ids=["direct writes", "asgi"])
def test_a_live_dead_letter_without_a_replay_closes_after_the_grace(direct: bool) -> None:
    job_id = str(uuid.uuid4())
    full = frames(job_id, DEAD)
    fanout = FakeHistoryFanout([full[:3]])
    fanout.replay_grace_s = 0.3
    sink = FakeSink() if direct else None
    started = time.monotonic()
    sent = asyncio.run(converse_live(app_with(fanout), fanout, job_id, full[3:], sink))
    assert time.monotonic() - started >= 0.3
    assert sent == (([1, 2, 3] if direct else [1, 2, 3, 4]), 1000, "job ended")
    assert sink is None or sink.seqs() == [4]


# --- Subscriber ----------------------------------------------------------------------------------


def test_a_directly_written_dead_letter_wakes_the_session_instead_of_ending_it() -> None:
    sub, sink = armed()
    full = frames("j", REPLAYED)
    for f in full[:4]:
        assert sub.offer(f) is Delivery.WRITTEN
    assert drain(sub) == [Signal.DEAD_LETTERED]  # the session times the grace
    assert sub.sink is None and sub.end.pending
    sub.arm(sink)
    for f in full[4:]:
        assert sub.offer(f) is Delivery.WRITTEN
    assert not sub.end.pending
    assert sink.seqs() == list(range(1, 9))
    assert drain(sub) == [Signal.ENDED]


def test_a_republished_dead_letter_after_the_replay_does_not_end_the_job() -> None:
    """The journal is an outbox: an old event may be published again. Told once, in order."""
    sub = Subscriber("j", 8)
    full = frames("j", REPLAYED)
    assert not any(sub.ends(f) for f in full[:6])
    assert not sub.ends(full[3])  # seq 4 `dead_lettered` again
    assert not sub.end.pending
    assert sub.ends(full[7])
