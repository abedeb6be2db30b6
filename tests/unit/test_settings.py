"""Settings fail fast and name the variable to fix."""

from __future__ import annotations

import pytest

from facefleet.settings import SettingsError, WorkerSettings


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        pytest.param("AMQP_URL", "http://nope", "AMQP_URL", id="amqp-url-scheme"),
        pytest.param("FACEFLEET_CONCURRENCY", "zero", "FACEFLEET_CONCURRENCY", id="not-an-int"),
        pytest.param("FACEFLEET_CONCURRENCY", "0", "FACEFLEET_CONCURRENCY", id="below-one"),
        pytest.param("FACEFLEET_BACKEND", "magic", "FACEFLEET_BACKEND", id="unknown-backend"),
    ],
)
def test_bad_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, message: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as info:
        WorkerSettings.load()
    assert message in info.value.message


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        pytest.param("not json", "FACEFLEET_TIERS", id="not-json"),
        pytest.param('[{"max_job_s": 5}]', "FACEFLEET_TIERS", id="missing-name"),
        pytest.param('[{"name": "Bad Tier"}]', "invalid tier", id="bad-name"),
        pytest.param("[]", "at least one tier", id="empty"),
    ],
)
def test_bad_tiers_are_refused(monkeypatch: pytest.MonkeyPatch, tiers: str, message: str) -> None:
    monkeypatch.setenv("FACEFLEET_TIERS", tiers)
    with pytest.raises(SettingsError, match=message):
        WorkerSettings.load().tiers()


def test_unknown_tier_lists_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FACEFLEET_TIERS", raising=False)
    with pytest.raises(SettingsError, match="known tiers: high, standard, batch"):
        WorkerSettings.load().tier_spec("gold")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], id="cpu-appended"),
        pytest.param(
            "tensorrt,cuda,cpu",
            ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
            id="full-chain",
        ),
    ],
)
def test_execution_providers(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]
) -> None:
    monkeypatch.setenv("FACEFLEET_EXECUTION_PROVIDERS", value)
    assert WorkerSettings.load().providers() == expected


@pytest.mark.parametrize(
    ("var", "value"),
    [
        pytest.param("AMQP_URL", "http://user:hunter2@rabbit/", id="amqp-url-password"),
        pytest.param("FACEFLEET_AMQP_URL", "ftp://user:hunter2@rabbit/", id="alias"),
    ],
)
def test_errors_never_echo_credentials(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as info:
        WorkerSettings.load()
    assert "hunter2" not in info.value.message
