"""Job events as Server-Sent Events (pure): Anthropic's stream for ``/v1/messages``, and our
own event JSON for ``/v1/jobs/{id}/events``.

An SSE ``id`` names a position in a job's events, so a dropped client can resume with
``Last-Event-ID``: ``{job_id}/{stream_id}`` on the messages route (the job is not in its
URL), the bare stream id on the jobs route. A stream the gateway relays from its own run of
the job (its fast path) sends each event as it is made, before Redis has stored it and named
its stream id: its frames say ``{job_id}/{attempt}.{seq}`` instead, the event's attempt and
``seq``, which every event carries. Job ids cannot contain ``/``.
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
#: An event's place by its attempt and ``seq`` (frames relayed before the event was stored).
_EVENT_PLACE = re.compile(r"^([0-9]{1,9})\.([0-9]{1,20})\Z")

Place = tuple[int, int]
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


def place_id(event: Mapping[str, Any]) -> str:
    """The ``{attempt}.{seq}`` id of an event not yet stored (see the module's docstring)."""
    return f"{event.get('attempt')}.{event.get('seq')}"


def parse_message_id(value: str) -> tuple[str, str] | None:
    """``(job_id, position)`` from a messages-route ``Last-Event-ID``, the position a stream
    id or an ``{attempt}.{seq}`` place (:func:`resume_point`); None if malformed."""
    job_id, sep, position = value.strip().partition("/")
    if not sep or not job_id or not (_is_stream_id(position) or _EVENT_PLACE.match(position)):
        return None
    return job_id, position


def resume_point(position: str) -> tuple[str, Place | None]:
    """Where to read a job's stream from for ``position`` (a stream id or a place), and the
    place of the last event the client holds, when it is one: events up to it are skipped."""
    place = _EVENT_PLACE.match(position)
    if place is None:
        return position, None
    return "0-0", (int(place[1]), int(place[2]))


def held(place: Place, last: Place) -> bool:
    """An event at ``place`` is one a client holding up to ``last`` has: no later ``seq`` and
    no later attempt (an event of a later attempt is new whatever its ``seq``: a runner
    that died with events unstored is followed by one that numbers from what was stored)."""
    return place[0] <= last[0] and place[1] <= last[1]


def event_place(event: Mapping[str, Any]) -> Place | None:
    attempt, seq = event.get("attempt"), event.get("seq")
    if type(attempt) is not int or type(seq) is not int:
        return None
    return attempt, seq


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
    from its final message. Output of a later attempt than the one the client holds part of
    (a runner that died mid-answer, taken over without a ``retry`` event) ends the stream
    with the same error.

    Events at or before :attr:`place` (``seq`` no later, attempt no later) are skipped: the
    client holds them (a stream relayed from the gateway's own run, read from Redis after the
    run, or resumed from a place).
    """

    def __init__(
        self,
        job_id: str,
        *,
        sent_output: bool = False,
        upstream: str = "the upstream",
        place: Place | None = None,
    ) -> None:
        self.job_id = job_id
        #: The client holds part of the answer: from here a retry cannot be passed through,
        #: and a completion must not replay the message. True when resuming (Last-Event-ID).
        self.sent_output = sent_output
        self.upstream = upstream
        self.done = False
        #: The last event the client holds, by place; None: not known.
        self.place = place
        #: The attempt whose output the client holds (when known).
        self._answer_attempt: int | None = place[0] if place is not None and sent_output else None

    def feed(self, event: Mapping[str, Any]) -> Iterator[bytes]:
        """The frames for ``event``, named by its stream id, or by its place when it has
        none (an event of the gateway's own run, relayed before Redis stored it)."""
        place = event_place(event)
        if place is not None and self.place is not None and held(place, self.place):
            return
        if place is not None:
            self.place = place
        stream_id = event.get("stream_id")
        id_ = message_id(self.job_id, str(stream_id) if stream_id else place_id(event))
        kind = event.get("type")
        attempt = place[0] if place is not None else None
        if (
            self.sent_output
            and kind in (ev.CHUNK, ev.STARTED)
            and attempt is not None
            and self._answer_attempt is not None
            and attempt > self._answer_attempt
        ):
            kind = ev.RETRY  # a later attempt's output: what the client holds is void
        if kind == ev.CHUNK:
            upstream = event.get("event") or {}
            if upstream.get("type") in ANSWER_EVENTS:
                self.sent_output = True
                if self._answer_attempt is None:
                    self._answer_attempt = attempt
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
