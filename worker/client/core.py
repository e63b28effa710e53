"""What the sync and async clients share, free of I/O: checking submissions, building the
arguments of the submit script, reading a job hash and a terminal event.

:class:`worker.client.sync.Client` and :class:`worker.client.aio.AsyncClient` differ only in
how they talk to Redis; every decision is made here, once.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from worker import broker
from worker import events as ev
from worker import metrics as m
from worker.accounting import tenancy
from worker.accounting.pricing import budget_problem
from worker.broker import task_message
from worker.client.outbox import OutboxItem
from worker.errors import (
    BudgetExceeded,
    JobCancelled,
    JobExpired,
    JobFailed,
    JobNotFound,
    QuotaExceeded,
    RequestInvalid,
)
from worker.keys import Keys, TrafficKeys
from worker.ratelimit.cost import submit_problem
from worker.request import validate_request
from worker.settings import Settings, load_settings
from worker.store import text

# Their historical home (callers import them here); they live in worker.accounting.tenancy.
TENANT_PATTERN = tenancy.TENANT_PATTERN
valid_tenant = tenancy.valid_tenant
split_qualified_id = tenancy.split_qualified_id
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}\Z")
#: The id of a tenant's job in Redis and on the queue: the tenant's name, ``/``, its job id.
QUALIFIED_ID_PATTERN = re.compile(r"^(?:[A-Za-z0-9_.-]{1,64}/)?[A-Za-z0-9_.:-]{1,128}\Z")
#: Job priorities run from 0 to 9, higher first (AMQP's sense).
MIN_PRIORITY, MAX_PRIORITY = 0, 9
DEFAULT_PRIORITY = broker.DEFAULT_PRIORITY
#: Batch files and Message Batches: behind interactive work by default.
BATCH_PRIORITY = 2
#: The longest life a job may ask for (``deadline_s``).
MAX_DEADLINE_S = 7 * 86_400.0
#: Fallback models one job may name.
MAX_FALLBACK_MODELS = 8
MAX_METADATA_BYTES = 16_384
#: The gateway's claim sent with a fast-path submit: ``(job id, message payload) -> (keys,
#: args)`` of ``claim.lua`` (see :mod:`worker.gateway.fast_path`).
ClaimWith = Callable[[str, dict[str, Any]], tuple[list[str], list[Any]]]
#: ``metadata["limit_key"]``, when given, is a rate-limit key: a non-blank string this long at
#: most (what the limiter accepts; see docs/rate-limits.md).
MAX_LIMIT_KEY_CHARS = 200
#: How long one blocking stream read waits before the reader checks that the job exists.
READ_BLOCK_MS = 1_000


def request_sha(request: Mapping[str, Any]) -> str:
    """The idempotency fingerprint of a validated request (key order does not matter)."""
    return hashlib.sha256(orjson.dumps(request, option=orjson.OPT_SORT_KEYS)).hexdigest()


def valid_job_id(job_id: Any) -> bool:
    return isinstance(job_id, str) and bool(JOB_ID_PATTERN.match(job_id))


def valid_qualified_id(job_id: Any) -> bool:
    """A job id as stored: plain, or ``<tenant>/<job_id>``."""
    return isinstance(job_id, str) and bool(QUALIFIED_ID_PATTERN.match(job_id))


def qualified_id(tenant: str | None, job_id: str) -> str:
    """The id a job has in Redis and on the queue: tenants' ids never collide, so two tenants
    may use the same ``job_id``."""
    return f"{tenant}/{job_id}" if tenant else job_id


def check_options(job_id: Any, metadata: Any, prefix: str = "") -> list[dict[str, str]]:
    """Problems with the job options beside a request (``job_id``, ``metadata``)."""
    errors = []
    if job_id is not None and not valid_job_id(job_id):
        errors.append(
            {
                "loc": f"{prefix}job_id",
                "msg": "must be 1-128 characters of letters, digits, '_', '.', ':' or '-'",
            }
        )
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            errors.append({"loc": f"{prefix}metadata", "msg": "must be a JSON object"})
        else:
            try:
                size = len(orjson.dumps(dict(metadata)))
            except TypeError as exc:
                errors.append({"loc": f"{prefix}metadata", "msg": f"not JSON-serialisable: {exc}"})
            else:
                if size > MAX_METADATA_BYTES:
                    errors.append(
                        {
                            "loc": f"{prefix}metadata",
                            "msg": f"{size} bytes, over the limit of {MAX_METADATA_BYTES}",
                        }
                    )
            if "limit_key" in metadata and not _valid_limit_key(metadata["limit_key"]):
                errors.append(
                    {
                        "loc": f"{prefix}metadata.limit_key",
                        "msg": f"must be a non-blank string of at most {MAX_LIMIT_KEY_CHARS} "
                        "characters",
                    }
                )
    return errors


def check_traffic_options(
    priority: Any, tenant: Any, deadline_s: Any, fallback_models: Any, prefix: str = ""
) -> list[dict[str, str]]:
    """Problems with a job's ``priority``, ``tenant``, ``deadline_s`` and ``fallback_models``."""
    errors = []
    if priority is not None and (
        not isinstance(priority, int)
        or isinstance(priority, bool)
        or not MIN_PRIORITY <= priority <= MAX_PRIORITY
    ):
        errors.append(
            {
                "loc": f"{prefix}priority",
                "msg": f"must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY} (higher first)",
            }
        )
    if tenant is not None and not valid_tenant(tenant):
        errors.append(
            {
                "loc": f"{prefix}tenant",
                "msg": "must be 1-64 characters of letters, digits, '_', '.' or '-'",
            }
        )
    if deadline_s is not None and (
        not isinstance(deadline_s, int | float)
        or isinstance(deadline_s, bool)
        or not 0 < deadline_s <= MAX_DEADLINE_S
    ):
        errors.append(
            {
                "loc": f"{prefix}deadline_s",
                "msg": f"must be a number of seconds above 0 and at most {MAX_DEADLINE_S:g}",
            }
        )
    if fallback_models is not None and (
        not isinstance(fallback_models, list | tuple)
        or not all(isinstance(x, str) and x.strip() and len(x) <= 200 for x in fallback_models)
        or len(fallback_models) > MAX_FALLBACK_MODELS
    ):
        errors.append(
            {
                "loc": f"{prefix}fallback_models",
                "msg": f"must be a list of at most {MAX_FALLBACK_MODELS} model names",
            }
        )
    return errors


