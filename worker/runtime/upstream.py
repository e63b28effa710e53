"""The HTTP boundary: one shared httpx client per worker process, streamed and plain calls.

Every failure leaves this module as a :class:`~worker.errors.UpstreamError` whose type says
whether another attempt may help (see :mod:`worker.runtime.retry_policy`); nothing further in looks
at httpx exceptions or status codes.

Timeouts: ``connect_timeout_s`` to open a connection; ``first_byte_timeout_s`` until the
response headers (for a non-streamed call, the whole answer); ``idle_timeout_s`` for every
gap between reads of a streamed body, so a stalled stream is cut and retried.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import select
import socket
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import httpcore
import httpx
import orjson
from httpcore._backends.sync import SyncStream
from httpcore._exceptions import map_exceptions

from worker.errors import PermanentUpstreamError, TransientUpstreamError, UpstreamError
from worker.runtime.http_pool import linear_assignment
from worker.runtime.retry_policy import error_from_response, error_from_stream_event
from worker.runtime.sse import DONE, SSEDecoder, parse_event
from worker.settings import Settings

ANTHROPIC_VERSION = "2023-06-01"
#: How long the upstream's address, once looked up, is used for new connections.
RESOLVE_TTL_S = 30.0
_MAX_ERROR_BODY_BYTES = 65_536


def _network_error(exc: httpx.HTTPError, *, in_body: bool) -> TransientUpstreamError:
    """Map an httpx exception to a transient error with a bounded reason label."""
    if isinstance(exc, httpx.ConnectTimeout):
        reason = "connect_timeout"
    elif isinstance(exc, httpx.ConnectError):
        reason = "connect_error"
    elif isinstance(exc, httpx.ReadTimeout):
        reason = "idle_timeout" if in_body else "first_byte_timeout"
    elif isinstance(exc, httpx.PoolTimeout):
        reason = "pool_timeout"
    elif isinstance(exc, httpx.TimeoutException):
        reason = "timeout"
    elif isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        reason = "connection_lost"
    else:
        reason = "network_error"
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return TransientUpstreamError(message, error_type="api_connection_error", reason=reason)


def _too_large(limit: int) -> PermanentUpstreamError:
    return PermanentUpstreamError(
        f"the upstream's response passed MAX_RESPONSE_BYTES ({limit} bytes); it was cut there",
        error_type="api_error",
        status_code=200,
        reason="response_too_large",
    )


#: After a stream's ``message_stop``: how long to wait for the rest of its body (the chunked
#: encoding's last chunk) so that the connection goes back to the pool, and how many reads
#: that may take. Left unread, httpcore closes the connection: the next call connects (and
#: negotiates TLS) again.
BODY_END_WAIT_S = 0.005
BODY_END_READS = 4


def _h11_state(response: httpx.Response) -> Any:
    """The h11 connection under a streamed response (httpx 0.28 and httpcore 1.0's private
    layout), or None when that layout is not there."""
    stream = getattr(getattr(response.stream, "_httpcore_stream", None), "_stream", None)
    return getattr(getattr(stream, "_connection", None), "_h11_state", None)


def _body_end_ready(response: httpx.Response, h11: Any, wait_s: float) -> bool:
    """The body's next chunk is at hand: read already (in ``h11``'s buffer, past the last
    chunk's closing CRLF) or on the socket within ``wait_s``."""
    trailing = getattr(h11, "trailing_data", None)
    buffered = trailing[0] if isinstance(trailing, tuple) else b""
    if isinstance(buffered, bytes | bytearray) and bytes(buffered).removeprefix(b"\r\n"):
        return True
    network_stream = response.extensions.get("network_stream")
    sock = network_stream.get_extra_info("socket") if network_stream is not None else None
    if sock is None:
        return False
    try:
        # poll, not select: no FD_SETSIZE limit in a worker with hundreds of sockets (gevent
        # patches both to wait cooperatively).
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(wait_s * 1000))
    except (OSError, ValueError):  # closed meanwhile
        return False


