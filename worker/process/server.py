"""The worker's HTTP server: ``/metrics``, ``/healthz`` (consuming) and ``/readyz`` (and Redis).

One server per worker, in the process that runs Celery's consumer (the parent under prefork;
children close their inherited copy of the socket). Liveness is consumption itself, recorded
by the broker transport (:mod:`worker.process.liveness`), not a timer that keeps ticking in a worker
that stopped consuming.

- ``/healthz``: 200 while the consumer has polled its queues (or was saturated) within
  ``HEALTH_STALE_S``; 503 before the worker is ready, while it shuts down, or when it stopped
  consuming. Restart on failure.
- ``/readyz``: 200 when, in addition, Redis answers a ``PING``. Send no work on failure.
- ``/metrics``: refreshes the queue-wide gauges from Redis (:mod:`worker.process.scrape`), then
  renders every metric (of every process, under prefork).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from celery import bootsteps, signals
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker.process import multiproc
from worker.process.liveness import STATE
from worker.process.scrape import ScrapeGauges
from worker.settings import Settings


@signals.worker_ready.connect
def _on_ready(**_: Any) -> None:
    STATE.ready = True


@signals.worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    STATE.shutting_down = True


class TimerHeartbeatStep(bootsteps.StartStopStep):
    """For brokers other than our Redis transport: the consumer's timer ticking is the best
    evidence there is (weaker: it keeps ticking in a worker that stopped consuming)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, consumer: Any) -> None:
        from worker.runtime.transport import Transport

        if isinstance(consumer.connection.transport, Transport):
            return  # the transport reports every BRPOP: the real thing
        hub = getattr(consumer.controller, "hub", None)
        timer = hub if hub is not None else consumer.timer
        timer.call_repeatedly(1.0, STATE.consumed)
        STATE.consumed()


def _make_handler(
    settings: Settings, gauges: ScrapeGauges, alive: Callable[[], bool]
) -> type[BaseHTTPRequestHandler]:

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                multiproc.sweep_dead_processes()
                gauges.refresh()
                body = generate_latest(multiproc.serving_registry())
                self._send(200, body, CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                ok = alive()
                self._send(200 if ok else 503, b"ok\n" if ok else b"not consuming\n")
            elif self.path == "/readyz":
                ok = gauges.ready()
                self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


def _scrape_gauges(settings: Settings, alive: Callable[[], bool]) -> ScrapeGauges:
    import redis

    from worker.broker import is_redis_broker
    from worker.connections.clients import redis_client

    def client(url: str) -> redis.Redis[bytes]:
        # One try per scrape or probe: a Redis that does not answer now is "not ready" now.
        return redis_client(
            settings, url=url, retry_s=0, socket_timeout=2, socket_connect_timeout=2
        )

    broker_url = settings.effective_broker_url
    return ScrapeGauges(
        settings,
        results=client(str(settings.redis_url)),
        broker=client(broker_url) if is_redis_broker(broker_url) else None,
        alive=alive,
    )


def start_health_server(
    settings: Settings, *, alive: Callable[[], bool] | None = None
) -> ThreadingHTTPServer:
    """Serve in a thread. ``alive`` replaces this process's consumer state (a supervisor
    answers for its worker processes)."""
    own_consumer = alive is None
    if alive is None:
        from worker.celery_app import app

        app.steps["consumer"].add(TimerHeartbeatStep)
        alive = lambda: STATE.alive(settings.health_stale_s)  # noqa: E731
    server = ThreadingHTTPServer(
        ("0.0.0.0", settings.metrics_port),
        _make_handler(settings, _scrape_gauges(settings, alive), alive),
    )
    thread = threading.Thread(target=server.serve_forever, name="llmw-health", daemon=True)
    thread.start()
    if not own_consumer:
        return server

    def close_in_child(**_: Any) -> None:
        # A prefork child inherits the listening socket; only the parent may answer on it.
        server.socket.close()

    signals.worker_process_init.connect(close_in_child, weak=False)
    signals.worker_process_shutdown.connect(multiproc.on_child_exit, weak=False)
    return server
