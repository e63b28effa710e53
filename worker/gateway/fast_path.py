"""The gateway's fast path: a ``/v1/messages`` job run by the gateway itself, not the queue.

Through the queue, one request crosses four processes (gateway, Redis, a worker, the
upstream) and about eight round trips in sequence; the queue hop and Celery's dispatch were
most of what the gateway added (docs/performance.md). When a job may run at once anyway, the
gateway runs it in-process with the worker's own code:

1. ``submit.lua`` writes the job as for any producer (record, tenant quota, budget check,
   idempotent id), in its fast-path form: if nothing of the job's priority or higher waits on
   the queue, the Celery message is kept in the queue's *outbox* instead of being pushed;
   otherwise it is queued as usual and this module is not involved;
2. the gateway claims the job as a worker does (``claim.lua``: its lease, the ``started``
   event) and runs :class:`~worker.runtime.runner.JobRunner` in a thread: the shared rate
   limiter, events in the job's stream, retries, fallbacks, cancel, deadline, usage and cost,
   all as in a worker; its first reservation of the limiter does not wait;
3. the job's end (``finish.lua``) takes its message out of the outbox in the same step, and
   the terminal event is handed to the request, which answers from it. A streamed request
   is handed each event as the runner makes it (a chunk as it is posted to Redis, not once
   stored: time to first token does not wait for a round trip and two thread hand-offs);
   its frames are named by the events' places (attempt, ``seq``), which a client resumes
   from as from a stream id. If the run ends without the job's end (handed back, ended by
   someone else), the request reads the rest from Redis, skipping what it relayed.

Durability: the job is written before the call, and its message is in Redis. If the gateway
dies, its lease lapses (``LEASE_TTL_S``) and a worker's outbox sweeper publishes the message
(:mod:`worker.runtime.sweeper`); a worker takes the job over as from a worker that died. If
the limiter would make the job wait, or the gateway shuts down, or anything goes wrong here,
the job is handed back (lease released, message pushed onto the queue) and the request waits
for it as on the queue path.

The message waits in the outbox rather than on the queue: queued, a worker would fetch,
dispatch and claim it during the gateway's call (or claim it first), and park behind the
gateway's lease until the job ended. The outbox costs the submit step it already is, a
``ZREM``/``DEL`` inside the end's script, and the sweepers' ticks.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog

from worker import events as ev
from worker.broker import task_message
from worker.client.core import ClaimWith, Submission
from worker.client.sync import Client
from worker.keys import Keys
from worker.ratelimit.gate import JobPostponed
from worker.runtime.context import Runtime, build_runtime
from worker.runtime.job_store import Claim, claim_call, parse_claim
from worker.runtime.leases import new_token
from worker.runtime.runner import HandBack, JobRunner
from worker.settings import Settings

log = structlog.get_logger("worker.gateway.fast_path")


#: The interpreter's thread switch interval with the fast path on (see FastPath).
SWITCH_INTERVAL_S = 0.0005
#: How long a streamed job's thread waits, once it handed its first text delta to the
#: request, for the event loop to have sent it, before it writes the delta to Redis and goes
#: on: the committer's thread and the job's, taking the GIL meanwhile, held the first token
#: back (0.35-0.5 ms at p50, measured side by side).
DELTA_HOLD_S = 0.005


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a fast-path job left the gateway: ``event`` is its terminal event when the gateway
    ended it; None when the job went to the queue (``held`` False: the submit queued it behind
    others, or the id named an existing job; True: handed back) or was ended by someone else
    (the request then reads the end from Redis)."""

    event: dict[str, Any] | None
    held: bool = True


