"""Deterministic answers for the simulator: pure functions, no I/O.

:func:`generate` turns ``(seed, request)`` into a :class:`Generation`: the content
blocks, the stop reason and the usage. The same seed and the same model, system prompt and
messages always give the same answer; any change to them gives another. Answers are words
from :data:`VOCABULARY`, each token one word plus a trailing space; a few words are
multi-byte in UTF-8 (``café``, ``日本``, ``🙂``) so that clients' decoders are exercised.

Stop rules, in order: a ``stop_sequences`` entry found in the text cuts the text just
before it (``stop_sequence``); the request's ``max_tokens`` cuts the answer
(``max_tokens``); else the answer ends naturally (``end_turn``). Every word of the
vocabulary can occur, so a test can pick a word it saw in an answer as a stop sequence.

Tools: when the request has ``tools`` and ``tool_choice`` is not ``{"type": "none"}``,
the answer always calls a tool (``stop_reason`` ``tool_use``): the named one for
``{"type": "tool"}``, else one picked by the seeded generator. With ``auto`` (or no
choice) a short text block comes first, as the real model does; with ``any``/``tool``
the tool_use block is alone. The input is built from the tool's ``input_schema``
(every property, so every required key, is present) and is also given as JSON
fragments cut at arbitrary places, for ``input_json_delta`` events.

Directives, for tests and benchmarks: when the text of the last user message contains
``[[sim key=value ...]]`` the pairs steer this one request:

- ``tokens=N``   exact answer length in tokens before the ``max_tokens`` cap (N >= 0);
- ``ttft_ms=N``  time to first token in milliseconds, instead of the configured one;
- ``tps=N``      tokens per second, instead of the configured one (0 = no pacing).

- ``fault=KIND`` inject that fault (see :mod:`worker.simulator.faults`), every time or,
  with ``fault_times=N``, for the first N requests with the same prompt.

Other keys, ``fault`` and ``fault_times`` included, are kept in :attr:`Directives.extra`
and read by the app. A malformed directive raises :class:`DirectiveError`, which the app
reports as a 400.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

VOCABULARY: tuple[str, ...] = (
    "lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit",
    "sed", "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "et", "dolore",
    "magna", "aliqua", "enim", "ad", "minim", "veniam", "quis", "nostrud", "ullamco",
    "laboris", "nisi", "aliquip", "ex", "ea", "commodo", "the", "queue", "worker",
    "stream", "token", "answer", "model", "river", "mountain", "garden", "signal",
    "café", "naïve", "façade", "über", "smörgåsbord", "jalapeño", "日本", "東京",
    "привет", "🙂",
)  # fmt: skip

_DIRECTIVE_RE = re.compile(r"\[\[sim\b([^\]]*)\]\]")
_MAX_SCHEMA_DEPTH = 4


class DirectiveError(ValueError):
    """A ``[[sim ...]]`` directive that cannot be parsed."""


@dataclass(frozen=True, slots=True)
class Directives:
    """Per-request overrides parsed from ``[[sim ...]]``; None means "use the config"."""

    tokens: int | None = None
    ttft_ms: float | None = None
    tps: float | None = None
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TextBlock:
    """A text content block, as the tokens that are streamed one delta each."""

    tokens: tuple[str, ...]

    @property
    def text(self) -> str:
        return "".join(self.tokens)


@dataclass(frozen=True, slots=True)
class ToolUseBlock:
    """A tool_use content block; ``fragments`` concatenate to the JSON of ``input``."""

    id: str
    name: str
    input: dict[str, Any]
    fragments: tuple[str, ...]


Block = TextBlock | ToolUseBlock


@dataclass(frozen=True, slots=True)
class Generation:
    """Everything the wire layer needs to render one answer."""

    blocks: tuple[Block, ...]
    stop_reason: str
    stop_sequence: str | None
    input_tokens: int
    output_tokens: int
    directives: Directives


def generate(
    seed: int,
    request: Mapping[str, Any],
    *,
    min_tokens: int = 20,
    max_tokens: int = 60,
) -> Generation:
    """Build the answer to a (validated) request; ``min/max_tokens`` bound its length."""
    directives = parse_directives(request.get("messages") or ())
    rng = random.Random(request_digest(seed, request))
    cap = int(request["max_tokens"])
    input_tokens = count_input_tokens(request)
    tools = request.get("tools") or ()
    choice = request.get("tool_choice") or {"type": "auto"}
    if tools and choice.get("type") != "none":
        return _tool_answer(
            rng,
            tools=tools,
            choice=choice,
            cap=cap,
            input_tokens=input_tokens,
            directives=directives,
        )
    wanted = directives.tokens
    if wanted is None:
        wanted = rng.randint(min_tokens, max_tokens)
    stops = _stop_sequences(request.get("stop_sequences"))
    tokens, generated, matched = _text_tokens(rng, min(wanted, cap), stops)
    if matched is not None:
        reason = "stop_sequence"
    elif wanted > cap:
        reason = "max_tokens"
    else:
        reason = "end_turn"
    return Generation(
        (TextBlock(tuple(tokens)),), reason, matched, input_tokens, generated, directives
    )


def request_digest(seed: int, request: Mapping[str, Any]) -> int:
    """A stable 64-bit seed from the config seed and the request's model/system/messages."""
    canonical = orjson.dumps(
        [seed, request.get("model"), request.get("system"), request.get("messages")],
        option=orjson.OPT_SORT_KEYS,
    )
    return int.from_bytes(hashlib.sha256(canonical).digest()[:8], "big")


