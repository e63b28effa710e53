"""``llm-worker run --processes N``: N worker processes under one supervisor (by default one
per usable core, ``LLM_WORKER_PROCESSES=auto``).

One gevent process runs about 200 streams before its CPU is the limit (docs/performance.md);
more processes use more cores. The supervisor:

- starts N ``llm-worker run`` processes with the same settings, each with ``CONCURRENCY``
  jobs and no HTTP server of its own, writing its metrics to a shared directory
  (prometheus-client's multiprocess mode, :mod:`worker.process.multiproc`) and its liveness to a
  shared board (:class:`worker.process.liveness.LivenessBoard`);
- serves ``/metrics`` (the sum over every process, killed ones' counts included),
  ``/healthz`` (every process consuming) and ``/readyz`` on ``METRICS_PORT``;
- starts a process again when one exits unexpectedly (after 1 s, doubling up to 30 s while
  it keeps exiting within a minute of its start);
- on SIGTERM or SIGINT passes SIGTERM on (each process drains as a lone worker would, within
  ``SHUTDOWN_GRACE_S``) and exits once all have; SIGQUIT is passed on as it is.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import structlog

from worker.process import multiproc
from worker.process.liveness import SLOT_ENV, LivenessBoard
from worker.settings import ENV_PREFIX, Settings

log = structlog.get_logger("worker.process.supervisor")

RESTART_DELAY_S = 1.0
RESTART_DELAY_MAX_S = 30.0
#: A process that ran this long before exiting starts again after the shortest delay.
STABLE_AFTER_S = 60.0


@dataclass
class _Child:
    slot: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    delay_s: float = RESTART_DELAY_S
    restart_at: float = 0.0


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.children = [_Child(slot) for slot in range(settings.processes)]
        self._stopping = False  # set by the signal handler: a plain flag, no lock
        self._stop_signal = signal.SIGTERM
        self.board: LivenessBoard | None = None

    def child_env(self, slot: int) -> dict[str, str]:
        """The environment of worker process ``slot``: our settings, made explicit."""
        assert self.board is not None
        s = self.settings
        env = dict(os.environ)
        env.update(
            {
                f"{ENV_PREFIX}POOL": s.pool,
                f"{ENV_PREFIX}CONCURRENCY": str(s.concurrency),
                f"{ENV_PREFIX}QUEUE": s.queue,
                f"{ENV_PREFIX}LOG_LEVEL": s.log_level,
                f"{ENV_PREFIX}PROCESSES": "1",
                f"{ENV_PREFIX}METRICS_PORT": "0",  # the supervisor serves HTTP for all
                SLOT_ENV: f"{self.board.path}:{slot}",
                multiproc.ENV: str(multiproc.directory()),
            }
        )
        return env

    def alive(self) -> bool:
        """Every process runs and consumed within ``HEALTH_STALE_S``."""
        board = self.board
        if board is None or self._stopping:
            return False
        return all(
            c.proc is not None
            and c.proc.poll() is None
            and board.alive(c.slot, self.settings.health_stale_s)
            for c in self.children
        )

    def run(self) -> int:
        from worker.process.server import start_health_server

        path = multiproc.directory()
        assert path is not None, "run_supervisor sets up the metrics directory"
        self.board = LivenessBoard.create(Path(path) / "llmw-liveness.bin", len(self.children))
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(signum, self._on_signal)
        server = None
        if self.settings.metrics_port:
            server = start_health_server(self.settings, alive=self.alive)
        log.info("supervisor_started", processes=len(self.children))
        try:
            for child in self.children:
                self._start(child)
            while not self._stopping:
                self._tend()
                time.sleep(0.2)  # a signal ends the sleep early
            return self._shut_down()
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only set a flag and pass the signal on; the main loop does the rest.
        self._stop_signal = signal.SIGQUIT if signum == signal.SIGQUIT else signal.SIGTERM
        self._stopping = True
        self._signal_children(self._stop_signal)

    def _signal_children(self, signum: int) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                with contextlib.suppress(OSError):  # it exited meanwhile
                    child.proc.send_signal(signum)

    def _start(self, child: _Child) -> None:
        assert self.board is not None
        self.board.write(child.slot, 0.0)
        args = [sys.executable, "-m", "worker.cli", "run"]
        child.proc = subprocess.Popen(args, env=self.child_env(child.slot))
        child.started_at = time.monotonic()
        log.info("worker_process_started", slot=child.slot, pid=child.proc.pid)

    def _tend(self) -> None:
        """Start again every process that exited, after its delay."""
        assert self.board is not None
        now = time.monotonic()
        for child in self.children:
            proc = child.proc
            if proc is not None and proc.poll() is not None:
                self.board.write(child.slot, 0.0)
                if now - child.started_at >= STABLE_AFTER_S:
                    child.delay_s = RESTART_DELAY_S
                child.restart_at = now + child.delay_s
                log.warning(
                    "worker_process_exited",
                    slot=child.slot,
                    pid=proc.pid,
                    exit_code=proc.returncode,
                    restart_in_s=child.delay_s,
                )
                child.delay_s = min(child.delay_s * 2, RESTART_DELAY_MAX_S)
                child.proc = None
            if child.proc is None and now >= child.restart_at and not self._stopping:
                from worker import metrics as m

                m.PROCESS_RESTARTS.inc()
                self._start(child)

    def _shut_down(self) -> int:
        """Wait for every process to finish its drain; 0 when all ended cleanly."""
        log.info("supervisor_stopping", signal=signal.Signals(self._stop_signal).name)
        self._signal_children(self._stop_signal)  # those started after the first signal
        deadline = time.monotonic() + self.settings.shutdown_grace_s + 60
        code = 0
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker_process_killed", slot=child.slot, pid=child.proc.pid)
                child.proc.kill()
                child.proc.wait()
            code = code or (child.proc.returncode if child.proc.returncode > 0 else 0)
        log.info("supervisor_stopped", exit_code=code)
        return code


def run_supervisor(settings: Settings) -> int:
    # Before anything creates a metric (logging does): every value lives in a shared file.
    multiproc.prepare(settings.pool, settings.processes)
    from worker.logs import configure_logging

    configure_logging(settings)
    return Supervisor(settings).run()


__all__ = ["Supervisor", "run_supervisor"]
