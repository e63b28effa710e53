"""``python -m bench.brokers [--jobs N] [--concurrency C]``: the broker's share of a job.

For each broker (the results Redis, then RabbitMQ through the outbox) one gevent worker runs
``N`` non-streamed jobs against a zero-latency simulator. Two figures per broker:

- submit: ``submit_many`` of all jobs, timed in the producer (on RabbitMQ: the record and
  outbox entry in one Redis pipeline, then one confirmed publish per job, then the outbox
  cleared);
- drain: from the first submit to the last terminal event, jobs per second.

RabbitMQ is a node of its own under a temporary folder (Debian's ``rabbitmq-server``); the
scenario is skipped with a message where it cannot be started.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.stack import MODEL, Stack, wait_for
from worker.client.sync import Client
from worker.dev.rabbitmq import RabbitServer, unavailable_reason
from worker.settings import settings_from_env


def _round(stack: Stack, *, jobs: int, concurrency: int, broker: str | None) -> dict[str, Any]:
    queue = f"bench-brokers-{uuid.uuid4().hex[:6]}"
    extra = {"broker_url": broker} if broker else {}
    with stack.worker("worker.celery_app", concurrency=concurrency, queue=queue, **extra) as worker:
        env = stack.worker_env(concurrency=concurrency, queue=queue, **extra)
        with Client(settings_from_env(env)) as client:
            warm = client.submit({"model": MODEL, "max_tokens": 2, "messages": [_msg("warm")]})
            wait_for(lambda: worker.check() or warm.status()["state"] == "completed", 60, "warm")
            requests = [
                {"model": MODEL, "max_tokens": 8, "messages": [_msg(f"job {i}")]}
                for i in range(jobs)
            ]
            started = time.perf_counter()
            handles = client.submit_many(requests)
            submitted = time.perf_counter()
            for handle in handles:
                handle.result(timeout=300)
            ended = time.perf_counter()
            pending = client.outbox.size()
    return {
        "submit_s": round(submitted - started, 3),
        "submit_jobs_per_s": round(jobs / (submitted - started)),
        "drain_s": round(ended - started, 3),
        "drain_jobs_per_s": round(jobs / (ended - started)),
        "outbox_left": pending,
    }


def _msg(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def run(*, jobs: int, concurrency: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with Stack() as stack:
        results["redis"] = _round(stack, jobs=jobs, concurrency=concurrency, broker=None)
        reason = unavailable_reason()
        if reason is not None:
            results["amqp"] = {"skipped": reason}
            return results
        with tempfile.TemporaryDirectory(prefix="llmw-bench-rabbit-") as folder:
            server = RabbitServer(Path(folder)).start()
            try:
                results["amqp"] = _round(
                    stack, jobs=jobs, concurrency=concurrency, broker=server.url
                )
            finally:
                server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    results = run(jobs=args.jobs, concurrency=args.concurrency)
    print(f"| broker | submit {args.jobs} (s) | jobs/s | submit to last end (s) | jobs/s |")
    print("|---|---|---|---|---|")
    for name, row in results.items():
        if "skipped" in row:
            print(f"| {name} | skipped: {row['skipped']} | | | |")
            continue
        print(
            f"| {name} | {row['submit_s']} | {row['submit_jobs_per_s']} | {row['drain_s']} | "
            f"{row['drain_jobs_per_s']} |"
        )


if __name__ == "__main__":
    main()
