"""Typed settings, read from the environment once per process, failing fast with a clear message.

Every process builds exactly one settings object at start-up (`WorkerSettings.load()` and so on)
and passes it down; nothing else reads os.environ. Variables use the FACEFLEET_ prefix, except
AMQP_URL, which follows the common convention (the chart fills it from a Secret).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from facefleet.management import default_management_url

if TYPE_CHECKING:
    from facefleet.costmodel import CostModel
    from facefleet.jobstore import JobStore
    from facefleet.media import MediaStore
from facefleet.wire import DEFAULT_TIERS, Placement, TierSpec, check_tier

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
_STORE_VAR = "FACEFLEET_STORE_URL"


def split_amqp_urls(value: str) -> tuple[str, ...]:
    """AMQP_URL's addresses: one URL, or several separated by commas (a cluster's nodes). The
    one place that parses it; a comma inside a password must be percent-encoded (%2C)."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


class SettingsError(SystemExit):
    """Raised (as a clean exit 2) when the environment does not describe a valid process."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACEFLEET_", extra="ignore", frozen=True)

    amqp_url: str = Field(
        default=DEFAULT_AMQP_URL, validation_alias=AliasChoices("AMQP_URL", "FACEFLEET_AMQP_URL")
    )
    """Broker URL with credentials; heartbeat and timeouts may ride in its query string. Several
    URLs separated by commas name the nodes of a cluster: every client tries them in turn and
    fails over to the next when its node goes (see `amqp_urls`)."""
    quorum_group_size: int | None = Field(default=None, ge=1, le=99)
    """Replicas of each quorum queue and of the events stream when `topology apply` creates them
    (x-quorum-initial-group-size / x-initial-cluster-size); None: the broker's default (every
    node up to its limit). Existing queues keep theirs (`facefleet doctor` shows them)."""
    data_root: Path = Path("./var/facefleet")
    """Workers' job state (journals, claims, cancel markers) and file:// media; URIs outside it
    are refused. Producers need it only when media_url is file:// (the embedded default)."""
    media_url: str = Field(default="", validate_default=True)
    """Where inputs are uploaded and results written: `file:///abs/path` or `s3://bucket/prefix`
    (endpoint from AWS_ENDPOINT_URL, credentials from the AWS chain); default file://<data_root>."""
    store_url: str = ""
    """Job state: `file:///abs/path` (journals; default: the data root) or
    `postgresql://user@host:5432/db` (run `facefleet store migrate` first)."""
    tiers_json: str | None = Field(default=None, validation_alias="FACEFLEET_TIERS")
    """JSON list of tiers ({"name", "max_job_s", "max_length", "delivery_limit"}); default:
    high, standard, batch."""
    leader_locator: Literal["client-local", "balanced"] | None = None
    """Where a new quorum queue or stream puts its leader (x-queue-leader-locator, sent only to
    brokers that support it): client-local (the node declaring it) or balanced (the node with
    the fewest leaders); None: the broker's default (client-local before 4.0, balanced after)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = "auto"
    """auto: one JSON object per line unless stderr is a terminal (facefleet.logs)."""
    cost_model_json: str | None = Field(default=None, validation_alias="FACEFLEET_COST_MODEL")
    """Cost model coefficients (facefleet/costmodel.py): JSON {"default": {...}, "<tier>":
    {...}} with overhead_s, image_s_per_mp, video_s_per_mp_frame, face_factor,
    enhance_factor, unknown_s; unset fields keep the built-in defaults."""

    @field_validator("cost_model_json")
    @classmethod
    def _cost_model(cls, v: str | None) -> str | None:
        from facefleet.costmodel import parse_cost_model

        parse_cost_model(v)  # TypeError/ValueError -> named by load()
        return v

    def cost_model(self) -> CostModel:
        """A cost model with this process's coefficients (fits start from them)."""
        from facefleet.costmodel import CostModel, parse_cost_model

        return CostModel(coefficients=parse_cost_model(self.cost_model_json))

    @field_validator("amqp_url")
    @classmethod
    def _amqp(cls, v: str) -> str:
        urls = split_amqp_urls(v)
        if not urls:
            raise ValueError("at least one amqp:// or amqps:// URL is needed")
        for n, url in enumerate(urls, 1):
            if not url.startswith(("amqp://", "amqps://")):
                which = "" if len(urls) == 1 else f"URL #{n} "
                raise ValueError(f"{which}must start with amqp:// or amqps://")
        return v

    @property
    def amqp_urls(self) -> tuple[str, ...]:
        """The broker addresses of AMQP_URL, in the order clients try them."""
        return split_amqp_urls(self.amqp_url)

    @field_validator("media_url")
    @classmethod
    def _media(cls, v: str, info: ValidationInfo) -> str:
        if not v:
            root = info.data.get("data_root") or Path("./var/facefleet")
            return Path(root).resolve().as_uri()
        if not v.startswith(("file:///", "s3://")):
            raise ValueError("use file:///absolute/path or s3://bucket/prefix")
        return v

    def media_store(self) -> MediaStore:
        """The media store FACEFLEET_MEDIA_URL names (a bad URL exits, naming the variable)."""
        from facefleet.media import open_media_store

        try:
            return open_media_store(self.media_url)
        except ValueError as exc:
            raise SettingsError(str(exc)) from exc

    def job_store(self) -> JobStore:
        """The job store FACEFLEET_STORE_URL names (default: the journals in the data root);
        an unreachable database or a schema behind the code stops the process with a message
        that says what to do."""
        from facefleet.jobstore import StoreError
        from facefleet.stores import open_job_store

        try:
            return open_job_store(self.store_url, data_root=self.data_root)
        except StoreError as exc:
            raise SettingsError(f"{_STORE_VAR}: {exc}") from exc

    def placement(self) -> Placement:
        """Replicas and leader placement for the queues topology apply creates."""
        return Placement(self.quorum_group_size, self.leader_locator)

    def tiers(self) -> tuple[TierSpec, ...]:
        if not self.tiers_json:
            return DEFAULT_TIERS
        try:
            raw = json.loads(self.tiers_json)
            specs = tuple(TierSpec(**{**item, "name": check_tier(item["name"])}) for item in raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise SettingsError(f"FACEFLEET_TIERS: {exc}") from exc
        if not specs:
            raise SettingsError("FACEFLEET_TIERS: at least one tier is needed")
        return specs

    def tier_spec(self, name: str) -> TierSpec:
        for spec in self.tiers():
            if spec.name == name:
                return spec
        known = ", ".join(t.name for t in self.tiers())
        raise SettingsError(f"unknown tier {name!r}; known tiers: {known} (see FACEFLEET_TIERS)")

    @classmethod
    def load(cls, **overrides: Any) -> Self:
        """Build from the environment; any problem exits with a message naming the variable."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            lines = []
            for err in exc.errors():
                field = str(err["loc"][0]) if err["loc"] else "?"
                shown = "***" if _is_secret(field) else repr(err.get("input"))
                lines.append(f"  {_env_name(cls, field)}: {err['msg']} (got {shown})")
            raise SettingsError("invalid settings:\n" + "\n".join(lines)) from exc


def _is_secret(field: str) -> bool:
    """Never echo credentials: URLs carry passwords, keys and secrets are what they say."""
    return any(word in field.lower() for word in ("url", "secret", "key", "token", "password"))


def _env_name(cls: type[BaseSettings], field: str) -> str:
    info = cls.model_fields.get(field)
    alias = info.validation_alias if info else None
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    if isinstance(alias, str):
        return alias
    return f"FACEFLEET_{field.upper()}"


class ProducerSettings(CommonSettings):
    """Settings of the CLI, the producer SDK and the gateway."""

    confirm_timeout_s: float = 30.0
    """How long a publish waits for the broker's confirm before it is reported as failed."""
    blocked_timeout_s: float = Field(default=30.0, gt=0)
    """How long a publish may wait while the broker blocks publishers (a memory or disk alarm)
    before it fails with BrokerBlockedError (the CLI then exits 75, the gateway answers 503)."""
    gateway_url: str | None = None
    """When set, `watch` and `submit --wait` follow events through the gateway over WebSocket."""
    management_url: str | None = Field(default=None, validate_default=True)
    """RabbitMQ management API, the only source of in-progress (unacked) counts for `status` and
    the status page; default: http://<AMQP_URL host>:15672, with the AMQP credentials."""

    @field_validator("management_url")
    @classmethod
    def _management(cls, v: str | None, info: ValidationInfo) -> str:
        if v:
            return v.rstrip("/")
        urls = split_amqp_urls(str(info.data.get("amqp_url", DEFAULT_AMQP_URL)))
        return default_management_url(urls[0] if urls else DEFAULT_AMQP_URL)


UPLOAD_KINDS: tuple[str, ...] = (
    "jpeg",
    "png",
    "webp",
    "bmp",
    "heic",
    "avif",
    "mp4",
    "mov",
    "webm",
    "matroska",
    "avi",
)
"""Media kinds (facefleet.sniff formats) a gateway may accept: those a worker can decode. HEIC
needs the `heif` extra on the workers; a worker without it refuses as unsupported_media."""


def _comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


class GatewaySettings(ProducerSettings):
    """Settings of `facefleet gateway` (HTTP submit + WebSocket progress)."""

    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    """Comma-separated API keys accepted as `Authorization: Bearer <key>` (FACEFLEET_API_KEYS);
    empty means nobody can submit."""
    dev_insecure_secret: bool = False
    """Dev only: without FACEFLEET_TOKEN_SECRET, sign job tokens with a random per-process
    secret (tokens then die with the process and do not work across replicas)."""
    token_secret: SecretStr | None = Field(default=None, validate_default=True)
    """HMAC key for job-scoped tokens, at least 32 characters; the chart fills it from a Secret.
    Every replica must share it."""
    token_ttl_s: int = Field(default=6 * 3600, ge=60)
    """How long a job token stays valid after submit; long enough to follow the job and reload."""
    max_upload_bytes: int = Field(default=100_000_000, ge=1)
    """Largest source or target upload, in bytes (413 above it)."""
    upload_types: Annotated[tuple[str, ...], NoDecode] = UPLOAD_KINDS
    """Accepted media kinds, sniffed from content (415 otherwise); sources must be images."""
    ws_send_queue: int = Field(default=256, ge=1)
    """Events queued for one WebSocket client; a client this far behind is dropped (close 4008)
    and reconnects with after_seq, so memory per client stays bounded."""
    heartbeat_s: float = Field(default=20.0, gt=0)
    """WebSocket ping interval; a client that does not answer within the same time is closed."""
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=8080, ge=0, le=65535)
    default_tier: str = "standard"
    """Tier of a submit that names none."""
    retry_after_s: int = Field(default=30, ge=1)
    """Retry-After of a 429 (tier full)."""
    auth_timeout_s: float = Field(default=10.0, gt=0)
    """How long a WebSocket may wait before sending its token as the first message."""
    replay_idle_s: float = Field(default=1.0, gt=0)
    """A per-job stream replay that has seen nothing for this long has reached the stream's end
    (used only when the shared consumer has not yet fixed the end offset)."""
    replay_timeout_s: float = Field(default=60.0, gt=0)
    """Upper bound of one per-job stream replay; beyond it the client is closed with 1011."""
    replay_grace_s: float | None = Field(default=None, gt=0)
    """How long a WebSocket stays open after a `dead_lettered` for a `replayed` (`facefleet dead
    replay`) to follow before it closes 1000; unset: the watchers' own grace
    (producer.watch.REPLAY_GRACE_S, 5 s)."""
    key_max_active: int | None = Field(default=None, ge=1)
    """Default limit of one API key's jobs queued or running at once (429 beyond it); none by
    default. Counted in the job store, so it holds across replicas."""
    key_max_per_minute: int | None = Field(default=None, ge=1)
    """Default limit of one API key's submissions in the last 60 s (429 beyond it); none by
    default. Counted in the job store (the key's jobs created in the last minute)."""
    key_limits_json: str | None = Field(default=None, validation_alias="FACEFLEET_KEY_LIMITS")
    """Per-key limits over the defaults: JSON {"<api key id>": {"active": N, "per_minute": M}};
    a missing field takes the default, null means no limit for that key. Key ids are the
    gateway's (the first 16 hex digits of the key's SHA-256), never the keys."""

    @field_validator("key_limits_json")
    @classmethod
    def _key_limits(cls, v: str | None) -> str | None:
        if v:
            _parse_key_limits(v)
        return v

    def key_limits(self, api_key_id: str) -> tuple[int | None, int | None]:
        """(jobs at once, submissions per minute) allowed to one key; None: no limit."""
        active, per_minute = self.key_max_active, self.key_max_per_minute
        own = _parse_key_limits(self.key_limits_json).get(api_key_id, {})
        return own.get("active", active), own.get("per_minute", per_minute)

    def key_limit_ids(self) -> tuple[str, ...]:
        """The key ids FACEFLEET_KEY_LIMITS names."""
        return tuple(_parse_key_limits(self.key_limits_json))

    @property
    def key_limits_set(self) -> bool:
        """Is any per-key limit configured (the gateway then needs a job store)?"""
        if self.key_max_active is not None or self.key_max_per_minute is not None:
            return True
        return any(
            n is not None
            for own in _parse_key_limits(self.key_limits_json).values()
            for n in own.values()
        )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, v: Any) -> Any:
        return _comma_list(v)

    @field_validator("upload_types", mode="before")
    @classmethod
    def _types(cls, v: Any) -> Any:
        kinds = _comma_list(v)
        unknown = [k for k in kinds if k not in UPLOAD_KINDS]
        if unknown:
            raise ValueError(f"unknown kinds {unknown}; known: {', '.join(UPLOAD_KINDS)}")
        return kinds

    @field_validator("token_secret")
    @classmethod
    def _secret(cls, v: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if v is None:
            if info.data.get("dev_insecure_secret"):
                return None
            raise ValueError(
                "required: set FACEFLEET_TOKEN_SECRET (>= 32 random characters, shared by all "
                "replicas), or FACEFLEET_DEV_INSECURE_SECRET=true for a throw-away dev secret"
            )
        if len(v.get_secret_value()) < 32:
            raise ValueError("too short: use at least 32 random characters")
        return v

    @field_validator("default_tier")
    @classmethod
    def _tier(cls, v: str) -> str:
        return check_tier(v)


def _parse_key_limits(text: str | None) -> dict[str, dict[str, int | None]]:
    """FACEFLEET_KEY_LIMITS: {"<key id>": {"active": N|null, "per_minute": M|null}}."""
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise ValueError('use a JSON object {"<key id>": {"active": N, "per_minute": M}}')
    out: dict[str, dict[str, int | None]] = {}
    for key_id, limits in raw.items():
        if not isinstance(limits, dict):
            raise ValueError(f"{key_id}: use an object with active and/or per_minute")
        unknown = set(limits) - {"active", "per_minute"}
        if unknown:
            raise ValueError(f"{key_id}: unknown fields {sorted(unknown)} (active, per_minute)")
        for name, n in limits.items():
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"{key_id}.{name}: a whole number >= 1, or null for no limit")
        out[str(key_id)] = dict(limits)
    return out