def _valid_limit_key(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip()) and len(value) <= MAX_LIMIT_KEY_CHARS


def validate_one(settings: Settings, request: Any, loc_prefix: str = "") -> dict[str, Any]:
    """:func:`validate_request` with the settings' limits; error locations get ``loc_prefix``."""
    try:
        return validate_request(
            request,
            catalogue=settings.catalogue,
            max_request_bytes=settings.max_request_bytes,
        )
    except RequestInvalid as exc:
        if not loc_prefix:
            raise
        raise RequestInvalid(
            [{"loc": f"{loc_prefix}{e['loc']}", "msg": e["msg"]} for e in exc.errors]
        ) from None


def _rate_limit_problems(
    settings: Settings, request: Mapping[str, Any], metadata: Any, prefix: str, tenant: Any
) -> list[dict[str, str]]:
    """A request that no wait could grant under the producer's own ``RATE_LIMITS``."""
    if not settings.rate_limits:
        return []
    meta = metadata if isinstance(metadata, Mapping) else None
    name = tenant if valid_tenant(tenant) else None
    problem = submit_problem(settings.rate_limits, request, meta, name)
    if problem is None:
        return []
    field = "max_tokens" if problem.startswith("max_tokens") else "messages"
    return [{"loc": f"{prefix}{field}", "msg": problem}]


