"""TensorRT through onnxruntime's TensorRT execution provider: is it usable here, and where its
engine and timing caches live.

Why caches: TensorRT builds an engine per model, GPU model and TensorRT version, which takes
seconds to minutes; a scale-up pod that builds before its first job is the latency KEDA users
feel. With the caches on the model volume the first pod of a GPU kind builds, later pods load.
onnxruntime's own cache files are keyed by the graph and its input shapes, not by GPU model or
TensorRT version (its docs say an engine must not be reused across either), so the directory is:

    <cache root>/<gpu model>/trt-<version>/<model sha256[:16]>[-fp16]/   engines of one model
    <cache root>/<gpu model>/trt-<version>/timing/                       timing cache (per GPU+TRT)

Why detection: onnxruntime-gpu lists TensorrtExecutionProvider whether or not TensorRT's
libraries are installed, and a session asked for it without them logs an error and falls back.
So TensorRT is used only when libnvinfer loads (its version comes from there) and NVML names
the GPU; otherwise it is dropped from the provider list, once, with the reason in the log.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NVINFER_LIBS = ("libnvinfer.so.11", "libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so")
NVML_LIB = "libnvidia-ml.so.1"


@dataclass(frozen=True)
class TensorrtTarget:
    """What a TensorRT engine is only valid for: the GPU model and the TensorRT version."""

    gpu: str
    version: str


def tensorrt_version(libs: tuple[str, ...] = NVINFER_LIBS) -> str | None:
    """TensorRT's version from libnvinfer's getInferLibVersion (e.g. 100900 -> "10.9.0"), or
    None when no libnvinfer loads."""
    for name in libs:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.getInferLibVersion.restype = ctypes.c_int32
        return version_text(int(lib.getInferLibVersion()))
    return None


def version_text(code: int) -> str:
    """getInferLibVersion's number as text: TensorRT 10 packs major*10000 + minor*100 + patch,
    TensorRT 8 major*1000 + minor*100 + patch."""
    if code >= 100000:
        return f"{code // 10000}.{code // 100 % 100}.{code % 100}"
    return f"{code // 1000}.{code // 100 % 10}.{code % 100}"


def gpu_name(device_id: int, lib: str = NVML_LIB) -> str | None:
    """The GPU's model name from NVML (e.g. "NVIDIA H100 80GB HBM3"), or None without one."""
    try:
        nvml = ctypes.CDLL(lib)
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        handle = ctypes.c_void_p()
        if nvml.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(device_id), ctypes.byref(handle)):
            return None
        buf = ctypes.create_string_buffer(96)
        if nvml.nvmlDeviceGetName(handle, buf, ctypes.c_uint(len(buf))):
            return None
        return buf.value.decode(errors="replace")
    finally:
        nvml.nvmlShutdown()


@functools.cache
def detect(device_id: int) -> TensorrtTarget | None:
    """The TensorRT target of this process's GPU, or None (and why, logged once) when the
    TensorRT provider cannot work here."""
    version = tensorrt_version()
    if version is None:
        log.warning(
            "TensorRT requested but libnvinfer is not installed (tried %s): using the next "
            "execution provider (the consumer image carries TensorRT only when built with "
            "--build-arg TENSORRT=1)",
            ", ".join(NVINFER_LIBS),
        )
        return None
    gpu = gpu_name(device_id)
    if gpu is None:
        log.warning(
            "TensorRT %s is installed but NVML names no GPU %d: not using it", version, device_id
        )
        return None
    return TensorrtTarget(gpu, version)


def slug(text: str) -> str:
    """A directory name for a GPU model: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


@functools.cache
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def model_sha256(path: Path) -> str:
    """The model file's sha256 (once per file version per process)."""
    st = path.stat()
    return _file_sha256(path.resolve(), st.st_size, st.st_mtime_ns)


def cache_dirs(
    root: Path, target: TensorrtTarget, model_hash: str, fp16: bool
) -> tuple[Path, Path]:
    """(engine cache dir of this model, timing cache dir) for a target (see the module doc)."""
    base = root / slug(target.gpu) / f"trt-{target.version}"
    engines = base / (model_hash[:16] + ("-fp16" if fp16 else ""))
    return engines, base / "timing"


def provider_options(
    *,
    device_id: int,
    engines: Path,
    timing: Path,
    fp16: bool,
    workspace_bytes: int | None,
) -> dict[str, Any]:
    """The TensorRT execution provider's options (onnxruntime's names) for one model."""
    opts: dict[str, Any] = {
        "device_id": device_id,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(engines),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(timing),
        "trt_fp16_enable": fp16,
    }
    if workspace_bytes:
        opts["trt_max_workspace_size"] = workspace_bytes
    return opts


def writable_dir(path: Path) -> bool:
    """Make the directory; False when the volume is read-only or not ours (engines are then
    built in memory by every pod, which works, only slower to start)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError as exc:
        log.warning("TensorRT cache %s is not writable (%s): engines are not cached", path, exc)
        return False
