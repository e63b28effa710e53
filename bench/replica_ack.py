"""``python -m bench.replica_ack [--jobs 300]``: what ``LLM_WORKER_REDIS_MIN_REPLICAS_ACK``
costs a producer, on a master, a replica and three Sentinels on this machine
(``worker.dev.sentinel``): single submits (p50, p99) and one ``submit_many`` of 1,000 jobs,
with the wait off (0) and on (1). No worker runs; the jobs only queue.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from worker.client.sync import Client
from worker.dev.sentinel import SentinelGroup
from worker.settings import load_settings

REQUEST = {
    "model": "deepseek-ai/DeepSeek-V3",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "hi"}],
}


def measure(group: SentinelGroup, acks: int, jobs: int) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    settings = load_settings(
        redis_url=group.url,
        redis_sentinel_master=group.master_name,
        redis_min_replicas_ack=acks,
        queue=f"bench-{tag}",
        key_prefix=f"bench{tag}",
    )
    with Client(settings) as client:
        client.submit(REQUEST)  # connect and load the script first
        single = []
        for _ in range(jobs):
            start = time.perf_counter()
            client.submit(REQUEST)
            single.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        client.submit_many([REQUEST] * 1000)
        many_s = time.perf_counter() - start
    single.sort()
    return {
        "min_replicas_ack": acks,
        "submit_p50_ms": statistics.median(single),
        "submit_p99_ms": single[int(0.99 * (len(single) - 1))],
        "submit_many_1000_s": many_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=300)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="llmw-bench-ha-") as folder,
        SentinelGroup(Path(folder)) as group,
    ):
        rows = [measure(group, acks, args.jobs) for acks in (0, 1, 0, 1)]
    print("| MIN_REPLICAS_ACK | submit p50 ms | submit p99 ms | submit_many(1000) s |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['min_replicas_ack']} | {row['submit_p50_ms']:.2f} | "
            f"{row['submit_p99_ms']:.2f} | {row['submit_many_1000_s']:.3f} |"
        )


if __name__ == "__main__":
    main()
