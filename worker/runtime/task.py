"""The Celery task: a thin shell that trusts nothing in the message.

The queue is not trusted: the payload is validated again, and what cannot be run is
dead-lettered and its job ended ``failed`` rather than crashing the worker. Transient trouble
is retried inside :class:`~worker.runtime.runner.JobRunner`, never by raising (an exception
would ack the message, see ``task_acks_on_failure_or_timeout``).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import structlog
from billiard.process import active_children
from celery import signals
from celery.exceptions import Reject
from celery.worker.consumer import Consumer as _CeleryConsumer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker import events as ev
from worker import metrics as m
from worker.accounting.pricing import budget_problem
from worker.broker import TASK_NAME, is_amqp_broker, traffic_headers
from worker.catalogue import MODEL_NAME_PATTERN
from worker.celery_app import app
from worker.errors import RequestInvalid
from worker.ratelimit.gate import JobPostponed
from worker.request import validate_request
from worker.runtime.context import Runtime, current_runtime, get_runtime
from worker.runtime.leases import new_token, wait_time_s
from worker.runtime.runner import HandBack, JobRunner
from worker.settings import MAX_FALLBACK_MODELS, load_settings
from worker.store import text

log = structlog.get_logger("worker.runtime.task")

#: What a producer reads when a bug of ours ended its job: the type and a fixed sentence. The
#: exception and its traceback are in the worker's log (``job_crashed``), never in the job.
INTERNAL_ERROR_MESSAGE = "the worker failed to run this job; its logs have the details"
UNDECODABLE_MESSAGE = "the queued message could not be decoded; the worker's log has the details"


def _runtime() -> Runtime:
    return get_runtime(app.settings or load_settings())


def fail_unrunnable(rt: Runtime, job_id: str, reason: str, message: str, payload: Any) -> None:
    """Dead-letter a job that cannot run and end it ``failed`` (once)."""
    # Whoever holds the lease (this worker, when the crash was ours): what cannot run here
    # cannot run anywhere. The terminal event continues the job's sequence, or readers, who
    # skip a seq they have seen, would never see it.
    last_seq, attempts = rt.store.position(job_id)
    event = ev.make_event(
        job_id,
        last_seq + 1,
        attempts,
        ev.FAILED,
        error={"type": reason, "message": message, "status_code": None},
    )
    if not rt.store.finish(job_id, event, error=event["error"], dead_letter=(reason, payload)):
        # It had ended already; keep what could not be run all the same.
        rt.store.dead_letter(job_id=job_id, reason=reason, payload=payload)
    log.error("job_rejected", reason=reason, detail=message)


@app.task(name=TASK_NAME, bind=True)
def run_job(self: Any, *args: Any, **kwargs: Any) -> None:
    """Run one job; the message carries ``[payload]``: job_id, request, submitted_at."""
    rt = _runtime()
    job_id = str(self.request.id)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(job_id=job_id)
    try:
        _run(rt, job_id, args, kwargs, _delivery_tag(self.request))
    except Reject:
        raise
    except (RedisConnectionError, RedisTimeoutError) as exc:
        # Redis stayed away longer than REDIS_RETRY_S: not a bug of ours and not the job's
        # fault. The message goes back to the queue (or, if Redis cannot take it back yet,
        # stays unacked until the visibility sweep returns it); the job's lease lapses.
        log.warning("job_redis_unavailable", error=type(exc).__name__)
        raise Reject("Redis is unavailable", requeue=True) from exc
    except Exception:
        # A bug of ours: never retried (it would fail the same way), never left hanging. The
        # producer gets a fixed message; the exception, which may quote internals (paths,
        # addresses, the request), stays in this log line.
        log.exception("job_crashed")
        try:
            fail_unrunnable(
                rt,
                job_id,
                "internal_error",
                INTERNAL_ERROR_MESSAGE,
                {"args": args, "kwargs": kwargs},
            )
        except Exception:
            log.exception("job_crash_not_recorded")


def _delivery_tag(request: Any) -> str | None:
    tag = (getattr(request, "delivery_info", None) or {}).get("delivery_tag")
    return str(tag) if tag else None


def _epoch(value: Any) -> float | None:
    """A time the message carries, if it is one (the queue is not trusted)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def job_fallbacks(
    payload: dict[str, Any], model: str, configured: Mapping[str, tuple[str, ...]]
) -> tuple[str, ...] | None:
    """The job's fallback models: its own ``fallback_models`` (which replace the configured
    ones, ``[]`` meaning none), else ``FALLBACKS[model]``; None when the message's are
    malformed (the queue is not trusted)."""
    own = payload.get("fallback_models")
    if own is None:
        return configured.get(model, ())
    if (
        not isinstance(own, list)
        or len(own) > MAX_FALLBACK_MODELS
        or not all(isinstance(name, str) and MODEL_NAME_PATTERN.match(name) for name in own)
    ):
        return None
    return tuple(own)


