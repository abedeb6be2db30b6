"""Broker discovery: the order the README promises, with real sockets and a real broker binary."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from facefleet import broker
from facefleet.management import read_queues


def test_amqp_url_wins_without_probing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQP_URL", "amqp://u:p@rabbit.example:5672/%2F")
    monkeypatch.setattr(broker, "answers", lambda *a, **k: pytest.fail("must not probe"))
    found = broker.discover()
    assert (found.url, found.origin) == ("amqp://u:p@rabbit.example:5672/%2F", "env")


def test_nothing_found_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AMQP_URL", raising=False)
    monkeypatch.setattr(broker, "answers", lambda *a, **k: False)
    with pytest.raises(broker.NoBrokerError, match="AMQP_URL=amqp://"):
        broker.discover(allow_start=False)


def _rabbitmq_installed() -> bool:
    return bool(
        shutil.which("rabbitmq-server")
        or list(Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*/sbin/rabbitmq-server"))
    )


@pytest.mark.slow
@pytest.mark.integration
def test_a_local_rabbitmq_server_binary_is_started_on_loopback_and_stopped() -> None:
    """The last resort of discovery: a private node in a temp dir, on a free loopback port."""
    if not _rabbitmq_installed():
        if os.environ.get("CI") == "true":
            pytest.fail("CI machines have rabbitmq-server; discovery's last resort must be tested")
        pytest.skip("no rabbitmq-server binary here")
    started = broker._local_binary()
    assert started is not None
    try:
        assert started.origin == "rabbitmq-server"
        assert started.url.startswith("amqp://guest:guest@127.0.0.1:")
        assert ":5672/" not in started.url
        assert broker.amqp_answers(started.url)
        # With the management plugin, on its own free loopback port (`facefleet status`).
        assert started.management_url is not None
        assert started.management_url.startswith("http://127.0.0.1:")
        assert ":15672" not in started.management_url
        rows = read_queues(started.url, started.management_url, timeout_s=10)
        assert isinstance(rows, dict)
    finally:
        started.stop()
    assert not broker.amqp_answers(started.url)
