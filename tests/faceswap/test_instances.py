"""Model instances (FACEFLEET_INSTANCES) and dynamic batching across jobs
(FACEFLEET_DYNAMIC_BATCH), on the tiny models: real onnxruntime sessions with the real files'
signatures (batch fixed at 1) and the `batched` variants (symbolic batch axis)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from facefleet.consumer.device import Device
from facefleet.consumer.processors.faceswap import FaceSwapProcessor
from facefleet.consumer.processors.faceswap.sessions import (
    BatchingSession,
    SessionPool,
    open_model,
    symbolic_batch,
)
from facefleet.models.tiny import write_tiny_models
from facefleet.settings import WorkerSettings
from tests.faceswap.conftest import T1, MakeContext

CPU = ["CPUExecutionProvider"]


class Recording:
    """A PROXY for a real session: records each call's rows and how many calls overlap, and
    slows each call by `delay_s` so overlaps are visible on a busy machine."""

    def __init__(self, session: Any, delay_s: float = 0.0) -> None:
        self.session = session
        self.delay_s = delay_s
        self.rows: list[int] = []
        self.in_flight = 0
        self.peak = 0
        self._lock = threading.Lock()

    def get_inputs(self) -> Any:
        return self.session.get_inputs()

    def get_outputs(self) -> Any:
        return self.session.get_outputs()

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
        with self._lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.rows.append(int(next(iter(feeds.values())).shape[0]))
        try:
            time.sleep(self.delay_s)
            return self.session.run(names, feeds)
        finally:
            with self._lock:
                self.in_flight -= 1


@pytest.fixture(scope="module")
def batched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    dest = tmp_path_factory.mktemp("tiny-batched")
    return dest, write_tiny_models(dest, batched=True)


def enhancer_input(rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (rows, 3, 512, 512)).astype(np.float32)


def together(n: int, call: Any) -> list[Any]:
    """Run call(i) on n threads released at once; results in order."""
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        out[i] = call(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


@pytest.mark.parametrize(
    ("instances", "expected_peak"),
    [pytest.param(1, 1, id="one-instance"), pytest.param(2, 2, id="two-instances")],
)
def test_instances_let_that_many_calls_of_a_model_run_at_once(
    tiny_models: tuple[Path, Path], instances: int, expected_peak: int
) -> None:
    path = tiny_models[0] / "gfpgan_1.4.onnx"
    made: list[Recording] = []

    def factory() -> Recording:
        made.append(Recording(ort.InferenceSession(str(path), providers=CPU), delay_s=0.1))
        return made[-1]

    device = Device(instances)
    model = open_model(factory, instances=instances, device=device)
    assert len(made) == instances
    assert isinstance(model.session, SessionPool) == (instances > 1)
    name = model.get_inputs()[0].name
    outs = together(4, lambda i: model.run(None, {name: enhancer_input(1, i)})[0])
    assert max(r.peak for r in made) == 1  # a session runs one call at a time
    assert sum(r.peak for r in made) == expected_peak
    assert sum(len(r.rows) for r in made) == 4
    assert device.calls == 4
    direct = ort.InferenceSession(str(path), providers=CPU)
    for i, out in enumerate(outs):
        np.testing.assert_allclose(out, direct.run(None, {name: enhancer_input(1, i)})[0])


def test_dynamic_batching_stacks_concurrent_calls_into_one_and_splits_the_results(
    batched: tuple[Path, Path],
) -> None:
    path = batched[0] / "gfpgan_1.4.onnx"
    rec = Recording(ort.InferenceSession(str(path), providers=CPU))
    model = open_model(lambda: rec, max_rows=4, max_delay_s=2.0)
    assert isinstance(model, BatchingSession)
    name = model.get_inputs()[0].name
    rows = [1, 2, 1]  # 4 rows in all: the call goes as soon as the batch is full
    t0 = time.monotonic()
    outs = together(3, lambda i: model.run(None, {name: enhancer_input(rows[i], i)})[0])
    assert time.monotonic() - t0 < 1.5  # full before the delay: no waiting it out
    assert rec.rows == [4]
    direct = ort.InferenceSession(str(path), providers=CPU)
    for i, out in enumerate(outs):
        expected = direct.run(None, {name: enhancer_input(rows[i], i)})[0]
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_a_lone_call_waits_at_most_the_queueing_delay(batched: tuple[Path, Path]) -> None:
    path = batched[0] / "gfpgan_1.4.onnx"
    rec = Recording(ort.InferenceSession(str(path), providers=CPU))
    model = open_model(lambda: rec, max_rows=8, max_delay_s=0.2)
    name = model.get_inputs()[0].name
    t0 = time.monotonic()
    model.run(None, {name: enhancer_input(1, 0)})
    waited = time.monotonic() - t0
    assert 0.19 <= waited < 2.0
    assert rec.rows == [1]


@pytest.mark.parametrize(
    ("models", "name", "expected"),
    [
        pytest.param("batched", "gfpgan_1.4.onnx", True, id="enhancer-symbolic"),
        pytest.param("batched", "det_10g.onnx", True, id="detector-symbolic"),
        pytest.param("tiny", "gfpgan_1.4.onnx", False, id="enhancer-fixed-1"),
        pytest.param("tiny", "det_10g.onnx", False, id="detector-rank2-outputs"),
    ],
)
def test_only_models_with_a_symbolic_batch_axis_are_batched(
    batched: tuple[Path, Path],
    tiny_models: tuple[Path, Path],
    models: str,
    name: str,
    expected: bool,
) -> None:
    root = (batched if models == "batched" else tiny_models)[0]
    session = ort.InferenceSession(str(root / name), providers=CPU)
    assert symbolic_batch(session) == expected
    model = open_model(lambda: session, max_rows=4, max_delay_s=0.01)
    assert isinstance(model, BatchingSession) == expected


def test_photo_jobs_run_with_instances_and_dynamic_batching(
    batched: tuple[Path, Path], make_ctx: MakeContext
) -> None:
    """The whole processor with 2 instances and dynamic batching: concurrent jobs' detector calls
    share calls, and every job gets the result it gets alone."""
    settings = WorkerSettings(
        backend="insightface",
        processor="faceswap",
        model_dir=batched[0],
        execution_providers="cpu",
        instances=2,
        dynamic_batch=4,
        batch_delay_ms=200,
    )
    proc = FaceSwapProcessor(settings, catalog_path=batched[1])
    proc.warm_up()
    assert proc.device is not None and proc.device.lanes == 2
    ctxs = [make_ctx(T1, T1) for _ in range(3)]
    outs = together(3, lambda i: proc.run(ctxs[i]))
    backend: Any = proc.backend()
    assert isinstance(backend.detector.session, BatchingSession)
    assert max(backend.detector.session.calls) > 1  # some calls were shared
    alone = FaceSwapProcessor(
        WorkerSettings(
            backend="insightface",
            processor="faceswap",
            model_dir=batched[0],
            execution_providers="cpu",
        ),
        catalog_path=batched[1],
    )
    ref_ctx = make_ctx(T1, T1)
    ref = alone.run(ref_ctx)
    expected = (ref_ctx.output_dir / ref.result_file).read_bytes()
    for ctx, out in zip(ctxs, outs, strict=True):
        assert out.details["faces_swapped"] == ref.details["faces_swapped"]
        assert (ctx.output_dir / out.result_file).read_bytes() == expected
