"""The linear request assignment of the upstream's connection pool: the same decisions as
httpcore's own, state for state (a pure unit: connections and requests are stand-ins)."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import httpcore
import pytest

from worker.runtime.http_pool import LinearPool, linear_assignment
from worker.runtime.upstream import UpstreamClient
from worker.settings import load_settings

ORIGIN, OTHER = "http://upstream.test", "http://other.test"


@dataclass(eq=False)
class Conn:
    """A connection in one of the states the pool asks about."""

    name: str
    closed: bool = False
    expired: bool = False
    idle: bool = False
    available: bool = False
    origin: str = ORIGIN

    def is_closed(self) -> bool:
        return self.closed

    def has_expired(self) -> bool:
        return self.expired

    def is_idle(self) -> bool:
        return self.idle

    def is_available(self) -> bool:
        return self.available

    def can_handle_request(self, origin: str) -> bool:
        return origin == self.origin


@dataclass(eq=False)
class Req:
    origin: str
    queued: bool = True
    assigned: list[str] = field(default_factory=list)

    @property
    def request(self) -> Any:
        return SimpleNamespace(url=SimpleNamespace(origin=self.origin))

    def is_queued(self) -> bool:
        return self.queued

    def assign_to_connection(self, connection: Conn) -> None:
        self.assigned.append(connection.name)
        self.queued = False


def decide(cls: type[httpcore.ConnectionPool], conns: list[Conn], reqs: list[Req], **limits: int):  # type: ignore[no-untyped-def]
    """One assignment by ``cls`` from these states: what it closed, kept, and assigned."""
    pool = cls(**limits)
    pool._connections = list(conns)
    pool._requests = list(reqs)
    made = itertools.count()
    pool.create_connection = lambda origin: Conn(f"new{next(made)}", origin=origin)  # type: ignore[method-assign]
    closing = pool._assign_requests_to_connections()
    return (
        [c.name for c in closing],
        [c.name for c in pool._connections],
        [r.assigned for r in reqs],
    )


def random_state(rng: random.Random) -> tuple[list[Conn], list[Req], dict[str, int]]:
    conns = []
    for i in range(rng.randint(0, 12)):
        state = rng.choice(["closed", "expired", "idle", "available", "busy", "idle-available"])
        conns.append(
            Conn(
                f"c{i}",
                closed=state == "closed",
                expired=state == "expired",
                idle=state.startswith("idle"),
                available=state.endswith("available"),
                origin=rng.choice([ORIGIN, ORIGIN, OTHER]),
            )
        )
    reqs = [
        Req(rng.choice([ORIGIN, OTHER]), queued=rng.random() < 0.8)
        for _ in range(rng.randint(0, 5))
    ]
    limits = {"max_connections": rng.randint(1, 12), "max_keepalive_connections": rng.randint(0, 8)}
    return conns, reqs, limits


@pytest.mark.parametrize("seed", range(300))
def test_the_linear_pool_decides_as_httpcore_does(seed: int) -> None:
    """Closing, keeping and assigning come out the same as httpcore's quadratic version."""
    rng = random.Random(seed)
    conns, reqs, limits = random_state(rng)
    theirs = decide(
        httpcore.ConnectionPool, conns, [Req(r.origin, r.queued) for r in reqs], **limits
    )
    ours = decide(LinearPool, conns, [Req(r.origin, r.queued) for r in reqs], **limits)
    assert ours == theirs


def test_surplus_idle_connections_are_closed_down_to_the_keep_alive_allowance() -> None:
    """Over the allowance, idle connections close (first first) while the pool is over it."""
    conns = [Conn(f"c{i}", idle=True, available=True) for i in range(5)]
    closing, kept, _ = decide(LinearPool, conns, [], max_keepalive_connections=3)
    assert closing == ["c0", "c1"]
    assert kept == ["c2", "c3", "c4"]


def test_the_upstream_client_uses_it() -> None:
    """The worker's upstream client gets the linear pool, the httpcore version allowing."""
    client = UpstreamClient(load_settings(api_base_url="http://upstream.test"))
    pool = client._transport._pool  # type: ignore[attr-defined]
    assert isinstance(pool, LinearPool) == httpcore.__version__.startswith("1.0.")
    client.close()


def test_a_pool_of_another_kind_is_left_alone() -> None:
    """Only httpcore's own pool class is switched, never a subclass someone else made."""

    class Custom(httpcore.ConnectionPool):
        pass

    pool = Custom()
    linear_assignment(pool)
    assert type(pool) is Custom
