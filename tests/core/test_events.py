"""worker.events: building job events, telling terminal ones, and reading them back."""

from __future__ import annotations

import time
from typing import Any

import pytest

from worker.events import (
    CANCELLED,
    CHUNK,
    COMPLETED,
    EXPIRED,
    FAILED,
    RETRY,
    STARTED,
    dumps,
    is_terminal,
    loads,
    make_event,
    text_of,
)


def _chunk(upstream: dict[str, Any]) -> dict[str, Any]:
    return make_event("job-1", 3, 1, CHUNK, event=upstream)


def test_make_event_has_the_envelope_fields_and_extras() -> None:
    """An event carries job_id, seq, attempt, type, a current ts, and any extra fields."""
    before = time.time()
    event = make_event("job-1", 7, 2, RETRY, delay_s=1.5, error={"type": "api_error"})
    after = time.time()
    assert event["job_id"] == "job-1"
    assert event["seq"] == 7
    assert event["attempt"] == 2
    assert event["type"] == "retry"
    assert before - 1e-5 <= event["ts"] <= after + 1e-5
    assert event["delay_s"] == 1.5
    assert event["error"] == {"type": "api_error"}
    assert list(event)[:5] == ["job_id", "seq", "attempt", "type", "ts"]


def test_event_round_trips_through_json() -> None:
    """loads(dumps(event)) gives the same event back, with text left as UTF-8."""
    event = make_event("job-1", 1, 1, COMPLETED, message={"content": [{"text": "héllo 🎉"}]})
    data = dumps(event)
    assert isinstance(data, bytes)
    assert "héllo 🎉".encode() in data
    assert loads(data) == event
    assert loads(data.decode()) == event


@pytest.mark.parametrize("type_", [COMPLETED, FAILED, CANCELLED, EXPIRED])
def test_terminal_types_are_terminal(type_: str) -> None:
    """completed, failed, cancelled and expired end a job."""
    assert is_terminal(make_event("j", 1, 1, type_))


@pytest.mark.parametrize("type_", [STARTED, CHUNK, RETRY, "queued", "running", "unknown"])
def test_other_types_are_not_terminal(type_: str) -> None:
    """started, chunk, retry and anything else do not end a job."""
    assert not is_terminal(make_event("j", 1, 1, type_))


def test_event_without_a_type_is_not_terminal() -> None:
    """A malformed event with no type is not mistaken for the end."""
    assert not is_terminal({"job_id": "j"})


def test_text_of_a_text_delta_chunk() -> None:
    """A chunk holding a text_delta yields its text."""
    upstream = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "Hi"},
    }
    assert text_of(_chunk(upstream)) == "Hi"


@pytest.mark.parametrize(
    "upstream",
    [
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta"}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
        {"type": "message_stop"},
        {"type": "ping"},
        {},
    ],
)
def test_text_of_other_chunks_is_empty(upstream: dict[str, Any]) -> None:
    """Chunks that are not text deltas add no text."""
    assert text_of(_chunk(upstream)) == ""


def test_text_of_a_chunk_without_an_upstream_event_is_empty() -> None:
    """A chunk with no (or a null) event is tolerated and adds no text."""
    assert text_of(make_event("j", 1, 1, CHUNK)) == ""
    assert text_of(make_event("j", 1, 1, CHUNK, event=None)) == ""


@pytest.mark.parametrize("type_", [STARTED, RETRY, COMPLETED, FAILED])
def test_text_of_non_chunk_events_is_empty(type_: str) -> None:
    """Only chunk events carry text, even if they look like a text delta otherwise."""
    delta = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "x"}}
    assert text_of(make_event("j", 1, 1, type_, event=delta)) == ""


@pytest.mark.parametrize("data", [b"[1, 2]", b'"text"', b"42", b"null", "[]"])
def test_loads_rejects_non_objects(data: bytes | str) -> None:
    """An event must be a JSON object; anything else is a ValueError."""
    with pytest.raises(ValueError, match="JSON object"):
        loads(data)


def test_loads_rejects_invalid_json() -> None:
    """Bytes that are not JSON raise a ValueError too."""
    with pytest.raises(ValueError):  # noqa: PT011 - orjson's decode error subclasses ValueError
        loads(b"{not json")
