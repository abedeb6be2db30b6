"""Management API requests built from the AMQP URL (no server needed)."""

from __future__ import annotations

from typing import Any

import pytest

from facefleet.management import default_management_url, queues_request, rows_by_name
from facefleet.settings import ProducerSettings


@pytest.mark.parametrize(
    ("amqp_url", "base", "url", "auth"),
    [
        pytest.param(
            "amqp://guest:guest@127.0.0.1:5672/%2F",
            "http://127.0.0.1:15672",
            "http://127.0.0.1:15672/api/queues/%2F?columns=",
            ("guest", "guest"),
            id="default-vhost",
        ),
        pytest.param(
            "amqp://ff%40ops:p%3Ass@rabbit:5672/prod",
            "http://mgmt:15672/",
            "http://mgmt:15672/api/queues/prod?columns=",
            ("ff@ops", "p:ss"),
            id="named-vhost-escaped-credentials",
        ),
        pytest.param(
            "amqp://rabbit",
            "http://rabbit:15672",
            "http://rabbit:15672/api/queues/%2F?columns=",
            ("guest", "guest"),
            id="no-vhost-no-credentials",
        ),
    ],
)
def test_queues_request(amqp_url: str, base: str, url: str, auth: tuple[str, str]) -> None:
    got_url, got_auth = queues_request(amqp_url, base)
    assert got_url.startswith(url) and "messages_unacknowledged" in got_url
    assert got_auth == auth


@pytest.mark.parametrize(
    ("rows", "names"),
    [
        pytest.param([{"name": "a"}, {"name": "b"}], ["a", "b"], id="rows"),
        pytest.param([{"name": "a"}, "junk", {"x": 1}], ["a"], id="junk-skipped"),
        pytest.param({"error": "not_authorised"}, [], id="error-object"),
    ],
)
def test_rows_by_name(rows: Any, names: list[str]) -> None:
    assert sorted(rows_by_name(rows)) == names


def test_status_uses_the_configured_management_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQP_URL", "amqp://u:p@rabbit.internal:5672/%2F")
    assert ProducerSettings.load().management_url == default_management_url(
        "amqp://u:p@rabbit.internal:5672/%2F"
    )
    monkeypatch.setenv("FACEFLEET_MANAGEMENT_URL", "https://mgmt.example/")
    assert ProducerSettings.load().management_url == "https://mgmt.example"
