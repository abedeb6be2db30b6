"""`faceswap`: put the source image's face on the target image's or video's faces.

Backends (per worker: `facefleet worker --processor faceswap --backend ...`, FACEFLEET_BACKEND):

- `insightface` (production): SCRFD det_10g, ArcFace w600k_r50, INSwapper inswapper_128 and
  GFPGAN gfpgan_1.4 on onnxruntime, models from FACEFLEET_MODEL_DIR (never downloaded here),
  one session per model per process, warm-up inference before the worker reports ready.
- `classic` (no weights): Haar cascades + Poisson blending; demo/CI quality (see classic.py).
- `emulated` (no weights, measurement only): the real decode, crops, paste-back and encode
  around model calls that hold an emulated device for FACEFLEET_EMULATED_MODEL_MS (emulated.py),
  so the GPU duty cycle of the worker's pipeline can be measured without a GPU.

The processor owns the device its model calls take (`self.device`, consumer/device.py): one
inference lane per GPU slot (FACEFLEET_CONCURRENCY) for insightface, one exclusive lane for the
emulated device, none for classic (CPU only). The worker exports how long it was held.

Job options (all optional; unknown names fail with invalid_option):

    face_selector         one (largest target face, default) | many (all) | reference
    reference_face_index  int >= 0, default 0: with `reference`, the reference is this face
                          (largest first) of the target image, or of `reference_frame`
    reference_frame       int >= 0, default 0: video frame holding the reference face
    reference_distance    0..1, default 0.3: swap target faces whose identity distance
                          ((1 - cosine) / 2) to the reference is below this
    enhance               bool, default false: GFPGAN 1.4 after the swap (insightface only;
                          the classic backend ignores it and says so in the result details)
    enhance_blend         0..100, default 80: percent of the enhanced face in the result
    output_format         jpg | png | webp for an image target (default: the target's own
                          format, else jpg); mp4 for a video target (the default)
    quality               1..100, default 90: JPEG/WebP quality, or x264 CRF 12..51 for video

Progress: an image job reports each named step; a video job reports decode/detect/select (the
source), then the per-frame stages decode, detect, select, swap, paste_back, enhance, encode,
each with its own frames_done, frames_total and an ETA (pipeline.VideoProgress).

Failures are PermanentJobError codes: invalid_option, corrupt_media, unsupported_media,
too_large, no_face_in_source, no_face_in_target (media.py lists which input gives which);
model_missing is transient (ModelMissingError). Images and videos are told apart by content.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facefleet.consumer.device import Device
from facefleet.consumer.errors import PermanentJobError
from facefleet.consumer.processors.base import JobContext, ProcessorOutput, Step, run_steps
from facefleet.consumer.processors.faceswap import media, pipeline
from facefleet.consumer.processors.faceswap.backend import MODEL_NAMES, Backend, InsightfaceBackend
from facefleet.consumer.processors.faceswap.options import FaceSwapOptions, parse_options
from facefleet.consumer.processors.faceswap.selector import by_size, select_faces
from facefleet.consumer.processors.faceswap.sessions import resolve_model_files
from facefleet.settings import WorkerSettings

__all__ = ["FaceSwapProcessor", "create"]


@dataclass
class _ImageJob:
    """State the image steps hand each other."""

    source: Any = None
    target: Any = None
    source_face: Any = None
    target_faces: list[Any] = field(default_factory=list)
    target_items: list[Any] = field(default_factory=list)
    patches: list[Any] = field(default_factory=list)
    work: pipeline.FrameWork | None = None
    pasted: int = 0


class FaceSwapProcessor:
    """Built once per worker process; `run()` may be called from several threads at once."""

    name = "faceswap"

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        backend: str | None = None,
        catalog_path: Path | None = None,
        batch_size: int = pipeline.DEFAULT_BATCH_SIZE,
    ) -> None:
        self.settings = settings
        self.backend_name = backend or settings.backend
        if self.backend_name not in ("insightface", "classic", "emulated"):
            raise ValueError(f"unknown faceswap backend {self.backend_name!r}")
        self.device: Device | None = None
        """The lanes model calls take (None: the classic backend runs on the CPU only)."""
        if self.backend_name == "insightface":
            self.device = Device(settings.concurrency * settings.instances)
        elif self.backend_name == "emulated":
            try:
                self.device = Device(1, shared_lock=settings.emulated_device_lock)
            except OSError as exc:
                raise ValueError(
                    f"FACEFLEET_EMULATED_DEVICE_LOCK={settings.emulated_device_lock}: cannot "
                    f"open the shared device's lock file ({exc.strerror})"
                ) from exc
        self.catalog_path = catalog_path
        self.batch_size = batch_size
        self.limits = media.MediaLimits.from_settings(settings)
        self._backend: Backend | None = None
        self._lock = threading.Lock()
        if self.backend_name == "insightface":
            # Fail at start-up, naming the file and the catalogue entry, not at the first job.
            resolve_model_files(settings.model_dir, MODEL_NAMES, catalog_path)

    def _load(self) -> Backend:
        if self.backend_name == "insightface":
            assert self.device is not None
            return InsightfaceBackend.load(self.settings, self.catalog_path, self.device)
        if self.backend_name == "emulated":
            from facefleet.consumer.processors.faceswap.emulated import EmulatedBackend

            assert self.device is not None
            return EmulatedBackend(self.device, self.settings.emulated_times())
        from facefleet.consumer.processors.faceswap.classic import ClassicBackend

        return ClassicBackend()

    def warm_up(self) -> None:
        """Open the sessions and run each model once (idempotent)."""
        self.backend()

    def backend(self) -> Backend:
        with self._lock:
            if self._backend is None:
                backend = self._load()
                backend.warm_up()
                self._backend = backend
            return self._backend

    # --- run ----------------------------------------------------------------------------------

    def run(self, ctx: JobContext) -> ProcessorOutput:
        options = parse_options(ctx.job.options)
        backend = self.backend()
        source_info = media.probe(ctx.source_path, self.limits, "source")
        target_info = media.probe(ctx.target_path, self.limits, "target")
        fmt = options.resolved_format(target_info.kind == "video", target_info.format)
        result = f"result.{fmt}"
        details: dict[str, object] = {
            "backend": backend.name,
            "quality_note": backend.quality_note,
            "target_kind": target_info.kind,
            "face_selector": options.face_selector,
            "enhanced": bool(options.enhance and backend.supports_enhance),
        }
        if options.enhance and not backend.supports_enhance:
            details["enhance_skipped"] = f"the {backend.name} backend has no enhancer"
        if target_info.kind == "image":
            timings = self._run_image(
                ctx,
                backend,
                options,
                source_info,
                target_info,
                ctx.output_dir / result,
                fmt,
                details,
            )
        else:
            timings = self._run_video(
                ctx, backend, options, source_info, target_info, ctx.output_dir / result, details
            )
        return ProcessorOutput(result_file=result, timings_s=timings, details=details)

    def _run_image(
        self,
        ctx: JobContext,
        backend: Backend,
        options: FaceSwapOptions,
        source_info: media.MediaInfo,
        target_info: media.MediaInfo,
        out: Path,
        fmt: str,
        details: dict[str, object],
    ) -> dict[str, float]:
        job = _ImageJob()

        def decode() -> None:
            job.source = media.read_image(ctx.source_path, source_info, "source")
            job.target = media.read_image(ctx.target_path, target_info, "target")

        def detect() -> None:
            job.source_face = pipeline.pick_source_face(backend, job.source)
            job.target_faces = by_size(backend.detect([job.target])[0])
            if not job.target_faces:
                raise PermanentJobError("no_face_in_target", "target: no face detected")

        def select() -> None:
            reference = None
            faces = job.target_faces
            if options.face_selector == "reference":
                if options.reference_face_index >= len(faces):
                    raise PermanentJobError(
                        "invalid_option",
                        f"reference_face_index {options.reference_face_index} but the target "
                        f"has {len(faces)} face(s)",
                    )
                backend.embed([(job.target, f) for f in faces])
                reference = faces[options.reference_face_index].embedding
            job.work = pipeline.FrameWork(
                backend, options, backend.prepare_source(job.source, job.source_face), reference
            )
            chosen = select_faces(
                faces, options.face_selector, reference, options.reference_distance
            )
            if not chosen:
                raise PermanentJobError("no_face_in_target", _no_target_face(options))
            job.target_items = [(job.target, f) for f in chosen]

        def swap() -> None:
            assert job.work is not None
            job.patches = list(backend.swap(job.target_items, job.work.source))

        def paste_back() -> None:
            job.pasted = sum(
                backend.paste_back(frame, patch)
                for (frame, _), patch in zip(job.target_items, job.patches, strict=True)
            )
            if job.pasted == 0:
                raise PermanentJobError(
                    "no_face_in_target", "target: faces were found but none could be swapped"
                )

        def enhance() -> None:
            if options.enhance and backend.supports_enhance:
                backend.enhance(job.target_items, options.enhance_blend)

        def encode() -> None:
            media.write_image(job.target, out, fmt, options.quality)

        steps = [
            Step("decode", 1, decode),
            Step("detect", 2, detect),
            Step("select", 1, select),
            Step("swap", 2, swap),
            Step("paste_back", 1, paste_back),
            Step("enhance", 2 if options.enhance else 0.1, enhance),
            Step("encode", 1, encode),
        ]
        timings = run_steps(ctx, steps)
        details["faces_swapped"] = job.pasted
        return timings

    def _run_video(
        self,
        ctx: JobContext,
        backend: Backend,
        options: FaceSwapOptions,
        source_info: media.MediaInfo,
        target_info: media.MediaInfo,
        out: Path,
        details: dict[str, object],
    ) -> dict[str, float]:
        state: dict[str, Any] = {}

        def decode() -> None:
            state["source"] = media.read_image(ctx.source_path, source_info, "source")
            if options.face_selector == "reference":
                state["reference_frame"] = pipeline.nth_frame(
                    ctx.target_path, self.limits, options.reference_frame
                )

        def detect() -> None:
            state["source_face"] = pipeline.pick_source_face(backend, state["source"])

        def select() -> None:
            reference = None
            if options.face_selector == "reference":
                reference = pipeline.reference_embedding(
                    backend, state["reference_frame"], options.reference_face_index
                )
            state["work"] = pipeline.FrameWork(
                backend,
                options,
                backend.prepare_source(state["source"], state["source_face"]),
                reference,
            )

        def video() -> None:
            base, weight = fractions["video"]
            enhancing = bool(options.enhance and backend.supports_enhance)
            interval = self.settings.progress_interval_s
            last = [float("-inf")]

            def report(p: pipeline.VideoProgress) -> None:
                # One event per per-frame stage, at most once per progress interval: each is a
                # stage change, which the worker's own rate limit always lets through.
                now = time.monotonic()
                if not p.final and now - last[0] < interval:
                    return
                last[0] = now
                for stage, done in p.stages(enhancing):
                    ctx.progress(
                        base + weight * p.work_fraction,
                        stage,
                        eta_s=p.eta_s,
                        frames_done=done,
                        frames_total=p.frames_total,
                    )

            result = pipeline.run_video(
                state["work"],
                ctx.target_path,
                target_info,
                self.limits,
                out,
                ctx,
                report,
                self.batch_size,
            )
            if result.faces == 0:
                out.unlink(missing_ok=True)
                raise PermanentJobError("no_face_in_target", _no_target_face(options, video=True))
            details.update(
                frames=result.frames,
                frames_with_faces=result.frames_with_faces,
                faces_swapped=result.faces,
                fps=float(target_info.fps),
                audio=target_info.has_audio,
            )

        steps = [
            Step("decode", 1, decode),
            Step("detect", 1, detect),
            Step("select", 1, select),
            Step("video", 97, video),
        ]
        fractions = pipeline.step_fractions(steps)
        started = time.perf_counter()
        timings = run_steps(ctx, steps)
        clock: pipeline.StageClock = state["work"].clock
        timings.update({f"video.{k}": round(v, 4) for k, v in clock.totals.items()})
        timings["total"] = round(time.perf_counter() - started, 4)
        return timings


def _no_target_face(options: FaceSwapOptions, video: bool = False) -> str:
    where = "no frame of the target" if video else "the target"
    if options.face_selector == "reference":
        return (
            f"{where} has a face within reference_distance {options.reference_distance} of the "
            "reference face"
        )
    return f"no face detected in {where}" if not video else f"{where} has a detectable face"


def create(settings: WorkerSettings) -> FaceSwapProcessor:
    """The registry's entry point: backend from settings.backend (FACEFLEET_BACKEND), model
    catalogue from settings.model_catalog (FACEFLEET_MODEL_CATALOG; default: the packaged one)."""
    return FaceSwapProcessor(settings, catalog_path=settings.model_catalog)