@dataclass(slots=True)
class Run:
    """A request's job on the fast path, as the event loop sees it: ``submitted`` (streamed
    requests only) is set once the job is written: to the stream id of its ``started`` event
    when it is held for the gateway (``0-0`` if unknown), None when the submit queued it;
    ``ended`` is its :class:`Outcome`. What the submit raised is raised by ``submitted``
    (a streamed request) or ``ended``. ``live`` (streamed requests): the events of the
    gateway's run, a list per write, as they are made; None once the run is over."""

    job_id: str
    ended: asyncio.Future[Outcome]
    submitted: asyncio.Future[str | None] | None
    live: asyncio.Queue[list[dict[str, Any]] | None] | None = None
    #: Set once a streamed request has sent its first text delta (see ``DELTA_HOLD_S``).
    delta_sent: threading.Event | None = None
    #: Where a streamed request reads the job's events from (what ``submitted`` said).
    after: str = "0-0"


@dataclass(frozen=True, slots=True)
class _Told:
    """What the request is told of its job's run, from the job's thread: ``ended`` its
    :class:`Outcome` (the end as soon as it is stored, again when the run is over);
    ``events`` (streamed requests) each write's events as they are made, None once the run is
    over; ``delta_sent``: set once the request sent the first text delta (``DELTA_HOLD_S``)."""

    ended: Callable[[Outcome], None]
    events: Callable[[list[dict[str, Any]] | None], None] | None = None
    delta_sent: threading.Event | None = None


class GatewayRunner(JobRunner):
    """The worker's runner, keeping the terminal event it wrote; its first reservation of the
    rate limiter does not wait (a wait is the queue's to do: the job is handed back)."""

    terminal: dict[str, Any] | None = None
    #: Told the terminal event as soon as it is stored (the request answers meanwhile).
    on_end: Callable[[dict[str, Any]], None] | None = None
    #: Told the job's events as they are written (a chunk as soon as it is posted).
    on_events: Callable[[list[dict[str, Any]]], None] | None = None
    #: Waited for (at most ``DELTA_HOLD_S``) once the first text delta is handed over.
    delta_sent: threading.Event | None = None
    _reserved_once = False
    _held = False

    def _publish(
        self,
        events: list[dict[str, Any]],
        *,
        wait: bool = True,
        urgent: bool = False,
        **hash_fields: Any,
    ) -> None:
        tell = self.on_events
        if tell is not None and not self._held and any(map(is_text_delta, events)):
            # The first text delta: to the request first, its write once the loop has sent it
            # (the committer's thread would otherwise take the GIL from the loop meanwhile).
            self._held = True
            tell(events)
            if self.delta_sent is not None:
                self.delta_sent.wait(DELTA_HOLD_S)
            tell = None
        super()._publish(events, wait=wait, urgent=urgent, **hash_fields)
        if tell is not None:
            tell(events)

    def _stored_end(self, event: dict[str, Any]) -> None:
        self.terminal = event
        if self.on_events is not None:
            self.on_events([event])
        if self.on_end is not None:
            self.on_end(event)

    def _reserve(self, attempt: int) -> Any:
        if self._reserved_once:
            return super()._reserve(attempt)
        self._reserved_once = True
        # A deadline of now bounds the limiter's wait to zero: granted at once, or postponed.
        deadline_at, self.deadline_at = self.deadline_at, time.time()
        try:
            return super()._reserve(attempt)
        finally:
            self.deadline_at = deadline_at


