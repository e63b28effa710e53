"""Coalescing text deltas that arrived together (worker.runtime.coalesce)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.support import MESSAGE_START
from worker.runtime.accumulate import accumulate, final_message
from worker.runtime.coalesce import coalesce


def text(index: int, value: str, **extra: Any) -> dict[str, Any]:
    delta = {"type": "text_delta", "text": value}
    return {"type": "content_block_delta", "index": index, "delta": delta, **extra}


def tool_json(index: int, value: str) -> dict[str, Any]:
    delta = {"type": "input_json_delta", "partial_json": value}
    return {"type": "content_block_delta", "index": index, "delta": delta}


def start(index: int, kind: str = "text") -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": ""}
    if kind == "tool_use":
        block = {"type": "tool_use", "id": "t1", "name": "f", "input": {}}
    return {"type": "content_block_start", "index": index, "content_block": block}


def stop(index: int) -> dict[str, Any]:
    return {"type": "content_block_stop", "index": index}


MESSAGE_END = [
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 9},
    },
    {"type": "message_stop"},
]


def test_consecutive_text_deltas_of_one_block_become_one_chunk() -> None:
    """A run of text deltas of one block merges into its first event, texts concatenated."""
    assert coalesce([text(0, "a"), text(0, "b"), text(0, "c")]) == [text(0, "abc")]


def test_a_single_event_passes_unchanged() -> None:
    """One event (the first chunk of a stream, typically) is published as it came."""
    event = text(0, "Hi")
    assert coalesce([event]) == [event]
    assert coalesce([event])[0] is event


def test_block_boundaries_are_never_merged() -> None:
    """Deltas of different blocks, or separated by a block stop/start, stay apart."""
    events = [text(0, "a"), text(0, "b"), stop(0), start(1), text(1, "c"), text(1, "d")]
    assert coalesce(events) == [text(0, "ab"), stop(0), start(1), text(1, "cd")]
    assert coalesce([text(0, "a"), text(1, "b")]) == [text(0, "a"), text(1, "b")]


def test_tool_input_and_other_events_pass_verbatim() -> None:
    """Only text deltas merge: tool input fragments, pings and message events do not."""
    events = [start(0, "tool_use"), tool_json(0, '{"a"'), tool_json(0, ": 1}"), stop(0)]
    assert coalesce(events) == events
    ping = {"type": "ping"}
    assert coalesce([text(0, "a"), ping, text(0, "b")]) == [text(0, "a"), ping, text(0, "b")]


def test_merged_chunk_keeps_the_first_events_extra_fields() -> None:
    """Fields beside the delta (the simulator's send stamp) come from the earliest event."""
    merged = coalesce([text(0, "a", sim_sent_at=1.0), text(0, "b", sim_sent_at=2.0)])
    assert merged == [text(0, "ab", sim_sent_at=1.0)]


def test_input_events_are_not_mutated() -> None:
    """Coalescing builds new events: the caller's list and dicts stay as they were."""
    events = [text(0, "a"), text(0, "b")]
    coalesce(events)
    assert events == [text(0, "a"), text(0, "b")]


@given(
    blocks=st.lists(
        st.tuples(st.booleans(), st.lists(st.text(max_size=4), min_size=1, max_size=6)),
        min_size=1,
        max_size=4,
    ),
    cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=8),
)
def test_coalesced_stream_accumulates_to_the_same_message(
    blocks: list[tuple[bool, list[str]]], cuts: list[int]
) -> None:
    """However the stream is split into reads, coalesced chunks fold to the same message
    and their text per block concatenates to the original's."""
    events: list[dict[str, Any]] = [MESSAGE_START]
    for index, (is_tool, pieces) in enumerate(blocks):
        events.append(start(index, "tool_use" if is_tool else "text"))
        if is_tool:
            safe = ["".join(ch for ch in p if ch.isalnum()) for p in pieces]  # valid JSON
            events += [tool_json(index, p) for p in ['{"k": "', *safe, '"}']]
        else:
            events += [text(index, p) for p in pieces]
        events.append(stop(index))
    events += MESSAGE_END
    bounds = sorted({c for c in cuts if c < len(events)})
    reads = [events[a:b] for a, b in zip([0, *bounds], [*bounds, len(events)], strict=True)]
    chunks = [chunk for read in reads for chunk in coalesce(read)]

    def fold(items: list[dict[str, Any]]) -> dict[str, Any]:
        snapshot = None
        for item in items:
            snapshot = accumulate(snapshot, item)
        assert snapshot is not None
        return final_message(snapshot)

    assert fold(chunks) == fold(events)
    assert len(chunks) <= len(events)
    assert [c for c in chunks if c["type"] != "content_block_delta"] == [
        e for e in events if e["type"] != "content_block_delta"
    ]
