"""TensorRT options without a GPU: feature detection drops the provider where libnvinfer does
not load, and the caches are keyed by GPU model, TensorRT version, model hash and FP16."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

from facefleet.consumer.processors.faceswap import tensorrt as trt
from facefleet.consumer.processors.faceswap.sessions import provider_config
from facefleet.consumer.processors.faceswap.tensorrt import TensorrtTarget
from facefleet.settings import WorkerSettings

GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
H100 = TensorrtTarget("NVIDIA H100 80GB HBM3", "10.9.0")


@pytest.fixture
def gpu_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu's provider list (it names TensorRT whether or not TensorRT is there)."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: GPU)


def model(tmp_path: Path, content: bytes = b"onnx bytes", name: str = "m.onnx") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_tensorrt_is_left_out_where_it_cannot_load(gpu_build: None, tmp_path: Path) -> None:
    providers, _ = provider_config(WorkerSettings(), model(tmp_path), tensorrt=lambda _id: None)
    assert providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_this_machine_has_no_tensorrt() -> None:
    """The real detection here (no libnvinfer, no NVML): TensorRT is not offered."""
    trt.detect.cache_clear()
    assert trt.tensorrt_version() is None
    assert trt.detect(0) is None


def test_tensorrt_options_with_caches_on_the_model_volume(gpu_build: None, tmp_path: Path) -> None:
    settings = WorkerSettings(model_dir=tmp_path, device_id=1, gpu_mem_limit_mb=512, trt_fp16=True)
    path = model(tmp_path)
    providers, options = provider_config(settings, path, tensorrt=lambda _id: H100)
    assert providers == GPU
    opts = options[0]
    engines = Path(opts["trt_engine_cache_path"])
    timing = Path(opts["trt_timing_cache_path"])
    assert (
        engines.parent == timing.parent == tmp_path / "trt-cache/nvidia-h100-80gb-hbm3/trt-10.9.0"
    )
    assert engines.name == trt.model_sha256(path)[:16] + "-fp16"
    assert engines.is_dir() and timing.is_dir()
    assert opts == {
        "device_id": 1,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(engines),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(timing),
        "trt_fp16_enable": True,
        "trt_max_workspace_size": 512 * 1024 * 1024,
    }
    assert options[1] == {"device_id": 1, "gpu_mem_limit": 512 * 1024 * 1024}


def engine_dir(tmp_path: Path, target: TensorrtTarget, content: bytes, fp16: bool) -> Path:
    settings = WorkerSettings(model_dir=tmp_path, trt_fp16=fp16)
    path = model(tmp_path / "models", content) if (tmp_path / "models").is_dir() else None
    if path is None:
        (tmp_path / "models").mkdir()
        path = model(tmp_path / "models", content)
    _, options = provider_config(settings, path, tensorrt=lambda _id: target)
    return Path(options[0]["trt_engine_cache_path"])


@pytest.mark.parametrize(
    ("target", "content", "fp16"),
    [
        pytest.param(TensorrtTarget("NVIDIA L4", "10.9.0"), b"onnx bytes", False, id="gpu-model"),
        pytest.param(TensorrtTarget(H100.gpu, "10.8.0"), b"onnx bytes", False, id="trt-version"),
        pytest.param(H100, b"other onnx bytes", False, id="model-hash"),
        pytest.param(H100, b"onnx bytes", True, id="fp16"),
    ],
)
def test_each_key_part_gives_its_own_engine_cache(
    gpu_build: None, tmp_path: Path, target: TensorrtTarget, content: bytes, fp16: bool
) -> None:
    base = engine_dir(tmp_path, H100, b"onnx bytes", False)
    assert engine_dir(tmp_path, H100, b"onnx bytes", False) == base  # same key, same dir
    assert engine_dir(tmp_path, target, content, fp16) != base


def test_a_read_only_cache_volume_disables_the_caches(gpu_build: None, tmp_path: Path) -> None:
    blocker = tmp_path / "ro"
    blocker.write_text("a file where the cache directory would go")
    settings = WorkerSettings(model_dir=tmp_path, trt_cache_dir=blocker)
    _, options = provider_config(settings, model(tmp_path), tensorrt=lambda _id: H100)
    assert options[0]["trt_engine_cache_enable"] is False
    assert options[0]["trt_timing_cache_enable"] is False


@pytest.mark.parametrize(
    ("code", "text"),
    [pytest.param(100900, "10.9.0", id="trt10"), pytest.param(8603, "8.6.3", id="trt8")],
)
def test_libnvinfer_version_numbers(code: int, text: str) -> None:
    assert trt.version_text(code) == text


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3", id="h100"),
        pytest.param("NVIDIA GeForce RTX 4090", "nvidia-geforce-rtx-4090", id="rtx"),
        pytest.param("../../etc", "etc", id="no-path-parts"),
        pytest.param("..", "unknown", id="never-dot-dot"),
    ],
)
def test_gpu_names_become_directory_names(name: str, expected: str) -> None:
    assert trt.slug(name) == expected
    assert "/" not in trt.slug(name)
