"""Pure tests of deterministic generation, directives and schema-driven tool input."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.simulator.textgen import (
    VOCABULARY,
    DirectiveError,
    TextBlock,
    ToolUseBlock,
    generate,
    parse_directives,
    schema_value,
    split_json,
)

WEATHER_TOOL = {
    "name": "get_weather",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "metric": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "where": {"type": "object", "properties": {"lat": {"type": "number"}}},
            "unit": {"enum": ["c", "f"]},
        },
        "required": ["city", "extra_required"],
    },
}


def request(text: str = "Hi", **extra: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "max_tokens": 1000,
        "messages": [{"role": "user", "content": text}],
    } | extra


def text_of(generation: Any) -> str:
    return "".join(b.text for b in generation.blocks if isinstance(b, TextBlock))


def test_same_request_same_answer() -> None:
    """The same seed and request always give the same text and usage."""
    assert generate(0, request()) == generate(0, request())


def test_seed_and_prompt_change_the_answer() -> None:
    """A different seed or a different prompt gives a different answer."""
    base = text_of(generate(0, request()))
    assert text_of(generate(1, request())) != base
    assert text_of(generate(0, request("Hi!"))) != base


def test_natural_length_is_within_config_range() -> None:
    """Without caps or directives the answer has min..max tokens and ends the turn."""
    for n in range(30):
        generation = generate(n, request(), min_tokens=5, max_tokens=9)
        assert 5 <= generation.output_tokens <= 9
        assert generation.stop_reason == "end_turn"
        assert all(t.endswith(" ") and t[:-1] in VOCABULARY for t in generation.blocks[0].tokens)


def test_max_tokens_cuts_the_answer() -> None:
    """An answer longer than max_tokens stops there with stop_reason max_tokens."""
    generation = generate(0, request("[[sim tokens=50]]", max_tokens=7))
    assert (generation.stop_reason, generation.output_tokens) == ("max_tokens", 7)


def test_stop_sequence_cuts_before_the_match() -> None:
    """A stop sequence found in the text cuts just before it and is reported."""
    full = text_of(generate(0, request("[[sim tokens=40]]")))
    word = full.split(" ")[5]
    stop = word[1:] + " " if len(word) > 1 else word + " "
    generation = generate(0, request("[[sim tokens=40]]", stop_sequences=["zzz", stop]))
    assert generation.stop_reason == "stop_sequence"
    assert generation.stop_sequence == stop
    assert full.startswith(text_of(generation))
    assert full[len(text_of(generation)) :].startswith(stop)
    assert stop not in text_of(generation)


def test_stop_sequence_as_plain_string() -> None:
    """stop_sequences may be a single string, as the upstream's docs show."""
    full = text_of(generate(3, request("[[sim tokens=40]]")))
    stop = full.split(" ")[2]
    generation = generate(3, request("[[sim tokens=40]]", stop_sequences=stop))
    assert generation.stop_sequence == stop


def test_directives_are_parsed_from_last_user_message() -> None:
    """[[sim ...]] in the last user message sets tokens, ttft_ms, tps and extras."""
    messages = [
        {"role": "user", "content": "[[sim tokens=1]]"},
        {"role": "assistant", "content": "ok"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "go [[sim tokens=4 ttft_ms=5 tps=2.5 fault=x]]"}],
        },
    ]
    directives = parse_directives(messages)
    assert (directives.tokens, directives.ttft_ms, directives.tps) == (4, 5.0, 2.5)
    assert directives.extra == {"fault": "x"}
    assert generate(0, {"model": "m", "max_tokens": 99, "messages": messages}).output_tokens == 4


@pytest.mark.parametrize("directive", ["[[sim tokens]]", "[[sim tokens=-1]]", "[[sim tps=fast]]"])
def test_bad_directive_raises(directive: str) -> None:
    """A malformed directive is an error, not silently ignored."""
    with pytest.raises(DirectiveError):
        parse_directives([{"role": "user", "content": directive}])


def test_tool_use_input_fits_the_schema() -> None:
    """With tools the answer is text then tool_use; the input has every required key."""
    generation = generate(0, request(tools=[WEATHER_TOOL]))
    assert generation.stop_reason == "tool_use"
    assert isinstance(generation.blocks[0], TextBlock)
    tool = generation.blocks[-1]
    assert isinstance(tool, ToolUseBlock)
    assert tool.name == "get_weather"
    assert tool.id.startswith("toolu_")
    assert {"city", "extra_required", "days", "metric", "tags", "where", "unit"} <= set(tool.input)
    assert 1 <= tool.input["days"] <= 7
    assert tool.input["unit"] in ("c", "f")
    assert orjson.loads("".join(tool.fragments)) == tool.input


def test_forced_tool_has_no_text_and_none_disables_tools() -> None:
    """tool_choice tool/any gives a lone tool_use; tool_choice none gives plain text."""
    forced = generate(
        0, request(tools=[WEATHER_TOOL], tool_choice={"type": "tool", "name": "get_weather"})
    )
    assert [type(b) for b in forced.blocks] == [ToolUseBlock]
    plain = generate(0, request(tools=[WEATHER_TOOL], tool_choice={"type": "none"}))
    assert plain.stop_reason == "end_turn"


def test_split_json_keeps_every_character() -> None:
    """JSON fragments are several and concatenate back to the whole text."""
    encoded = '{"a":"café 日本","b":[1,2]}'
    pieces = split_json(random.Random(1), encoded)
    assert len(pieces) >= 2
    assert "".join(pieces) == encoded


def test_schema_value_tolerates_odd_schemas() -> None:
    """Unknown, nullable and deeply nested schemas still give JSON-able values."""
    rng = random.Random(0)
    assert isinstance(schema_value(rng, {"type": ["null", "integer"]}, 0), int)
    nested: dict[str, Any] = {"type": "object", "properties": {}}
    nested["properties"]["self"] = nested
    orjson.dumps(schema_value(rng, nested, 0))
    assert isinstance(schema_value(rng, "nonsense", 0), str)


@settings(max_examples=200, deadline=None)
@given(
    max_tokens=st.integers(min_value=1, max_value=300),
    tokens=st.none() | st.integers(min_value=0, max_value=400),
    seed=st.integers(min_value=0, max_value=2**32),
    with_tools=st.booleans(),
    stop=st.none() | st.sampled_from(VOCABULARY),
)
def test_output_never_exceeds_max_tokens(
    max_tokens: int, tokens: int | None, seed: int, with_tools: bool, stop: str | None
) -> None:
    """For any max_tokens >= 1, output_tokens <= max_tokens and tokens match the text."""
    text = "q" if tokens is None else f"q [[sim tokens={tokens}]]"
    extra: dict[str, Any] = {"max_tokens": max_tokens}
    if with_tools:
        extra["tools"] = [WEATHER_TOOL]
    if stop is not None:
        extra["stop_sequences"] = [stop]
    generation = generate(seed, request(text, **extra))
    assert 0 <= generation.output_tokens <= max_tokens
    assert generation.input_tokens >= 1
    if generation.stop_reason == "stop_sequence":
        assert stop is not None
        assert stop not in text_of(generation)
    if not with_tools and generation.stop_reason != "stop_sequence":
        assert len(generation.blocks[0].tokens) == generation.output_tokens
