"""``llm-worker demo``: the dev stack, a fan-out of streamed jobs shown live, then a summary."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from worker import events as ev

TOPICS = [
    "message queues",
    "rate limits",
    "retries with jitter",
    "streaming tokens",
    "Redis streams",
    "idempotent jobs",
    "dead letters",
    "backpressure",
    "Prometheus histograms",
    "graceful shutdown",
]


@dataclass
class Progress:
    submitted_at: float
    state: str = "queued"
    first_chunk_at: float | None = None
    ended_at: float | None = None
    chunks: int = 0
    text: str = ""
    output_tokens: int = 0
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _requests(count: int) -> list[dict[str, Any]]:
    return [
        {
            "model": "deepseek-ai/DeepSeek-V3",
            "max_tokens": 120,
            "stream": True,
            "messages": [
                {
                    "role": "user",
                    "content": f"In a few sentences, explain {TOPICS[i % len(TOPICS)]} (#{i}).",
                }
            ],
        }
        for i in range(count)
    ]


def _follow(job: Any, progress: Progress) -> None:
    for event in job.events(timeout=600):
        kind = event["type"]
        with progress.lock:
            if kind == ev.STARTED:
                progress.state = "running"
            elif kind == ev.CHUNK:
                progress.chunks += 1
                text = ev.text_of(event)
                if text and progress.first_chunk_at is None:
                    progress.first_chunk_at = time.time()
                progress.text += text
            elif kind == ev.RETRY:
                progress.retries += 1
                progress.text = ""
            elif kind in ev.TERMINAL_TYPES:
                progress.state = kind
                progress.ended_at = time.time()
                if kind == ev.COMPLETED:
                    progress.output_tokens = int(event["message"]["usage"].get("output_tokens", 0))


def _view(progress: list[Progress], started: float) -> Any:
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    counts: dict[str, int] = {}
    for p in progress:
        counts[p.state] = counts.get(p.state, 0) + 1
    done = sum(1 for p in progress if p.ended_at is not None)
    width = 40
    bar = "#" * int(width * done / len(progress)) + "-" * (
        width - int(width * done / len(progress))
    )
    summary = "  ".join(f"{state}: {n}" for state, n in sorted(counts.items()))
    line = Text(f"[{bar}] {done}/{len(progress)}  {summary}  {time.time() - started:5.1f} s")
    return Group(
        Panel(
            Text(progress[0].text[-600:] or "(waiting for the first token)"), title="job 1, live"
        ),
        line,
    )


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_demo(*, jobs: int, concurrency: int, tps: float, metrics: bool = False) -> int:
    from rich.console import Console
    from rich.live import Live

    from worker.client.sync import Client
    from worker.dev.stack import DevStack

    console = Console(highlight=False)
    with (
        DevStack(concurrency=concurrency, sim_tps=tps, say=console.print) as stack,
        Client(stack.settings) as client,
    ):
        started = time.time()
        handles = client.submit_many(_requests(jobs))
        progress = [Progress(submitted_at=started) for _ in handles]
        threads = [
            threading.Thread(target=_follow, args=(job, p), daemon=True)
            for job, p in zip(handles, progress, strict=True)
        ]
        for thread in threads:
            thread.start()
        with Live(_view(progress, started), console=console, refresh_per_second=8) as live:
            for thread in threads:
                while thread.is_alive():
                    thread.join(timeout=0.125)  # a screen refresh, not a wait for an event
                    live.update(_view(progress, started))
            live.update(_view(progress, started))
        wall_s = time.time() - started
        scraped = _scrape(stack.metrics_port) if metrics else ""
    latencies = [p.ended_at - p.submitted_at for p in progress if p.ended_at]
    ttfts = [p.first_chunk_at - p.submitted_at for p in progress if p.first_chunk_at]
    completed = sum(1 for p in progress if p.state == ev.COMPLETED)
    tokens = sum(p.output_tokens for p in progress)
    console.print(
        f"\njobs {jobs}, completed {completed}, failed {jobs - completed}, "
        f"retries {sum(p.retries for p in progress)}\n"
        f"wall time {wall_s:.2f} s, {jobs / wall_s:.1f} jobs/s, "
        f"{tokens / wall_s:.0f} output tokens/s\n"
        f"latency p50 {_pct(latencies, 0.5):.2f} s, p95 {_pct(latencies, 0.95):.2f} s "
        f"(mean {statistics.fmean(latencies) if latencies else float('nan'):.2f} s)\n"
        f"time to first token p50 {_pct(ttfts, 0.5):.3f} s, p95 {_pct(ttfts, 0.95):.3f} s"
    )
    if metrics:
        console.print("\nthe worker's /metrics (llm_worker_* samples):", markup=False)
        print(scraped)  # plain: one sample per line, never wrapped
    return 0 if completed == jobs else 1


def _scrape(port: int) -> str:
    """The worker's own samples from ``/metrics``: no HELP/TYPE lines, buckets or zeros."""
    import httpx

    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError as exc:
        return f"(could not scrape /metrics: {exc})"
    keep = [
        line
        for line in text.splitlines()
        if line.startswith("llm_worker_")
        and not line.endswith(" 0.0")
        and "_bucket{" not in line
        and "_created{" not in line
    ]
    return "\n".join(keep)
