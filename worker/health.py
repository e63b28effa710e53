"""The worker's HTTP server: ``/metrics``, ``/healthz`` (consuming) and ``/readyz`` (and Redis).

Liveness looks at consumption itself: workers have been seen to stop consuming after a Redis
reconnect while their timers kept ticking, so "the process answers" is not enough.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from celery import bootsteps, signals
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker import metrics as m
from worker.settings import Settings


class ConsumerState:
    """What the health checks read; written by Celery signals and the consumer step."""

    def __init__(self) -> None:
        self.ready = False
        self.shutting_down = False
        self.last_poll = 0.0
        self.lock = threading.Lock()

    def beat(self) -> None:
        self.last_poll = time.monotonic()


STATE = ConsumerState()
#: The consumer's event loop must have ticked this recently to count as alive.
STALE_AFTER_S = 30.0


@signals.worker_ready.connect
def _on_ready(**_: Any) -> None:
    STATE.ready = True
    STATE.beat()


@signals.worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    STATE.shutting_down = True


class HeartbeatStep(bootsteps.StartStopStep):
    """A consumer step that ticks from the consumer's own event loop."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, consumer: Any) -> None:
        hub = getattr(consumer.controller, "hub", None)
        if hub is not None:
            hub.call_repeatedly(1.0, STATE.beat)
        else:
            # Pools without an event loop (gevent, threads, solo) drain events in a loop of
            # their own; a timer on the consumer's timer tells at least that it runs.
            consumer.timer.call_repeatedly(1.0, STATE.beat)
        STATE.beat()


def alive() -> bool:
    return (
        STATE.ready
        and not STATE.shutting_down
        and time.monotonic() - STATE.last_poll < STALE_AFTER_S
    )


def _make_handler(settings: Settings) -> type[BaseHTTPRequestHandler]:
    import redis

    client = redis.Redis.from_url(
        str(settings.redis_url), socket_timeout=2, socket_connect_timeout=2
    )

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                ok = alive()
                self._send(200 if ok else 503, b"ok\n" if ok else b"not consuming\n")
            elif self.path == "/readyz":
                try:
                    redis_ok = bool(client.ping())
                except Exception:  # any failure to reach Redis means not ready
                    redis_ok = False
                ok = redis_ok and alive()
                m.WORKER_READY.set(1 if ok else 0)
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


def start_health_server(settings: Settings) -> ThreadingHTTPServer:
    from worker.celery_app import app

    app.steps["consumer"].add(HeartbeatStep)
    server = ThreadingHTTPServer(("0.0.0.0", settings.metrics_port), _make_handler(settings))
    thread = threading.Thread(target=server.serve_forever, name="llmw-health", daemon=True)
    thread.start()
    return server
