"""Job events as Server-Sent Events (pure): Anthropic's stream for ``/v1/messages``, and our
own event JSON for ``/v1/jobs/{id}/events``.

An SSE ``id`` names a position in a job's Redis stream, so a dropped client can resume with
``Last-Event-ID``: ``{job_id}/{stream_id}`` on the messages route (the job is not in its
URL), the bare stream id on the jobs route. Job ids cannot contain ``/``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import orjson

from worker import events as ev
from worker.client.batch_file import client_error, error_response

#: A Redis stream id: ASCII digits only (``str.isdigit`` also takes other scripts' digits).
_STREAM_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}\Z")
#: Chunk types that are part of an answer: once one is sent, a retry cannot be hidden. A ping
#: or an event type the SDK does not know changes nothing for the client (the SDK skips it).
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


def frame(data: Any, *, event: str | None = None, id_: str | None = None) -> bytes:
    """One SSE frame; ``data`` is JSON-encoded (it never holds a raw newline)."""
    head = b""
    if id_ is not None:
        head += b"id: " + id_.encode() + b"\n"
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def message_id(job_id: str, stream_id: str) -> str:
    return f"{job_id}/{stream_id}"


def parse_message_id(value: str) -> tuple[str, str] | None:
    """``(job_id, stream_id)`` from a messages-route ``Last-Event-ID``; None if malformed."""
    job_id, sep, stream_id = value.strip().partition("/")
    if not sep or not job_id or not _is_stream_id(stream_id):
        return None
    return job_id, stream_id


def _is_stream_id(value: str) -> bool:
    return bool(_STREAM_ID.match(value))


def valid_stream_id(value: str) -> bool:
    return _is_stream_id(value.strip())


class AnthropicRelay:
    """Turns one job's events into the Anthropic stream a client of ``/v1/messages`` expects.

    Chunks are the upstream's own events and pass through. A retry before any chunk of
    the answer was sent is invisible (the answer simply starts later); a retry after
    output was sent cannot be hidden, since the client already holds part of an answer
    that the next attempt replaces, so the stream ends with an ``error`` event instead.
    A job that completed without chunks (a non-streamed job followed here) is replayed
    from its final message.
    """

    def __init__(
        self, job_id: str, *, sent_output: bool = False, upstream: str = "the upstream"
    ) -> None:
        self.job_id = job_id
        #: The client holds part of the answer: from here a retry cannot be passed through,
        #: and a completion must not replay the message. True when resuming (Last-Event-ID).
        self.sent_output = sent_output
        self.upstream = upstream
        self.done = False

    def feed(self, event: Mapping[str, Any]) -> Iterator[bytes]:
        id_ = message_id(self.job_id, str(event.get("stream_id", "")))
        kind = event.get("type")
        if kind == ev.CHUNK:
            upstream = event.get("event") or {}
            self.sent_output = self.sent_output or upstream.get("type") in ANSWER_EVENTS
            yield frame(upstream, event=str(upstream.get("type", "message")), id_=id_)
        elif kind == ev.RETRY and self.sent_output:
            self.done = True
            error = {
                "type": "overloaded_error",
                "message": f"the upstream attempt failed mid-answer and job {self.job_id} is "
                "being retried; the partial answer is void, send the request again",
            }
            yield frame(error_response(error), event="error", id_=id_)
        elif kind == ev.COMPLETED:
            self.done = True
            if not self.sent_output:
                for upstream in message_events(event["message"]):
                    yield frame(upstream, event=upstream["type"], id_=id_)
        elif kind in ev.TERMINAL_TYPES:
            self.done = True
            error = terminal_error(event, upstream=self.upstream)
            yield frame(error_response(error), event="error", id_=id_)


def terminal_error(event: Mapping[str, Any], *, upstream: str = "the upstream") -> dict[str, Any]:
    """The error a client of ours sees for a job that did not complete (see
    :func:`~worker.client.batch_file.client_error`)."""
    kind = event.get("type")
    error = client_error(event.get("error") or {}, upstream)
    if kind == ev.CANCELLED:
        error.setdefault("message", "the job was cancelled")
        error["type"] = "api_error"
    elif kind == ev.EXPIRED:
        error.setdefault("message", "the job passed its deadline")
        error["type"] = "timeout_error"
    return error


def message_events(message: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The stream events that accumulate into ``message`` (for a job that did not stream)."""
    usage = dict(message.get("usage") or {})
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    start["usage"] = {**usage, "output_tokens": 0}
    yield {"type": "message_start", "message": start}
    for index, block in enumerate(message.get("content") or []):
        kind = block.get("type")
        if kind == "text":
            yield {
                "type": "content_block_start",
                "index": index,
                "content_block": {**block, "text": ""},
            }
            delta = {"type": "text_delta", "text": block.get("text", "")}
        elif kind == "tool_use":
            yield {
                "type": "content_block_start",
                "index": index,
                "content_block": {**block, "input": {}},
            }
            delta = {
                "type": "input_json_delta",
                "partial_json": orjson.dumps(block.get("input", {})).decode(),
            }
        elif kind == "thinking":
            yield {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "thinking", "thinking": "", "signature": ""},
            }
            yield {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "thinking_delta", "thinking": block.get("thinking", "")},
            }
            delta = {"type": "signature_delta", "signature": block.get("signature", "")}
        else:
            yield {"type": "content_block_start", "index": index, "content_block": dict(block)}
            yield {"type": "content_block_stop", "index": index}
            continue
        yield {"type": "content_block_delta", "index": index, "delta": delta}
        yield {"type": "content_block_stop", "index": index}
    yield {
        "type": "message_delta",
        "delta": {
            "stop_reason": message.get("stop_reason"),
            "stop_sequence": message.get("stop_sequence"),
        },
        "usage": usage,
    }
    yield {"type": "message_stop"}


def http_status(error: Mapping[str, Any], kind: str) -> int:
    """The status of a ``/v1/messages`` response for a job that did not complete.

    The upstream's own status when it gave one, except 401/403 (the upstream refused our
    key, not the client's): 502; a cancelled job is 410 (gone, and not a status the SDKs
    retry: someone stopped it on purpose); an expired one 504.
    """
    if kind == ev.CANCELLED:
        return 410
    if kind == ev.EXPIRED:
        return 504
    status = client_error(error).get("status_code")
    if isinstance(status, int) and 400 <= status <= 599:
        return status
    return 502
