"""Batching and overlap, measured rather than assumed.

- Inference calls are counted through a proxy around the real onnxruntime sessions: a batch of
  frames costs one detector / enhancer call on the `batched` tiny models (symbolic batch axis,
  rank-3 detector outputs) and one call per frame / face on the default ones, whose signatures
  are the real files' (batch fixed at 1, rank-2 detector outputs). Both give the same result:
  the same frames handed to the encoder. Not the same file: libx264's output for equal frames
  is not reproducible run to run (media.VideoWriter says why), so files are compared loosely.
- The bounded video pipeline is instrumented (decoder, inference and encoder timestamps, queue
  depths) with a deliberately slow stage, to show the three stages overlap and that the decoder
  never runs further ahead than the queues allow.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import av
import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from facefleet.consumer.processors.faceswap import FaceSwapProcessor, media, pipeline
from facefleet.consumer.processors.faceswap import backend as backend_module
from facefleet.consumer.processors.faceswap.detector import Detector
from facefleet.consumer.processors.faceswap.enhancer import Enhancer
from facefleet.consumer.processors.faceswap.geometry import Face, Frame
from facefleet.consumer.processors.faceswap.options import parse_options
from facefleet.consumer.processors.faceswap.selector import by_size
from facefleet.consumer.processors.faceswap.sessions import create_session
from facefleet.models.tiny import write_tiny_models
from facefleet.settings import WorkerSettings
from tests.faceswap.conftest import ASTRONAUT, T1, MakeContext, pan_frames, write_video

CPU = ["CPUExecutionProvider"]
BATCH = 8


class CountingSession:
    """A PROXY for an onnxruntime InferenceSession (the real graph runs on every call): records
    the batch size of each `run`, so a test can count inference calls."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.batches: list[int] = []

    def get_inputs(self) -> Any:
        return self.session.get_inputs()

    def get_outputs(self) -> Any:
        return self.session.get_outputs()

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
        self.batches.append(int(next(iter(feeds.values())).shape[0]))
        return self.session.run(names, feeds)


def _session(path: Path) -> CountingSession:
    return CountingSession(ort.InferenceSession(str(path), providers=CPU))


@pytest.fixture(scope="module")
def batched_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    dest = tmp_path_factory.mktemp("tiny-batched")
    return dest, write_tiny_models(dest, batched=True)


@pytest.fixture(scope="module")
def frames() -> list[Frame]:
    """BATCH different frames (a pan over t1.jpg), each with warm blobs the tiny detector finds."""
    return pan_frames(cv2.imread(str(T1)), BATCH, size=(320, 224))


def _same_faces(a: Sequence[Sequence[Face]], b: Sequence[Sequence[Face]]) -> None:
    assert [len(x) for x in a] == [len(x) for x in b]
    for fa, fb in zip(a, b, strict=True):
        for x, y in zip(fa, fb, strict=True):
            np.testing.assert_allclose(x.bbox, y.bbox, rtol=1e-6, atol=1e-4)
            np.testing.assert_allclose(x.kps, y.kps, rtol=1e-6, atol=1e-4)
            assert x.score == pytest.approx(y.score, abs=1e-6)


def test_detector_runs_one_call_per_batch_on_a_rank3_export(
    tiny_models: tuple[Path, Path], batched_models: tuple[Path, Path], frames: list[Frame]
) -> None:
    batched = Detector(_session(batched_models[0] / "det_10g.onnx"))
    real_layout = Detector(_session(tiny_models[0] / "det_10g.onnx"))

    together = batched.detect(frames)
    one_by_one = [batched.detect([f])[0] for f in frames]
    fallback = real_layout.detect(frames)

    assert batched.session.batches == [BATCH] + [1] * BATCH
    # rank-2 outputs (the real det_10g) cannot say which rows are whose: one call per frame
    assert real_layout.session.batches == [1] * BATCH
    assert sum(len(f) for f in together) >= BATCH  # not vacuous: every frame has faces
    _same_faces(together, one_by_one)
    _same_faces(together, fallback)


def _largest_faces(frames: list[Frame], det: Detector) -> list[tuple[Frame, Face]]:
    return [
        (frame.copy(), by_size(faces)[0])
        for frame, faces in zip(frames, det.detect(frames), strict=True)
    ]


