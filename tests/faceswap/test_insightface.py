"""The insightface backend on the tiny stand-in models (models.tiny): our ONNX pipeline equals
insightface's own classes on the same files, and the swap touches only the faces."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from facefleet.consumer.errors import PermanentJobError
from facefleet.consumer.processors.faceswap import FaceSwapProcessor
from facefleet.consumer.processors.faceswap.backend import InsightfaceBackend
from facefleet.consumer.processors.faceswap.geometry import crop_corners_in_frame
from facefleet.consumer.processors.faceswap.paste import paste_swapped
from facefleet.consumer.processors.faceswap.sessions import ModelMissingError, provider_config
from facefleet.settings import WorkerSettings
from tests.faceswap.conftest import ASTRONAUT, T1, MakeContext


def _backend(proc: FaceSwapProcessor) -> InsightfaceBackend:
    backend = proc.backend()
    assert isinstance(backend, InsightfaceBackend)
    return backend


@pytest.fixture(scope="module")
def reference(tiny_models: tuple[Path, Path]):  # type: ignore[no-untyped-def]
    """insightface's own classes, routed by model_zoo.get_model from the same files."""
    from insightface.model_zoo import get_model

    model_dir, _ = tiny_models
    cpu = ["CPUExecutionProvider"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = get_model(str(model_dir / "det_10g.onnx"), providers=cpu)
        rec = get_model(str(model_dir / "w600k_r50.onnx"), providers=cpu)
        swap = get_model(str(model_dir / "inswapper_128.onnx"), providers=cpu)
    det.prepare(-1, input_size=(640, 640))
    return det, rec, swap


def test_insightface_routes_the_tiny_files(reference) -> None:  # type: ignore[no-untyped-def]
    det, rec, swap = reference
    assert [type(m).__name__ for m in (det, rec, swap)] == ["SCRFD", "ArcFaceONNX", "INSwapper"]


@pytest.mark.parametrize(
    "image", [pytest.param(T1, id="t1"), pytest.param(ASTRONAUT, id="astronaut")]
)
def test_pipeline_equals_insightface(
    insight_processor: FaceSwapProcessor,
    reference,
    image: Path,  # type: ignore[no-untyped-def]
) -> None:
    from insightface.app.common import Face as IFace

    det, rec, swap = reference
    backend = _backend(insight_processor)
    img = cv2.imread(str(image))
    src = cv2.imread(str(ASTRONAUT))
    # detection: same boxes and keypoints, also when batched with another frame
    boxes, kpss = det.detect(img, input_size=(640, 640))
    ours = backend.detect([img, src])[0]
    assert len(ours) == len(boxes) > 0
    np.testing.assert_array_equal(np.array([f.bbox for f in ours]), boxes[:, :4])
    np.testing.assert_array_equal(np.array([f.kps for f in ours]), kpss)
    # identity and swap + paste-back
    sb, sk = det.detect(src, input_size=(640, 640))
    their_src = IFace(bbox=sb[0, :4], kps=sk[0], det_score=sb[0, 4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # skimage 0.26 `estimate` deprecation
        rec.get(src, their_src)
        expected = swap.get(img, IFace(bbox=boxes[0, :4], kps=kpss[0]), their_src, paste_back=True)
    our_src = backend.detect([src])[0][0]
    latent = backend.prepare_source(src, our_src)
    assert our_src.embedding is not None
    np.testing.assert_allclose(our_src.embedding, their_src.normed_embedding, atol=1e-6)
    got = img.copy()
    patch = backend.swap([(got, ours[0])], latent)[0]
    assert backend.paste_back(got, patch)
    assert not np.array_equal(got, img)
    np.testing.assert_array_equal(got, expected)


def test_swap_confined_to_faces(
    insight_processor: FaceSwapProcessor, make_ctx: MakeContext
) -> None:
    ctx = make_ctx(ASTRONAUT, ASTRONAUT, face_selector="many", output_format="png")
    out = insight_processor.run(ctx)
    before = cv2.imread(str(ASTRONAUT))
    after = cv2.imread(str(ctx.output_dir / out.result_file))
    backend = _backend(insight_processor)
    faces = backend.detect([before])[0]
    assert out.details["faces_swapped"] == len(faces) >= 1
    near = np.zeros(before.shape[:2], bool)
    for face in faces:
        m = backend.swapper.swap([(before, face)], np.ones((1, 512), np.float32))[0].matrix
        corners = crop_corners_in_frame(m, 128)
        x1, y1 = np.floor(corners.min(axis=0)).astype(int)
        x2, y2 = np.ceil(corners.max(axis=0)).astype(int)
        # the crop's footprint, plus the 2 px a bilinear warp of its edge can bleed
        near[max(0, y1 - 2) : y2 + 3, max(0, x1 - 2) : x2 + 3] = True
        # the face centre changed
        cx, cy = ((face.bbox[:2] + face.bbox[2:]) / 2).astype(int)
        assert np.abs(after[cy, cx].astype(int) - before[cy, cx].astype(int)).max() > 5
    assert near.mean() < 0.9
    np.testing.assert_array_equal(after[~near], before[~near])


@pytest.mark.parametrize(
    ("blend", "changes"),
    [pytest.param(0, False, id="blend-0-is-no-enhance"), pytest.param(100, True, id="blend-100")],
)
def test_enhance_blend(
    insight_processor: FaceSwapProcessor, make_ctx: MakeContext, blend: int, changes: bool
) -> None:
    plain = make_ctx(ASTRONAUT, ASTRONAUT, output_format="png")
    enhanced = make_ctx(
        ASTRONAUT, ASTRONAUT, output_format="png", enhance=True, enhance_blend=blend
    )
    a = insight_processor.run(plain)
    b = insight_processor.run(enhanced)
    img_a = cv2.imread(str(plain.output_dir / a.result_file))
    img_b = cv2.imread(str(enhanced.output_dir / b.result_file))
    assert (not np.array_equal(img_a, img_b)) == changes
    assert b.details["enhanced"] is True


def test_reference_selects_by_distance(
    insight_processor: FaceSwapProcessor, make_ctx: MakeContext
) -> None:
    many = insight_processor.run(make_ctx(ASTRONAUT, T1, face_selector="many"))
    tight = insight_processor.run(
        make_ctx(
            ASTRONAUT,
            T1,
            face_selector="reference",
            reference_face_index=0,
            reference_distance=1e-6,
        )
    )
    loose = insight_processor.run(
        make_ctx(ASTRONAUT, T1, face_selector="reference", reference_distance=1.0)
    )
    assert tight.details["faces_swapped"] == 1  # only the reference itself (distance 0)
    assert loose.details["faces_swapped"] == many.details["faces_swapped"] > 1


def test_reference_index_out_of_range(
    insight_processor: FaceSwapProcessor, make_ctx: MakeContext
) -> None:
    with pytest.raises(PermanentJobError) as info:
        insight_processor.run(
            make_ctx(ASTRONAUT, ASTRONAUT, face_selector="reference", reference_face_index=99)
        )
    assert info.value.code == "invalid_option"


def test_missing_model_names_file_and_entry(tiny_models: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, catalog = tiny_models
    partial = tmp_path / "models"
    shutil.copytree(model_dir, partial)
    (partial / "inswapper_128.onnx").unlink()
    settings = WorkerSettings(backend="insightface", model_dir=partial)
    with pytest.raises(ModelMissingError) as info:
        FaceSwapProcessor(settings, catalog_path=catalog)
    assert info.value.code == "model_missing"
    assert "inswapper_128.onnx" in info.value.message
    assert "catalogue entry inswapper_128" in info.value.message


def test_paste_outside_frame_is_skipped() -> None:
    frame = np.zeros((50, 50, 3), np.uint8)
    far_away = np.array([[1.0, 0.0, 500.0], [0.0, 1.0, 500.0]])  # crop taken from x, y < -370
    assert not paste_swapped(frame, np.full((128, 128, 3), 255, np.uint8), far_away)
    assert not frame.any()


def test_provider_options_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    settings = WorkerSettings(
        execution_providers="tensorrt,cuda", device_id=1, gpu_mem_limit_mb=512
    )
    providers, options = provider_config(settings)
    assert providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert options[0] == {"device_id": 1, "gpu_mem_limit": 512 * 1024 * 1024}


def test_hot_path_never_imports_torch(tiny_models: tuple[Path, Path]) -> None:
    """Build, warm up and run a swap in a fresh interpreter; torch must not be loaded."""
    import subprocess
    import sys

    model_dir, catalog = tiny_models
    code = f"""
import sys, cv2
from pathlib import Path
from facefleet.consumer.processors.faceswap import FaceSwapProcessor
from facefleet.settings import WorkerSettings
s = WorkerSettings(backend="insightface", model_dir=Path({str(model_dir)!r}),
                   execution_providers="cpu")
p = FaceSwapProcessor(s, catalog_path=Path({str(catalog)!r}))
p.warm_up()
img = cv2.imread({str(ASTRONAUT)!r})
b = p.backend()
face = b.detect([img])[0][0]
b.paste_back(img, b.swap([(img, face)], b.prepare_source(img, face))[0])
print("torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
