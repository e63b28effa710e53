"""The simulator's HTTP app: a fake Anthropic-compatible ``POST /messages``.

Routes:

- ``POST /messages`` and ``POST /v1/messages`` (the path the official SDK uses);
- ``GET /stats`` (``?log=0`` leaves out the request log), ``POST /stats/reset``;
- ``GET /healthz``.

A request to ``/messages`` goes through these steps, in order; each may answer early:

1. authenticate (401 ``authentication_error``);
2. parse and validate (400 ``invalid_request_error``, see :mod:`.validation`), directives
   included;
3. generate the answer (pure, :mod:`.textgen`);
4. admit it under the rate limits (429 ``rate_limit_error``, see :mod:`.limits`);
5. decide a fault (:mod:`.faults`): answer early with an error status, drop the
   connection, or rewrite the frame plan;
6. respond: JSON after the full answer's delay, or SSE frames on their schedule.

Every response carries a ``request-id`` header. ``POST /stats/reset`` clears the counters
only: the rate limiter's window, the fault mix's generator and the ``fault_times`` counts
carry on.

Responses, and how the ``reset`` and ``cut`` faults drop a connection, live in
:mod:`.responses`.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from collections.abc import Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from worker.simulator import faults, textgen, wire
from worker.simulator.config import SimulatorConfig
from worker.simulator.faults import Fault, FaultDecider
from worker.simulator.limits import SlidingWindowLimiter, retry_after_headers
from worker.simulator.responses import (
    JSON,
    RAW_SEND_KEY,
    CutBodyResponse,
    DropResponse,
    SSEResponse,
    error_response,
    new_id,
)
from worker.simulator.stats import RequestRecord, Stats
from worker.simulator.validation import validate


class Simulator:
    """The request handlers, bound to one config and one set of stats."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.stats = Stats(config.stats_log_size)
        self.faults = FaultDecider(config.faults, config.seed)
        limits = config.rate_limits
        self.limiter = SlidingWindowLimiter(limits) if limits.enabled else None
        # The limiter runs on the monotonic clock; accepted_per_s buckets are that clock
        # shifted to Unix time, so both count the very same windows.
        self._wall_offset_s = time.time() - time.monotonic()

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
        models = self.config.models
        if problem is None and models and body["model"] not in models:
            problem = f"model: {body['model']!r} does not exist"
        if problem is not None:
            return error_response(400, problem)
        record.model = body["model"]
        record.stream = bool(body.get("stream"))
        generation = self._generate(body)
        if isinstance(generation, Response):
            return generation
        refused = self._admit(generation, record)
        if refused is not None:
            return refused
        return await self._respond(body, generation, record)

    async def _respond(
        self, body: dict[str, Any], generation: textgen.Generation, record: RequestRecord
    ) -> Response:
        """Decide the request's fault, then answer accordingly."""
        seed = self.config.seed
        extra = generation.directives.extra
        fault = self.faults.decide(
            extra, lambda: textgen.request_digest(seed, body), model=body["model"]
        )
        if fault is not None:
            self.stats.fault(record, fault.kind)
            early = self._early_fault(fault)
            if early is not None:
                return early
        return await self._answer(body, generation, record, fault)

    def _generate(self, body: dict[str, Any]) -> textgen.Generation | Response:
        """The answer, or a 400 for a malformed directive (``fault=`` included)."""
        config = self.config
        try:
            generation = textgen.generate(
                config.seed, body, min_tokens=config.min_tokens, max_tokens=config.max_tokens
            )
            if generation.directives.extra:  # a bad fault= is a 400 before it takes a slot
                faults.forced_fault(generation.directives.extra)
        except textgen.DirectiveError as exc:
            return error_response(400, str(exc))
        return generation

    def _admit(self, generation: textgen.Generation, record: RequestRecord) -> Response | None:
        """Apply the rate limits: None when admitted, else the refusal."""
        now = time.monotonic()
        limiter = self.limiter
        if limiter is not None:
            limits = self.config.rate_limits
            tokens = generation.input_tokens + generation.output_tokens
            if limiter.never_fits(tokens):  # no wait would help: a permanent error
                message = f"request needs {tokens} tokens; the limit is {limits.tpm} per window"
                return error_response(400, message)
            wait_s = limiter.admit(tokens, now)
            if wait_s is not None:
                self.stats.limited(record)
                message = (
                    f"rate limit exceeded (rpm={limits.rpm}, tpm={limits.tpm} "
                    f"per {limits.window_s:g} s)"
                )
                return error_response(429, message, headers=retry_after_headers(wait_s))
        self.stats.accept(now + self._wall_offset_s)
        return None

    def _early_fault(self, fault: Fault) -> Response | None:
        """The response of a fault that replaces the answer, or None if it shapes it."""
        if fault.kind == "reset":
            return DropResponse()
        status_fault = faults.STATUS_FAULTS.get(fault.kind)
        if status_fault is None:
            return None
        status, error_type = status_fault
        headers = None
        if status == 429:
            retry_after_s = self.config.faults.retry_after_s
            headers = {
                "retry-after": str(math.ceil(retry_after_s)),
                "retry-after-ms": str(round(retry_after_s * 1000)),
            }
        return error_response(status, faults.STATUS_MESSAGES[status], error_type, headers)

    async def _answer(
        self,
        body: dict[str, Any],
        generation: textgen.Generation,
        record: RequestRecord,
        fault: Fault | None = None,
    ) -> Response:
        directives = generation.directives
        ttft_s = self.config.ttft_s if directives.ttft_ms is None else directives.ttft_ms / 1000
        tps = self.config.tokens_per_s if directives.tps is None else directives.tps
        kind = None if fault is None else fault.kind
        mix = self.config.faults
        if kind == "slow":
            tps = 1.0 / mix.slow_gap_s
        message_id = new_id("msg_")
        if kind is None or kind in ("slow", "stall", "pings"):  # a whole answer is sent
            record.usage = {
                "input_tokens": generation.input_tokens,
                "output_tokens": generation.output_tokens,
            }
        if record.stream:
            frames = wire.stream_frames(
                generation,
                message_id,
                body["model"],
                ttft_s=ttft_s,
                tokens_per_s=tps,
                ping_every=self.config.ping_every,
                stamp=directives.extra.get("stamp") == "1",
            )
            close = False
            if kind in faults.MID_STREAM_FAULTS:
                deltas = wire.delta_count(generation)
                frames, close = faults.rewrite_plan(frames, kind, deltas, mix.stall_s)
            return SSEResponse(
                frames,
                lambda: _mark_first_byte(record),
                self._ender(record),
                close_at_end=close,
                stamp=directives.extra.get("stamp") == "1",
            )
        if kind == "error_event":  # no stream to put the event in: the status it stands for
            return error_response(529, "Overloaded (injected)", "overloaded_error")
        delay_s = wire.answer_duration_s(generation, ttft_s, tps)
        if kind in ("stall", "pings"):
            delay_s += mix.stall_s
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        payload = wire.message_json(generation, message_id, body["model"])
        headers = {"request-id": new_id("req_")}
        if kind == "cut":
            return CutBodyResponse(payload, 200, headers, JSON)
        if kind == "malformed":
            payload = payload[: len(payload) // 2]
        return Response(payload, 200, headers, JSON)

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


class SimulatorApp(Starlette):
    """Starlette, plus the server's own ``send`` in the scope (see :func:`drop_connection`)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[RAW_SEND_KEY] = send
        await super().__call__(scope, receive, send)


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
    app = SimulatorApp(
        routes=routes, exception_handlers={HTTPException: _http_error, Exception: _http_error}
    )
    app.state.simulator = simulator
    return app
