"""The face pipeline through the spine: real broker, real worker processes, real photos.

- classic backend on insightface's sample photos (what `make demo` does);
- insightface backend on tiny models that went through the init container's path first
  (`facefleet models pull` from a loopback HTTP mirror into the model volume);
- a bad-input corpus (broken, unsupported, too large, faceless target or source), each ending in
  its error code while the worker keeps serving good jobs.
"""

from __future__ import annotations

import functools
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from facefleet.models.tiny import write_tiny_models
from facefleet.producer.sdk import JobClient
from facefleet.settings import ProducerSettings
from facefleet.wire import JobEvent
from tests.conftest import Env

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

IMAGES = Path(cv2.__file__).parent.parent / "insightface" / "data" / "images"


def wait_terminal(env: Env, job_id: str, timeout_s: float = 120) -> list[JobEvent]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = env.events(job_id)
        if events and events[-1].terminal:
            return events
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end")


@pytest.fixture
def client(env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[JobClient]:
    env.settings_env(monkeypatch)
    c = JobClient(ProducerSettings.load())
    c.apply_topology()
    yield c
    c.close()


def test_classic_backend_swaps_faces_on_a_real_photo(env: Env, client: JobClient) -> None:
    # Interval 0: every stage is an event (by default a job this short reports none).
    env.start_worker(
        processor="faceswap", FACEFLEET_BACKEND="classic", FACEFLEET_PROGRESS_INTERVAL_S="0"
    )
    target = IMAGES / "t1.jpg"
    job = client.submit(
        env.tier,
        str(IMAGES / "Tom_Hanks_54745.png"),
        str(target),
        options={"face_selector": "many", "output_format": "png"},
    ).job_id
    events = wait_terminal(env, job)
    assert events[-1].type == "completed", events[-1]
    assert events[-1].payload.result_uri is not None
    assert events[-1].payload.result_uri.endswith(".png")
    stages = [e.payload.stage for e in events if e.type == "progress"]
    for stage in ("decode", "detect", "swap", "encode"):
        assert any(stage in (s or "") for s in stages), stages
    result = cv2.imread(events[-1].payload.result_uri.removeprefix("file://"))
    original = cv2.imread(str(target))
    assert result.shape == original.shape
    changed = np.abs(result.astype(int) - original.astype(int)).max(axis=2) > 10
    assert changed.mean() > 0.002  # faces changed...
    assert changed.mean() < 0.25  # ...and not the whole picture
    assert not changed[:, :60].any() and not changed[-60:, :].any()  # far from faces: untouched


@pytest.fixture
def model_dir(tmp_path: Path, env: Env) -> Path:
    """Tiny models served over loopback HTTP and pulled the way the init container does."""
    mirror = tmp_path / "mirror"
    catalog = write_tiny_models(mirror)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(mirror))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    dest = tmp_path / "models"
    try:
        base = f"http://127.0.0.1:{server.server_port}/"
        pull = env.cli(
            "models",
            "pull",
            "--catalog",
            str(catalog),
            "--dest",
            str(dest),
            "--base-url",
            base,
            timeout_s=120,
        )
    finally:
        server.shutdown()
    assert pull.returncode == 0, pull.stderr
    return dest


def test_insightface_backend_on_tiny_models_after_a_preload(
    env: Env, client: JobClient, model_dir: Path
) -> None:
    worker = env.start_worker(
        processor="faceswap",
        FACEFLEET_BACKEND="insightface",
        FACEFLEET_MODEL_DIR=str(model_dir),
        FACEFLEET_EXECUTION_PROVIDERS="cpu",
        FACEFLEET_MODEL_CATALOG=str(model_dir.parent / "mirror" / "catalog.yaml"),
    )
    # The tiny detector finds warm blobs (models/tiny.py); astronaut.png gives it some.
    import skimage

    source = Path(skimage.__file__).parent / "data" / "astronaut.png"
    job = client.submit(
        env.tier,
        str(source),
        str(IMAGES / "t1.jpg"),
        options={"enhance": True, "enhance_blend": 50},
    ).job_id
    events = wait_terminal(env, job)
    assert events[-1].type == "completed", events[-1]
    assert worker.proc.poll() is None


def test_worker_refuses_to_start_without_its_models(env: Env, tmp_path: Path) -> None:
    proc = env.cli(
        "worker",
        "--processor",
        "faceswap",
        "--backend",
        "insightface",
        FACEFLEET_MODEL_DIR=str(tmp_path / "empty"),
        FACEFLEET_HEALTH_PORT="0",
    )
    assert proc.returncode == 2
    assert "det_10g.onnx" in proc.stderr and "facefleet models pull" in proc.stderr


