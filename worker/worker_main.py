"""``llm-worker run``: logging, the metrics and health server, then Celery's worker."""

from __future__ import annotations

import socket

from worker.settings import Settings


def run_worker(settings: Settings) -> int:
    from worker.celery_app import app
    from worker.health import start_health_server
    from worker.logs import configure_logging

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
        "--hostname",
        f"llmw@{socket.gethostname()}",
        "--loglevel",
        settings.log_level,
        # Gossip and mingle talk to every other worker at start; a job queue does not need them.
        "--without-gossip",
        "--without-mingle",
    ]
    app.worker_main(argv)
    return 0
