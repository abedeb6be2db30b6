"""Fixtures for the faceswap tests: a fake job context, sample photos, tiny models, media makers."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

from facefleet.settings import WorkerSettings
from facefleet.wire import JobOptionValue, JobRequest

IMAGES = Path(__import__("insightface").__file__).parent / "data" / "images"
T1 = IMAGES / "t1.jpg"
HANKS = IMAGES / "Tom_Hanks_54745.png"
ASTRONAUT = Path(__import__("skimage").__file__).parent / "data" / "astronaut.png"


@dataclass
class FakeContext:
    """A FAKE JobContext for tests: records progress, optionally cancels at a checkpoint."""

    job: JobRequest
    source_path: Path
    target_path: Path
    output_dir: Path
    events: list[dict[str, object]] = field(default_factory=list)
    checkpoints: int = 0
    cancel_at: int | None = None
    """Raise JobCancelled at this checkpoint number (1-based)."""

    def progress(
        self,
        fraction: float,
        stage: str,
        *,
        eta_s: float | None = None,
        frames_done: int | None = None,
        frames_total: int | None = None,
    ) -> None:
        self.events.append(
            {
                "fraction": fraction,
                "stage": stage,
                "eta_s": eta_s,
                "frames_done": frames_done,
                "frames_total": frames_total,
            }
        )

    def checkpoint(self) -> None:
        from facefleet.consumer.errors import JobCancelled

        self.checkpoints += 1
        if self.cancel_at is not None and self.checkpoints >= self.cancel_at:
            raise JobCancelled("cancelled by test")


MakeContext = Callable[..., FakeContext]


@pytest.fixture
def make_ctx(tmp_path: Path) -> MakeContext:
    def make(source: Path, target: Path, **options: JobOptionValue) -> FakeContext:
        out = tmp_path / f"out-{uuid.uuid4().hex[:8]}"
        out.mkdir()
        job = JobRequest(
            job_id=str(uuid.uuid4()),
            idempotency_key=uuid.uuid4().hex,
            tier="standard",
            created_at=datetime.now(UTC),
            source_uri=f"file://{source}",
            target_uri=f"file://{target}",
            output_uri_prefix="file:///out/",
            options=dict(options),
        )
        return FakeContext(job, source, target, out)

    return make


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model_dir, catalogue) of the tiny stand-in models from models.tiny."""
    from facefleet.models.tiny import write_tiny_models

    dest = tmp_path_factory.mktemp("tiny-models")
    catalog = write_tiny_models(dest)
    return dest, catalog


@pytest.fixture(scope="session")
def settings_classic() -> WorkerSettings:
    return WorkerSettings(backend="classic", processor="faceswap")


@pytest.fixture(scope="session")
def insight_processor(tiny_models: tuple[Path, Path]):  # type: ignore[no-untyped-def]
    from facefleet.consumer.processors.faceswap import FaceSwapProcessor

    model_dir, catalog = tiny_models
    settings = WorkerSettings(
        backend="insightface",
        processor="faceswap",
        model_dir=model_dir,
        execution_providers="cpu",
    )
    proc = FaceSwapProcessor(settings, catalog_path=catalog)
    proc.warm_up()
    return proc


@pytest.fixture(scope="session")
def classic_processor(settings_classic: WorkerSettings):  # type: ignore[no-untyped-def]
    from facefleet.consumer.processors.faceswap import FaceSwapProcessor

    proc = FaceSwapProcessor(settings_classic)
    proc.warm_up()
    return proc


def write_video(
    path: Path,
    frames: list[np.ndarray],
    fps: int = 10,
    audio: bool = True,
    codec: str = "libx264",
    container_format: str | None = None,
    rotation: int = 0,
) -> Path:
    """A small test video (H.264 + AAC sine by default) written with PyAV; `rotation` is the
    display matrix's counter-clockwise degrees (what a phone writes for portrait video)."""
    import av

    with av.open(str(path), mode="w", format=container_format) as out:
        vs = out.add_stream(codec, rate=fps)
        vs.width = frames[0].shape[1]
        vs.height = frames[0].shape[0]
        vs.pix_fmt = "yuv420p"
        if rotation:
            vs.set_display_rotation(rotation)
        a_stream = None
        if audio:
            a_stream = out.add_stream("aac", rate=16000)
            a_stream.layout = "mono"
        for i, img in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(img, format="bgr24")
            vf.pts = i
            vf.time_base = Fraction(1, fps)
            for pkt in vs.encode(vf):
                out.mux(pkt)
        for pkt in vs.encode(None):
            out.mux(pkt)
        if a_stream is not None:
            seconds = len(frames) / fps
            n = int(16000 * seconds)
            t = np.arange(n) / 16000
            samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
            chunk = 1024
            for start in range(0, n, chunk):
                af = av.AudioFrame.from_ndarray(
                    samples[:, start : start + chunk], format="fltp", layout="mono"
                )
                af.sample_rate = 16000
                af.pts = start
                af.time_base = Fraction(1, 16000)
                for pkt in a_stream.encode(af):
                    out.mux(pkt)
            for pkt in a_stream.encode(None):
                out.mux(pkt)
    return path


def pan_frames(
    image: np.ndarray, count: int, size: tuple[int, int] = (320, 240)
) -> list[np.ndarray]:
    """`count` frames of a slow pan over `image` (w, h = size)."""
    w, h = size
    scale = max(w / image.shape[1], h / image.shape[0]) * 1.1
    big = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    dx = big.shape[1] - w
    return [
        np.ascontiguousarray(
            big[0:h, (dx * i) // max(count - 1, 1) : (dx * i) // max(count - 1, 1) + w]
        )
        for i in range(count)
    ]