def _tiny_flv(path: Path) -> bytes:
    """A real (decodable) three-frame FLV: a container the default limits do not accept."""
    from fractions import Fraction

    import av

    with av.open(str(path), mode="w", format="flv") as out:
        stream = out.add_stream("flv", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 120, np.uint8), "bgr24")
            frame.pts, frame.time_base = i, Fraction(1, 5)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path.read_bytes()


def _corpus(root: Path) -> dict[str, tuple[Path, Path, str]]:
    """name -> (source, target, expected code); the good photo fills the role not under test."""
    jpeg = (IMAGES / "t1.jpg").read_bytes()
    grey = cv2.imencode(".png", np.full((200, 200, 3), 120, np.uint8))[1].tobytes()
    bad_targets = {
        "zero-byte": (b"", "corrupt_media"),
        "truncated-jpeg": (jpeg[: len(jpeg) // 2], "corrupt_media"),
        "not-an-image": (b"hello, this is text\n" * 50, "unsupported_media"),
        "png-declaring-huge-size": (
            b"\x89PNG\r\n\x1a\n"
            + b"\x00\x00\x00\rIHDR"
            + (100_000).to_bytes(4, "big") * 2
            + b"\x08\x02\x00\x00\x00"
            + b"\x00" * 4,
            "too_large",
        ),
        "unsupported-container-flv": (_tiny_flv(root / "tiny.flv"), "unsupported_media"),
        "no-face": (grey, "no_face_in_target"),
    }
    source = IMAGES / "Tom_Hanks_54745.png"
    out = {}
    for name, (data, code) in bad_targets.items():
        path = root / f"{name}.bin"
        path.write_bytes(data)
        out[name] = (source, path, code)
    faceless = root / "no-face-source.bin"
    faceless.write_bytes(grey)
    out["no-face-in-source"] = (faceless, IMAGES / "t1.jpg", "no_face_in_source")
    return out


def test_bad_inputs_fail_with_their_codes_and_the_worker_goes_on(
    env: Env, client: JobClient
) -> None:
    worker = env.start_worker(processor="faceswap", FACEFLEET_BACKEND="classic")
    jobs = {
        name: (client.submit(env.tier, str(source), str(target)).job_id, code)
        for name, (source, target, code) in _corpus(env.data_root).items()
    }
    # The FLV is refused by the allowed-formats limit, not as unrecognised bytes.
    says = {"unsupported-container-flv": "flv video", "no-face-in-source": "source"}
    for name, (job, code) in jobs.items():
        last = wait_terminal(env, job)[-1]
        assert (last.type, last.payload.code) == ("failed", code), (name, last)
        assert last.payload.message and says.get(name, "") in last.payload.message, last
    good = client.submit(env.tier, str(IMAGES / "Tom_Hanks_54745.png"), str(IMAGES / "t1.jpg"))
    assert wait_terminal(env, good.job_id)[-1].type == "completed"
    assert worker.proc.poll() is None


def test_a_producer_with_no_data_root_submits_a_photo_and_a_video_and_gets_the_results(
    make_env: Callable[..., Env], s3_media_url: str, tmp_path: Path
) -> None:
    """The producer needs only the broker and the media store (s3://, moto_server): its
    FACEFLEET_DATA_ROOT points nowhere, and nothing is ever created there. `facefleet submit`
    uploads the local files, queues the job and follows it to the end; the results are read back
    from the store. The worker keeps its job state in its own data root."""
    from tests.faceswap.conftest import pan_frames, write_video

    env = make_env(media_url=s3_media_url)
    env.start_worker(processor="faceswap", FACEFLEET_BACKEND="classic")
    nowhere = tmp_path / "no-data-root-here"
    video = write_video(
        tmp_path / "clip.mp4", pan_frames(cv2.imread(str(IMAGES / "t1.jpg")), 8), fps=8
    )
    source = str(IMAGES / "Tom_Hanks_54745.png")
    results = []
    for target in (str(IMAGES / "t1.jpg"), str(video)):
        proc = env.cli(
            *env.submit_args(source, target),
            "--wait",
            "--json",
            timeout_s=240,
            FACEFLEET_DATA_ROOT=str(nowhere),
        )
        assert proc.returncode == 0, proc.stderr
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        assert lines[-1]["type"] == "completed", lines[-1]
        results.append(lines[-1]["payload"]["result_uri"])
    assert not nowhere.exists()
    photo_uri, video_uri = results
    assert photo_uri.startswith(s3_media_url + "/") and video_uri.startswith(s3_media_url + "/")
    photo = cv2.imdecode(np.frombuffer(env.read(photo_uri), np.uint8), cv2.IMREAD_COLOR)
    assert photo.shape == cv2.imread(str(IMAGES / "t1.jpg")).shape
    clip = tmp_path / "result.mp4"
    clip.write_bytes(env.read(video_uri))
    import av

    with av.open(str(clip)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 8