@dataclass(frozen=True, slots=True)
class JobOptions:
    """How one job is scheduled: its priority, its tenant, its life and its fallbacks."""

    priority: int = DEFAULT_PRIORITY
    tenant: str | None = None
    deadline_s: float | None = None  # None: the settings' JOB_DEADLINE_S
    fallback_models: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Submission:
    """Validated jobs, ready to enqueue: one entry per job, ids final (tenants' ids qualified,
    see :func:`qualified_id`)."""

    ids: list[str]
    requests: list[dict[str, Any]]
    metadata: list[Mapping[str, Any] | None]
    options: list[JobOptions]


PerJob = Any  # a value for every job, or a list or tuple with one per job


def _per_job(value: PerJob, count: int, name: str) -> list[Any]:
    """One value per job: ``value`` repeated, or ``value`` itself when it is a list or tuple
    (for ``fallback_models``, a list of lists: a list of names is one value for all)."""
    per_job = isinstance(value, list | tuple) and (
        name != "fallback_models"
        or (bool(value) and all(v is None or isinstance(v, list | tuple) for v in value))
    )
    if not per_job:
        return [value] * count
    if len(value) != count:
        raise ValueError(f"{name} must have one entry per request")
    return list(value)


def prepare_submission(
    settings: Settings,
    requests: Iterable[Mapping[str, Any]],
    job_ids: Sequence[str | None] | None,
    metadata: Sequence[Mapping[str, Any] | None] | Mapping[str, Any] | None,
    *,
    priority: PerJob = None,
    tenant: PerJob = None,
    deadline_s: PerJob = None,
    fallback_models: PerJob = None,
    default_priority: int = DEFAULT_PRIORITY,
) -> Submission:
    """Validate every request and option (one error lists every problem); mint missing ids.

    ``priority``, ``tenant``, ``deadline_s`` and ``fallback_models`` are each one value for
    every job or a list with one per job (``fallback_models``: a list of lists)."""
    items = list(requests)
    ids = list(job_ids) if job_ids is not None else [None] * len(items)
    metas = list(metadata) if isinstance(metadata, Sequence) else [metadata] * len(items)
    if len(ids) != len(items) or len(metas) != len(items):
        raise ValueError("job_ids and metadata must have one entry per request")
    priorities = _per_job(priority, len(items), "priority")
    tenants = _per_job(tenant, len(items), "tenant")
    deadlines = _per_job(deadline_s, len(items), "deadline_s")
    fallbacks = _per_job(fallback_models, len(items), "fallback_models")
    single = len(items) == 1
    validated: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    options: list[JobOptions] = []
    for index, (request, job_id, meta) in enumerate(zip(items, ids, metas, strict=True)):
        prefix = "" if single else f"requests[{index}]."
        try:
            validated.append(validate_one(settings, request, prefix))
        except RequestInvalid as exc:
            errors.extend(exc.errors)
        else:
            errors.extend(
                _rate_limit_problems(settings, validated[-1], meta, prefix, tenants[index])
            )
        errors.extend(check_options(job_id, meta, prefix))
        problems = check_traffic_options(
            priorities[index], tenants[index], deadlines[index], fallbacks[index], prefix
        )
        errors.extend(problems)
        if not problems:
            options.append(
                JobOptions(
                    priority=default_priority if priorities[index] is None else priorities[index],
                    tenant=tenants[index],
                    deadline_s=None if deadlines[index] is None else float(deadlines[index]),
                    fallback_models=None
                    if fallbacks[index] is None
                    else tuple(str(x) for x in fallbacks[index]),
                )
            )
    if errors:
        raise RequestInvalid(errors)
    final_ids = [
        qualified_id(opts.tenant, job_id or uuid.uuid4().hex)
        for job_id, opts in zip(ids, options, strict=True)
    ]
    if len(set(final_ids)) != len(final_ids):
        raise RequestInvalid([{"loc": "job_ids", "msg": "the same job_id appears twice"}])
    return Submission(final_ids, validated, metas, options)


