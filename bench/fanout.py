"""Fan-out: N streamed jobs of about 2 s each through one worker process, against the ideal
for its concurrency (ceil(N / c) x 2 s) and against a direct asyncio httpx client reading the
same streams with the same concurrency (``bench.direct``, in its own process)."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from typing import Any

import orjson
import psutil

from bench.jobs import request, stage_ours
from bench.stack import API_KEY, ROOT, Stack
from bench.stats import median

TOKENS, TPS = 61, 30  # 60 gaps of 1/30 s: 2.0 s per stream
JOB_S = (TOKENS - 1) / TPS
PROMPT = f"fan out [[sim tokens={TOKENS} tps={TPS}]]"


def _direct(stack: Stack, jobs: int, concurrency: int) -> dict[str, Any]:
    args = [sys.executable, "-m", "bench.direct", stack.sim_url, API_KEY]
    args += [str(jobs), str(concurrency), PROMPT]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    assert proc.stdout is not None
    result: dict[str, Any] = orjson.loads(proc.stdout.read().splitlines()[-1])
    result["peak_rss_mb"] = peak / 1e6
    return result


def _ours(stack: Stack, jobs: int, concurrency: int) -> dict[str, Any]:
    with stack.worker("worker.celery_app", concurrency=concurrency, queue="q-llmw") as w:
        stage_ours(stack, "q-llmw", [request("warm [[sim tokens=5]]", stream=True)])
        stack.release("q-llmw")
        stack.drain("q-llmw", w, 60)
        stage_ours(stack, "q-llmw", [request(PROMPT, stream=True)] * jobs)
        cpu_before = w.cpu_s()
        started = stack.release("q-llmw")
        wall = stack.drain("q-llmw", w, 1200) - started
        return {"wall_s": wall, "peak_rss_mb": w.peak_rss / 1e6, "cpu_s": w.cpu_s() - cpu_before}


def run(*, jobs: int, concurrencies: list[int], repeat: int) -> dict[str, Any]:
    points: list[dict[str, Any]] = []
    with Stack() as stack:
        for concurrency in concurrencies:
            ideal = math.ceil(jobs / concurrency) * JOB_S
            rounds = []
            for _ in range(repeat):
                ours = _ours(stack, jobs, concurrency)
                direct = _direct(stack, jobs, concurrency)
                rounds.append((ours, direct))
            ours_wall = median([o["wall_s"] for o, _ in rounds])
            direct_wall = median([d["wall_s"] for _, d in rounds])
            points.append(
                {
                    "concurrency": concurrency,
                    "ideal_s": ideal,
                    "wall_s": ours_wall,
                    "vs_ideal": ours_wall / ideal,
                    "peak_rss_mb": max(o["peak_rss_mb"] for o, _ in rounds),
                    "cpu_s": median([o["cpu_s"] for o, _ in rounds]),
                    "jobs_per_s": jobs / ours_wall,
                    "direct_wall_s": direct_wall,
                    "direct_vs_ideal": direct_wall / ideal,
                    "direct_peak_rss_mb": max(d["peak_rss_mb"] for _, d in rounds),
                    "direct_jobs_per_s": jobs / direct_wall,
                    "vs_direct": ours_wall / direct_wall,
                }
            )
    return {"jobs": jobs, "job_s": JOB_S, "repeat": repeat, "points": points}
