"""Tier settings read from Helm values, with the chart's own keys (`tiers.<tier>.*`).

The simulator must answer "what will *these* values do", so it reads the same file `helm upgrade`
reads, merged over the chart's defaults file (helm/facefleet/values.yaml) when it exists, else
over BUILTIN_VALUES, a copy of that file's relevant keys that a test keeps equal to it.
Everything is validated here once, with the ranges of values.schema.json / the API server
(keda.md §7) and the chart's cross-field rules (templates/_validate.tpl), so the loops can trust
it and the planner cannot propose values the chart would refuse.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

import yaml

from facefleet.keda.scaling import DEFAULT_STARTUP_S, DEFAULT_WAIT_OBJECTIVE_S, TRIGGERS

SCALING_TRIGGERS: tuple[str, ...] = ("queueLength", *TRIGGERS)
"""`tiers.<tier>.scaling.trigger`: KEDA's rabbitmq trigger or a mode of `facefleet scaler`."""

Mode = Literal["deployment", "job"]
SelectPolicy = Literal["Max", "Min", "Disabled"]
Strategy = Literal["default", "accurate", "eager", "custom"]
PolicyKind = Literal["Pods", "Percent"]

HPA_DOWNSCALE_STABILIZATION_S = 300
"""--horizontal-pod-autoscaler-downscale-stabilization default (keda.md §4.1 [HPA-cfg])."""

GRACE_SLACK_S = 15
"""helm/facefleet/templates/_helpers.tpl `facefleet.gracePeriod`: an unset
terminationGracePeriodSeconds renders as maxJobSeconds + workers.drainMarginSeconds + 15, so the
drain timeout (grace - margin) is maxJobSeconds + 15 whatever the margin."""


class ConfigError(ValueError):
    """Values that the chart (or the API server) would reject; the message is one line."""


def _behavior(window: int, pods: int | None, percent: int | None, period: int) -> Any:
    return {
        "stabilizationWindowSeconds": window,
        "selectPolicy": "Max",
        "pods": pods,
        "percent": percent,
        "periodSeconds": period,
    }


def _scaled_job() -> Any:
    return {
        "scalingStrategy": "default",
        "customScalingQueueLengthDeduction": None,
        "customScalingRunningJobPercentage": None,
        "idleExitSeconds": 60,
    }


BUILTIN_VALUES: dict[str, Any] = {
    # The keys of helm/facefleet/values.yaml that the simulator reads, with the chart's values
    # (tests/keda/test_sim_config.py asserts they are equal). Used only when the chart's file is
    # not beside this package (an installed wheel).
    "workers": {"drainMarginSeconds": 15},
    "rbac": {"create": True},
    "tiers": {
        "high": {
            "enabled": True,
            "mode": "deployment",
            "maxJobSeconds": 600,
            "terminationGracePeriodSeconds": None,
            "prefetch": 1,
            "podDeletionCost": True,
            "scaling": {
                "minReplicas": 1,
                "maxReplicas": 32,
                "idleReplicas": None,
                "jobsPerReplica": 1,
                "activationJobs": 0,
                "pollingInterval": 5,
                "cooldownPeriod": 120,
                "trigger": "queueLength",
                "waitObjectiveSeconds": 60,
                "startupSeconds": 90,
                "scaleUp": _behavior(0, 8, 100, 15),
                "scaleDown": _behavior(120, None, 50, 60),
            },
            "scaledJob": _scaled_job(),
        },
        "standard": {
            "enabled": True,
            "mode": "deployment",
            "maxJobSeconds": 900,
            "terminationGracePeriodSeconds": None,
            "prefetch": 1,
            "podDeletionCost": True,
            "scaling": {
                "minReplicas": 0,
                "maxReplicas": 14,
                "idleReplicas": None,
                "jobsPerReplica": 2,
                "activationJobs": 0,
                "pollingInterval": 10,
                "cooldownPeriod": 300,
                "trigger": "queueLength",
                "waitObjectiveSeconds": 120,
                "startupSeconds": 90,
                "scaleUp": _behavior(0, 4, 100, 30),
                "scaleDown": _behavior(300, 2, None, 60),
            },
            "scaledJob": _scaled_job(),
        },
        "batch": {
            "enabled": True,
            "mode": "job",
            "maxJobSeconds": 3600,
            "terminationGracePeriodSeconds": None,
            "prefetch": 1,
            "podDeletionCost": False,
            "scaling": {
                "minReplicas": 0,
                "maxReplicas": 20,
                "idleReplicas": None,
                "jobsPerReplica": 1,
                "activationJobs": 0,
                "pollingInterval": 30,
                "cooldownPeriod": 300,
                "trigger": "queueLength",
                "waitObjectiveSeconds": 600,
                "startupSeconds": 90,
                "scaleUp": None,
                "scaleDown": None,
            },
            "scaledJob": _scaled_job(),
        },
    },
}
BUILTIN_TIERS: dict[str, Any] = BUILTIN_VALUES["tiers"]


