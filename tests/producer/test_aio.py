"""AsyncJobClient against the real broker: confirms, idempotency, routing, full tiers, watching.

Each test runs its coroutine with asyncio.run (no async plugin needed) in an isolated world
from tests/conftest.py: its own tier(s), data root and, where needed, a real sleep worker.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from facefleet.journal import JobJournal
from facefleet.producer.aio import AsyncJobClient
from facefleet.producer.errors import InvalidJobError, TierFullError, UnroutableJobError
from facefleet.producer.watch import WatchTimeout
from facefleet.settings import ProducerSettings
from facefleet.storage import Storage
from facefleet.wire import EventPayload, JobEvent, utcnow
from tests.conftest import Env

pytestmark = pytest.mark.integration

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def media(env: Env) -> tuple[str, str]:
    src, tgt = env.data_root / "src.png", env.data_root / "tgt.png"
    src.write_bytes(b"\x89PNG\r\n\x1a\nsource")
    tgt.write_bytes(b"\x89PNG\r\n\x1a\ntarget")
    return str(src), str(tgt)


def settings_for(env: Env, monkeypatch: pytest.MonkeyPatch) -> ProducerSettings:
    env.settings_env(monkeypatch)
    return ProducerSettings.load()


def journal_types(env: Env, job_id: str) -> list[str]:
    return [e.type for e in JobJournal(Storage(env.data_root), job_id).events()]


async def collect(client: AsyncJobClient, job_id: str, **kw: Any) -> list[JobEvent]:
    return [event async for event in client.watch(job_id, **kw)]


def test_submit_is_confirmed_queued_and_journaled(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(env, monkeypatch)
    src, tgt = media(env)

    async def main() -> tuple[str, int | None, list[JobEvent]]:
        async with AsyncJobClient(settings) as client:
            await client.apply_topology()
            result = await client.submit(env.tier, src, tgt, options={"sleep_s": 0})
            assert result.request is not None and not result.duplicate
            depth = await client.depth(env.tier)
            first = await anext(client.watch(result.job_id, since=result.request.created_at))
            return result.job_id, depth, [first]

    job_id, depth, events = run(main())
    assert depth == 1
    assert journal_types(env, job_id) == []  # producers need only the broker and the store
    assert (events[0].seq, events[0].type, events[0].payload.tier) == (1, "queued", env.tier)


def test_same_idempotency_key_queues_one_job(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(env, monkeypatch)
    src, tgt = media(env)
    key = "idem-" + uuid.uuid4().hex

    async def main() -> tuple[list[bool], set[str], int | None]:
        async with AsyncJobClient(settings) as client:
            await client.apply_topology()
            # concurrent duplicates: the per-job lock plus the flock must let exactly one through
            results = await asyncio.gather(
                *(client.submit(env.tier, src, tgt, idempotency_key=key) for _ in range(8))
            )
            return (
                [r.duplicate for r in results],
                {r.job_id for r in results},
                await client.depth(env.tier),
            )

    duplicates, ids, depth = run(main())
    assert sorted(duplicates) == [False] + [True] * 7
    assert len(ids) == 1
    assert depth == 1
    job_id = ids.pop()
    assert journal_types(env, job_id) == []
    assert settings.media_store().submitted(job_id)


def test_unroutable_tier_raises_and_records_nothing(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(env, monkeypatch)
    src, tgt = media(env)
    key = "unroutable-" + uuid.uuid4().hex

    async def main() -> None:
        async with AsyncJobClient(settings) as client:
            await client.apply_topology()
            await client.submit("nobody-" + uuid.uuid4().hex[:8], src, tgt, idempotency_key=key)

    with pytest.raises(UnroutableJobError, match="no queue is bound"):
        run(main())
    from facefleet.wire import job_id_for_key

    assert journal_types(env, job_id_for_key(key)) == []


def test_invalid_request_is_refused_before_publishing(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(env, monkeypatch)

    async def main() -> None:
        async with AsyncJobClient(settings) as client:
            await client.submit(env.tier, "/etc/passwd-does-not-exist", "nope")

    with pytest.raises(InvalidJobError):
        run(main())


def test_full_tier_raises_tier_full(
    make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(max_length=1)
    settings = settings_for(env, monkeypatch)
    src, tgt = media(env)

    async def main() -> tuple[TierFullError, str]:
        async with AsyncJobClient(settings) as client:
            await client.apply_topology()
            # a quorum queue with reject-publish may overshoot max-length by one
            for _ in range(10):
                key = "full-" + uuid.uuid4().hex
                try:
                    await client.submit(env.tier, src, tgt, idempotency_key=key)
                except TierFullError as exc:
                    return exc, key
            raise AssertionError("the tier never filled up")

    err, key = run(main())
    assert err.tier == env.tier
    assert err.depth is not None and err.depth >= 1
    from facefleet.wire import job_id_for_key

    # refused jobs leave no submission record, so the same key can be retried later
    assert not settings.media_store().submitted(job_id_for_key(key))
    assert journal_types(env, job_id_for_key(key)) == []


def test_watch_follows_a_real_job_in_order(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(env, monkeypatch)
    src, tgt = media(env)
    env.start_worker()

    async def main() -> tuple[str, list[JobEvent], list[JobEvent]]:
        async with AsyncJobClient(settings) as client:
            result = await client.submit(env.tier, src, tgt, options={"sleep_s": 0.6, "steps": 3})
            assert result.request is not None
            since = result.request.created_at
            events = await collect(client, result.job_id, since=since, timeout_s=60)
            tail = await collect(client, result.job_id, since=since, after_seq=3, timeout_s=60)
            return result.job_id, events, tail

    job_id, events, tail = run(main())
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.type for e in events] == journal_types(env, job_id)
    assert events[0].type == "queued" and events[-1].type == "completed"
    assert [e.seq for e in tail] == list(range(4, len(events) + 1))


def test_watch_orders_and_deduplicates_the_stream(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publish seq 1, 3, 2, 2, 1, 4 (an outbox republish and a late arrival): watch yields 1..4."""
    settings = settings_for(env, monkeypatch)
    job_id = str(uuid.uuid4())
    since = utcnow()

    def ev(seq: int, type_: str = "progress") -> JobEvent:
        return JobEvent(
            job_id=job_id,
            seq=seq,
            type=type_,
            ts=utcnow(),
            payload=EventPayload(fraction=seq / 4),  # type: ignore[arg-type]
        )

    async def main() -> list[JobEvent]:
        async with AsyncJobClient(settings) as client:
            await client.apply_topology()
            for e in (ev(1, "queued"), ev(3), ev(2), ev(2), ev(1, "queued"), ev(4, "completed")):
                await client.publish_event(e)
            return await collect(client, job_id, since=since, timeout_s=30)

    events = run(main())
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert events[-1].type == "completed"


