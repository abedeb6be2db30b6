"""Tier settings read from Helm values, with the chart's own keys (`tiers.<tier>.*`).

The simulator must answer "what will *these* values do", so it reads the same file `helm upgrade`
reads. Unspecified keys come from the chart's defaults file (helm/facefleet/values.yaml) when it
exists, else from BUILTIN_TIERS, which mirror the agreed chart shape. Everything is validated here
once, with the ranges the API server would enforce (keda.md §7), so the loops can trust it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

import yaml

Mode = Literal["deployment", "job"]
SelectPolicy = Literal["Max", "Min", "Disabled"]
Strategy = Literal["default", "accurate", "eager", "custom"]
PolicyKind = Literal["Pods", "Percent"]

HPA_DOWNSCALE_STABILIZATION_S = 300
"""--horizontal-pod-autoscaler-downscale-stabilization default (keda.md §4.1 [HPA-cfg])."""

GRACE_MARGIN_S = 30
"""terminationGracePeriodSeconds = maxJobSeconds + 30 when unset (chart convention)."""


class ConfigError(ValueError):
    """Values that the chart (or the API server) would reject; the message is one line."""


def _tier_defaults(min_replicas: int, max_job_s: int, mode: str, jobs_per_replica: int) -> Any:
    return {
        "enabled": True,
        "mode": mode,
        "maxJobSeconds": max_job_s,
        "terminationGracePeriodSeconds": None,
        "prefetch": 1,
        "podDeletionCost": True,
        "scaling": {
            "minReplicas": min_replicas,
            "maxReplicas": 10,
            "idleReplicas": None,
            "jobsPerReplica": jobs_per_replica,
            "activationJobs": 0,
            "pollingInterval": 5,
            "cooldownPeriod": 120,
            "scaleUp": {
                "stabilizationWindowSeconds": 0,
                "selectPolicy": "Max",
                "pods": 4,
                "percent": 100,
                "periodSeconds": 15,
            },
            "scaleDown": {
                "stabilizationWindowSeconds": 120,
                "selectPolicy": "Max",
                "pods": 2,
                "percent": None,
                "periodSeconds": 60,
            },
        },
        "scaledJob": {
            "scalingStrategy": "accurate",
            "customScalingQueueLengthDeduction": None,
            "customScalingRunningJobPercentage": None,
        },
    }


BUILTIN_TIERS: dict[str, Any] = {
    # max job seconds follow facefleet.wire.DEFAULT_TIERS.
    "high": _tier_defaults(1, 600, "deployment", 2),
    "standard": _tier_defaults(0, 900, "deployment", 2),
    "batch": _tier_defaults(0, 3600, "job", 1),
}


def chart_defaults_path() -> Path:
    """The chart's values.yaml beside this package in the repo (may not exist yet)."""
    return Path(__file__).resolve().parents[2] / "helm" / "facefleet" / "values.yaml"


@dataclass(frozen=True)
class Policy:
    """One HPA scaling policy (keda.md §4.6)."""

    kind: PolicyKind
    value: int
    period_s: int


@dataclass(frozen=True)
class ScalingRules:
    """One direction of `behavior` after API defaulting (keda.md §4.1)."""

    window_s: int
    select: SelectPolicy
    policies: tuple[Policy, ...]


@dataclass(frozen=True)
class Behavior:
    up: ScalingRules
    down: ScalingRules


# API defaults applied when `behavior` is set but a direction or its fields are not (§4.1).
DEFAULT_UP = ScalingRules(0, "Max", (Policy("Pods", 4, 15), Policy("Percent", 100, 15)))
DEFAULT_DOWN = ScalingRules(HPA_DOWNSCALE_STABILIZATION_S, "Max", (Policy("Percent", 100, 15),))


