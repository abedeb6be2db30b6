"""AsyncJobClient against the real broker: confirms, idempotency, routing, full tiers, watching.

Each test runs its coroutine with asyncio.run (no async plugin needed) in an isolated world
from tests/conftest.py: its own tier(s), data root and, where needed, a real sleep worker.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
import urllib.request
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from facefleet.journal import JobJournal
from facefleet.management import amqp_auth, default_management_url
from facefleet.producer.aio import AsyncJobClient
from facefleet.producer.errors import InvalidJobError, TierFullError, UnroutableJobError
from facefleet.producer.watch import WatchTimeout
from facefleet.settings import ProducerSettings
from facefleet.storage import Storage
from facefleet.wire import EventPayload, JobEvent, utcnow
from tests.conftest import Env
from tests.spine.tcpproxy import TcpProxy

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


def via(proxy: TcpProxy, url: str) -> str:
    """The AMQP URL with the proxy's port in place of the broker's."""
    parts = urlsplit(url)
    creds, _, _host = parts.netloc.rpartition("@")
    host = f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{creds}@{host}" if creds else host))


class Connections:
    """The broker's side of client connections (management API): find one by its client
    connection name and close it, as an operator or a node shutting down would."""

    def __init__(self, amqp_url: str) -> None:
        self.api = default_management_url(amqp_url)
        _vhost, (user, password) = amqp_auth(amqp_url)
        self.token = base64.b64encode(f"{user}:{password}".encode()).decode()

    def call(self, method: str, path: str) -> Any:
        req = urllib.request.Request(f"{self.api}{path}", method=method)
        req.add_header("Authorization", f"Basic {self.token}")
        req.add_header("X-Reason", "test: the watch's connection closed by force")
        with urllib.request.urlopen(req, timeout=5) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def named(self, name: str, timeout_s: float = 15) -> list[str]:
        """The broker's names of the connections called `name`, once it lists any."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rows = self.call("GET", "/api/connections?columns=name,client_properties")
            found = [
                r["name"] for r in rows if r["client_properties"].get("connection_name") == name
            ]
            if found:
                return found
            time.sleep(0.3)
        raise AssertionError(f"no connection named {name} in the management API")

    def close(self, names: list[str]) -> None:
        for conn in names:
            self.call("DELETE", f"/api/connections/{quote(conn, safe='')}")


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss",
    [
        pytest.param("cut", id="the TCP link cut (proxy)"),
        pytest.param("closed", id="closed by the broker (management API)"),
    ],
)
def test_watch_resumes_after_its_connection_is_lost_mid_job(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, loss: str
) -> None:
    """The watch's connection goes after the first progress event: it reconnects, resumes at
    the stream offset after the last one it read (not from `since` again), and yields every
    event once, in seq order, to `completed`."""
    caplog.set_level(logging.INFO, logger="facefleet.producer.aio")
    caplog.set_level(logging.INFO, logger="facefleet.producer.watch")  # the resume line
    env.settings_env(monkeypatch)
    broker = urlsplit(env.amqp_url)
    proxy = TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672)
    monkeypatch.setenv("AMQP_URL", via(proxy, env.amqp_url))  # the worker connects directly
    settings = ProducerSettings.load()
    src, tgt = media(env)
    env.start_worker()
    name = f"facefleet-test-watch-{uuid.uuid4().hex[:8]}"
    connections = Connections(env.amqp_url)

    async def main() -> tuple[str, list[JobEvent]]:
        async with AsyncJobClient(settings, connection_name=name) as client:
            # Listed before the job starts: the management API may show a connection late.
            listed = [] if loss == "cut" else await asyncio.to_thread(connections.named, name)
            result = await client.submit(env.tier, src, tgt, options={"sleep_s": 3, "steps": 10})
            assert result.request is not None
            seen: list[JobEvent] = []
            watch = client.watch(
                result.job_id, since=result.request.created_at, timeout_s=60, reconnect_s=30
            )
            async for event in watch:
                seen.append(event)
                if event.type == "progress" and len([e for e in seen if e.type == "progress"]) == 1:
                    if loss == "cut":
                        proxy.cut()
                    else:
                        await asyncio.to_thread(connections.close, listed)
            return result.job_id, seen

    try:
        job_id, seen = run(main())
    finally:
        proxy.close()
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1)), [e.seq for e in seen]
    assert seen[-1].type == "completed"
    assert [e.type for e in seen] == journal_types(env, job_id)
    assert re.search(r"link to 127\.0\.0\.1:\d+ lost", caplog.text), caplog.text
    resumed = re.findall(r"resumed at stream offset (\S+)", caplog.text)
    assert resumed and all(offset.isdigit() for offset in resumed), resumed


def test_closing_the_client_ends_a_watch_instead_of_reconnecting(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() under a running watch is its owner's word: the watch ends with the lost link
    and the client stays closed."""
    settings = settings_for(env, monkeypatch)

    async def main() -> tuple[BaseException | None, bool]:
        client = AsyncJobClient(settings)
        await client.apply_topology()
        task = asyncio.create_task(
            collect(client, str(uuid.uuid4()), since=utcnow(), timeout_s=30, reconnect_s=30)
        )
        await asyncio.sleep(1.0)  # consuming by now
        await client.close()
        done, _ = await asyncio.wait({task}, timeout=10)
        assert done, "the watch went on after close()"
        return task.exception(), client.connected

    error, connected = run(main())
    assert isinstance(error, ConnectionError), repr(error)
    assert not connected


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
