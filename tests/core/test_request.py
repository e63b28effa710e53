"""worker.request: the /messages request validator, its bounds, its error list and its output."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.errors import RequestInvalid
from worker.request import validate_request

BASE: dict[str, Any] = {
    "model": "deepseek-ai/DeepSeek-V3",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "Hi"}],
}
TOOL = {"name": "get_weather", "input_schema": {"type": "object"}}


def _request(**fields: Any) -> dict[str, Any]:
    request = copy.deepcopy(BASE)
    request.update(fields)
    return request


def _errors(data: Any, **kwargs: Any) -> list[dict[str, str]]:
    with pytest.raises(RequestInvalid) as info:
        validate_request(data, **kwargs)
    return info.value.errors


def _locs(data: Any, **kwargs: Any) -> list[str]:
    return [error["loc"] for error in _errors(data, **kwargs)]


def _message(content: Any = "Hi", role: str = "user") -> dict[str, Any]:
    return {"role": role, "content": content}


# --- bounds, both sides ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("messages", [_message()]),
        ("messages", [_message()] * 10),
        ("max_tokens", 1),
        ("temperature", 0),
        ("temperature", 2),
        ("top_p", 0.1),
        ("top_p", 1),
        ("top_k", 0),
        ("top_k", 50),
        ("stop_sequences", "END"),
        ("stop_sequences", ["a", "b"]),
        ("stop_sequences", [f"s{i}" for i in range(16)]),
        ("stream", True),
        ("system", "be brief"),
        ("system", [{"type": "text", "text": "be brief"}]),
    ],
)
def test_value_on_the_bound_is_accepted(field: str, value: Any) -> None:
    """A value on the edge of its allowed range passes and is returned as given."""
    result = validate_request(_request(**{field: value}))
    assert result[field] == value


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("messages", []),
        ("messages", [_message()] * 11),
        ("max_tokens", 0),
        ("max_tokens", -1),
        ("temperature", -0.01),
        ("temperature", 2.01),
        ("top_p", 0.09),
        ("top_p", 1.01),
        ("top_k", -1),
        ("top_k", 51),
        ("stop_sequences", [f"s{i}" for i in range(17)]),
        ("model", ""),
        ("stream", "yes please"),
    ],
)
def test_value_past_the_bound_is_refused_at_its_field(field: str, value: Any) -> None:
    """A value just outside its range raises RequestInvalid with exactly that field's loc."""
    assert _locs(_request(**{field: value})) == [field]


@pytest.mark.parametrize("field", ["model", "messages", "max_tokens"])
def test_required_field_missing_is_refused(field: str) -> None:
    """model, messages and max_tokens are required; a missing one is named."""
    request = _request()
    del request[field]
    errors = _errors(request)
    assert [e["loc"] for e in errors] == [field]
    assert "required" in errors[0]["msg"].lower()


@pytest.mark.parametrize("role", ["user", "assistant", "system"])
def test_known_roles_are_accepted(role: str) -> None:
    """A message role may be user, assistant or system."""
    assert validate_request(_request(messages=[_message(role=role)]))["messages"][0]["role"] == role


@pytest.mark.parametrize("role", ["tool", "User", "", None])
def test_other_roles_are_refused(role: Any) -> None:
    """Any other role is refused at messages[i].role."""
    messages = [_message(), _message(role=role)]
    assert _locs(_request(messages=messages)) == ["messages[1].role"]


# --- content -------------------------------------------------------------------------------

BLOCKS: list[dict[str, Any]] = [
    {"type": "text", "text": "hello"},
    {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
    },
    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C"},
    {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": [{"type": "text", "text": "18 C"}],
        "is_error": False,
    },
    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
]


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b["type"])
def test_each_content_block_type_is_accepted_and_kept(block: dict[str, Any]) -> None:
    """Every documented content block type validates and comes back unchanged."""
    result = validate_request(_request(messages=[_message([block])]))
    assert result["messages"][0]["content"] == [block]


