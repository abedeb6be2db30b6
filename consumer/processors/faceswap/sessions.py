"""onnxruntime sessions for the insightface backend: model files resolved through the catalogue,
providers from settings, one session per model per process, passed explicitly.

There is no module-level cache: `load_sessions()` returns a `ModelSessions` value that the
processor owns and hands to each step. onnxruntime's `InferenceSession.run` is thread-safe, so
one set serves every concurrent job of the worker.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facefleet.consumer.device import Device
from facefleet.consumer.errors import TransientJobError
from facefleet.consumer.processors.faceswap import tensorrt as trt
from facefleet.consumer.processors.faceswap.tensorrt import TensorrtTarget
from facefleet.settings import WorkerSettings


class ModelMissingError(TransientJobError):
    """A model file is absent or fails its check. Raised at start-up (the worker then exits
    before reporting ready) or, if files vanish later, per job (retried elsewhere)."""

    def __init__(self, message: str) -> None:
        super().__init__("model_missing", message)


def resolve_model_files(
    model_dir: Path, names: Sequence[str], catalog_path: Path | None = None
) -> dict[str, Path]:
    """Map catalogue names to checked files in model_dir (presence and size, and the sha256 when
    a verified-stamp exists); the error names each file and its catalogue entry."""
    from facefleet.models.catalog import Catalog, CatalogError

    try:
        catalog = Catalog.load(catalog_path)
        problems = catalog.verify_present(model_dir, names)
    except CatalogError as exc:
        raise ModelMissingError(str(exc)) from exc
    if problems:
        raise ModelMissingError(
            "; ".join(str(p) for p in problems) + " (FACEFLEET_MODEL_DIR=" + str(model_dir) + ")"
        )
    return {name: catalog.path_for(name, model_dir) for name in names}


def provider_config(
    settings: WorkerSettings,
    model_path: Path | None = None,
    *,
    tensorrt: Callable[[int], TensorrtTarget | None] = trt.detect,
) -> tuple[list[str], list[dict[str, Any]]]:
    """The settings' provider order, reduced to what works here, with the device id and GPU
    memory limit as provider options (CPU always last). TensorRT only where its libraries load
    and a GPU is named (`tensorrt`, feature detection: see tensorrt.py), with its engine and
    timing caches for `model_path` under FACEFLEET_TRT_CACHE_DIR, FP16 per FACEFLEET_TRT_FP16."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    providers: list[str] = []
    options: list[dict[str, Any]] = []
    limit = settings.gpu_mem_limit_mb * 1024 * 1024 if settings.gpu_mem_limit_mb else None
    for name in settings.providers():
        if name not in available:
            continue
        opts: dict[str, Any] = {}
        if name == "CUDAExecutionProvider":
            opts["device_id"] = settings.device_id
            if limit:
                opts["gpu_mem_limit"] = limit
        elif name == "TensorrtExecutionProvider":
            target = tensorrt(settings.device_id)
            if target is None:
                continue
            opts = tensorrt_options(settings, target, model_path, limit)
        providers.append(name)
        options.append(opts)
    if "CPUExecutionProvider" not in providers:
        providers.append("CPUExecutionProvider")
        options.append({})
    return providers, options


def tensorrt_options(
    settings: WorkerSettings, target: TensorrtTarget, model_path: Path | None, limit: int | None
) -> dict[str, Any]:
    """TensorRT options for one model: caches keyed by GPU model, TensorRT version and the
    model's sha256 (none without a model path or a writable cache volume)."""
    if model_path is None:
        return {"device_id": settings.device_id, "trt_fp16_enable": settings.trt_fp16}
    root = settings.trt_cache_dir or settings.model_dir / "trt-cache"
    engines, timing = trt.cache_dirs(root, target, trt.model_sha256(model_path), settings.trt_fp16)
    opts = trt.provider_options(
        device_id=settings.device_id,
        engines=engines,
        timing=timing,
        fp16=settings.trt_fp16,
        workspace_bytes=limit,
    )
    if not (trt.writable_dir(engines) and trt.writable_dir(timing)):
        for key in ("trt_engine_cache_enable", "trt_timing_cache_enable"):
            opts[key] = False
    return opts


