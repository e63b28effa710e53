"""Server-Sent Events: bytes in, Anthropic stream events out. No I/O.

Two layers, in the style of httpx's decoders:

- :class:`SSEDecoder` is an incremental state machine. Feed it the response body in
  chunks split at *any* byte offset with :meth:`SSEDecoder.decode`, then call
  :meth:`SSEDecoder.flush` once at end of stream. It yields :class:`ServerSentEvent`
  values and knows nothing about JSON.
- :func:`parse_event` turns one :class:`ServerSentEvent` into an Anthropic stream event
  dict, the :data:`DONE` sentinel (``data: [DONE]``, which the seed's provider sends),
  or ``None`` (a keep-alive with nothing in it).

Parsing follows the WHATWG "event stream interpretation" rules, with two deliberate
differences, both for robustness against a stream that is cut short:

- :meth:`SSEDecoder.flush` treats end of stream as the end of the last line *and* of the
  last event, so a final ``data: [DONE]`` without its blank line is still seen. (The spec
  discards it.) A truncated JSON line then fails in :func:`parse_event` as
  :class:`MalformedStreamError`, which is transient, so the job is retried.
- ``retry:`` is reported on the event it arrived with, as the anthropic SDK does.

Exceptions::

    TransientUpstreamError          (worker.errors)
    └── MalformedStreamError        data that is not a JSON object, or has no type
"""

from __future__ import annotations

import codecs
import enum
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from worker.errors import TransientUpstreamError

__all__ = [
    "DONE",
    "MalformedStreamError",
    "SSEDecoder",
    "ServerSentEvent",
    "StreamEnd",
    "parse_event",
]

# Only CR, LF and CRLF end a line in SSE. str.splitlines() would also split on
# U+2028, U+0085, \x0b, \x1c… which may legitimately appear inside JSON text.
_LINE_BREAK: Final = re.compile(r"\r\n|\r|\n")

# How much of a bad payload to quote in an error message (logs, job events).
_QUOTE_CHARS: Final = 200


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event. ``event`` is None when the block had no (or an empty) ``event:``."""

    event: str | None
    data: str
    id: str | None = None
    retry: int | None = None


class StreamEnd(enum.Enum):
    """Sentinel type for the end-of-stream marker ``data: [DONE]``."""

    DONE = "[DONE]"


#: Returned by :func:`parse_event` for ``data: [DONE]``.
DONE: Final = StreamEnd.DONE


class MalformedStreamError(TransientUpstreamError):
    """An SSE event's data is not a JSON object with a ``type``; another attempt may succeed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_type="api_error", reason="malformed_sse")


