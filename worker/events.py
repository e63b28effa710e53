"""The job event wire format (pure): building events and reading them back.

An event is one JSON object ``{"job_id", "seq", "attempt", "type", "ts", ...}``; see the
README's "Events" section for every type.
"""

from __future__ import annotations

import time
from typing import Any, Final

import orjson

STARTED: Final = "started"
CHUNK: Final = "chunk"
RETRY: Final = "retry"
COMPLETED: Final = "completed"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"
EXPIRED: Final = "expired"

TERMINAL_TYPES: Final = frozenset({COMPLETED, FAILED, CANCELLED, EXPIRED})
#: Job-hash states; ``queued`` and ``running`` are not terminal.
QUEUED: Final = "queued"
RUNNING: Final = "running"


def make_event(job_id: str, seq: int, attempt: int, type_: str, **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "job_id": job_id,
        "seq": seq,
        "attempt": attempt,
        "type": type_,
        "ts": round(time.time(), 6),
    }
    event.update(fields)
    return event


def dumps(event: dict[str, Any]) -> bytes:
    return orjson.dumps(event)


def loads(data: bytes | str) -> dict[str, Any]:
    value = orjson.loads(data)
    if not isinstance(value, dict):
        raise ValueError("an event must be a JSON object")
    return value


def is_terminal(event: dict[str, Any]) -> bool:
    return event.get("type") in TERMINAL_TYPES


def text_of(event: dict[str, Any]) -> str:
    """The text a ``chunk`` event adds (empty for anything else)."""
    if event.get("type") != CHUNK:
        return ""
    upstream = event.get("event") or {}
    delta = upstream.get("delta") or {}
    if upstream.get("type") == "content_block_delta" and delta.get("type") == "text_delta":
        return str(delta.get("text", ""))
    return ""
