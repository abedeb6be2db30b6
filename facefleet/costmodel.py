"""Per-tier cost model: a job's facts (kind, pixels, frames, faces, enhancer) -> GPU-seconds.

Producers price a job at submit with the defaults (FACEFLEET_COST_MODEL or the built-in ones);
the scaler prices the same facts again with scales re-fitted from completed jobs' measured
timings, so a cluster whose GPUs are twice as fast as the defaults assume is priced right after
a few dozen jobs. The fit is deliberately dull and bounded:

- one multiplicative scale per (tier, kind), the median of measured/default over the last
  `window` completed jobs: one odd job moves a median by at most one rank, never by its size;
- each ratio is clipped to [1/10, 10] and the scale to [min_scale, max_scale] (1/4..4 by
  default), so a burst of failures-as-successes or a mis-measured batch cannot price a tier at
  zero or at infinity;
- fewer than `min_samples` jobs of a kind leave its scale at 1 (the defaults).

The facts and the measurement both live in the job's own log (the `queued` event carries the
estimate, `completed` carries timings_s.total), so the fit is rebuilt from the events stream
after a restart and needs no state of its own.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from statistics import median
from typing import Any

from facefleet.wire import ESTIMATE_VERSION, JobOptionValue, WorkEstimate, WorkKind

RATIO_CLIP = 10.0
"""A single measured/estimated ratio counts as at most 10x (or 1/10x) in the median."""

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class Coefficients:
    """How one tier's hardware turns facts into seconds (the defaults: one 2023 datacenter GPU
    with the faceswap processor; re-fitting corrects the scale, not the shape)."""

    overhead_s: float = 1.0
    """Per job: model warm path, decode of the source face, upload of the result."""
    image_s_per_mp: float = 0.1
    """Per megapixel of an image target (12 MP photo: ~2.2 s with the overhead)."""
    video_s_per_mp_frame: float = 0.16
    """Per megapixel-frame of a video target (1080p, 30 fps, 60 s: ~600 s)."""
    face_factor: float = 0.4
    """Each face beyond the first adds this fraction (face_selector=many)."""
    enhance_factor: float = 1.5
    """Multiplier when the enhancer (GFPGAN) runs."""
    unknown_s: float = 30.0
    """A job whose facts are unknown (an old producer, a URL nobody probed)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"cost model {f.name} must be a finite number >= 0, got {value!r}")


DEFAULT_COEFFICIENTS = Coefficients()


def parse_cost_model(text: str | None) -> dict[str, Coefficients]:
    """FACEFLEET_COST_MODEL: JSON {"default": {...}, "<tier>": {...}} of Coefficients fields;
    a tier's missing fields come from "default", whose missing fields are the built-in ones."""
    if not text:
        return {}
    raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError("must be a JSON object of tier name -> coefficients")
    known = {f.name for f in fields(Coefficients)}
    base = DEFAULT_COEFFICIENTS
    out: dict[str, Coefficients] = {}
    for name in ["default", *sorted(k for k in raw if k != "default")]:
        if name not in raw:
            continue
        entry = raw[name]
        if not isinstance(entry, dict):
            raise ValueError(f"{name}: must be an object")
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"{name}: unknown field(s) {', '.join(sorted(unknown))}")
        coeffs = replace(base if name != "default" else DEFAULT_COEFFICIENTS, **entry)
        if name == "default":
            base = coeffs
        out[name] = coeffs
    out.setdefault("default", base)
    return out


def truthy(value: JobOptionValue) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def default_seconds(facts: WorkEstimate, c: Coefficients) -> float:
    """The shape of the model: overhead + size term, times faces and enhancer."""
    if facts.v != ESTIMATE_VERSION or facts.kind == "unknown" or not facts.pixels:
        return c.unknown_s
    mp = facts.pixels / 1e6
    if facts.kind == "video":
        size = c.video_s_per_mp_frame * mp * max(facts.frames or 1, 1)
    else:
        size = c.image_s_per_mp * mp
    faces = 1.0 + c.face_factor * max((facts.faces or 1) - 1, 0)
    enhance = c.enhance_factor if facts.enhance else 1.0
    return c.overhead_s + size * faces * enhance


def guess_kind(uri: str) -> WorkKind:
    """Kind from a URI's suffix, for inputs the producer cannot open (URLs, store URIs)."""
    path = uri.split("?", 1)[0].lower()
    if path.endswith(VIDEO_SUFFIXES):
        return "video"
    if path.endswith(IMAGE_SUFFIXES):
        return "image"
    return "unknown"


def probe_file(path: Path) -> tuple[WorkKind, int | None, int | None]:
    """(kind, pixels per frame, frames) of a local target, from container headers only (PyAV:
    no frame is decoded). Anything unreadable is ("unknown", None, None): the worker, not the
    producer, reports bad media."""
    try:
        import av

        with av.open(str(path)) as container:
            streams = container.streams.video
            if not streams:
                return "unknown", None, None
            stream = streams[0]
            pixels = int(stream.codec_context.width) * int(stream.codec_context.height)
            if pixels <= 0:
                return "unknown", None, None
            frames = int(stream.frames or 0)
            if not frames and stream.duration and stream.time_base and stream.average_rate:
                seconds = float(stream.duration * stream.time_base)
                frames = round(seconds * float(stream.average_rate))
            if not frames and container.duration and stream.average_rate:
                frames = round(container.duration / 1e6 * float(stream.average_rate))
            kind: WorkKind = "video" if frames > 1 else "image"
            return kind, pixels, max(frames, 1)
    except Exception:
        return "unknown", None, None