def test_all_block_types_in_one_message_are_accepted() -> None:
    """A content list may mix block types."""
    result = validate_request(_request(messages=[_message(BLOCKS)]))
    assert result["messages"][0]["content"] == BLOCKS


@pytest.mark.parametrize("content", ["", [], None, 42, {"type": "text", "text": "x"}])
def test_empty_or_malformed_content_is_refused(content: Any) -> None:
    """content must be a non-empty string or a non-empty list of blocks."""
    locs = _locs(_request(messages=[_message(content)]))
    assert locs
    assert all(loc.startswith("messages[0].content") for loc in locs)


@pytest.mark.parametrize(
    "block",
    [
        {"type": "video", "url": "x"},
        {"text": "no type"},
        {"type": "text"},
        {"type": "tool_use", "id": "", "name": "f", "input": {}},
        {"type": "tool_use", "id": "t", "name": "bad name", "input": {}},
        {"type": "tool_result"},
        {"type": "thinking", "thinking": "x"},
    ],
)
def test_malformed_content_block_is_refused(block: dict[str, Any]) -> None:
    """A block of unknown type or missing its required fields is refused inside content."""
    locs = _locs(_request(messages=[_message([block])]))
    assert locs
    assert all(loc.startswith("messages[0].content") for loc in locs)


# --- unknown fields ------------------------------------------------------------------------


def test_unknown_top_level_field_is_named() -> None:
    """An unknown top-level field is refused with a message that names it."""
    errors = _errors(_request(temprature=0.5))
    assert errors == [{"loc": "temprature", "msg": "unknown field 'temprature' is not allowed"}]


@pytest.mark.parametrize("name", ["anthropic-beta", "str", "list[int]"])
def test_unknown_field_with_any_name_is_named(name: str) -> None:
    """An unknown field whose name looks like a pydantic union tag is still named, not a crash."""
    errors = _errors(_request(**{name: 1}))
    assert errors == [{"loc": name, "msg": f"unknown field {name!r} is not allowed"}]


def test_unknown_field_in_a_message_is_named() -> None:
    """An unknown key beside role/content is refused at the message's loc."""
    messages = [{"role": "user", "content": "Hi", "name": "bob"}]
    errors = _errors(_request(messages=messages))
    assert errors == [{"loc": "messages[0].name", "msg": "unknown field 'name' is not allowed"}]


def test_unknown_field_in_a_content_block_is_refused() -> None:
    """An unknown key inside a content block is refused and named."""
    block = {"type": "text", "text": "Hi", "colour": "red"}
    errors = _errors(_request(messages=[_message([block])]))
    assert any("unknown field 'colour'" in e["msg"] for e in errors)


def test_unknown_field_in_a_content_block_has_the_blocks_loc() -> None:
    """The loc of an unknown block field is the block path plus the field, without union tags."""
    block = {"type": "text", "text": "Hi", "colour": "red"}
    locs = _locs(_request(messages=[_message([block])]))
    assert "messages[0].content[0].colour" in locs


@pytest.mark.parametrize(
    ("field", "value", "loc"),
    [
        (
            "messages",
            [_message([{"type": "text", "text": "Hi", "colour": "red"}])],
            "messages[0].content[0].colour",
        ),
        ("stop_sequences", ["a", ""], "stop_sequences[1]"),
    ],
)
def test_one_bad_item_in_a_union_list_is_one_error(field: str, value: Any, loc: str) -> None:
    """One bad item in a string-or-list field yields one entry, not one per union member."""
    assert _locs(_request(**{field: value})) == [loc]


# --- stop_sequences, tools and tool_choice -----------------------------------------------


