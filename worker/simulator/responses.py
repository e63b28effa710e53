"""The simulator's responses: error bodies, the paced SSE stream, dropped connections.

Dropping a connection (the ``reset`` and ``cut`` faults). ASGI has no message for "close
without answering": an app that raises before ``http.response.start`` gets a 500 from
uvicorn, and one that returns mid-body makes uvicorn log an error and close. So the app
reaches the socket itself: :class:`~worker.simulator.app.SimulatorApp` keeps the server's
own ``send`` in the scope, and under uvicorn (h11 and httptools alike) that is a bound
method of the request's cycle, whose ``transport`` is the asyncio transport. ``reset`` sets
``SO_LINGER`` to zero and aborts it, so the kernel sends a TCP RST and the client reads
"connection reset by peer" (httpx ``ReadError``) with no status line; ``cut`` closes it
gracefully after the bytes already written, so the client sees the chunked body end
early (httpx ``RemoteProtocolError``, "incomplete chunked read"). The response then waits for
uvicorn's disconnect message, which keeps uvicorn from answering or logging. Under a
server without such a transport, ``reset`` falls back to an exception (a 500) and ``cut``
to returning mid-body.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from worker.simulator import wire

JSON = "application/json"
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
# Scope key under which SimulatorApp keeps the server's own send callable.
RAW_SEND_KEY = "simulator.raw_send"
# Waits longer than this watch for the client leaving instead of sleeping blindly (stalls).
WATCHED_WAIT_S = 1.0
# How long a dropped connection may take to be reported by the server.
DROP_WAIT_S = 5.0
_LINGER_RESET = struct.pack("ii", 1, 0)


def new_id(prefix: str) -> str:
    """A random id like the upstream's (``msg_…``, ``req_…``)."""
    return prefix + os.urandom(12).hex()


def error_response(
    status: int,
    message: str,
    error_type: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """The upstream's error body: ``{"type": "error", "error": {"type", "message"}}``."""
    kind = error_type or ERROR_TYPES.get(status, "api_error")
    body = orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})
    return Response(body, status, {"request-id": new_id("req_")} | (headers or {}), JSON)


def _transport_of(scope: Scope) -> asyncio.Transport | None:
    """The connection's transport, when the server's send is a uvicorn cycle's method."""
    cycle = getattr(scope.get(RAW_SEND_KEY), "__self__", None)
    transport = getattr(cycle, "transport", None)
    return transport if isinstance(transport, asyncio.Transport) else None


async def drop_connection(
    scope: Scope, receive: Receive, *, reset: bool, pending: asyncio.Future[Any] | None = None
) -> bool:
    """Close (or with ``reset``, abort with an RST) the connection; False if out of reach.

    ``pending`` is a ``receive()`` already waiting, if any; it is awaited first.
    """
    transport = _transport_of(scope)
    if transport is None:
        return False
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()
    else:
        transport.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_disconnected(receive, pending), DROP_WAIT_S)
    return True


async def _disconnected(receive: Receive, pending: asyncio.Future[Any] | None) -> None:
    message: Message = await pending if pending is not None else await receive()
    while message["type"] != "http.disconnect":
        message = await receive()


class DropResponse(Response):
    """No response at all: the connection is reset (the ``reset`` fault).

    ``status_code`` 0 is what the stats record for it.
    """

    def __init__(self) -> None:
        self.status_code = 0
        self.background = None
        self.body = b""
        self.raw_headers = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not await drop_connection(scope, receive, reset=True):
            raise RuntimeError("cannot reach the connection to reset it")


class CutBodyResponse(Response):
    """A 200 announcing the whole JSON body, sending half, then closing (non-streamed ``cut``)."""

    media_type = JSON

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        half = self.body[: len(self.body) // 2]
        await send({"type": "http.response.body", "body": half, "more_body": True})
        await drop_connection(scope, receive, reset=False)


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
        *,
        close_at_end: bool = False,
        stamp: bool = False,
    ) -> None:
        self.frames = frames
        self.close_at_end = close_at_end
        self.stamp = stamp
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
                    if delay > WATCHED_WAIT_S:
                        await asyncio.wait((gone,), timeout=delay)
                    else:
                        await asyncio.sleep(delay)
                    if gone.done():  # the client left: stop spending time on it
                        return
                data = wire.stamp_frame(frame.data, time.time()) if self.stamp else frame.data
                await send({"type": "http.response.body", "body": data, "more_body": True})
                if number == 0:
                    self.on_first_byte()
            if self.close_at_end:  # the cut fault: no clean end of the body
                await drop_connection(scope, receive, reset=False, pending=gone)
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if gone is not None:
                gone.cancel()
            self.on_end()
