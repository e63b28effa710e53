"""The price of a tenant's queued quota at submit: ``submit.lua`` with and without it.

``python -m bench.tenant_submit [--jobs 5000] [--rounds 5] [--batch 100]`` submits JOBS jobs
through ``Client.submit_many`` (BATCH per call) against an embedded Redis whose queue no
worker reads, alternating rounds of jobs without a tenant (no quota) and of a tenant's jobs
(the quota counted in the same script: a sorted set trimmed, counted and added to), and
prints the median time per submitted job and Redis's CPU per job for each. Each round's jobs
are cancelled before the next (cancel gives the quota's places back), so the set stays small.
"""

from __future__ import annotations

import argparse
import time
import uuid

import redis

from bench.stats import median
from worker.client.sync import Client
from worker.dev.embedded import EmbeddedRedis
from worker.settings import load_settings

REQUEST = {
    "model": "deepseek-ai/DeepSeek-V3",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hello"}],
}


def _redis_cpu_s(client: redis.Redis[bytes]) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _round(client: Client, jobs: int, batch: int, tenant: str | None) -> tuple[float, float]:
    """Seconds per submitted job (wall) and Redis CPU seconds per job."""
    tag = uuid.uuid4().hex[:8]
    cpu0 = _redis_cpu_s(client.redis)
    start = time.perf_counter()
    made = []
    for first in range(0, jobs, batch):
        ids = [f"{tag}-{n}" for n in range(first, min(jobs, first + batch))]
        made += client.submit_many([REQUEST] * len(ids), job_ids=ids, tenant=tenant)
    wall = time.perf_counter() - start
    cpu = _redis_cpu_s(client.redis) - cpu0
    for job in made:
        job.cancel()
    client.redis.delete(client.settings.queue)
    return wall / jobs, cpu / jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    with EmbeddedRedis() as server:
        settings = load_settings(redis_url=server.url, queue="bench-idle", key_prefix="bench")
        with Client(settings) as client:
            results: dict[str | None, list[tuple[float, float]]] = {None: [], "acme": []}
            for _ in range(args.rounds):
                for tenant in (None, "acme"):
                    results[tenant].append(_round(client, args.jobs, args.batch, tenant))
        for tenant, label in ((None, "no tenant (no quota)"), ("acme", "tenant, quota counted")):
            walls = [w for w, _ in results[tenant]]
            cpus = [c for _, c in results[tenant]]
            print(
                f"{label:24s} {median(walls) * 1e6:7.1f} us/job (wall)   "
                f"{median(cpus) * 1e6:6.1f} us/job (Redis CPU)"
            )


if __name__ == "__main__":
    main()