def create_session(path: Path, settings: WorkerSettings) -> Any:
    """One onnxruntime session for one model file with the worker's providers."""
    import onnxruntime as ort

    providers, options = provider_config(settings, path)
    sess_options = ort.SessionOptions()
    sess_options.log_severity_level = 3  # "initializer not used" noise on tiny/exported graphs
    try:
        return ort.InferenceSession(
            str(path), sess_options=sess_options, providers=providers, provider_options=options
        )
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelMissingError(f"cannot load model {path}: {exc}") from exc


class LaneSession:
    """A session whose every `run` takes a lane of the device (consumer/device.py): the worker's
    pipeline overlaps jobs' CPU steps, while their model calls queue for the GPU slot in order.
    Everything else (get_inputs, get_outputs...) is the session's own."""

    def __init__(self, session: Any, device: Device) -> None:
        self.session = session
        self.device = device

    def run(self, output_names: Any, feeds: Any, *args: Any, **kwargs: Any) -> Any:
        with self.device.hold():
            return self.session.run(output_names, feeds, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def on_device(session: Any, device: Device | None) -> Any:
    """The session as the backend should call it: through the device's lanes when there is one."""
    return session if device is None else LaneSession(session, device)


class SessionPool:
    """K sessions of one model (Triton's instance group, FACEFLEET_INSTANCES): each `run` takes
    a free one, so K calls of the model can be in flight at once (on a GPU, K CUDA streams'
    worth of overlap: one call's host work and copies hide behind another's kernels)."""

    def __init__(self, sessions: Sequence[Any]) -> None:
        if not sessions:
            raise ValueError("a pool needs at least one session")
        self.sessions = list(sessions)
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for session in self.sessions:
            self._free.put(session)

    def run(self, output_names: Any, feeds: Any, *args: Any, **kwargs: Any) -> Any:
        session = self._free.get()
        try:
            return session.run(output_names, feeds, *args, **kwargs)
        finally:
            self._free.put(session)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sessions[0], name)


def symbolic_batch(session: Any) -> bool:
    """Every input and output has a symbolic first axis: rows of several calls can be stacked
    into one call and its outputs split back (our detector and enhancer exports; not
    facefusion's gfpgan_1.4.onnx, fixed at 1, nor rank-2 detector outputs without a batch)."""
    values = [*session.get_inputs(), *session.get_outputs()]
    return bool(values) and all(
        len(v.shape) >= 2 and batch_capacity(v.shape[0]) is None for v in values
    )


@dataclass
class _Request:
    output_names: tuple[str, ...] | None
    """None: every output."""
    feeds: dict[str, np.ndarray]
    rows: int
    taken: bool = False
    """A leader took it into its call (guarded by the batcher's condition)."""
    done: threading.Event = field(default_factory=threading.Event)
    result: list[np.ndarray] | None = None
    error: BaseException | None = None

    def key(self) -> tuple[object, ...]:
        """Requests with equal keys can share one call (same outputs, same row shapes)."""
        return (
            self.output_names,
            tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(self.feeds.items())),
        )


def _names(req: _Request) -> list[str] | None:
    return None if req.output_names is None else list(req.output_names)


