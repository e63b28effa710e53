"""The Redis limiter backend: state shared by every worker, one Lua script per decision.

Each operation is one ``EVALSHA`` (one round trip, atomic) of a script in ``lua/``, with
``lua/common.lua`` prepended: the server's ``TIME`` is the clock, and the arithmetic is the
one of :mod:`.slots` and :mod:`.bucket`. Keys per limit key (see :meth:`Keys.limiter`):

==========  ===========  ===========================================================
kind        type         holds
==========  ===========  ===========================================================
cooldown    string       server time the cooldown ends
requests    sorted set   reservation id -> end of its slot in the request window
input       hash         ``level``, ``updated_s`` of the input-token bucket
output      hash         the same for output tokens
leases      sorted set   reservation id -> lease expiry
==========  ===========  ===========================================================

Every key expires once it no longer matters (an absent bucket is a full one), so idle
limit keys leave nothing behind. The client is used one command at a time, so a pooled
connection is held only for the duration of a script, never while a caller waits.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import redis

from worker.keys import Keys
from worker.ratelimit.backend import Decision, Grant, Reason, Timing, new_reservation_id
from worker.ratelimit.cost import Cost, Usage, refund
from worker.settings import RateLimit
from worker.store import load_lua, text

_LUA_DIR = Path(__file__).parent / "lua"
_REASONS: frozenset[str] = frozenset({"cooldown", "rpm", "input_tpm", "output_tpm", "in_flight"})


@cache
def load_script(name: str) -> str:
    """The text of ``lua/<name>`` behind the shared prelude ``lua/common.lua``."""
    return load_lua(name, folder=_LUA_DIR, prelude="common.lua")


def _reason(value: Any) -> Reason:
    reason = text(value)
    if reason not in _REASONS:
        raise ValueError(f"unexpected limiter reason from Redis: {reason!r}")
    return reason  # type: ignore[return-value]  # checked against the Literal's values above


class RedisBackend:
    """:class:`~worker.ratelimit.backend.Backend` on Redis; safe to share between greenlets."""

    def __init__(
        self, client: redis.Redis[Any], keys: Keys | None = None, *, timing: Timing | None = None
    ) -> None:
        self.redis = client
        self.keys = keys or Keys()
        self._timing = timing or Timing()
        self._acquire = client.register_script(load_script("acquire.lua"))
        self._release = client.register_script(load_script("release.lua"))
        self._renew = client.register_script(load_script("renew.lua"))
        self._cooldown = client.register_script(load_script("cooldown.lua"))

    @property
    def timing(self) -> Timing:
        return self._timing

    def try_acquire(self, limit_key: str, limit: RateLimit, request_cost: Cost) -> Decision:
        """All limits of the key at once, in one script: consume from every one, or none."""
        k, t = self.keys, self._timing
        reservation_id = new_reservation_id()
        granted, retry_in_s, reason = self._acquire(
            keys=[
                k.limiter(limit_key, "cooldown"),
                k.limiter(limit_key, "requests"),
                k.limiter(limit_key, "input"),
                k.limiter(limit_key, "output"),
                k.limiter(limit_key, "leases"),
                k.limiter(limit_key, "burst"),
            ],
            args=[
                reservation_id,
                t.period_s,
                t.lease_ttl_s,
                t.in_flight_poll_s,
                limit.rpm or 0,
                limit.input_tpm or 0,
                limit.output_tpm or 0,
                limit.max_in_flight or 0,
                request_cost.input_tokens,
                request_cost.output_tokens,
                t.burst_limit(limit.rpm or 0),
                t.burst_s,
            ],
        )
        if int(granted):
            return Decision(grant=Grant(reservation_id, limit_key, limit, request_cost))
        return Decision(grant=None, retry_in_s=float(text(retry_in_s)), reason=_reason(reason))

    def release(self, grant: Grant, actual_usage: Usage | None) -> None:
        """Free the lease; give back unused tokens, or charge the overdraft. One round trip."""
        input_delta, output_delta = refund(grant.cost, actual_usage)
        limit = grant.limit
        settles_input = bool(limit.input_tpm and input_delta)
        settles_output = bool(limit.output_tpm and output_delta)
        if not (grant.has_lease or settles_input or settles_output):
            return  # nothing to free and nothing to settle: spare the round trip
        k = self.keys
        self._release(
            keys=[
                k.limiter(grant.limit_key, "input"),
                k.limiter(grant.limit_key, "output"),
                k.limiter(grant.limit_key, "leases"),
            ],
            args=[
                grant.reservation_id,
                self._timing.period_s,
                limit.input_tpm or 0,
                limit.output_tpm or 0,
                input_delta,
                output_delta,
            ],
        )

    def renew(self, grant: Grant) -> bool:
        """Extend the lease by ``lease_ttl_s`` from now; False (and gone) if it had expired."""
        if not grant.has_lease:
            return True
        renewed = self._renew(
            keys=[self.keys.limiter(grant.limit_key, "leases")],
            args=[grant.reservation_id, self._timing.lease_ttl_s],
        )
        return bool(int(renewed))

    def set_cooldown(self, limit_key: str, cooldown_s: float) -> float:
        """Pause the key for every worker; a longer cooldown in force stays. Seconds left."""
        left_s = self._cooldown(
            keys=[self.keys.limiter(limit_key, "cooldown")], args=[max(0.0, cooldown_s)]
        )
        return float(text(left_s))
