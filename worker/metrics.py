"""Every Prometheus metric the service exports, in one place.

Labels are bounded: ``model`` (the configured models, anything else ``other``), ``outcome``
(four terminal states), ``reason`` (a fixed set of retry reasons), ``status`` (known HTTP
codes, else ``4xx``/``5xx``, or ``network``), ``queue`` and ``state``. Never a job id.

The ``model`` label is folded where it is set, by the metric itself: every metric with that
label is a :class:`ModelCounter`, :class:`ModelHistogram` or :class:`ModelGauge`, whose
``labels()`` passes the model through :func:`model_label`. A model is known once a process's
settings registered their catalogue (:func:`add_model_labels`: the worker's runtime, the
clients and the scrape do); before that, the default catalogue's models are.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Self

from prometheus_client import Counter, Gauge, Histogram

from worker.catalogue import DEFAULT_MODELS

#: The ``model`` label of every model outside the catalogue and the allow list.
OTHER_MODEL = "other"
_MODEL_LABEL = "model"


class _KnownModels:
    """The models this process's settings configured. The set is replaced whole (never
    mutated) under the lock, so a reader needs no lock."""

    def __init__(self) -> None:
        self.names = frozenset(DEFAULT_MODELS)
        self._lock = threading.Lock()

    def add(self, names: Iterable[str]) -> None:
        new = frozenset(names)
        if new <= self.names:
            return
        with self._lock:
            self.names = self.names | new


_known = _KnownModels()
_known_tenants = _KnownModels()
_known_tenants.names = frozenset()

#: The ``tenant`` label of a job with no tenant, and of a tenant no setting names.
NO_TENANT = "none"
OTHER_TENANT = "other"
_TENANT_LABEL = "tenant"


def add_tenant_labels(names: Iterable[str]) -> None:
    """Let these tenants be ``tenant`` label values in this process: the configured names
    (gateway keys, tenant weights, quotas, budgets), so the label set stays bounded."""
    _known_tenants.add(names)


def tenant_label(tenant: str | None) -> str:
    """A bounded ``tenant`` label: a configured tenant's name, ``none`` for a job without a
    tenant, else ``other``."""
    if not tenant:
        return NO_TENANT
    return tenant if tenant in _known_tenants.names else OTHER_TENANT


def add_model_labels(names: Iterable[str]) -> None:
    """Let these models be ``model`` label values in this process (from its settings).

    Only ever adds: a process holding two settings (a producer beside a worker) labels the
    models of both, and the set stays bounded by configuration.
    """
    _known.add(names)


def model_label(model: str) -> str:
    """A bounded ``model`` label: the model's name when configured, else ``other``."""
    return model if model in _known.names else OTHER_MODEL


def _fold(
    names: Sequence[str], values: tuple[object, ...], kwargs: dict[str, object]
) -> tuple[tuple[object, ...], dict[str, object]]:
    """``labels()`` arguments with the ``model`` and ``tenant`` values folded; anything
    malformed is left for prometheus-client to refuse."""
    for label, fold in ((_MODEL_LABEL, model_label), (_TENANT_LABEL, _tenant_fold)):
        if label in kwargs:
            kwargs = {**kwargs, label: fold(str(kwargs[label]))}
        elif label in names and len(values) == len(names):
            at = list(names).index(label)
            values = (*values[:at], fold(str(values[at])), *values[at + 1 :])
    return values, kwargs


def _tenant_fold(value: str) -> str:
    # Already folded values pass through; "" is no tenant (pass ``tenant or ""``).
    if value in {NO_TENANT, OTHER_TENANT}:
        return value
    return tenant_label(value)


class ModelCounter(Counter):
    """A counter with a ``model`` (and maybe a ``tenant``) label, folded by :func:`model_label`
    (and :func:`tenant_label`)."""

    def labels(self, *labelvalues: object, **labelkwargs: object) -> Self:
        values, kwargs = _fold(self._labelnames, labelvalues, labelkwargs)
        return super().labels(*values, **kwargs)


class ModelHistogram(Histogram):
    """A histogram with a ``model`` label, folded by :func:`model_label`."""

    def labels(self, *labelvalues: object, **labelkwargs: object) -> Self:
        values, kwargs = _fold(self._labelnames, labelvalues, labelkwargs)
        return super().labels(*values, **kwargs)


class ModelGauge(Gauge):
    """A gauge with a ``model`` label, folded by :func:`model_label`."""

    def labels(self, *labelvalues: object, **labelkwargs: object) -> Self:
        values, kwargs = _fold(self._labelnames, labelvalues, labelkwargs)
        return super().labels(*values, **kwargs)


# LLM calls take from a fraction of a second (a cached short answer) to many minutes (a long
# streamed completion), so the buckets run roughly geometrically from 50 ms to 15 minutes;
# the default prometheus buckets stop at 10 s and would put most jobs in +Inf.
LLM_LATENCY_BUCKETS_S = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    900.0,
)
# Time to first token and limiter waits are shorter: milliseconds to a couple of minutes.
SHORT_LATENCY_BUCKETS_S = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)