@dataclass(frozen=True, slots=True)
class BudgetRead:
    """One spend counter to read before submitting a budgeted tenant's jobs."""

    tenant: str
    period_name: str  # day or month
    key: str


def budget_reads(
    settings: Settings, keys: Keys, tenants: Iterable[str | None], now: float
) -> list[BudgetRead]:
    """The spend counters of every tenant among ``tenants`` that has a budget (none when no
    budget is configured: submitting costs no extra round trip)."""
    reads = []
    for tenant in dict.fromkeys(t for t in tenants if t):
        budget = settings.budgets.get(tenant)
        if budget is None:
            continue
        for name, period, _limit in budget.limits(now):
            reads.append(BudgetRead(tenant, name, keys.spend(tenant, period)))
    return reads


def budget_refusal(
    settings: Settings, reads: list[BudgetRead], values: Sequence[Any], now: float
) -> BudgetExceeded | None:
    """The error for the first tenant at its budget, given the counters' values, or None."""
    spent: dict[str, dict[str, int]] = {}
    for read, value in zip(reads, values, strict=True):
        spent.setdefault(read.tenant, {})[read.period_name] = int(value or 0)
    for tenant, by_period in spent.items():
        problem = budget_problem(tenant, settings.budgets[tenant], by_period, now)
        if problem is not None:
            return BudgetExceeded(tenant, problem + "; nothing was submitted")
    return None


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """One job's call of ``submit.lua`` and the message it carries: on the results Redis the
    Celery envelope it pushes, else the outbox item the producer then publishes."""

    job_id: str
    keys: list[str]
    args: list[Any]
    payload: dict[str, Any]
    item: OutboxItem


def submit_calls(
    settings: Settings,
    keys: Keys,
    submission: Submission,
    *,
    now: float,
    same_redis: bool,
    batch_id: str | None = None,
    fast_path: bool = False,
) -> list[ScriptCall]:
    """The arguments of ``submit.lua`` for every job (see the script for their meaning):
    with ``same_redis`` the message goes onto the queue, else into the queue's outbox.
    ``fast_path`` (with ``same_redis``): the gateway's form, which keeps the message in the
    outbox when nothing of the job's priority or higher waits (the gateway then runs it).

    ``batch_id``: the gateway Message Batch the jobs belong to (their ends are counted there).
    """
    calls = []
    for job_id, request, meta, opts in zip(
        submission.ids, submission.requests, submission.metadata, submission.options, strict=True
    ):
        deadline_s = settings.job_deadline_s if opts.deadline_s is None else opts.deadline_s
        # The message carries its deadline: a worker judges it even if the record is gone.
        deadline_at = now + deadline_s
        payload: dict[str, Any] = {
            "job_id": job_id,
            "request": request,
            "submitted_at": now,
            "deadline_at": deadline_at,
            "priority": opts.priority,
        }
        if opts.tenant:
            payload["tenant"] = opts.tenant
        if opts.fallback_models is not None:
            payload["fallback_models"] = list(opts.fallback_models)
        item = OutboxItem(job_id, payload, opts.priority)
        fast_args: list[Any] = ["", ""]
        if same_redis:
            script_keys = [keys.job(job_id), settings.queue]
            message = task_message(job_id, payload, queue=settings.queue)
            if fast_path:
                script_keys += [keys.outbox(settings.queue), keys.outbox_message(job_id)]
                fast_args = [item.dumps(), TrafficKeys(settings.queue).base]
        else:
            script_keys = [
                keys.job(job_id),
                keys.outbox(settings.queue),
                keys.outbox_message(job_id),
            ]
            message = item.dumps()
        calls.append(
            ScriptCall(
                job_id=job_id,
                keys=script_keys,
                args=[
                    request_sha(request),
                    now,
                    request["model"],
                    orjson.dumps(dict(meta or {})),
                    int(deadline_s + settings.result_ttl_s),
                    message,
                    deadline_at,
                    batch_id or "",
                    opts.priority,
                    opts.tenant or "",
                    ""
                    if opts.fallback_models is None
                    else orjson.dumps(list(opts.fallback_models)),
                    job_id,
                    *quota_args(settings, keys, opts.tenant),
                    *fast_args,
                    keys.submitted_counts(settings.queue),
                    submitted_field(request["model"], opts.tenant),
                ],
                payload=payload,
                item=item,
            )
        )
    return calls


