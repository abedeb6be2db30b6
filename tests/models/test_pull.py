"""`facefleet models pull`: the init container against a loopback mirror of the tiny models."""

from __future__ import annotations

import dataclasses
import fcntl
import io
import os
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from facefleet.models.catalog import Catalog
from facefleet.models.integrity import sha256_file, stamp_path
from facefleet.models.pull import PARTIAL_DIR, ExitCode, Puller, PullOptions, PullReport
from tests.models.conftest import Mirror

DET = "det_10g.onnx"


class CountingHasher:
    def __init__(self) -> None:
        self.paths: list[Path] = []

    def __call__(self, path: Path) -> str:
        self.paths.append(path)
        return sha256_file(path)


class Log(io.StringIO):
    """Captured stderr that can wake a test when a line appears (for the lock race)."""

    def __init__(self, wake_on: str = "", event: threading.Event | None = None) -> None:
        super().__init__()
        self.wake_on = wake_on
        self.event = event

    def write(self, text: str) -> int:
        if self.event is not None and self.wake_on and self.wake_on in text:
            self.event.set()
        return super().write(text)


def pull(
    catalog: Catalog,
    dest: Path,
    *,
    base_url: str | None = None,
    names: list[str] | None = None,
    hasher: Callable[[Path], str] = sha256_file,
    log: io.StringIO | None = None,
    **options: object,
) -> PullReport:
    opts = PullOptions(base_url=base_url, backoff_s=0.0, timeout_s=10.0, **options)  # type: ignore[arg-type]
    return Puller(catalog, dest, opts, hasher=hasher, log=log or io.StringIO()).pull(names)


def assert_installed(dest: Path, tiny_dir: Path, catalog: Catalog) -> None:
    for entry in catalog.entries:
        assert (dest / entry.file).read_bytes() == (tiny_dir / entry.file).read_bytes()
        assert stamp_path(dest, entry.file).exists()
    assert not list((dest / PARTIAL_DIR).glob("*")) if (dest / PARTIAL_DIR).exists() else True


def test_fresh_pull_fetches_every_file_once_and_reports_progress(
    mirror: Mirror, tiny_catalog: Catalog, tiny_dir: Path, tmp_path: Path
) -> None:
    log = io.StringIO()
    report = pull(tiny_catalog, tmp_path / "m", base_url=mirror.base_url, log=log)

    assert report.code == ExitCode.OK
    assert [r.status for r in report.results] == ["fetched"] * 4
    assert_installed(tmp_path / "m", tiny_dir, tiny_catalog)
    for entry in tiny_catalog.entries:
        assert len(mirror.gets(entry.file)) == 1
        line = f"fetched {entry.file}: {entry.bytes:,} bytes in "
        assert sum(line in row for row in log.getvalue().splitlines()) == 1
    assert re.search(r"MB/s\) from http://127\.0\.0\.1:\d+/det_10g\.onnx", log.getvalue())


def test_cache_hit_trusts_the_stamp_and_hashes_nothing(
    mirror: Mirror, tiny_catalog: Catalog, tmp_path: Path
) -> None:
    dest = tmp_path / "m"
    assert pull(tiny_catalog, dest, base_url=mirror.base_url).code == ExitCode.OK
    requests_before = len(mirror.requests)
    hasher = CountingHasher()

    report = pull(tiny_catalog, dest, base_url=mirror.base_url, hasher=hasher)

    assert report.code == ExitCode.OK
    assert [r.status for r in report.results] == ["cached"] * 4
    assert hasher.paths == []
    assert len(mirror.requests) == requests_before


def test_a_file_without_stamp_is_hashed_once_then_stamped(
    mirror: Mirror, tiny_catalog: Catalog, tmp_path: Path
) -> None:
    dest = tmp_path / "m"
    pull(tiny_catalog, dest, base_url=mirror.base_url)
    stamp_path(dest, DET).unlink()
    hasher = CountingHasher()

    first = pull(tiny_catalog, dest, base_url=mirror.base_url, hasher=hasher, names=["det_10g"])
    second = pull(tiny_catalog, dest, base_url=mirror.base_url, hasher=hasher, names=["det_10g"])

    assert (first.results[0].status, second.results[0].status) == ("verified", "cached")
    assert hasher.paths == [dest / DET]
    assert len(mirror.gets(DET)) == 1


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _flip_byte_keep_mtime(path: Path) -> None:
    st = path.stat()
    _flip_byte(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _truncate(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size // 3)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(_flip_byte, id="flipped-byte"),
        pytest.param(_flip_byte_keep_mtime, id="flipped-byte-mtime-restored"),
        pytest.param(_truncate, id="truncated"),
    ],
)
def test_corrupt_file_on_disk_is_detected_and_refetched(
    damage: Callable[[Path], None],
    mirror: Mirror,
    tiny_catalog: Catalog,
    tiny_dir: Path,
    tmp_path: Path,
) -> None:
    dest = tmp_path / "m"
    pull(tiny_catalog, dest, base_url=mirror.base_url)
    damage(dest / DET)
    log = io.StringIO()

    report = pull(tiny_catalog, dest, base_url=mirror.base_url, log=log)

    assert report.code == ExitCode.OK
    statuses = {r.file: r.status for r in report.results}
    assert statuses[DET] == "fetched"
    assert f"{DET}: on-disk copy is" in log.getvalue()
    assert len(mirror.gets(DET)) == 2
    assert_installed(dest, tiny_dir, tiny_catalog)


