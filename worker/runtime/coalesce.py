"""Coalescing the upstream events that arrived together into fewer chunks (pure).

DESIGN allows consecutive text deltas of one content block to be published as one chunk.
The runner applies :func:`coalesce` to the events of one network read: they arrived
together, so merging them delays nothing, and under load, when the worker falls behind
and reads carry many events, it cuts the chunks (and Redis writes) several-fold.

Rules: only ``content_block_delta`` events whose delta is a ``text_delta`` merge, only with
their immediate predecessor, and only within one block (same ``index``); everything else
(block starts and stops, tool input, thinking, message events, pings) passes verbatim and
in order. A merged chunk is the first event with the texts concatenated, so any extra field
of the first event (its earliest timestamp, say) is kept.
"""

from __future__ import annotations

from typing import Any


def _text_delta_index(event: dict[str, Any]) -> int | None:
    """The block index of a text delta event, None for any other event."""
    if event.get("type") != "content_block_delta":
        return None
    delta = event.get("delta")
    if not isinstance(delta, dict) or delta.get("type") != "text_delta":
        return None
    index = event.get("index")
    return index if isinstance(index, int) else None


def coalesce(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``events`` with runs of text deltas of one block merged; the input is not changed."""
    if len(events) < 2:
        return events
    out: list[dict[str, Any]] = []
    run_index: int | None = None  # block of the text delta run that out[-1] ends, if any
    texts: list[str] = []
    for event in events:
        index = _text_delta_index(event)
        if index is not None and index == run_index:
            texts.append(str(event["delta"].get("text", "")))
            continue
        if len(texts) > 1:
            out[-1] = _merged(out[-1], texts)
        texts = [str(event["delta"].get("text", ""))] if index is not None else []
        run_index = index
        out.append(event)
    if len(texts) > 1:
        out[-1] = _merged(out[-1], texts)
    return out


def _merged(first: dict[str, Any], texts: list[str]) -> dict[str, Any]:
    return {**first, "delta": {**first["delta"], "text": "".join(texts)}}
