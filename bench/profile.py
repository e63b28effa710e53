"""A sampling profile of running workers (py-spy), summarised by where the CPU goes.

``record(pid, seconds)`` runs ``py-spy record`` on a process and its children (a supervisor
and its worker processes) and returns the collapsed stacks; :func:`summarise` attributes each
sample to the innermost frame that names a known cost (reading the upstream, publishing,
Celery's dispatch, ...), so that a call into gevent's socket is counted for whoever read.
py-spy is optional: without it (or without the right to trace) the profile is skipped.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

#: (name, substrings of a frame) from the most specific: the innermost frame of a sample that
#: contains one of them names its cost.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("SSE decoding and event parsing", ("runtime/sse.py",)),
    ("folding into the message, coalescing", ("accumulate.py", "coalesce.py")),
    ("metrics", ("prometheus_client",)),
    ("logging", ("structlog", "logging/__init__")),
    (
        "publishing: event JSON, RESP, the flusher's round trips",
        ("group_commit.py", "job_store.py", "worker/events.py", "redis/"),
    ),
    ("reading the upstream: socket, httpcore, h11", ("httpcore", "h11/", "httpx/")),
    ("leases, cancel listener, keeper", ("runtime/leases.py",)),
    ("rate limiter", ("worker/ratelimit",)),
    ("Celery consumer, kombu, task tracing", ("celery/", "kombu/", "billiard/")),
    ("job runner (the rest)", ("runtime/runner.py", "runtime/task.py")),
    ("gevent hub, greenlet switches", ("gevent/",)),
]


def _exe() -> str | None:
    """py-spy beside this interpreter (a virtualenv not on PATH), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def available() -> bool:
    return _exe() is not None


def record(pid: int, seconds: float, *, rate: int = 250) -> list[str] | None:
    """Collapsed stacks of ``pid`` and its children for ``seconds``; None if py-spy failed."""
    exe = _exe()
    if exe is None:
        return None
    with tempfile.TemporaryDirectory(prefix="llmw-bench-profile-") as tmp:
        out = Path(tmp) / "stacks.txt"
        args = [exe, "record", "--pid", str(pid), "--subprocesses", "--nonblocking"]
        args += ["--rate", str(rate), "--duration", str(max(1, round(seconds)))]
        args += ["--format", "raw", "--output", str(out)]
        done = subprocess.run(args, capture_output=True, check=False, timeout=seconds + 60)
        if done.returncode != 0 or not out.exists():
            return None
        return out.read_text(errors="replace").splitlines()


def summarise(lines: list[str], *, top: int = 12) -> dict[str, Any]:
    """Shares of the samples by category, and the functions most often on top of the stack."""
    by_category: Counter[str] = Counter()
    by_leaf: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        total += count
        by_leaf[_short(frames[-1])] += count
        by_category[_category(frames)] += count
    if not total:
        return {"samples": 0, "categories": {}, "top_functions": {}}
    return {
        "samples": total,
        "categories": {k: round(v / total, 3) for k, v in by_category.most_common()},
        "top_functions": {k: round(v / total, 3) for k, v in by_leaf.most_common(top)},
    }


def _category(frames: list[str]) -> str:
    # gevent's own frames last: a socket call is counted for whoever made it.
    for categories in (CATEGORIES[:-1], CATEGORIES[-1:]):
        for frame in reversed(frames):
            for name, marks in categories:
                if any(mark in frame for mark in marks):
                    return name
    return "other (interpreter, imports, threads)"


def _short(frame: str) -> str:
    """``function (path:line)`` cut to the package-relative path."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for root in ("site-packages/", "/worker/", "/bench/"):
        if root in where:
            where = where.split(root, 1)[1]
            break
    where = where.rsplit(":", 1)[0]
    return f"{name} ({where})"