@dataclass
class CostModel:
    """Facts -> seconds per tier; `observe` feeds measured timings, `scale` reads the fit."""

    coefficients: Mapping[str, Coefficients] = field(default_factory=dict)
    window: int = 500
    min_samples: int = 20
    min_scale: float = 0.25
    max_scale: float = 4.0
    _ratios: dict[tuple[str, str], deque[float]] = field(default_factory=dict, repr=False)
    _scales: dict[tuple[str, str], float] = field(default_factory=dict, repr=False)

    def coeffs(self, tier: str) -> Coefficients:
        return (
            self.coefficients.get(tier) or self.coefficients.get("default") or DEFAULT_COEFFICIENTS
        )

    def facts(
        self,
        tier: str,
        *,
        kind: WorkKind = "unknown",
        pixels: int | None = None,
        frames: int | None = None,
        faces: int | None = None,
        processor: str | None = None,
        options: Mapping[str, JobOptionValue] | None = None,
    ) -> WorkEstimate:
        """A WorkEstimate priced with this model (what producers put on the wire)."""
        opts = options or {}
        enhance = truthy(opts.get("enhance", False))
        draft = WorkEstimate(
            kind=kind,
            pixels=pixels,
            frames=frames,
            faces=faces,
            processor=processor,
            enhance=enhance,
            gpu_s=0.0,
        )
        return draft.model_copy(update={"gpu_s": round(self.seconds(tier, draft), 3)})

    def seconds(self, tier: str, estimate: WorkEstimate | None) -> float:
        """GPU-seconds of one job on this tier: the default shape times the fitted scale. No
        estimate (an old producer) or a newer estimate version: the tier's unknown_s."""
        c = self.coeffs(tier)
        if estimate is None or estimate.v != ESTIMATE_VERSION:
            return c.unknown_s * self.scale(tier, "unknown")
        if estimate.kind == "unknown" or not estimate.pixels:
            base = estimate.gpu_s if estimate.gpu_s > 0 else c.unknown_s
            return base * self.scale(tier, "unknown")
        return default_seconds(estimate, c) * self.scale(tier, estimate.kind)

    def observe(self, tier: str, estimate: WorkEstimate | None, measured_s: float) -> None:
        """One completed job's measured processing time (timings_s.total)."""
        if not math.isfinite(measured_s) or measured_s <= 0:
            return
        c = self.coeffs(tier)
        kind = "unknown" if estimate is None or not estimate.pixels else estimate.kind
        if estimate is None or estimate.v != ESTIMATE_VERSION:
            base = c.unknown_s
        elif kind == "unknown":
            base = estimate.gpu_s if estimate.gpu_s > 0 else c.unknown_s
        else:
            base = default_seconds(estimate, c)
        if base <= 0:
            return
        ratio = min(max(measured_s / base, 1 / RATIO_CLIP), RATIO_CLIP)
        key = (tier, kind)
        ratios = self._ratios.setdefault(key, deque(maxlen=self.window))
        ratios.append(ratio)
        if len(ratios) >= self.min_samples:
            self._scales[key] = min(max(median(ratios), self.min_scale), self.max_scale)

    def scale(self, tier: str, kind: str) -> float:
        return self._scales.get((tier, kind), 1.0)

    def samples(self) -> Iterable[tuple[str, str, int, float]]:
        """(tier, kind, samples, scale) of every fitted cell, for the metrics."""
        for (tier, kind), ratios in sorted(self._ratios.items()):
            yield tier, kind, len(ratios), self.scale(tier, kind)


def estimate_for(
    model: CostModel,
    tier: str,
    target: str,
    *,
    processor: str | None,
    options: Mapping[str, JobOptionValue] | None,
    local: Path | None = None,
) -> WorkEstimate:
    """The estimate a producer puts on a job: probe the target when it is a local file, else
    guess the kind from its name (pixels unknown: priced as unknown)."""
    if local is None and target.startswith("file:///"):
        from urllib.parse import unquote, urlsplit

        local = Path(unquote(urlsplit(target).path))
    elif local is None and "://" not in target:
        local = Path(target)
    if local is not None and local.is_file():
        kind, pixels, frames = probe_file(local)
    else:
        kind, pixels, frames = guess_kind(target), None, None
    return model.facts(
        tier,
        kind=kind,
        pixels=pixels,
        frames=frames,
        processor=processor,
        options=options,
    )


def to_json(model: CostModel) -> dict[str, Any]:
    """What `facefleet scaler` shows of its fit (debugging; the metrics carry the same)."""
    return {
        f"{tier}/{kind}": {"samples": n, "scale": round(s, 4)}
        for tier, kind, n, s in model.samples()
    }
