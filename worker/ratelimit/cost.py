"""What a call costs against a limit: estimated before it, measured after it.

Before the call the limiter reserves a :class:`Cost`: the estimated input tokens and the
request's ``max_tokens`` as output. After it, the real :class:`Usage` settles the
reservation: unused tokens go back to the buckets, and usage beyond the reservation is
charged (which may put a bucket in debt, so that later callers wait).

The estimate is deliberately crude and errs high: characters of every string in ``system``,
``messages`` and the ``tools`` JSON, divided by four. Base64 payloads (images, documents)
would count as megabytes of text, so each counts as a flat :data:`MEDIA_BLOCK_CHARS`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any

from worker.settings import RateLimit

#: Characters per token in the estimate; English prose runs at about four.
CHARS_PER_TOKEN = 4
#: What one base64 image or document counts for, in characters (about 1,600 tokens).
MEDIA_BLOCK_CHARS = 6_400


def _text_chars(value: Any) -> int:
    """Characters of every string inside ``value``, with base64 payloads at a flat rate."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        if value.get("type") == "base64" and isinstance(value.get("data"), str):
            return MEDIA_BLOCK_CHARS
        return sum(_text_chars(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(_text_chars(item) for item in value)
    return 0


def estimate_input_tokens(request: Mapping[str, Any]) -> int:
    """Estimated input tokens of a /messages request: text characters / 4, at least 1."""
    chars = _text_chars(request.get("system")) + _text_chars(request.get("messages"))
    tools = request.get("tools")
    if tools:
        chars += len(json.dumps(tools, ensure_ascii=False, separators=(",", ":"), default=str))
    return max(1, math.ceil(chars / CHARS_PER_TOKEN))


@dataclass(frozen=True, slots=True)
class Cost:
    """Tokens reserved before a call; ``output_tokens`` is the request's ``max_tokens``."""

    input_tokens: int = 0
    output_tokens: int = 0

    def __post_init__(self) -> None:
        if self.input_tokens < 0 or self.output_tokens < 0:
            raise ValueError(f"a cost cannot be negative: {self}")

    @classmethod
    def for_request(cls, request: Mapping[str, Any]) -> Cost:
        """The reservation for a /messages request: estimated input plus ``max_tokens``."""
        max_tokens = request.get("max_tokens") or 0
        return cls(
            input_tokens=estimate_input_tokens(request),
            output_tokens=max(0, int(max_tokens)),
        )


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens a call really used, as the upstream reported them."""

    input_tokens: int = 0
    output_tokens: int = 0

    @classmethod
    def from_api(cls, usage: Mapping[str, Any]) -> Usage:
        """From a /messages ``usage`` object; cache reads and writes count as input.

        Counting cached tokens is conservative: whether a provider counts them against its
        input limit varies, and charging them only makes this limiter stricter.
        """
        input_tokens = sum(
            int(usage.get(name) or 0)
            for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        )
        return cls(input_tokens=input_tokens, output_tokens=int(usage.get("output_tokens") or 0))


def limit_key_for(
    model: str,
    metadata: Mapping[str, Any] | None,
    tenant: str | None = None,
    limits: Container[str] = (),
) -> str:
    """The job's metadata ``limit_key`` if it is a string; else its tenant when ``limits``
    (RATE_LIMITS) names that tenant; else the model.

    A tenant without limits of its own stays under its model's (and ``default``'s) limits,
    shared with every other such job: that is the upstream's limit, not a fresh one per team.
    """
    key = (metadata or {}).get("limit_key")
    if isinstance(key, str) and key.strip() and len(key) <= 200:
        return key
    if tenant and tenant in limits:
        return tenant
    return model


def capacity_problem(limit: RateLimit, cost: Cost) -> str | None:
    """Why ``cost`` could never be granted under ``limit`` (it is larger than a whole bucket,
    which would only ever fill to its capacity), or None when it fits."""
    if limit.output_tpm and cost.output_tokens > limit.output_tpm:
        return (
            f"max_tokens {cost.output_tokens} exceeds the output_tpm limit of "
            f"{limit.output_tpm} tokens per period: it could never be granted"
        )
    if limit.input_tpm and cost.input_tokens > limit.input_tpm:
        return (
            f"the request's estimated {cost.input_tokens} input tokens exceed the input_tpm "
            f"limit of {limit.input_tpm} tokens per period: it could never be granted"
        )
    return None


def submit_problem(
    limits: Mapping[str, RateLimit],
    request: Mapping[str, Any],
    metadata: Mapping[str, Any] | None,
    tenant: str | None = None,
) -> str | None:
    """What a producer that knows ``RATE_LIMITS`` refuses at submit: a request larger than a
    whole bucket of its limit key (see :func:`capacity_problem`), or None."""
    key = limit_key_for(str(request.get("model", "")), metadata, tenant, limits)
    limit = limits.get(key) or limits.get("default")
    if limit is None:
        return None
    problem = capacity_problem(limit, Cost.for_request(request))
    return None if problem is None else f"{problem} (limit key {key!r})"


def no_output_usage(reserved: Cost, *, input_counted: bool) -> Usage:
    """What a call that produced no output used, as the upstream counts it: nothing of the
    output reservation, and its input only when the upstream processed the request (not for
    a 429 or 529, which turned it away)."""
    return Usage(input_tokens=reserved.input_tokens if input_counted else 0, output_tokens=0)


def refund(reserved: Cost, used: Usage | None) -> tuple[int, int]:
    """Tokens to give back to the input and output buckets; negative means charge more.

    ``None`` (the call's usage is unknown) gives nothing back: the reservation stands.
    """
    if used is None:
        return (0, 0)
    return (
        reserved.input_tokens - used.input_tokens,
        reserved.output_tokens - used.output_tokens,
    )