def test_enhancer_batches_a_dynamic_export_and_falls_back_at_batch_1(
    tiny_models: tuple[Path, Path], batched_models: tuple[Path, Path], frames: list[Frame]
) -> None:
    det = Detector(ort.InferenceSession(str(tiny_models[0] / "det_10g.onnx"), providers=CPU))
    items = _largest_faces(frames, det)
    batched = Enhancer(_session(batched_models[0] / "gfpgan_1.4.onnx"))
    fixed = Enhancer(_session(tiny_models[0] / "gfpgan_1.4.onnx"))  # [1,3,512,512] like facefusion

    together = [(f.copy(), face) for f, face in items]
    one_by_one = [(f.copy(), face) for f, face in items]
    fallback = [(f.copy(), face) for f, face in items]
    batched.enhance(together, 80)
    for item in one_by_one:
        batched.enhance([item], 80)
    fixed.enhance(fallback, 80)

    assert batched.session.batches == [BATCH] + [1] * BATCH
    assert fixed.session.batches == [1] * BATCH
    for (orig, _), (a, _), (b, _), (c, _) in zip(
        items, together, one_by_one, fallback, strict=True
    ):
        assert np.abs(a.astype(int) - orig.astype(int)).max() > 10  # the enhancer did something
        np.testing.assert_allclose(a, b, atol=0)
        np.testing.assert_allclose(a, c, atol=0)


def test_enhancer_pads_the_last_chunk_for_a_fixed_batch_above_1(
    batched_models: tuple[Path, Path], tmp_path: Path, frames: list[Frame]
) -> None:
    """A fixed batch of 3 (some exports pin one): chunks of exactly 3, padding dropped."""
    model = onnx.load(str(batched_models[0] / "gfpgan_1.4.onnx"))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 3
    path = tmp_path / "gfpgan_batch3.onnx"
    onnx.save_model(model, str(path))
    fixed3 = Enhancer(_session(path))
    dynamic = Enhancer(_session(batched_models[0] / "gfpgan_1.4.onnx"))
    rng = np.random.default_rng(0)
    blob = rng.uniform(-1, 1, (7, 3, 512, 512)).astype(np.float32)

    np.testing.assert_allclose(fixed3._forward(blob), dynamic._forward(blob), atol=0)
    assert fixed3.session.batches == [3, 3, 3]


# --- the whole worker path: FaceSwapProcessor on a video --------------------------------------


@dataclass
class Counted:
    """The processor and, per model file, the proxy its backend got instead of the session."""

    processor: FaceSwapProcessor
    sessions: dict[str, CountingSession] = field(default_factory=dict)


def _counted(models: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Counted:
    counted: dict[str, CountingSession] = {}

    def counting(path: Path, settings: WorkerSettings) -> CountingSession:
        counted[path.stem] = CountingSession(create_session(path, settings))
        return counted[path.stem]

    monkeypatch.setattr(backend_module, "create_session", counting)
    settings = WorkerSettings(
        backend="insightface",
        processor="faceswap",
        model_dir=models[0],
        execution_providers="cpu",
    )
    proc = FaceSwapProcessor(settings, catalog_path=models[1], batch_size=BATCH)
    proc.warm_up()
    for session in counted.values():
        session.batches.clear()  # count the job only, not the warm-up
    return Counted(proc, counted)


def _decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]


def _record_encoded(monkeypatch: pytest.MonkeyPatch, into: list[Frame]) -> None:
    """The pipeline's writer becomes the real VideoWriter keeping a copy of each frame written."""

    class RecordingWriter(media.VideoWriter):
        """A PROXY for the real VideoWriter: every frame is still encoded."""

        def write(self, frame: Frame) -> None:
            into.append(frame.copy())
            super().write(frame)

    monkeypatch.setattr(pipeline, "VideoWriter", RecordingWriter)


