"""The emulated backend: the real decode, crop, paste-back and encode around model calls that
hold the emulated device for their configured time without using the CPU."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from facefleet.consumer.processors.faceswap import FaceSwapProcessor
from facefleet.settings import SettingsError, WorkerSettings, parse_model_ms
from tests.faceswap.conftest import T1, MakeContext


def photo(path: Path, size: tuple[int, int] = (1920, 1080)) -> Path:
    """A 1080p JPEG photo (the insightface sample scaled up)."""
    cv2.imwrite(str(path), cv2.resize(cv2.imread(str(T1)), size), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return path


def emulated(times: str) -> FaceSwapProcessor:
    proc = FaceSwapProcessor(
        WorkerSettings(backend="emulated", processor="faceswap", emulated_model_ms=times)
    )
    proc.warm_up()
    return proc


def test_a_photo_job_holds_the_device_for_the_configured_model_time(
    make_ctx: MakeContext, tmp_path: Path
) -> None:
    proc = emulated("detect=40,embed=10,swap=30,enhance=50")
    target = photo(tmp_path / "t.jpg")
    ctx = make_ctx(target, target)
    wall0 = time.monotonic()
    out = proc.run(ctx)
    wall = time.monotonic() - wall0
    assert proc.device is not None
    # detect source + detect target + embed source + swap; no enhance asked for
    assert proc.device.calls == 4
    assert 0.12 <= proc.device.held_s <= min(wall, 0.2)
    result = cv2.imread(str(ctx.output_dir / out.result_file))
    source = cv2.imread(str(target))
    assert result.shape == (1080, 1920, 3)
    middle = (slice(480, 600), slice(900, 1020))
    # the "swapped" face is the inverted crop pasted back: the middle changed, the corner not
    assert np.abs(result[middle].astype(int) - source[middle]).mean() > 40
    assert np.abs(result[:100, :100].astype(int) - source[:100, :100]).mean() < 5
    assert out.details["faces_swapped"] == 1


def test_model_time_grows_with_the_batch_when_asked(make_ctx: MakeContext, tmp_path: Path) -> None:
    proc = emulated("enhance=0+25")
    assert proc.device is not None
    backend = proc.backend()
    frame = np.zeros((300, 300, 3), np.uint8)
    faces = backend.detect([frame, frame, frame])
    backend.enhance([(frame, f[0]) for f in faces], 80)
    assert 0.075 <= proc.device.held_s < 0.2  # 3 rows x 25 ms, detect took nothing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("detect=10", {"detect": (10.0, 0.0)}, id="base-only"),
        pytest.param(
            "detect=6+2, swap=1.5", {"detect": (6.0, 2.0), "swap": (1.5, 0.0)}, id="per-row"
        ),
        pytest.param("", {}, id="nothing-takes-time"),
    ],
)
def test_model_times_parse(text: str, expected: dict[str, tuple[float, float]]) -> None:
    assert parse_model_ms(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("detect", id="no-value"),
        pytest.param("resnet=5", id="unknown-model"),
        pytest.param("detect=fast", id="not-a-number"),
        pytest.param("detect=-1", id="negative"),
    ],
)
def test_bad_model_times_name_the_variable(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEFLEET_EMULATED_MODEL_MS", text)
    with pytest.raises(SettingsError, match="FACEFLEET_EMULATED_MODEL_MS"):
        WorkerSettings.load()


def test_a_lock_file_that_cannot_be_opened_names_the_variable(tmp_path: Path) -> None:
    """The worker's CLI turns this ValueError into a clean exit 2 with the message."""
    settings = WorkerSettings(
        backend="emulated",
        processor="faceswap",
        emulated_device_lock=tmp_path / "no-such-dir" / "device.lock",
    )
    with pytest.raises(ValueError, match=r"FACEFLEET_EMULATED_DEVICE_LOCK=.*No such file"):
        FaceSwapProcessor(settings)
