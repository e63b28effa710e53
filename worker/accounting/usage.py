"""Reading the usage counters (``Keys.usage``): tokens and cost per tenant, model and UTC day.

The finish step of every completed job adds to them (see docs/fallbacks-and-cost.md);
``llm-worker usage`` prints them, and ``GET /v1/usage`` shows a gateway caller its own
(:func:`usage_report`). :func:`usage_rows` and :func:`day_range` are pure; :func:`read_usage`
does the reading (one ``SCAN`` over the usage keys, one ``HGETALL`` per tenant and day,
pipelined).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aredis

from worker.accounting.pricing import usd_text
from worker.keys import Keys
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


#: The longest range ``GET /v1/usage`` answers for, in days (the counters' retention).
MAX_RANGE_DAYS = 400
#: Its range when none is given: the last 30 UTC days, today included.
DEFAULT_RANGE_DAYS = 30
_DAY = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")


def _parse_day(value: str, name: str) -> dt.date:
    if not _DAY.match(value):
        raise ValueError(f"{name} must be a UTC date, YYYY-MM-DD")
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name} is not a calendar date: {value!r}") from None


def day_range(start: str | None, end: str | None, *, today: dt.date | None = None) -> list[str]:
    """The days from ``start`` to ``end`` (``YYYY-MM-DD``, both included; default: the 30 days
    up to today, UTC); ValueError naming the parameter when one is malformed, or the range is
    backwards or longer than :data:`MAX_RANGE_DAYS`."""
    today = today or dt.datetime.now(dt.UTC).date()
    last = today if end is None else _parse_day(end, "end")
    first = last - dt.timedelta(days=DEFAULT_RANGE_DAYS - 1)
    if start is not None:
        first = _parse_day(start, "start")
    if first > last:
        raise ValueError("start must not be after end")
    days = (last - first).days + 1
    if days > MAX_RANGE_DAYS:
        raise ValueError(f"the range covers {days} days; at most {MAX_RANGE_DAYS}")
    return [(first + dt.timedelta(days=n)).isoformat() for n in range(days)]


def report(tenant: str, days: list[str], rows: list[UsageRow]) -> dict[str, Any]:
    """``GET /v1/usage``'s body: the rows and their totals (cost exact, as decimal text)."""
    data = [{k: v for k, v in row.as_json().items() if k != "tenant"} for row in rows]
    return {
        "tenant": tenant,
        "start": days[0],
        "end": days[-1],
        "data": data,
        "totals": {
            "jobs": sum(r.jobs for r in rows),
            "input_tokens": sum(r.input_tokens for r in rows),
            "output_tokens": sum(r.output_tokens for r in rows),
            "cost_usd": usd_text(sum(r.cost_pusd for r in rows)),
        },
    }


async def usage_report(
    client: aredis.Redis[bytes], keys: Keys, tenant: str, *, start: str | None, end: str | None
) -> dict[str, Any]:
    """One tenant's usage over a range of days, in one round trip (one ``HGETALL`` per day
    of that tenant's keys: no other tenant's are read)."""
    days = day_range(start, end)
    pipe = client.pipeline(transaction=False)
    for day in days:
        pipe.hgetall(keys.usage(tenant, day))
    hashes = await pipe.execute()
    rows = usage_rows(
        (tenant, day, {text(k): text(v) for k, v in fields.items()})
        for day, fields in zip(days, hashes, strict=True)
        if fields
    )
    return report(tenant, days, rows)
