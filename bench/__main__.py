"""``python -m bench [--quick] [--only SCENARIOS] [--repeat N]``

Scenarios: burst, gateway, overhead, streaming, fanout, traffic, ratelimit (all by default).

Runs each scenario against its own Redis, simulator and workers, prints a table of medians
with the baselines measured in the same run and the ratios, saves everything as JSON
(``bench/results/latest.json``) and plots throughput against concurrency
(``bench/results/fanout.png``). The rate-limit benchmark (``bench/ratelimit.py``) runs too
when it is present. Full sizes are those of the performance issue; ``--quick`` is a small run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path
from typing import Any

import psutil

from bench import burst, fanout, gateway, overhead, streaming, traffic

RESULTS = Path(__file__).resolve().parent / "results"

FULL = {
    "burst": {"jobs": 300},
    "gateway": {"requests": 150},
    "overhead": {"jobs": 5000, "concurrency": 100},
    "streaming": {"jobs": 10, "tokens": 1000, "tps": 100, "throughput_jobs": 20},
    "fanout": {"jobs": 2000, "concurrencies": [100, 200, 500, 1000], "processes": [1, 2]},
    "traffic": {"backlog": 200},
}
QUICK = {
    "burst": {"jobs": 100},
    "gateway": {"requests": 30},
    "overhead": {"jobs": 500, "concurrency": 50},
    "streaming": {"jobs": 4, "tokens": 200, "tps": 100, "throughput_jobs": 8},
    "fanout": {"jobs": 200, "concurrencies": [50, 100, 200], "processes": [1, 2]},
    "traffic": {"backlog": 40},
}


def _row(name: str, ours: str, base: str, ratio: str, target: str) -> str:
    return f"| {name} | {ours} | {base} | {ratio} | {target} |"


def table(results: dict[str, Any]) -> str:
    lines = [
        "| measure | llm-worker | baseline (same run) | ratio | target |",
        "|---|---|---|---|---|",
    ]
    if "burst" in results:
        lines += burst_rows(results["burst"])
    if "gateway" in results:
        lines += gateway_rows(results["gateway"])
    if "overhead" in results:
        o = results["overhead"]
        s = o["summary"]
        lines += [
            _row(
                f"overhead: jobs/s, {o['jobs']} non-streamed jobs, gevent -c {o['concurrency']}",
                f"{s['llmw']['jobs_per_s']:.0f}",
                f"plain httpx task {s['plain']['jobs_per_s']:.0f}; "
                f"empty task {s['empty']['jobs_per_s']:.0f}",
                f"{o['ratio_vs_plain']:.2f}x plain; {o['ratio_vs_empty']:.2f}x empty",
                ">= 1x plain, >= 0.5x empty",
            ),
            _row(
                "overhead: worker CPU ms per job",
                f"{s['llmw']['worker_cpu_ms_per_job']:.2f}",
                f"plain {s['plain']['worker_cpu_ms_per_job']:.2f}; "
                f"empty {s['empty']['worker_cpu_ms_per_job']:.2f}",
                f"{s['llmw']['worker_cpu_ms_per_job'] / s['plain']['worker_cpu_ms_per_job']:.2f}x"
                " plain",
                "",
            ),
            _row(
                "Redis commands per non-streamed job (INFO commandstats)",
                f"{s['llmw']['redis_cmds_per_job']:.1f}",
                f"plain {s['plain']['redis_cmds_per_job']:.1f}; "
                f"empty {s['empty']['redis_cmds_per_job']:.1f}",
                "",
                "",
            ),
        ]
    if "streaming" in results:
        st = results["streaming"]
        s = st["summary"]
        what = f"{st['jobs']} jobs x {st['tokens']} chunks at {st['tps']} tok/s"
        lines += [
            _row(
                f"chunk delay p50 / p99 ms, simulator -> subscriber ({what})",
                f"{s['delay_p50_ms']:.1f} / {s['delay_p99_ms']:.1f}",
                f"direct client {s['direct_delay_p50_ms']:.1f} / {s['direct_delay_p99_ms']:.1f}",
                "",
                "<= 5 / <= 50",
            ),
            _row(
                "first chunk delay p50 ms",
                f"{s['first_chunk_p50_ms']:.1f}",
                "",
                "",
                "<= 5",
            ),
            _row(
                f"upstream events/s per worker process ({st['throughput_jobs']} unpaced jobs)",
                f"{s['events_per_s']:.0f} ({s['chunk_events_per_s']:.0f} chunk events/s)",
                f"direct client {s['direct_events_per_s']:.0f}",
                f"{s['events_per_s'] / s['direct_events_per_s']:.2f}x",
                "",
            ),
        ]
    if "fanout" in results:
        f = results["fanout"]
        for p in f["points"]:
            lines.append(
                _row(
                    f"fan-out: {f['jobs']} x {f['job_s']:.0f} s streams, c={p['concurrency']}, "
                    f"{p.get('processes', 1)} process(es): wall s (ideal {p['ideal_s']:.0f}); "
                    "peak RSS MB",
                    f"{p['wall_s']:.1f} ({p['vs_ideal']:.2f}x ideal); {p['peak_rss_mb']:.0f}",
                    f"direct {p['direct_wall_s']:.1f} ({p['direct_vs_ideal']:.2f}x ideal); "
                    f"{p['direct_peak_rss_mb']:.0f}",
                    f"{p['vs_direct']:.2f}x direct",
                    "<= 1.3x ideal, <= 1.2x direct, <= 500 MB",
                )
            )
    if "traffic" in results:
        lines += [_row(*row) for row in traffic.rows(results["traffic"])]
    return "\n".join(lines)


def burst_rows(b: dict[str, Any]) -> list[str]:
    s = b["summary"]
    what = f"{b['jobs']} x {b['job_s']:.0f} s streams at once, `llm-worker run` defaults"
    return [
        _row(
            f"burst: {what} ({b['worker_processes']} process(es)): wall s; peak RSS MB",
            f"{s['wall_s']:.2f}; {b['peak_rss_mb']:.0f}",
            f"direct client, all at once: {s['direct_wall_s']:.2f}; {s['direct_peak_rss_mb']:.0f}",
            f"{s['vs_direct']:.2f}x direct (median of per-round ratios)",
            "<= 1.2x direct, <= 500 MB",
        ),
        _row(
            "burst: CPU ms per streamed job (worker processes; Redis and simulator apart)",
            f"{s['worker_cpu_ms_per_job']:.2f} (Redis {s['redis_cpu_ms_per_job']:.2f}, "
            f"simulator {s['simulator_cpu_ms_per_job']:.2f})",
            f"direct client {s['direct_cpu_ms_per_job']:.2f}",
            f"{s['cpu_vs_direct']:.2f}x direct",
            "<= 1.5x direct",
        ),
    ]


def gateway_rows(g: dict[str, Any]) -> list[str]:
    m, f = g["summary"]["message"], g["summary"]["first_chunk"]
    what = f"one request at a time, {g['requests']} per round"
    return [
        _row(
            f"gateway: p50 ms of a non-streamed 10-token request ({what})",
            f"{m['gateway_p50_ms']:.2f} (added {m['added_p50_ms']:.2f})",
            f"straight to the upstream {m['direct_p50_ms']:.2f}",
            f"{m['gateway_p50_ms'] / m['direct_p50_ms']:.2f}x",
            "<= 2 ms added",
        ),
        _row(
            "gateway: where the p50 goes, ms: to the submit; submit -> started (the claim); "
            "started -> ended (the upstream call; with the fast path also the write's round "
            "trip); from the job's end to the answer",
            f"{m['to_written_ms']:.2f}; {m['written_to_started_ms']:.2f}; "
            f"{m['attempt_ms']:.2f}; {m['ended_to_answer_ms']:.2f}",
            "",
            "",
            "",
        ),
        _row(
            "gateway: p50 ms to the first streamed text delta",
            f"{f['gateway_p50_ms']:.2f} (added {f['added_p50_ms']:.2f})",
            f"straight to the upstream {f['direct_p50_ms']:.2f}",
            f"{f['gateway_p50_ms'] / f['direct_p50_ms']:.2f}x",
            "<= 2 ms added",
        ),
    ]


def profile_text(b: dict[str, Any]) -> str:
    p = b.get("profile")
    if not p:
        return "burst profile: skipped (py-spy missing or not permitted)"
    lines = [f"burst profile (py-spy, {p['samples']} samples of the worker processes):"]
    lines += [f"  {share:6.1%}  {name}" for name, share in p["categories"].items()]
    lines.append("  top of the stack:")
    lines += [f"  {share:6.1%}  {name}" for name, share in p["top_functions"].items()]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = results["fanout"]["points"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for count, style in ((1, "o-"), (2, "^-")):
        mine = [p for p in points if p.get("processes", 1) == count]
        if mine:
            label = f"llm-worker ({count} process{'es' if count > 1 else ''})"
            ax.plot(
                [p["concurrency"] for p in mine],
                [p["jobs_per_s"] for p in mine],
                style,
                label=label,
            )
    single = [p for p in points if p.get("processes", 1) == 1]
    cs = [p["concurrency"] for p in single]
    ax.plot(cs, [p["direct_jobs_per_s"] for p in single], "s--", label="direct asyncio httpx")
    ax.plot(cs, [results["fanout"]["jobs"] / p["ideal_s"] for p in single], ":", label="ideal")
    ax.set_xlabel("concurrency (streams in flight)")
    ax.set_ylabel("jobs/s (2 s streams)")
    ax.set_title(f"Fan-out of {results['fanout']['jobs']} streamed jobs, 2 cores")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for development")
    parser.add_argument("--only", default="", help="comma-separated scenarios to run")
    parser.add_argument("--repeat", type=int, default=None, help="rounds per scenario")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    opts = parser.parse_args(argv)
    sizes = QUICK if opts.quick else FULL
    repeat = opts.repeat or (1 if opts.quick else 3)
    wanted = [s for s in opts.only.split(",") if s] or [*sizes, "ratelimit"]
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "quick": opts.quick,
    }
    if "burst" in wanted:
        results["burst"] = burst.run(repeat=repeat, **sizes["burst"])  # type: ignore[arg-type]
    if "gateway" in wanted:
        results["gateway"] = gateway.run(repeat=repeat, **sizes["gateway"])  # type: ignore[arg-type]
    if "overhead" in wanted:
        results["overhead"] = overhead.run(repeat=repeat, **sizes["overhead"])  # type: ignore[arg-type]
    if "streaming" in wanted:
        results["streaming"] = streaming.run(repeat=repeat, **sizes["streaming"])  # type: ignore[arg-type]
    if "fanout" in wanted:
        results["fanout"] = fanout.run(repeat=1 if opts.quick else 2, **sizes["fanout"])  # type: ignore[arg-type]
    if "traffic" in wanted:
        results["traffic"] = traffic.run(**sizes["traffic"])  # type: ignore[arg-type]
    text = table(results)
    print(text)
    if "burst" in results:
        print("\n" + profile_text(results["burst"]))
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {opts.out}")
    if "fanout" in results:
        png = opts.out.with_name("fanout.png")
        if importlib.util.find_spec("matplotlib") is None:
            print("plot skipped: matplotlib is missing (`make bench` installs the bench extra)")
        else:
            plot(results, png)
            print(f"plot: {png}")
    if "ratelimit" in wanted and importlib.util.find_spec("bench.ratelimit") is not None:
        from bench import ratelimit

        print("\nrate limit benchmark (bench/ratelimit.py):")
        ratelimit.main([])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
