"""The official anthropic SDK pointed at the simulator, for text and tools."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

TOOL: dict[str, Any] = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}
MESSAGES: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def sdk(sim_url: str, api_key: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=sim_url, api_key=api_key, max_retries=0) as client:
        yield client


def test_sdk_create_text(sdk: anthropic.Anthropic) -> None:
    """messages.create (POST /v1/messages) parses the simulator's message."""
    message = sdk.messages.create(model="sim-1", max_tokens=100, messages=MESSAGES)
    assert message.stop_reason == "end_turn"
    assert message.content[0].type == "text"
    assert message.content[0].text
    assert message.usage.output_tokens >= 20


def test_sdk_stream_text_matches_create(sdk: anthropic.Anthropic) -> None:
    """messages.stream accumulates the same text as create, [DONE] line included."""
    created = sdk.messages.create(model="sim-1", max_tokens=100, messages=MESSAGES)
    with sdk.messages.stream(model="sim-1", max_tokens=100, messages=MESSAGES) as stream:
        streamed_text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed_text == final.content[0].text == created.content[0].text  # type: ignore[union-attr]
    assert final.usage.output_tokens == created.usage.output_tokens
    assert final.stop_reason == "end_turn"


def test_sdk_tools_create_and_stream(sdk: anthropic.Anthropic) -> None:
    """Tool calls come through create and stream alike, with the required input keys."""
    kwargs: dict[str, Any] = {
        "model": "sim-1",
        "max_tokens": 200,
        "messages": MESSAGES,
        "tools": [TOOL],
    }
    created = sdk.messages.create(**kwargs)
    with sdk.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    for message in (created, final):
        assert message.stop_reason == "tool_use"
        tool_use = message.content[-1]
        assert tool_use.type == "tool_use"
        assert tool_use.name == "get_weather"
        assert "city" in tool_use.input  # type: ignore[operator]
    assert final.content[-1].input == created.content[-1].input  # type: ignore[union-attr]


def test_sdk_sees_api_errors(sdk: anthropic.Anthropic) -> None:
    """A 400 from the simulator becomes the SDK's BadRequestError."""
    with pytest.raises(anthropic.BadRequestError) as raised:
        sdk.messages.create(
            model="sim-1", max_tokens=100, messages=MESSAGES, extra_body={"temperature": 3}
        )
    assert raised.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