@pytest.mark.parametrize(
    ("server_ranges", "expect_range_header", "expect_fetched"),
    [
        pytest.param(True, True, "rest", id="server-honours-range"),
        pytest.param(False, True, "all", id="server-ignores-range-restarts"),
    ],
)
def test_truncated_part_resumes_with_a_range_request(
    server_ranges: bool,
    expect_range_header: bool,
    expect_fetched: str,
    mirror: Mirror,
    tiny_catalog: Catalog,
    tiny_dir: Path,
    tmp_path: Path,
) -> None:
    dest = tmp_path / "m"
    data = (tiny_dir / DET).read_bytes()
    half = len(data) // 2
    (dest / PARTIAL_DIR).mkdir(parents=True)
    (dest / PARTIAL_DIR / f"{DET}.part").write_bytes(data[:half])
    mirror.ranges = server_ranges

    report = pull(tiny_catalog, dest, base_url=mirror.base_url, names=["det_10g"])

    assert report.code == ExitCode.OK
    (request,) = mirror.gets(DET)
    assert request.range == f"bytes={half}-"
    expected = len(data) - half if expect_fetched == "rest" else len(data)
    assert report.results[0].bytes_fetched == expected
    assert (dest / DET).read_bytes() == data
    assert not (dest / PARTIAL_DIR / f"{DET}.part").exists()


def test_connection_cut_mid_file_is_retried_from_where_it_stopped(
    mirror: Mirror, tiny_catalog: Catalog, tiny_dir: Path, tmp_path: Path
) -> None:
    mirror.faults[DET] = "cut-once"
    report = pull(tiny_catalog, tmp_path / "m", base_url=mirror.base_url, names=["det_10g"])

    assert report.code == ExitCode.OK
    first, second = mirror.gets(DET)
    assert first.range is None
    size = len((tiny_dir / DET).read_bytes())
    assert second.range == f"bytes={size // 2}-"


def test_stale_part_with_bad_prefix_gets_one_clean_download(
    mirror: Mirror, tiny_catalog: Catalog, tiny_dir: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "m"
    data = (tiny_dir / DET).read_bytes()
    (dest / PARTIAL_DIR).mkdir(parents=True)
    (dest / PARTIAL_DIR / f"{DET}.part").write_bytes(b"\0" * (len(data) // 2))

    report = pull(tiny_catalog, dest, base_url=mirror.base_url, names=["det_10g"])

    assert report.code == ExitCode.OK
    assert [r.range for r in mirror.gets(DET)] == [f"bytes={len(data) // 2}-", None]
    assert (dest / DET).read_bytes() == data


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], id="same-size-other-bytes"),
        pytest.param(lambda b: b + b"extra", id="longer-file"),
        pytest.param(lambda b: b[:-10], id="shorter-file"),
    ],
)
def test_checksum_mismatch_at_the_source_exits_3_and_installs_nothing(
    tamper: Callable[[bytes], bytes], mirror: Mirror, tiny_catalog: Catalog, tmp_path: Path
) -> None:
    mirror.files[DET] = tamper(mirror.files[DET])
    dest = tmp_path / "m"
    log = io.StringIO()

    report = pull(tiny_catalog, dest, base_url=mirror.base_url, log=log)

    assert report.code == ExitCode.CHECKSUM and int(report.code) == 3
    failed = {r.file: r for r in report.results if r.status == "failed"}
    assert list(failed) == [DET]
    assert "no source had the expected bytes" in failed[DET].message
    assert not (dest / DET).exists()
    assert not (dest / PARTIAL_DIR / f"{DET}.part").exists()
    assert f"FAILED {DET} (det_10g)" in log.getvalue()
    assert all((dest / e.file).exists() for e in tiny_catalog.entries if e.file != DET)


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("setup", "retried"),
    [
        pytest.param("refused", True, id="connection-refused"),
        pytest.param("404", False, id="http-404"),
        pytest.param("503", True, id="http-503-after-retries"),
        pytest.param("missing-file", False, id="file-url-missing"),
    ],
)
def test_unreachable_source_exits_4(
    setup: str, retried: bool, mirror: Mirror, tiny_catalog: Catalog, tmp_path: Path
) -> None:
    base_url = mirror.base_url
    if setup == "refused":
        base_url = _closed_port_url()
    elif setup == "404":
        del mirror.files[DET]
    elif setup == "503":
        mirror.faults[DET] = "status-503"
    else:
        base_url = (tmp_path / "empty-mirror").as_uri()
    log = io.StringIO()

    report = pull(tiny_catalog, tmp_path / "m", base_url=base_url, names=["det_10g"], log=log)

    assert report.code == ExitCode.UNREACHABLE and int(report.code) == 4
    assert "every source failed" in report.results[0].message
    assert ("retrying in" in log.getvalue()) is retried
    if setup == "503":
        assert len(mirror.gets(DET)) == 3