def chart_defaults_path() -> Path:
    """The chart's values.yaml beside this package in the repo (absent in an installed wheel)."""
    return Path(__file__).resolve().parents[2] / "helm" / "facefleet" / "values.yaml"


def grace_period_s(max_job_s: int, explicit: int | None, drain_margin_s: int) -> int:
    """terminationGracePeriodSeconds as `facefleet.gracePeriod` renders it (_helpers.tpl)."""
    if explicit is not None:
        return explicit
    return max_job_s + drain_margin_s + GRACE_SLACK_S


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


def behavior_values(rules: ScalingRules) -> dict[str, Any]:
    """`rules` as a complete chart `scaleUp`/`scaleDown` map (every key values.schema.json
    requires, plus both policy keys), e.g. to introduce a direction that was null."""
    periods = {p.period_s for p in rules.policies}
    if len(periods) != 1:
        raise ValueError("the chart has one periodSeconds per direction")
    values: dict[str, Any] = {
        "stabilizationWindowSeconds": rules.window_s,
        "selectPolicy": rules.select,
        "pods": None,
        "percent": None,
        "periodSeconds": periods.pop(),
    }
    for p in rules.policies:
        values["pods" if p.kind == "Pods" else "percent"] = p.value
    return values


@dataclass(frozen=True)
class TierConfig:
    """Everything the loops need for one tier, in the simulator's own units (seconds, counts).

    Field defaults are the chart's `high` tier (BUILTIN_TIERS), except `behavior` (None, the
    HPA legacy path) so hand-worked tests state the behaviour they exercise.
    """

    name: str
    mode: Mode = "deployment"
    max_job_s: int = 600
    grace_s: int = 630
    drain_margin_s: int = 15
    """workers.drainMarginSeconds: the worker's drain timeout is this much below the grace."""
    prefetch: int = 1
    pod_deletion_cost: bool = True
    min_replicas: int = 1
    max_replicas: int = 32
    idle_replicas: int | None = None
    jobs_per_replica: float = 1.0
    activation_jobs: float = 0.0
    polling_interval_s: int = 5
    cooldown_s: int = 120
    behavior: Behavior | None = None
    strategy: Strategy = "default"
    custom_deduction: int | None = None
    custom_percentage: float | None = None
    idle_exit_s: int = 60
    """A Job's worker exits after this long without a delivery (chart `idleExitSeconds`)."""
    trigger: str = "queueLength"
    """`scaling.trigger`: queueLength (KEDA's rabbitmq trigger) or a keda.scaling TRIGGERS mode."""
    wait_objective_s: float = 60.0
    """`scaling.waitObjectiveSeconds`: the scaler modes' W."""
    lookahead_s: float = 90.0
    """`scaling.startupSeconds`: how far ahead `predictive` adds forecast work."""
    rbac_create: bool = True
    """Top-level `rbac.create`, kept so re-validating a planner candidate applies the same
    chart rules (podDeletionCost needs it)."""
    values: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The merged `tiers.<tier>` mapping, kept so the planner can print `--set` paths."""

    @property
    def drain_timeout_s(self) -> int:
        """FACEFLEET_DRAIN_TIMEOUT_S = grace - workers.drainMarginSeconds (templates/worker/
        _podspec.tpl): when a SIGTERMed worker stops its jobs, requeues them and exits."""
        return max(self.grace_s - self.drain_margin_s, 0)


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


def chart_values(chart_defaults: Path | None = None) -> dict[str, Any]:
    """The chart's values.yaml when it exists (the truth), else BUILTIN_VALUES (equal to it)."""
    chart = chart_defaults if chart_defaults is not None else chart_defaults_path()
    if not chart.is_file():
        return copy.deepcopy(BUILTIN_VALUES)
    doc = _read_yaml(chart)
    _tiers_of(doc, chart)
    merged: dict[str, Any] = deep_merge(copy.deepcopy(BUILTIN_VALUES), doc)
    return merged


