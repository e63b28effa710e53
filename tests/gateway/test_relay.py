"""The gateway's relay from job events to an Anthropic stream, resumed with Last-Event-ID."""

from __future__ import annotations

from typing import Any

import orjson

from worker import events as ev
from worker.gateway.relay import AnthropicRelay

MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "m",
    "content": [{"type": "text", "text": "hi"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 1, "output_tokens": 1},
}


def _event(seq: int, type_: str, **fields: Any) -> dict[str, Any]:
    return {**ev.make_event("job", seq, 1, type_, **fields), "stream_id": f"{seq}-0"}


def _kinds(frames: list[bytes]) -> list[str]:
    return [
        orjson.loads(line[6:])["type"]
        for frame in frames
        for line in frame.split(b"\n")
        if line.startswith(b"data: ")
    ]


def test_a_fresh_stream_replays_a_completed_message_and_hides_an_early_retry() -> None:
    relay = AnthropicRelay("job")
    assert list(relay.feed(_event(2, ev.RETRY, reason="http_529"))) == []
    kinds = _kinds(list(relay.feed(_event(3, ev.COMPLETED, message=MESSAGE))))
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"


def test_a_resumed_stream_ends_with_an_error_at_a_retry() -> None:
    """The client holds chunks from before its Last-Event-ID: a retry voids them."""
    relay = AnthropicRelay("job", sent_output=True)
    assert _kinds(list(relay.feed(_event(5, ev.RETRY, reason="http_529")))) == ["error"]
    assert relay.done


def test_a_resumed_stream_does_not_replay_the_message_at_completion() -> None:
    relay = AnthropicRelay("job", sent_output=True)
    assert list(relay.feed(_event(9, ev.COMPLETED, message=MESSAGE))) == []
    assert relay.done
