"""Job state in Redis, as every side sees it: the shared scripts, helpers and the job hash.

Every multi-key change that must be atomic is one Lua script (``worker/lua/``). Producers
submit, cancel and read a job here; the worker's side (claim, leases, events, the end) is
:mod:`worker.runtime.job_store`, built on :class:`JobStore`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import redis

from worker.accounting.tenancy import split_qualified_id
from worker.connections.clients import ReplicaAck, execute_pipeline
from worker.keys import Keys

LUA_DIR = Path(__file__).parent / "lua"


def load_lua(name: str, *, folder: Path = LUA_DIR, prelude: str | None = None) -> str:
    """The text of ``folder/name``, behind the shared ``folder/prelude`` when one is named."""
    body = (folder / name).read_text(encoding="utf-8")
    if prelude is None:
        return body
    return f"{(folder / prelude).read_text(encoding='utf-8')}\n{body}"


def text(value: Any) -> str:
    """A Redis reply as ``str`` (clients here do not decode responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_hash(raw: Mapping[Any, Any]) -> dict[str, str] | None:
    """A hash read with ``HGETALL`` as ``str`` to ``str``; None when it does not exist."""
    if not raw:
        return None
    return {text(k): text(v) for k, v in raw.items()}


def ending_script(name: str) -> str:
    """A script that ends jobs (``finish.lua``, ``cancel.lua``), behind ``batch_end.lua`` and
    ``tenant_end.lua``: ending a job of a Message Batch adds to the batch's counts, and ending
    a tenant's job gives back its place in the tenant's queued quota, in the same step."""
    return f"{load_lua('tenant_end.lua')}\n{load_lua(name, prelude='batch_end.lua')}"


def queued_key(keys: Keys, job_id: str) -> str:
    """The queued set of the job's tenant (its quota, ``Keys.tenant_queued``), or ``""`` for a
    job without a tenant."""
    tenant = split_qualified_id(job_id)[0]
    return keys.tenant_queued(tenant) if tenant else ""


def cancel_call(keys: Keys, job_id: str, *, result_ttl_s: int) -> tuple[list[str], list[Any]]:
    """The keys and arguments of ``cancel.lua``, for the sync and the async client alike.

    The script answers ``cancelled`` (was queued), ``requested`` (running), ``missing`` or
    ``ended:<state>``.
    """
    return (
        [
            keys.job(job_id),
            keys.events(job_id),
            keys.channel(job_id),
            keys.results_channel,
            keys.cancels_channel,
        ],
        [time.time(), job_id, result_ttl_s, keys.batch_counts(""), queued_key(keys, job_id)],
    )


def payload_bytes(payload: Any) -> str | bytes:
    return payload if isinstance(payload, str | bytes) else orjson.dumps(payload)


def bounded_payload(payload: Any, limit: int) -> bytes:
    """A dead letter's payload, at most about ``limit`` bytes: whole when it fits, else a JSON
    note of its length and sha256 with its first ``limit`` bytes (it is then kept for a look,
    not for a requeue)."""
    data = payload_bytes(payload)
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) <= limit:
        return raw
    return orjson.dumps(
        {
            "truncated": True,
            "bytes": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest(),
            "head": raw[:limit].decode("utf-8", "replace"),
        }
    )


class JobStore:
    """Job state under one key prefix, as producers use it. Safe to share between threads."""

    def __init__(
        self,
        client: redis.Redis[bytes],
        keys: Keys,
        *,
        result_ttl_s: int,
        replica_ack: ReplicaAck | None = None,
    ) -> None:
        self.redis = client
        self.keys = keys
        self.result_ttl_s = result_ttl_s
        self.replica_ack = replica_ack or ReplicaAck()
        self._submit = client.register_script(load_lua("submit.lua"))
        self._cancel = client.register_script(ending_script("cancel.lua"))

    def submit_script(self) -> Any:
        return self._submit

    def cancel(self, job_id: str) -> str:
        """``cancelled`` (was queued), ``requested`` (running), ``missing`` or ``ended:<state>``."""
        keys, args = cancel_call(self.keys, job_id, result_ttl_s=self.result_ttl_s)
        if not self.replica_ack:
            return text(self._cancel(keys=keys, args=args))

        def fill(pipe: Any) -> None:
            self._cancel(keys=keys, args=args, client=pipe)
            self.replica_ack.add(pipe)

        replies = execute_pipeline(self.redis, fill)
        return text(self.replica_ack.check(replies, f"the cancel of job {job_id!r}")[0])

    def job_hash(self, job_id: str) -> dict[str, str] | None:
        return decode_hash(self.redis.hgetall(self.keys.job(job_id)))

    def job_field(self, job_id: str, name: str) -> str | None:
        """One field of the job hash, or None."""
        raw = self.redis.hget(self.keys.job(job_id), name)
        return None if raw is None else text(raw)

    def metadata(self, job_id: str) -> dict[str, Any]:
        """The job's ``metadata`` object as submitted; empty when absent or unreadable."""
        raw = self.redis.hget(self.keys.job(job_id), "metadata")
        try:
            value = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}
