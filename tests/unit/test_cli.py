"""CLI parsing that needs no broker."""

from __future__ import annotations

import pytest

from facefleet.cli import main
from facefleet.producer.cli import parse_options


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        pytest.param(["enhance=true"], {"enhance": True}, id="bool"),
        pytest.param(["blend=80"], {"blend": 80}, id="int"),
        pytest.param(["sleep_s=0.5"], {"sleep_s": 0.5}, id="float"),
        pytest.param(["format=png"], {"format": "png"}, id="bare-string"),
        pytest.param(["ref=null"], {"ref": None}, id="null"),
        pytest.param(["x=[1,2]"], {"x": "[1,2]"}, id="lists-stay-strings"),
        pytest.param(["url=a=b"], {"url": "a=b"}, id="value-with-equals"),
    ],
)
def test_options_parse_json_scalars(items: list[str], expected: dict[str, object]) -> None:
    assert parse_options(items) == expected


@pytest.mark.parametrize(
    "item", [pytest.param("novalue", id="no-equals"), pytest.param("=1", id="no-key")]
)
def test_bad_options_are_refused(item: str) -> None:
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_options([item])


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in (
        "topology",
        "submit",
        "watch",
        "cancel",
        "status",
        "worker",
        "models",
        "simulate",
        "gateway",
        "demo",
    ):
        assert cmd in out


def test_bad_settings_exit_2_with_the_variable_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FACEFLEET_CONCURRENCY", "-3")
    assert main(["worker", "--processor", "noop"]) == 2
    assert "FACEFLEET_CONCURRENCY" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "seconds_ago"),
    [
        pytest.param("90s", 90, id="seconds"),
        pytest.param("30m", 1800, id="minutes"),
        pytest.param("2h", 7200, id="hours"),
        pytest.param("1.5d", 129600, id="fractional-days"),
    ],
)
def test_since_accepts_durations_ago(value: str, seconds_ago: int) -> None:
    from facefleet.producer.cli import parse_since
    from facefleet.wire import utcnow

    delta = (utcnow() - parse_since(value)).total_seconds()
    assert seconds_ago - 1 < delta < seconds_ago + 5


@pytest.mark.parametrize(
    ("value", "iso"),
    [
        pytest.param("2026-11-21T10:00:00+00:00", "2026-11-21T10:00:00+00:00", id="aware"),
        pytest.param("2026-11-21T10:00:00", "2026-11-21T10:00:00+00:00", id="naive-is-utc"),
    ],
)
def test_since_accepts_iso_times(value: str, iso: str) -> None:
    from facefleet.producer.cli import parse_since

    assert parse_since(value).isoformat() == iso


@pytest.mark.parametrize(
    "value", [pytest.param("yesterday", id="word"), pytest.param("5w", id="weeks")]
)
def test_since_refuses_other_text(value: str) -> None:
    import argparse

    from facefleet.producer.cli import parse_since

    with pytest.raises(argparse.ArgumentTypeError, match="ISO-8601"):
        parse_since(value)
