"""Traffic classes: a backlog of one tenant's batch jobs, then interactive jobs and a second
tenant's jobs, against the FIFO order of the same jobs, in the same run.

One worker with 4 slots and 1-second jobs. Each round queues ``backlog`` jobs, then 8
"interactive" jobs and 8 jobs of a second tenant, and waits for all of them. In the ``fifo``
round every job has the same class (priority 5, no tenant), which is the single FIFO queue
of before; in the ``classes`` round the backlog is tenant ``bulk`` at priority 2 (the batch
default), the interactive jobs priority 8, the second tenant ``small`` at priority 2.
Reported: each group's completion time from its submission (median and last), from the job
records' ``submitted_at`` and ``finished_at``.
"""

from __future__ import annotations

from typing import Any

from bench.jobs import request
from bench.stack import Stack, wait_for
from bench.stats import median
from worker.client.sync import Client
from worker.settings import settings_from_env

CONCURRENCY = 4
ONE_SECOND = "[[sim tokens=10 tps=10]]"
GROUP = 8


def _submit(client: Client, classes: bool, backlog: int) -> dict[str, list[str]]:
    def jobs(name: str, count: int, **options: Any) -> list[str]:
        requests = [request(f"{name} {i} {ONE_SECOND}", stream=True) for i in range(count)]
        return [job.job_id for job in client.submit_many(requests, **options)]

    if not classes:
        return {
            "backlog": jobs("bulk", backlog),
            "interactive": jobs("urgent", GROUP),
            "second tenant": jobs("small", GROUP),
        }
    return {
        "backlog": jobs("bulk", backlog, tenant="bulk", priority=2),
        "interactive": jobs("urgent", GROUP, priority=8),
        "second tenant": jobs("small", GROUP, tenant="small", priority=2),
    }


def _times(client: Client, ids: list[str]) -> list[float] | None:
    pipe = client.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(client.keys.job(job_id), "submitted_at", "finished_at")
    rows = pipe.execute()
    if any(finished is None for _, finished in rows):
        return None
    return [float(finished) - float(submitted) for submitted, finished in rows]


def _round(env: dict[str, str], classes: bool, backlog: int) -> dict[str, Any]:
    with Client(settings_from_env(env)) as client:
        groups = _submit(client, classes, backlog)
        timeout_s = 60 + 2 * backlog / CONCURRENCY
        results = {}
        for name, ids in groups.items():
            done = wait_for(lambda ids=ids: _times(client, ids), timeout_s, f"the {name} jobs")
            results[name] = {"median_s": median(done), "last_s": max(done)}
        return results


def run(*, backlog: int) -> dict[str, Any]:
    rounds: dict[str, Any] = {}
    with Stack() as stack:
        for mode in ("fifo", "classes"):
            queue = f"q-traffic-{mode}"
            env = stack.worker_env(queue=queue)
            with stack.worker("worker.celery_app", concurrency=CONCURRENCY, queue=queue) as proc:
                with Client(settings_from_env(env)) as client:  # up and consuming
                    client.submit(request(f"canary {mode}", stream=False)).result(timeout=60)
                proc.check()
                rounds[mode] = _round(env, mode == "classes", backlog)
    return {"backlog": backlog, "concurrency": CONCURRENCY, "group": GROUP, "rounds": rounds}


def rows(result: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Table rows: (measure, ours, baseline, ratio, target)."""
    out = []
    fifo, classes = result["rounds"]["fifo"], result["rounds"]["classes"]
    what = f"{result['backlog']} x 1 s backlog, c={result['concurrency']}"
    for name, target in (("interactive", "<= 6 s"), ("second tenant", "<= 14 s")):
        ours, base = classes[name], fifo[name]
        out.append(
            (
                f"traffic: {result['group']} {name} jobs behind a {what}: median / last s",
                f"{ours['median_s']:.1f} / {ours['last_s']:.1f}",
                f"FIFO {base['median_s']:.1f} / {base['last_s']:.1f}",
                f"{ours['last_s'] / base['last_s']:.2f}x",
                target,
            )
        )
    ours, base = classes["backlog"], fifo["backlog"]
    out.append(
        (
            f"traffic: the backlog itself ({what}): last s",
            f"{ours['last_s']:.1f}",
            f"FIFO {base['last_s']:.1f}",
            f"{ours['last_s'] / base['last_s']:.2f}x",
            "about 1x",
        )
    )
    return out
