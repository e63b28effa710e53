"""The gateway's ``/metrics``, on a port of its own (``LLM_WORKER_GATEWAY_METRICS_PORT``).

A separate port, as the workers' ``METRICS_PORT``: the gateway's public port faces producers,
and the metrics name every tenant. Served from a thread, so a scrape never waits for the
event loop (nor the loop for a scrape).

The gateway exports what it does itself: its requests (``llm_worker_gateway_*``), the jobs its
fast path runs (jobs finished, tokens, cost, upstream calls and latency, retries: the same
series a worker exports, so dashboards that sum over targets count them), and the jobs it
submits. Not what a worker reads from Redis when scraped (queue depth, dead letters, spend):
the gateway never sets those, and the unlabelled ones would show a false 0 (``llm_worker_ready``
0 would read as a worker that is not consuming).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from worker import metrics as m
from worker.gateway.guard import Slots

#: Workers' own series: set from Redis or by a worker's supervisor, never by the gateway.
WORKER_ONLY = frozenset(
    family.name
    for metric in (m.DEAD_LETTERS, m.WORKER_READY, m.PROCESS_RESTARTS)
    for family in metric.describe()
)


class _GatewayCollector:
    """Every family of the process's registry but the workers' own."""

    def collect(self) -> Iterator[Metric]:
        for family in REGISTRY.collect():
            if family.name not in WORKER_ONLY:
                yield family


class MetricsPortUnavailable(Exception):
    """The metrics port cannot be bound (taken, or not ours to take)."""


def gateway_registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_GatewayCollector())
    return registry


def start_exporter(port: int, requests: Slots, streams: Slots) -> ThreadingHTTPServer:
    """Serve ``/metrics`` on ``port`` (all interfaces) from a daemon thread; the open requests
    and streams are read at each scrape."""
    registry = gateway_registry()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/metrics":
                self._send(404, b"not found\n", "text/plain")
                return
            m.GATEWAY_OPEN.labels("requests").set(requests.held)
            m.GATEWAY_OPEN.labels("streams").set(streams.held)
            self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    try:
        server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    except OSError as exc:
        raise MetricsPortUnavailable(
            f"LLM_WORKER_GATEWAY_METRICS_PORT {port}: {exc.strerror or exc}"
        ) from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="llmw-gateway-metrics", daemon=True).start()
    return server
