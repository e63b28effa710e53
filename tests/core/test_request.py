"""worker.request: the /messages request validator, its bounds, its error list and its output."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.catalogue import (
    MAX_TOKENS_CAP,
    SEED_MODELS,
    ModelCatalogue,
    ModelSpec,
)
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


def _allowing(*names: str) -> ModelCatalogue:
    """A catalogue with no per-model maximum that allows only ``names``."""
    return ModelCatalogue.build({}, names)


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
    """A model outside the allow list is refused, naming the model and the allowed ones."""
    errors = _errors(_request(model="gpt-4"), catalogue=_allowing("a", "b"))
    assert [e["loc"] for e in errors] == ["model"]
    assert "'gpt-4'" in errors[0]["msg"]
    assert "a, b" in errors[0]["msg"]


def test_allowed_model_is_accepted() -> None:
    """A model in the allow list passes."""
    result = validate_request(_request(model="b"), catalogue=_allowing("a", "b"))
    assert result["model"] == "b"


def test_empty_allowed_models_means_any_model() -> None:
    """With no allow list any well-formed model name passes."""
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
    errors = _errors(request, catalogue=_allowing("deepseek-ai/DeepSeek-V3"))
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


def test_values_that_are_not_json_are_refused_without_a_size_bound() -> None:
    """A Python value JSON cannot hold (a set, an object, bytes, a 100-bit integer) is refused
    at its location, also when no size bound is given, before anything else looks at it."""
    for bad in ({1, 2}, object(), b"x", 2**100):
        errors = _errors(_request(tools=[{**TOOL, "input_schema": {"type": "object", "x": bad}}]))
        assert [e["loc"] for e in errors] == ["tools[0].input_schema.x"]
        assert "not JSON-serialisable" in errors[0]["msg"]
    assert _locs({**BASE, 1: "x"}) == ["(request)"]


# --- strict types --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", True),
        ("max_tokens", False),
        ("max_tokens", "100"),
        ("max_tokens", 16.0),
        ("max_tokens", None),
        ("top_k", "5"),
        ("top_k", True),
        ("top_k", 5.0),
        ("temperature", "0.7"),
        ("temperature", True),
        ("top_p", "0.5"),
        ("top_p", False),
        ("stream", 1),
        ("stream", 0),
        ("stream", "yes"),
        ("stream", "true"),
        ("model", 7),
        ("model", b"deepseek-ai/DeepSeek-V3"),
        ("messages", ({"role": "user", "content": "Hi"},)),
        ("system", 5),
        ("stop_sequences", 7),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_not_coerced(field: str, value: Any) -> None:
    """No bool for a number, no string for a number, no number for a bool, no fraction for
    an integer, no bytes for a string, no tuple for a list: refused at the field."""
    locs = _locs(_request(**{field: value}))
    assert locs
    assert all(loc == field or loc.startswith(f"{field}[") for loc in locs), locs


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", 0.7), ("temperature", 1), ("top_p", 0.7), ("top_p", 1), ("stream", False)],
)
def test_numbers_and_booleans_of_the_right_json_type_pass(field: str, value: Any) -> None:
    """A float or an integer is a number (temperature 1 and 0.7 alike); false is a boolean."""
    assert validate_request(_request(**{field: value}))[field] == value


@pytest.mark.parametrize(
    ("block", "loc"),
    [
        ({"type": "tool_result", "tool_use_id": "t", "is_error": "false"}, "is_error"),
        ({"type": "tool_result", "tool_use_id": "t", "is_error": 0}, "is_error"),
        ({"type": "text", "text": 5}, "text"),
        ({"type": "tool_use", "id": "t", "name": "f", "input": [1]}, "input"),
    ],
)
def test_content_blocks_are_strict_too(block: dict[str, Any], loc: str) -> None:
    """Inside a content block, a boolean, a string and an object must be exactly that."""
    assert _locs(_request(messages=[_message([block])])) == [f"messages[0].content[0].{loc}"]


def test_tool_choice_flag_must_be_a_boolean() -> None:
    """disable_parallel_tool_use is a real boolean."""
    choice = {"type": "auto", "disable_parallel_tool_use": 1}
    locs = _locs(_request(tools=[TOOL], tool_choice=choice))
    assert locs == ["tool_choice.disable_parallel_tool_use"]


@pytest.mark.parametrize("name", ["get_weather\n", "get_weather\n\n", "\nget_weather"])
def test_a_tool_name_with_a_newline_is_refused(name: str) -> None:
    """The tool-name pattern is anchored at the very end (\\Z): no trailing newline slips by."""
    assert _locs(_request(tools=[{**TOOL, "name": name}])) == ["tools[0].name"]


# --- model names and the catalogue -----------------------------------------------------------

#: Two catalogued models, and any other model allowed (ALLOWED_MODELS='', as in the tests'
#: workers): a catalogued model has its maximum, any other the global cap.
CATALOGUE = ModelCatalogue.build(
    {
        "big/model": ModelSpec(max_tokens=32_000, aliases=("big",)),
        "small/model": ModelSpec(max_tokens=4096, context_window=8192),
    },
    allowed=(),
)


@pytest.mark.parametrize(
    "name", [*SEED_MODELS, "a", "x" * 128, "vendor/model:tag@2024-01-01", "gpt_4.1"]
)
def test_well_formed_model_names_pass(name: str) -> None:
    """Names of 1-128 letters, digits and . _ : / @ - pass (the seed's seven among them)."""
    assert validate_request(_request(model=name))["model"] == name


@pytest.mark.parametrize(
    "name", ["", "x" * 129, "a b", "model\n", "model\x00", "модель", "a\tb", "a;b", "a?b=c"]
)
def test_model_names_are_bounded_in_length_and_characters(name: str) -> None:
    """Any other name is refused at model, saying the rule, even when any model is allowed."""
    errors = _errors(_request(model=name))
    assert [e["loc"] for e in errors] == ["model"]
    assert "1-128 characters" in errors[0]["msg"] or name == ""


def test_max_tokens_above_the_models_maximum_is_refused_naming_both_numbers() -> None:
    """max_tokens over the catalogue's maximum for the model is refused at max_tokens, and
    the message names the request's number, the maximum and the model."""
    errors = _errors(_request(model="small/model", max_tokens=4097), catalogue=CATALOGUE)
    assert [e["loc"] for e in errors] == ["max_tokens"]
    assert "4097" in errors[0]["msg"]
    assert "4096" in errors[0]["msg"]
    assert "small/model" in errors[0]["msg"]


def test_max_tokens_at_the_models_maximum_passes() -> None:
    """The maximum itself is allowed."""
    request = _request(model="small/model", max_tokens=4096)
    assert validate_request(request, catalogue=CATALOGUE)["max_tokens"] == 4096


def test_each_model_has_its_own_maximum() -> None:
    """What one model refuses another accepts."""
    request = _request(model="big/model", max_tokens=20_000)
    assert validate_request(request, catalogue=CATALOGUE)["max_tokens"] == 20_000
    assert _locs({**request, "model": "small/model"}, catalogue=CATALOGUE) == ["max_tokens"]


def test_an_alias_is_checked_as_its_model_and_enqueued_under_its_name() -> None:
    """A request naming an alias passes as the model it stands for and comes back with the
    model's name (what the upstream, the limits and the metrics see)."""
    result = validate_request(_request(model="big", max_tokens=32_000), catalogue=CATALOGUE)
    assert result["model"] == "big/model"
    errors = _errors(_request(model="big", max_tokens=32_001), catalogue=CATALOGUE)
    assert "'big' (big/model)" in errors[0]["msg"]


def test_the_default_catalogue_bounds_the_seed_models_at_8192() -> None:
    """With the default settings each seed model's maximum is the seed's example, 8192."""
    from worker.settings import load_settings

    catalogue = load_settings().catalogue
    for model in SEED_MODELS:
        assert validate_request(_request(model=model, max_tokens=8192), catalogue=catalogue)
        assert _locs(_request(model=model, max_tokens=8193), catalogue=catalogue) == ["max_tokens"]


def test_a_model_outside_the_catalogue_is_bounded_by_the_global_cap() -> None:
    """When any model may be named, an unknown model's max_tokens is bounded by the cap only."""
    request = _request(model="unknown/model", max_tokens=MAX_TOKENS_CAP)
    assert validate_request(request, catalogue=CATALOGUE)["max_tokens"] == MAX_TOKENS_CAP
    over = {**request, "max_tokens": MAX_TOKENS_CAP + 1}
    assert _locs(over, catalogue=CATALOGUE) == ["max_tokens"]
    assert _locs({**request, "max_tokens": 10**30}, catalogue=CATALOGUE) == ["max_tokens"]


def test_without_an_allow_list_the_catalogues_models_are_the_allowed_ones() -> None:
    """ALLOWED_MODELS unset: the catalogue's models (and their aliases) are allowed, no other."""
    catalogue = ModelCatalogue.build(CATALOGUE.specs)
    assert validate_request(_request(model="big"), catalogue=catalogue)["model"] == "big/model"
    assert _locs(_request(model="unknown/model"), catalogue=catalogue) == ["model"]


def test_a_bad_model_and_a_bad_max_tokens_are_reported_together() -> None:
    """The allow list's refusal and another field's problem come in the same error."""
    catalogue = ModelCatalogue.build(CATALOGUE.specs, ["small/model"])
    errors = _errors(_request(model="big/model", top_k=99), catalogue=catalogue)
    assert sorted(e["loc"] for e in errors) == ["model", "top_k"]


# --- properties ----------------------------------------------------------------------------

_text = st.text(min_size=1, max_size=20)
_tool_names = st.from_regex(r"[a-zA-Z0-9_-]{1,64}", fullmatch=True)
_model_names = st.from_regex(r"[A-Za-z0-9._:/@-]{1,128}", fullmatch=True)
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
        "model": draw(_model_names),
        "messages": draw(_messages),
        "max_tokens": draw(st.integers(1, MAX_TOKENS_CAP)),
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
    "max_tokens": st.integers(max_value=0) | st.integers(min_value=MAX_TOKENS_CAP + 1),
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


# Values of the wrong JSON type for each typed field: each one alone makes a request invalid.
_WRONG_TYPE: dict[str, st.SearchStrategy[Any]] = {
    "model": st.integers() | st.booleans() | st.none() | st.lists(_model_names, max_size=2),
    "max_tokens": st.booleans()
    | st.integers(1, 100).map(str)
    | st.integers(1, 100).map(float)
    | st.none(),
    "messages": st.text(max_size=5) | st.dictionaries(st.text(max_size=3), st.text(max_size=3)),
    "temperature": st.booleans() | st.floats(0, 2, allow_nan=False).map(str),
    "top_p": st.booleans() | st.floats(0.1, 1, allow_nan=False).map(str),
    "top_k": st.booleans() | st.integers(0, 50).map(str) | st.integers(0, 50).map(float),
    "stream": st.integers() | st.sampled_from(["true", "false", "yes", "1", ""]),
    "system": st.integers() | st.booleans(),
    "tools": st.text(max_size=5) | st.integers(),
}
_BAD_MODEL_NAMES = st.one_of(
    st.just(""),
    st.text(min_size=129, max_size=140, alphabet="ab"),
    st.from_regex(r"[A-Za-z0-9]{1,10}[ \n\t;?#%é\x00][A-Za-z0-9]{0,10}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9]{1,10}", fullmatch=True).map(lambda n: n + "\n"),
)


@st.composite
def invalid_requests(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A valid request made invalid in one known way; returns it and the loc to expect."""
    request = draw(valid_requests())
    kind = draw(st.sampled_from(["wrong_type", "out_of_bound", "unknown", "model", "limit"]))
    if kind == "wrong_type":
        field = draw(st.sampled_from(sorted(_WRONG_TYPE)))
        request[field] = draw(_WRONG_TYPE[field])
        return request, field
    if kind == "out_of_bound":
        field = draw(st.sampled_from(sorted(_OUT_OF_BOUND)))
        request[field] = draw(_OUT_OF_BOUND[field])
        return request, field
    if kind == "unknown":
        name = draw(st.text(min_size=1, max_size=12).filter(lambda n: n not in request))
        name = name if name not in MessagesRequestFields else name + "_x"
        request[name] = draw(st.none() | st.integers() | st.text(max_size=5))
        return request, name
    if kind == "model":
        request["model"] = draw(_BAD_MODEL_NAMES)
        return request, "model"
    request["model"] = "small/model"
    request["max_tokens"] = draw(st.integers(4097, MAX_TOKENS_CAP))
    return request, "max_tokens"


MessagesRequestFields = frozenset(
    {"model", "messages", "max_tokens", "system", "stop_sequences", "stream", "temperature"}
    | {"top_p", "top_k", "tools", "tool_choice"}
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(invalid_requests())
def test_every_invalid_request_is_refused_with_its_location(
    case: tuple[dict[str, Any], str],
) -> None:
    """A request made invalid in any one known way (a wrong JSON type, a value past its
    bound, an unknown field, a malformed model name, max_tokens over the model's maximum) is
    refused, and the refusal names that field among well-formed locations."""
    request, loc = case
    with pytest.raises(RequestInvalid) as info:
        validate_request(request, catalogue=CATALOGUE, max_request_bytes=1_048_576)
    errors = info.value.errors
    assert all(isinstance(e["loc"], str) and e["loc"] and e["msg"] for e in errors), errors
    assert any(e["loc"] == loc or e["loc"].startswith((f"{loc}.", f"{loc}[")) for e in errors), (
        loc,
        errors,
    )


_json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
_json = st.recursive(
    _json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
# Bodies shaped like a request, with any value at any known field; and anything at all.
_request_like = st.dictionaries(
    st.sampled_from(sorted(MessagesRequestFields)) | st.text(max_size=6), _json, max_size=8
)


@st.composite
def perturbed_valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A valid request with a few fields, or nested values, replaced by anything."""
    request = draw(valid_requests())
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from([*sorted(MessagesRequestFields), "extra"]))
        request[field] = draw(_json)
    messages = request.get("messages")
    if draw(st.booleans()) and isinstance(messages, list) and messages:
        message = messages[draw(st.integers(0, len(messages) - 1))]
        if isinstance(message, dict):
            message[draw(st.sampled_from(["role", "content", "x"]))] = draw(_json)
    return request


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_json, _request_like, perturbed_valid_requests(), valid_requests()))
def test_any_body_is_accepted_or_refused_with_locations_never_a_crash(body: Any) -> None:
    """Whatever the body, validation returns a request or raises RequestInvalid whose every
    error has a location and a message; an accepted request validates again to itself."""
    errors: list[dict[str, str]] = []
    try:
        result = validate_request(body, catalogue=CATALOGUE, max_request_bytes=1_048_576)
    except RequestInvalid as exc:
        errors = exc.errors
    if not errors:
        assert validate_request(result, catalogue=CATALOGUE, max_request_bytes=1_048_576) == result
        return
    assert all(isinstance(e["loc"], str) and e["loc"] for e in errors), errors
    assert all(isinstance(e["msg"], str) and e["msg"] for e in errors), errors
