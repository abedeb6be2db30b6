"""Arrivals per second: from a trace CSV or a named pattern.

Rates in patterns are jobs per *minute* because that is how operators read upload graphs (the
seed case: 10 -> 200 per minute). Patterns are deterministic fluid counts (the cumulative expected
count, floored) unless `poisson=1`, so "a 90 s spike at 200/min" is exactly 300 jobs; `bursty` is
random by nature and always draws from the seeded RNG.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TRACE_TAIL_S = 600
"""Seconds simulated after a trace's last arrival by default, so the backlog can drain."""


class TrafficError(ValueError):
    """A trace or pattern the user got wrong; the message is one line."""


@dataclass(frozen=True)
class Traffic:
    arrivals: tuple[int, ...]
    """Jobs arriving at each second, index = t; len = simulated duration."""
    label: str

    def peak_per_min(self) -> int:
        """Most arrivals in any 60 s window: what a static fleet must be sized for."""
        best = window = 0
        for t, n in enumerate(self.arrivals):
            window += n - (self.arrivals[t - 60] if t >= 60 else 0)
            best = max(best, window)
        return best

    def with_duration(self, duration_s: int) -> Traffic:
        arr = self.arrivals[:duration_s] + (0,) * max(0, duration_s - len(self.arrivals))
        return Traffic(arr, self.label)


def load_trace(path: Path) -> Traffic:
    """CSV with header `t,arrivals`; absent seconds have no arrivals; repeated seconds add up."""
    counts: dict[int, int] = {}
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader, [])]
            if header != ["t", "arrivals"]:
                raise TrafficError(f"{path}: header must be `t,arrivals`, got {','.join(header)!r}")
            for line, row in enumerate(reader, start=2):
                if not row or not "".join(row).strip():
                    continue
                try:
                    t, n = int(row[0]), int(row[1])
                except (ValueError, IndexError):
                    raise TrafficError(f"{path}:{line}: expected two integers") from None
                if t < 0 or n < 0:
                    raise TrafficError(f"{path}:{line}: t and arrivals must be >= 0")
                counts[t] = counts.get(t, 0) + n
    except OSError as exc:
        raise TrafficError(f"{path}: cannot read ({exc.strerror})") from exc
    if not counts:
        raise TrafficError(f"{path}: no rows")
    arrivals = [0] * (max(counts) + 1 + TRACE_TAIL_S)
    for t, n in counts.items():
        arrivals[t] += n
    return Traffic(tuple(arrivals), f"trace {path.name}")


RateFn = Callable[[float], float]
"""Jobs per minute at second t."""

PATTERN_DEFAULTS: dict[str, dict[str, float]] = {
    "constant": {"rate": 10, "duration": 1800, "poisson": 0},
    "step": {"base": 10, "peak": 200, "at": 300, "duration": 1800, "poisson": 0},
    # The seed case: 10/min, then 200/min for 90 s (300 jobs), back to 10/min.
    "spike": {"base": 10, "peak": 200, "at": 300, "length": 90, "duration": 1800, "poisson": 0},
    "diurnal": {"mean": 60, "amplitude": 50, "period": 86400, "duration": 86400, "poisson": 0},
    "bursty": {"base": 10, "peak": 200, "every": 600, "length": 60, "duration": 3600},
    # Days of uploads: a daily wave (trough at midnight) plus a morning surge that starts at
    # once at `at` (9 am) and lasts `length` s, every day; 5 days by default. The forecast's
    # failure modes: `holiday=D` has no surge on day D (1-based; 0 = none), `moved=D` starts
    # day D's surge at `moved_at` instead.
    "workday": {
        "mean": 20,
        "amplitude": 15,
        "surge": 150,
        "at": 9 * 3600,
        "length": 1800,
        "duration": 5 * 86400,
        "poisson": 0,
        "holiday": 0,
        "moved": 0,
        "moved_at": 10 * 3600,
    },
}


def parse_pattern(text: str, rng: random.Random) -> Traffic:
    """`NAME[:k=v,...]` (keys and defaults in PATTERN_DEFAULTS) -> Traffic."""
    name, _, rest = text.partition(":")
    if name not in PATTERN_DEFAULTS:
        raise TrafficError(f"unknown pattern {name!r}; known: {', '.join(PATTERN_DEFAULTS)}")
    p = dict(PATTERN_DEFAULTS[name])
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in p:
            raise TrafficError(f"pattern {name}: bad option {item!r}; keys: {', '.join(p)}")
        try:
            p[key] = float(value)
        except ValueError:
            raise TrafficError(f"pattern {name}: {key} must be a number, got {value!r}") from None
        if p[key] < 0 or not math.isfinite(p[key]):
            raise TrafficError(f"pattern {name}: {key} must be a finite number >= 0")
    duration = int(p["duration"])
    if duration < 1:
        raise TrafficError(f"pattern {name}: duration must be >= 1")
    if name == "bursty":
        rate = _bursty(p, duration, rng)
        return Traffic(_poisson(rate, duration, rng), text)
    rate = _rate_fn(name, p)
    arrivals = _poisson(rate, duration, rng) if p["poisson"] else _fluid(rate, duration)
    return Traffic(arrivals, text)


def _rate_fn(name: str, p: dict[str, float]) -> RateFn:
    if name == "constant":
        return lambda t: p["rate"]
    if name == "step":
        return lambda t: p["peak"] if t >= p["at"] else p["base"]
    if name == "spike":
        return lambda t: p["peak"] if p["at"] <= t < p["at"] + p["length"] else p["base"]
    if name == "workday":
        return lambda t: (
            max(0.0, p["mean"] - p["amplitude"] * math.cos(2 * math.pi * t / 86400))
            + _workday_surge(p, t)
        )
    period = max(p["period"], 1.0)  # diurnal: trough at t=0 (midnight), peak at period/2
    return lambda t: max(0.0, p["mean"] - p["amplitude"] * math.cos(2 * math.pi * t / period))


def _workday_surge(p: dict[str, float], t: float) -> float:
    day = int(t // 86400) + 1
    if day == p["holiday"]:
        return 0.0
    at = p["moved_at"] if day == p["moved"] else p["at"]
    return p["surge"] if at <= t % 86400 < at + p["length"] else 0.0


def _bursty(p: dict[str, float], duration: int, rng: random.Random) -> RateFn:
    every, length = max(int(p["every"]), 1), int(p["length"])
    starts = [k + rng.randrange(max(every - length, 1)) for k in range(0, duration, every)]
    return lambda t: p["peak"] if any(s <= t < s + length for s in starts) else p["base"]


def _fluid(rate: RateFn, duration: int) -> tuple[int, ...]:
    out, total, emitted = [], 0.0, 0
    for t in range(duration):
        total += rate(t) / 60.0
        n = math.floor(total + 1e-9) - emitted
        emitted += n
        out.append(n)
    return tuple(out)


def _poisson(rate: RateFn, duration: int, rng: random.Random) -> tuple[int, ...]:
    out = []
    for t in range(duration):
        lam, n, acc = rate(t) / 60.0, 0, 0.0
        while True:  # count exponential gaps inside this second
            acc += rng.expovariate(lam) if lam > 0 else math.inf
            if acc > 1.0:
                break
            n += 1
        out.append(n)
    return tuple(out)