@pytest.mark.parametrize("value", ["", [""], ["ok", ""], [1], 7])
def test_bad_stop_sequences_are_refused(value: Any) -> None:
    """stop_sequences is a non-empty string or a list of non-empty strings."""
    locs = _locs(_request(stop_sequences=value))
    assert locs
    assert all(loc.startswith("stop_sequences") for loc in locs)


@pytest.mark.parametrize("name", ["a", "get_weather", "A-b_9", "x" * 64])
def test_tool_names_matching_the_pattern_are_accepted(name: str) -> None:
    """A tool name of 1-64 letters, digits, '_' or '-' is accepted."""
    tool = {"name": name, "description": "d", "input_schema": {"type": "object"}}
    assert validate_request(_request(tools=[tool]))["tools"] == [tool]


@pytest.mark.parametrize("name", ["", "has space", "dot.ted", "x" * 65, "é"])
def test_tool_names_off_the_pattern_are_refused(name: str) -> None:
    """Any other tool name is refused at tools[i].name."""
    assert _locs(_request(tools=[{**TOOL, "name": name}])) == ["tools[0].name"]


def test_tool_input_schema_must_be_an_object_schema() -> None:
    """input_schema.type must be "object"."""
    tool = {"name": "f", "input_schema": {"type": "array"}}
    assert _locs(_request(tools=[tool])) == ["tools[0].input_schema.type"]


def test_tool_input_schema_keeps_the_users_schema_verbatim() -> None:
    """Extra JSON-schema keywords in input_schema are allowed and returned unchanged."""
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
        "$defs": {"x": {"type": "integer"}},
    }
    tool = {"name": "f", "input_schema": schema}
    assert validate_request(_request(tools=[tool]))["tools"][0]["input_schema"] == schema


def test_unknown_field_in_a_tool_is_refused() -> None:
    """A tool is strict: an unknown key is named."""
    assert _locs(_request(tools=[{**TOOL, "parameters": {}}])) == ["tools[0].parameters"]


@pytest.mark.parametrize(
    "choice",
    [
        {"type": "auto"},
        {"type": "any"},
        {"type": "none"},
        {"type": "tool", "name": "get_weather"},
        {"type": "auto", "disable_parallel_tool_use": True},
    ],
)
def test_tool_choice_types_with_tools_are_accepted(choice: dict[str, Any]) -> None:
    """auto, any, none and tool (naming a known tool) are accepted when tools are given."""
    assert validate_request(_request(tools=[TOOL], tool_choice=choice))["tool_choice"] == choice


@pytest.mark.parametrize("choice", [{"type": "auto"}, {"type": "none"}])
def test_tool_choice_auto_or_none_needs_no_tools(choice: dict[str, Any]) -> None:
    """auto and none are meaningful without tools."""
    assert validate_request(_request(tool_choice=choice))["tool_choice"] == choice


@pytest.mark.parametrize(
    ("tools", "choice", "loc"),
    [
        ([TOOL], {"type": "required"}, "tool_choice.type"),
        ([TOOL], {"type": "tool"}, "tool_choice.name"),
        ([TOOL], {"type": "tool", "name": "other_tool"}, "tool_choice.name"),
        (None, {"type": "any"}, "tool_choice"),
        (None, {"type": "tool", "name": "get_weather"}, "tool_choice"),
        ([TOOL], {"type": "auto", "extra": 1}, "tool_choice.extra"),
    ],
)
def test_bad_tool_choice_is_refused(tools: Any, choice: dict[str, Any], loc: str) -> None:
    """tool_choice: known type, 'tool' names a declared tool, 'any'/'tool' need tools."""
    request = _request(tool_choice=choice)
    if tools is not None:
        request["tools"] = tools
    assert loc in _locs(request)


# --- request-level checks ------------------------------------------------------------------


@pytest.mark.parametrize("data", [None, "{}", ["model"], 42, b"{}"])
def test_non_object_input_is_refused(data: Any) -> None:
    """Anything but a mapping is refused with one (request)-level error."""
    errors = _errors(data)
    assert errors == [{"loc": "(request)", "msg": "a request must be a JSON object"}]


