"""Reading the usage counters (``Keys.usage``): tokens and cost per tenant, model and UTC day.

The finish step of every completed job adds to them (see docs/fallbacks-and-cost.md);
``llm-worker usage`` prints them. :func:`usage_rows` is pure; :func:`read_usage` does the
reading (one ``SCAN`` over the usage keys, one ``HGETALL`` per tenant and day, pipelined).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from worker.keys import Keys
from worker.pricing import usd_text
from worker.store import text

#: The counters of one model in a usage hash (field ``<model>|<name>``).
COUNTERS = ("jobs", "input_tokens", "output_tokens", "cost_pusd")


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One tenant's use of one model on one UTC day."""

    day: str
    tenant: str
    model: str
    jobs: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_pusd: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "day": self.day,
            "tenant": self.tenant,
            "model": self.model,
            "jobs": self.jobs,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": usd_text(self.cost_pusd),
        }


def usage_rows(hashes: Iterable[tuple[str, str, Mapping[str, str]]]) -> list[UsageRow]:
    """Rows from ``(tenant, day, usage hash)`` triples, by day, tenant and model; fields that
    are not counters (or not integers) are ignored."""
    rows = []
    for tenant, day, fields in hashes:
        per_model: dict[str, dict[str, int]] = {}
        for field, value in fields.items():
            model, _, name = field.rpartition("|")
            if not model or name not in COUNTERS:
                continue
            try:
                per_model.setdefault(model, {})[name] = int(value)
            except ValueError:
                continue
        for model, counts in per_model.items():
            rows.append(UsageRow(day, tenant, model, **counts))
    return sorted(rows, key=lambda r: (r.day, r.tenant, r.model))


def days_back(now: float, days: int) -> set[str]:
    """The UTC days from ``days - 1`` days ago to today, ``YYYY-MM-DD``."""
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    return {(today - dt.timedelta(days=n)).isoformat() for n in range(days)}


def read_usage(
    client: redis.Redis[bytes], keys: Keys, *, tenant: str | None, days: int, now: float
) -> list[UsageRow]:
    """The usage rows of the last ``days`` UTC days, of one tenant or of all."""
    wanted = days_back(now, days)
    prefix = keys.usage("", "")[:-1]  # "<prefix>:usage:"
    pattern = keys.usage(tenant, "*") if tenant is not None else f"{prefix}*"
    found = []
    for raw in client.scan_iter(match=pattern, count=1000):
        name = text(raw)
        key_tenant, _, day = name[len(prefix) :].rpartition(":")
        if day in wanted and (tenant is None or key_tenant == tenant):
            found.append((key_tenant, day, name))
    pipe = client.pipeline(transaction=False)
    for _tenant, _day, name in found:
        pipe.hgetall(name)
    hashes = pipe.execute() if found else []
    return usage_rows(
        (t, d, {text(k): text(v) for k, v in h.items()})
        for (t, d, _n), h in zip(found, hashes, strict=True)
    )
