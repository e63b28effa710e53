"""The price of counting cost at a job's end: ``finish.lua`` with and without the usage step.

``python -m bench.job_end [--jobs 5000] [--rounds 5]`` ends JOBS fresh jobs through
``WorkerStore.finish`` against an embedded Redis, once adding a tenant's usage and spend
(what every completed job does since prices and budgets) and once without, alternating
rounds, and prints the median time per end and Redis's CPU per end for each.
"""

from __future__ import annotations

import argparse
import time
import uuid

import redis

from bench.stats import median
from worker import events as ev
from worker.dev.embedded import EmbeddedRedis
from worker.keys import Keys
from worker.runtime.job_store import Spend, WorkerStore

MESSAGE = {"type": "message", "role": "assistant", "content": [{"type": "text", "text": "hi"}]}
USAGE = {"input_tokens": 1234, "output_tokens": 567}


def _redis_cpu_s(client: redis.Redis[bytes]) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _round(store: WorkerStore, jobs: int, *, with_spend: bool) -> tuple[float, float]:
    """Seconds per end (wall) and Redis CPU seconds per end."""
    spend = Spend("acme", "deepseek-ai/DeepSeek-V3", "2026-12-06", "2026-12", 1234, 567, 957_060)
    tag = uuid.uuid4().hex[:8]
    cpu0 = _redis_cpu_s(store.redis)
    start = time.perf_counter()
    for n in range(jobs):
        job_id = f"{tag}-{n}"
        store.finish(
            job_id,
            ev.make_event(job_id, 1, 1, ev.COMPLETED, message=MESSAGE),
            message=MESSAGE,
            usage=USAGE,
            answered_by="deepseek-ai/DeepSeek-V3",
            cost_usd="0.00095706",
            spend=spend if with_spend else None,
        )
    wall = time.perf_counter() - start
    return wall / jobs, (_redis_cpu_s(store.redis) - cpu0) / jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        store = WorkerStore(client, Keys("bench"), result_ttl_s=600)
        results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for _ in range(args.rounds):
            for with_spend in (False, True):
                results[with_spend].append(_round(store, args.jobs, with_spend=with_spend))
        for with_spend, label in ((False, "end only"), (True, "end + usage and spend")):
            walls = [w for w, _ in results[with_spend]]
            cpus = [c for _, c in results[with_spend]]
            print(
                f"{label:24s} {median(walls) * 1e6:7.1f} us/end (wall)   "
                f"{median(cpus) * 1e6:6.1f} us/end (Redis CPU)"
            )


if __name__ == "__main__":
    main()
