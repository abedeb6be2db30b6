"""The tiny models: reference §5 signatures, insightface 2.1 routing, and test-useful behaviour."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from insightface.data import get_image
from insightface.model_zoo import get_model
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.inswapper import INSwapper
from insightface.model_zoo.scrfd import SCRFD

from facefleet.models.catalog import Catalog
from facefleet.models.integrity import sha256_file
from facefleet.models.tiny import write_tiny_models

CPU = ["CPUExecutionProvider"]

# shared/reference/facefusion.md §5: (input name, shape) in order, (output name or None, shape).
SIGNATURES = [
    pytest.param(
        "det_10g.onnx",
        [("input.1", [1, 3, 640, 640])],
        [
            ("score_8", [12800, 1]),
            ("score_16", [3200, 1]),
            ("score_32", [800, 1]),
            ("bbox_8", [12800, 4]),
            ("bbox_16", [3200, 4]),
            ("bbox_32", [800, 4]),
            ("kps_8", [12800, 10]),
            ("kps_16", [3200, 10]),
            ("kps_32", [800, 10]),
        ],
        id="det_10g",
    ),
    pytest.param(
        "w600k_r50.onnx",
        [("input.1", ["None", 3, 112, 112])],
        [(None, [1, 512])],
        id="w600k_r50",
    ),
    pytest.param(
        "inswapper_128.onnx",
        [("target", [1, 3, 128, 128]), ("source", [1, 512])],
        [("output", [1, 3, 128, 128])],
        id="inswapper_128",
    ),
    pytest.param(
        "gfpgan_1.4.onnx",
        [("input", [1, 3, 512, 512])],
        [("output", [1, 3, 512, 512])],
        id="gfpgan_1.4",
    ),
]


def _dims(value: Any) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize(("file", "inputs", "outputs"), SIGNATURES)
def test_signature_matches_the_reference(
    tiny_dir: Path,
    file: str,
    inputs: list[tuple[str, list[int | str]]],
    outputs: list[tuple[str | None, list[int | str]]],
) -> None:
    model = onnx.load(str(tiny_dir / file))
    assert (model.opset_import[0].version, model.ir_version) == (13, 8)
    graph = model.graph
    assert [(v.name, _dims(v)) for v in graph.input] == inputs
    got = [(v.name, _dims(v)) for v in graph.output]
    assert len(got) == len(outputs)
    for (name, shape), (want_name, want_shape) in zip(got, outputs, strict=True):
        assert shape == want_shape
        assert want_name is None or name == want_name
    for value in [*graph.input, *graph.output]:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    session = ort.InferenceSession(str(tiny_dir / file), providers=CPU)
    feeds = {
        i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
        for i in session.get_inputs()
    }
    results = session.run(None, feeds)
    assert [list(r.shape) for r in results] == [
        [d if isinstance(d, int) else 1 for d in shape] for _, shape in outputs
    ]


def test_swapper_emap_is_the_last_initializer(tiny_dir: Path) -> None:
    last = onnx.load(str(tiny_dir / "inswapper_128.onnx")).graph.initializer[-1]
    emap = onnx.numpy_helper.to_array(last)
    assert last.name == "emap"
    assert emap.shape == (512, 512) and emap.dtype == np.dtype(np.float32)


def test_recognizer_keeps_the_127_5_normalisation(tiny_dir: Path) -> None:
    """Node names starting Sub/Mul would flip insightface to mean 0 / std 1."""
    model = get_model(str(tiny_dir / "w600k_r50.onnx"), providers=CPU)
    assert (model.input_mean, model.input_std) == (127.5, 127.5)


@pytest.mark.parametrize(
    ("file", "cls"),
    [
        pytest.param("det_10g.onnx", SCRFD, id="det_10g-SCRFD"),
        pytest.param("w600k_r50.onnx", ArcFaceONNX, id="w600k_r50-ArcFaceONNX"),
        pytest.param("inswapper_128.onnx", INSwapper, id="inswapper_128-INSwapper"),
        # Not a hope, a hazard: a square 512 single-input model looks like a recognizer to
        # insightface, so gfpgan_1.4.onnx must never sit in a FaceAnalysis directory.
        pytest.param("gfpgan_1.4.onnx", ArcFaceONNX, id="gfpgan_1.4-misrouted-ArcFaceONNX"),
    ],
)
def test_insightface_routes_like_the_real_files(tiny_dir: Path, file: str, cls: type) -> None:
    assert type(get_model(str(tiny_dir / file), providers=CPU)) is cls


def test_dynamic_detector_routes_and_detects(tmp_path: Path) -> None:
    write_tiny_models(tmp_path, dynamic_detector=True)
    model = onnx.load(str(tmp_path / "det_10g.onnx"))
    assert _dims(model.graph.input[0]) == [1, 3, "?", "?"]
    assert all(_dims(o)[0] == "?" for o in model.graph.output)
    detector = get_model(str(tmp_path / "det_10g.onnx"), providers=CPU)
    assert type(detector) is SCRFD
    detector.prepare(-1, input_size=(640, 640))
    boxes, kps = detector.detect(_disc_image())
    assert boxes.shape == (1, 5) and kps.shape == (1, 5, 2)


def _disc_image(centre: tuple[int, int] = (400, 200), radius: int = 80) -> np.ndarray:
    image = np.full((480, 640, 3), 128, np.uint8)
    cv2.circle(image, centre, radius, (120, 160, 210), -1)  # BGR skin tone
    return image


@pytest.fixture(scope="module")
def detector(tiny_dir: Path) -> Any:
    model = get_model(str(tiny_dir / "det_10g.onnx"), providers=CPU)
    model.prepare(-1)
    return model


@pytest.mark.parametrize(
    "centre",
    [pytest.param((400, 200), id="right-upper"), pytest.param((160, 330), id="left-lower")],
)
def test_detector_finds_one_face_on_a_skin_disc(detector: Any, centre: tuple[int, int]) -> None:
    boxes, kps = detector.detect(_disc_image(centre))

    assert boxes.shape == (1, 5) and kps.shape == (1, 5, 2)
    x1, y1, x2, y2, score = boxes[0]
    assert score > 0.9
    assert abs((x1 + x2) / 2 - centre[0]) <= 32 and abs((y1 + y2) / 2 - centre[1]) <= 32
    assert x1 < kps[0, :, 0].min() and kps[0, :, 0].max() < x2
    assert y1 < kps[0, :, 1].min() and kps[0, :, 1].max() < y2
    left_eye, right_eye, nose, left_mouth, _ = kps[0]
    assert left_eye[0] < nose[0] < right_eye[0] and nose[1] < left_mouth[1]


def test_detector_finds_two_faces_on_two_discs(detector: Any) -> None:
    image = _disc_image((150, 150))
    cv2.circle(image, (480, 330), 80, (120, 160, 210), -1)
    boxes, _ = detector.detect(image)
    assert boxes.shape[0] == 2


@pytest.mark.parametrize(
    "image",
    [
        pytest.param(np.full((480, 640, 3), 128, np.uint8), id="grey"),
        pytest.param(np.zeros((480, 640, 3), np.uint8), id="black"),
        pytest.param(np.full((480, 640, 3), (200, 120, 60), np.uint8), id="blue"),
    ],
)
def test_detector_finds_nothing_without_warm_pixels(detector: Any, image: np.ndarray) -> None:
    boxes, kps = detector.detect(image)
    assert boxes.shape == (0, 5) and kps.shape == (0, 5, 2)


def test_detector_finds_faces_with_keypoints_on_a_real_photo(detector: Any) -> None:
    boxes, kps = detector.detect(get_image("t1"))  # the group photo bundled with insightface
    assert boxes.shape[0] >= 1 and kps.shape[1:] == (5, 2)
    assert (boxes[:, 4] > 0.5).all()


# insightface's face_align still calls scikit-image 0.26's deprecated estimate() (reference §1.6).
@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")
def test_swap_pipeline_changes_the_face_region_only(tiny_dir: Path, detector: Any) -> None:
    from insightface.app.common import Face

    recognizer = get_model(str(tiny_dir / "w600k_r50.onnx"), providers=CPU)
    swapper = get_model(str(tiny_dir / "inswapper_128.onnx"), providers=CPU)
    image = _disc_image()
    boxes, kps = detector.detect(image)
    target = Face(bbox=boxes[0, :4], kps=kps[0], det_score=boxes[0, 4])
    source = Face(bbox=boxes[0, :4], kps=kps[0], det_score=boxes[0, 4])
    recognizer.get(get_image("t1")[:480, :640].copy(), source)  # another "identity"
    assert source.embedding.shape == (512,)

    swapped = swapper.get(image, target, source, paste_back=True)

    x1, y1, x2, y2 = boxes[0, :4].astype(int)
    changed = np.abs(swapped.astype(int) - image.astype(int))
    assert changed[y1:y2, x1:x2].mean() > 5
    assert changed[:40, :40].max() == 0  # far from the face nothing moves


def test_recognizer_is_deterministic_and_image_dependent(tiny_dir: Path) -> None:
    session = ort.InferenceSession(str(tiny_dir / "w600k_r50.onnx"), providers=CPU)
    rng = np.random.default_rng(0)
    a, b = (rng.uniform(-1, 1, (1, 3, 112, 112)).astype(np.float32) for _ in range(2))
    (ea,) = session.run(None, {"input.1": a})
    (ea2,) = session.run(None, {"input.1": a})
    (eb,) = session.run(None, {"input.1": b})
    np.testing.assert_array_equal(ea, ea2)
    assert not np.allclose(ea, eb)


def test_enhancer_output_differs_from_input_and_stays_in_range(tiny_dir: Path) -> None:
    session = ort.InferenceSession(str(tiny_dir / "gfpgan_1.4.onnx"), providers=CPU)
    crop = np.random.default_rng(1).uniform(-1, 1, (1, 3, 512, 512)).astype(np.float32)
    (out,) = session.run(None, {"input": crop})
    assert out.shape == crop.shape
    assert np.abs(out - crop).mean() > 0.05
    assert out.min() >= -1 and out.max() <= 1


def test_tiny_catalogue_uses_the_real_schema_and_matches_the_files(tiny_dir: Path) -> None:
    catalog = Catalog.load(tiny_dir / "catalog.yaml")
    real = Catalog.load()
    assert catalog.names == real.default_names
    for entry in catalog.entries:
        assert entry.file == real.entry(entry.name).file
        assert entry.role == real.entry(entry.name).role
        assert entry.urls == (entry.file,)
        assert entry.bytes == (tiny_dir / entry.file).stat().st_size
        assert entry.sha256 == sha256_file(tiny_dir / entry.file)
    assert catalog.verify_present(tiny_dir, deep=True) == []


def test_generation_is_byte_for_byte_reproducible(tiny_dir: Path, tmp_path: Path) -> None:
    again = Catalog.load(write_tiny_models(tmp_path))
    first = Catalog.load(tiny_dir / "catalog.yaml")
    assert [e.sha256 for e in again.entries] == [e.sha256 for e in first.entries]


@pytest.fixture(scope="module")
def batched_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-batched")
    write_tiny_models(path, batched=True)
    return path


def test_batched_variant_adds_a_batch_axis_to_detector_and_enhancer_only(
    tiny_dir: Path, batched_dir: Path
) -> None:
    det = onnx.load(str(batched_dir / "det_10g.onnx")).graph
    assert _dims(det.input[0]) == ["batch", 3, 640, 640]
    rows = {8: 12800, 16: 3200, 32: 800}
    want = [
        (f"{kind}_{s}", ["batch", rows[s], width])
        for kind, width in (("score", 1), ("bbox", 4), ("kps", 10))
        for s in (8, 16, 32)
    ]
    assert [(o.name, _dims(o)) for o in det.output] == want
    enh = onnx.load(str(batched_dir / "gfpgan_1.4.onnx")).graph
    assert [_dims(v) for v in (*enh.input, *enh.output)] == [["batch", 3, 512, 512]] * 2
    for same in ("w600k_r50.onnx", "inswapper_128.onnx"):
        assert sha256_file(batched_dir / same) == sha256_file(tiny_dir / same)


def test_batched_detector_is_a_rank3_scrfd_with_the_default_detections(
    tiny_dir: Path, batched_dir: Path, detector: Any
) -> None:
    """insightface 2.1 takes it as a batched SCRFD export; per frame it equals the default."""
    model = get_model(str(batched_dir / "det_10g.onnx"), providers=CPU)
    assert type(model) is SCRFD and model.batched
    model.prepare(-1, input_size=(640, 640))
    image = get_image("t1")
    boxes, kps = model.detect(image)
    want_boxes, want_kps = detector.detect(image)
    assert boxes.shape[0] >= 1
    np.testing.assert_array_equal(boxes, want_boxes)
    np.testing.assert_array_equal(kps, want_kps)
    # one call on 3 frames gives each frame's own rows, as 3 calls would
    session = ort.InferenceSession(str(batched_dir / "det_10g.onnx"), providers=CPU)
    blob = np.random.default_rng(2).uniform(-1, 1, (3, 3, 640, 640)).astype(np.float32)
    blob[1, 0] = 0.8  # a warm frame among two noise frames
    together = session.run(None, {"input.1": blob})
    for i in range(3):
        alone = session.run(None, {"input.1": blob[i : i + 1]})
        for a, b in zip(together, alone, strict=True):
            np.testing.assert_array_equal(a[i], b[0])


def test_batched_enhancer_equals_the_default_per_crop(tiny_dir: Path, batched_dir: Path) -> None:
    fixed = ort.InferenceSession(str(tiny_dir / "gfpgan_1.4.onnx"), providers=CPU)
    batched = ort.InferenceSession(str(batched_dir / "gfpgan_1.4.onnx"), providers=CPU)
    crops = np.random.default_rng(3).uniform(-1, 1, (3, 3, 512, 512)).astype(np.float32)
    (together,) = batched.run(None, {"input": crops})
    per_crop = np.concatenate([fixed.run(None, {"input": c[None]})[0] for c in crops])
    np.testing.assert_array_equal(together, per_crop)
