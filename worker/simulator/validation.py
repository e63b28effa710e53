"""Request validation for the simulator, loosely like the real API: pure, no I/O.

:func:`validate` returns None for an acceptable body, else the message of the 400
``invalid_request_error`` naming the field and the reason. It checks what a client is
likely to get wrong (required fields, ranges, roles, empty content, unknown fields, tool
shapes) and nothing more: it is a test double, not a schema.

The worker's own validation lives elsewhere (``worker/request.py``) on purpose: the
simulator must judge requests independently, as the real upstream would.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ALLOWED_FIELDS: frozenset[str] = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "metadata",  # the real API and the SDK accept it; the simulator ignores it
    }
)
ROLES: frozenset[str] = frozenset({"user", "assistant", "system"})
TOOL_CHOICES: frozenset[str] = frozenset({"auto", "any", "tool", "none"})
MAX_MESSAGES = 10
# (field, lowest, highest) from the upstream's documentation.
RANGES: tuple[tuple[str, float, float], ...] = (
    ("temperature", 0.0, 2.0),
    ("top_p", 0.1, 1.0),
    ("top_k", 0.0, 50.0),
)


def validate(body: object) -> str | None:
    """The first problem with a request body, or None when it is acceptable."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    unknown = sorted(set(body) - ALLOWED_FIELDS)
    if unknown:
        return f"{unknown[0]}: Extra inputs are not permitted"
    for check in (_check_model, _check_max_tokens, _check_messages, _check_options, _check_tools):
        problem = check(body)
        if problem is not None:
            return problem
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_model(body: Mapping[str, Any]) -> str | None:
    model = body.get("model")
    if model is None:
        return "model: Field required"
    if not isinstance(model, str) or not model:
        return "model: must be a non-empty string"
    return None


def _check_max_tokens(body: Mapping[str, Any]) -> str | None:
    if "max_tokens" not in body:
        return "max_tokens: Field required"
    value = body["max_tokens"]
    if not isinstance(value, int) or isinstance(value, bool):
        return "max_tokens: must be an integer"
    if value < 1:
        return "max_tokens: must be greater than or equal to 1"
    return None


def _check_messages(body: Mapping[str, Any]) -> str | None:
    if "messages" not in body:
        return "messages: Field required"
    messages = body["messages"]
    if not isinstance(messages, list):
        return "messages: must be a list"
    if not 1 <= len(messages) <= MAX_MESSAGES:
        return f"messages: must have 1 to {MAX_MESSAGES} items, got {len(messages)}"
    for index, message in enumerate(messages):
        problem = _check_message(message)
        if problem is not None:
            return f"messages.{index}.{problem}"
    return None


def _check_message(message: object) -> str | None:
    if not isinstance(message, dict):
        return "must be an object"
    if message.get("role") not in ROLES:
        return f"role: must be one of {sorted(ROLES)}, got {message.get('role')!r}"
    return _check_content(message.get("content"))


def _check_content(content: object) -> str | None:
    if content is None:
        return "content: Field required"
    if not isinstance(content, str | list):
        return "content: must be a string or a list of content blocks"
    if not content:
        return "content: must not be empty"
    if isinstance(content, list) and not all(
        isinstance(block, dict) and "type" in block for block in content
    ):
        return "content: every block must be an object with a type"
    return None


def _check_options(body: Mapping[str, Any]) -> str | None:
    for name, low, high in RANGES:
        if name in body:
            value = body[name]
            if not _is_number(value) or not low <= value <= high:
                return f"{name}: must be a number from {low:g} to {high:g}"
    if "stream" in body and not isinstance(body["stream"], bool):
        return "stream: must be a boolean"
    if "system" in body and not isinstance(body["system"], str | list):
        return "system: must be a string or a list of text blocks"
    stops = body.get("stop_sequences")
    if stops is not None and not (
        isinstance(stops, str)
        or (isinstance(stops, list) and all(isinstance(s, str) and s for s in stops))
    ):
        return "stop_sequences: must be a string or a list of non-empty strings"
    return None


def _check_tools(body: Mapping[str, Any]) -> str | None:
    tools = body.get("tools")
    if tools is None:
        return _check_tool_choice(body.get("tool_choice"), set())
    if not isinstance(tools, list):
        return "tools: must be a list"
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            return f"tools.{index}.name: Field required"
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            return f"tools.{index}.input_schema: must be an object schema (type object)"
    return _check_tool_choice(body.get("tool_choice"), {tool["name"] for tool in tools})


def _check_tool_choice(choice: object, names: set[str]) -> str | None:
    if choice is None:
        return None
    if not isinstance(choice, dict) or choice.get("type") not in TOOL_CHOICES:
        return f"tool_choice.type: must be one of {sorted(TOOL_CHOICES)}"
    if choice["type"] in ("any", "tool") and not names:
        return "tool_choice: requires tools"
    if choice["type"] == "tool" and choice.get("name") not in names:
        return f"tool_choice.name: no tool named {choice.get('name')!r} in tools"
    return None