class BatchingSession:
    """Dynamic batching across jobs (Triton's dynamic batcher) for a model with a symbolic batch
    axis: concurrent `run` calls with the same output names and row shapes are stacked into one
    call of up to `max_rows` rows. The first caller waits at most `max_delay_s` for others (never
    when it is alone in a full call), runs the stacked call and hands each caller its rows.

    Why: one call of 4 rows costs a GPU far less than 4 calls of 1; jobs in a pipelined worker
    (FACEFLEET_PIPELINE_DEPTH) or several GPU slots call the same model at nearly the same time."""

    def __init__(self, session: Any, max_rows: int, max_delay_s: float) -> None:
        if max_rows < 2:
            raise ValueError("dynamic batching needs max_rows >= 2")
        self.session = session
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self._cond = threading.Condition()
        self._waiting: list[_Request] = []
        self.calls: list[int] = []
        """Rows of each stacked call made (for tests and logs)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def run(self, output_names: Any, feeds: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return self.session.run(output_names, feeds, *args, **kwargs)
        arrays = {k: np.asarray(v) for k, v in feeds.items()}
        rows = {int(v.shape[0]) for v in arrays.values()}
        if len(rows) != 1 or next(iter(rows)) >= self.max_rows:
            return self.session.run(output_names, feeds)  # full (or odd) on its own
        names = None if output_names is None else tuple(output_names)
        req = _Request(names, arrays, rows.pop())
        with self._cond:
            self._waiting.append(req)
            self._cond.notify_all()
            deadline = time.monotonic() + self.max_delay_s
            # The first waiter of its key leads: it waits for company, then takes the call;
            # the others wait until a leader took them.
            batch: list[_Request] = []
            while not req.taken:
                group = self._group(req)
                if group[0] is req:
                    left = deadline - time.monotonic()
                    if sum(r.rows for r in group) >= self.max_rows or left <= 0:
                        batch = self._take(group)
                        break
                    self._cond.wait(left)
                else:
                    self._cond.wait()
        if batch:
            self._run_stacked(batch)
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req.result

    def _group(self, req: _Request) -> list[_Request]:
        key = req.key()
        return [r for r in self._waiting if r.key() == key]

    def _take(self, group: list[_Request]) -> list[_Request]:
        batch, rows = [], 0
        for r in group:
            if rows + r.rows > self.max_rows:
                break
            batch.append(r)
            rows += r.rows
        for r in batch:
            r.taken = True
            self._waiting.remove(r)
        self._cond.notify_all()  # the next waiter of this key now leads
        return batch

    def _run_stacked(self, batch: list[_Request]) -> None:
        try:
            if len(batch) == 1:
                outs = self.session.run(_names(batch[0]), batch[0].feeds)
            else:
                feeds = {
                    k: np.ascontiguousarray(np.concatenate([r.feeds[k] for r in batch]))
                    for k in batch[0].feeds
                }
                outs = self.session.run(_names(batch[0]), feeds)
            self.calls.append(sum(r.rows for r in batch))
            start = 0
            for r in batch:
                r.result = [o[start : start + r.rows] for o in outs]
                start += r.rows
        except BaseException as exc:
            for r in batch:
                r.error = exc
        finally:
            for r in batch:
                r.done.set()


def open_model(
    factory: Callable[[], Any],
    *,
    instances: int = 1,
    device: Device | None = None,
    max_rows: int = 1,
    max_delay_s: float = 0.0,
) -> Any:
    """A model as the backend calls it: `instances` sessions from `factory` (a pool when more
    than one), every call through the device's lanes, and dynamic batching across calls when
    max_rows > 1 and the model's batch axis is symbolic (else calls go through as they come)."""
    sessions = [factory() for _ in range(max(1, instances))]
    model: Any = sessions[0] if len(sessions) == 1 else SessionPool(sessions)
    model = on_device(model, device)
    if max_rows > 1 and symbolic_batch(sessions[0]):
        model = BatchingSession(model, max_rows, max_delay_s)
    return model


def batch_capacity(dim: object) -> int | None:
    """How many rows one `run` may take, from a model input's batch dim: None when it is
    symbolic (any count), else the fixed count (1 for facefusion's gfpgan_1.4.onnx)."""
    return dim if isinstance(dim, int) and dim > 0 else None


def run_in_batches(
    session: Any,
    output_names: Sequence[str],
    input_name: str,
    blob: np.ndarray,
    capacity: int | None,
) -> list[list[np.ndarray]]:
    """Each `session.run`'s outputs, trimmed to the real rows: one call for the whole blob when
    the batch dim is symbolic, one call per `capacity` rows when it is fixed (a short last chunk
    is zero-padded so a fixed batch > 1 still gets its exact shape). Outputs need a batch axis."""
    n = int(blob.shape[0])
    size = capacity or max(n, 1)
    results: list[list[np.ndarray]] = []
    for start in range(0, n, size):
        chunk = blob[start : start + size]
        real = int(chunk.shape[0])
        if real < size and capacity is not None:
            pad = np.zeros((size - real, *chunk.shape[1:]), dtype=chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        outs = session.run(list(output_names), {input_name: np.ascontiguousarray(chunk)})
        results.append([o[:real] for o in outs])
    return results