def test_request_over_the_size_bound_is_refused_clearly() -> None:
    """A request larger than max_request_bytes is refused with its size and the limit."""
    request = _request(messages=[_message("x" * 2000)])
    errors = _errors(request, max_request_bytes=1000)
    assert [e["loc"] for e in errors] == ["(request)"]
    assert "over the limit of 1000" in errors[0]["msg"]
    assert "bytes" in errors[0]["msg"]


def test_request_under_the_size_bound_is_accepted() -> None:
    """A request within max_request_bytes passes."""
    assert validate_request(_request(), max_request_bytes=10_000) == BASE


def test_size_error_is_listed_with_the_other_errors() -> None:
    """An oversized request that is also invalid reports both problems at once."""
    request = _request(messages=[_message("x" * 2000)], max_tokens=0)
    assert sorted(_locs(request, max_request_bytes=1000)) == ["(request)", "max_tokens"]


def test_allowed_models_are_enforced() -> None:
    """A model outside allowed_models is refused, naming the model."""
    errors = _errors(_request(model="gpt-4"), allowed_models=("a", "b"))
    assert [e["loc"] for e in errors] == ["model"]
    assert "'gpt-4'" in errors[0]["msg"]


def test_allowed_model_is_accepted() -> None:
    """A model in allowed_models passes."""
    result = validate_request(_request(model="b"), allowed_models=["a", "b"])
    assert result["model"] == "b"


def test_empty_allowed_models_means_any_model() -> None:
    """With no allowed_models any non-empty model name passes."""
    assert validate_request(_request(model="anything/at-all"))["model"] == "anything/at-all"


def test_one_error_lists_every_bad_field() -> None:
    """Five independent problems give five entries, each at its own loc."""
    request = {
        "model": "not-allowed",
        "max_tokens": 0,
        "messages": [{"role": "robot", "content": "Hi"}],
        "temperature": 3,
        "top_k": 99,
    }
    errors = _errors(request, allowed_models=["deepseek-ai/DeepSeek-V3"])
    assert sorted(e["loc"] for e in errors) == sorted(
        ["model", "max_tokens", "messages[0].role", "temperature", "top_k"]
    )
    assert all(e["msg"] for e in errors)


def test_error_message_lists_every_loc() -> None:
    """str(RequestInvalid) counts the errors and names each loc."""
    with pytest.raises(RequestInvalid) as info:
        validate_request(_request(max_tokens=0, top_k=99))
    text = str(info.value)
    assert "2 errors" in text
    assert "max_tokens" in text
    assert "top_k" in text
    assert isinstance(info.value, ValueError)


def test_output_drops_unset_fields_and_keeps_set_ones() -> None:
    """The result has exactly the keys given, including explicit nulls, and no defaults."""
    request = _request(stream=False, system=None)
    result = validate_request(request)
    assert result == request
    assert "temperature" not in result
    assert "tools" not in result


def test_input_is_not_mutated() -> None:
    """Validation does not change the caller's dict."""
    request = _request(messages=[_message(copy.deepcopy(BLOCKS))], tools=[TOOL])
    before = copy.deepcopy(request)
    validate_request(request)
    assert request == before


# --- properties ----------------------------------------------------------------------------

_text = st.text(min_size=1, max_size=20)
_tool_names = st.from_regex(r"[a-zA-Z0-9_-]{1,64}", fullmatch=True)
_json_scalars = st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=10)
_small_dicts = st.dictionaries(st.text(max_size=8), _json_scalars, max_size=3)