def load_tier(values: Path | None, tier: str, chart_defaults: Path | None = None) -> TierConfig:
    """Tier `tier` from `values` merged over the chart defaults, as `helm upgrade -f` merges."""
    defaults = chart_values(chart_defaults)
    user: dict[str, Any] = {}
    if values is not None:
        doc = _read_yaml(values)
        _tiers_of(doc, values)
        user = doc
    merged_doc = deep_merge(defaults, user)
    tiers = _tiers_of(merged_doc, values or Path("values.yaml"))
    if tier not in tiers:
        raise ConfigError(f"unknown tier {tier!r}; known tiers: {', '.join(sorted(tiers))}")
    raw = tiers[tier]
    if tier not in defaults["tiers"]:
        # A new tier needs every key in the chart; the simulator fills gaps from `high`.
        raw = deep_merge(defaults["tiers"]["high"], raw or {})
    if not isinstance(raw, dict):
        raise ConfigError(f"tiers.{tier} must be a mapping")
    workers = _Reader("workers", merged_doc.get("workers") or {})
    rbac = _Reader("rbac", merged_doc.get("rbac") or {})
    return tier_from_mapping(
        tier,
        raw,
        drain_margin_s=workers.integer("drainMarginSeconds", lo=0, hi=300),
        rbac_create=rbac.boolean("create"),
    )


def tier_from_mapping(
    tier: str, raw: dict[str, Any], drain_margin_s: int = 15, rbac_create: bool = True
) -> TierConfig:
    """Validate one merged `tiers.<tier>` mapping and convert it.

    Checks the ranges of values.schema.json for the keys read here and every cross-field rule
    of helm/facefleet/templates/_validate.tpl that concerns one tier, so nothing accepted here
    (in particular no planner candidate) is something `helm upgrade` would refuse.
    """
    p = f"tiers.{tier}"
    r = _Reader(p, raw)
    s = _Reader(f"{p}.scaling", r.mapping("scaling"))
    j = _Reader(f"{p}.scaledJob", r.mapping("scaledJob", optional=True) or {})
    mode = cast(Mode, r.choice("mode", get_args(Mode)))
    max_job_s = r.integer("maxJobSeconds", lo=1)
    grace = r.opt_integer("terminationGracePeriodSeconds", lo=1)
    prefetch = r.integer("prefetch", lo=1, hi=64)
    # What a busy worker holds unacked (its AMQP prefetch), as _validate.tpl computes it.
    held = (
        prefetch
        * (r.opt_integer("pipelineDepth", lo=1, hi=16) or 1)
        * (r.opt_integer("batch", lo=1, hi=256) or 1)
    )
    pod_deletion_cost = r.boolean("podDeletionCost")
    min_r = s.integer("minReplicas", lo=0)
    max_r = s.integer("maxReplicas", lo=1)
    idle = s.opt_integer("idleReplicas", lo=0)
    jpr = s.integer("jobsPerReplica", lo=1)
    activation = s.integer("activationJobs", lo=0)
    strategy = cast(Strategy, j.choice("scalingStrategy", get_args(Strategy), "default"))
    deduction = j.opt_integer("customScalingQueueLengthDeduction")
    pct = j.opt_number("customScalingRunningJobPercentage", hi=1.0)
    idle_exit = j.opt_integer("idleExitSeconds", lo=1)
    trigger = s.choice("trigger", SCALING_TRIGGERS, "queueLength")
    wait_objective = s.opt_integer("waitObjectiveSeconds", lo=1)
    lookahead = s.opt_integer("startupSeconds", lo=1)
    if mode == "job" and trigger != "queueLength":
        raise ConfigError(
            f"{p}.scaling.trigger={trigger} but {p}.mode is job: ScaledJobs stay on queueLength"
        )
    # Cross-field rules, in the order of _validate.tpl.
    if min_r > max_r:
        raise ConfigError(f"{p}.scaling: minReplicas {min_r} > maxReplicas {max_r}")
    if activation >= jpr:
        raise ConfigError(
            f"{p}.scaling: activationJobs {activation} must be below jobsPerReplica {jpr}"
        )
    if jpr < held:
        raise ConfigError(
            f"{p}.scaling: jobsPerReplica {jpr} is below prefetch x pipelineDepth x batch {held}"
        )
    grace_s = grace_period_s(max_job_s, grace, drain_margin_s)
    drain_s = grace_s - drain_margin_s  # facefleet.drainTimeout
    if drain_s < max_job_s:  # maxJobSeconds >= 1, so this also keeps the drain timeout > 0
        raise ConfigError(
            f"{p}.terminationGracePeriodSeconds {grace_s} - workers.drainMarginSeconds "
            f"{drain_margin_s} leaves a drain timeout of {drain_s} s, below maxJobSeconds "
            f"{max_job_s}"
        )
    if idle is not None and idle != 0:
        # keda.md §2: only idleReplicaCount 0 works with the HPA (issue #2314).
        raise ConfigError(f"{p}.scaling.idleReplicas: only 0 or null is supported")
    if mode == "job":
        if idle is not None:
            raise ConfigError(f"{p}.scaling.idleReplicas must be null with mode: job")
        if strategy in ("accurate", "eager"):
            # The trigger counts unacked jobs, so these start a Job per busy one (keda.md §5.1).
            raise ConfigError(
                f"{p}.scaledJob.scalingStrategy={strategy} is rejected by the chart "
                "(unacknowledged jobs are counted); use default or custom"
            )
        if strategy == "custom" and deduction is None and pct is None:
            raise ConfigError(
                f"{p}.scaledJob.scalingStrategy=custom needs customScalingQueueLengthDeduction "
                "or customScalingRunningJobPercentage"
            )
    elif idle is not None and min_r < 1:
        # KEDA webhook: idleReplicaCount < minReplicaCount (keda.md §7).
        raise ConfigError(f"{p}.scaling: idleReplicas needs minReplicas >= 1")
    if pod_deletion_cost and not rbac_create:
        raise ConfigError(f"{p}.podDeletionCost is true but rbac.create is false")
    up_raw, down_raw = s.raw("scaleUp"), s.raw("scaleDown")
    behavior = None
    if up_raw is not None or down_raw is not None:
        behavior = Behavior(
            up=_rules(f"{p}.scaling.scaleUp", up_raw, DEFAULT_UP),
            down=_rules(f"{p}.scaling.scaleDown", down_raw, DEFAULT_DOWN),
        )
    return TierConfig(
        name=tier,
        mode=mode,
        max_job_s=max_job_s,
        grace_s=grace_s,
        drain_margin_s=drain_margin_s,
        prefetch=prefetch,
        pod_deletion_cost=pod_deletion_cost,
        min_replicas=min_r,
        max_replicas=max_r,
        idle_replicas=idle,
        jobs_per_replica=float(jpr),
        activation_jobs=float(activation),
        polling_interval_s=s.integer("pollingInterval", lo=1),
        cooldown_s=s.integer("cooldownPeriod", lo=0),
        behavior=behavior,
        strategy=strategy,
        custom_deduction=deduction,
        custom_percentage=pct,
        idle_exit_s=idle_exit or 0,
        trigger=trigger,
        wait_objective_s=float(wait_objective or DEFAULT_WAIT_OBJECTIVE_S),
        lookahead_s=float(lookahead or DEFAULT_STARTUP_S),
        rbac_create=rbac_create,
        values=raw,
    )


