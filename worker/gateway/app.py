"""The HTTP front door: Anthropic's ``/v1/messages`` and Message Batches, and our jobs.

Every route but ``/healthz`` and ``/openapi.json`` needs a producer key (``x-api-key``, as
the Anthropic SDKs send it, or ``Authorization: Bearer``); the key names the caller's tenant
(:mod:`worker.gateway.auth`). A tenant's jobs and batches are its own: their ids are
qualified by the tenant on the way in (``<tenant>/<job_id>`` in Redis) and shown plain on
the way out, and any other tenant gets a 404 for them, as for an id that does not exist.
Bodies are read up to a bound and refused with 413 beyond it. Errors have Anthropic's shape:
``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from worker import events as ev
from worker import metrics as m
from worker.accounting.usage import usage_report
from worker.client import core as p
from worker.client.aio import AsyncClient, AsyncJob
from worker.client.batch_file import error_response
from worker.errors import (
    BudgetExceeded,
    JobCancelled,
    JobConflict,
    JobExpired,
    JobFailed,
    JobNotFound,
    QuotaExceeded,
    RequestInvalid,
)
from worker.gateway import relay
from worker.gateway.auth import KeyRing
from worker.gateway.batches import BatchStore, parse_requests
from worker.gateway.exporter import start_exporter
from worker.gateway.fast_path import FastPath, Outcome, Run, is_text_delta
from worker.gateway.guard import (
    Busy,
    Guard,
    Slots,
    problem_response,
    tenant_of,
)
from worker.gateway.openapi import openapi_document
from worker.settings import Settings

JOB_ID_HEADER = "llm-worker-job-id"
#: A job's priority (0-9, higher first; default 5) and its life in seconds from submission.
PRIORITY_HEADER = "llm-worker-priority"
DEADLINE_HEADER = "llm-worker-deadline"
#: The job's fallback models, comma-separated, in order (replacing LLM_WORKER_FALLBACKS').
FALLBACK_HEADER = "llm-worker-fallback-models"
#: Response header: ``gateway`` when the gateway ran the job itself (its fast path; for a
#: stream: took it to run), ``queue`` when a worker did.
PATH_HEADER = "llm-worker-path"


#: The gateway's Redis connections carry this name (CLIENT LIST shows how many it holds).
GATEWAY_CLIENT_NAME = "llmw-gateway"

#: The Anthropic SDKs honour it over their own retry rules.
SHOULD_RETRY_HEADER = "x-should-retry"


class HTTPProblem(Exception):
    def __init__(self, status: int, error_type: str, message: str) -> None:
        self.status = status
        self.error_type = error_type
        self.message = message


def _number_header(request: Request, name: str, kind: type[int] | type[float]) -> Any:
    """A numeric request header, or None when absent; 400 when it is not a number."""
    raw = request.headers.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        return kind(raw.strip())
    except ValueError:
        kind_name = "an integer" if kind is int else "a number"
        raise HTTPProblem(
            400, "invalid_request_error", f"header {name} must be {kind_name}"
        ) from None


def submit_problem(
    exc: RequestInvalid | BudgetExceeded | JobConflict | QuotaExceeded, job_id: str | None = None
) -> HTTPProblem:
    """The HTTP answer to a refused submission: 400, 429 (a tenant at its budget, as the
    Anthropic API answers a spend limit, or at its queued quota) or 409. Ids are the
    caller's own, without its tenant's prefix."""
    if isinstance(exc, RequestInvalid):
        return HTTPProblem(400, "invalid_request_error", _describe(exc))
    if isinstance(exc, BudgetExceeded):
        return HTTPProblem(429, "rate_limit_error", str(exc))
    if isinstance(exc, QuotaExceeded):
        return _quota_problem(exc)
    return HTTPProblem(
        409,
        "invalid_request_error",
        f"job {job_id!r} exists with a different request; choose another job id",
    )


def _list_header(request: Request, name: str) -> list[str] | None:
    """A comma-separated header as a list (empty: none), or None when absent."""
    raw = request.headers.get(name)
    if raw is None:
        return None
    return [part.strip() for part in raw.split(",") if part.strip()]


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type="application/json")


def _not_found(job_id: str) -> HTTPProblem:
    # The same answer whether the job never existed or is another tenant's.
    return HTTPProblem(404, "not_found_error", f"no job {job_id!r} (never submitted, or expired)")


def _quota_problem(exc: QuotaExceeded) -> HTTPProblem:
    return HTTPProblem(
        429,
        "rate_limit_error",
        f"this key's tenant has {exc.limit} queued jobs, its quota "
        "(LLM_WORKER_TENANT_MAX_QUEUED); submit again once some have started",
    )


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.key_ring = KeyRing(
            [k.get_secret_value() for k in settings.gateway_api_keys],
            settings.gateway_api_keys_file,
        )
        m.add_tenant_labels(self.key_ring.tenants)
        self.requests = Slots(
            "requests", settings.gateway_max_requests, settings.gateway_tenant_max_requests
        )
        self.streams = Slots(
            "event streams", settings.gateway_max_streams, settings.gateway_tenant_max_streams
        )
        # Bounded: every live event stream holds a connection while it waits for events.
        self.client = AsyncClient(
            settings,
            max_connections=settings.gateway_redis_connections,
            connection_wait_s=settings.gateway_redis_wait_s,
            client_name=GATEWAY_CLIENT_NAME,
        )
        self.batches = BatchStore(self.client)
        self.wait_s = settings.job_deadline_s + 60
        self.fast_path = FastPath(settings)
        #: Fast-path jobs running in the background (a streamed request's, read from Redis).
        self._background: set[asyncio.Future[Outcome]] = set()

    # -- edges -------------------------------------------------------------------------------

    def tenant_of_key(self, presented: str) -> str | None:
        tenant = self.key_ring.tenant_of(presented)
        if tenant is not None:
            m.add_tenant_labels((tenant,))  # a key added to the file since the start
        return tenant

    async def body(self, request: Request, limit: int) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isascii() and length.isdigit() and int(length) > limit:
            raise HTTPProblem(413, "request_too_large", f"body over the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPProblem(413, "request_too_large", f"body over the limit of {limit} bytes")
            chunks.append(chunk)
        try:
            return orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError as exc:
            raise HTTPProblem(400, "invalid_request_error", f"body is not JSON: {exc}") from None

    @staticmethod
    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    # -- /v1/messages ------------------------------------------------------------------------

    async def messages(self, request: Request) -> Response:
        resume = request.headers.get("last-event-id")
        if resume:
            return await self._resume(request, resume)
        body = await self.body(request, self.settings.max_request_bytes)
        if not isinstance(body, dict):
            raise HTTPProblem(400, "invalid_request_error", "the body must be a JSON object")
        streamed = body.get("stream") is True
        job_id = request.headers.get(JOB_ID_HEADER) or None
        priority = _number_header(request, PRIORITY_HEADER, int)
        deadline_s = _number_header(request, DEADLINE_HEADER, float)
        fallbacks = _list_header(request, FALLBACK_HEADER)
        wait_s = self.wait_s if deadline_s is None else deadline_s + 60
        if streamed:
            self.streams.take(tenant_of(request))  # before the job exists: a 429 writes nothing
        try:
            job, ran = await self._submit_and_run(
                request,
                body,
                streamed=streamed,
                job_id=job_id,
                priority=priority,
                deadline_s=deadline_s,
                fallbacks=fallbacks,
            )
        except BaseException:
            if streamed:
                self.streams.give(tenant_of(request))
            raise
        if streamed:
            if ran is not None:
                # The job runs here; the stream reads its events from Redis as for a queued
                # job (their stream ids are what a client resumes from).
                m.GATEWAY_JOBS.labels("gateway").inc()
                self._background.add(ran.ended)
                ran.ended.add_done_callback(self._background.discard)
            # A job the gateway runs is read from after its `started` event, which the
            # relay skips anyway: the first read waits for the answer's first chunk.
            return self._anthropic_stream(
                request,
                job,
                after=ran.after if ran is not None else "0-0",
                slot_taken=True,
                ran_here=ran is not None,
                run=ran,
            )
        return await self._answer(job, ran, wait_s)

    async def _answer(self, job: AsyncJob, ran: Run | None, wait_s: float) -> Response:
        """A non-streamed request's answer: from the gateway's own run of the job when it
        ended it, else from the job's end as Redis tells it."""
        ran_here = False
        try:
            message = None
            if ran is not None:
                try:
                    outcome = await asyncio.shield(ran.ended)
                except (RequestInvalid, BudgetExceeded, JobConflict, QuotaExceeded) as exc:
                    raise submit_problem(exc, _plain(job)) from None
                m.GATEWAY_JOBS.labels("gateway" if outcome.held else "queue").inc()
                if outcome.event is not None:
                    ran_here = True
                    message = p.outcome(job.job_id, outcome.event)
            if message is None:
                message = await job.result(timeout=wait_s)
        except JobFailed as exc:
            kind = ev.FAILED
            if isinstance(exc, JobCancelled):
                kind = ev.CANCELLED
            elif isinstance(exc, JobExpired):
                kind = ev.EXPIRED
            error = relay.terminal_error(
                {"type": kind, "error": exc.error}, upstream=self.settings.upstream_name
            )
            status = relay.http_status(exc.error, kind)
            headers = self._headers(job, ran_here=ran_here)
            if kind == ev.EXPIRED:
                # The SDKs retry a 504 as a new request, i.e. a new job past the same deadline.
                headers[SHOULD_RETRY_HEADER] = "false"
            return _json(error_response(error), status, headers)
        except TimeoutError:
            # The gateway's own wait ended (the job's deadline + 60 s): the job goes on and its
            # result can still be read; a retry would start it a second time.
            message_text = (
                f"the job did not end within the gateway's wait of {wait_s:g} s; it goes "
                f"on: GET /v1/jobs/{_plain(job)}"
            )
            headers = {**self._headers(job), SHOULD_RETRY_HEADER: "false"}
            error = {"type": "timeout_error", "message": message_text}
            return _json(error_response(error), 504, headers)
        except JobNotFound:
            # The job's records vanished while we waited (expired, or Redis lost them).
            raise _not_found(_plain(job)) from None
        return _json(message, headers=self._headers(job, ran_here=ran_here))

    async def _resume(self, request: Request, last_event_id: str) -> Response:
        """A dropped stream, resumed after the frame ``last_event_id`` names."""
        parsed = relay.parse_message_id(last_event_id)
        if parsed is None:
            raise HTTPProblem(400, "invalid_request_error", "Last-Event-ID is not ours")
        job = await self._job(request, parsed[0])
        after, place = relay.resume_point(parsed[1])
        return self._anthropic_stream(request, job, after=after, resumed=True, place=place)

    async def _submit_and_run(
        self,
        request: Request,
        body: dict[str, Any],
        *,
        streamed: bool,
        job_id: str | None,
        priority: int | None,
        deadline_s: float | None,
        fallbacks: list[str] | None,
    ) -> tuple[AsyncJob, Run | None]:
        """The caller's job for ``body``, submitted as its tenant's (a 400, 409 or 429), and
        its run by this gateway when the fast path took it (:mod:`worker.gateway.fast_path`),
        else None: the queue runs it. A fast-path submit is written by the fast path's thread;
        a streamed request waits for it here, a non-streamed one with the job's end."""
        options: dict[str, Any] = {
            "job_id": job_id,
            "priority": priority,
            "deadline_s": deadline_s,
            "fallback_models": fallbacks,
            "tenant": tenant_of(request),
        }
        try:
            if not self.fast_path.take():
                job = await self.client.submit(body, **options)
                request.state.job_id = _plain(job)
                m.GATEWAY_JOBS.labels("queue").inc()
                return job, None
            try:
                submission = p.prepare_submission(
                    self.settings,
                    [body],
                    [job_id],
                    None,
                    priority=priority,
                    tenant=options["tenant"],
                    deadline_s=deadline_s,
                    fallback_models=None if fallbacks is None else [fallbacks],
                )
            except BaseException:
                self.fast_path.give()
                raise
            run = self.fast_path.start(submission, streamed=streamed)
            job = AsyncJob(self.client, run.job_id)
            request.state.job_id = _plain(job)
            if run.submitted is not None:
                after = await asyncio.shield(run.submitted)
                if after is None:
                    m.GATEWAY_JOBS.labels("queue").inc()
                    return job, None
                run.after = after
        except (RequestInvalid, BudgetExceeded, JobConflict, QuotaExceeded) as exc:
            raise submit_problem(exc, job_id) from None
        return job, run

    def _headers(self, job: AsyncJob, *, ran_here: bool | None = None) -> dict[str, str]:
        headers = {JOB_ID_HEADER: _plain(job), "request-id": _plain(job)}
        if ran_here is not None:
            headers[PATH_HEADER] = "gateway" if ran_here else "queue"
        return headers

    def _anthropic_stream(
        self,
        request: Request,
        job: AsyncJob,
        *,
        after: str,
        resumed: bool = False,
        slot_taken: bool = False,
        ran_here: bool | None = None,
        place: relay.Place | None = None,
        run: Run | None = None,
    ) -> Response:
        """The job's events from after stream id ``after`` (and after ``place``, when given)
        as the Anthropic stream; ``resumed``: a client resuming a dropped stream (frames carry
        only chunk ids, so it holds output already). ``run``: the gateway's own run of the
        job, whose events are relayed as they are made; Redis is read once that run is over
        without having ended the job."""

        async def frames() -> AsyncIterator[bytes]:
            state = relay.AnthropicRelay(
                _plain(job), sent_output=resumed, upstream=self.settings.upstream_name, place=place
            )

            def write(batch: list[dict[str, Any]]) -> bytes:
                out: list[bytes] = []
                for event in batch:
                    out.extend(state.feed(event))
                    if state.done:
                        break
                return b"".join(out)

            if run is not None and run.live is not None:
                delta_sent = run.delta_sent
                try:
                    while (events := await run.live.get()) is not None:
                        if data := write(events):
                            yield data
                            if (
                                delta_sent is not None
                                and not delta_sent.is_set()
                                and any(map(is_text_delta, events))
                            ):
                                delta_sent.set()  # the job's thread waits for it (DELTA_HOLD_S)
                        if state.done:
                            return
                finally:
                    if delta_sent is not None:
                        delta_sent.set()
            # One write per read of the job's events, however many frames it makes.
            async for batch in job.event_batches(timeout=self.wait_s, after=after):
                if data := write(batch):
                    yield data
                if state.done:
                    return

        headers = self._headers(job, ran_here=ran_here)
        return self._stream(request, frames(), headers, slot_taken=slot_taken)

    def _stream(
        self,
        request: Request,
        frames: AsyncIterator[bytes],
        headers: dict[str, str],
        *,
        slot_taken: bool = False,
    ) -> Response:
        """An SSE response holding one of the tenant's stream places until it ends."""
        tenant = tenant_of(request)
        if not slot_taken:
            self.streams.take(tenant)
        return _sse(frames, headers, on_close=lambda: self.streams.give(tenant))

    # -- /v1/jobs ----------------------------------------------------------------------------

    async def _job(self, request: Request, job_id: str) -> AsyncJob:
        """The caller's job ``job_id`` (as the caller knows it, plain), or a 404: another
        tenant's job of that id is a different job, which this caller cannot name."""
        request.state.job_id = job_id
        try:
            return await self.client.get(job_id, tenant=tenant_of(request))
        except JobNotFound:
            raise _not_found(job_id) from None

    async def job_status(self, request: Request) -> Response:
        job = await self._job(request, request.path_params["job_id"])
        try:
            status = await job.status()
        except JobNotFound:
            raise _not_found(_plain(job)) from None
        status["job_id"] = _plain(job)
        return _json(status)

    async def job_events(self, request: Request) -> Response:
        job = await self._job(request, request.path_params["job_id"])
        after = request.headers.get("last-event-id") or request.query_params.get("after", "0-0")
        parsed = relay.parse_message_id(after)
        # A messages-route id names a stream id or, for a frame relayed before it was
        # stored, an event's place: read from the start, skipping what the client holds.
        after, place = relay.resume_point(parsed[1]) if parsed else (after.strip(), None)
        if not relay.valid_stream_id(after):
            raise HTTPProblem(400, "invalid_request_error", "Last-Event-ID is not a stream id")
        plain = _plain(job)

        async def frames() -> AsyncIterator[bytes]:
            last = place
            async for batch in job.event_batches(timeout=self.wait_s, after=after):
                out = []
                for event in batch:
                    at = relay.event_place(event)
                    if last is not None and at is not None:
                        if relay.held(at, last):
                            continue
                        last = None  # past what the client holds
                    event["job_id"] = plain
                    out.append(relay.frame(event, event=event["type"], id_=event["stream_id"]))
                if out:
                    yield b"".join(out)

        return self._stream(request, frames(), self._headers(job))

    # -- /v1/messages/batches ----------------------------------------------------------------

    async def batch_create(self, request: Request) -> Response:
        body = await self.body(request, self.settings.gateway_max_body_bytes)
        try:
            items = parse_requests(self.client, body)
        except RequestInvalid as exc:
            raise HTTPProblem(400, "invalid_request_error", _describe(exc)) from None
        priority = _number_header(request, PRIORITY_HEADER, int)
        tenant = tenant_of(request)
        try:
            batch_id = await self.batches.create(items, tenant=tenant, priority=priority)
        except RequestInvalid as exc:
            raise HTTPProblem(400, "invalid_request_error", _describe(exc)) from None
        except BudgetExceeded as exc:
            raise HTTPProblem(429, "rate_limit_error", str(exc)) from None
        except QuotaExceeded as exc:
            raise _quota_problem(exc) from None
        request.state.batch_id = batch_id
        return _json(await self.batches.retrieve(batch_id, self.base_url(request), tenant))

    async def _batch(self, request: Request) -> dict[str, Any]:
        batch_id = request.path_params["batch_id"]
        request.state.batch_id = batch_id
        batch = await self.batches.retrieve(batch_id, self.base_url(request), tenant_of(request))
        if batch is None:
            raise HTTPProblem(404, "not_found_error", f"no message batch {batch_id!r}")
        return batch

    async def batch_retrieve(self, request: Request) -> Response:
        return _json(await self._batch(request))

    async def batch_list(self, request: Request) -> Response:
        q = request.query_params
        raw_limit = q.get("limit", "20")
        # ASCII digits only: int() would also take " 5", "+5", "5_0" and other scripts' digits.
        limit = int(raw_limit) if raw_limit.isascii() and raw_limit.isdigit() else 0
        if not 1 <= limit <= 1000:
            raise HTTPProblem(400, "invalid_request_error", "limit must be 1-1000")
        page = await self.batches.list_page(
            self.base_url(request),
            tenant_of(request),
            limit=limit,
            before_id=q.get("before_id"),
            after_id=q.get("after_id"),
        )
        return _json(page)

    async def batch_cancel(self, request: Request) -> Response:
        await self._batch(request)
        await self.batches.cancel(request.path_params["batch_id"], tenant_of(request))
        return _json(await self._batch(request))

    async def batch_results(self, request: Request) -> Response:
        batch = await self._batch(request)
        if batch["processing_status"] != "ended":
            raise HTTPProblem(
                400, "invalid_request_error", f"batch {batch['id']} has not ended; no results yet"
            )
        return StreamingResponse(
            self.batches.results(batch["id"], tenant_of(request)),
            media_type="application/x-jsonl",
        )

    # -- /v1/usage ---------------------------------------------------------------------------

    async def usage(self, request: Request) -> Response:
        """The caller's own usage, per UTC day and model, over ``start``..``end``."""
        try:
            report = await usage_report(
                self.client.redis,
                self.client.keys,
                tenant_of(request),
                start=request.query_params.get("start"),
                end=request.query_params.get("end"),
            )
        except ValueError as exc:
            raise HTTPProblem(400, "invalid_request_error", str(exc)) from None
        return _json(report)

    # -- misc --------------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        await self.client.redis.ping()
        return _json({"status": "ok"})

    async def openapi(self, request: Request) -> Response:
        return _json(openapi_document(self.settings))


