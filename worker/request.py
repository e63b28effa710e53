"""The ``/messages`` request, validated before anything is enqueued (and again by the worker).

Mirrors the upstream's documented body (``model``, ``messages``, ``max_tokens``, ``system``,
``stop_sequences``, ``stream``, ``temperature``, ``top_p``, ``top_k``, ``tools``,
``tool_choice``) with Anthropic's content blocks. Unknown fields are rejected by name, a
request over ``max_request_bytes`` is rejected, and every problem is reported at once in one
:class:`~worker.errors.RequestInvalid`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.errors import RequestInvalid

NonEmptyStr = Annotated[str, Field(min_length=1)]
ToolName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    model_config = ConfigDict(extra="allow")

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

    model: NonEmptyStr
    messages: Annotated[list[Message], Field(min_length=1, max_length=10)]
    max_tokens: Annotated[int, Field(ge=1)]
    system: str | Annotated[list[TextBlock], Field(min_length=1)] | None = None
    stop_sequences: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=16)] | None = None
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


def _collect(exc: ValidationError, data: Any) -> list[dict[str, str]]:
    """One entry per bad field. Of a union's complaints, those of the member that matches the
    input's type are kept (a list's errors for a list); when none matches, all are joined."""
    entries = []
    for error in exc.errors():
        loc, union_at, matches = _clean(data, error["loc"])
        if error["type"] == "extra_forbidden":
            msg = f"unknown field {error['loc'][-1]!r} is not allowed"
        else:
            msg = str(error["msg"])
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
    allowed_models: Iterable[str] = (),
    max_request_bytes: int | None = None,
) -> dict[str, Any]:
    """Check one request; return it as plain JSON data without unset fields.

    Raises :class:`RequestInvalid` listing every problem. ``allowed_models`` empty means any.
    """
    if not isinstance(data, Mapping):
        raise RequestInvalid([{"loc": "(request)", "msg": "a request must be a JSON object"}])
    errors: list[dict[str, str]] = []
    if max_request_bytes is not None:
        try:
            size = len(orjson.dumps(data))
        except TypeError as exc:
            raise RequestInvalid(
                [{"loc": "(request)", "msg": f"not JSON-serialisable: {exc}"}]
            ) from None
        if size > max_request_bytes:
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
    allowed = tuple(allowed_models)
    model = data.get("model")
    if allowed and isinstance(model, str) and model and model not in allowed:
        errors.append(
            {"loc": "model", "msg": f"model {model!r} is not one of {', '.join(allowed)}"}
        )
    if parsed is not None and parsed.tool_choice is not None:
        if parsed.tool_choice.type == "tool" and not parsed.tool_choice.name:
            errors.append(
                {"loc": "tool_choice.name", "msg": "required when tool_choice.type is 'tool'"}
            )
        if parsed.tool_choice.type in {"any", "tool"} and not parsed.tools:
            errors.append({"loc": "tool_choice", "msg": "needs tools"})
        names = {tool.name for tool in parsed.tools or []}
        if parsed.tool_choice.name and parsed.tool_choice.name not in names:
            errors.append(
                {"loc": "tool_choice.name", "msg": f"no tool named {parsed.tool_choice.name!r}"}
            )
    if errors or parsed is None:
        raise RequestInvalid(errors)
    result: dict[str, Any] = parsed.model_dump(mode="json", exclude_unset=True)
    return result
