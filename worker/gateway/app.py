"""The HTTP front door: Anthropic's ``/v1/messages`` and Message Batches, and our jobs.

Every route but ``/healthz`` and ``/openapi.json`` needs a producer key (``x-api-key``, as
the Anthropic SDKs send it, or ``Authorization: Bearer``). Bodies are read up to a bound
and refused with 413 beyond it. Errors have Anthropic's shape:
``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator
from typing import Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from worker import events as ev
from worker.client.aio import AsyncClient, AsyncJob
from worker.client.batch_file import error_response
from worker.errors import (
    BudgetExceeded,
    JobCancelled,
    JobConflict,
    JobExpired,
    JobFailed,
    JobNotFound,
    RequestInvalid,
)
from worker.gateway import relay
from worker.gateway.batches import BatchStore, parse_requests
from worker.gateway.openapi import openapi_document
from worker.settings import Settings

PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json"})
JOB_ID_HEADER = "llm-worker-job-id"
#: A job's priority (0-9, higher first; default 5) and its life in seconds from submission.
PRIORITY_HEADER = "llm-worker-priority"
DEADLINE_HEADER = "llm-worker-deadline"
#: The job's fallback models, comma-separated, in order (replacing LLM_WORKER_FALLBACKS').
FALLBACK_HEADER = "llm-worker-fallback-models"


#: The gateway's Redis connections carry this name (CLIENT LIST shows how many it holds).
GATEWAY_CLIENT_NAME = "llmw-gateway"

#: The Anthropic SDKs honour it over their own retry rules.
SHOULD_RETRY_HEADER = "x-should-retry"


class HTTPProblem(Exception):
    def __init__(self, status: int, error_type: str, message: str) -> None:
        self.status = status
        self.error_type = error_type
        self.message = message


def problem_response(status: int, error_type: str, message: str) -> JSONResponse:
    return JSONResponse(
        error_response({"type": error_type, "message": message}), status_code=status
    )


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


def submit_problem(exc: RequestInvalid | BudgetExceeded | JobConflict) -> HTTPProblem:
    """The HTTP answer to a refused submission: 400, 429 (a tenant at its budget, as the
    Anthropic API answers a spend limit) or 409."""
    if isinstance(exc, RequestInvalid):
        return HTTPProblem(400, "invalid_request_error", _describe(exc))
    if isinstance(exc, BudgetExceeded):
        return HTTPProblem(429, "rate_limit_error", str(exc))
    return HTTPProblem(409, "invalid_request_error", str(exc))


def _list_header(request: Request, name: str) -> list[str] | None:
    """A comma-separated header as a list (empty: none), or None when absent."""
    raw = request.headers.get(name)
    if raw is None:
        return None
    return [part.strip() for part in raw.split(",") if part.strip()]


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type="application/json")


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = [k.get_secret_value().encode() for k in settings.gateway_api_keys]
        # Bounded: every live event stream holds a connection while it waits for events.
        self.client = AsyncClient(
            settings,
            max_connections=settings.gateway_redis_connections,
            connection_wait_s=settings.gateway_redis_wait_s,
            client_name=GATEWAY_CLIENT_NAME,
        )
        self.batches = BatchStore(self.client)
        self.wait_s = settings.job_deadline_s + 60

    # -- edges -------------------------------------------------------------------------------

    def authorised(self, request: Request) -> bool:
        given = request.headers.get("x-api-key", "")
        auth = request.headers.get("authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        token = given.encode()
        # Compare with every key, always: the time taken says nothing about which matched.
        matches = [hmac.compare_digest(token, key) for key in self.keys]
        return bool(given) and any(matches)

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
            parsed = relay.parse_message_id(resume)
            if parsed is None:
                raise HTTPProblem(400, "invalid_request_error", "Last-Event-ID is not ours")
            job = await self._job(parsed[0])
            return self._anthropic_stream(job, after=parsed[1])
        body = await self.body(request, self.settings.max_request_bytes)
        if not isinstance(body, dict):
            raise HTTPProblem(400, "invalid_request_error", "the body must be a JSON object")
        streamed = body.get("stream") is True
        job_id = request.headers.get(JOB_ID_HEADER) or None
        priority = _number_header(request, PRIORITY_HEADER, int)
        deadline_s = _number_header(request, DEADLINE_HEADER, float)
        fallbacks = _list_header(request, FALLBACK_HEADER)
        wait_s = self.wait_s if deadline_s is None else deadline_s + 60
        try:
            job = await self.client.submit(
                body,
                job_id=job_id,
                priority=priority,
                deadline_s=deadline_s,
                fallback_models=fallbacks,
            )
        except (RequestInvalid, BudgetExceeded, JobConflict) as exc:
            raise submit_problem(exc) from None
        if streamed:
            return self._anthropic_stream(job, after="0-0")
        try:
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
            headers = self._headers(job)
            if kind == ev.EXPIRED:
                # The SDKs retry a 504 as a new request, i.e. a new job past the same deadline.
                headers[SHOULD_RETRY_HEADER] = "false"
            return _json(error_response(error), status, headers)
        except TimeoutError:
            # The gateway's own wait ended (the job's deadline + 60 s): the job goes on and its
            # result can still be read; a retry would start it a second time.
            message_text = (
                f"the job did not end within the gateway's wait of {wait_s:g} s; it goes "
                f"on: GET /v1/jobs/{job.job_id}"
            )
            headers = {**self._headers(job), SHOULD_RETRY_HEADER: "false"}
            error = {"type": "timeout_error", "message": message_text}
            return _json(error_response(error), 504, headers)
        except JobNotFound as exc:
            # The job's records vanished while we waited (expired, or Redis lost them).
            raise HTTPProblem(404, "not_found_error", str(exc)) from None
        return _json(message, headers=self._headers(job))

    def _headers(self, job: AsyncJob) -> dict[str, str]:
        return {JOB_ID_HEADER: job.job_id, "request-id": job.job_id}

    def _anthropic_stream(self, job: AsyncJob, *, after: str) -> Response:
        async def frames() -> AsyncIterator[bytes]:
            # Frames carry only chunk ids: a client resuming after one holds output already.
            state = relay.AnthropicRelay(
                job.job_id, sent_output=after != "0-0", upstream=self.settings.upstream_name
            )
            async for event in job.events(timeout=self.wait_s, after=after):
                for data in state.feed(event):
                    yield data
                if state.done:
                    return

        return _sse(frames(), self._headers(job))

    # -- /v1/jobs ----------------------------------------------------------------------------

    async def _job(self, job_id: str) -> AsyncJob:
        try:
            return await self.client.get(job_id)
        except JobNotFound as exc:
            raise HTTPProblem(404, "not_found_error", str(exc)) from None

    async def job_status(self, request: Request) -> Response:
        job = await self._job(request.path_params["job_id"])
        try:
            return _json(await job.status())
        except JobNotFound as exc:
            raise HTTPProblem(404, "not_found_error", str(exc)) from None

    async def job_events(self, request: Request) -> Response:
        job = await self._job(request.path_params["job_id"])
        after = request.headers.get("last-event-id") or request.query_params.get("after", "0-0")
        parsed = relay.parse_message_id(after)
        after = parsed[1] if parsed else after.strip()
        if not relay.valid_stream_id(after):
            raise HTTPProblem(400, "invalid_request_error", "Last-Event-ID is not a stream id")

        async def frames() -> AsyncIterator[bytes]:
            async for event in job.events(timeout=self.wait_s, after=after):
                yield relay.frame(event, event=event["type"], id_=event["stream_id"])

        return _sse(frames(), self._headers(job))

    # -- /v1/messages/batches ----------------------------------------------------------------

    async def batch_create(self, request: Request) -> Response:
        body = await self.body(request, self.settings.gateway_max_body_bytes)
        try:
            items = parse_requests(self.client, body)
        except RequestInvalid as exc:
            raise HTTPProblem(400, "invalid_request_error", _describe(exc)) from None
        priority = _number_header(request, PRIORITY_HEADER, int)
        try:
            batch_id = await self.batches.create(items, priority=priority)
        except RequestInvalid as exc:
            raise HTTPProblem(400, "invalid_request_error", _describe(exc)) from None
        except BudgetExceeded as exc:
            raise HTTPProblem(429, "rate_limit_error", str(exc)) from None
        return _json(await self.batches.retrieve(batch_id, self.base_url(request)))

    async def _batch(self, request: Request) -> dict[str, Any]:
        batch_id = request.path_params["batch_id"]
        batch = await self.batches.retrieve(batch_id, self.base_url(request))
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
            limit=limit,
            before_id=q.get("before_id"),
            after_id=q.get("after_id"),
        )
        return _json(page)

    async def batch_cancel(self, request: Request) -> Response:
        await self._batch(request)
        await self.batches.cancel(request.path_params["batch_id"])
        return _json(await self._batch(request))

    async def batch_results(self, request: Request) -> Response:
        batch = await self._batch(request)
        if batch["processing_status"] != "ended":
            raise HTTPProblem(
                400, "invalid_request_error", f"batch {batch['id']} has not ended; no results yet"
            )
        return StreamingResponse(
            self.batches.results(batch["id"]), media_type="application/x-jsonl"
        )

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


def _sse(
    frames: AsyncIterator[bytes], headers: dict[str, str], *, keep_alive_s: float = KEEP_ALIVE_S
) -> Response:
    async def guarded() -> AsyncIterator[bytes]:
        try:
            async for data in with_keep_alive(frames, keep_alive_s):
                yield data
        except TimeoutError:
            error = {"type": "timeout_error", "message": "the job did not end in time"}
            yield relay.frame(error_response(error), event="error")
        except JobNotFound as exc:
            yield relay.frame(
                error_response({"type": "not_found_error", "message": str(exc)}), event="error"
            )

    return StreamingResponse(
        guarded(),
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
    )


def create_app(settings: Settings) -> Starlette:
    gateway = Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
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
        Route("/healthz", gateway.healthz, methods=["GET"]),
        Route("/openapi.json", gateway.openapi, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            HTTPProblem: _problem_handler,  # type: ignore[dict-item]
            RedisConnectionError: _redis_unavailable,
        },
        middleware=[Middleware(KeyGuard, gateway=gateway)],
    )
    return app


class KeyGuard:
    """Refuses, with 401, every request to a non-public path without a producer key."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        public = scope["type"] != "http" or scope["path"] in PUBLIC_PATHS
        if not public and not self.gateway.authorised(Request(scope)):
            response = problem_response(
                401, "authentication_error", "a valid x-api-key is required"
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _problem_handler(request: Request, exc: HTTPProblem) -> Response:
    return problem_response(exc.status, exc.error_type, exc.message)


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

    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_keep_alive=75,
    )