def test_falls_back_to_the_next_url_when_the_first_fails(
    mirror: Mirror, tiny_catalog: Catalog, tmp_path: Path
) -> None:
    entry = tiny_catalog.entry("det_10g")
    urls = (f"{_closed_port_url()}/{DET}", f"{mirror.base_url}/{DET}")
    catalog = Catalog(entries=(dataclasses.replace(entry, urls=urls),), source=tiny_catalog.source)

    report = pull(catalog, tmp_path / "m")

    assert report.code == ExitCode.OK
    assert report.results[0].url == urls[1]


@pytest.mark.parametrize(
    "how",
    [
        pytest.param("relative-to-catalogue", id="catalogue-relative-urls"),
        pytest.param("base-url-dir", id="base-url-plain-directory"),
        pytest.param("base-url-file-uri", id="base-url-file-uri"),
    ],
)
def test_file_sources(how: str, tiny_catalog: Catalog, tiny_dir: Path, tmp_path: Path) -> None:
    base_url = {
        "relative-to-catalogue": None,
        "base-url-dir": str(tiny_dir),
        "base-url-file-uri": tiny_dir.as_uri(),
    }[how]
    dest = tmp_path / "m"
    log = io.StringIO()

    report = pull(tiny_catalog, dest, base_url=base_url, log=log)

    assert report.code == ExitCode.OK, log.getvalue()
    assert_installed(dest, tiny_dir, tiny_catalog)
    assert f"from {(tiny_dir / DET).as_uri()}" in log.getvalue()


def test_file_source_resumes_a_part(tiny_catalog: Catalog, tiny_dir: Path, tmp_path: Path) -> None:
    dest = tmp_path / "m"
    data = (tiny_dir / DET).read_bytes()
    (dest / PARTIAL_DIR).mkdir(parents=True)
    (dest / PARTIAL_DIR / f"{DET}.part").write_bytes(data[:1000])

    report = pull(tiny_catalog, dest, names=["det_10g"])

    assert report.results[0].bytes_fetched == len(data) - 1000
    assert (dest / DET).read_bytes() == data


def test_two_concurrent_pulls_share_one_download(
    mirror: Mirror, tiny_catalog: Catalog, tiny_dir: Path, tmp_path: Path
) -> None:
    """The first puller is held inside its first download until the second is blocked on the lock."""
    dest = tmp_path / "shared-volume"
    mirror.faults[DET] = "gate"
    second_log = Log(wake_on="waiting for", event=mirror.gate)
    reports: dict[str, PullReport] = {}

    def run(name: str, log: io.StringIO) -> None:
        reports[name] = pull(tiny_catalog, dest, base_url=mirror.base_url, log=log)

    first = threading.Thread(target=run, args=("first", io.StringIO()))
    first.start()
    while not mirror.gets(DET):  # the first puller holds the lock and is inside its download
        first.join(timeout=0.01)
        assert first.is_alive() or mirror.gets(DET)
    second = threading.Thread(target=run, args=("second", second_log))
    second.start()
    first.join(timeout=60)
    second.join(timeout=60)

    assert mirror.gate.is_set(), "the second puller never waited for the lock"
    assert reports["first"].code == reports["second"].code == ExitCode.OK
    assert [r.status for r in reports["first"].results] == ["fetched"] * 4
    assert [r.status for r in reports["second"].results] == ["cached"] * 4
    for entry in tiny_catalog.entries:
        assert len(mirror.gets(entry.file)) == 1
    assert_installed(dest, tiny_dir, tiny_catalog)