def _describe(exc: RequestInvalid) -> str:
    shown = exc.errors[:20]
    more = f"; and {len(exc.errors) - 20} more" if len(exc.errors) > 20 else ""
    return "; ".join(f"{e['loc']}: {e['msg']}" for e in shown) + more


#: An SSE comment sent when a stream has been silent this long (a job waiting in the queue),
#: so that proxies and load balancers with idle timeouts keep the connection open.
KEEP_ALIVE_S = 15.0
KEEP_ALIVE_FRAME = b": keep-alive\n\n"


async def with_keep_alive(frames: AsyncIterator[bytes], every_s: float) -> AsyncIterator[bytes]:
    """``frames``, with a comment frame whenever none came for ``every_s``.

    The pending read is awaited again after a keep-alive, never cancelled: cancelling it
    would close the generator underneath.
    """
    iterator = frames.__aiter__()
    pending: asyncio.Future[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield KEEP_ALIVE_FRAME
                continue
            try:
                data = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield data
    finally:
        if pending is not None and not pending.done():
            pending.cancel()


class _ClosingStream(StreamingResponse):
    """A streaming response that calls ``on_close`` once it ends, however it ends (also when
    the body never started: the client was gone already)."""

    def __init__(self, *args: Any, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(
    frames: AsyncIterator[bytes],
    headers: dict[str, str],
    *,
    keep_alive_s: float = KEEP_ALIVE_S,
    on_close: Callable[[], None] = lambda: None,
) -> Response:
    async def guarded() -> AsyncIterator[bytes]:
        try:
            async for data in with_keep_alive(frames, keep_alive_s):
                yield data
        except TimeoutError:
            error = {"type": "timeout_error", "message": "the job did not end in time"}
            yield relay.frame(error_response(error), event="error")
        except JobNotFound:
            error = {"type": "not_found_error", "message": "the job's records expired"}
            yield relay.frame(error_response(error), event="error")

    return _ClosingStream(
        guarded(),
        on_close=on_close,
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
    )


def create_app(settings: Settings) -> Starlette:
    """The gateway's ASGI app; its :class:`Gateway` is ``app.state.gateway``."""
    gateway = Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            # Rotate keys without a restart: `kill -HUP` rereads the keys file.
            loop.add_signal_handler(signal.SIGHUP, gateway.key_ring.reload)
        yield
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGHUP)
        # Jobs the gateway runs end or go back to the queue (SHUTDOWN_GRACE_S) before it stops.
        await asyncio.to_thread(gateway.fast_path.close)
        await gateway.client.close()

    routes = [
        Route("/v1/messages", gateway.messages, methods=["POST"]),
        Route("/v1/messages/batches", gateway.batch_create, methods=["POST"]),
        Route("/v1/messages/batches", gateway.batch_list, methods=["GET"]),
        Route("/v1/messages/batches/{batch_id}", gateway.batch_retrieve, methods=["GET"]),
        Route("/v1/messages/batches/{batch_id}/cancel", gateway.batch_cancel, methods=["POST"]),
        Route("/v1/messages/batches/{batch_id}/results", gateway.batch_results, methods=["GET"]),
        Route("/v1/jobs/{job_id}", gateway.job_status, methods=["GET"]),
        Route("/v1/jobs/{job_id}/events", gateway.job_events, methods=["GET"]),
        Route("/v1/usage", gateway.usage, methods=["GET"]),
        Route("/healthz", gateway.healthz, methods=["GET"]),
        Route("/openapi.json", gateway.openapi, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            HTTPProblem: _problem_handler,  # type: ignore[dict-item]
            Busy: _busy_handler,  # type: ignore[dict-item]
            RedisConnectionError: _redis_unavailable,
        },
        middleware=[
            Middleware(Guard, tenant_of_key=gateway.tenant_of_key, requests=gateway.requests)
        ],
    )
    app.state.gateway = gateway
    return app


def _plain(job: AsyncJob) -> str:
    """A job's id as its tenant knows it (without the ``<tenant>/`` of its Redis id)."""
    return p.split_qualified_id(job.job_id)[1]


async def _problem_handler(request: Request, exc: HTTPProblem) -> Response:
    return problem_response(exc.status, exc.error_type, exc.message)


async def _busy_handler(request: Request, exc: Busy) -> Response:
    return exc.response()


async def _redis_unavailable(request: Request, exc: Exception) -> Response:
    """Redis down, or every connection of the gateway's bounded pool busy: 503, which the
    SDKs retry after a pause, never a 500."""
    response = problem_response(
        503, "overloaded_error", "the gateway cannot reach its Redis now (busy or down)"
    )
    response.headers["retry-after"] = "1"
    return response


def serve(settings: Settings, *, host: str, port: int) -> None:
    import uvicorn

    from worker.logs import configure_logging

    configure_logging(settings)
    app = create_app(settings)
    exporter = None
    if settings.gateway_metrics_port:
        gateway: Gateway = app.state.gateway
        exporter = start_exporter(settings.gateway_metrics_port, gateway.requests, gateway.streams)
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_keep_alive=75,
            http="httptools",  # C parsing: measured faster than h11 (docs/performance.md)
            loop="asyncio",  # uvloop, where installed, measured no steady gain: one loop everywhere
        )
    finally:
        if exporter is not None:
            exporter.shutdown()
            exporter.server_close()
