"""Batched submission (`JobClient.submit_many`) and the worker's batch lane (`--batch`), on the
real broker with real worker processes: the same guarantees as one job at a time."""

from __future__ import annotations

import contextlib

import pytest

from facefleet.producer.errors import BatchSubmitError, TierFullError, UnroutableJobError
from facefleet.producer.sdk import JobClient, build_request
from facefleet.producer.watch import watch_events
from facefleet.wire import JobRequest
from tests.conftest import Env
from tests.spine.test_integration import (
    assert_gapless,
    assert_queue_empty,
    client_for,
    journal,
    kill_workers_while_jobs_run,
    media,
    types,
    wait_terminal,
)

pytestmark = pytest.mark.integration


def requests(
    client: JobClient, env: Env, n: int, *, tier: str | None = None, **options: float | str
) -> list[JobRequest]:
    src = media(env)
    return [
        build_request(client.media, tier or env.tier, src, src, options=dict(options))
        for _ in range(n)
    ]


def test_submit_many_and_the_batch_lane_run_every_job_once(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = client_for(env, monkeypatch)
    src = media(env)
    earlier = client.submit(env.tier, src, src, idempotency_key="seen-before", options={})
    batch = requests(client, env, 30, sleep_s=0.02, steps=2)
    again = build_request(client.media, env.tier, src, src, idempotency_key="twice")
    batch += [
        again,
        build_request(client.media, env.tier, src, src, idempotency_key="twice"),
        build_request(client.media, env.tier, src, src, idempotency_key="seen-before"),
    ]
    results = client.submit_many(batch)
    assert [r.job_id for r in results] == [r.job_id for r in batch]
    assert [r.duplicate for r in results] == [False] * 31 + [True, True]
    assert results[-1].job_id == earlier.job_id
    env.start_worker(FACEFLEET_BATCH="8", FACEFLEET_CONCURRENCY="2")
    for job_id in {r.job_id for r in results}:
        events = wait_terminal(env, job_id)
        assert_gapless(events)
        assert types(events) == ["queued", "started", "completed"], types(events)
    # The stream has each job's history once, in seq order.
    sample = results[0].job_id
    events = journal(env, sample)
    streamed = list(watch_events(env.amqp_url, sample, since=events[0].ts, timeout_s=20))
    assert [(e.seq, e.type) for e in streamed] == [(e.seq, e.type) for e in events]
    assert_queue_empty(env)


def test_submit_many_says_which_jobs_it_could_not_queue_and_queues_the_rest(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = client_for(env, monkeypatch)
    good = requests(client, env, 3)
    lost = requests(client, env, 2, tier="nosuchtier" + env.tier[-6:])
    with pytest.raises(BatchSubmitError) as info:
        client.submit_many([good[0], lost[0], good[1], lost[1], good[2]])
    err = info.value
    assert set(err.errors) == {r.job_id for r in lost}
    assert all(isinstance(e, UnroutableJobError) for e in err.errors.values())
    assert [r.job_id for r in err.results] == [r.job_id for r in good]
    for r in good:
        assert client.media.submitted(r.job_id)
    for r in lost:  # nothing recorded for a job that was not queued: its key can be retried
        assert not client.media.submitted(r.job_id)
        assert journal(env, r.job_id) == []


def test_submit_many_into_a_full_tier_reports_tier_full(make_env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Quorum queues overshoot reject-publish by what is in flight (anchors.md B11): a
    pipelined batch may put more than max_length in. Once the tier is over its limit, every job
    of the next batch is refused as tier full, and none of them is announced."""
    env = make_env(max_length=2)
    client = client_for(env, monkeypatch)
    with contextlib.suppress(BatchSubmitError):
        client.submit_many(requests(client, env, 10))
    refused = requests(client, env, 5)
    with pytest.raises(BatchSubmitError) as info:
        client.submit_many(refused)
    assert info.value.results == []
    assert set(info.value.errors) == {r.job_id for r in refused}
    assert all(isinstance(e, TierFullError) for e in info.value.errors.values())
    assert "retry later" in str(next(iter(info.value.errors.values())))
    assert all(journal(env, r.job_id) == [] for r in refused)


def test_kill_9_during_batches_every_job_completes_exactly_once(
    media_env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = media_env  # file:// and s3:// media
    client = client_for(env, monkeypatch)
    jobs = [r.job_id for r in client.submit_many(requests(client, env, 48, sleep_s=0.3))]
    assert kill_workers_while_jobs_run(env, jobs, every_s=0.6, FACEFLEET_BATCH="6") >= 1
    for job in jobs:
        events = journal(env, job)
        assert_gapless(events)
        assert types(events).count("completed") == 1, types(events)
        assert events[-1].type == "completed"
    assert_queue_empty(env)