def _read_body_end(response: httpx.Response, chunks: Iterator[bytes]) -> None:
    """After ``message_stop``, read the body's end when it comes at once, so that the
    connection is kept for the next call; otherwise leave it (the close discards it). Waits
    only where h11's buffer can be seen (else a buffered end would cost the whole wait)."""
    h11 = _h11_state(response)
    wait_s = BODY_END_WAIT_S if h11 is not None else 0.0
    with contextlib.suppress(httpx.HTTPError):
        for _ in range(BODY_END_READS):
            if not _body_end_ready(response, h11, wait_s):
                return
            if next(chunks, None) is None:
                return  # the body ended: httpcore keeps the connection


#: Called with a function that aborts the call in progress (from any thread or greenlet).
OnOpen = Callable[[Callable[[], None]], None]


def _aborter(response: httpx.Response) -> Callable[[], None]:
    """Shut the response's socket down: a read blocked on it wakes at once with EOF.

    Closing the response from another thread would race httpcore's own state; a socket
    shutdown only makes the blocked ``recv`` return, and the reader fails cleanly.
    """

    def abort() -> None:
        network_stream = response.extensions.get("network_stream")
        sock = network_stream.get_extra_info("socket") if network_stream is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)

    return abort


def _native_liveness_poll() -> None:
    """Under gevent, let httpcore check its idle connections with the real ``poll``.

    Before each request and after each response httpcore asks every pooled connection
    whether its socket became readable (the server closed it), with a ``poll(0)``. gevent's
    patched ``poll`` builds watchers and switches to the hub for each: profiled at -c 50
    with short jobs that was 17% of the worker's CPU. A zero-timeout poll never blocks, so
    the unpatched one is safe in a greenlet.
    """
    import sys

    if "gevent" not in sys.modules:
        return
    import select
    import types

    import httpcore._utils
    from gevent import monkey

    if not monkey.is_module_patched("select"):
        return
    httpcore._utils.select = types.SimpleNamespace(  # type: ignore[attr-defined,assignment]
        poll=monkey.get_original("select", "poll"),
        select=monkey.get_original("select", "select"),
        POLLIN=select.POLLIN,
    )


class _ResolvingBackend(httpcore.SyncBackend):
    """httpcore's socket backend, with the upstream's address looked up once per
    ``RESOLVE_TTL_S`` rather than for every connection.

    Every job opens a connection (a stream's body is not read past ``message_stop``), and
    under gevent each ``getaddrinfo`` goes through gevent's thread pool, even for an IP
    address: a handoff to a native thread and back, about 5% of a burst's CPU in py-spy. The
    connect itself is ``socket.create_connection``'s loop over the addresses found.
    """

    def __init__(self, ttl_s: float = RESOLVE_TTL_S) -> None:
        self._ttl_s = ttl_s
        self._cache: dict[tuple[str, int], tuple[float, list[Any]]] = {}

    def _addresses(self, host: str, port: int) -> list[Any]:
        now = time.monotonic()
        hit = self._cache.get((host, port))
        if hit is not None and hit[0] > now:
            return hit[1]
        found = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        self._cache[(host, port)] = (now + self._ttl_s, found)
        return found

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        exc_map: dict[type[Exception], type[Exception]] = {
            socket.timeout: httpcore.ConnectTimeout,
            OSError: httpcore.ConnectError,
        }
        with map_exceptions(exc_map):
            sock = _connect(self._addresses(host, port), timeout, local_address)
            for option in socket_options or ():
                sock.setsockopt(*option)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return SyncStream(sock)


def _connect(
    addresses: list[Any], timeout: float | None, local_address: str | None
) -> socket.socket:
    """The first address that accepts a connection (``socket.create_connection``'s loop)."""
    error: OSError | None = None
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            if local_address is not None:
                sock.bind((local_address, 0))
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    raise error or OSError("getaddrinfo returned no address")


