"""Duration distributions from one SPEC string (`--service-time`, `--startup`).

Grammar (seconds; samples are rounded to whole seconds because the simulator ticks at 1 s):

    90 | fixed:90            always 90
    uniform:60,120          uniform between the bounds
    normal:90,15            normal(mean, sd), clipped at the floor
    exp:6                   exponential with mean 6
    hist:6=3,12=1           empirical histogram value=weight, inline
    hist:FILE.csv           same from a CSV with header `seconds,count`
    mix:0.9*2,0.1*300       job-size mixture weight*seconds (photos and videos); an optional
                            last item `sd=0.2` spreads each component normally with sd = 0.2 x
                            its seconds (so "photos of ~2 s, videos of ~300 s")

A start-up SPEC models scheduling + image pull + model preload + warm-up in one number; a
service-time SPEC is one job on one GPU slot.
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["fixed", "uniform", "normal", "exp", "hist", "mix"]


class SpecError(ValueError):
    """A SPEC the user typed wrong; the message is one line."""


@dataclass(frozen=True)
class Distribution:
    """A sampler of whole seconds, never below `floor_s`."""

    kind: Kind
    params: tuple[float, ...]
    weights: tuple[float, ...] = ()
    floor_s: int = 0
    spread: float = 0.0
    """`mix` only: each component's sd as a fraction of its seconds."""

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            x = self.params[0]
        elif self.kind == "uniform":
            x = rng.uniform(self.params[0], self.params[1])
        elif self.kind == "normal":
            x = rng.gauss(self.params[0], self.params[1])
        elif self.kind == "exp":
            x = rng.expovariate(1.0 / self.params[0])
        else:  # hist, mix
            x = rng.choices(self.params, weights=self.weights)[0]
            if self.spread:
                x = rng.gauss(x, self.spread * x)
        return max(self.floor_s, math.floor(x + 0.5))

    def mean(self) -> float:
        """Expected value before rounding; used to size the static fleet."""
        if self.kind == "uniform":
            return (self.params[0] + self.params[1]) / 2
        if self.kind in ("hist", "mix"):
            return sum(v * w for v, w in zip(self.params, self.weights, strict=True)) / sum(
                self.weights
            )
        return max(float(self.floor_s), self.params[0])


def parse_spec(spec: str, floor_s: int = 0) -> Distribution:
    """Parse a SPEC (grammar in the module docstring) or raise SpecError."""
    kind, _, rest = spec.partition(":") if ":" in spec else ("fixed", ":", spec)
    kind = kind.strip().lower()
    if kind == "hist":
        values, weights = _histogram(rest)
        return Distribution("hist", values, weights, floor_s)
    if kind == "mix":
        return _mixture(spec, rest, floor_s)
    try:
        nums = tuple(float(x) for x in rest.split(","))
    except ValueError:
        raise SpecError(f"bad SPEC {spec!r}: numbers expected after '{kind}:'") from None
    arity = {"fixed": 1, "uniform": 2, "normal": 2, "exp": 1}
    if kind not in arity:
        raise SpecError(f"bad SPEC {spec!r}: kind must be fixed, uniform, normal, exp, hist or mix")
    if len(nums) != arity[kind] or any(not math.isfinite(n) or n < 0 for n in nums):
        raise SpecError(f"bad SPEC {spec!r}: {kind} takes {arity[kind]} number(s) >= 0")
    if kind == "uniform" and nums[0] > nums[1]:
        raise SpecError(f"bad SPEC {spec!r}: uniform needs low <= high")
    if kind == "exp" and nums[0] == 0:
        raise SpecError(f"bad SPEC {spec!r}: exp needs a mean > 0")
    return Distribution(kind, nums, (), floor_s)  # type: ignore[arg-type]


def _histogram(rest: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pairs: list[tuple[float, float]] = []
    if "=" in rest:
        try:
            for item in rest.split(","):
                value, weight = item.split("=")
                pairs.append((float(value), float(weight)))
        except ValueError:
            raise SpecError(f"bad histogram {rest!r}: expected value=weight,...") from None
    else:
        pairs = _histogram_file(Path(rest))
    if not pairs or any(v < 0 or w < 0 for v, w in pairs) or sum(w for _, w in pairs) <= 0:
        raise SpecError(f"bad histogram {rest!r}: needs values >= 0 and a positive total weight")
    return tuple(v for v, _ in pairs), tuple(w for _, w in pairs)


def _histogram_file(path: Path) -> list[tuple[float, float]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise SpecError(f"histogram {path}: cannot read ({exc.strerror})") from exc
    try:
        return [(float(row["seconds"]), float(row["count"])) for row in rows]
    except (KeyError, TypeError, ValueError):
        raise SpecError(f"histogram {path}: expected header `seconds,count` and numbers") from None


def _mixture(spec: str, rest: str, floor_s: int) -> Distribution:
    """`W*S,...[,sd=F]`: weights need not sum to 1 (they are relative, like hist's)."""
    items = [i.strip() for i in rest.split(",") if i.strip()]
    spread = 0.0
    if items and items[-1].startswith("sd="):
        try:
            spread = float(items.pop()[3:])
        except ValueError:
            raise SpecError(f"bad SPEC {spec!r}: sd= takes a number") from None
    pairs: list[tuple[float, float]] = []
    for item in items:
        weight, star, seconds = item.partition("*")
        try:
            if not star:
                raise ValueError
            pairs.append((float(seconds), float(weight)))
        except ValueError:
            raise SpecError(
                f"bad SPEC {spec!r}: mix items are weight*seconds, e.g. mix:0.9*2,0.1*300"
            ) from None
    numbers = [spread, *(n for pair in pairs for n in pair)]
    if not pairs or any(not math.isfinite(n) or n < 0 for n in numbers):
        raise SpecError(f"bad SPEC {spec!r}: mix needs weight*seconds items, all >= 0")
    if sum(w for _, w in pairs) <= 0:
        raise SpecError(f"bad SPEC {spec!r}: mix needs a positive total weight")
    return Distribution(
        "mix", tuple(s for s, _ in pairs), tuple(w for _, w in pairs), floor_s, spread
    )
