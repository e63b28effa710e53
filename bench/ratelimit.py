"""Rate limit benchmark: 4 worker processes against a provider limit, ours versus Celery's.

``python -m bench.ratelimit [--rpm 40 --window-s 10 --measure-s 30 --workers 4]``

Each scenario gets a fresh Redis key space, a fresh simulator that enforces ``--rpm``
requests per ``--window-s`` (429 with ``retry-after`` past it), and ``--workers`` gevent
worker processes; then more jobs than ``--measure-s`` seconds of the limit can serve are
queued at once, and the run ends when all are done. Scenarios:

* ``llm-worker``: this service, ``RATE_LIMITS={"default": {"rpm": N}}`` (its period set to
  the window), the limit shared by every process through Redis;
* ``celery rate_limit (limit per task)``: a plain Celery task doing one httpx call with
  ``rate_limit`` set to the provider's limit, retrying a 429 after its ``retry-after``
  (Celery counts the rate per worker process);
* ``celery rate_limit (limit / workers)``: the same with the limit split by hand.

Reported per scenario, from the simulator's own log: the achieved rate over the first
``--measure-s`` seconds (from the first accepted call) as a share of the limit, the 429s,
the wasted upstream calls (every call that produced no answer) and the wall time. A window
of 60 s is the real-world setting; the default 10 s keeps a run to about two minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench.stack import MODEL, ROOT, stop, wait_for
from worker.dev.embedded import EmbeddedRedis, free_port

API_KEY = "sk-bench-ratelimit"


def _start_simulator(rpm: int, window_s: float) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = ["--port", str(port), "--ttft-ms", "20", "--api-key", API_KEY]
    limits = ["--rpm", str(rpm), "--window-s", str(window_s)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "simulate", *args, *limits],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, 20, "the simulator")
    return proc, url


def _start_workers(
    app: str, env: dict[str, str], queue: str, n: int, concurrency: int
) -> list[Any]:
    args = [sys.executable, "-m", "celery", "-A", app, "worker", "-P", "gevent"]
    args += ["-c", str(concurrency), "-Q", queue, "--without-gossip", "--without-mingle"]
    args += ["--loglevel", "WARNING"]
    return [
        subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(n)
    ]


def _wait_consuming(broker_url: str, n: int) -> None:
    """Every worker answers a ping: all of them consume before any job is queued."""
    from celery import Celery

    probe = Celery("bench-probe", broker=broker_url)
    wait_for(lambda: len(probe.control.ping(timeout=1.0) or []) >= n, 60, f"{n} workers")


def _stop(procs: list[Any]) -> None:
    """Stop them all at once: terminate every one, then wait for each."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        stop(proc, timeout_s=30)


def _request(i: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 16,
        "stream": i % 2 == 0,
        "messages": [{"role": "user", "content": f"bench {i}"}],
    }


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("LLM_WORKER_", "BENCH_"))}


def run_ours(redis_url: str, opts: argparse.Namespace, jobs: int) -> dict[str, Any]:
    from worker.client.sync import Client
    from worker.settings import settings_from_env

    sim, sim_url = _start_simulator(opts.rpm, opts.window_s)
    tag = uuid.uuid4().hex[:8]
    env = {
        **_base_env(),
        "LLM_WORKER_REDIS_URL": redis_url,
        "LLM_WORKER_API_BASE_URL": sim_url,
        "LLM_WORKER_API_KEY": API_KEY,
        "LLM_WORKER_ALLOWED_MODELS": "",
        "LLM_WORKER_RATE_LIMITS": json.dumps({"default": {"rpm": opts.rpm}}),
        "LLM_WORKER_RATE_LIMIT_PERIOD_S": str(opts.window_s),
        "LLM_WORKER_KEY_PREFIX": f"bench{tag}",
        "LLM_WORKER_QUEUE": f"bench{tag}",
        "LLM_WORKER_METRICS_PORT": "0",
        "LLM_WORKER_LOG_LEVEL": "WARNING",
        "LLM_WORKER_CONCURRENCY": str(opts.concurrency),
    }
    workers = _start_workers(
        "worker.celery_app", env, f"bench{tag}", opts.workers, opts.concurrency
    )
    try:
        _wait_consuming(redis_url, opts.workers)
        started = time.monotonic()
        with Client(settings_from_env(env)) as client:
            handles = client.submit_many([_request(i) for i in range(jobs)])
            deadline = started + opts.timeout_s
            done = sum(
                1 for job in handles if job.result(timeout=max(0.1, deadline - time.monotonic()))
            )
        wall_s = time.monotonic() - started
        stats = httpx.get(f"{sim_url}/stats", timeout=30).json()
    finally:
        _stop(workers)
        _stop([sim])
    return _summary("llm-worker (shared limiter)", stats, done, jobs, wall_s, opts=opts)


