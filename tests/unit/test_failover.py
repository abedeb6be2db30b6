"""Several broker addresses in AMQP_URL, the reconnect schedule, and what a blocked broker
says: parsed once in settings, ordered by facefleet.amqp, explained by producer.errors."""

from __future__ import annotations

import pytest

from facefleet.amqp import Backoff, connection_parameters, endpoint, ordered_urls
from facefleet.producer.errors import BrokerBlockedError, alarm_kind
from facefleet.settings import ProducerSettings, SettingsError, WorkerSettings

A = "amqp://u:p@10.0.0.1:5672/%2F"
B = "amqps://u:p@10.0.0.2:5671/v?heartbeat=10"
C = "amqp://u:p@10.0.0.3:5673/%2F"


@pytest.mark.parametrize(
    ("value", "urls"),
    [
        pytest.param(A, (A,), id="one"),
        pytest.param(f"{A},{B},{C}", (A, B, C), id="three"),
        pytest.param(f" {A} , {B} ,", (A, B), id="spaces-and-trailing-comma"),
    ],
)
def test_amqp_url_may_name_several_nodes(
    monkeypatch: pytest.MonkeyPatch, value: str, urls: tuple[str, ...]
) -> None:
    monkeypatch.setenv("AMQP_URL", value)
    assert WorkerSettings.load().amqp_urls == urls


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param(f"{A},http://x", "URL #2", id="second-not-amqp"),
        pytest.param(",", "at least one", id="only-commas"),
    ],
)
def test_bad_address_lists_are_refused(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    monkeypatch.setenv("AMQP_URL", value)
    with pytest.raises(SettingsError) as info:
        WorkerSettings.load()
    assert "AMQP_URL" in info.value.message
    assert message in info.value.message
    assert "u:p" not in info.value.message  # credentials never echoed


def test_management_url_defaults_to_the_first_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQP_URL", f"{A},{B}")
    assert ProducerSettings.load().management_url == "http://10.0.0.1:15672"


def test_the_node_that_failed_is_tried_last() -> None:
    params = connection_parameters([A, B, C], "t", avoid="10.0.0.1:5672")
    assert [endpoint(p) for p in params] == ["10.0.0.2:5671", "10.0.0.3:5673", "10.0.0.1:5672"]
    assert ordered_urls(f"{A},{B},{C}", avoid="10.0.0.2:5671") == [A, C, B]
    assert ordered_urls([A, B]) == [A, B]


def test_connection_parameters_carry_name_and_blocked_timeout() -> None:
    (params,) = connection_parameters(B, "producer", blocked_timeout_s=7)
    assert params.client_properties["connection_name"] == "producer"
    assert params.blocked_connection_timeout == 7
    assert params.heartbeat == 10  # the URL's own query string still applies


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    backoff = Backoff(base_s=1.0, max_s=8.0)
    delays = [backoff.next_s() for _ in range(8)]
    caps = [1, 2, 4, 8, 8, 8, 8, 8]
    for delay, cap in zip(delays, caps, strict=True):
        assert cap / 4 <= delay <= cap
    backoff.reset()
    assert backoff.next_s() <= 1.0
    spread = {round(Backoff(1.0, 8.0).next_s(), 6) for _ in range(20)}
    assert len(spread) > 1  # clients that lost one node do not come back in lockstep


@pytest.mark.parametrize(
    ("reason", "kind", "advice"),
    [
        pytest.param("low on memory", "memory", "vm_memory_high_watermark", id="memory"),
        pytest.param("low on disk", "disk", "disk_free_limit", id="disk"),
        pytest.param("resource alarm", "unknown", "rabbitmq-diagnostics alarms", id="unknown"),
    ],
)
def test_blocked_error_names_the_alarm_and_what_to_do(reason: str, kind: str, advice: str) -> None:
    assert alarm_kind(reason) == kind
    err = BrokerBlockedError(reason, 5)
    assert err.alarm == kind
    assert advice in str(err)
    assert "idempotency key" in str(err)