def _batch(
    sses: Iterable[Any], started: bool
) -> tuple[list[dict[str, Any]], bool, UpstreamError | None, bool]:
    """The events of one read, whether ``message_stop`` ended the message, the error that an
    ``error`` event stands for (the events before it are still delivered), and whether
    ``message_start`` has come (``started``: before this read). A ``message_stop`` before any
    ``message_start`` ends nothing: the SDK skips it and reads on."""
    batch: list[dict[str, Any]] = []
    for sse in sses:
        event = parse_event(sse)
        if event is DONE:
            # The seed's provider ends with [DONE]; before message_stop it is a cut.
            break
        if event is None:
            continue
        assert isinstance(event, dict)
        if event.get("type") == "error":
            return batch, False, error_from_stream_event(event), started
        batch.append(event)
        started = started or event.get("type") == "message_start"
        if started and event.get("type") == "message_stop":
            return batch, True, None, started
    return batch, False, None, started


def _version() -> str:
    try:
        return importlib.metadata.version("llm-worker")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


class UpstreamClient:
    """Calls ``{api_base_url}/messages``. Thread- and greenlet-safe; one per process."""

    def __init__(self, settings: Settings, *, transport: httpx.BaseTransport | None = None) -> None:
        _native_liveness_poll()
        api_key = settings.api_key_value()
        headers = {
            "anthropic-version": ANTHROPIC_VERSION,
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
            "user-agent": f"llm-worker/{_version()}",
        }
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._idle_timeout_s = settings.idle_timeout_s
        self._max_response_bytes = settings.max_response_bytes
        self._url = httpx.URL(str(settings.api_base_url).rstrip("/") + "/messages")
        self._headers = list(headers.items())
        self._timeouts = httpx.Timeout(
            connect=settings.connect_timeout_s,
            read=settings.first_byte_timeout_s,
            write=settings.connect_timeout_s,
            pool=settings.first_byte_timeout_s,
        ).as_dict()
        # The transport (httpcore's pool) directly, without httpx.Client around it: no auth,
        # cookies, redirects or hooks are wanted here, and that layer cost 0.15 ms of CPU per
        # call, about 5% of a short job (bench.overhead, profiled with py-spy).
        # One connection per concurrent job; a bounded keep-alive pool, because httpcore's
        # bookkeeping grows with the idle connections it keeps (see PERFORMANCE in README).
        self._transport = transport or httpx.HTTPTransport(
            limits=httpx.Limits(
                max_connections=settings.concurrency,
                max_keepalive_connections=min(settings.concurrency, 64),
            ),
        )
        pool = getattr(self._transport, "_pool", None)
        if transport is None and isinstance(pool, httpcore.ConnectionPool):
            pool._network_backend = _ResolvingBackend()
            linear_assignment(pool)

    def _send(
        self, request: dict[str, Any], *, stream: bool, deadline_at: float | None = None
    ) -> httpx.Response:
        timeouts = dict(self._timeouts)
        if deadline_at is not None:
            # The wait for the response's headers ends at the job's deadline too: no socket
            # exists to shut down before they arrive (the keeper's watchdog does it after).
            left_s = max(0.05, deadline_at - time.time())
            for phase in ("connect", "read", "pool"):
                timeouts[phase] = min(timeouts[phase] or left_s, left_s)
        http_request = httpx.Request(
            "POST",
            self._url,
            headers=self._headers,
            content=orjson.dumps({**request, "stream": stream}),
            # httpcore reads "read" when the body starts; streams change it (a copy each).
            extensions={"timeout": timeouts},
        )
        try:
            response = self._transport.handle_request(http_request)
        except httpx.HTTPError as exc:
            raise _network_error(exc, in_body=False) from exc
        response.request = http_request
        return response

    def close(self) -> None:
        self._transport.close()

    def create(
        self,
        request: dict[str, Any],
        *,
        on_open: OnOpen | None = None,
        deadline_at: float | None = None,
    ) -> dict[str, Any]:
        """One non-streamed call; returns the message JSON. Its wait ends by ``deadline_at``."""
        response = self._send(request, stream=False, deadline_at=deadline_at)
        try:
            if on_open is not None:
                on_open(_aborter(response))
            if response.status_code >= 300:
                body = self._read_error_body(response)
            else:
                body = self._read_body(response)
        except httpx.HTTPError as exc:
            raise _network_error(exc, in_body=False) from exc
        finally:
            response.close()
        if response.status_code >= 300:
            raise error_from_response(response.status_code, response.headers, body)
        try:
            message = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise TransientUpstreamError(
                "upstream returned a body that is not JSON",
                status_code=response.status_code,  # the call did answer: not "network"
                reason="malformed_response",
            ) from exc
        if not isinstance(message, dict) or message.get("type") != "message":
            raise TransientUpstreamError(
                "upstream returned JSON that is not a message",
                status_code=response.status_code,
                reason="malformed_response",
            )
        return message

    def stream(
        self, request: dict[str, Any], *, on_open: OnOpen | None = None
    ) -> Generator[dict[str, Any], None, None]:
        """One streamed call; yields each upstream event up to ``message_stop``."""
        batches = self.stream_batches(request, on_open=on_open)
        try:
            for batch in batches:
                yield from batch
        finally:
            batches.close()

    def stream_batches(
        self,
        request: dict[str, Any],
        *,
        on_open: OnOpen | None = None,
        deadline_at: float | None = None,
    ) -> Generator[list[dict[str, Any]], None, None]:
        """One streamed call; yields the upstream events up to ``message_stop``, as one list
        per network read (see :meth:`_events`).

        Closing the generator closes the HTTP response. ``on_open`` receives a function that
        aborts the stream from elsewhere (a cancel while the stream stalls). The wait for the
        headers ends by ``deadline_at``.
        """
        response = self._send(request, stream=True, deadline_at=deadline_at)
        try:
            if on_open is not None:
                on_open(_aborter(response))
            if response.status_code >= 300:
                raise error_from_response(
                    response.status_code, response.headers, self._read_error_body(response)
                )
            # httpcore reads the read timeout once when the body starts: from here on it
            # bounds the gap between reads (idle), not the wait for the headers.
            timeouts = response.request.extensions.get("timeout")
            if isinstance(timeouts, dict):
                timeouts["read"] = self._idle_timeout_s
            yield from self._events(response)
        finally:
            response.close()

    def _events(self, response: httpx.Response) -> Iterator[list[dict[str, Any]]]:
        """The stream's events, as a list per network read: what arrived together.

        The runner publishes each list in one Redis round trip and may coalesce its text
        deltas, which adds no delay, since none of them waits for a later read.
        """
        decoder = SSEDecoder()
        finished = started = False
        size = 0
        try:
            chunks = response.iter_bytes()
            for raw in chunks:
                # A bound on the stream bounds the decoder's buffers and the message as well.
                size += len(raw)
                if size > self._max_response_bytes:
                    raise _too_large(self._max_response_bytes)
                batch, finished, error, started = _batch(decoder.decode(raw), started)
                if batch:
                    yield batch
                if error is not None:
                    raise error
                if finished:
                    _read_body_end(response, chunks)
                    return
            for sse in decoder.flush():
                event = parse_event(sse)
                if started and isinstance(event, dict) and event.get("type") == "message_stop":
                    yield [event]
                    finished = True
        except httpx.HTTPError as exc:
            if not finished:
                raise _network_error(exc, in_body=True) from exc
        if not finished:
            raise TransientUpstreamError(
                "the stream ended before message_stop", reason="incomplete_stream"
            )

    def _read_body(self, response: httpx.Response) -> bytes:
        """The whole body, or :class:`PermanentUpstreamError` once it passes
        ``MAX_RESPONSE_BYTES`` (read no further: memory stays bounded)."""
        parts: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > self._max_response_bytes:
                raise _too_large(self._max_response_bytes)
            parts.append(chunk)
        return b"".join(parts)

    @staticmethod
    def _read_error_body(response: httpx.Response) -> bytes:
        body = b""
        try:
            for chunk in response.iter_raw():
                body += chunk
                if len(body) >= _MAX_ERROR_BODY_BYTES:
                    break
        except httpx.HTTPError:
            pass
        return body


__all__ = ["UpstreamClient", "UpstreamError"]
