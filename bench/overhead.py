"""Overhead: non-streamed jobs against a zero-latency upstream, ours against two baselines.

Three workers run side by side on their own queues, with the same pool and concurrency:
``llmw`` (ours), ``plain`` (a Celery task doing one httpx call) and ``empty`` (a Celery task
doing nothing). Each round stages N jobs for one of them, releases them at once, and times
until the queue is idle (every message acknowledged, which with late acks is after the task
returned). Rounds alternate between the workers so that drift hits all three alike.
Also measured per job: the worker's CPU, Redis's CPU and Redis commands (``INFO
commandstats``).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

from bench.baseline_app import EMPTY_TASK, PLAIN_TASK
from bench.jobs import request, stage_baseline, stage_ours
from bench.stack import Process, Stack
from bench.stats import median

PROMPT = "Say something short [[sim tokens=20]]"
VARIANTS = ("llmw", "plain", "empty")


def _stage(stack: Stack, variant: str, jobs: int) -> None:
    if variant == "llmw":
        stage_ours(stack, "q-llmw", [request(PROMPT, stream=False)] * jobs)
    elif variant == "plain":
        stage_baseline(stack, "q-plain", PLAIN_TASK, [[request(PROMPT, stream=False)]] * jobs)
    else:
        stage_baseline(stack, "q-empty", EMPTY_TASK, [[]] * jobs)


def _round(stack: Stack, variant: str, worker: Process, jobs: int) -> dict[str, float]:
    queue = f"q-{variant}"
    _stage(stack, variant, jobs)
    cmds_before = stack.commandstats()
    cpu_before, redis_cpu_before = worker.cpu_s(), stack.redis_cpu_s()
    started = stack.release(queue)
    ended = stack.drain(queue, worker, timeout_s=600)
    cpu, redis_cpu = worker.cpu_s() - cpu_before, stack.redis_cpu_s() - redis_cpu_before
    cmds_after = stack.commandstats()
    # Our own polling (LLEN, HLEN, INFO) is not the worker's cost.
    calls = {
        k: v - cmds_before.get(k, 0)
        for k, v in cmds_after.items()
        if k not in {"llen", "hlen", "info", "rename"} and v > cmds_before.get(k, 0)
    }
    wall = ended - started
    return {
        "wall_s": wall,
        "jobs_per_s": jobs / wall,
        "worker_cpu_ms_per_job": cpu * 1000 / jobs,
        "redis_cpu_ms_per_job": redis_cpu * 1000 / jobs,
        "redis_cmds_per_job": sum(calls.values()) / jobs,
        "redis_cmds": {k: round(v / jobs, 2) for k, v in sorted(calls.items())},
    }


def run(*, jobs: int, concurrency: int, repeat: int) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with Stack() as stack, ExitStack() as workers:
        procs = {
            "llmw": workers.enter_context(
                stack.worker("worker.celery_app", concurrency=concurrency, queue="q-llmw")
            ),
            "plain": workers.enter_context(
                stack.worker("bench.baseline_app", concurrency=concurrency, queue="q-plain")
            ),
            "empty": workers.enter_context(
                stack.worker("bench.baseline_app", concurrency=concurrency, queue="q-empty")
            ),
        }
        for variant, proc in procs.items():  # warm up: imports, connections, first requests
            _round(stack, variant, proc, min(jobs, 200))
        for _ in range(repeat):
            for variant in VARIANTS:
                rounds[variant].append(_round(stack, variant, procs[variant], jobs))
                time.sleep(0.5)
    summary = {
        v: {
            key: median([r[key] for r in rs])
            for key in ("jobs_per_s", "worker_cpu_ms_per_job", "redis_cpu_ms_per_job")
        }
        | {"redis_cmds_per_job": rs[-1]["redis_cmds_per_job"], "redis_cmds": rs[-1]["redis_cmds"]}
        for v, rs in rounds.items()
    }
    ours, plain, empty = (summary[v]["jobs_per_s"] for v in VARIANTS)
    return {
        "jobs": jobs,
        "concurrency": concurrency,
        "repeat": repeat,
        "rounds": rounds,
        "summary": summary,
        "ratio_vs_plain": ours / plain,
        "ratio_vs_empty": ours / empty,
    }