def quota_args(settings: Settings, keys: Keys, tenant: str | None) -> list[Any]:
    """``submit.lua``'s quota arguments: the tenant's queued set and its quota, or none."""
    limit = settings.max_queued_for(tenant) if tenant else None
    if not tenant or limit is None:
        return ["", 0]
    return [keys.tenant_queued(tenant), limit]


def created_flags(calls: list[ScriptCall], results: list[Any]) -> list[bool]:
    """Which script calls created their job (a quota refusal did not: see
    :func:`quota_refusal`); :class:`JobConflict` when an existing id holds a different
    request (the idempotency key was reused for something else)."""
    from worker.errors import JobConflict

    flags = []
    for call, result in zip(calls, results, strict=True):
        if int(result[0]) in {1, -1}:
            flags.append(int(result[0]) == 1)
            continue
        existing = text(result[1])
        if existing != call.args[0]:
            raise JobConflict(call.job_id)
        flags.append(False)
    return flags


def to_publish(
    calls: list[ScriptCall], results: list[Any], created: list[bool]
) -> list[OutboxItem]:
    """What a producer with an outbox publishes after the script ran: every job it created,
    and every existing one still waiting for the broker's confirmation (its kept message)."""
    items = []
    for call, result, new in zip(calls, results, created, strict=True):
        if new:
            items.append(call.item)
        elif len(result) > 3 and result[3]:
            kept = OutboxItem.loads(call.job_id, result[3])
            if kept is not None:
                items.append(kept)
    return items


#: Where ``submit.lua``'s ARGV[14], the tenant's quota, is in :attr:`ScriptCall.args`.
QUOTA_ARG = 13


def quota_refusal(calls: list[ScriptCall], results: list[Any]) -> QuotaExceeded | None:
    """The error for the jobs a tenant's quota refused (raise it once the created ones are
    enqueued), or None."""
    refused = [call for call, result in zip(calls, results, strict=True) if int(result[0]) == -1]
    if not refused:
        return None
    created = [
        call.job_id for call, result in zip(calls, results, strict=True) if int(result[0]) == 1
    ]
    tenant = split_qualified_id(refused[0].job_id)[0] or ""
    return QuotaExceeded(
        tenant, int(refused[0].args[QUOTA_ARG]), [c.job_id for c in refused], created
    )


def submitted_field(model: str, tenant: str | None) -> str:
    """The field of the queue's submitted-jobs hash that counts ``model``'s jobs of
    ``tenant``: the model label, then ``|`` and the tenant label for a job with a tenant."""
    label = m.model_label(model)
    return f"{label}|{m.tenant_label(tenant)}" if tenant else label


def parse_submitted_field(field: str) -> tuple[str, str]:
    """``(model label, tenant label)`` of a submitted-jobs hash field."""
    model, sep, tenant = field.partition("|")
    return model, (tenant if sep else m.NO_TENANT)


def count_by_model(models: Iterable[str]) -> dict[str, int]:
    """Jobs per model label (:func:`worker.metrics.model_label`): the Redis counter that
    workers export has no more fields than the metric has label values."""
    per_model: dict[str, int] = {}
    for model in models:
        label = m.model_label(model)
        per_model[label] = per_model.get(label, 0) + 1
    return per_model


