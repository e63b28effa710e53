"""worker.ratelimit.cost: the token estimate before a call and the usage after it."""

from __future__ import annotations

import json

import pytest

from worker.client.core import prepare_submission
from worker.errors import RequestInvalid
from worker.ratelimit import Cost, Usage, estimate_input_tokens
from worker.ratelimit.cost import MEDIA_BLOCK_CHARS, refund, submit_problem
from worker.settings import SEED_MODELS, RateLimit, load_settings


def test_estimate_counts_system_messages_and_tools() -> None:
    """Characters of system, message text and the tools JSON, divided by four, rounded up."""
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    request = {
        "model": "m" * 1000,
        "system": "s" * 40,
        "messages": [
            {"role": "user", "content": "u" * 20},
            {"role": "assistant", "content": [{"type": "text", "text": "a" * 20}]},
        ],
        "tools": tools,
    }
    chars = 40 + (4 + 20) + (9 + 4 + 20) + len(json.dumps(tools, separators=(",", ":")))
    assert estimate_input_tokens(request) == -(-chars // 4)


def test_estimate_is_at_least_one() -> None:
    """An empty request still costs one token."""
    assert estimate_input_tokens({"messages": []}) == 1


def test_base64_media_counts_at_a_flat_rate() -> None:
    """An image's base64 payload counts as a fixed amount, not as megabytes of text."""
    image = {"type": "image", "source": {"type": "base64", "data": "A" * 1_000_000}}
    request = {"messages": [{"role": "user", "content": [image]}]}
    assert estimate_input_tokens(request) == -(-(4 + 5 + MEDIA_BLOCK_CHARS) // 4)


def test_cost_for_request_reserves_max_tokens_as_output() -> None:
    """Cost.for_request reserves the estimate as input and max_tokens as output."""
    request = {"max_tokens": 256, "messages": [{"role": "user", "content": "x" * 400}]}
    assert Cost.for_request(request) == Cost(input_tokens=(4 + 400) // 4, output_tokens=256)


def test_negative_cost_is_refused() -> None:
    """A negative reservation is a programming error."""
    with pytest.raises(ValueError, match="negative"):
        Cost(input_tokens=-1)


def test_usage_from_api_counts_cache_tokens_as_input() -> None:
    """Cache reads and writes count as input tokens."""
    usage = {
        "input_tokens": 10,
        "cache_creation_input_tokens": 5,
        "cache_read_input_tokens": None,
        "output_tokens": 7,
    }
    assert Usage.from_api(usage) == Usage(input_tokens=15, output_tokens=7)


def test_refund_is_reserved_minus_used() -> None:
    """Unused tokens come back positive, overdrafts negative, unknown usage as nothing."""
    reserved = Cost(input_tokens=100, output_tokens=50)
    assert refund(reserved, Usage(input_tokens=80, output_tokens=70)) == (20, -20)
    assert refund(reserved, None) == (0, 0)


def test_a_producer_that_knows_the_limit_refuses_what_could_never_be_granted() -> None:
    """With RATE_LIMITS in the producer's settings, max_tokens above the key's output_tpm is
    refused at submit naming both numbers (and the limit key); within it, nothing is said."""
    settings = load_settings(
        rate_limits='{"default": {"output_tpm": 8000}, "tenant-a": {"output_tpm": 100000}}'
    )
    request = {
        "model": SEED_MODELS[4],
        "max_tokens": 8192,
        "messages": [{"role": "user", "content": "x"}],
    }
    with pytest.raises(RequestInvalid) as refused:
        prepare_submission(settings, [request], None, None)
    (error,) = refused.value.errors
    assert error["loc"] == "max_tokens"
    assert "max_tokens 8192 exceeds the output_tpm limit of 8000" in error["msg"]
    assert repr(SEED_MODELS[4]) in error["msg"]  # its limit key (counted under default)
    # The tenant's own, larger bucket takes it; without RATE_LIMITS nothing is checked.
    prepare_submission(settings, [request], None, {"limit_key": "tenant-a"})
    prepare_submission(load_settings(), [request], None, None)
    assert (
        submit_problem({"m": RateLimit(output_tpm=10)}, {"model": "m", "max_tokens": 10}, None)
        is None
    )
