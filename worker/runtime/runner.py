"""One job's life in a worker: claim, attempts with retries, events, and exactly one end.

The task (:mod:`worker.runtime.task`) is a thin shell around :class:`JobRunner`. Decisions are
delegated to pure modules (:mod:`worker.runtime.retry_policy`,
:mod:`worker.runtime.accumulate`); this module only sequences them and writes what happened.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from worker import events as ev
from worker import metrics as m
from worker.accounting.pricing import (
    PICO_PER_USD,
    cost_pusd,
    token_count,
    usd_text,
    utc_day,
    utc_month,
)
from worker.accounting.tenancy import split_qualified_id
from worker.broker import job_priority
from worker.errors import PermanentUpstreamError, TransientUpstreamError, UpstreamError
from worker.ratelimit.gate import JobPostponed, ModelCoolingDown, WaitInterrupted
from worker.ratelimit.limiter import RateLimitCapacity, Reservation
from worker.runtime.accumulate import AccumulateError, accumulate, final_message
from worker.runtime.coalesce import coalesce
from worker.runtime.context import Runtime
from worker.runtime.fallback import (
    FallbackState,
    after_failure,
    honours_retry_after,
    plan_chain,
    skip_model,
)
from worker.runtime.group_commit import Pending
from worker.runtime.job_store import Claim, Spend, is_lease_lost
from worker.runtime.leases import JobHandle
from worker.runtime.retry_policy import backoff_delay_s, should_give_up

log = structlog.get_logger("worker.runtime.runner")


#: Stream events that are part of an answer; pings and unknown types are not.
ANSWER_EVENTS = frozenset(
    {
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    }
)


class HandBack(Exception):
    """The worker is shutting down: give the job back to the queue, unfinished."""


class _Stopped(Exception):
    """The job's handle was stopped (cancel, lease lost, shutdown) during an attempt."""


class _SkipModel(Exception):
    """The attempt's model is under a rate-limit cooldown and a later model of the chain
    exists: the attempt moves to it before anything was sent."""

    def __init__(self, cooldown: ModelCoolingDown) -> None:
        self.cooldown = cooldown


