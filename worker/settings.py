"""Every setting of the service, read once from the environment (``LLM_WORKER_*``) or ``.env``.

Nothing else in the package reads the environment: a :class:`Settings` object is built at the
edge (the CLI, the Celery app's configure hook, :class:`worker.Client`) and passed down.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    AnyUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    UrlConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from worker.accounting.pricing import Budget, Price
from worker.broker import band_of, is_amqp_broker
from worker.catalogue import (
    DEFAULT_MODELS,
    SEED_MODELS,  # noqa: F401  (its historical home; callers import it here)
    ModelCatalogue,
    ModelName,
    ModelSpec,
    alias_map,
)
from worker.connections.urls import is_sentinel_url, parse_sentinel_url
from worker.errors import SettingsError

ENV_PREFIX = "LLM_WORKER_"
#: Queue names and key prefixes: letters, digits, ``_ . : -``, nothing after (``\Z``).
NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,200}\Z"

_PlainRedisUrl = TypeAdapter(
    Annotated[
        AnyUrl, UrlConstraints(allowed_schemes=["redis", "rediss", "unix"], host_required=False)
    ]
)
_PlainBrokerUrl = TypeAdapter(
    Annotated[
        AnyUrl,
        UrlConstraints(
            allowed_schemes=["redis", "rediss", "unix", "amqp", "amqps", "pyamqp", "memory"],
            host_required=False,
        ),
    ]
)


def _url_checker(plain: TypeAdapter[AnyUrl]) -> Any:
    """A URL as text: kombu's Sentinel form (``sentinel://h:p;sentinel://h:p/db``), checked
    and normalised, or a plain URL checked by ``plain``."""

    def check(value: Any) -> str:
        if isinstance(value, str) and is_sentinel_url(value):
            return parse_sentinel_url(value).normalised()
        return str(plain.validate_python(value))

    return check


RedisUrl = Annotated[str, BeforeValidator(_url_checker(_PlainRedisUrl))]
BrokerUrl = Annotated[str, BeforeValidator(_url_checker(_PlainBrokerUrl))]
HttpUrl = Annotated[AnyUrl, UrlConstraints(allowed_schemes=["http", "https"])]
PositiveSeconds = Annotated[float, Field(gt=0)]
#: A tenant's name (the producers' rule, worker.client.core.TENANT_PATTERN).
TENANT_PATTERN = r"^[A-Za-z0-9_.-]{1,64}\Z"
#: Fallback models one model (or one job) may name.
MAX_FALLBACK_MODELS = 8
#: A tenant's queued jobs at most, unless TENANT_MAX_QUEUED says otherwise: one full Message
#: Batch (100,000 requests) fits.
DEFAULT_TENANT_MAX_QUEUED = 100_000


def usable_cpus() -> int:
    """The cores this process may use: its CPU affinity, within a cgroup's CPU quota (a
    container limited to 2 CPUs on a 64-core host counts 2)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # cgroup v1, or no limit
    return max(1, cpus)