class GatewayClientSettings(ProducerSettings):
    """What `facefleet watch` / `submit --wait` need to follow a job through the gateway."""

    gateway_api_key: SecretStr | None = None
    """API key used to obtain a job token (POST /v1/jobs/{id}/token) when none is given."""
    gateway_token: SecretStr | None = None
    """A job token from the submit answer; used as is when set (FACEFLEET_GATEWAY_TOKEN)."""
    gateway_reconnects: int = Field(default=5, ge=0)
    """Reconnects (resuming with after_seq) after a dropped connection before giving up."""


class WorkerSettings(CommonSettings):
    """Settings of `facefleet worker` (the GPU consumer)."""

    tier: str = "standard"
    processor: str = "sleep"
    backend: Literal["insightface", "classic", "emulated"] = "classic"
    """faceswap backend: insightface (ONNX models from model_dir), classic (OpenCV only), or
    emulated (model calls hold an exclusive emulated device for emulated_model_ms, no weights:
    for measuring the pipeline's duty cycle on any machine)."""
    emulated_model_ms: str = "detect=10,embed=2,swap=8,enhance=10"
    """The emulated backend's model times: `name=base` or `name=base+per_row` in milliseconds
    (per_row: added for each row of a batched call), names detect, embed, swap, enhance."""
    emulated_device_lock: Path | None = None
    """The emulated backend: a file several worker processes lock around each model call, so
    they share one emulated device as worker pods share a GPU (time-slicing, MPS). Unset: the
    device is this process's own."""
    concurrency: int = Field(default=1, ge=1, le=64)
    """Jobs run at once; also the AMQP prefetch (1 per GPU slot: a crash loop then burns only one
    job's delivery count)."""
    pipeline_depth: int = Field(default=1, ge=1, le=16)
    """Jobs in flight per GPU slot: 1 = one job at a time (fetch, decode, models, encode,
    commit, ack, then the next); 3 = while one job's model calls hold the slot's inference lane,
    the next is fetched and decoded and the one before is encoded and committed (a pipeline
    across jobs: keeps the GPU busy). Prefetch and job threads are concurrency x depth (x batch);
    a prefetched job not started yet is given back at once on SIGTERM."""
    batch: int = Field(default=1, ge=1, le=256)
    """Jobs one slot takes at once (the batch lane, for short jobs: one filesystem sync per step
    for the whole batch, events pipelined). The prefetch becomes concurrency x batch, so every
    job of a batch waits for the ones before it: keep batch x the tier's max job time well
    inside its consumer timeout. 1 (the default) = one job per slot."""
    instances: int = Field(default=1, ge=1, le=16)
    """onnxruntime sessions per model on the device (Triton's instance group): up to this many
    calls of one model in flight at once; the device gets concurrency x instances lanes. Each
    instance holds its own copy of the weights in GPU memory."""
    dynamic_batch: int = Field(default=1, ge=1, le=256)
    """Dynamic batching across jobs: concurrent calls of a model whose batch axis is symbolic
    (the detector and enhancer exports) are stacked into one call of up to this many rows;
    1 = off."""
    batch_delay_ms: float = Field(default=2.0, ge=0, le=1000)
    """Longest a model call waits for others to share its dynamic batch."""
    model_dir: Path = Path("./var/models")
    model_catalog: Path | None = None
    """Catalogue the model files are checked against; default: the packaged models/catalog.yaml
    (tests point it at the tiny models' catalogue)."""
    execution_providers: str = "tensorrt,cuda,cpu"
    """Preference order; CPU always last. A provider this process cannot use is left out:
    one this onnxruntime build lacks, and TensorRT when libnvinfer does not load (the default
    consumer image has none: it runs CUDA, see consumer/Dockerfile's TENSORRT build arg)."""
    trt_fp16: bool = False
    """TensorRT builds FP16 engines (faster, slightly different results; its own cache key)."""
    trt_cache_dir: Path | None = None
    """TensorRT engine and timing caches, keyed by GPU model, TensorRT version and model hash;
    default <model_dir>/trt-cache (the model volume: later pods load what the first built)."""
    device_id: int = 0
    gpu_mem_limit_mb: int | None = None
    drain_timeout_s: float = 600.0
    """After SIGTERM, how long running jobs may finish before they are requeued. Keep it below
    the pod's terminationGracePeriodSeconds."""
    max_jobs: int | None = Field(default=None, ge=1)
    """Exit (0) after handling this many deliveries: a ScaledJob's pod does its share and ends."""
    idle_exit_s: float | None = Field(default=None, gt=0)
    """Exit (0) after this long with no delivery and nothing running (ScaledJob pods whose
    message another pod took); None = run until SIGTERM."""
    max_attempts: int = Field(default=3, ge=1)
    """Attempts for transient errors (in this worker and across redeliveries) before the job is
    dead-lettered."""
    retry_base_s: float = 1.0
    retry_max_s: float = 60.0
    health_host: str = "127.0.0.1"
    health_port: int = 9464
    """HTTP port for /healthz, /readyz and /metrics; 0 disables it."""
    progress_interval_s: float = Field(default=0.5, ge=0)
    """A job reports progress only once it has run this long (a shorter job sends `started` and
    its end, the stage timings in `completed`); after that every stage change, and within a
    stage at most one event per interval. 0 reports every stage."""
    cancel_poll_s: float = Field(default=1.0, gt=0)
    """How often a running job's checkpoints ask the job store for a cancel request. Cancels
    reach running jobs at once through the control exchange (every worker hears every cancel);
    the store is the fallback for one missed while the worker reconnected."""
    journal_fsync: bool = True
    """fsync the per-job event journal; only benchmarks on throw-away data turn it off."""
    pod_name: str | None = Field(default=None, validation_alias="POD_NAME")
    pod_namespace: str | None = Field(default=None, validation_alias="POD_NAMESPACE")
    allow_chaos: bool = False
    """Let the `sleep` processor's chaos options kill this worker (chaos tests only)."""
    deletion_cost: bool = False
    """Set controller.kubernetes.io/pod-deletion-cost on this pod while busy (needs RBAC)."""
    media_max_bytes: int = Field(default=2_000_000_000, ge=1)
    """Largest source or target file a faceswap job accepts, in bytes (checked before reading)."""
    media_max_pixels: int = Field(default=40_000_000, ge=1)
    """Largest width*height of an image or video frame; checked from the header, before any
    decode, so a decompression bomb is refused without allocating its pixels."""
    media_max_frames: int = Field(default=18_000, ge=1)
    """Most frames a video target may have (10 min at 30 fps)."""
    media_max_duration_s: float = Field(default=600.0, gt=0)
    """Longest video target, in seconds."""
    media_image_formats: str = "jpeg,png,webp,bmp,heic,avif"
    """Image formats accepted as source or target (sniffed from content, not the extension)."""
    media_video_formats: str = "mp4,mov,webm,matroska,avi"
    """Video containers accepted as target (sniffed from content, not the extension)."""
    fetch_allow: str = ""
    """https:// inputs: comma-separated CIDRs or host:port a fetch may reach although they are
    private, loopback or link-local (refused otherwise, after DNS and on every redirect)."""
    fetch_connect_timeout_s: float = Field(default=10.0, gt=0)
    fetch_read_timeout_s: float = Field(default=60.0, gt=0)
    """Longest silence while reading an https:// input."""
    fetch_max_redirects: int = Field(default=5, ge=0)
    scratch_dir: Path | None = None
    """Local space for inputs fetched from s3:// or https:// and results before their upload;
    default: the system temp dir (an emptyDir in the chart)."""

    @field_validator("emulated_model_ms")
    @classmethod
    def _emulated(cls, v: str) -> str:
        parse_model_ms(v)
        return v

    def emulated_times(self) -> dict[str, tuple[float, float]]:
        """emulated_model_ms parsed: model name -> (base ms, ms per row)."""
        return parse_model_ms(self.emulated_model_ms)

    def providers(self) -> list[str]:
        names = {
            "tensorrt": "TensorrtExecutionProvider",
            "cuda": "CUDAExecutionProvider",
            "cpu": "CPUExecutionProvider",
        }
        out = []
        for item in self.execution_providers.split(","):
            key = item.strip().lower()
            if key not in names:
                raise SettingsError(
                    f"FACEFLEET_EXECUTION_PROVIDERS: unknown provider {item!r}; use {list(names)}"
                )
            out.append(names[key])
        if "CPUExecutionProvider" not in out:
            out.append("CPUExecutionProvider")
        return out