class JobRunner:
    """Runs one delivered job to its terminal event."""

    def __init__(
        self,
        rt: Runtime,
        job_id: str,
        request: dict[str, Any],
        claim: Claim,
        handle: JobHandle,
        *,
        submitted_at: float | None = None,
        payload: dict[str, Any] | None = None,
        fallbacks: tuple[str, ...] = (),
    ) -> None:
        self.rt = rt
        self.settings = rt.settings
        self.job_id = job_id
        #: The request as submitted; an attempt on a fallback sends it with its model replaced.
        self.original_request = request
        self.request = request
        self.model = str(request.get("model", ""))
        #: The tenant the job belongs to (its id is ``<tenant>/<id>``), or "".
        self.tenant = split_qualified_id(job_id)[0] or ""
        chain, skipped = plan_chain(
            self.model,
            fallbacks,
            catalogue=self.settings.catalogue,
            max_tokens=int(request.get("max_tokens") or 0),
        )
        for left_out in skipped:
            log.warning(
                "fallback_model_skipped",
                fallback=left_out.model,
                reason=left_out.reason,
                detail=left_out.detail,
            )
        self.fallback = FallbackState(chain)
        self.claim = claim
        self.handle = handle
        self.payload = payload
        self.seq = claim.last_seq
        #: The current attempt has published part of an answer (not only pings or events
        #: the SDK skips): a failure now is mid-stream.
        self._answer_started = False
        self.started_at = time.time()
        self.submitted_at = submitted_at
        self.deadline_at = claim.deadline_at or (self.started_at + self.settings.job_deadline_s)
        handle.deadline_at = self.deadline_at  # the keeper's watchdog ends a call at it
        self._stream_expire_set = claim.started  # claim.lua set it with the started event
        #: Chunk writes posted without waiting (:mod:`worker.runtime.group_commit`); settled before
        #: any other write of the job, so its events stay in order.
        self._pending = Pending()
        #: What the job hash counts once the task releases the job (a postponed attempt).
        self.released_attempts: int | None = None
        self._chunks_published: tuple[str, Any] | None = None

    # -- writing events ------------------------------------------------------------------

    def _event(self, type_: str, attempt: int, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return ev.make_event(self.job_id, self.seq, attempt, type_, **fields)

    def _publish(
        self,
        events: list[dict[str, Any]],
        *,
        wait: bool = True,
        urgent: bool = False,
        **hash_fields: Any,
    ) -> None:
        """Write events; ``wait=False`` returns before they are stored (chunks only), and
        ``urgent`` posts them without the publishing linger."""
        if wait:
            self._pending.settle()
        expire = None
        if not self._stream_expire_set:
            # Until the job ends, its stream lives as long as the job could, plus the TTL.
            expire = int(self.deadline_at - time.time() + self.settings.result_ttl_s)
            self._stream_expire_set = True
        self.rt.store.publish(
            self.job_id,
            events,
            token=self.handle.token,
            hash_fields=hash_fields or None,
            expire_s=expire,
            pending=None if wait else self._pending,
            urgent=urgent,
        )

    def _finish(
        self,
        type_: str,
        attempt: int,
        *,
        dead_letter: tuple[str, Any] | None = None,
        **fields: Any,
    ) -> bool:
        message = fields.get("message")
        error = fields.get("error")
        usage = message.get("usage") if message else None
        # Only the answer is billed: the final usage of the attempt that completed, at its
        # model's price. Failed attempts and jobs that did not complete cost 0.
        cost = 0
        spend = None
        if type_ == ev.COMPLETED:
            cost = cost_pusd(usage, self.settings.prices.get(self.model))
            fields["answered_by"] = self.model
            fields["cost_usd"] = usd_text(cost)
            spend = self._spend(usage, cost)
        self._pending.settle()  # the terminal event comes after every chunk
        event = self._event(type_, attempt, **fields)
        self.handle.ending = True  # the keeper no longer takes a missing lease for a takeover
        ended = self.rt.store.finish(
            self.job_id,
            event,
            message=message,
            usage=usage,
            error=error,
            stop_reason=message.get("stop_reason") if message else None,
            dead_letter=dead_letter,
            token=self.handle.token,
            answered_by=self.model if type_ == ev.COMPLETED else None,
            cost_usd=usd_text(cost),
            spend=spend,
        )
        if ended:
            self._stored_end(event)
            if cost:
                m.COST_USD.labels(self.model, self.tenant).inc(cost / PICO_PER_USD)
            m.JOBS_FINISHED.labels(self.model, type_, self.tenant).inc()
            m.JOB_DURATION.labels(self.model, type_).observe(time.time() - self.started_at)
            log.info(
                "job_finished", outcome=type_, duration_s=round(time.time() - self.started_at, 3)
            )
        else:
            log.info("job_already_finished", outcome=type_)
        return ended

    def _stored_end(self, event: dict[str, Any]) -> None:
        """The job's terminal ``event`` is stored (this runner ended the job): called before
        the end's metrics and log, for whoever answers from it (the gateway's fast path)."""

    def _spend(self, usage: dict[str, Any] | None, cost: int) -> Spend:
        now = time.time()
        usage = usage or {}
        return Spend(
            tenant=self.tenant,
            model=self.model,
            day=utc_day(now),
            month=utc_month(now),
            input_tokens=token_count(usage, "input_tokens"),
            output_tokens=token_count(usage, "output_tokens"),
            cost_pusd=cost,
        )

    # -- the job -------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:
            if not is_lease_lost(exc):
                raise
            # Frozen past the lease's TTL: another worker took the job over, and its writes
            # are the job's now. Nothing of ours was stored after the takeover.
            log.warning("job_left_to_lease_holder", detail="lease lost while writing")
        finally:
            # Whatever ends the job here, its chunks are stored before anyone reads the
            # stream's position (a crash of ours is ended by the task, a hand-back by the
            # next worker).
            self._pending.drain()

    def _run(self) -> None:
        if self.claim.cancel_requested:
            self._finish(ev.CANCELLED, self.claim.attempts)
            return
        if time.time() >= self.deadline_at:
            self._expire(self.claim.attempts)
            return
        if self.fallback.has_next and not self.claim.first_start:
            # Taken up again (redelivered, or back from a postponement): go on with the
            # model the last attempt went to.
            resumed = FallbackState.resume(
                self.fallback.chain, self.rt.store.job_field(self.job_id, "attempt_model")
            )
            self._use_model(resumed)
        if self.claim.state_before == "running" and self.claim.attempts > 0:
            if self.claim.last_event_type == ev.CHUNK and not self.settings.retry_mid_stream:
                self._fail_mid_stream(self.claim.attempts, "worker_lost", "stopped mid-stream")
                return
            # The worker that ran the job died (or let its lease lapse): the chunks of its
            # last attempt are void, exactly as after a failed attempt.
            self._publish(
                [
                    self._event(
                        ev.RETRY,
                        self.claim.attempts,
                        reason="worker_lost",
                        delay_s=0.0,
                        model=self.model,
                        error={
                            "type": "worker_lost",
                            "message": "the worker running this job stopped; another took over",
                            "status_code": None,
                        },
                    )
                ]
            )
            m.RETRIES.labels(self.model, "worker_lost").inc()
        if self.submitted_at is not None and self.claim.first_start:
            m.QUEUE_WAIT.labels(self.model, job_priority(self.payload)).observe(
                max(0.0, self.started_at - self.submitted_at)
            )
        in_flight_model = self.model
        m.JOBS_IN_FLIGHT.labels(in_flight_model).inc()
        try:
            self._attempts()
        finally:
            m.JOBS_IN_FLIGHT.labels(in_flight_model).dec()

    def _use_model(self, state: FallbackState) -> None:
        """The next attempts go to ``state.model``: the same request, its ``model`` replaced."""
        self.fallback = state
        if state.model == self.model:
            return
        self.model = state.model
        self.request = {**self.original_request, "model": state.model}
        structlog.contextvars.bind_contextvars(model=state.model)

    def _attempts(self) -> None:
        attempt = self.claim.attempts
        started = self.claim.started  # the claim started the first attempt here already
        while True:
            if started:
                # Begun, so a drain lets it run like any attempt in progress.
                if self._stop_requested(attempt, interrupted=True):
                    return
                started = False
            else:
                if self._stop_requested(attempt):
                    return
                attempt += 1
                self._publish([self._event(ev.STARTED, attempt)], attempts=attempt)
            structlog.contextvars.bind_contextvars(attempt=attempt)
            self._answer_started = False
            try:
                message = self._attempt(attempt)
            except _Stopped:
                self._stop_requested(attempt, interrupted=True)
                return
            except _SkipModel as skip:
                self._skip_cooling_model(attempt, skip.cooldown)
                attempt -= 1  # nothing was sent: the attempt is begun again, on the next model
                continue
            except UpstreamError as exc:
                if self._stop_requested(attempt, interrupted=True):
                    return  # the error is the interrupt itself (or the deadline)
                mid_stream = self._answer_started
                if mid_stream and not self.settings.retry_mid_stream and exc.retryable:
                    exc = PermanentUpstreamError(
                        f"{exc.message} (mid-stream retries are off)",
                        error_type=exc.error_type,
                        status_code=exc.status_code,
                        reason=exc.reason,
                    )
                if self._retry_or_fail(exc, attempt):
                    continue
                return
            self._finish(ev.COMPLETED, attempt, message=message)
            return

    def _skip_cooling_model(self, attempt: int, cooldown: ModelCoolingDown) -> None:
        """Move to the next model of the chain now: the current one is cooling down."""
        left = self.model
        state = skip_model(self.fallback)
        assert state is not None  # reserve() only raises it when a later model exists
        self._use_model(state)
        m.FALLBACKS.labels(left, "model_cooling_down").inc()
        log.info(
            "fallback_model_switched",
            from_model=left,
            to_model=self.model,
            reason="model_cooling_down",
            cooldown_s=round(cooldown.retry_in_s, 3),
        )
        event = self._event(
            ev.RETRY,
            attempt,
            reason="model_cooling_down",
            delay_s=0.0,
            model=self.model,
            error={
                "type": "model_cooling_down",
                "message": f"{left} is under a rate-limit cooldown for "
                f"{cooldown.retry_in_s:.1f} s; the attempt goes to {self.model}",
                "status_code": None,
            },
        )
        self._publish([event], attempts=attempt - 1, attempt_model=self.model)

    def _stop_requested(self, attempt: int, *, interrupted: bool = False) -> bool:
        """Act on a stop signal, if any: True when the job must not go on here.

        ``cancelled`` ends the job; ``expired`` (the keeper's watchdog, or the deadline reached
        while waiting) ends it too; ``lease_lost`` leaves it to the worker that holds the lease
        now; ``shutdown`` (or a drain noticed while waiting) hands it back to the queue.
        """
        reason = self.handle.stop_reason
        if reason is None and time.time() >= self.deadline_at:
            reason = "expired"  # e.g. the wait for the headers ended at the deadline
        if reason is None and self.handle.draining and not interrupted:
            reason = "shutdown"  # between calls: nothing runs that the grace could finish
        if reason is None:
            return False
        if reason == "cancelled":
            self._finish(ev.CANCELLED, attempt)
        elif reason == "expired":
            self._expire(attempt)
        elif reason == "lease_lost":
            log.warning("job_left_to_lease_holder")
        else:
            if interrupted and self._answer_started and not self.settings.retry_mid_stream:
                self._fail_mid_stream(attempt, "worker_shutdown", "shut down mid-stream")
                return True
            if interrupted:
                # The interrupted attempt's chunks are void; the next delivery starts over.
                self._publish(
                    [
                        self._event(
                            ev.RETRY,
                            attempt,
                            reason="worker_shutdown",
                            delay_s=0.0,
                            model=self.model,
                            error={
                                "type": "worker_shutdown",
                                "message": "the worker shut down; the job went back to the queue",
                                "status_code": None,
                            },
                        )
                    ]
                )
            raise HandBack
        return True

    def _expire(self, attempt: int) -> None:
        """End the job ``expired``; like a cancel, the chunks of a running attempt are void."""
        self._finish(
            ev.EXPIRED,
            attempt,
            error={
                "type": "expired",
                "message": "the job passed its deadline",
                "status_code": None,
            },
        )

    def _fail_mid_stream(self, attempt: int, reason: str, what: str) -> None:
        """With RETRY_MID_STREAM off, a stream that cannot go on here ends the job ``failed``
        rather than restarting it elsewhere."""
        payload = self.payload or {"job_id": self.job_id, "request": self.request}
        self._finish(
            ev.FAILED,
            attempt,
            error={
                "type": reason,
                "message": f"the worker running this job {what}, and mid-stream retries are off",
                "status_code": None,
            },
            dead_letter=(reason, payload),
        )

    def _retry_or_fail(self, exc: UpstreamError, attempt: int) -> bool:
        """Publish a ``retry`` and wait, or end the job ``failed``; True means try again."""
        next_state = after_failure(
            self.fallback, exc, after_attempts=self.settings.fallback_after_attempts
        )
        delay_s = backoff_delay_s(
            attempt,
            base_s=self.settings.backoff_base_s,
            max_s=self.settings.backoff_max_s,
            retry_after=exc.retry_after_s
            if honours_retry_after(self.fallback, next_state, exc)
            else None,
            retry_after_max_s=self.settings.retry_after_max_s,
        )
        time_left_s = self.deadline_at - time.time()
        if should_give_up(
            exc,
            attempt=attempt,
            max_attempts=self.settings.max_attempts,
            delay_s=delay_s,
            time_left_s=time_left_s,
        ):
            log.warning(
                "job_failed",
                reason=exc.reason,
                status_code=exc.status_code,
                error_type=exc.error_type,
                retryable=exc.retryable,
            )
            # The original payload (the request; no secrets) and why, for `llm-worker dlq`.
            payload = self.payload or {"job_id": self.job_id, "request": self.request}
            self._finish(
                ev.FAILED, attempt, error=exc.to_error(), dead_letter=(exc.reason, payload)
            )
            return False
        m.RETRIES.labels(self.model, exc.reason).inc()
        failed_on = self.model
        self._use_model(next_state)
        if self.model != failed_on:
            m.FALLBACKS.labels(failed_on, exc.reason).inc()
            log.info(
                "fallback_model_switched",
                from_model=failed_on,
                to_model=self.model,
                reason=exc.reason,
            )
        log.info(
            "upstream_retry_scheduled",
            reason=exc.reason,
            delay_s=round(delay_s, 3),
            status_code=exc.status_code,
        )
        hash_fields: dict[str, Any] = (
            {"attempt_model": self.model} if len(self.fallback.chain) > 1 else {}
        )
        self._publish(
            [
                self._event(
                    ev.RETRY,
                    attempt,
                    reason=exc.reason,
                    delay_s=round(delay_s, 3),
                    error=exc.to_error(),
                    model=self.model,
                )
            ],
            **hash_fields,
        )
        self.handle.sleep(delay_s)  # wakes early on cancel or shutdown
        return True

    def _reserve(self, attempt: int) -> Reservation:
        """Wait for the shared rate limiter (:mod:`worker.ratelimit.gate`) before an attempt.

        A wait too long for this worker raises :class:`JobPostponed` (the task requeues the
        job with a countdown), a drain :class:`HandBack`; both announce it with a ``retry``
        event, and the attempt, which never reached the upstream, does not count.
        """
        try:
            return self.rt.rate_limit.reserve(
                self.job_id,
                self.request,
                model=self.model,
                deadline_at=self.deadline_at,
                sleep=self.handle.sleep,
                skip_cooldown=self.fallback.has_next,
            )
        except ModelCoolingDown as exc:
            raise _SkipModel(exc) from None
        except WaitInterrupted:
            if self.handle.stop_reason is not None:
                raise _Stopped from None
            postponed = JobPostponed(
                0.0,
                reason="worker_shutdown",
                detail="the worker shut down; the job went back to the queue",
            )
            requeue: Exception = HandBack()
        except JobPostponed as exc:
            postponed = requeue = exc
        except RateLimitCapacity as exc:
            # No wait could grant it: a permanent failure, not a lock on the key.
            raise PermanentUpstreamError(
                str(exc), error_type="rate_limit_capacity", reason="rate_limit_capacity"
            ) from None
        event = self._event(
            ev.RETRY,
            attempt,
            reason=postponed.reason,
            delay_s=round(postponed.countdown_s, 3),
            error=postponed.to_error(),
            model=self.model,
        )
        self._publish([event])
        # The release (lease-checked, with the task's hand-back) sets it queued again and
        # uncounts the attempt that never reached the upstream.
        self.released_attempts = attempt - 1
        raise requeue

    def _attempt(self, attempt: int) -> dict[str, Any]:
        """One upstream call; returns the final message or raises UpstreamError."""
        reservation = self._reserve(attempt)
        sent_at = time.monotonic()
        status = None
        # Set by the first streamed event: the response arrived with a 2xx status, so a later
        # failure (cut, error event) keeps the HTTP status rather than counting as "network".
        self._response_arrived = False
        try:
            if not self.request.get("stream"):
                message = self.rt.upstream.create(
                    self.request, on_open=self.handle.set_interrupt, deadline_at=self.deadline_at
                )
                status = 200
            else:
                message = self._stream(attempt, sent_at)
                status = 200
            self.rt.rate_limit.settle(reservation, message, model=self.model)
        except UpstreamError as exc:
            status = 200 if self._response_arrived else exc.status_code
            # Output began if a chunk was published, or a 200 body arrived (malformed).
            output = self._answer_started or exc.status_code == 200
            self.rt.rate_limit.after_error(
                reservation, exc, model=self.model, produced_output=output
            )
            raise
        finally:
            self.rt.rate_limit.release(reservation)
            self.handle.set_interrupt(None)
            m.UPSTREAM_REQUESTS.labels(self.model, m.status_label(status)).inc()
            m.UPSTREAM_LATENCY.labels(self.model).observe(time.monotonic() - sent_at)
        usage = message.get("usage") or {}
        m.INPUT_TOKENS.labels(self.model, self.tenant).inc(int(usage.get("input_tokens") or 0))
        m.OUTPUT_TOKENS.labels(self.model, self.tenant).inc(int(usage.get("output_tokens") or 0))
        return message

    def _stream(self, attempt: int, sent_at: float) -> dict[str, Any]:
        snapshot: dict[str, Any] | None = None
        first_token = True
        stream = self.rt.upstream.stream_batches(
            self.request, on_open=self.handle.set_interrupt, deadline_at=self.deadline_at
        )
        try:
            for batch in stream:
                if self.handle.stop_reason is not None:
                    raise _Stopped
                snapshot = self._on_events(attempt, sent_at, snapshot, batch, first_token)
                first_token = first_token and all(
                    e.get("type") != "content_block_delta" for e in batch
                )
        finally:
            stream.close()  # closes the HTTP response: the upstream stops generating
        assert snapshot is not None  # the client raises when no message_stop arrived
        return final_message(snapshot)

    def _on_events(
        self,
        attempt: int,
        sent_at: float,
        snapshot: dict[str, Any] | None,
        batch: list[dict[str, Any]],
        first_token: bool,
    ) -> dict[str, Any]:
        """Fold the upstream events of one network read into the message and publish them
        as chunks, their text deltas coalesced (:mod:`worker.runtime.coalesce`), in one round
        trip."""
        self._response_arrived = True
        # Up to the first text delta the chunks skip the publishing linger: what a reader
        # waits for first (time to first token) is not held back for company.
        urgent = first_token
        if not self._answer_started:
            self._answer_started = any(e.get("type") in ANSWER_EVENTS for e in batch)
        for upstream_event in batch:
            try:
                snapshot = accumulate(snapshot, upstream_event)
            except AccumulateError as exc:
                # Events that cannot apply (a delta before message_start, broken tool JSON)
                # are the upstream's malformed stream, worth another attempt, not our bug.
                raise TransientUpstreamError(
                    f"malformed stream: {exc}", error_type="api_error", reason="malformed_sse"
                ) from exc
            if first_token and upstream_event.get("type") == "content_block_delta":
                m.TIME_TO_FIRST_TOKEN.labels(self.model).observe(time.monotonic() - sent_at)
                first_token = False
        chunks = coalesce(batch)
        self._publish(
            [self._event(ev.CHUNK, attempt, event=chunk) for chunk in chunks],
            wait=False,
            urgent=urgent,
        )
        if self._chunks_published is None or self._chunks_published[0] != self.model:
            # Bound once per model (a fallback changes it): labels() per network read was 10%
            # of a burst's CPU.
            self._chunks_published = (self.model, m.CHUNKS_PUBLISHED.labels(self.model))
        self._chunks_published[1].inc(len(chunks))
        assert snapshot is not None  # a batch is never empty
        return snapshot
