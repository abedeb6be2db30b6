"""onnxruntime sessions for the insightface backend: model files resolved through the catalogue,
providers from settings, one session per model per process, passed explicitly.

There is no module-level cache: `load_sessions()` returns a `ModelSessions` value that the
processor owns and hands to each step. onnxruntime's `InferenceSession.run` is thread-safe, so
one set serves every concurrent job of the worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from consumer.device import Device
from consumer.errors import TransientJobError
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
    from models.catalog import Catalog, CatalogError

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


def provider_config(settings: WorkerSettings) -> tuple[list[str], list[dict[str, Any]]]:
    """The settings' provider order, reduced to what this onnxruntime build has, with the device
    id and GPU memory limit as provider options (CPU always last)."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    providers: list[str] = []
    options: list[dict[str, Any]] = []
    for name in settings.providers():
        if name not in available:
            continue
        opts: dict[str, Any] = {}
        if name == "CUDAExecutionProvider":
            opts["device_id"] = settings.device_id
            if settings.gpu_mem_limit_mb:
                opts["gpu_mem_limit"] = settings.gpu_mem_limit_mb * 1024 * 1024
        elif name == "TensorrtExecutionProvider":
            opts["device_id"] = settings.device_id
            if settings.gpu_mem_limit_mb:
                opts["trt_max_workspace_size"] = settings.gpu_mem_limit_mb * 1024 * 1024
        providers.append(name)
        options.append(opts)
    if "CPUExecutionProvider" not in providers:
        providers.append("CPUExecutionProvider")
        options.append({})
    return providers, options


def create_session(path: Path, settings: WorkerSettings) -> Any:
    """One onnxruntime session for one model file with the worker's providers."""
    import onnxruntime as ort

    providers, options = provider_config(settings)
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