class FastPath:
    """Runs held jobs in threads of the gateway, at most ``GATEWAY_FAST_PATH_JOBS`` at once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        same_redis = settings.effective_broker_url == str(settings.redis_url)
        self.enabled = settings.gateway_fast_path and same_redis
        self.capacity = settings.gateway_fast_path_jobs
        self.running = 0
        #: As a worker names itself: the job hash's ``worker`` while the gateway runs a job.
        self.hostname = f"{socket.gethostname()}:{os.getpid()}"
        self._places = threading.Lock()
        self._rt: Runtime | None = None
        self._client: Client | None = None
        self._rt_lock = threading.Lock()
        if self.enabled:
            # The jobs' threads share the GIL with the event loop: at the default 5 ms a busy
            # thread can hold a request's next step back that long (a streamed answer's next
            # chunk); 0.5 ms bounds it.
            sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self._pool = ThreadPoolExecutor(
            max_workers=self.capacity, thread_name_prefix="llmw-fast-path"
        )

    # -- places ----------------------------------------------------------------------------

    def take(self) -> bool:
        """Take a place for one job; False when the fast path is off or full."""
        if not self.enabled:
            return False
        with self._places:
            if self.running >= self.capacity:
                return False
            self.running += 1
            return True

    def give(self) -> None:
        with self._places:
            self.running -= 1

    def claim_with(self, token: str) -> ClaimWith:
        """The claim the gateway sends with a job's submit, under lease ``token``."""
        settings = self.settings

        def call(job_id: str, payload: dict[str, Any]) -> tuple[list[str], list[Any]]:
            return claim_call(
                self.keys,
                job_id,
                worker=self.hostname,
                model=str(payload["request"]["model"]),
                ttl_s=int(settings.job_deadline_s + settings.result_ttl_s),
                token=token,
                lease_ttl_s=settings.lease_ttl_s,
                max_deliveries=settings.max_deliveries,
                start_attempt=True,
                result_ttl_s=settings.result_ttl_s,
                submitted_at=payload.get("submitted_at"),
                deadline_at=payload.get("deadline_at"),
                held_in=self.keys.outbox(settings.queue),
            )

        return call

    def start(self, submission: Submission, *, streamed: bool) -> Run:
        """Submit the prepared job and, when it is held for the gateway, run it, all in a
        thread of the fast path (whose place the caller took): one hand-off each way, and the
        thread's synchronous Redis client, cheaper than the event loop's. Its place is given
        back when the thread is done."""
        loop = asyncio.get_running_loop()
        run = Run(
            submission.ids[0],
            loop.create_future(),
            loop.create_future() if streamed else None,
            asyncio.Queue() if streamed else None,
            threading.Event() if streamed else None,
        )
        try:
            self._pool.submit(self._submit_and_run, submission, run, loop)
        except RuntimeError:  # the gateway is shutting down: nothing was written
            self.give()
            raise
        return run

    # -- the job (in a thread) ---------------------------------------------------------------

    def client(self) -> Client:
        with self._rt_lock:
            if self._client is None:
                self._client = Client(self.settings)
            return self._client

    def runtime(self) -> Runtime:
        with self._rt_lock:
            if self._rt is None:
                # No linger for its chunk writes, and its claims and ends sent by the job's
                # thread: the gateway runs few jobs at once, and a streamed job's end (which
                # ends its client's stream) waits for them.
                self._rt = build_runtime(
                    self.settings.model_copy(update={"publish_linger_s": 0}),
                    shared_round_trips=False,
                )
                self._rt.hostname = self.hostname
            return self._rt

    def _submit_and_run(
        self, submission: Submission, run: Run, loop: asyncio.AbstractEventLoop
    ) -> None:
        try:
            self._submit_and_run_here(submission, run, loop)
        finally:
            self.give()

    def _submit_and_run_here(
        self, submission: Submission, run: Run, loop: asyncio.AbstractEventLoop
    ) -> None:
        def tell(future: asyncio.Future[Any] | None, value: Any) -> None:
            if future is not None:
                loop.call_soon_threadsafe(_settle, future, value)

        structlog.contextvars.clear_contextvars()
        token = new_token(self.hostname)
        try:
            client = self.client()
            job_id, payload, raw = client.submit_held(submission, self.claim_with(token))
        except BaseException as exc:
            # Told once, to the future the request awaits first (a streamed one never awaits
            # `ended` when its submit failed).
            tell(run.submitted if run.submitted is not None else run.ended, exc)
            return
        claim = parse_claim(raw)  # `not_held`: the submit queued it, or the job existed
        if claim.state_before == "queued":
            tell(run.submitted, claim.started_id or "0-0")
            queue = run.live

            def events(batch: list[dict[str, Any]] | None) -> None:
                assert queue is not None
                loop.call_soon_threadsafe(queue.put_nowait, batch)

            told = _Told(
                functools.partial(tell, run.ended),
                None if queue is None else events,
                run.delta_sent,
            )
            self._run(job_id, payload, claim, token, told)
        else:  # the request reads the job's end from Redis
            tell(run.submitted, None)
            tell(run.ended, Outcome(None, held=False))

    def _run(
        self,
        job_id: str,
        payload: dict[str, Any],
        claim: Claim,
        token: str,
        told: _Told,
    ) -> None:
        structlog.contextvars.bind_contextvars(job_id=job_id, runner="gateway")
        outcome = Outcome(None)
        try:
            rt = self.runtime()
            outcome = self._run_claimed(rt, job_id, payload, claim, token, told=told)
        except Exception:
            # A bug of ours or Redis away: the job goes to a worker ("run twice rather than
            # never"); if even that fails, the lease lapses and a sweeper publishes it.
            log.exception("fast_path_crashed")
            try:
                self._hand_back(rt, job_id, payload, token, attempts=None)
            except Exception:
                log.exception("fast_path_hand_back_failed")
        finally:
            if told.events is not None:
                told.events(None)  # the run is over: the request reads the rest from Redis
            told.ended(outcome)

    def _run_claimed(
        self,
        rt: Runtime,
        job_id: str,
        payload: dict[str, Any],
        claim: Claim,
        token: str,
        *,
        told: _Told,
    ) -> Outcome:
        request = payload["request"]
        model = str(request["model"])
        structlog.contextvars.bind_contextvars(model=model)
        own = payload.get("fallback_models")
        fallbacks = tuple(own) if own is not None else self.settings.fallbacks.get(model, ())
        handle = rt.leases.register(job_id, token)
        runner = GatewayRunner(
            rt,
            job_id,
            request,
            claim,
            handle,
            submitted_at=payload.get("submitted_at"),
            payload=payload,
            fallbacks=fallbacks,
        )
        runner.on_end = lambda event: told.ended(Outcome(event))
        runner.on_events = told.events
        runner.delta_sent = told.delta_sent
        try:
            runner.run()
        except (HandBack, JobPostponed) as exc:
            self._hand_back(rt, job_id, payload, token, attempts=runner.released_attempts)
            log.info("fast_path_handed_back", reason=type(exc).__name__)
            return Outcome(None)
        finally:
            rt.leases.unregister(handle)
        if runner.terminal is None:
            return Outcome(None)  # someone else ended it (a cancel): the request reads it
        return Outcome(runner.terminal)

    def _hand_back(
        self,
        rt: Runtime,
        job_id: str,
        payload: dict[str, Any],
        token: str,
        *,
        attempts: int | None,
    ) -> None:
        """Give the job to the queue: release the lease (queued again), push the message and
        take it out of the outbox, in that order (a sweeper between the two publishes a copy,
        which meets the job's lease or end)."""
        rt.store.release(job_id, token, attempts=attempts)
        queue = self.settings.queue
        pipe = rt.store.redis.pipeline(transaction=True)
        pipe.lpush(queue, task_message(job_id, payload, queue=queue))
        pipe.zrem(self.keys.outbox(queue), job_id)
        pipe.delete(self.keys.outbox_message(job_id))
        pipe.execute()

    # -- the gateway's end -------------------------------------------------------------------

    def close(self) -> None:
        """Warm shutdown: jobs waiting (backoff) are handed back now, running ones when
        ``SHUTDOWN_GRACE_S`` runs out; returns once every job has ended or gone back."""
        rt = self._rt
        if rt is not None:
            rt.leases.drain(self.settings.shutdown_grace_s)
        self._pool.shutdown(wait=True)
        if rt is not None:
            rt.close()
        if self._client is not None:
            self._client.close()


def is_text_delta(event: dict[str, Any]) -> bool:
    """A chunk event holding a ``content_block_delta`` (what time to first token waits for)."""
    return event.get("type") == ev.CHUNK and (event.get("event") or {}).get("type") == (
        "content_block_delta"
    )


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


__all__ = ["FastPath", "GatewayRunner", "Outcome", "Run"]