def _run(
    rt: Runtime,
    job_id: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    delivery_tag: str | None = None,
) -> None:
    payload = args[0] if len(args) == 1 and not kwargs else None
    if not isinstance(payload, dict) or not isinstance(payload.get("request"), dict):
        fail_unrunnable(
            rt,
            job_id,
            "invalid_payload",
            "the queued message is not a job payload",
            {"args": args, "kwargs": kwargs},
        )
        return
    try:
        request = validate_request(
            payload["request"],
            catalogue=rt.settings.catalogue,
            max_request_bytes=rt.settings.max_request_bytes,
        )
    except RequestInvalid as exc:
        fail_unrunnable(rt, job_id, "invalid_request_error", str(exc), payload)
        return
    model = request["model"]
    structlog.contextvars.bind_contextvars(model=model)
    settings = rt.settings
    fallbacks = job_fallbacks(payload, model, settings.fallbacks)
    if fallbacks is None:
        fail_unrunnable(
            rt,
            job_id,
            "invalid_payload",
            f"fallback_models must be a list of at most {MAX_FALLBACK_MODELS} model names",
            payload,
        )
        return
    if _held_for_budget(rt, job_id, payload, args, kwargs):
        return
    token = new_token(rt.hostname)
    while True:
        if rt.leases.draining:
            raise Reject("the worker is shutting down", requeue=True)
        claim = rt.store.claim(
            job_id,
            worker=rt.hostname,
            model=model,
            ttl_s=int(settings.job_deadline_s + settings.result_ttl_s),
            token=token,
            lease_ttl_s=settings.lease_ttl_s,
            max_deliveries=settings.max_deliveries,
            start_attempt=True,
            submitted_at=_epoch(payload.get("submitted_at")),
            deadline_at=_epoch(payload.get("deadline_at")),
        )
        if claim.state_before != "leased":
            break
        # Delivered again while a live worker runs it (the visibility timeout passed, or a
        # connection dropped): park this copy until that worker ends the job or dies.
        log.info("job_parked_behind_lease", wait_s=round(claim.lease_wait_s, 3))
        rt.leases.sleep(wait_time_s(claim.lease_wait_s, settings.lease_ttl_s))
    if claim.already_ended:
        log.info("job_redelivered_after_end", state=claim.state_before)
        return
    if claim.state_before == "poison":
        fail_unrunnable(
            rt,
            job_id,
            "delivery_limit",
            f"delivered {claim.deliveries - 1} times without finishing (MAX_DELIVERIES="
            f"{settings.max_deliveries}); a worker died running it each time",
            payload,
        )
        return
    handle = rt.leases.register(job_id, token, delivery_tag)
    runner = JobRunner(
        rt,
        job_id,
        request,
        claim,
        handle,
        submitted_at=_epoch(payload.get("submitted_at")),
        payload=payload,
        fallbacks=fallbacks,
    )
    try:
        runner.run()
    except HandBack:
        rt.store.release(job_id, token, attempts=runner.released_attempts)
        log.info("job_handed_back")
        raise Reject("the worker is shutting down", requeue=True) from None
    except JobPostponed as postponed:
        # Not a crash: the delivery does not count, nor the attempt that never started.
        rt.store.release(job_id, token, attempts=runner.released_attempts)
        countdown_s = within_deadline(
            postponed.countdown_s, _epoch(payload.get("deadline_at")), time.time()
        )
        _requeue(job_id, args, kwargs, countdown_s)
    finally:
        rt.leases.unregister(handle)