def count_input_tokens(request: Mapping[str, Any]) -> int:
    """Roughly one token per four characters of prompt, at least one."""
    chars = len(_text_of(request.get("system")))
    for message in request.get("messages") or ():
        chars += len(_text_of(message.get("content")))
    if request.get("tools"):
        chars += len(orjson.dumps(request["tools"]))
    return max(1, chars // 4)


def parse_directives(messages: Sequence[Mapping[str, Any]]) -> Directives:
    """Read ``[[sim k=v ...]]`` from the last user message, if any."""
    last_user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    if last_user is None:
        return Directives()
    found = _DIRECTIVE_RE.search(_text_of(last_user.get("content")))
    if found is None:
        return Directives()
    pairs: dict[str, str] = {}
    for item in found.group(1).split():
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise DirectiveError(f"sim directive item {item!r} is not key=value")
        pairs[key] = value
    tokens = _number(pairs.pop("tokens", None), "tokens", integer=True)
    ttft_ms = _number(pairs.pop("ttft_ms", None), "ttft_ms", integer=False)
    tps = _number(pairs.pop("tps", None), "tps", integer=False)
    return Directives(None if tokens is None else int(tokens), ttft_ms, tps, pairs)


def _number(raw: str | None, name: str, *, integer: bool) -> float | None:
    if raw is None:
        return None
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise DirectiveError(f"sim directive {name}={raw!r} is not a number") from None
    if not value >= 0:  # also rejects NaN
        raise DirectiveError(f"sim directive {name}={raw!r} must not be negative")
    return value


def _text_of(content: object) -> str:
    """The text of a string or of a list of content blocks (non-text blocks ignored)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text"
        )
    return ""


def _stop_sequences(raw: object) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        return ()
    return tuple(s for s in raw if isinstance(s, str) and s)


def _text_tokens(
    rng: random.Random, limit: int, stops: tuple[str, ...]
) -> tuple[list[str], int, str | None]:
    """Return (tokens to send, tokens generated, matched stop sequence)."""
    if not stops:  # the hot path for benchmarks: no text scanning at all
        return [rng.choice(VOCABULARY) + " " for _ in range(limit)], limit, None
    tokens: list[str] = []
    text = ""
    for generated in range(1, limit + 1):
        token = rng.choice(VOCABULARY) + " "
        start = len(text)
        text += token
        tokens.append(token)
        hit = _earliest_stop(text, start, stops)
        if hit is not None:
            cut, matched = hit
            return _tokens_before(tokens, cut), generated, matched
    return tokens, limit, None


def _earliest_stop(text: str, new_from: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """The earliest stop sequence that ends inside the text added at ``new_from``."""
    best: tuple[int, str] | None = None
    for stop in stops:
        at = text.find(stop, max(0, new_from - len(stop) + 1))
        if at >= 0 and (best is None or at < best[0]):
            best = (at, stop)
    return best


def _tokens_before(tokens: list[str], cut: int) -> list[str]:
    """The tokens covering ``text[:cut]``, the last one shortened if the cut falls inside."""
    kept: list[str] = []
    position = 0
    for token in tokens:
        if position + len(token) <= cut:
            kept.append(token)
            position += len(token)
            continue
        if cut > position:
            kept.append(token[: cut - position])
        break
    return kept


def _tool_answer(
    rng: random.Random,
    *,
    tools: Sequence[Mapping[str, Any]],
    choice: Mapping[str, Any],
    cap: int,
    input_tokens: int,
    directives: Directives,
) -> Generation:
    forced = choice.get("type") in ("any", "tool")
    if choice.get("type") == "tool":
        named = (t for t in tools if t.get("name") == choice.get("name"))
        tool = next(named, tools[0])  # validation rejects unknown names; be lenient here
    else:
        tool = rng.choice(list(tools))
    blocks: list[Block] = []
    preface = 0 if forced else min(rng.randint(2, 6), cap - 1)
    if preface > 0:
        blocks.append(TextBlock(tuple(rng.choice(VOCABULARY) + " " for _ in range(preface))))
    arguments = schema_value(rng, tool.get("input_schema") or {}, 0)
    if not isinstance(arguments, dict):
        arguments = {}
    encoded = orjson.dumps(arguments).decode()
    tool_id = f"toolu_{rng.getrandbits(96):024x}"
    blocks.append(ToolUseBlock(tool_id, str(tool["name"]), arguments, split_json(rng, encoded)))
    output = min(cap, preface + max(1, len(encoded) // 4))
    return Generation(tuple(blocks), "tool_use", None, input_tokens, output, directives)


def split_json(rng: random.Random, encoded: str) -> tuple[str, ...]:
    """Cut a JSON text into 2-6 fragments at arbitrary places, mid-string included."""
    if len(encoded) < 2:
        return (encoded,)
    count = min(len(encoded) - 1, rng.randint(1, 5))
    cuts = sorted(rng.sample(range(1, len(encoded)), count))
    bounds = [0, *cuts, len(encoded)]
    return tuple(encoded[a:b] for a, b in itertools.pairwise(bounds))


def schema_value(rng: random.Random, schema: object, depth: int) -> Any:
    """A value that fits a (simple) JSON schema: every property present, enums honoured."""
    if not isinstance(schema, Mapping):
        return _words(rng)
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return rng.choice(schema["enum"])
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind is None and "properties" in schema:
        kind = "object"
    build = _BUILDERS.get(kind) if isinstance(kind, str) else None
    return _words(rng) if build is None else build(rng, schema, depth)


def _array_value(rng: random.Random, schema: Mapping[str, Any], depth: int) -> list[Any]:
    if depth >= _MAX_SCHEMA_DEPTH:
        return []
    items = schema.get("items", {})
    return [schema_value(rng, items, depth + 1) for _ in range(rng.randint(1, 3))]


def _bounds(schema: Mapping[str, Any]) -> tuple[float, float]:
    low = _bound(schema.get("minimum"), 0)
    return low, max(low, _bound(schema.get("maximum"), low + 100))


def _integer_value(rng: random.Random, schema: Mapping[str, Any], depth: int) -> int:
    low, high = _bounds(schema)
    return rng.randint(int(low), max(int(low), int(high)))


def _number_value(rng: random.Random, schema: Mapping[str, Any], depth: int) -> float:
    low, high = _bounds(schema)
    return round(rng.uniform(low, high), 2)


def _object_value(rng: random.Random, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
    if depth >= _MAX_SCHEMA_DEPTH:
        return {}
    properties = schema.get("properties")
    out: dict[str, Any] = {}
    if isinstance(properties, Mapping):
        for name, sub in properties.items():
            out[str(name)] = schema_value(rng, sub, depth + 1)
    required = schema.get("required")
    for name in required if isinstance(required, list) else ():
        out.setdefault(str(name), _words(rng))
    return out


def _bound(raw: object, default: float) -> float:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    return default


def _words(rng: random.Random) -> str:
    return " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(1, 3)))


_BUILDERS: dict[str, Callable[[random.Random, Mapping[str, Any], int], Any]] = {
    "object": _object_value,
    "array": _array_value,
    "integer": _integer_value,
    "number": _number_value,
    "boolean": lambda rng, _schema, _depth: rng.random() < 0.5,
    "null": lambda _rng, _schema, _depth: None,
    "string": lambda rng, _schema, _depth: _words(rng),
}