class RateLimit(BaseModel):
    """Limits for one limit key (a model, or ``default``); absent means unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: int | None = Field(default=None, gt=0)
    input_tpm: int | None = Field(default=None, gt=0)
    output_tpm: int | None = Field(default=None, gt=0)
    max_in_flight: int | None = Field(default=None, gt=0)


class Settings(BaseSettings):
    """The service's configuration. Durations are seconds and end in ``_s``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        validate_default=True,
        # Python's re, for NAME_PATTERN's \Z (the default Rust engine has no \Z).
        regex_engine="python-re",
    )

    redis_url: RedisUrl = "redis://localhost:6379/0"
    broker_url: BrokerUrl | None = None
    # With a broker other than the results Redis: how long a job's message may wait in the
    # outbox for the broker's confirmation before a worker's sweeper publishes it again.
    outbox_grace_s: PositiveSeconds = 5.0
    # Redis under Sentinel: the master's service name, needed with a sentinel:// URL; the
    # Sentinels' password (their requirepass) and the Redis servers' password, both secrets.
    # REDIS_PASSWORD also serves a plain redis:// URL that carries none.
    redis_sentinel_master: str | None = Field(default=None, pattern=NAME_PATTERN)
    redis_sentinel_password: SecretStr | None = None
    redis_password: SecretStr | None = None
    # Job creation and terminal writes wait (Redis WAIT) until this many replicas have them,
    # for at most REDIS_REPLICAS_ACK_TIMEOUT_S; 0: no wait. See docs/high-availability.md.
    redis_min_replicas_ack: int = Field(default=0, ge=0, le=16)
    redis_replicas_ack_timeout_s: PositiveSeconds = 2.0
    api_base_url: HttpUrl = AnyUrl("https://api.woagent.net")
    api_key: SecretStr | None = None
    # The catalogue: every model's max_tokens maximum (and context window, aliases); JSON,
    # replaces the defaults whole. ALLOWED_MODELS unset (None) means the catalogue's models.
    models: dict[ModelName, ModelSpec] = Field(default_factory=lambda: dict(DEFAULT_MODELS))
    allowed_models: Annotated[tuple[ModelName, ...] | None, NoDecode] = None
    max_request_bytes: int = Field(default=1_048_576, ge=1024)
    # One upstream response read at most this far: a non-streamed body, or a whole stream (which
    # bounds the SSE decoder's buffers and the message); past it the call fails, not the worker.
    max_response_bytes: int = Field(default=16 * 1_048_576, ge=65_536)
    # How long a worker's writer lets chunk writes of different streams gather into one round
    # trip to Redis (a write someone waits for goes at once): CPU per stream against chunk
    # delay (docs/performance.md). 0: each flush as soon as the last round trip ended.
    publish_linger_s: float = Field(default=0.001, ge=0, le=0.05)
    # The dead-letter stream (llmw:dlq) keeps at most this many entries (approximately, the
    # oldest go first), each payload at most this many bytes (past it: its length, sha256 and
    # head), so its memory is bounded under noeviction.
    dead_letters_max: int = Field(default=10_000, ge=1)
    dead_letter_payload_bytes: int = Field(default=65_536, ge=1024)

    max_attempts: int = Field(default=5, ge=1, le=100)
    backoff_base_s: PositiveSeconds = 0.5
    backoff_max_s: PositiveSeconds = 30.0
    retry_after_max_s: PositiveSeconds = 60.0
    retry_mid_stream: bool = True
    # Models to try when a job's model keeps failing: JSON {"<model>": ["<model>", ...]}; a
    # job's own fallback_models replace its model's list. After this many failures on one
    # model that blame the model (5xx, 529, a long 429, overloaded mid-stream), the next
    # attempt goes to the next model (see docs/fallbacks-and-cost.md).
    fallbacks: dict[ModelName, tuple[ModelName, ...]] = Field(default_factory=dict)
    fallback_after_attempts: int = Field(default=2, ge=1, le=100)
    # Per model, USD per million tokens: {"<model>": {"input_per_mtok": 0.27, ...}}.
    prices: dict[ModelName, Price] = Field(default_factory=dict)
    # Per tenant: {"<tenant>": {"usd_per_day": 10, "usd_per_month": 200}}. A tenant at a
    # budget has submits refused; its queued jobs are held (or failed: BUDGET_ACTION) and
    # come back every BUDGET_HOLD_S to look again.
    budgets: dict[str, Budget] = Field(default_factory=dict)
    budget_action: Literal["hold", "fail"] = "hold"
    budget_hold_s: PositiveSeconds = 60.0

    connect_timeout_s: PositiveSeconds = 10.0
    first_byte_timeout_s: PositiveSeconds = 120.0
    idle_timeout_s: PositiveSeconds = 60.0
    job_deadline_s: PositiveSeconds = 900.0
    # The default life of a job of a batch file (`llm-worker batch`) and of a gateway Message
    # Batch: a large batch behind a rate limit runs for hours (Message Batches allow 24 h).
    batch_deadline_s: PositiveSeconds = 86_400.0
    gateway_batch_deadline_s: PositiveSeconds = 86_400.0
    visibility_timeout_s: PositiveSeconds | None = None
    # A running job's lease; its worker renews it every third of this. A killed worker's jobs
    # are taken over once it lapses.
    lease_ttl_s: PositiveSeconds = 20.0
    max_deliveries: int = Field(default=5, ge=1)
    # On SIGTERM, how long running streams may go on before they are handed back (LLM
    # streams of one to three minutes are common; the chart's grace period exceeds this).
    shutdown_grace_s: float = Field(default=300.0, ge=0)
    # How long Redis commands retry a lost connection (or LOADING) before the error is
    # raised; a job that meets it goes back to the queue, it does not fail.
    redis_retry_s: PositiveSeconds = 30.0

    rate_limits: dict[str, RateLimit] = Field(default_factory=dict)
    # Queued jobs (submitted, not yet started) a tenant may have at once; JSON
    # `{"default": N, "<tenant>": N}` or a bare number for every tenant. Jobs without a tenant
    # have no quota.
    tenant_max_queued: dict[str, int] = Field(
        default_factory=lambda: {"default": DEFAULT_TENANT_MAX_QUEUED}
    )
    # The longest a job waits for the limiter inside a worker before it goes back to the
    # queue with a countdown (0: never wait in the worker).
    rate_limit_max_wait_s: float = Field(default=60.0, ge=0)
    # The period the "per minute" limits count over; shorter only to mirror a provider that
    # counts differently, or to keep tests and benchmarks short.
    rate_limit_period_s: PositiveSeconds = 60.0
    # How long a killed worker's in-flight slot stays taken; live calls renew theirs.
    rate_limit_lease_ttl_s: PositiveSeconds = 60.0
    # Requests are paced: in any window this long, at most its share of `rpm` (5 s of 120 rpm
    # is 10), so a backlog does not send a minute's requests in its first second. 0 (or a
    # window as long as the period) lets a whole period's requests go at once.
    rate_limit_burst_s: float = Field(default=5.0, ge=0)
    result_ttl_s: int = Field(default=86_400, ge=1)

    # Traffic classes (docs/traffic-classes.md): a priority that waits unserved gains one
    # level per this many seconds, so no priority starves (0: strict priority).
    priority_aging_s: float = Field(default=60.0, ge=0)
    # Shares of the slots between tenants waiting at the same priority ({"tenant": weight});
    # a tenant not named has weight 1.
    tenant_weights: dict[str, float] = Field(default_factory=dict)
    queue: str = Field(default="llmw", pattern=NAME_PATTERN)
    pool: Literal["gevent", "eventlet", "threads", "prefork", "solo"] = "gevent"
    concurrency: int = Field(default=200, ge=1, le=10_000)
    # `llm-worker run` starts this many worker processes, each with CONCURRENCY jobs, under
    # one supervisor that serves /metrics and /healthz for all (gevent, threads, solo).
    # "auto" (the default): one per usable core (prefork: 1, it forks its own children).
    processes: int = Field(default=0, ge=1, le=64, validate_default=True)
    metrics_port: int = Field(default=9464, ge=0, le=65_535)
    health_stale_s: PositiveSeconds = 30.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "console"] = "json"
    log_content: bool = False
    key_prefix: str = Field(default="llmw", pattern=NAME_PATTERN)

    # `llm-worker gateway`: the producers' API keys, comma-separated `name:key` pairs (a bare
    # key's tenant is named by a short hash of it), and/or a file of `name:sha256-of-key` lines
    # reread on SIGHUP or when it changes (it will not start without a key); the largest
    # request body it reads (a batch create), and its port.
    gateway_api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    gateway_api_keys_file: Path | None = None
    # The gateway's own bounds: requests handled at once (overall and per tenant; past them a
    # 503 or 429 with retry-after) and open event streams (SSE) likewise.
    gateway_max_requests: int = Field(default=2000, ge=1, le=1_000_000)
    gateway_tenant_max_requests: int = Field(default=500, ge=1, le=1_000_000)
    gateway_max_streams: int = Field(default=1000, ge=1, le=1_000_000)
    gateway_tenant_max_streams: int = Field(default=250, ge=1, le=1_000_000)
    gateway_max_body_bytes: int = Field(default=33_554_432, ge=1024)
    # The gateway's Redis connections: at most this many at once (each live event stream holds
    # one while it waits); past it a request waits GATEWAY_REDIS_WAIT_S, then gets a 503.
    gateway_redis_connections: int = Field(default=1000, ge=4, le=100_000)
    gateway_redis_wait_s: PositiveSeconds = 5.0
    # The gateway's fast path (docs/gateway.md): a /v1/messages job that nothing of its
    # priority or higher waits ahead of, and that the rate limiter admits at once, is run by
    # the gateway itself (written first, its message kept for a worker should the gateway
    # die), at most this many at once; off, every job goes through the queue.
    gateway_fast_path: bool = True
    gateway_fast_path_jobs: int = Field(default=64, ge=1, le=10_000)
    gateway_port: int = Field(default=8000, ge=0, le=65_535)
    # The gateway's Prometheus /metrics, on a port of its own (0: not served).
    gateway_metrics_port: int = Field(default=9465, ge=0, le=65_535)

    @field_validator("allowed_models", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        # A comma-separated list reads better in an env file than JSON; JSON lists work too.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                try:
                    return tuple(json.loads(text))
                except ValueError:
                    raise ValueError(
                        'is not a valid JSON list; expected e.g. ["deepseek-ai/DeepSeek-V3"] or '
                        "a comma-separated list"
                    ) from None
            return tuple(part.strip() for part in text.split(",") if part.strip())
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            import json

            try:
                return json.loads(value)
            except ValueError:
                raise ValueError(
                    'is not valid JSON; expected e.g. {"deepseek-ai/DeepSeek-V3": '
                    '{"max_tokens": 8192}}'
                ) from None
        return value

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        if not value:
            raise ValueError(
                "lists no model; name at least one (ALLOWED_MODELS='' allows any model)"
            )
        alias_map(value)  # refuses an alias that is a model's name or names two models
        return value

    @field_validator("gateway_api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("gateway_api_keys")
    @classmethod
    def _check_key_specs(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        from worker.accounting.tenancy import key_spec_problem

        for index, spec in enumerate(value):
            problem = key_spec_problem(spec.get_secret_value())
            if problem:
                # Never the spec itself: it holds a secret.
                raise ValueError(f"entry {index + 1}: {problem}")
        return value

    @field_validator("tenant_max_queued", mode="before")
    @classmethod
    def _parse_quota(cls, value: Any) -> Any:
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError(
                    'is not valid JSON; expected e.g. {"default": 100000, "team-a": 5000}'
                ) from None
        if isinstance(value, int) and not isinstance(value, bool):
            return {"default": value}
        return value

    @field_validator("tenant_max_queued")
    @classmethod
    def _check_quota(cls, value: dict[str, int]) -> dict[str, int]:
        from worker.accounting.tenancy import valid_tenant

        for name, quota in value.items():
            if name != "default" and not valid_tenant(name):
                raise ValueError(
                    f"{name[:40]!r} is not a tenant name (1-64 of letters, digits, '_', '.', "
                    "'-') or 'default'"
                )
            if quota < 1:
                raise ValueError(f"the quota of {name!r} must be at least 1")
        return value

    @field_validator("gateway_api_keys_file", mode="before")
    @classmethod
    def _empty_path_is_none(cls, value: Any) -> Any:
        # ``${LLM_WORKER_GATEWAY_API_KEYS_FILE:-}`` in a compose file: no file.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator(
        "redis_sentinel_password", "redis_password", "redis_sentinel_master", mode="before"
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        # docker-compose and the chart pass unset optional values as empty strings.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        # docker-compose passes ``${LLM_WORKER_API_KEY:-}`` as an empty string: no key.
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return value

    @field_validator("fallbacks", "prices", "budgets", mode="before")
    @classmethod
    def _parse_json_object(cls, value: Any) -> Any:
        if isinstance(value, str):
            import json

            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("is not valid JSON; expected a JSON object") from None
        return value

    @field_validator("fallbacks")
    @classmethod
    def _check_fallbacks(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for model, names in value.items():
            if len(names) > MAX_FALLBACK_MODELS:
                raise ValueError(
                    f"{model!r} lists {len(names)} fallbacks; at most {MAX_FALLBACK_MODELS}"
                )
        return value

    @field_validator("budgets")
    @classmethod
    def _check_tenants(cls, value: dict[str, Budget]) -> dict[str, Budget]:
        for tenant in value:
            if not re.match(TENANT_PATTERN, tenant):
                raise ValueError(
                    f"tenant {tenant[:40]!r} must be 1-64 letters, digits, '_', '.' or '-'"
                )
        return value

    @field_validator("rate_limits", mode="before")
    @classmethod
    def _parse_limits(cls, value: Any) -> Any:
        # The environment source decodes JSON itself; a string passed in code (or by
        # settings_from_env) gets the same treatment.
        if isinstance(value, str):
            import json

            try:
                return json.loads(value)
            except ValueError:
                raise ValueError(
                    'is not valid JSON; expected e.g. {"default": {"rpm": 60}}'
                ) from None
        return value

    @field_validator("tenant_weights", mode="before")
    @classmethod
    def _parse_weights(cls, value: Any) -> Any:
        if isinstance(value, str):
            import json

            try:
                return json.loads(value)
            except ValueError:
                raise ValueError(
                    'is not valid JSON; expected e.g. {"acme": 3, "globex": 1}'
                ) from None
        return value

    @field_validator("tenant_weights")
    @classmethod
    def _check_weights(cls, value: dict[str, float]) -> dict[str, float]:
        for tenant, weight in value.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", tenant):
                raise ValueError(
                    f"tenant {tenant[:40]!r} is not a tenant name (1-64 of A-Z a-z 0-9 _ . -)"
                )
            if not 0 < weight <= 1000:
                raise ValueError(f"tenant {tenant!r}: weight {weight} must be > 0 and <= 1000")
        return value

    @field_validator("rate_limits")
    @classmethod
    def _check_limit_keys(cls, value: dict[str, RateLimit]) -> dict[str, RateLimit]:
        for key in value:
            if not key.strip() or len(key) > 200:
                raise ValueError(
                    f"limit key {key[:40]!r} must be a model name, a metadata limit_key or "
                    "'default' (1-200 characters)"
                )
        return value

    @field_validator("processes", mode="before")
    @classmethod
    def _auto_processes(cls, value: Any, info: ValidationInfo) -> Any:
        if (value == 0 and not isinstance(value, bool)) or (
            isinstance(value, str) and value.strip().lower() == "auto"
        ):
            if info.data.get("pool", "gevent") == "prefork":
                return 1
            return min(64, usable_cpus())
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_relations(self) -> Settings:
        sentinel_urls = [
            name
            for name, url in (("REDIS_URL", self.redis_url), ("BROKER_URL", self.broker_url))
            if url is not None and is_sentinel_url(url)
        ]
        if sentinel_urls and not self.redis_sentinel_master:
            raise ValueError(
                f"{ENV_PREFIX}REDIS_SENTINEL_MASTER must name the Sentinel service (e.g. "
                f"mymaster) when {ENV_PREFIX}{sentinel_urls[0]} is a sentinel:// URL"
            )
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("backoff_max_s must be at least backoff_base_s")
        if self.processes > 1 and self.pool == "prefork":
            raise ValueError(
                "processes above 1 is for the gevent, threads and solo pools; prefork already "
                "runs CONCURRENCY processes"
            )
        if is_amqp_broker(self.effective_broker_url) and band_of(self.queue) is not None:
            raise ValueError(
                f"{ENV_PREFIX}QUEUE ({self.queue}) ends in .high or .low, the names of a "
                "queue's priority bands on an AMQP broker; choose another name"
            )
        aliases = alias_map(self.models)
        for name, keys in (("PRICES", self.prices), ("FALLBACKS", self.fallbacks)):
            for key in keys:
                if key in aliases:
                    raise ValueError(
                        f"{ENV_PREFIX}{name} names {key!r}, an alias of {aliases[key]!r}: "
                        "name the model (jobs carry the model's name)"
                    )
        visibility_s = self.effective_visibility_timeout_s
        if visibility_s <= self.lease_ttl_s:
            raise ValueError(
                f"{ENV_PREFIX}VISIBILITY_TIMEOUT_S ({visibility_s:g}) must exceed "
                f"{ENV_PREFIX}LEASE_TTL_S ({self.lease_ttl_s:g}): a delivery comes back when its "
                "worker stopped refreshing it for that long, and its lease must have lapsed by "
                "then, or the copy only waits behind it"
            )
        if self.result_ttl_s <= 2 * visibility_s:
            # A job that ended just before its worker died is delivered again after the
            # visibility timeout; its record must still say that it ended.
            raise ValueError(
                f"{ENV_PREFIX}RESULT_TTL_S ({self.result_ttl_s}) must exceed twice "
                f"{ENV_PREFIX}VISIBILITY_TIMEOUT_S ({visibility_s:g}): an ended job's record "
                "must outlive any delivery of its message, or the job could run again"
            )
        return self

    @cached_property
    def catalogue(self) -> ModelCatalogue:
        """The models with ALLOWED_MODELS applied (see :mod:`worker.catalogue`)."""
        return ModelCatalogue.build(self.models, self.allowed_models)

    @property
    def upstream_name(self) -> str:
        """The upstream as messages to clients name it: its host."""
        return self.api_base_url.host or str(self.api_base_url)

    @property
    def effective_broker_url(self) -> str:
        return str(self.broker_url or self.redis_url)

    @property
    def effective_visibility_timeout_s(self) -> float:
        """How long a delivery whose worker stopped refreshing it stays invisible.

        A worker refreshes every delivery it holds (running, parked or due later) on its
        restore schedule and with each lease renewal, so this bounds how long a dead worker's
        jobs wait, not how long a job may run. By default one and a half lease TTLs: the
        lease has lapsed by the time the message comes back, so the job restarts at once.
        """
        if self.visibility_timeout_s is not None:
            return self.visibility_timeout_s
        return 1.5 * self.lease_ttl_s

    def tenant_names(self) -> set[str]:
        """The tenants the configuration names (metric label values): keys, the keys file,
        quota overrides, budgets, weights."""
        from worker.accounting.tenancy import configured_tenants

        names = configured_tenants(
            (k.get_secret_value() for k in self.gateway_api_keys),
            self.tenant_max_queued,
            self.gateway_api_keys_file,
        )
        return names | set(self.budgets) | set(self.tenant_weights)

    def max_queued_for(self, tenant: str) -> int | None:
        """The most queued jobs ``tenant`` may have (None: no quota)."""
        return self.tenant_max_queued.get(tenant, self.tenant_max_queued.get("default"))

    def rate_limit_for(self, key: str) -> RateLimit | None:
        return self.rate_limits.get(key) or self.rate_limits.get("default")

    def api_key_value(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key else None

    def secret_values(self) -> list[str]:
        """Every secret these settings hold (the API key, the Redis and Sentinel passwords,
        a password inside a Redis or broker URL), for the log redactor."""
        values = [self.api_key_value() or ""]
        for secret in (self.redis_password, self.redis_sentinel_password):
            values.append(secret.get_secret_value() if secret is not None else "")
        for url in (self.redis_url, self.broker_url or ""):
            for part in url.split(";"):
                with contextlib.suppress(ValueError):
                    values.append(unquote(urlsplit(part).password or ""))
        return [value for value in values if value]


def settings_from_env(env: Mapping[str, str]) -> Settings:
    """Settings as a child process given ``env`` would read them (``dev``, ``demo``, tests)."""
    return load_settings(
        **{
            name[len(ENV_PREFIX) :].lower(): value
            for name, value in env.items()
            if name.startswith(ENV_PREFIX) and not name.startswith(f"{ENV_PREFIX}TEST_")
        }
    )


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment; a bad value raises :class:`SettingsError` naming it."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError.from_validation(exc, ENV_PREFIX, Settings.model_fields) from None
    except PydanticSettingsError as exc:
        # Raised before validation when a complex value (JSON) does not parse.
        match = re.search(r'field "(\w+)"', str(exc))
        name = ENV_PREFIX + (match.group(1).upper() if match else "*")
        raise SettingsError([(name, "is not valid JSON")]) from None