def test_lock_timeout_exits_6(mirror: Mirror, tiny_catalog: Catalog, tmp_path: Path) -> None:
    dest = tmp_path / "m"
    dest.mkdir()
    with (dest / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("other-pod pid 1\n")
        held.flush()
        log = io.StringIO()
        report = pull(tiny_catalog, dest, base_url=mirror.base_url, log=log, lock_timeout_s=0.0)

    assert report.code == ExitCode.LOCK_TIMEOUT and int(report.code) == 6
    assert "held by other-pod pid 1" in log.getvalue()
    assert mirror.requests == []


@pytest.mark.parametrize(
    "make_dest",
    [
        pytest.param(lambda p: p / "a-file" / "models", id="parent-is-a-file"),
        pytest.param(lambda p: p / "a-file", id="dest-is-a-file"),
    ],
)
def test_unusable_destination_exits_5(
    make_dest: Callable[[Path], Path], mirror: Mirror, tiny_catalog: Catalog, tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    report = pull(tiny_catalog, make_dest(tmp_path), base_url=mirror.base_url)
    assert report.code == ExitCode.DISK and int(report.code) == 5


def test_partial_dir_unwritable_exits_5(
    mirror: Mirror, tiny_catalog: Catalog, tmp_path: Path
) -> None:
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / PARTIAL_DIR).write_text("a file where the partial directory should be")
    report = pull(tiny_catalog, dest, base_url=mirror.base_url, names=["det_10g"])
    assert report.code == ExitCode.DISK
    assert f"{PARTIAL_DIR}" in report.results[0].message


def test_unknown_name_is_rejected_before_any_io(tiny_catalog: Catalog, tmp_path: Path) -> None:
    from facefleet.models.catalog import UnknownModelError

    with pytest.raises(UnknownModelError, match="det_10g, w600k_r50"):
        pull(tiny_catalog, tmp_path / "m", names=["det_10g", "nope"])
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "resume_at",
    [pytest.param(0, id="fresh"), pytest.param(1000, id="resumed-with-range")],
)
def test_s3_source_through_a_stubbed_client(
    resume_at: int,
    tiny_catalog: Catalog,
    tiny_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """s3:// goes through boto3's get_object with a Range; the store itself is stubbed."""
    boto3 = pytest.importorskip("boto3")
    from botocore.response import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        StreamingBody,
    )
    from botocore.stub import Stubber  # type: ignore[import-untyped,import-not-found,unused-ignore]

    data = (tiny_dir / DET).read_bytes()
    client = boto3.client(
        "s3", region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s"
    )
    stub = Stubber(client)
    expected = {"Bucket": "models-mirror", "Key": f"facefleet/{DET}"}
    response: dict[str, object] = {
        "Body": StreamingBody(io.BytesIO(data[resume_at:]), len(data) - resume_at),
        "ContentLength": len(data) - resume_at,
    }
    if resume_at:
        expected["Range"] = f"bytes={resume_at}-"
        response["ContentRange"] = f"bytes {resume_at}-{len(data) - 1}/{len(data)}"
    stub.add_response("get_object", response, expected)
    stub.activate()
    monkeypatch.setattr(boto3, "client", lambda *args, **kwargs: client)
    dest = tmp_path / "m"
    if resume_at:
        (dest / PARTIAL_DIR).mkdir(parents=True)
        (dest / PARTIAL_DIR / f"{DET}.part").write_bytes(data[:resume_at])

    report = pull(tiny_catalog, dest, base_url="s3://models-mirror/facefleet", names=["det_10g"])

    assert report.code == ExitCode.OK, report.results
    assert report.results[0].url == f"s3://models-mirror/facefleet/{DET}"
    assert (dest / DET).read_bytes() == data
    stub.assert_no_pending_responses()


@pytest.mark.e2e
def test_two_puller_processes_share_one_download(
    mirror: Mirror, tiny_catalog: Catalog, tiny_dir: Path, tmp_path: Path
) -> None:
    """Like two init containers on one volume: separate processes, the real CLI, one download."""
    import subprocess
    import sys

    dest = tmp_path / "shared-volume"
    mirror.faults[DET] = "gate"
    argv = [sys.executable, "-m", "facefleet.cli", "models", "pull"]
    argv += ["--catalog", str(tiny_catalog.source), "--dest", str(dest)]
    argv += ["--base-url", mirror.base_url]
    first = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    second: subprocess.Popen[str] | None = None
    try:
        while not mirror.gets(DET):
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            threading.Event().wait(0.01)
        second = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        assert second.stderr is not None
        waited = next((line for line in second.stderr if "waiting for" in line), "")
        mirror.gate.set()
        second_err = waited + second.stderr.read()
        assert first.wait(timeout=60) == 0
        assert second.wait(timeout=60) == 0
    finally:
        mirror.gate.set()
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
            if process is not None and process.stderr is not None:
                process.stderr.close()

    assert "another pull is running" in waited
    assert second_err.count("(verified stamp)") == 4
    for entry in tiny_catalog.entries:
        assert len(mirror.gets(entry.file)) == 1
    assert_installed(dest, tiny_dir, tiny_catalog)