def run_celery(
    redis_url: str, opts: argparse.Namespace, jobs: int, *, split: bool
) -> dict[str, Any]:
    import redis
    from celery import Celery

    sim, sim_url = _start_simulator(opts.rpm, opts.window_s)
    queue = f"baseline{uuid.uuid4().hex[:8]}"
    per_s = opts.rpm / opts.window_s / (opts.workers if split else 1)
    env = {
        **_base_env(),
        "BENCH_BROKER_URL": redis_url,
        "BENCH_API_URL": sim_url,
        "BENCH_API_KEY": API_KEY,
        "BENCH_RATE_LIMIT": f"{per_s}/s",
        "BENCH_QUEUE": queue,
    }
    workers = _start_workers("bench.ratelimit_baseline", env, queue, opts.workers, opts.concurrency)
    counter = redis.Redis.from_url(redis_url)
    try:
        _wait_consuming(redis_url, opts.workers)
        producer = Celery("bench-producer", broker=redis_url)
        started = time.monotonic()
        for i in range(jobs):
            producer.send_task("baseline.call", args=[_request(i)], queue=queue)

        def finished() -> bool:
            return int(counter.get(f"{queue}:done") or 0) >= jobs

        with contextlib.suppress(TimeoutError):  # reported as fewer jobs done
            wait_for(finished, opts.timeout_s, "the baseline jobs")
        wall_s = time.monotonic() - started
        done = int(counter.get(f"{queue}:done") or 0)
        stats = httpx.get(f"{sim_url}/stats", timeout=30).json()
    finally:
        _stop(workers)
        _stop([sim])
        counter.close()
    name = "celery rate_limit (limit / workers)" if split else "celery rate_limit (limit per task)"
    return _summary(name, stats, done, jobs, wall_s, opts=opts)


def _summary(
    name: str,
    stats: dict[str, Any],
    done: int,
    jobs: int,
    wall_s: float,
    *,
    opts: argparse.Namespace,
) -> dict[str, Any]:
    accepted = sorted(
        r["ts"] for r in stats["requests_log"] if not r["rate_limited"] and r["status"] == 200
    )
    start = accepted[0] if accepted else 0.0
    in_measure = sum(1 for ts in accepted if ts < start + opts.measure_s)
    allowed = opts.rpm * opts.measure_s / opts.window_s
    busiest = max(
        (sum(1 for t in accepted if s <= t < s + opts.window_s) for s in accepted), default=0
    )
    return {
        "scenario": name,
        "jobs": jobs,
        "jobs_done": done,
        "achieved_per_s": round(in_measure / opts.measure_s, 3),
        "achieved_share_of_limit": round(in_measure / allowed, 4),
        "busiest_window": busiest,
        "upstream_calls": stats["requests"],
        "http_429": stats["rate_limited"],
        "wasted_calls": stats["requests"] - len(accepted),
        "wall_s": round(wall_s, 2),
    }


def _table(results: list[dict[str, Any]], opts: argparse.Namespace) -> str:
    limit = f"limit {opts.rpm} per {opts.window_s:g} s = {opts.rpm / opts.window_s:g}/s"
    head = (
        f"{'scenario':38} {'achieved/s':>10} {'of limit':>9} {'429s':>6} {'wasted':>7} "
        f"{'calls':>6} {'done':>9} {'wall s':>7}"
    )
    lines = [f"rate limit benchmark: {opts.workers} workers, {limit}", head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['scenario']:38} {r['achieved_per_s']:>10.2f} "
            f"{r['achieved_share_of_limit']:>8.1%} {r['http_429']:>6} {r['wasted_calls']:>7} "
            f"{r['upstream_calls']:>6} {r['jobs_done']:>4}/{r['jobs']:<4} {r['wall_s']:>7.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ratelimit", description=__doc__)
    parser.add_argument("--rpm", type=int, default=40, help="requests allowed per window")
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--measure-s", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=40)
    parser.add_argument("--timeout-s", type=float, default=180.0)
    parser.add_argument("--only", choices=["ours", "celery", "celery-split"], action="append")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ratelimit.json")
    opts = parser.parse_args(argv)
    # More than the measured span can serve, so the limit is the bottleneck throughout.
    jobs = int(opts.rpm * (opts.measure_s / opts.window_s + 0.5))
    chosen = opts.only or ["ours", "celery", "celery-split"]
    results = []
    with EmbeddedRedis() as server:
        for scenario in chosen:
            if scenario == "ours":
                results.append(run_ours(server.url, opts, jobs))
            else:
                results.append(run_celery(server.url, opts, jobs, split=scenario == "celery-split"))
            print(json.dumps(results[-1]), flush=True)
    print(_table(results, opts))
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(opts).items() if k not in {"out", "only"}}
    opts.out.write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    print(f"saved {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