@dataclass(frozen=True)
class TierConfig:
    """Everything the loops need for one tier, in the simulator's own units (seconds, counts)."""

    name: str
    mode: Mode = "deployment"
    max_job_s: int = 600
    grace_s: int = 630
    prefetch: int = 1
    pod_deletion_cost: bool = True
    min_replicas: int = 1
    max_replicas: int = 10
    idle_replicas: int | None = None
    jobs_per_replica: float = 2.0
    activation_jobs: float = 0.0
    polling_interval_s: int = 5
    cooldown_s: int = 120
    behavior: Behavior | None = None
    strategy: Strategy = "accurate"
    custom_deduction: int | None = None
    custom_percentage: float | None = None
    idle_exit_s: int = 0
    """A Job's worker exits after this long without a delivery (chart `idleExitSeconds`)."""
    values: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The merged `tiers.<tier>` mapping, kept so the planner can print `--set` paths."""


def deep_merge(base: Any, override: Any) -> Any:
    """Helm's merge: maps merge key by key; anything else (including null) replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base.get(key), value) if key in base else value
        return merged
    return copy.deepcopy(override)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc


def _tiers_of(doc: Any, path: Path) -> dict[str, Any]:
    tiers = doc.get("tiers", {}) if isinstance(doc, dict) else None
    if not isinstance(tiers, dict):
        raise ConfigError(f"{path}: `tiers` must be a mapping")
    return tiers


def load_tier(values: Path | None, tier: str, chart_defaults: Path | None = None) -> TierConfig:
    """Tier `tier` from `values` merged over the chart defaults (or the built-ins)."""
    defaults = copy.deepcopy(BUILTIN_TIERS)
    chart = chart_defaults if chart_defaults is not None else chart_defaults_path()
    if chart.is_file():
        defaults = deep_merge(defaults, _tiers_of(_read_yaml(chart), chart))
    user: dict[str, Any] = {}
    if values is not None:
        user = _tiers_of(_read_yaml(values), values)
    known = sorted(set(defaults) | set(user))
    if tier not in known:
        raise ConfigError(f"unknown tier {tier!r}; known tiers: {', '.join(known)}")
    base = defaults.get(tier, BUILTIN_TIERS["high"])
    merged = deep_merge(base, user.get(tier) or {})
    if not isinstance(merged, dict):
        raise ConfigError(f"tiers.{tier} must be a mapping")
    return tier_from_mapping(tier, merged)


def tier_from_mapping(tier: str, raw: dict[str, Any]) -> TierConfig:
    """Validate one merged `tiers.<tier>` mapping and convert it."""
    r = _Reader(f"tiers.{tier}", raw)
    s = _Reader(f"tiers.{tier}.scaling", r.mapping("scaling"))
    j = _Reader(f"tiers.{tier}.scaledJob", r.mapping("scaledJob", optional=True) or {})
    mode = cast(Mode, r.choice("mode", get_args(Mode)))
    max_job_s = r.integer("maxJobSeconds", lo=1)
    grace = r.opt_integer("terminationGracePeriodSeconds", lo=0)
    min_r = s.integer("minReplicas", lo=0)
    max_r = s.integer("maxReplicas", lo=1)
    if min_r > max_r:
        raise ConfigError(f"tiers.{tier}.scaling: minReplicas {min_r} > maxReplicas {max_r}")
    idle = s.opt_integer("idleReplicas", lo=0)
    if idle is not None and idle != 0:
        # keda.md §2: only idleReplicaCount 0 works with the HPA (issue #2314).
        raise ConfigError(f"tiers.{tier}.scaling.idleReplicas: only 0 or null is supported")
    if idle is not None and min_r > 0 and idle >= min_r:
        raise ConfigError(f"tiers.{tier}.scaling: idleReplicas must be < minReplicas")
    jpr = s.number("jobsPerReplica")
    if jpr <= 0:
        raise ConfigError(f"tiers.{tier}.scaling.jobsPerReplica must be > 0")
    up_raw, down_raw = s.raw("scaleUp"), s.raw("scaleDown")
    behavior = None
    if up_raw is not None or down_raw is not None:
        behavior = Behavior(
            up=_rules(f"tiers.{tier}.scaling.scaleUp", up_raw, DEFAULT_UP),
            down=_rules(f"tiers.{tier}.scaling.scaleDown", down_raw, DEFAULT_DOWN),
        )
    pct = j.opt_number("customScalingRunningJobPercentage")
    return TierConfig(
        name=tier,
        mode=mode,
        max_job_s=max_job_s,
        grace_s=grace if grace is not None else max_job_s + GRACE_MARGIN_S,
        prefetch=r.integer("prefetch", lo=1),
        pod_deletion_cost=r.boolean("podDeletionCost"),
        min_replicas=min_r,
        max_replicas=max_r,
        idle_replicas=idle,
        jobs_per_replica=jpr,
        activation_jobs=s.number("activationJobs"),
        polling_interval_s=s.integer("pollingInterval", lo=1),
        cooldown_s=s.integer("cooldownPeriod", lo=0),
        behavior=behavior,
        strategy=cast(Strategy, j.choice("scalingStrategy", get_args(Strategy), "accurate")),
        custom_deduction=j.opt_integer("customScalingQueueLengthDeduction", lo=0),
        custom_percentage=pct,
        idle_exit_s=j.opt_integer("idleExitSeconds", lo=0) or 0,
        values=raw,
    )