def test_watch_times_out_without_a_terminal_event(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(env, monkeypatch)

    async def main() -> None:
        async with AsyncJobClient(settings) as client:
            await client.apply_topology()
            await collect(client, str(uuid.uuid4()), since=utcnow(), timeout_s=1)

    with pytest.raises(WatchTimeout):
        run(main())


def test_cancel_a_queued_job(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(env, monkeypatch)
    src, tgt = media(env)

    async def submit_and_cancel() -> tuple[str, Any]:
        async with AsyncJobClient(settings) as client:
            await client.apply_topology()
            result = await client.submit(env.tier, src, tgt, options={"sleep_s": 30})
            assert result.request is not None
            await client.cancel(result.job_id, "changed my mind")
            return result.job_id, result.request.created_at

    job_id, created_at = run(submit_and_cancel())
    # through the broker alone: nothing in the job state until a worker records it
    assert Storage(env.data_root).cancel_reason(job_id) is None
    env.start_worker()

    async def follow() -> list[JobEvent]:
        async with AsyncJobClient(settings) as client:
            return await collect(client, job_id, since=created_at, timeout_s=60)

    events = run(follow())
    assert events[-1].type == "cancelled"
    assert events[-1].payload.message == "changed my mind"
    assert Storage(env.data_root).cancel_reason(job_id) == "changed my mind"
