"""The video path: same frame count, fps and audio out; progress naming each per-frame stage with
its frames and an ETA; a cancel stops the pipeline threads."""

from __future__ import annotations

import threading
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from facefleet.consumer.errors import JobCancelled
from facefleet.consumer.processors.faceswap import FaceSwapProcessor
from tests.faceswap.conftest import ASTRONAUT, T1, MakeContext, pan_frames, write_video

FRAMES = 18
FPS = 12


@pytest.fixture(scope="module")
def sample_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frames = pan_frames(cv2.imread(str(T1)), FRAMES, size=(320, 224))
    return write_video(tmp_path_factory.mktemp("video") / "in.mp4", frames, fps=FPS)


def _describe(path: Path) -> tuple[int, Fraction, int, float]:
    """(frames decoded, average fps, audio streams, audio seconds)."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        rate = Fraction(v.average_rate)
        frames = sum(1 for _ in c.decode(v))
    with av.open(str(path)) as c:
        audio = len(c.streams.audio)
        seconds = 0.0
        if audio:
            a = c.streams.audio[0]
            seconds = sum(f.samples for f in c.decode(a)) / a.codec_context.sample_rate
    return frames, rate, audio, seconds


@pytest.mark.parametrize(
    "which",
    [pytest.param("classic", id="classic"), pytest.param("insightface", id="insightface-tiny")],
)
def test_video_keeps_frames_fps_and_audio(
    request: pytest.FixtureRequest, make_ctx: MakeContext, sample_video: Path, which: str
) -> None:
    proc: FaceSwapProcessor = request.getfixturevalue(
        f"{'insight' if which != 'classic' else 'classic'}_processor"
    )
    ctx = make_ctx(ASTRONAUT, sample_video, face_selector="many", enhance=True)
    out = proc.run(ctx)
    assert out.result_file == "result.mp4"
    frames, rate, audio, seconds = _describe(ctx.output_dir / out.result_file)
    in_frames, in_rate, in_audio, in_seconds = _describe(sample_video)
    assert (frames, rate, audio) == (in_frames, in_rate, in_audio) == (FRAMES, FPS, 1)
    assert seconds == pytest.approx(in_seconds, abs=0.05)
    assert out.details["frames"] == FRAMES
    assert out.details["faces_swapped"] > 0
    # frames were changed, not just re-encoded
    with av.open(str(ctx.output_dir / out.result_file)) as c, av.open(str(sample_video)) as d:
        a = next(c.decode(video=0)).to_ndarray(format="bgr24").astype(int)
        b = next(d.decode(video=0)).to_ndarray(format="bgr24").astype(int)
    assert np.abs(a - b).max() > 40
    # progress: rounds of events naming each per-frame stage in pipeline order (enhance only
    # where the backend has an enhancer), each stage's frames done rising to the total, an ETA
    stages = ["decode", "detect", "select", "swap", "paste_back", "enhance", "encode"]
    if which == "classic":
        stages.remove("enhance")
    frame_events = [e for e in ctx.events if e["frames_done"] is not None]
    rounds = [frame_events[i : i + len(stages)] for i in range(0, len(frame_events), len(stages))]
    assert len(rounds) >= 2  # the first batch and the final count at least
    for events in rounds:
        assert [e["stage"] for e in events] == stages
        done = {str(e["stage"]): e["frames_done"] for e in events}
        assert done["decode"] >= done["swap"] >= done["encode"]  # where each thread has got to
    for stage in stages:
        done = [e["frames_done"] for e in frame_events if e["stage"] == stage]
        assert done == sorted(done) and done[-1] == FRAMES, (stage, done)
    assert all(e["frames_total"] == FRAMES for e in frame_events)
    assert all(e["eta_s"] is not None and e["eta_s"] >= 0 for e in frame_events)
    assert rounds[0][-1]["frames_done"] < FRAMES and rounds[-1][-1]["eta_s"] == 0
    fractions = [e["fraction"] for e in ctx.events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {"video.detect", "video.swap", "video.encode"} <= set(out.timings_s)


def test_cancel_mid_video_stops_the_threads(
    classic_processor: FaceSwapProcessor, make_ctx: MakeContext, sample_video: Path
) -> None:
    ctx = make_ctx(ASTRONAUT, sample_video, face_selector="many")
    ctx.cancel_at = 6  # 4 step boundaries, then inside the frame loop
    with pytest.raises(JobCancelled):
        classic_processor.run(ctx)
    assert not [t for t in threading.enumerate() if t.name.startswith("faceswap-")]
    # The decoder may have read every frame ahead; nothing past the cancel was swapped.
    swapped = [e["frames_done"] for e in ctx.events if e["stage"] in ("swap", "encode")]
    assert swapped and max(swapped) < FRAMES


def test_video_reference_selection(
    insight_processor: FaceSwapProcessor, make_ctx: MakeContext, sample_video: Path
) -> None:
    ctx = make_ctx(
        ASTRONAUT,
        sample_video,
        face_selector="reference",
        reference_frame=3,
        reference_distance=1.0,
    )
    many = make_ctx(ASTRONAUT, sample_video, face_selector="many")
    out = insight_processor.run(ctx)
    assert out.details["faces_swapped"] == insight_processor.run(many).details["faces_swapped"]


def test_audio_free_video(
    classic_processor: FaceSwapProcessor, make_ctx: MakeContext, tmp_path: Path
) -> None:
    frames = pan_frames(cv2.imread(str(ASTRONAUT)), 6, size=(256, 256))
    video = write_video(tmp_path / "silent.mp4", frames, fps=5, audio=False)
    ctx = make_ctx(ASTRONAUT, video)
    out = classic_processor.run(ctx)
    assert _describe(ctx.output_dir / out.result_file)[:3] == (6, 5, 0)
