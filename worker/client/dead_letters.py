"""The dead letters: jobs that failed for good or could not be run, kept with why.

Entries live in the Redis Stream ``{prefix}:dlq`` (fields ``job_id``, ``reason``, ``payload``,
``ts``); the payload is the queued job payload (``job_id``, ``request``, ``submitted_at``) or,
for a message that was never a job, its raw text. Never a secret: the API key is not part of
a request.

Requeueing submits the request again as a **new** job (a new id, with ``requeued_from`` in its
metadata): the old job has its one terminal event already, and its consumers have seen it.
"""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from worker.client.core import MAX_PRIORITY, MIN_PRIORITY, valid_tenant
from worker.client.sync import Client, Job
from worker.errors import BudgetExceeded, LLMWorkerError, QuotaExceeded, RequestInvalid
from worker.store import text

#: Entries read per round trip when listing.
PAGE = 500
ENTRY_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}\Z")


class DeadLetterError(LLMWorkerError):
    """A dead-letter operation was asked for something that does not exist or cannot be."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    entry_id: str
    job_id: str
    reason: str
    ts: float
    payload: bytes

    @classmethod
    def from_entry(cls, entry_id: Any, fields: dict[bytes, bytes]) -> DeadLetter:
        def field(name: bytes) -> str:
            return fields.get(name, b"").decode("utf-8", "replace")

        try:
            ts = float(field(b"ts") or 0)
        except ValueError:
            ts = 0.0
        return cls(
            entry_id=text(entry_id),
            job_id=field(b"job_id"),
            reason=field(b"reason"),
            ts=ts,
            payload=fields.get(b"payload", b""),
        )

    def request(self) -> dict[str, Any] | None:
        """The job's request, when the payload is a job payload; else None."""
        try:
            payload = orjson.loads(self.payload)
        except orjson.JSONDecodeError:
            return None
        if isinstance(payload, dict) and isinstance(payload.get("request"), dict):
            return dict(payload["request"])
        return None

    def traffic_class(self) -> tuple[int | None, str | None]:
        """The job's ``priority`` and ``tenant`` from its payload, each None when absent or
        not valid (the requeued job then gets the default)."""
        try:
            payload = orjson.loads(self.payload)
        except orjson.JSONDecodeError:
            return None, None
        if not isinstance(payload, dict):
            return None, None
        priority, tenant = payload.get("priority"), payload.get("tenant")
        in_range = isinstance(priority, int) and MIN_PRIORITY <= priority <= MAX_PRIORITY
        if isinstance(priority, bool) or not in_range:
            priority = None
        return priority, tenant if valid_tenant(tenant) else None

    def to_json(self) -> dict[str, Any]:
        try:
            payload: Any = orjson.loads(self.payload)
        except orjson.JSONDecodeError:
            payload = self.payload.decode("utf-8", "replace")
        return {
            "id": self.entry_id,
            "job_id": self.job_id,
            "reason": self.reason,
            "ts": self.ts,
            "payload": payload,
        }


@dataclass(frozen=True, slots=True)
class Requeued:
    entry: DeadLetter
    job: Job | None  # the new job, or None when it could not be requeued
    error: str | None = None


class DeadLetters:
    """List, requeue and purge the dead letters of a :class:`~worker.client.sync.Client`."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.key = client.keys.dead_letters

    def __len__(self) -> int:
        return int(self.client.redis.xlen(self.key))

    def entries(self, *, reason: str | None = None, limit: int | None = None) -> list[DeadLetter]:
        """Oldest first, optionally only one reason, at most ``limit``: read a page at a time
        (``XRANGE … COUNT``), so a short list of a long stream reads only what it shows."""
        return list(itertools.islice(self._iter(reason), limit))

    def _iter(self, reason: str | None) -> Iterator[DeadLetter]:
        start = "-"
        while True:
            rows = self.client.redis.xrange(self.key, start, "+", count=PAGE)
            for entry_id, fields in rows:
                entry = DeadLetter.from_entry(entry_id, fields)
                if reason is None or entry.reason == reason:
                    yield entry
            if len(rows) < PAGE:
                return
            start = f"({text(rows[-1][0])}"  # exclusive: after the page's last entry

    def get(self, entry_ids: Iterable[str]) -> list[DeadLetter]:
        """The entries with these ids; DeadLetterError naming every bad or unknown id."""
        ids = list(dict.fromkeys(entry_ids))
        malformed = [i for i in ids if not ENTRY_ID.match(i)]
        if malformed:
            raise DeadLetterError(
                f"not a dead-letter id (expected like 1764250000123-0): {', '.join(malformed)}"
            )
        found: list[DeadLetter] = []
        missing: list[str] = []
        for entry_id in ids:
            rows = self.client.redis.xrange(self.key, entry_id, entry_id)
            if rows:
                found.append(DeadLetter.from_entry(*rows[0]))
            else:
                missing.append(entry_id)
        if missing:
            raise DeadLetterError(f"no dead letter with id {', '.join(missing)}")
        return found

    def requeue(self, entries: Iterable[DeadLetter]) -> list[Requeued]:
        """Submit each entry's request as a new job and drop the entry; an entry whose payload
        is not a valid job stays, with the reason in :attr:`Requeued.error`."""
        outcomes: list[Requeued] = []
        for entry in entries:
            request = entry.request()
            if request is None:
                outcomes.append(Requeued(entry, None, "the payload is not a job request"))
                continue
            # It keeps its class (docs/traffic-classes.md); its life starts anew.
            priority, tenant = entry.traffic_class()
            try:
                job = self.client.submit(
                    request,
                    job_id=uuid.uuid4().hex,
                    metadata={"requeued_from": entry.job_id, "dead_letter": entry.entry_id},
                    priority=priority,
                    tenant=tenant,
                )
            except RequestInvalid as exc:
                outcomes.append(Requeued(entry, None, f"the request is not valid now: {exc}"))
                continue
            except (QuotaExceeded, BudgetExceeded) as exc:
                outcomes.append(Requeued(entry, None, f"refused for now: {exc}"))
                continue
            self.client.redis.xdel(self.key, entry.entry_id)
            outcomes.append(Requeued(entry, job))
        return outcomes

    def purge(self, entries: Iterable[DeadLetter] | None = None) -> int:
        """Delete these entries, or every entry when None; returns how many were deleted."""
        if entries is None:
            count = len(self)
            self.client.redis.delete(self.key)
            return count
        ids = [e.entry_id for e in entries]
        return int(self.client.redis.xdel(self.key, *ids)) if ids else 0
