"""worker.ratelimit.redis_backend: the Redis side's keys, expiries and scripts."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from worker.keys import Keys
from worker.ratelimit import Cost, RedisBackend, Timing, Usage
from worker.ratelimit.redis_backend import load_script
from worker.settings import RateLimit

pytestmark = pytest.mark.integration

ALL_LIMITS = RateLimit(rpm=10, input_tpm=1000, output_tpm=1000, max_in_flight=2)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis[Any]]:
    """A client on the session's Redis; this test's keys are deleted afterwards."""
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture
def keys(client: redis.Redis[Any]) -> Iterator[Keys]:
    """A fresh key prefix, cleaned up afterwards."""
    fresh = Keys(prefix=f"test-rl-{uuid.uuid4().hex[:8]}")
    yield fresh
    for name in client.scan_iter(match=f"{fresh.prefix}:*"):
        client.delete(name)


def test_every_key_is_named_by_keys_and_expires(client: redis.Redis[Any], keys: Keys) -> None:
    """All state lives under Keys.limiter names, and every key carries an expiry."""
    backend = RedisBackend(client, keys, timing=Timing(period_s=60.0, lease_ttl_s=120.0))
    grant = backend.try_acquire("m", ALL_LIMITS, Cost(input_tokens=10, output_tokens=10)).grant
    assert grant is not None
    backend.set_cooldown("m", 5.0)
    expected = {keys.limiter("m", kind) for kind in ("requests", "input", "output", "leases")}
    expected.add(keys.limiter("m", "cooldown"))
    found = {name.decode() for name in client.scan_iter(match=f"{keys.prefix}:*")}
    assert found == expected
    for name in found:
        assert 0 < client.pttl(name) <= 121_000, name


def test_a_settled_full_bucket_leaves_nothing_behind(client: redis.Redis[Any], keys: Keys) -> None:
    """A bucket refunded back to full expires within a second: a missing bucket is full."""
    backend = RedisBackend(client, keys, timing=Timing(period_s=60.0))
    limit = RateLimit(output_tpm=1000)
    grant = backend.try_acquire("m", limit, Cost(output_tokens=500)).grant
    assert grant is not None
    assert client.pttl(keys.limiter("m", "output")) > 29_000
    backend.release(grant, Usage(output_tokens=0))
    assert client.pttl(keys.limiter("m", "output")) <= 1_000


def test_release_of_a_plain_grant_makes_no_round_trip(client: redis.Redis[Any], keys: Keys) -> None:
    """A grant with no lease and nothing to settle is released without calling Redis."""
    backend = RedisBackend(client, keys)
    grant = backend.try_acquire("m", RateLimit(rpm=5), Cost()).grant
    assert grant is not None
    backend.redis = None  # type: ignore[assignment]  # any call would now fail
    backend.release(grant, None)
    assert backend.renew(grant)


def test_scripts_carry_the_shared_prelude() -> None:
    """Every script reads the server's clock through the shared prelude."""
    for name in ("acquire.lua", "release.lua", "renew.lua", "cooldown.lua"):
        assert "redis.call('TIME')" in load_script(name)