class SSEDecoder:
    """Incremental SSE decoder: ``decode(chunk)`` any number of times, then ``flush()`` once.

    Correct for chunks split anywhere: inside a multi-byte UTF-8 sequence, inside a field,
    and between the ``\\r`` and ``\\n`` of a CRLF (counted as one line break).
    """

    def __init__(self) -> None:
        # "utf-8-sig" drops a leading byte-order mark, as the spec requires, even when the
        # BOM itself is split across chunks. Invalid bytes become U+FFFD, also per spec.
        self._text_decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
        # Text of the current line that has not seen its line break yet.
        self._partial_line: list[str] = []
        # The previous chunk ended in "\r": a "\n" starting the next one belongs to it.
        self._skip_lf = False
        self._event: str | None = None
        self._data: list[str] = []
        self._retry: int | None = None
        # Per spec the last event id persists across events until changed.
        self._last_event_id: str | None = None

    def decode(self, chunk: bytes) -> list[ServerSentEvent]:
        """Consume ``chunk`` and return the events completed by it (often none)."""
        return self._feed(self._text_decoder.decode(chunk))

    def flush(self) -> list[ServerSentEvent]:
        """End of stream: finish the last line and the last event, if any."""
        events = self._feed(self._text_decoder.decode(b"", final=True))
        if self._partial_line:
            line = "".join(self._partial_line)
            self._partial_line = []
            self._process_line(line)
        event = self._dispatch()
        if event is not None:
            events.append(event)
        self._skip_lf = False
        return events

    def _feed(self, text: str) -> list[ServerSentEvent]:
        if not text:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if text.startswith("\n"):
                text = text[1:]
        events: list[ServerSentEvent] = []
        if "\r" not in text:
            # Only LF line breaks (what every upstream here sends): str.split, about three
            # times cheaper than the regex below.
            lines = text.split("\n")
            rest = lines.pop()
            if lines and self._partial_line:
                self._partial_line.append(lines[0])
                lines[0] = "".join(self._partial_line)
                self._partial_line = []
            for line in lines:
                event = self._process_line(line)
                if event is not None:
                    events.append(event)
            if rest:
                self._partial_line.append(rest)
            return events
        start = 0
        for match in _LINE_BREAK.finditer(text):
            self._partial_line.append(text[start : match.start()])
            line = "".join(self._partial_line)
            self._partial_line = []
            start = match.end()
            event = self._process_line(line)
            if event is not None:
                events.append(event)
        rest = text[start:]
        if rest:
            self._partial_line.append(rest)
        elif text.endswith("\r"):
            # A lone "\r" at the very end may be the first half of a CRLF.
            self._skip_lf = True
        return events

    def _process_line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # comment (Anthropic and proxies use these as keep-alives)
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:  # spec: an id with NUL is ignored
            self._last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)  # spec: only ASCII digits; anything else is ignored
        # Any other field name is ignored, per spec.
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, event, retry = self._data, self._event, self._retry
        self._data, self._event, self._retry = [], None, None
        if not data:
            return None  # spec: a block without data dispatches nothing
        return ServerSentEvent(
            event=event or None,
            data="\n".join(data),
            id=self._last_event_id,
            retry=retry,
        )


def parse_event(sse: ServerSentEvent) -> dict[str, Any] | Literal[StreamEnd.DONE] | None:
    """Turn one SSE into an Anthropic stream event dict, :data:`DONE`, or None.

    - ``data: [DONE]`` gives :data:`DONE`.
    - Data that is empty or only whitespace gives ``None``: a keep-alive, nothing to apply.
    - Otherwise the data must be a JSON object. Its ``type`` wins over the SSE ``event:``
      name when they disagree (the JSON is what the SDK reads); when it has no ``type``,
      the ``event:`` name is used. Unknown types are returned as they are.
    - An ``event: ping`` is never an error, whatever its data (the SDK skips it unread): a
      JSON object that is a ping comes back as it is, anything else as ``None``.

    Raises :class:`MalformedStreamError` for invalid JSON, a non-object, or no type at all.
    """
    stripped = sse.data.strip()
    if stripped == "[DONE]":
        return DONE
    if not stripped:
        return None
    if sse.event == "ping":
        return _ping(stripped)
    try:
        payload = orjson.loads(stripped)
    except orjson.JSONDecodeError as exc:
        raise MalformedStreamError(
            f"SSE event {sse.event!r} has invalid JSON data ({exc}): {_quote(sse.data)}"
        ) from exc
    if not isinstance(payload, dict):
        raise MalformedStreamError(
            f"SSE event {sse.event!r} data is a {type(payload).__name__}, "
            f"not an object: {_quote(sse.data)}"
        )
    if "type" not in payload and sse.event:
        payload["type"] = sse.event
    event_type = payload.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise MalformedStreamError(f"SSE event has no usable type: {_quote(sse.data)}")
    return payload


def _ping(data: str) -> dict[str, Any] | None:
    """An ``event: ping``'s payload when it is a ping object, else None (nothing to apply)."""
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(payload, dict) or payload.setdefault("type", "ping") != "ping":
        return None
    return payload


def _quote(data: str) -> str:
    if len(data) <= _QUOTE_CHARS:
        return repr(data)
    return repr(data[:_QUOTE_CHARS]) + f"… ({len(data)} chars)"