def cancel_result(job_id: str, outcome: str) -> bool:
    """What ``Job.cancel`` answers for ``cancel.lua``'s outcome: True when the job was
    cancelled or asked to stop, False when it had ended; :class:`JobNotFound` when missing."""
    if outcome == "missing":
        raise JobNotFound(job_id)
    return outcome in {"cancelled", "requested"}


#: What a producer sees of a job hash (:func:`parse_status`). Not the worker's lease token,
#: its host and pid, the claim's bookkeeping, nor the request's sha256 (unsalted, it would
#: confirm a guessed prompt).
PUBLIC_STATUS_FIELDS = frozenset(
    {
        "state",
        "attempts",
        "deliveries",
        "model",
        "usage",
        "error",
        "stop_reason",
        "metadata",
        "priority",
        "tenant",
        "fallback_models",
        "attempt_model",
        "answered_by",
        "cost_usd",
        "held",
        "cancel_requested",
        "submitted_at",
        "started_at",
        "finished_at",
        "deadline_at",
    }
)


def parse_status(job_id: str, raw: Mapping[str, str]) -> dict[str, Any]:
    """A job hash as producers see it (:data:`PUBLIC_STATUS_FIELDS`): JSON fields decoded,
    numbers as numbers."""
    status: dict[str, Any] = {"job_id": job_id}
    for key, value in raw.items():
        if key not in PUBLIC_STATUS_FIELDS:
            continue
        if key == "cancel_requested":
            status[key] = float(value) if value else None
        elif key in {"usage", "error", "metadata", "fallback_models"}:
            status[key] = orjson.loads(value) if value else None
        elif key in {"attempts", "deliveries", "priority"}:
            status[key] = int(value)
        elif key.endswith("_at") and value:
            status[key] = float(value)
        else:
            status[key] = value
    return status


def event_from_entry(entry_id: Any, fields: Mapping[bytes, bytes]) -> dict[str, Any]:
    """One stream entry as an event, with its ``stream_id`` (for resuming after it)."""
    event = ev.loads(fields[b"data"])
    event["stream_id"] = text(entry_id)
    return event


def outcome(job_id: str, event: dict[str, Any]) -> dict[str, Any]:
    """The final message of a terminal event, or the exception it stands for, raised."""
    kind = event["type"]
    if kind == ev.COMPLETED:
        message: dict[str, Any] = event["message"]
        return message
    error = event.get("error") or {"type": kind, "message": f"job {kind}", "status_code": None}
    if kind == ev.CANCELLED:
        raise JobCancelled(job_id, error)
    if kind == ev.EXPIRED:
        raise JobExpired(job_id, error)
    raise JobFailed(job_id, error)


class SeqTracker:
    """The highest ``seq`` a reader has yielded (see :func:`is_repeat`)."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = 0


def is_repeat(event: dict[str, Any], seen: SeqTracker) -> bool:
    """True for an event whose ``seq`` was already yielded: skip it.

    Writes retried after a lost connection can store an event twice (XADD is not idempotent);
    ``seq`` rises by one per event of a job, so a repeat is recognisable and dropped here.
    """
    seq = event.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        return False
    if seq <= seen.last:
        return True
    seen.last = seq
    return False


def submission_name(count: int) -> str:
    """How an error names a submission of ``count`` jobs."""
    return "the submitted job" if count == 1 else f"the {count} submitted jobs"


def client_settings(
    settings: Settings | None, *, redis_url: str | None, broker_url: str | None
) -> Settings:
    """A client's settings: the given ones (or the environment's), with explicit URLs on top."""
    overrides: dict[str, Any] = {}
    if redis_url is not None:
        overrides["redis_url"] = redis_url
    if broker_url is not None:
        overrides["broker_url"] = broker_url
    if settings is None:
        return load_settings(**overrides)
    if overrides:
        return load_settings(**{**dict(settings), **overrides})
    return settings
