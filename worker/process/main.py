"""``llm-worker run``: logging, the metrics and health server, then Celery's worker."""

from __future__ import annotations

import os
import socket

from worker.settings import Settings


def run_worker(settings: Settings) -> int:
    from worker.process import multiproc
    from worker.process.liveness import SLOT_ENV

    if settings.processes > 1:
        from worker.process.supervisor import run_supervisor

        return run_supervisor(settings)
    # Before anything creates a metric: under prefork (or in a supervisor's worker process)
    # each value must live in a file.
    if os.environ.get(SLOT_ENV):  # started by a supervisor (`run --processes N`)
        from worker.process.liveness import STATE

        multiproc.join()
        STATE.attach(os.environ[SLOT_ENV])
    else:
        multiproc.prepare(settings.pool)

    from worker.celery_app import app
    from worker.logs import configure_logging
    from worker.process.server import start_health_server

    configure_logging(settings)
    app.use_settings(settings)
    if settings.metrics_port:
        start_health_server(settings)
    argv = [
        "worker",
        "--pool",
        settings.pool,
        "--concurrency",
        str(settings.concurrency),
        "--queues",
        settings.queue,
        # The pid makes the node name unique among workers on one host, so that remote
        # control (`celery control … --destination`) reaches exactly one of them.
        "--hostname",
        f"llmw-{os.getpid()}@{socket.gethostname()}",
        "--loglevel",
        settings.log_level,
        # Gossip and mingle talk to every other worker at start; a job queue does not need them.
        "--without-gossip",
        "--without-mingle",
    ]
    app.worker_main(argv)
    return 0
