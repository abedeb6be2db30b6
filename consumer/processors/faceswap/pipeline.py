"""The face-swap pipelines as lists of named steps, and the bounded video pipeline.

Image job:  decode -> detect -> select -> swap -> paste_back -> enhance -> encode
Video job:  decode -> detect -> select -> video, where `video` runs the per-frame stages
            (decode, detect, select, swap, paste back, enhance, encode) as three overlapping
            stages: a decoder thread, inference on the job's thread, an encoder thread, joined
            by queues of at most QUEUE_BATCHES batches, so memory stays bounded however long the
            video. Frames travel in batches of `batch_size`; the detector and the enhancer take
            a whole batch per inference call when the model has a batch axis (detector.py,
            enhancer.py), else one call per frame or face. Progress names the per-frame stages
            (VideoProgress.stages), each with its own frames done.

The enhancer runs after paste-back, on the swapped frame, as facefusion does: GFPGAN wants its
own 512 px ffhq crop of the face in context, not the 128 px swap crop.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from facefleet.consumer.errors import PermanentJobError
from facefleet.consumer.processors.base import JobContext, Step
from facefleet.consumer.processors.faceswap.backend import Backend
from facefleet.consumer.processors.faceswap.geometry import Face, Frame
from facefleet.consumer.processors.faceswap.media import (
    MediaInfo,
    MediaLimits,
    VideoWriter,
    read_frames,
)
from facefleet.consumer.processors.faceswap.options import FaceSwapOptions
from facefleet.consumer.processors.faceswap.selector import by_size, select_faces

QUEUE_BATCHES = 2
DEFAULT_BATCH_SIZE = 8


@dataclass
class StageClock:
    """Seconds spent per per-frame stage, summed over a video (reported in timings_s)."""

    totals: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.totals[stage] = self.totals.get(stage, 0.0) + now - since
        return now


@dataclass
class FrameWork:
    """What every frame of a job needs: the backend, the options, the prepared source face and
    the reference embedding (reference selection only)."""

    backend: Backend
    options: FaceSwapOptions
    source: object
    reference: np.ndarray | None = None
    clock: StageClock = field(default_factory=StageClock)


def pick_source_face(backend: Backend, image: Frame) -> Face:
    faces = backend.detect([image])[0]
    if not faces:
        raise PermanentJobError("no_face_in_source", "source: no face detected")
    return by_size(faces)[0]


def reference_embedding(backend: Backend, frame: Frame, index: int) -> np.ndarray:
    """The embedding of the index-th largest face of the reference frame."""
    faces = by_size(backend.detect([frame])[0])
    if not faces:
        raise PermanentJobError("no_face_in_target", "reference frame: no face detected")
    if index >= len(faces):
        raise PermanentJobError(
            "invalid_option",
            f"reference_face_index {index} but the reference frame has {len(faces)} face(s)",
        )
    backend.embed([(frame, faces[index])])
    embedding = faces[index].embedding
    assert embedding is not None
    return embedding


def detect_and_select(work: FrameWork, frames: Sequence[Frame]) -> list[tuple[Frame, Face]]:
    t = time.perf_counter()
    per_frame = work.backend.detect(frames)
    t = work.clock.add("detect", t)
    opts = work.options
    if opts.face_selector == "reference":
        work.backend.embed(
            [(f, face) for f, faces in zip(frames, per_frame, strict=True) for face in faces]
        )
    items = [
        (frame, face)
        for frame, faces in zip(frames, per_frame, strict=True)
        for face in select_faces(faces, opts.face_selector, work.reference, opts.reference_distance)
    ]
    work.clock.add("select", t)
    return items


def swap_and_paste(work: FrameWork, items: Sequence[tuple[Frame, Face]]) -> int:
    """Swap, paste back and (optionally) enhance in place; returns the faces pasted."""
    t = time.perf_counter()
    patches = work.backend.swap(items, work.source)
    t = work.clock.add("swap", t)
    pasted = sum(
        work.backend.paste_back(frame, patch)
        for (frame, _), patch in zip(items, patches, strict=True)
    )
    t = work.clock.add("paste_back", t)
    if work.options.enhance and work.backend.supports_enhance:
        work.backend.enhance(items, work.options.enhance_blend)
        work.clock.add("enhance", t)
    return int(pasted)


def process_frames(work: FrameWork, frames: Sequence[Frame]) -> int:
    """The whole per-frame path for one batch, in place."""
    return swap_and_paste(work, detect_and_select(work, frames))


# --- named steps ------------------------------------------------------------------------------


def step_fractions(steps: Sequence[Step]) -> dict[str, tuple[float, float]]:
    """(start fraction, weight fraction) of each step, for progress inside a long step."""
    total = sum(s.weight for s in steps) or 1.0
    out, done = {}, 0.0
    for s in steps:
        out[s.name] = (done / total, s.weight / total)
        done += s.weight
    return out


# --- bounded video pipeline -------------------------------------------------------------------

_END = object()


@dataclass
class VideoResult:
    frames: int
    faces: int
    frames_with_faces: int


@dataclass(frozen=True)
class VideoProgress:
    """Frames through each part of the video pipeline so far: the decoder runs ahead of
    inference, which runs ahead of the encoder, so one count would hide where a video is."""

    frames_total: int
    decoded: int
    inferred: int
    """Frames through detect, select, swap, paste back and enhance (one batch at a time)."""
    encoded: int
    eta_s: float | None
    final: bool = False

    @property
    def work_fraction(self) -> float:
        """Share of the per-frame work done: inference and encoding count half each."""
        return min(1.0, (self.inferred + self.encoded) / (2 * max(self.frames_total, 1)))

    def stages(self, enhance: bool) -> list[tuple[str, int]]:
        """(per-frame stage, frames done) in pipeline order, as the image job names them."""
        out = [("decode", self.decoded)]
        names = ["detect", "select", "swap", "paste_back"] + (["enhance"] if enhance else [])
        out += [(name, self.inferred) for name in names]
        out.append(("encode", self.encoded))
        return out


class _Stop(Exception):
    """The pipeline is being torn down."""


def _put(q: queue.Queue[object], item: object, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stop
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue[object], stop: threading.Event) -> object:
    while True:
        if stop.is_set():
            raise _Stop
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue


def _batched(frames: Iterator[Frame], size: int) -> Iterator[list[Frame]]:
    batch: list[Frame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_video(
    work: FrameWork,
    target: Path,
    info: MediaInfo,
    limits: MediaLimits,
    output: Path,
    ctx: JobContext,
    report: Callable[[VideoProgress], None],
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> VideoResult:
    """Decode -> infer -> encode with the three stages overlapping; audio is copied at the end.

    `report` is called on the job's thread after each batch, right after the job's checkpoint
    (which may raise JobCancelled / ShutdownRequested: the threads are stopped and the partial
    output is left for the worker to discard), and once more, `final`, when the encoder is done.
    """
    to_infer: queue.Queue[object] = queue.Queue(maxsize=QUEUE_BATCHES)
    to_encode: queue.Queue[object] = queue.Queue(maxsize=QUEUE_BATCHES)
    stop = threading.Event()
    errors: list[BaseException] = []
    # One writer each (decoder thread, encoder thread); the job's thread only reads them.
    counts = {"decoded": 0, "encoded": 0}

    def decode() -> None:
        frames = read_frames(target, limits)
        try:
            for batch in _batched(frames, batch_size):
                counts["decoded"] += len(batch)
                _put(to_infer, batch, stop)
            _put(to_infer, _END, stop)
        except _Stop:
            return
        except BaseException as exc:
            errors.append(exc)
            stop.set()
        finally:
            frames.close()

    def encode() -> None:
        writer = VideoWriter(
            output,
            info.width,
            info.height,
            info.fps,
            work.options.quality,
            audio_from=target if info.has_audio else None,
        )
        try:
            while (item := _get(to_encode, stop)) is not _END:
                assert isinstance(item, list)
                t = time.perf_counter()
                for frame in item:
                    writer.write(frame)
                counts["encoded"] += len(item)
                work.clock.add("encode", t)
            t = time.perf_counter()
            writer.close()
            work.clock.add("encode", t)
        except BaseException as exc:
            if not isinstance(exc, _Stop):
                errors.append(exc)
            stop.set()
            writer.abort()

    threads = [
        threading.Thread(target=decode, name="faceswap-decode", daemon=True),
        threading.Thread(target=encode, name="faceswap-encode", daemon=True),
    ]
    for th in threads:
        th.start()
    done = faces = with_faces = 0
    start = time.monotonic()

    def progress(final: bool = False) -> VideoProgress:
        decoded, encoded = counts["decoded"], counts["encoded"]
        p = VideoProgress(max(info.frames, decoded, 1), decoded, done, encoded, None, final)
        f = p.work_fraction
        return replace(p, eta_s=(time.monotonic() - start) / f * (1 - f) if f else None)

    try:
        while True:
            item = _get(to_infer, stop)
            if item is _END:
                _put(to_encode, _END, stop)
                break
            assert isinstance(item, list)
            ctx.checkpoint()
            items = detect_and_select(work, item)
            with_faces += len({id(frame) for frame, _ in items})
            faces += swap_and_paste(work, items)
            _put(to_encode, item, stop)
            done += len(item)
            report(progress())
    except _Stop:
        pass  # a stage failed; its error is raised below
    except BaseException:
        stop.set()
        raise
    finally:
        for th in threads:
            th.join()
    if errors:
        raise errors[0]
    report(progress(final=True))
    return VideoResult(done, faces, with_faces)


def nth_frame(target: Path, limits: MediaLimits, index: int) -> Frame:
    """Decode up to frame `index` (for the reference face of a video)."""
    frames = read_frames(target, limits)
    try:
        for i, frame in enumerate(frames):
            if i == index:
                return frame
    finally:
        frames.close()
    raise PermanentJobError("invalid_option", f"reference_frame {index} is past the last frame")