EMULATED_MODELS = ("detect", "embed", "swap", "enhance")


def parse_model_ms(text: str) -> dict[str, tuple[float, float]]:
    """`detect=10,swap=6+2` -> {"detect": (10, 0), "swap": (6, 2)}: base ms and ms per batch
    row; models not named take no time."""
    out: dict[str, tuple[float, float]] = {}
    for item in _comma_list(text):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in EMULATED_MODELS:
            raise ValueError(
                f"{item!r}: use name=ms or name=ms+ms_per_row, names {EMULATED_MODELS}"
            )
        base, _, per_row = value.partition("+")
        try:
            times = (float(base), float(per_row) if per_row else 0.0)
        except ValueError:
            raise ValueError(f"{item!r}: the times are numbers of milliseconds") from None
        if not all(0 <= t <= 60_000 for t in times):
            raise ValueError(f"{item!r}: each time must be in [0, 60000] ms")
        out[name] = times
    return out


WEBHOOK_RETRY_SCHEDULE = "5s,30s,2m,10m,30m,1h,2h,5h,10h,10h"
"""Delays before the 2nd, 3rd... POST of a webhook delivery: 11 attempts over 28.7 hours."""
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration_s(text: str) -> float:
    """`250ms`, `5s`, `2m`, `10h`, `1d`, or plain seconds (`0.5`)."""
    value = text.strip().lower()
    for unit in ("ms", "s", "m", "h", "d"):
        if value.endswith(unit) and value[: -len(unit)].replace(".", "", 1).isdigit():
            return float(value[: -len(unit)]) * _DURATION_UNITS[unit]
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (250ms, 5s, 2m, 10h, 1d)") from None


