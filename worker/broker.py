"""Celery task messages for the Redis broker, built without a broker round trip.

``apply_async`` costs one round trip per job; a producer that submits thousands of jobs
wants one pipeline. On the Redis transport a queued message is a JSON envelope pushed on a
list named after the queue (kombu's ``Channel._put``); we build the same envelope, using
Celery's task protocol 2, and push it in the same script that creates the job.
``tests/runtime/test_queue_input.py`` pins it against kombu's own output.
"""

from __future__ import annotations

import base64
import os
import socket
import uuid
from typing import Any

import orjson

#: kombu's sorted set of delivered, unacknowledged messages (score: when last seen alive).
UNACKED_INDEX_KEY = "unacked_index"

#: The one task the workers run; the envelope names it and ``worker.runtime.task`` registers it.
TASK_NAME = "llmw.run_job"

_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


#: The job's priority when its payload names none (``worker.client.core.DEFAULT_PRIORITY``).
DEFAULT_PRIORITY = 5


def job_priority(payload: dict[str, Any] | None) -> str:
    """A message's priority as a label value ("0"-"9")."""
    priority = (payload or {}).get("priority")
    valid = isinstance(priority, int) and not isinstance(priority, bool) and 0 <= priority <= 9
    return str(priority if valid else DEFAULT_PRIORITY)


def traffic_headers(payload: dict[str, Any]) -> dict[str, Any]:
    """The headers that class a message (``worker/lua/fetch.lua`` reads them: the body is
    base64): its priority, its tenant (absent: none) and when its job was submitted."""
    headers: dict[str, Any] = {
        "llmw_priority": int(job_priority(payload)),
        "llmw_submitted_at": payload.get("submitted_at"),
    }
    if payload.get("tenant"):
        headers["llmw_tenant"] = payload["tenant"]
    return headers


def task_message(job_id: str, payload: dict[str, Any], *, queue: str) -> bytes:
    """The broker envelope of one ``run_job`` message, ready to ``LPUSH`` onto ``queue``."""
    args = [payload]
    body = orjson.dumps(
        [args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    )
    headers: dict[str, Any] = {
        "lang": "py",
        "task": TASK_NAME,
        "id": job_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": job_id,
        "parent_id": None,
        # The request holds the prompt; keep it out of Celery's logs of the message.
        "argsrepr": f"[<job {job_id}>]",
        "kwargsrepr": "{}",
        "origin": _ORIGIN,
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
        **traffic_headers(payload),
    }
    envelope = {
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": job_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return orjson.dumps(envelope)


def is_redis_broker(url: str) -> bool:
    return url.split(":", 1)[0] in {"redis", "rediss", "unix"}