KNOWN_STATUSES = frozenset(
    {200, 400, 401, 403, 404, 408, 409, 413, 422, 429, 499, 500, 502, 503, 504, 529}
)


def status_label(status_code: int | None) -> str:
    """A bounded label for an HTTP status; ``network`` when no response arrived."""
    if status_code is None:
        return "network"
    if status_code in KNOWN_STATUSES:
        return str(status_code)
    return f"{status_code // 100}xx"


JOBS_SUBMITTED = ModelCounter(
    "llm_worker_jobs_submitted_total",
    "Jobs enqueued by this producer process (only in a producer that serves its own metrics; "
    "workers export llm_worker_queue_jobs_submitted_total).",
    ["model", "tenant"],
)
# Producers are often short-lived scripts that nobody scrapes; every producer also adds to a
# Redis counter that each worker mirrors here at scrape time. The value is the same on every
# worker of the queue: aggregate with max(), not sum().
QUEUE_JOBS_SUBMITTED = ModelCounter(
    "llm_worker_queue_jobs_submitted_total",
    "Jobs ever submitted to the queue by every producer, by model, read from Redis when "
    "scraped (the same on every worker of the queue: aggregate with max), by model and tenant.",
    ["queue", "model", "tenant"],
)
JOBS_FINISHED = ModelCounter(
    "llm_worker_jobs_finished_total",
    "Jobs that reached a terminal state, by outcome (completed, failed, cancelled, expired) "
    "and tenant.",
    ["model", "outcome", "tenant"],
)
UPSTREAM_REQUESTS = ModelCounter(
    "llm_worker_upstream_requests_total",
    "Upstream HTTP requests by response status (network = no response).",
    ["model", "status"],
)
RETRIES = ModelCounter(
    "llm_worker_retries_total",
    "Upstream attempts that failed and were retried, by reason.",
    ["model", "reason"],
)
JOB_DURATION = ModelHistogram(
    "llm_worker_job_duration_seconds",
    "From the first attempt's start to the terminal event, by outcome.",
    ["model", "outcome"],
    buckets=LLM_LATENCY_BUCKETS_S,
)
QUEUE_WAIT = ModelHistogram(
    "llm_worker_queue_wait_seconds",
    "From submission to the first attempt's start, by the job's priority (0-9).",
    ["model", "priority"],
    buckets=LLM_LATENCY_BUCKETS_S,
)
TIME_TO_FIRST_TOKEN = ModelHistogram(
    "llm_worker_time_to_first_token_seconds",
    "From sending the upstream request to its first content event.",
    ["model"],
    buckets=SHORT_LATENCY_BUCKETS_S,
)
UPSTREAM_LATENCY = ModelHistogram(
    "llm_worker_upstream_latency_seconds",
    "One upstream request, from sending it to the end of its response.",
    ["model"],
    buckets=LLM_LATENCY_BUCKETS_S,
)
RATE_LIMIT_WAIT = ModelHistogram(
    "llm_worker_rate_limit_wait_seconds",
    "Time a job waited for the shared rate limiter before its upstream call.",
    ["model"],
    buckets=SHORT_LATENCY_BUCKETS_S,
)
RATE_LIMIT_COOLDOWNS = ModelCounter(
    "llm_worker_rate_limit_cooldowns_total",
    "Global cooldowns started after the upstream answered 429/529 with a retry-after.",
    ["model"],
)
RATE_LIMIT_REQUEUES = ModelCounter(
    "llm_worker_rate_limit_requeues_total",
    "Jobs sent back to the queue with a countdown because the rate limiter would keep them "
    "waiting longer than RATE_LIMIT_MAX_WAIT_S, by the limit that refused "
    "(cooldown, rpm, input_tpm, output_tpm, in_flight).",
    ["model", "reason"],
)
RATE_LIMIT_REFUNDED_TOKENS = ModelCounter(
    "llm_worker_rate_limit_refunded_tokens_total",
    "Tokens given back to the shared limiter's buckets after a call: what a completed call did "
    "not use of its reservation, and a failed call's reservation that the upstream did not "
    "count (kind: input or output).",
    ["model", "kind"],
)
INPUT_TOKENS = ModelCounter(
    "llm_worker_input_tokens_total",
    "Input tokens billed by the upstream, by model and tenant.",
    ["model", "tenant"],
)
OUTPUT_TOKENS = ModelCounter(
    "llm_worker_output_tokens_total",
    "Output tokens billed by the upstream, by model and tenant.",
    ["model", "tenant"],
)
COST_USD = ModelCounter(
    "llm_worker_cost_usd_total",
    "USD spent on completed jobs: each one's final usage times its answering model's price "
    "(LLM_WORKER_PRICES), by that model and the job's tenant; failed calls cost 0.",
    ["model", "tenant"],
)
FALLBACKS = ModelCounter(
    "llm_worker_fallbacks_total",
    "Jobs that moved from this model to the next of their chain (LLM_WORKER_FALLBACKS), by the "
    "failure that decided it (a retry reason, or model_cooling_down).",
    ["model", "reason"],
)
BUDGET_HOLDS = ModelCounter(
    "llm_worker_budget_holds_total",
    "Deliveries of a job whose tenant was at its budget (LLM_WORKER_BUDGETS), by what was done "
    "(action: hold, the job went back to the queue for BUDGET_HOLD_S; fail, it ended failed).",
    ["tenant", "action"],
)
TENANT_SPEND = Gauge(
    "llm_worker_tenant_spend_usd",
    "A budgeted tenant's spend in the current UTC day or month (period: day, month), read "
    "from Redis when scraped (the same on every worker: aggregate with max).",
    ["tenant", "period"],
    multiprocess_mode="mostrecent",
)
TENANT_BUDGET = Gauge(
    "llm_worker_tenant_budget_usd",
    "A tenant's budget per UTC day or month (LLM_WORKER_BUDGETS), for spend-against-budget "
    "panels and alerts.",
    ["tenant", "period"],
    multiprocess_mode="mostrecent",
)
CHUNKS_PUBLISHED = ModelCounter(
    "llm_worker_chunks_published_total", "Chunk events written to job streams.", ["model"]
)
JOBS_IN_FLIGHT = ModelGauge(
    "llm_worker_jobs_in_flight",
    "Jobs this worker is running now.",
    ["model"],
    multiprocess_mode="livesum",
)
QUEUE_DEPTH = Gauge(
    "llm_worker_queue_depth",
    "Jobs in the Celery queue, read from Redis when scraped: waiting (in the queue's lists, "
    "priorities included) or unacked (delivered to some worker, not yet acknowledged).",
    ["queue", "state"],
    multiprocess_mode="mostrecent",
)
QUEUE_CLASS_DEPTH = Gauge(
    "llm_worker_queue_class_depth",
    "Jobs waiting in the queue's traffic classes, by priority and tenant, read from Redis "
    "when scraped.",
    ["queue", "priority", "tenant"],
    multiprocess_mode="mostrecent",
)
QUEUE_OLDEST_AGE = Gauge(
    "llm_worker_queue_oldest_age_seconds",
    "Age (since submission) of the oldest job waiting in each traffic class, by priority and "
    "tenant, read from Redis when scraped.",
    ["queue", "priority", "tenant"],
    multiprocess_mode="mostrecent",
)
OUTBOX_REPUBLISHED = Counter(
    "llm_worker_outbox_republished_total",
    "Jobs whose message this worker's outbox sweeper published again because the broker had "
    "not confirmed it within OUTBOX_GRACE_S (a producer that died or met a broker outage; only "
    "with a broker other than the results Redis).",
    ["queue"],
)
OUTBOX_PENDING = Gauge(
    "llm_worker_outbox_pending",
    "Jobs created whose message the broker has not confirmed yet (the queue's outbox), read "
    "from Redis when scraped; 0 with the broker on the results Redis.",
    ["queue"],
    multiprocess_mode="mostrecent",
)
DEAD_LETTERS = Gauge(
    "llm_worker_dead_letters",
    "Entries in the dead-letter stream, read from Redis when scraped.",
    multiprocess_mode="mostrecent",
)
GATEWAY_REQUESTS = ModelCounter(
    "llm_worker_gateway_requests_total",
    "Requests the gateway answered, by route (its handler's name), HTTP status (499: the "
    "client left before an answer began) and tenant (401s: none). /healthz, /openapi.json "
    "and /metrics are not counted.",
    ["route", "status", "tenant"],
)
GATEWAY_REQUEST_DURATION = Histogram(
    "llm_worker_gateway_request_duration_seconds",
    "From a request's arrival to its end, by route: for a streamed answer or an event stream "
    "the whole stream.",
    ["route"],
    # A lone answer takes milliseconds; a stream lasts as long as its job.
    buckets=(0.001, 0.0025, *SHORT_LATENCY_BUCKETS_S, 300.0, 600.0, 900.0),
)
GATEWAY_JOBS = Counter(
    "llm_worker_gateway_jobs_total",
    "POST /v1/messages requests accepted, by the path of their job: gateway (its fast path "
    "runs it) or queue (a worker does; an existing job id resubmitted counts here too).",
    ["path"],
)
GATEWAY_OPEN = Gauge(
    "llm_worker_gateway_open",
    "Requests and event streams the gateway holds open now (what: requests, streams), against "
    "LLM_WORKER_GATEWAY_MAX_REQUESTS and LLM_WORKER_GATEWAY_MAX_STREAMS.",
    ["what"],
    multiprocess_mode="livesum",
)
WORKER_READY = Gauge(
    "llm_worker_ready",
    "1 while this worker reaches Redis and its consumer is consuming, else 0 (as of the scrape).",
    multiprocess_mode="mostrecent",
)
PROCESS_RESTARTS = Counter(
    "llm_worker_process_restarts_total",
    "Worker processes the supervisor started again after one exited unexpectedly "
    "(`llm-worker run --processes N`; always 0 with one process).",
)