def parse_webhook_secrets(text: str) -> tuple[bytes, ...]:
    """The HMAC keys of FACEFLEET_WEBHOOK_SECRET: one or more `whsec_<base64>` secrets separated
    by spaces or commas (several during a rotation: every POST is signed with each). Each key
    must decode to 24-64 bytes, the Standard Webhooks range."""
    import base64
    import binascii

    entries = [e for e in text.replace(",", " ").split() if e]
    if not entries:
        raise ValueError("required: one or more whsec_<base64> secrets (space-separated)")
    keys = []
    for n, entry in enumerate(entries, 1):
        if not entry.startswith("whsec_"):
            raise ValueError(f"secret #{n} does not start with whsec_ (use whsec_<base64 key>)")
        raw = entry[len("whsec_") :]
        try:
            key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"secret #{n}: the part after whsec_ is not base64") from None
        if not 24 <= len(key) <= 64:
            raise ValueError(
                f"secret #{n} decodes to {len(key)} bytes; use 24-64 random bytes, e.g. "
                "whsec_$(openssl rand -base64 32)"
            )
        keys.append(key)
    return tuple(keys)


class WebhookSettings(CommonSettings):
    """Settings of `facefleet webhooks`, the process that POSTs job events to webhook URLs."""

    webhook_secret: SecretStr
    """Required: `whsec_<base64>` (Standard Webhooks); several separated by spaces or commas
    during a rotation (each POST then carries one signature per secret)."""
    webhook_concurrency: int = Field(default=8, ge=1, le=256)
    """POSTs at once; the AMQP prefetch is 4x this. One job's events go one at a time, in seq
    order, so a slow receiver holds up only its own jobs."""
    webhook_timeout_s: float = Field(default=15.0, gt=0, le=300)
    """Longest wait for a receiver's answer (connect, then status line), per attempt."""
    webhook_retry_schedule: Annotated[tuple[float, ...], NoDecode] = Field(
        default=WEBHOOK_RETRY_SCHEDULE, validate_default=True
    )
    """Comma-separated delays before each further attempt (`5s,30s,2m,...`); after the last one
    fails, the delivery is parked in `<queue>.failed`. Default: 11 attempts over 28.7 h."""
    webhook_queue: str = Field(default="facefleet.webhooks", pattern=r"^[A-Za-z0-9_.:-]{1,200}$")
    """Name of the sender's queue (its retry and failed queues are named after it)."""
    webhook_allow_http: bool = False
    """Also POST to plain http:// URLs on public addresses (allow-listed targets may always)."""
    webhook_cache_size: int = Field(default=10_000, ge=1)
    """Jobs whose webhook settings are kept in memory (otherwise read from the job store)."""
    webhook_drain_timeout_s: float = Field(default=30.0, ge=0)
    """After SIGTERM, how long POSTs already taken may finish; the rest go back to the queue."""
    fetch_allow: str = ""
    """Comma-separated CIDRs or host:port webhook URLs may reach although private, loopback or
    link-local (FACEFLEET_FETCH_ALLOW, the same list as the workers' https:// inputs)."""
    health_host: str = "127.0.0.1"
    health_port: int = Field(default=9465, ge=0, le=65535)
    """HTTP port for /healthz, /readyz and /metrics; 0 disables it."""

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, v: SecretStr) -> SecretStr:
        parse_webhook_secrets(v.get_secret_value())
        return v

    @field_validator("webhook_retry_schedule", mode="before")
    @classmethod
    def _schedule(cls, v: Any) -> Any:
        items = _comma_list(v) if isinstance(v, str) else v
        delays = tuple(parse_duration_s(i) if isinstance(i, str) else float(i) for i in items)
        if not delays:
            raise ValueError("at least one delay is needed")
        if any(not 0.001 <= d <= 24 * 86400 for d in delays):
            raise ValueError("each delay must be between 1ms and 24 days (the broker's TTL)")
        return delays

    def webhook_keys(self) -> tuple[bytes, ...]:
        return parse_webhook_secrets(self.webhook_secret.get_secret_value())


