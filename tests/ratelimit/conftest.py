"""The ``backend`` fixture: the same contract tests against the memory and the Redis backend.

The Redis side uses the session's own Redis (``redis_url`` from ``tests/conftest.py``, never
the one on port 6379) under a fresh key prefix per test, deleted afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ratelimit.harness import Harness, memory_harness, redis_harness


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
def backend(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """A backend kind; every backend made by ``new()`` shares the same limiter state."""
    if request.param == "memory":
        yield memory_harness()
        return
    harness, keys = redis_harness(request.getfixturevalue("redis_url"))
    yield harness
    for client in harness.clients:
        for name in client.scan_iter(match=f"{keys.prefix}:*"):
            client.delete(name)
        client.close()


@pytest.fixture
def key() -> str:
    """A limit key shaped like a real model name."""
    return "deepseek-ai/DeepSeek-V3"
