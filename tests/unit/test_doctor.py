"""`facefleet doctor`'s pure parts: which arguments differ, what it declares, how it prints."""

from __future__ import annotations

import pytest

from facefleet.doctor import Finding, argument_differences, declared_queues
from facefleet.settings import ProducerSettings
from facefleet.wire import BrokerFeatures, job_queue


@pytest.mark.parametrize(
    ("declared", "actual", "expected"),
    [
        pytest.param({"x-max-length": 10}, {"x-max-length": 10}, [], id="same"),
        pytest.param({"x-max-age": "7D"}, {"x-max-age": "7D"}, [], id="same-string"),
        pytest.param(
            {"x-delivery-limit": 5},
            {"x-delivery-limit": 3},
            ["x-delivery-limit: broker has 3, this build declares 5"],
            id="changed",
        ),
        pytest.param(
            {"x-consumer-timeout": 60000},
            {},
            ["x-consumer-timeout: broker has None, this build declares 60000"],
            id="missing-on-broker",
        ),
        pytest.param(
            {},
            {"x-message-ttl": 1},
            ["x-message-ttl: broker has 1, this build declares None"],
            id="extra-on-broker",
        ),
    ],
)
def test_argument_differences(
    declared: dict[str, object], actual: dict[str, object], expected: list[str]
) -> None:
    assert argument_differences(declared, actual) == expected


def test_declared_queues_follow_version_and_placement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEFLEET_TIERS", '[{"name": "t1"}]')
    monkeypatch.setenv("FACEFLEET_QUORUM_GROUP_SIZE", "3")
    monkeypatch.setenv("FACEFLEET_LEADER_LOCATOR", "balanced")
    settings = ProducerSettings.load()
    old = declared_queues(settings, BrokerFeatures("RabbitMQ", (3, 9, 0)))
    new = declared_queues(settings, BrokerFeatures("RabbitMQ", (4, 1, 0)))
    assert old[job_queue("t1")]["x-quorum-initial-group-size"] == 3
    assert "x-queue-leader-locator" not in old[job_queue("t1")]  # not sent where unsupported
    assert new[job_queue("t1")]["x-queue-leader-locator"] == "balanced"
    assert new["facefleet.events.log"]["x-initial-cluster-size"] == 3
    assert "x-consumer-timeout" in new[job_queue("t1")]


def test_finding_lines_say_what_to_fix() -> None:
    assert Finding("ok", "alarms", "none").line() == "ok   alarms: none"
    line = Finding("fail", "queue q", "missing", "run `facefleet topology apply`").line()
    assert line.startswith("FAIL queue q: missing")
    assert "fix: run `facefleet topology apply`" in line
