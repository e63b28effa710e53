"""Streaming: the delay from a chunk leaving the simulator to a subscriber receiving it, and
events per second through one worker process; a direct asyncio client reads the same streams.

The simulator stamps each delta with its send time (the ``stamp=1`` directive); a subscriber
on the jobs' pub/sub channels (``PSUBSCRIBE llmw:channel:*``) notes when each chunk arrives.
A coalesced chunk carries its first delta's stamp, so its delay is its oldest text's.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

import orjson
import redis

from bench.jobs import request, stage_ours
from bench.stack import API_KEY, ROOT, Stack
from bench.stats import median, percentile


class Subscriber(threading.Thread):
    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub()
        self.pubsub.psubscribe("llmw:channel:*")
        self.delays_ms: list[float] = []
        self.first_ms: list[float] = []
        self._seen: set[str] = set()
        self.running = True

    def run(self) -> None:
        while self.running:
            message = self.pubsub.get_message(timeout=0.2)
            if message is None or message["type"] != "pmessage":
                continue
            now = time.time()
            event = orjson.loads(message["data"])
            sent = (event.get("event") or {}).get("sim_sent_at")
            if event.get("type") != "chunk" or sent is None:
                continue
            delay = (now - sent) * 1000
            self.delays_ms.append(delay)
            if event["job_id"] not in self._seen:
                self._seen.add(event["job_id"])
                self.first_ms.append(delay)

    def stop(self) -> None:
        self.running = False
        self.join(timeout=5)
        self.pubsub.close()
        self.client.close()


def _direct(stack: Stack, jobs: int, concurrency: int, prompt: str) -> dict[str, Any]:
    args = [sys.executable, "-m", "bench.direct", stack.sim_url, API_KEY]
    args += [str(jobs), str(concurrency), prompt]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, check=True, timeout=600)
    result: dict[str, Any] = orjson.loads(out.stdout.splitlines()[-1])
    return result


def run(*, jobs: int, tokens: int, tps: int, throughput_jobs: int, repeat: int) -> dict[str, Any]:
    paced = f"stream [[sim tokens={tokens} tps={tps} stamp=1]]"
    unpaced = f"stream fast [[sim tokens={tokens}]]"
    rounds: list[dict[str, Any]] = []
    with Stack() as stack:
        concurrency = max(jobs, throughput_jobs)
        with stack.worker("worker.celery_app", concurrency=concurrency, queue="q-llmw") as w:
            stage_ours(stack, "q-llmw", [request("warm [[sim tokens=5]]", stream=True)])
            stack.release("q-llmw")
            stack.drain("q-llmw", w, 60)
            for _ in range(repeat):
                sub = Subscriber(stack.redis_url)
                sub.start()
                stage_ours(stack, "q-llmw", [request(paced, stream=True)] * jobs)
                stack.release("q-llmw")
                stack.drain("q-llmw", w, 600)
                time.sleep(0.2)
                sub.stop()
                direct = _direct(stack, jobs, jobs, paced)
                # Unpaced: how many upstream events per second one worker process turns
                # into published chunks.
                stage_ours(stack, "q-llmw", [request(unpaced, stream=True)] * throughput_jobs)
                cmds_before = stack.commandstats().get("xadd", 0)
                started = stack.release("q-llmw")
                wall = stack.drain("q-llmw", w, 600) - started
                xadds = stack.commandstats().get("xadd", 0) - cmds_before
                direct_fast = _direct(stack, throughput_jobs, throughput_jobs, unpaced)
                events = throughput_jobs * (tokens + 7)  # deltas + start/stop/message events
                rounds.append(
                    {
                        "delay_p50_ms": percentile(sub.delays_ms, 50),
                        "delay_p99_ms": percentile(sub.delays_ms, 99),
                        "first_chunk_p50_ms": percentile(sub.first_ms, 50),
                        "chunks_received": len(sub.delays_ms),
                        "direct_delay_p50_ms": percentile(direct["delays_ms"], 50),
                        "direct_delay_p99_ms": percentile(direct["delays_ms"], 99),
                        "events_per_s": events / wall,
                        "chunk_events_per_s": (xadds - 2 * throughput_jobs) / wall,
                        "direct_events_per_s": direct_fast["events"] / direct_fast["wall_s"],
                    }
                )
    keys = rounds[0].keys()
    summary = {k: median([r[k] for r in rounds]) for k in keys}
    return {
        "jobs": jobs,
        "tokens": tokens,
        "tps": tps,
        "throughput_jobs": throughput_jobs,
        "repeat": repeat,
        "rounds": rounds,
        "summary": summary,
    }
