"""Rendering a :class:`~worker.simulator.textgen.Generation` as bytes: pure, no I/O.

Two renderings: :func:`message_json` (the non-streamed body) and :func:`stream_frames`
(the SSE body as a timed plan). A plan is a list of :class:`Frame`, each a chunk of
bytes with the offset from the start of the response at which it may be written. Events
due at the same moment share one frame, so an unpaced answer is two writes (the preamble,
then everything after the time to first token) however long it is: the simulator is the
load target for benchmarks and must stay cheap per token.

Because the plan is data, faults rewrite it (truncate it, append an ``error`` event or a
garbled frame, stretch the delays; :func:`worker.simulator.faults.rewrite_plan`) without
touching the sender.

Event order, as the upstream sends it: ``message_start``, ``ping``, then per block
``content_block_start``, its deltas, ``content_block_stop``; then ``message_delta``
(stop reason and cumulative usage), ``message_stop`` and the seed's ``data: [DONE]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from worker.simulator.textgen import Generation, TextBlock, ToolUseBlock

DONE = b"data: [DONE]\n\n"
#: With the ``stamp=1`` directive each delta event carries ``sim_sent_at``; this placeholder
#: is replaced with the wall-clock time when its frame is written (:func:`stamp_frame`), so
#: benchmarks can measure a chunk's delay from leaving the upstream to reaching a consumer.
STAMP_MARK = b'"sim_sent_at":0.0'
PING = b'event: ping\ndata: {"type":"ping"}\n\n'


@dataclass(frozen=True, slots=True)
class Frame:
    """A chunk of the response body and when (seconds after the start) to write it."""

    at_s: float
    data: bytes


def event(name: str, payload: dict[str, Any]) -> bytes:
    """One SSE event with a JSON payload."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def content_json(generation: Generation) -> list[dict[str, Any]]:
    """The ``content`` list of the final message."""
    content: list[dict[str, Any]] = []
    for block in generation.blocks:
        if isinstance(block, TextBlock):
            content.append({"type": "text", "text": block.text})
        else:
            content.append(
                {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
            )
    return content


def message_json(generation: Generation, message_id: str, model: str) -> bytes:
    """The non-streamed response body."""
    return orjson.dumps(
        {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content_json(generation),
            "stop_reason": generation.stop_reason,
            "stop_sequence": generation.stop_sequence,
            "usage": {
                "input_tokens": generation.input_tokens,
                "output_tokens": generation.output_tokens,
            },
        }
    )


def delta_count(generation: Generation) -> int:
    """How many content deltas the stream carries (the unit of pacing)."""
    return sum(
        len(b.tokens) if isinstance(b, TextBlock) else len(b.fragments) for b in generation.blocks
    )


def answer_duration_s(generation: Generation, ttft_s: float, tokens_per_s: float) -> float:
    """When the last delta is due: what a non-streamed answer waits before replying."""
    paced = (delta_count(generation) - 1) / tokens_per_s if tokens_per_s > 0 else 0.0
    return ttft_s + max(0.0, paced)


def stream_frames(
    generation: Generation,
    message_id: str,
    model: str,
    *,
    ttft_s: float,
    tokens_per_s: float,
    ping_every: int = 0,
    stamp: bool = False,
) -> list[Frame]:
    """The SSE body as a timed plan; delta ``i`` is due at ``ttft_s + i / tokens_per_s``.

    ``stamp`` adds :data:`STAMP_MARK` to every delta event, for :func:`stamp_frame`.
    """
    tail = b"}," + STAMP_MARK + b"}\n\n" if stamp else b"}}\n\n"
    plan = _Planner()
    plan.add(0.0, _message_start(generation, message_id, model) + PING)
    step_s = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0
    sent = 0
    for index, block in enumerate(generation.blocks):
        due = ttft_s + sent * step_s
        plan.add(due if sent else 0.0, _block_start(index, block))
        prefix, pieces = _delta_parts(index, block)
        for piece in pieces:
            if ping_every and sent and sent % ping_every == 0:
                plan.add(ttft_s + sent * step_s, PING)
            plan.add(ttft_s + sent * step_s, prefix + orjson.dumps(piece) + tail)
            sent += 1
        plan.add(ttft_s + max(0, sent - 1) * step_s, _block_stop(index))
    end = ttft_s + max(0, sent - 1) * step_s
    plan.add(end, _message_end(generation))
    return plan.frames()


def stamp_frame(data: bytes, now_s: float) -> bytes:
    """The frame with every :data:`STAMP_MARK` set to ``now_s`` (Unix time, seconds)."""
    return data.replace(STAMP_MARK, b'"sim_sent_at":%.6f' % now_s)


class _Planner:
    """Collects (due, bytes) pairs, merging neighbours due at the same moment."""

    __slots__ = ("_at", "_frames", "_parts")

    def __init__(self) -> None:
        self._frames: list[Frame] = []
        self._parts: list[bytes] = []
        self._at = 0.0

    def add(self, at_s: float, data: bytes) -> None:
        if self._parts and at_s != self._at:
            self._frames.append(Frame(self._at, b"".join(self._parts)))
            self._parts = []
        self._at = at_s
        self._parts.append(data)

    def frames(self) -> list[Frame]:
        if self._parts:
            self._frames.append(Frame(self._at, b"".join(self._parts)))
            self._parts = []
        return self._frames


def _message_start(generation: Generation, message_id: str, model: str) -> bytes:
    message: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        # Like the upstream: the prompt is known, the answer has barely begun.
        "usage": {
            "input_tokens": generation.input_tokens,
            "output_tokens": min(1, generation.output_tokens),
        },
    }
    return event("message_start", {"type": "message_start", "message": message})


def _block_start(index: int, block: TextBlock | ToolUseBlock) -> bytes:
    if isinstance(block, TextBlock):
        content: dict[str, Any] = {"type": "text", "text": ""}
    else:
        content = {"type": "tool_use", "id": block.id, "name": block.name, "input": {}}
    payload = {"type": "content_block_start", "index": index, "content_block": content}
    return event("content_block_start", payload)


def _delta_parts(index: int, block: TextBlock | ToolUseBlock) -> tuple[bytes, tuple[str, ...]]:
    """The constant head of each delta event of a block, and the pieces that follow it."""
    head = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
    if isinstance(block, TextBlock):
        return head + b'%d,"delta":{"type":"text_delta","text":' % index, block.tokens
    return head + b'%d,"delta":{"type":"input_json_delta","partial_json":' % index, block.fragments


def _block_stop(index: int) -> bytes:
    return event("content_block_stop", {"type": "content_block_stop", "index": index})


def _message_end(generation: Generation) -> bytes:
    delta = {
        "type": "message_delta",
        "delta": {
            "stop_reason": generation.stop_reason,
            "stop_sequence": generation.stop_sequence,
        },
        "usage": {"output_tokens": generation.output_tokens},
    }
    return event("message_delta", delta) + event("message_stop", {"type": "message_stop"}) + DONE
