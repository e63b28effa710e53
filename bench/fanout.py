"""Fan-out: N streamed jobs of about 2 s each through one worker (``llm-worker run``, with one
gevent process or several sharing the concurrency), against the ideal for its concurrency
(ceil(N / c) x 2 s) and against a direct asyncio httpx client reading the same streams with
the same concurrency (``bench.direct``, in its own process)."""

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


def direct_run(stack: Stack, jobs: int, concurrency: int) -> dict[str, Any]:
    """``bench.direct`` in its own process: its result line, plus its peak RSS."""
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


def _ours(stack: Stack, jobs: int, concurrency: int, processes: int) -> dict[str, Any]:
    with stack.llmw_run(
        concurrency=concurrency // processes, processes=processes, queue="q-llmw"
    ) as w:
        # One warm-up job per worker slot: every process is consuming before the clock starts.
        warm = [request("warm [[sim tokens=5]]", stream=True)] * concurrency
        stage_ours(stack, "q-llmw", warm)
        stack.release("q-llmw")
        stack.drain("q-llmw", w, 120)
        stage_ours(stack, "q-llmw", [request(PROMPT, stream=True)] * jobs)
        cpu_before = w.cpu_s()
        started = stack.release("q-llmw")
        wall = stack.drain("q-llmw", w, 1200) - started
        return {"wall_s": wall, "peak_rss_mb": w.peak_rss / 1e6, "cpu_s": w.cpu_s() - cpu_before}


def run(
    *, jobs: int, concurrencies: list[int], repeat: int, processes: list[int] | None = None
) -> dict[str, Any]:
    """``processes``: the process counts to try at each concurrency (default [1]); a count
    only where each process gets at least 100 streams."""
    points: list[dict[str, Any]] = []
    with Stack() as stack:
        for concurrency in concurrencies:
            counts = [p for p in processes or [1] if p == 1 or concurrency // p >= 100]
            ideal = math.ceil(jobs / concurrency) * JOB_S
            rounds: dict[int, list[dict[str, Any]]] = {p: [] for p in counts}
            directs = []
            for _ in range(repeat):
                for p in counts:
                    rounds[p].append(_ours(stack, jobs, concurrency, p))
                directs.append(direct_run(stack, jobs, concurrency))
            for p in counts:
                points.append(
                    _point(
                        jobs=jobs,
                        concurrency=concurrency,
                        processes=p,
                        ideal=ideal,
                        ours=rounds[p],
                        directs=directs,
                    )
                )
    return {"jobs": jobs, "job_s": JOB_S, "repeat": repeat, "points": points}


def _point(
    *,
    jobs: int,
    concurrency: int,
    processes: int,
    ideal: float,
    ours: list[dict[str, Any]],
    directs: list[dict[str, Any]],
) -> dict[str, Any]:
    ours_wall = median([o["wall_s"] for o in ours])
    direct_wall = median([d["wall_s"] for d in directs])
    return {
        "concurrency": concurrency,
        "processes": processes,
        "ideal_s": ideal,
        "wall_s": ours_wall,
        "vs_ideal": ours_wall / ideal,
        "peak_rss_mb": max(o["peak_rss_mb"] for o in ours),
        "cpu_s": median([o["cpu_s"] for o in ours]),
        "jobs_per_s": jobs / ours_wall,
        "direct_wall_s": direct_wall,
        "direct_vs_ideal": direct_wall / ideal,
        "direct_peak_rss_mb": max(d["peak_rss_mb"] for d in directs),
        "direct_jobs_per_s": jobs / direct_wall,
        "vs_direct": ours_wall / direct_wall,
    }
