"""The ``/messages`` request, validated before anything is enqueued (and again by the worker).

Mirrors the upstream's documented body (``model``, ``messages``, ``max_tokens``, ``system``,
``stop_sequences``, ``stream``, ``temperature``, ``top_p``, ``top_k``, ``tools``,
``tool_choice``) with Anthropic's content blocks. Unknown fields are rejected by name, a
request over ``max_request_bytes`` is rejected, and every problem is reported at once in one
:class:`~worker.errors.RequestInvalid`.

Types are strict, as JSON has them: a number is never a string or a boolean (``true`` is not
``max_tokens: 1``), an integer is never a fraction, ``stream`` is a real boolean, a list is a
list. The model is checked against the catalogue (:mod:`worker.catalogue`): its name's form,
the allow list, and ``max_tokens`` against the model's maximum; an alias comes back as its
model's name. Every bound is listed in ``docs/bounds.md``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from worker.catalogue import MAX_TOKENS_CAP, MODEL_NAME_PATTERN, ModelCatalogue, ModelName
from worker.errors import RequestInvalid

TOOL_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}\Z")
MAX_STOP_SEQUENCES = 16
MAX_MESSAGES = 10


def _tool_name(value: str) -> str:
    if not TOOL_NAME_PATTERN.match(value):
        raise ValueError("a tool name must be 1-64 characters of letters, digits, '_' or '-'")
    return value


NonEmptyStr = Annotated[str, Field(min_length=1)]
ToolName = Annotated[str, AfterValidator(_tool_name)]
#: Any catalogue: no allow list, no per-model maximum (the global cap still holds).
ANY_MODEL = ModelCatalogue()


class _Strict(BaseModel):
    # strict: no coercion (a string is not a number, 1 is not True, a tuple is not a list).
    model_config = ConfigDict(extra="forbid", strict=True)


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None
    citations: list[dict[str, Any]] | None = None


class ImageBlock(_Strict):
    type: Literal["image"]
    source: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: NonEmptyStr
    name: ToolName
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: NonEmptyStr
    content: str | list[TextBlock | ImageBlock] | None = None
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None


class ThinkingBlock(_Strict):
    type: Literal["thinking"]
    thinking: str
    signature: str


class RedactedThinkingBlock(_Strict):
    type: Literal["redacted_thinking"]
    data: str


ContentBlock = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class Message(_Strict):
    role: Literal["user", "assistant", "system"]
    content: NonEmptyStr | Annotated[list[ContentBlock], Field(min_length=1)]


class InputSchema(BaseModel):
    # A JSON schema: only ``type`` is fixed; the rest is the user's schema, kept verbatim.
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["object"]
    properties: dict[str, Any] | None = None
    required: list[str] | None = None


class Tool(_Strict):
    name: ToolName
    description: str | None = None
    input_schema: InputSchema
    cache_control: dict[str, Any] | None = None


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: ToolName | None = None
    disable_parallel_tool_use: bool | None = None


class MessagesRequest(_Strict):
    """One ``POST /messages`` body."""

    model: ModelName
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_CAP)]
    system: str | Annotated[list[TextBlock], Field(min_length=1)] | None = None
    stop_sequences: (
        NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP_SEQUENCES)] | None
    ) = None
    stream: bool | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0.1, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0, le=50)] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None


def _loc(parts: Iterable[int | str]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(request)"


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "constrained-str"})


def _tag_like(part: str) -> bool:
    return "[" in part or "-" in part or part in _TYPE_TAGS


def _branch_matches(tag: str, value: Any) -> bool:
    if tag.startswith("list"):
        return isinstance(value, list)
    if tag in {"str", "constrained-str"}:
        return isinstance(value, str)
    return True


def _clean(data: Any, loc: tuple[int | str, ...]) -> tuple[str, str | None, bool]:
    """Drop pydantic's union-member tags from ``loc`` by walking the input alongside it.

    Returns the user-facing location, the location of the union (if one was crossed), and
    whether the error belongs to the union member that matches the input's type.
    """
    current: Any = data
    out: list[int | str] = []
    tagged: set[int] = set()
    union_at: str | None = None
    matches = True
    for part in loc:
        if isinstance(part, int):
            out.append(part)
            current = current[part] if isinstance(current, list) and part < len(current) else None
        elif (
            isinstance(current, dict) and current.get("type") == part and id(current) not in tagged
        ):
            tagged.add(id(current))  # the discriminator's tag of a content block
        elif isinstance(current, dict) and part in current:
            out.append(part)
            current = current[part]
        elif not isinstance(current, dict) and _tag_like(part):
            union_at = union_at or _loc(out)
            matches = matches and _branch_matches(part, current)
        else:
            out.append(part)
            current = None
    return _loc(out), union_at, matches


def _not_json_at(data: Any) -> tuple[int | str, ...]:
    """The path of the first value JSON cannot hold (empty when it is the nesting itself)."""
    stack: list[tuple[tuple[int | str, ...], Any]] = [((), data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    return path
                stack.append(((*path, key), item))
        elif isinstance(value, list | tuple):
            stack.extend(((*path, index), item) for index, item in enumerate(value))
        elif isinstance(value, int) and not isinstance(value, bool):
            if not -(2**63) <= value < 2**64:
                return path
        elif value is not None and not isinstance(value, str | float | bool):
            return path
    return ()


def _collect(exc: ValidationError, data: Any) -> list[dict[str, str]]:
    """One entry per bad field. Of a union's complaints, those of the member that matches the
    input's type are kept (a list's errors for a list); when none matches, all are joined."""
    entries = []
    for error in exc.errors():
        loc, union_at, matches = _clean(data, error["loc"])
        if error["type"] == "extra_forbidden":
            msg = f"unknown field {error['loc'][-1]!r} is not allowed"
        else:
            msg = str(error["msg"]).removeprefix("Value error, ")
        entries.append((loc, msg, union_at, matches))
    matched_unions = {u for _l, _m, u, ok in entries if u is not None and ok}
    by_loc: dict[str, list[str]] = {}
    for loc, msg, union_at, matches in entries:
        if not matches and union_at in matched_unions:
            continue
        messages = by_loc.setdefault(loc, [])
        if msg not in messages:
            messages.append(msg)
    return [{"loc": loc, "msg": "; or ".join(msgs)} for loc, msgs in by_loc.items()]


def validate_request(
    data: Any,
    *,
    catalogue: ModelCatalogue = ANY_MODEL,
    max_request_bytes: int | None = None,
) -> dict[str, Any]:
    """Check one request; return it as plain JSON data without unset fields, an alias of a
    model replaced by the model's name.

    Raises :class:`RequestInvalid` listing every problem, each with its location.
    """
    if not isinstance(data, Mapping):
        raise RequestInvalid([{"loc": "(request)", "msg": "a request must be a JSON object"}])
    errors: list[dict[str, str]] = []
    try:
        # Always: what is not JSON (a set, an object, a non-string key, a huge integer,
        # nesting past orjson's depth) never reaches the model, the queue or the upstream.
        size = len(orjson.dumps(data))
    except TypeError as exc:
        where = _not_json_at(data)
        raise RequestInvalid(
            [{"loc": _loc(where) if where else "(request)", "msg": f"not JSON-serialisable: {exc}"}]
        ) from None
    if max_request_bytes is not None and size > max_request_bytes:
        errors.append(
            {
                "loc": "(request)",
                "msg": f"request is {size} bytes, over the limit of {max_request_bytes}",
            }
        )
    try:
        parsed = MessagesRequest.model_validate(dict(data))
    except ValidationError as exc:
        errors.extend(_collect(exc, data))
        parsed = None
    errors.extend(_model_errors(data, catalogue))
    if parsed is not None:
        errors.extend(_tool_choice_errors(parsed))
    if errors or parsed is None:
        raise RequestInvalid(errors)
    result: dict[str, Any] = parsed.model_dump(mode="json", exclude_unset=True)
    result["model"] = catalogue.canonical(result["model"])
    return result


def _model_errors(data: Mapping[str, Any], catalogue: ModelCatalogue) -> list[dict[str, str]]:
    """The allow list and the model's max_tokens maximum, checked on the raw input so that
    they are reported beside every other problem. A malformed name or max_tokens has its own
    error already."""
    model, max_tokens = data.get("model"), data.get("max_tokens")
    if not isinstance(model, str) or not MODEL_NAME_PATTERN.match(model):
        return []
    if not catalogue.allows(model):
        return [
            {"loc": "model", "msg": f"model {model!r} is not one of {catalogue.allowed_text()}"}
        ]
    limit = catalogue.max_tokens(model)
    # type() is int: a bool is an int subclass, and it has its own error already.
    if type(max_tokens) is int and limit < max_tokens <= MAX_TOKENS_CAP:
        canonical = catalogue.canonical(model)
        named = repr(model) if canonical == model else f"{model!r} ({canonical})"
        return [
            {
                "loc": "max_tokens",
                "msg": f"max_tokens {max_tokens} is above the maximum of {limit} for model {named}",
            }
        ]
    return []


def _tool_choice_errors(parsed: MessagesRequest) -> list[dict[str, str]]:
    choice = parsed.tool_choice
    if choice is None:
        return []
    errors = []
    if choice.type == "tool" and not choice.name:
        errors.append(
            {"loc": "tool_choice.name", "msg": "required when tool_choice.type is 'tool'"}
        )
    if choice.type in {"any", "tool"} and not parsed.tools:
        errors.append({"loc": "tool_choice", "msg": "needs tools"})
    names = {tool.name for tool in parsed.tools or []}
    if choice.name and choice.name not in names:
        errors.append({"loc": "tool_choice.name", "msg": f"no tool named {choice.name!r}"})
    return errors
