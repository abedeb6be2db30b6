"""facefleet.logs: JSON lines off a terminal, text on one, the job's fields on every line logged
inside its context (by any module), and nothing of a job after its context ends."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest

from facefleet.logs import bind_stage, configure, job_context


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal (a fake: no tty is attached)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(
    ("fmt", "stream_cls", "as_json"),
    [
        pytest.param("auto", io.StringIO, True, id="auto-off-a-terminal-json"),
        pytest.param("auto", FakeTerminal, False, id="auto-on-a-terminal-text"),
        pytest.param("json", FakeTerminal, True, id="json-forced"),
        pytest.param("text", io.StringIO, False, id="text-forced"),
    ],
)
def test_the_format_follows_the_setting_and_the_stream(
    fmt: str, stream_cls: type[io.StringIO], as_json: bool
) -> None:
    out = stream_cls()
    configure("INFO", fmt, stream=out)  # type: ignore[arg-type]
    logging.getLogger("facefleet.consumer.runner").info("job %s started", "j1")
    line = out.getvalue().strip()
    if as_json:
        record = json.loads(line)
        assert record["event"] == "job j1 started"
        assert record["level"] == "info" and record["logger"] == "facefleet.consumer.runner"
        assert "timestamp" in record
    else:
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
        assert "job j1 started" in line


def test_a_jobs_fields_are_on_every_line_logged_in_its_context_and_gone_after() -> None:
    out = io.StringIO()
    configure("INFO", "json", stream=out)
    other = logging.getLogger("facefleet.consumer.inputs")  # any module, not the runner
    with job_context(job_id="j1", tier="standard", attempt=2, worker="w-1"):
        other.info("fetching source")
        bind_stage("detect")
        other.warning("no face in target")
    other.info("between jobs")
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x["event"] for x in lines] == ["fetching source", "no face in target", "between jobs"]
    fields = ("job_id", "tier", "attempt", "worker")
    assert [lines[0][k] for k in fields] == ["j1", "standard", 2, "w-1"]
    assert lines[1]["stage"] == "detect" and lines[1]["job_id"] == "j1"
    assert not {"job_id", "stage", "attempt"} & set(lines[2])


def test_a_nested_context_adds_to_the_outer_one_and_its_stage_ends_with_it() -> None:
    out = io.StringIO()
    configure("INFO", "json", stream=out)
    log = logging.getLogger("facefleet.consumer.runner")
    with job_context(job_id="j1", worker="w-1"):
        with job_context(attempt=3, tier=None):
            bind_stage("swap")
            log.info("inner")
        log.info("outer")
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert {k: lines[0].get(k) for k in ("job_id", "worker", "attempt", "stage")} == {
        "job_id": "j1",
        "worker": "w-1",
        "attempt": 3,
        "stage": "swap",
    }
    assert "tier" not in lines[0]  # None is left out
    assert lines[1]["job_id"] == "j1" and not {"attempt", "stage"} & set(lines[1])


def test_job_contexts_of_two_threads_do_not_mix() -> None:
    out = io.StringIO()
    configure("INFO", "json", stream=out)
    log = logging.getLogger("facefleet.consumer.runner")
    ready = threading.Barrier(2)

    def job(job_id: str) -> None:
        with job_context(job_id=job_id, tier="t"):
            ready.wait(5)
            log.info("working on %s", job_id)

    threads = [threading.Thread(target=job, args=(j,)) for j in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    for record in map(json.loads, out.getvalue().splitlines()):
        assert record["event"] == f"working on {record['job_id']}"