_blocks = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
    st.fixed_dictionaries(
        {
            "type": st.just("image"),
            "source": st.fixed_dictionaries(
                {"type": st.just("base64"), "media_type": st.just("image/png"), "data": _text}
            ),
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("tool_use"), "id": _text, "name": _tool_names, "input": _small_dicts}
    ),
    st.fixed_dictionaries(
        {"type": st.just("tool_result"), "tool_use_id": _text},
        optional={"content": st.text(max_size=20), "is_error": st.booleans()},
    ),
    st.fixed_dictionaries(
        {"type": st.just("thinking"), "thinking": st.text(max_size=20), "signature": _text}
    ),
)
_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system"]),
            "content": _text | st.lists(_blocks, min_size=1, max_size=3),
        }
    ),
    min_size=1,
    max_size=10,
)
_tools = st.lists(
    st.fixed_dictionaries(
        {
            "name": _tool_names,
            "input_schema": st.fixed_dictionaries(
                {"type": st.just("object")},
                optional={"properties": st.dictionaries(_text, st.just({"type": "string"}))},
            ),
        },
        optional={"description": st.text(max_size=20)},
    ),
    min_size=1,
    max_size=3,
)


def _float_or_int(low: float, high: float) -> st.SearchStrategy[float]:
    ints = st.integers(int(-(-low // 1)), int(high // 1))
    return st.floats(low, high, allow_nan=False) | ints


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A request with every field inside its bounds; optional fields present or not."""
    request: dict[str, Any] = {
        "model": draw(_text),
        "messages": draw(_messages),
        "max_tokens": draw(st.integers(1, 1_000_000)),
    }
    optional: dict[str, st.SearchStrategy[Any]] = {
        "system": st.text(max_size=20)
        | st.lists(
            st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}),
            min_size=1,
            max_size=2,
        ),
        "stop_sequences": _text | st.lists(_text, max_size=16),
        "stream": st.booleans(),
        "temperature": _float_or_int(0, 2),
        "top_p": _float_or_int(0.1, 1),
        "top_k": st.integers(0, 50),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            request[name] = draw(strategy)
    if draw(st.booleans()):
        tools = draw(_tools)
        request["tools"] = tools
        if draw(st.booleans()):
            kind = draw(st.sampled_from(["auto", "any", "tool", "none"]))
            choice: dict[str, Any] = {"type": kind}
            if kind == "tool":
                choice["name"] = draw(st.sampled_from([t["name"] for t in tools]))
            request["tool_choice"] = choice
    return request


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(valid_requests())
def test_valid_requests_validate_and_round_trip(request: dict[str, Any]) -> None:
    """Any request inside every bound validates and comes back equal to the input."""
    assert validate_request(request, max_request_bytes=1_048_576) == request


_OUT_OF_BOUND: dict[str, st.SearchStrategy[Any]] = {
    "messages": st.just([]) | st.lists(st.just(_message()), min_size=11, max_size=15),
    "max_tokens": st.integers(max_value=0),
    "temperature": st.floats(max_value=0, exclude_max=True, allow_nan=False)
    | st.floats(min_value=2, exclude_min=True, allow_nan=False),
    "top_p": st.floats(max_value=0.1, exclude_max=True, allow_nan=False)
    | st.floats(min_value=1, exclude_min=True, allow_nan=False),
    "top_k": st.integers(max_value=-1) | st.integers(min_value=51),
    "stop_sequences": st.lists(_text, min_size=17, max_size=20),
    "model": st.just(""),
}


@st.composite
def one_field_out_of_bounds(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A valid request with one bounded field pushed outside its bound."""
    request = draw(valid_requests())
    field = draw(st.sampled_from(sorted(_OUT_OF_BOUND)))
    request[field] = draw(_OUT_OF_BOUND[field])
    return request, field


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(one_field_out_of_bounds())
def test_one_field_out_of_bounds_is_refused_at_that_field(case: tuple[dict[str, Any], str]) -> None:
    """Pushing any one bounded field past its bound raises RequestInvalid at that field."""
    request, field = case
    with pytest.raises(RequestInvalid) as info:
        validate_request(request)
    assert field in [e["loc"] for e in info.value.errors]
