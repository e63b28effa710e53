"""prometheus-client's multiprocess mode, for the prefork pool and ``run --processes N``.

Under prefork the jobs run in child processes, each with its own copy of every metric, while
only the parent serves HTTP; with ``--processes N`` a supervisor serves HTTP for N worker
processes. prometheus-client's multiprocess mode has each process write its
values to memory-mapped files in ``PROMETHEUS_MULTIPROC_DIR`` and the server add them up:

- the directory is created (a fresh temporary one unless ``PROMETHEUS_MULTIPROC_DIR`` is set)
  and emptied of ``*.db`` files before the worker starts, or a restart would add the last
  run's counts to the new ones;
- the mode is chosen before any metric exists, since each value picks its storage when it
  is created;
- counters and histograms of a dead child stay in its files, so its counts are not lost when
  Celery replaces it; its live gauges (``llm_worker_jobs_in_flight``) are removed by
  ``mark_process_dead``, from the child's ``worker_process_shutdown`` when it exits cleanly and
  from the parent's sweep of dead pids at each scrape when it was killed.

``PROMETHEUS_MULTIPROC_DIR`` is the library's own variable, read here and nowhere else.
prometheus_client.multiprocess and .values carry no type hints, hence the ``no-untyped-call``
ignores.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry

ENV = "PROMETHEUS_MULTIPROC_DIR"
_LIVE_FILE = re.compile(r"^gauge_live\w*_([0-9]+)\.db\Z")


def prepare(pool: str, processes: int = 1) -> Path | None:
    """For the prefork pool or several processes, set up the directory (emptied) and switch
    prometheus-client to it."""
    if pool != "prefork" and processes <= 1:
        return None
    given = os.environ.get(ENV)
    path = Path(given or tempfile.mkdtemp(prefix="llmw-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    if not given:  # ours: removed when this process exits (not when a forked child does)
        atexit.register(_remove_if_owner, path, os.getpid())
    for stale in path.glob("*.db"):  # only the library's files: the directory may be shared
        stale.unlink()
    os.environ[ENV] = str(path)
    _switch()
    return path


def _remove_if_owner(path: Path, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        shutil.rmtree(path, ignore_errors=True)


def join() -> None:
    """In a process a supervisor started: write to its directory, as it is (not emptied)."""
    if not directory():
        raise RuntimeError(f"{ENV} is not set: this process was not started by a supervisor")
    _switch()


def _switch() -> None:
    if "worker.metrics" in sys.modules:
        raise RuntimeError("worker.metrics was imported before multiprocess mode was set up")
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def directory() -> str | None:
    return os.environ.get(ENV) or None


def serving_registry() -> CollectorRegistry:
    """The registry to render: every process's files in multiprocess mode, else our own."""
    path = directory()
    if path is None:
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return registry


def sweep_dead_processes() -> None:
    """Drop the live gauges of processes that died without saying so (SIGKILL, OOM)."""
    path = directory()
    if path is None:
        return
    from prometheus_client import multiprocess

    for pid in {int(m.group(1)) for f in os.listdir(path) if (m := _LIVE_FILE.match(f))}:
        if not _running(pid):
            multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def on_child_exit(**_: Any) -> None:
    """Celery's ``worker_process_shutdown``: this child's live gauges leave with it."""
    path = directory()
    if path is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid(), path)  # type: ignore[no-untyped-call]


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
