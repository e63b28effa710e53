"""The gateway's own safety: who is calling, how much at once, and a line per request.

:class:`Guard` (ASGI middleware) authenticates every request but the public ones, puts the
caller's tenant in ``scope["state"]["tenant"]``, bounds the requests handled at once (per
tenant: 429; overall: 503; both with ``retry-after``), logs each request once it ends
(tenant, route, method, status, job or batch id, duration; never the key, never the body)
and counts it (``llm_worker_gateway_requests_total`` and the duration histogram).

Open event streams have their own, lower bounds (:class:`Slots`, taken by the handlers that
stream): a stream holds a Redis connection for as long as it is open.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker import metrics as m
from worker.client.batch_file import error_response

log = structlog.get_logger("worker.gateway")

PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json"})
RETRY_AFTER_S = "1"


def problem_response(
    status: int, error_type: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        error_response({"type": error_type, "message": message}),
        status_code=status,
        headers=headers,
    )


class Busy(Exception):
    """A bound is reached: 429 (the caller's own share) or 503 (the gateway's), with
    ``retry-after``."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)

    def response(self) -> JSONResponse:
        kind = "rate_limit_error" if self.status == 429 else "overloaded_error"
        return problem_response(
            self.status, kind, self.message, headers={"retry-after": RETRY_AFTER_S}
        )


@dataclass
class Slots:
    """Counted places, per tenant and overall (one event loop: no lock needed)."""

    what: str
    overall: int
    per_tenant: int
    held: int = 0
    by_tenant: dict[str, int] = field(default_factory=dict)

    def take(self, tenant: str) -> None:
        """Take a place for ``tenant``, or raise :class:`Busy`."""
        mine = self.by_tenant.get(tenant, 0)
        if mine >= self.per_tenant:
            raise Busy(
                429,
                f"this key has {mine} {self.what} open, its bound; retry when one has ended",
            )
        if self.held >= self.overall:
            raise Busy(503, f"the gateway has {self.held} {self.what} open, its bound; retry soon")
        self.held += 1
        self.by_tenant[tenant] = mine + 1

    def give(self, tenant: str) -> None:
        self.held -= 1
        left = self.by_tenant.get(tenant, 1) - 1
        if left > 0:
            self.by_tenant[tenant] = left
        else:
            self.by_tenant.pop(tenant, None)


def tenant_of(request: Request) -> str:
    """The caller's tenant (set by :class:`Guard`; every guarded route has one)."""
    tenant: str = request.scope["state"]["tenant"]
    return tenant


def presented_key(scope: Scope) -> str:
    request = Request(scope)
    given = request.headers.get("x-api-key", "")
    auth = request.headers.get("authorization", "")
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return given


class Guard:
    """Authentication, the request bounds and the request log, around the whole app."""

    def __init__(
        self, app: ASGIApp, tenant_of_key: Callable[[str], str | None], requests: Slots
    ) -> None:
        self.app = app
        self.tenant_of_key = tenant_of_key
        self.requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        state = scope.setdefault("state", {})
        status = {"code": 0}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        tenant = self.tenant_of_key(presented_key(scope))
        try:
            if tenant is None:
                response = problem_response(
                    401, "authentication_error", "a valid x-api-key is required"
                )
                await response(scope, receive, sending)
                return
            state["tenant"] = tenant
            try:
                self.requests.take(tenant)
            except Busy as exc:
                await exc.response()(scope, receive, sending)
                return
            try:
                await self.app(scope, receive, sending)
            finally:
                self.requests.give(tenant)
        finally:
            _log_request(scope, tenant, status["code"], time.monotonic() - started)


def _log_request(scope: Scope, tenant: str | None, status: int, duration_s: float) -> None:
    state: dict[str, Any] = scope.get("state", {})
    # The handler's name: a bounded label (unknown paths are "unmatched").
    route = getattr(scope.get("endpoint"), "__name__", "unmatched")
    status = status or 499  # 499: the client left before a response began
    m.GATEWAY_REQUESTS.labels(route, m.status_label(status), tenant or "").inc()
    m.GATEWAY_REQUEST_DURATION.labels(route).observe(duration_s)
    fields: dict[str, Any] = {
        "tenant": tenant,
        "method": scope.get("method"),
        "route": route,
        "status": status,
        "duration_s": round(duration_s, 4),
    }
    for name in ("job_id", "batch_id"):
        if state.get(name):
            fields[name] = state[name]
    log.info("gateway_request", **fields)