def _held_for_budget(
    rt: Runtime, job_id: str, payload: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> bool:
    """True when the job's tenant is at its budget and the job was held (sent back to the
    queue with a countdown: it holds no worker slot meanwhile) or failed (``BUDGET_ACTION``).

    Only a job that has not started is held: one that ended, is running (a redelivery, or a
    takeover from a worker that died: it goes on) or has passed its deadline is left to the
    claim. Costs nothing for a tenant without a budget."""
    settings = rt.settings
    tenant = job_id.partition("/")[0] if "/" in job_id else ""
    budget = settings.budgets.get(tenant) if tenant else None
    if budget is None:
        return False
    now = time.time()
    limits = budget.limits(now)
    store = rt.store
    pipe = store.redis.pipeline(transaction=False)
    pipe.hmget(store.keys.job(job_id), ["state", "held"])
    pipe.mget([store.keys.spend(tenant, period) for _name, period, _limit in limits])
    (state, held), values = pipe.execute()
    deadline_at = _epoch(payload.get("deadline_at"))
    if (state is not None and text(state) != "queued") or (
        deadline_at is not None and now >= deadline_at
    ):
        return False
    spent = {name: int(value or 0) for (name, _p, _l), value in zip(limits, values, strict=True)}
    problem = budget_problem(tenant, budget, spent, now)
    if problem is None:
        if held is not None:
            store.redis.hdel(store.keys.job(job_id), "held")
        return False
    m.BUDGET_HOLDS.labels(tenant, settings.budget_action).inc()
    if settings.budget_action == "fail":
        fail_unrunnable(rt, job_id, "budget_exceeded", problem, payload)
        return True
    countdown_s = settings.budget_hold_s
    if deadline_at is not None:
        countdown_s = max(0.0, min(countdown_s, deadline_at - now))
    if state is not None:
        store.redis.hset(store.keys.job(job_id), "held", problem)
    log.info("job_held_for_budget", tenant=tenant, countdown_s=round(countdown_s, 3))
    _requeue(job_id, args, kwargs, countdown_s)
    return True


#: A postponed job comes back this long after its deadline, so that the claim finds it past.
DEADLINE_MARGIN_S = 0.05


def within_deadline(countdown_s: float, deadline_at: float | None, now: float) -> float:
    """A postponed job's countdown, ending by its deadline at the latest: a job whose deadline
    comes first is delivered then and ends ``expired`` without an upstream call (at claim),
    rather than waiting out a countdown past it."""
    if deadline_at is None:
        return countdown_s
    return max(0.0, min(countdown_s, deadline_at - now + DEADLINE_MARGIN_S))


def _requeue(
    job_id: str, args: tuple[Any, ...], kwargs: dict[str, Any], countdown_s: float
) -> None:
    """Send the job back to its queue, due in ``countdown_s``; this delivery then ends (acked).

    As Celery's own retry does (same id, queue and priority), without its ``max_retries``. A
    crash before the ack leaves two messages, which the job's lease and end tolerate; a send
    that fails leaves the message to the broker.
    """
    settings = app.settings or load_settings()
    if countdown_s > 0 and is_amqp_broker(settings.effective_broker_url):
        # Celery's native delayed delivery (RabbitMQ) counts whole seconds, at least one.
        countdown_s = max(1.0, math.ceil(countdown_s))
    try:
        run_job.signature_from_request(
            run_job.request,
            args,
            kwargs,
            countdown=countdown_s,
            argsrepr=f"[<job {job_id}>]",  # the request holds the prompt: keep it out of logs
            kwargsrepr="{}",
            # It keeps its class: the fetch files it by these (docs/traffic-classes.md).
            headers=traffic_headers(args[0] if args and isinstance(args[0], dict) else {}),
        ).apply_async()
    except Exception as exc:
        log.warning("job_requeue_failed", error=type(exc).__name__)
        raise Reject("could not requeue with a countdown", requeue=True) from exc


@signals.worker_shutting_down.connect
def _drain(**_: Any) -> None:
    """Warm shutdown: waiting jobs go back to the queue now, running ones after the grace.

    Gevent, threads and solo run jobs in this process. Prefork children learn of it by a
    SIGUSR2 from here (Celery's warm shutdown only waits for them to finish).
    """
    rt = current_runtime()
    if rt is not None:
        rt.leases.drain(rt.settings.shutdown_grace_s, quiet=True)
    for child in active_children():
        if child.pid:
            with contextlib.suppress(OSError):
                os.kill(child.pid, signal.SIGUSR2)


@signals.worker_process_init.connect
def _child_listens_for_drain(**_: Any) -> None:
    """In a prefork child: SIGUSR2 from the parent starts the same drain here."""
    signal.signal(signal.SIGUSR2, _child_drain)


def _child_drain(signum: int, frame: Any) -> None:
    rt = current_runtime()
    if rt is not None:  # a child that never ran a job has nothing to hand back
        rt.leases.drain(rt.settings.shutdown_grace_s, quiet=True)


def reject_undecodable(message: Any, exc: Exception) -> None:
    """Called by the consumer for a message whose body cannot be decoded."""
    headers = getattr(message, "headers", None) or {}
    properties = getattr(message, "properties", None) or {}
    job_id = headers.get("id") or properties.get("correlation_id")
    body = getattr(message, "body", b"")
    rt = _runtime()
    if not job_id:
        rt.store.dead_letter(job_id="", reason="undecodable_message", payload=_as_text(body))
        log.error("message_undecodable", detail=str(exc)[:200])
        return
    log.error("message_undecodable", job_id=str(job_id), detail=str(exc)[:200])
    fail_unrunnable(rt, str(job_id), "undecodable_message", UNDECODABLE_MESSAGE, _as_text(body))


def _as_text(body: Any) -> str:
    if isinstance(body, bytes):
        return body[:65_536].decode("utf-8", "replace")
    return str(body)[:65_536]


class Consumer(_CeleryConsumer):
    """Celery's consumer (``worker_consumer``), but a message it cannot decode ends its job
    ``failed`` and is dead-lettered, instead of being only logged and dropped."""

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        try:
            reject_undecodable(message, exc)
        finally:
            super().on_decode_error(message, exc)