def _rules(where: str, raw: Any, default: ScalingRules) -> ScalingRules:
    """One behavior direction as the chart renders it, API-defaulted (keda.md §4.1, [HPA-def]).

    A null direction gets the API defaults whole. A map needs the keys values.schema.json
    requires (window, selectPolicy, periodSeconds); with neither `pods` nor `percent` the chart
    renders no `policies` and the API fills in the default ones.
    """
    if raw is None:
        return default
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping or null")
    r = _Reader(where, raw)
    window = r.integer("stabilizationWindowSeconds", lo=0, hi=3600)
    select = r.choice("selectPolicy", get_args(SelectPolicy))
    period = r.integer("periodSeconds", lo=1, hi=1800)
    policies: list[Policy] = []
    pods = r.opt_integer("pods", lo=1)
    if pods is not None:
        policies.append(Policy("Pods", pods, period))
    percent = r.opt_integer("percent", lo=1)
    if percent is not None:
        policies.append(Policy("Percent", percent, period))
    return ScalingRules(
        window_s=window,
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

    def opt_number(self, key: str, hi: float | None = None) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        try:
            number = float(value)  # KEDA metadata values are strings holding floats (§1.1)
        except (TypeError, ValueError):
            raise ConfigError(f"{self.where}.{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not math.isfinite(number) or number < 0:
            raise ConfigError(f"{self.where}.{key} must be a finite number >= 0")
        if hi is not None and number > hi:
            raise ConfigError(f"{self.where}.{key}={value} is above {hi:g}")
        return number

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
