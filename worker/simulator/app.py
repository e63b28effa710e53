"""The simulator's HTTP app: a fake Anthropic-compatible ``POST /messages``.

Routes:

- ``POST /messages`` and ``POST /v1/messages`` (the path the official SDK uses);
- ``GET /stats`` (``?log=0`` leaves out the request log), ``POST /stats/reset``;
- ``GET /healthz``.

A request to ``/messages`` goes through these steps, in order; each may answer early:

1. authenticate (401 ``authentication_error``);
2. parse and validate (400 ``invalid_request_error``, see :mod:`.validation`);
3. generate the answer (pure, :mod:`.textgen`), directives included;
4. decide a fault (:func:`decide_fault`; the fault mix and rate limits will act here,
   either answering early with an error status or rewriting the frame plan);
5. respond: JSON after the full answer's delay, or SSE frames on their schedule.

Every response carries a ``request-id`` header.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from worker.simulator import textgen, wire
from worker.simulator.config import SimulatorConfig
from worker.simulator.stats import RequestRecord, Stats
from worker.simulator.validation import validate

JSON = "application/json"
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    500: "api_error",
}


@dataclass(frozen=True, slots=True)
class Fault:
    """A fault chosen for one request. Reserved: nothing produces one yet."""

    kind: str
    at_delta: int | None = None


def decide_fault(config: SimulatorConfig, generation: textgen.Generation) -> Fault | None:
    """The fault to inject into this request, if any (reserved: always None today).

    The later fault mix draws from ``config.faults`` (and ``fault=`` in the directives'
    ``extra``), and the rate limiter from ``config.rate_limits``, right here.
    """
    return None


def new_id(prefix: str) -> str:
    """A random id like the upstream's (``msg_…``, ``req_…``)."""
    return prefix + os.urandom(12).hex()


def error_response(status: int, message: str, error_type: str | None = None) -> Response:
    """The upstream's error body: ``{"type": "error", "error": {"type", "message"}}``."""
    kind = error_type or ERROR_TYPES.get(status, "api_error")
    body = orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})
    return Response(body, status, {"request-id": new_id("req_")}, JSON)


class SSEResponse(Response):
    """Writes a frame plan on its schedule and reports the first byte and the end.

    Starlette's StreamingResponse runs a task group per response to watch for the
    client leaving; with thousands of streams that is real cost. Here the watch is one
    pending ``receive()``, started only if the plan has to wait at all.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        frames: list[wire.Frame],
        on_first_byte: Callable[[], None],
        on_end: Callable[[], None],
    ) -> None:
        self.frames = frames
        self.status_code = 200
        self.background = None
        self.on_first_byte = on_first_byte
        self.on_end = on_end
        self.init_headers({"request-id": new_id("req_"), "cache-control": "no-cache"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        gone: asyncio.Future[Any] | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            for number, frame in enumerate(self.frames):
                delay = started + frame.at_s - loop.time()
                if delay > 0:
                    gone = gone or asyncio.ensure_future(receive())
                    await asyncio.sleep(delay)
                    if gone.done():  # the client left: stop spending time on it
                        return
                await send({"type": "http.response.body", "body": frame.data, "more_body": True})
                if number == 0:
                    self.on_first_byte()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if gone is not None:
                gone.cancel()
            self.on_end()


class Simulator:
    """The request handlers, bound to one config and one set of stats."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.stats = Stats(config.stats_log_size)

    async def messages(self, request: Request) -> Response:
        record = self.stats.begin(request.url.path)
        try:
            response = await self._messages(request, record)
        except BaseException:
            self.stats.end(record, 500)
            raise
        if not isinstance(response, SSEResponse):
            self.stats.end(record, response.status_code)
        return response

    async def _messages(self, request: Request, record: RequestRecord) -> Response:
        if not self._authorized(request):
            return error_response(401, "invalid x-api-key or Authorization bearer token")
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            return error_response(400, f"request body is not valid JSON: {exc}")
        problem = validate(body)
        if problem is not None:
            return error_response(400, problem)
        record.model = body["model"]
        record.stream = bool(body.get("stream"))
        config = self.config
        try:
            generation = textgen.generate(
                config.seed, body, min_tokens=config.min_tokens, max_tokens=config.max_tokens
            )
        except textgen.DirectiveError as exc:
            return error_response(400, str(exc))
        fault = decide_fault(config, generation)
        if fault is not None:  # pragma: no cover - reserved for the fault mix
            raise NotImplementedError(f"fault {fault.kind!r} is not implemented yet")
        return await self._answer(body, generation, record)

    async def _answer(
        self, body: dict[str, Any], generation: textgen.Generation, record: RequestRecord
    ) -> Response:
        directives = generation.directives
        ttft_s = self.config.ttft_s if directives.ttft_ms is None else directives.ttft_ms / 1000
        tps = self.config.tokens_per_s if directives.tps is None else directives.tps
        message_id = new_id("msg_")
        if record.stream:
            frames = wire.stream_frames(
                generation,
                message_id,
                body["model"],
                ttft_s=ttft_s,
                tokens_per_s=tps,
                ping_every=self.config.ping_every,
            )
            return SSEResponse(frames, lambda: _mark_first_byte(record), self._ender(record))
        delay_s = wire.answer_duration_s(generation, ttft_s, tps)
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        payload = wire.message_json(generation, message_id, body["model"])
        return Response(payload, 200, {"request-id": new_id("req_")}, JSON)

    def _ender(self, record: RequestRecord) -> Callable[[], None]:
        return lambda: self.stats.end(record, 200)

    def _authorized(self, request: Request) -> bool:
        headers = request.headers
        token = headers.get("x-api-key", "")
        scheme, _, bearer = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and bearer.strip():
            token = bearer.strip()
        if not token:
            return False
        expected = self.config.api_key
        return not expected or hmac.compare_digest(token.encode(), expected.encode())

    async def stats_view(self, request: Request) -> Response:
        with_log = request.query_params.get("log", "1") not in ("0", "false", "no")
        payload = orjson.dumps(self.stats.snapshot(with_log=with_log))
        return Response(payload, 200, {"request-id": new_id("req_")}, JSON)

    async def stats_reset(self, request: Request) -> Response:
        self.stats.reset()
        return Response(b'{"reset":true}', 200, {"request-id": new_id("req_")}, JSON)

    async def healthz(self, request: Request) -> Response:
        return Response(b'{"status":"ok"}', 200, {"request-id": new_id("req_")}, JSON)


def _mark_first_byte(record: RequestRecord) -> None:
    record.first_byte_ts = time.time()


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    return error_response(status, str(detail))


def create_app(config: SimulatorConfig) -> Starlette:
    """The simulator as an ASGI app; ``app.state.simulator`` holds its handlers and stats."""
    simulator = Simulator(config)
    routes = [
        Route("/messages", simulator.messages, methods=["POST"]),
        Route("/v1/messages", simulator.messages, methods=["POST"]),
        Route("/stats", simulator.stats_view, methods=["GET"]),
        Route("/stats/reset", simulator.stats_reset, methods=["POST"]),
        Route("/healthz", simulator.healthz, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes, exception_handlers={HTTPException: _http_error, Exception: _http_error}
    )
    app.state.simulator = simulator
    return app
