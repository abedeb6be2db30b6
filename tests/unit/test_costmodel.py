"""The cost model: facts -> seconds, the bounded re-fit, probing at submit, the wire field."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from facefleet.costmodel import (
    Coefficients,
    CostModel,
    default_seconds,
    estimate_for,
    guess_kind,
    parse_cost_model,
    probe_file,
)
from facefleet.settings import CommonSettings, SettingsError
from facefleet.wire import JobEvent, JobRequest, WorkEstimate, queued_event

C = Coefficients()


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        pytest.param(
            WorkEstimate(kind="image", pixels=12_000_000, frames=1, gpu_s=0),
            C.overhead_s + 12 * C.image_s_per_mp,
            id="12mp-photo",
        ),
        pytest.param(
            WorkEstimate(kind="image", pixels=12_000_000, frames=1, enhance=True, gpu_s=0),
            C.overhead_s + 12 * C.image_s_per_mp * C.enhance_factor,
            id="photo-enhanced",
        ),
        pytest.param(
            WorkEstimate(kind="image", pixels=1_000_000, faces=3, gpu_s=0),
            C.overhead_s + C.image_s_per_mp * (1 + 2 * C.face_factor),
            id="three-faces",
        ),
        pytest.param(
            WorkEstimate(kind="video", pixels=2_073_600, frames=1800, gpu_s=0),
            C.overhead_s + C.video_s_per_mp_frame * 2.0736 * 1800,
            id="1080p-60s-video",
        ),
        pytest.param(WorkEstimate(kind="unknown", gpu_s=0), C.unknown_s, id="unknown-kind"),
        pytest.param(WorkEstimate(kind="video", gpu_s=0), C.unknown_s, id="video-no-pixels"),
        pytest.param(
            WorkEstimate(v=2, kind="image", pixels=10, gpu_s=0), C.unknown_s, id="newer-version"
        ),
    ],
)
def test_default_seconds(facts: WorkEstimate, expected: float) -> None:
    assert default_seconds(facts, C) == pytest.approx(expected)


def test_old_message_without_estimate_is_priced_as_unknown() -> None:
    model = CostModel(coefficients={"default": Coefficients(unknown_s=42)})
    assert model.seconds("standard", None) == 42


PHOTO = WorkEstimate(kind="image", pixels=10_000_000, frames=1, gpu_s=0)


def test_refit_follows_the_median_and_one_odd_job_cannot_swing_it() -> None:
    model = CostModel(min_samples=5, window=50)
    base = model.seconds("standard", PHOTO)
    for _ in range(20):
        model.observe("standard", PHOTO, base * 2)  # GPUs half as fast as the defaults say
    assert model.seconds("standard", PHOTO) == pytest.approx(base * 2)
    model.observe("standard", PHOTO, base * 10_000)  # one job stuck for hours
    assert model.seconds("standard", PHOTO) == pytest.approx(base * 2)
    assert model.scale("batch", "image") == 1.0  # tiers are fitted apart
    assert model.scale("standard", "video") == 1.0  # and kinds


@pytest.mark.parametrize(
    ("factor", "scale"),
    [
        pytest.param(1000.0, 4.0, id="capped-high"),
        pytest.param(0.0001, 0.25, id="capped-low"),
        pytest.param(0.5, 0.5, id="inside-bounds"),
    ],
)
def test_refit_is_bounded(factor: float, scale: float) -> None:
    model = CostModel(min_samples=3)
    base = model.seconds("high", PHOTO)
    for _ in range(10):
        model.observe("high", PHOTO, base * factor)
    assert model.scale("high", "image") == pytest.approx(scale)


def test_too_few_samples_keep_the_defaults() -> None:
    model = CostModel(min_samples=20)
    for _ in range(19):
        model.observe("high", PHOTO, 100.0)
    assert model.scale("high", "image") == 1.0


def test_cost_model_setting_per_tier_over_default() -> None:
    parsed = parse_cost_model('{"default": {"overhead_s": 2}, "batch": {"unknown_s": 60}}')
    assert parsed["batch"].overhead_s == 2
    assert parsed["batch"].unknown_s == 60
    assert parsed["default"].unknown_s == C.unknown_s


@pytest.mark.parametrize(
    "text",
    [
        pytest.param('{"default": {"overhead": 1}}', id="unknown-field"),
        pytest.param('{"default": {"overhead_s": -1}}', id="negative"),
        pytest.param("[1]", id="not-an-object"),
        pytest.param("{", id="not-json"),
    ],
)
def test_bad_cost_model_setting_names_the_variable(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FACEFLEET_COST_MODEL", text)
    with pytest.raises(SettingsError, match="FACEFLEET_COST_MODEL"):
        CommonSettings.load()


def write_png(path: Path, w: int, h: int) -> Path:
    cv2.imwrite(str(path), np.zeros((h, w, 3), np.uint8))
    return path


def write_mp4(path: Path, w: int, h: int, frames: int) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(np.zeros((h, w, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_probe_reads_headers(tmp_path: Path) -> None:
    assert probe_file(write_png(tmp_path / "a.png", 64, 32)) == ("image", 2048, 1)
    kind, pixels, frames = probe_file(write_mp4(tmp_path / "v.mp4", 64, 48, 20))
    assert (kind, pixels) == ("video", 3072)
    assert frames == pytest.approx(20, abs=1)
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    assert probe_file(tmp_path / "junk.jpg") == ("unknown", None, None)


def test_estimate_for_probes_local_and_file_uris_guesses_urls(tmp_path: Path) -> None:
    png = write_png(tmp_path / "t.png", 100, 100)
    model = CostModel()
    local = estimate_for(model, "standard", str(png), processor=None, options={"enhance": "true"})
    assert (local.kind, local.pixels, local.enhance) == ("image", 10_000, True)
    assert local.gpu_s == pytest.approx(model.seconds("standard", local), abs=1e-3)
    by_uri = estimate_for(model, "standard", png.as_uri(), processor="faceswap", options={})
    assert (by_uri.kind, by_uri.pixels, by_uri.processor) == ("image", 10_000, "faceswap")
    url = estimate_for(model, "standard", "https://x.test/v.MP4?sig=1", processor=None, options={})
    assert (url.kind, url.pixels) == ("video", None)
    assert guess_kind("s3://b/k/abc") == "unknown"


def test_estimate_rides_the_wire_and_the_queued_event() -> None:
    est = WorkEstimate(kind="video", pixels=100, frames=10, gpu_s=12.5)
    job = JobRequest(
        job_id=str(uuid.uuid4()),
        idempotency_key="k",
        tier="standard",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        source_uri="file:///a.png",
        target_uri="file:///b.mp4",
        output_uri_prefix="file:///out/",
        estimate=est,
    )
    assert JobRequest.decode(job.encode()).estimate == est
    event = JobEvent.decode(queued_event(job).encode())
    assert event.payload.estimate == est
    old = job.model_copy(update={"estimate": None})
    assert b"estimate" not in old.encode()
    assert JobRequest.decode(old.encode()).estimate is None
    # a newer producer's estimate with fields this build does not know still decodes
    newer = job.encode().replace(b'"gpu_s":12.5', b'"gpu_s":12.5,"codec":"av1"')
    assert JobRequest.decode(newer).estimate == est
