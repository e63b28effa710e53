"""Putting jobs on a queue for a measured run: ours through the producer API, the baselines
as plain Celery messages; both into a staging list that :meth:`Stack.release` renames onto
the worker's queue in one step."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import orjson

from bench.stack import MODEL, STAGING_SUFFIX, Stack
from worker.broker import task_message
from worker.client.sync import Client
from worker.settings import Settings


def request(prompt: str, *, stream: bool, max_tokens: int = 4096) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": prompt}],
    }


def stage_ours(stack: Stack, queue: str, requests: list[dict[str, Any]]) -> list[str]:
    """Submit jobs with the producer API (validated, job state created) to the staging list."""
    settings = Settings(redis_url=stack.redis_url, queue=queue + STAGING_SUFFIX)  # type: ignore[arg-type]
    ids: list[str] = []
    with Client(settings) as client:
        for start in range(0, len(requests), 1000):
            ids += [job.job_id for job in client.submit_many(requests[start : start + 1000])]
    return ids


def _celery_message(task: str, args: list[Any], queue: str) -> bytes:
    """A Celery protocol-2 message for ``task`` (the envelope ``worker.broker`` builds)."""
    task_id = str(uuid.uuid4())
    envelope = orjson.loads(task_message(task_id, {}, queue=queue))
    body = [args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    envelope["body"] = base64.b64encode(orjson.dumps(body)).decode("ascii")
    envelope["headers"]["task"] = task
    envelope["headers"]["argsrepr"] = "[...]"
    return orjson.dumps(envelope)


def stage_baseline(stack: Stack, queue: str, task: str, args: list[list[Any]]) -> None:
    pipe = stack.redis.pipeline(transaction=False)
    for one in args:
        pipe.lpush(queue + STAGING_SUFFIX, _celery_message(task, one, queue))
    pipe.execute()