class ScalerSettings(ProducerSettings):
    """Settings of `facefleet scaler`, KEDA's external scaler (keda/README.md)."""

    scaler_host: str = "127.0.0.1"
    """Address the gRPC server listens on (the chart sets 0.0.0.0)."""
    scaler_port: int = Field(default=6000, ge=0, le=65535)
    """gRPC port KEDA's `scalerAddress` names; 0 picks a free one (tests)."""
    scaler_tls_cert: Path | None = None
    """PEM certificate of the gRPC server; with scaler_tls_key it serves TLS only."""
    scaler_tls_key: Path | None = Field(default=None, validate_default=True)
    scaler_tls_client_ca: Path | None = None
    """When set, clients (KEDA) must present a certificate this CA signed (mutual TLS)."""
    scaler_forecast_days: int = Field(default=5, ge=1, le=7)
    """Days of per-minute arrivals the `predictive` forecast uses; the events stream is replayed
    from this long ago at start (it keeps 7 days)."""
    scaler_broker_ttl_s: float = Field(default=1.0, ge=0)
    """How long one read of the management API's queue counts is reused."""
    scaler_stream_interval_s: float = Field(default=1.0, gt=0)
    """How often StreamIsActive re-checks activation (it sends on change)."""
    health_host: str = "127.0.0.1"
    health_port: int = Field(default=9466, ge=0, le=65535)
    """HTTP port for /metrics (the cost model's fit and the scaler's readings); 0 disables it."""

    @field_validator("scaler_tls_key")
    @classmethod
    def _tls_pair(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if (v is None) != (info.data.get("scaler_tls_cert") is None):
            raise ValueError("set both FACEFLEET_SCALER_TLS_CERT and FACEFLEET_SCALER_TLS_KEY")
        return v


def die(error: SettingsError) -> None:
    print(f"facefleet: {error.message}", file=sys.stderr)


def environ_snapshot() -> dict[str, str]:
    """The FACEFLEET_* part of the environment, for diagnostics (never includes AMQP_URL)."""
    return {k: v for k, v in os.environ.items() if k.startswith("FACEFLEET_")}
