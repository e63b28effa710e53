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


def task_body(payload: dict[str, Any]) -> bytes:
    """The body of one ``run_job`` message (task protocol 2: args, kwargs, embed), JSON."""
    return orjson.dumps(
        [[payload], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    )


def task_headers(job_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The headers of one ``run_job`` message (task protocol 2, and its traffic class), on
    every broker."""
    return {
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


def task_message(job_id: str, payload: dict[str, Any], *, queue: str) -> bytes:
    """The broker envelope of one ``run_job`` message, ready to ``LPUSH`` onto ``queue``."""
    body = task_body(payload)
    headers = task_headers(job_id, payload)
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
    """A Redis broker: one server, or a master found through Sentinel."""
    return url.split(":", 1)[0] in {"redis", "rediss", "unix", "sentinel"}


def is_amqp_broker(url: str) -> bool:
    return url.split(":", 1)[0] in {"amqp", "amqps", "pyamqp"}


# -- priority bands (AMQP) ----------------------------------------------------------------
#
# RabbitMQ's quorum queues (3.10) hold no message priorities (no ``x-max-priority``), so on
# AMQP a job's priority (0-9, higher first) picks one of three queues, its band; every worker
# consumes all three. The normal band keeps the queue's own name, so a worker started with
# ``-Q llmw`` and a job of the default priority meet where they always did.

#: Band suffix -> the priorities it holds.
PRIORITY_BANDS: dict[str, range] = {"high": range(7, 10), "": range(3, 7), "low": range(0, 3)}


def band_queue(queue: str, priority: int | None) -> str:
    """The queue a job of ``priority`` goes to on AMQP: ``{queue}.high`` (7-9), ``{queue}``
    (3-6, and no priority) or ``{queue}.low`` (0-2)."""
    level = DEFAULT_PRIORITY if priority is None else priority
    for suffix, levels in PRIORITY_BANDS.items():
        if level in levels:
            return f"{queue}.{suffix}" if suffix else queue
    raise ValueError(f"priority {priority!r} is not in 0-9")


def band_queues(queue: str) -> list[str]:
    """Every band queue of ``queue``, highest first."""
    return [f"{queue}.{suffix}" if suffix else queue for suffix in PRIORITY_BANDS]


def band_of(name: str) -> str | None:
    """The base queue of a band queue's name (``llmw.high`` -> ``llmw``); None for a name
    that is not a high or low band (a base queue itself)."""
    for suffix in PRIORITY_BANDS:
        if suffix and name.endswith(f".{suffix}"):
            return name[: -len(suffix) - 1]
    return None


#: The arguments every queue is declared with on AMQP: replicated, durable (quorum).
QUORUM_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum"}


def amqp_queue(name: str) -> Any:
    """The declaration of one queue on AMQP, the same for workers and producers (RabbitMQ
    refuses a second declaration that differs): a durable quorum queue behind a topic exchange
    of its own name, which Celery's native delayed delivery (a job postponed by the rate
    limiter) routes through."""
    from kombu import Exchange, Queue

    return Queue(
        name,
        Exchange(name, type="topic", durable=True),
        routing_key=name,
        durable=True,
        queue_arguments=dict(QUORUM_ARGUMENTS),
    )