def test_video_job_batches_on_batched_models_and_matches_the_per_frame_path(
    tiny_models: tuple[Path, Path],
    batched_models: tuple[Path, Path],
    make_ctx: MakeContext,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    count = 18
    video = write_video(
        tmp_path / "in.mp4", pan_frames(cv2.imread(str(T1)), count, size=(320, 224)), audio=False
    )
    runs = {}
    for name, models in (("batched", batched_models), ("real-layout", tiny_models)):
        counted = _counted(models, monkeypatch)
        written: list[Frame] = []
        _record_encoded(monkeypatch, written)
        ctx = make_ctx(ASTRONAUT, video, face_selector="many", enhance=True)
        out = counted.processor.run(ctx)
        runs[name] = (counted, out, written, _decoded(ctx.output_dir / out.result_file))

    batched, b_out, b_written, b_frames = runs["batched"]
    per_frame, p_out, p_written, p_frames = runs["real-layout"]
    faces = b_out.details["faces_swapped"]
    assert isinstance(faces, int) and faces > count  # several faces per frame: batching matters
    # 18 frames in batches of 8: the source image once, then 8 + 8 + 2
    assert batched.sessions["det_10g"].batches == [1, 8, 8, 2]
    assert per_frame.sessions["det_10g"].batches == [1] * (1 + count)
    # the enhancer: every face of a batch in one call, against one call per face
    enh = batched.sessions["gfpgan_1.4"].batches
    assert len(enh) == 3 and sum(enh) == faces
    assert per_frame.sessions["gfpgan_1.4"].batches == [1] * faces
    assert p_out.details["faces_swapped"] == faces
    # the same frames to the encoder, to the bit
    assert len(b_written) == len(p_written) == count
    for a, b in zip(b_written, p_written, strict=True):
        np.testing.assert_array_equal(a, b)
    # and each result file holds its frames, up to H.264's loss (about 37 dB here)
    for written, decoded in ((b_written, b_frames), (p_written, p_frames)):
        assert len(decoded) == count
        assert min(cv2.PSNR(a, b) for a, b in zip(written, decoded, strict=True)) > 30


# --- overlap in the bounded pipeline ----------------------------------------------------------


@dataclass
class Trace:
    """What the instrumented pipeline saw: (time, thread) per decoded frame, (start, end, thread)
    per inference batch and per encoded frame, and every queue the pipeline made."""

    decoded: list[tuple[float, str]] = field(default_factory=list)
    inferred: list[tuple[float, float, str]] = field(default_factory=list)
    encoded: list[tuple[float, float, str]] = field(default_factory=list)
    queues: list[DepthQueue] = field(default_factory=list)

    def max_frames_in_flight(self) -> int:
        """Most frames decoded but not yet encoded at any moment: what the pipeline holds."""
        moves = [(t, 1) for t, _ in self.decoded] + [(end, -1) for _, end, _ in self.encoded]
        held = peak = 0
        for _, step in sorted(moves):
            held += step
            peak = max(peak, held)
        return peak


class DepthQueue(queue.Queue[object]):
    """A PROXY for queue.Queue that records its depth after each put."""

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self.depths: list[int] = []

    def put(self, item: object, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.depths.append(self.qsize())


class SlowBackend:
    """A FAKE backend: finds no faces, and sleeps `infer_s` per batch, recording when."""

    name = "fake"
    quality_note = "fake"
    supports_enhance = False

    def __init__(self, trace: Trace, infer_s: float) -> None:
        self.trace = trace
        self.infer_s = infer_s

    def warm_up(self) -> None:
        pass

    def detect(self, frames: Sequence[Frame]) -> list[list[Face]]:
        start = time.perf_counter()
        time.sleep(self.infer_s)
        self.trace.inferred.append((start, time.perf_counter(), threading.current_thread().name))
        return [[] for _ in frames]

    def embed(self, items: Sequence[tuple[Frame, Face]]) -> None:
        pass

    def prepare_source(self, image: Frame, face: Face) -> object:
        return None

    def swap(self, items: Sequence[tuple[Frame, Face]], source: object) -> list[object | None]:
        return [None for _ in items]

    def paste_back(self, frame: Frame, patch: object) -> bool:
        return False

    def enhance(self, items: Sequence[tuple[Frame, Face]], blend: int) -> bool:
        return False


def _instrument(monkeypatch: pytest.MonkeyPatch, trace: Trace, encode_s: float) -> None:
    real_read = pipeline.read_frames
    real_writer = pipeline.VideoWriter

    def read_frames(path: Path, limits: media.MediaLimits) -> Iterator[Frame]:
        inner = real_read(path, limits)
        try:
            for frame in inner:
                trace.decoded.append((time.perf_counter(), threading.current_thread().name))
                yield frame
        finally:
            inner.close()

    class SlowWriter(real_writer):  # type: ignore[misc,valid-type]
        """A PROXY for the real VideoWriter that takes `encode_s` longer per frame."""

        def write(self, frame: Frame) -> None:
            start = time.perf_counter()
            time.sleep(encode_s)
            super().write(frame)
            trace.encoded.append((start, time.perf_counter(), threading.current_thread().name))

    def make_queue(maxsize: int = 0) -> DepthQueue:
        q = DepthQueue(maxsize)
        trace.queues.append(q)
        return q

    monkeypatch.setattr(pipeline, "read_frames", read_frames)
    monkeypatch.setattr(pipeline, "VideoWriter", SlowWriter)
    fake_queue = SimpleNamespace(Queue=make_queue, Full=queue.Full, Empty=queue.Empty)
    monkeypatch.setattr(pipeline, "queue", fake_queue)


def _run(
    tmp_path: Path, make_ctx: MakeContext, trace: Trace, infer_s: float, count: int, batch: int
) -> pipeline.VideoResult:
    video = write_video(
        tmp_path / "in.mp4", pan_frames(cv2.imread(str(ASTRONAUT)), count, (160, 128)), audio=False
    )
    limits = media.MediaLimits()
    info = media.probe(video, limits, "target")
    work = pipeline.FrameWork(SlowBackend(trace, infer_s), parse_options({}), None)
    ctx = make_ctx(ASTRONAUT, video)
    return pipeline.run_video(
        work, video, info, limits, tmp_path / "out.mp4", ctx, lambda _: None, batch
    )


def test_decode_inference_and_encode_overlap(
    tmp_path: Path, make_ctx: MakeContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slow inference: the decoder reads ahead and the encoder writes while a batch infers."""
    trace = Trace()
    _instrument(monkeypatch, trace, encode_s=0.0)
    result = _run(tmp_path, make_ctx, trace, infer_s=0.1, count=12, batch=2)

    assert result.frames == 12 and len(trace.encoded) == 12
    assert {name for _, name in trace.decoded} == {"faceswap-decode"}
    assert {name for _, _, name in trace.encoded} == {"faceswap-encode"}
    assert {name for _, _, name in trace.inferred} == {threading.current_thread().name}

    def during_inference(t: float) -> bool:
        return any(start < t < end for start, end, _ in trace.inferred)

    decoded_meanwhile = sum(during_inference(t) for t, _ in trace.decoded)
    encoded_meanwhile = sum(during_inference(end) for _, end, _ in trace.encoded)
    assert decoded_meanwhile >= 4, trace  # the next batches were read during inference
    assert encoded_meanwhile >= 4, trace  # earlier batches were written during inference


def test_a_slow_encoder_holds_back_the_decoder(
    tmp_path: Path, make_ctx: MakeContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slow encoding: both queues fill to their bound and stay there; the decoder waits, so
    the frames held at once stay under what the queues and the three stages can hold."""
    trace = Trace()
    _instrument(monkeypatch, trace, encode_s=0.02)
    count, batch = 40, 2
    result = _run(tmp_path, make_ctx, trace, infer_s=0.0, count=count, batch=batch)

    assert result.frames == count
    assert len(trace.queues) == 2
    for q in trace.queues:
        assert q.maxsize == pipeline.QUEUE_BATCHES
        assert max(q.depths) == pipeline.QUEUE_BATCHES  # full: backpressure engaged...
        assert all(d <= q.maxsize for d in q.depths)  # ...and never past the bound
    # Two queues of QUEUE_BATCHES, plus one batch in each of the decoder, inference, encoder.
    bound = (2 * pipeline.QUEUE_BATCHES + 3) * batch
    held = trace.max_frames_in_flight()
    assert held <= bound < count, (held, bound)
    assert held > pipeline.QUEUE_BATCHES * batch  # and it did buffer ahead
