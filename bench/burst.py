"""Burst: N streamed jobs of 2 s submitted at once to one ``llm-worker run`` at its defaults
(nothing set but the Redis URL, the upstream and its key), until the last one ended; against
a direct asyncio httpx client reading the same N streams at once from the same upstream
(``bench.direct``, its own process), in the same round.

Each round runs both, one after the other (ours first, then the direct client), so that the
ratio compares two runs seconds apart. Measured per round: wall time, CPU per job of the
worker (every process of ``llm-worker run``), of Redis, of the simulator and of the direct
client. With ``profile=True`` one extra round of ours runs under py-spy and its summary says
where the worker's CPU goes (:mod:`bench.profile`).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import orjson

from bench import profile as prof
from bench.fanout import PROMPT, TOKENS, TPS, direct_run
from bench.jobs import request, stage_ours
from bench.stack import Process, Stack
from bench.stats import median, percentile
from worker.keys import Keys

QUEUE = "q-burst"
PROFILE_LEAD_S = 2.0
WARM_JOBS = 512  # more than the default slots of any core count here: every process warms up


def _timeline(stack: Stack, ids: list[str], released_at: float) -> dict[str, float]:
    """When the jobs started (their ``started`` event) and ended, after the release."""
    keys = Keys("llmw")
    pipe = stack.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.xrange(keys.events(job_id), count=1)
        pipe.xrevrange(keys.events(job_id), count=1)
    replies = pipe.execute()
    starts, runs = [], []
    for first, last in zip(replies[::2], replies[1::2], strict=True):
        if not first or not last:
            continue
        begun = orjson.loads(first[0][1][b"data"])["ts"]
        starts.append(begun - released_at)
        runs.append(orjson.loads(last[0][1][b"data"])["ts"] - begun)
    return {
        "start_p50_s": percentile(starts, 50),
        "start_p90_s": percentile(starts, 90),
        "start_max_s": max(starts, default=float("nan")),
        "run_p50_s": percentile(runs, 50),
        "run_max_s": max(runs, default=float("nan")),
    }


def _ours(stack: Stack, worker: Process, jobs: int, *, profile: bool = False) -> dict[str, Any]:
    ids = stage_ours(stack, QUEUE, [request(PROMPT, stream=True)] * jobs)
    cpu, redis_cpu, sim_cpu = worker.cpu_s(), stack.redis_cpu_s(), stack.simulator.cpu_s()
    stacks: list[str] | None = None
    recorder = None
    if profile:

        def sample() -> None:
            nonlocal stacks
            stacks = prof.record(worker.proc.pid, PROFILE_LEAD_S + TOKENS / TPS + 2)

        recorder = threading.Thread(target=sample, daemon=True)
        recorder.start()
        time.sleep(PROFILE_LEAD_S)  # py-spy attaches to every process before the release
    released_at = time.time()
    started = stack.release(QUEUE)
    wall = stack.drain(QUEUE, worker, 600) - started
    out: dict[str, Any] = {
        "wall_s": wall,
        **_timeline(stack, ids, released_at),
        "worker_cpu_ms_per_job": (worker.cpu_s() - cpu) * 1000 / jobs,
        "redis_cpu_ms_per_job": (stack.redis_cpu_s() - redis_cpu) * 1000 / jobs,
        "simulator_cpu_ms_per_job": (stack.simulator.cpu_s() - sim_cpu) * 1000 / jobs,
    }
    if recorder is not None:
        recorder.join()
        out["profile"] = prof.summarise(stacks) if stacks else None
    return out


def run(*, jobs: int, repeat: int, profile: bool = True) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    profiled = None
    with Stack() as stack, stack.llmw_run(concurrency=None, processes=None, queue=QUEUE) as w:
        # Warm-up: imports, connections, every process consuming before the clock starts.
        stage_ours(stack, QUEUE, [request("warm [[sim tokens=5]]", stream=True)] * WARM_JOBS)
        stack.release(QUEUE)
        stack.drain(QUEUE, w, 180)
        processes = len(w.ps.children(recursive=False)) or 1
        for _ in range(repeat):
            ours = _ours(stack, w, jobs)
            direct = direct_run(stack, jobs, jobs)
            ours["direct_wall_s"] = direct["wall_s"]
            ours["direct_cpu_ms_per_job"] = direct["cpu_s"] * 1000 / jobs
            ours["direct_peak_rss_mb"] = direct["peak_rss_mb"]
            ours["vs_direct"] = ours["wall_s"] / direct["wall_s"]
            ours["cpu_vs_direct"] = ours["worker_cpu_ms_per_job"] / ours["direct_cpu_ms_per_job"]
            rounds.append(ours)
        peak_rss_mb = w.peak_rss / 1e6
        if profile and prof.available():
            profiled = _ours(stack, w, jobs, profile=True).get("profile")
    keys = [k for k in rounds[0] if isinstance(rounds[0][k], float)]
    summary = {k: median([r[k] for r in rounds]) for k in keys}
    return {
        "jobs": jobs,
        "job_s": (TOKENS - 1) / TPS,
        "repeat": repeat,
        "worker_processes": processes,
        "peak_rss_mb": peak_rss_mb,
        "rounds": rounds,
        "summary": summary,
        "profile": profiled,
    }