def _rules(where: str, raw: Any, default: ScalingRules) -> ScalingRules:
    """One behavior direction with API defaulting per field (keda.md §4.1, [HPA-def])."""
    if raw is None:
        return default
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping or null")
    r = _Reader(where, raw)
    window = r.opt_integer("stabilizationWindowSeconds", lo=0, hi=3600)
    select = r.choice("selectPolicy", get_args(SelectPolicy), default.select)
    period = r.opt_integer("periodSeconds", lo=1, hi=1800) or 15
    policies: list[Policy] = []
    pods = r.opt_integer("pods", lo=1)
    if pods is not None:
        policies.append(Policy("Pods", pods, period))
    percent = r.opt_integer("percent", lo=1)
    if percent is not None:
        policies.append(Policy("Percent", percent, period))
    return ScalingRules(
        window_s=default.window_s if window is None else window,
        select=cast(SelectPolicy, select),
        policies=tuple(policies) or default.policies,
    )


class _Reader:
    """Typed access to one mapping with error messages that name the full key path."""

    def __init__(self, where: str, raw: Any) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a mapping")
        self.where, self.data = where, raw

    def raw(self, key: str) -> Any:
        return self.data.get(key)

    def mapping(self, key: str, optional: bool = False) -> Any:
        value = self.data.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            raise ConfigError(f"{self.where}.{key} must be a mapping")
        return value

    def _missing(self, key: str) -> ConfigError:
        return ConfigError(f"{self.where}.{key} is required")

    def opt_integer(self, key: str, lo: int | None = None, hi: int | None = None) -> int | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.where}.{key} must be an integer, got {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{self.where}.{key}={value} out of range [{lo}, {hi}]")
        return value

    def integer(self, key: str, lo: int | None = None, hi: int | None = None) -> int:
        value = self.opt_integer(key, lo, hi)
        if value is None:
            raise self._missing(key)
        return value

    def opt_number(self, key: str) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        try:
            number = float(value)  # KEDA metadata values are strings holding floats (§1.1)
        except (TypeError, ValueError):
            raise ConfigError(f"{self.where}.{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not math.isfinite(number) or number < 0:
            raise ConfigError(f"{self.where}.{key} must be a finite number >= 0")
        return number

    def number(self, key: str) -> float:
        value = self.opt_number(key)
        if value is None:
            raise self._missing(key)
        return value

    def boolean(self, key: str) -> bool:
        value = self.data.get(key)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where}.{key} must be true or false")
        return value

    def choice(self, key: str, allowed: tuple[str, ...], default: str | None = None) -> str:
        value = self.data.get(key, default)
        if value is None:
            value = default
        if value not in allowed:
            raise ConfigError(f"{self.where}.{key}={value!r}; allowed: {', '.join(allowed)}")
        return str(value)
