"""The processes a scenario runs against: its own Redis, the simulator, Celery workers.

Every scenario builds a :class:`Stack` in a ``with`` block and everything it started is
stopped on the way out, whatever happens. Nothing here imports from ``tests/``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

from worker.dev.embedded import EmbeddedRedis, free_port
from worker.keys import TrafficKeys

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-bench-0000"
MODEL = "deepseek-ai/DeepSeek-V3"
#: Jobs are filled into this list first, then renamed onto the worker's queue in one step,
#: so the producer's speed is not part of what is timed.
STAGING_SUFFIX = "-staging"


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Process:
    """A child process with its log in a temporary file, and its CPU time and peak RSS."""

    def __init__(self, args: list[str], env: dict[str, str], name: str) -> None:
        self.name = name
        self.log_path = Path(tempfile.mkstemp(prefix=f"llmw-bench-{name}-", suffix=".log")[1])
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.ps = psutil.Process(self.proc.pid)
        self.peak_rss = 0

    def cpu_s(self) -> float:
        """User plus system CPU seconds of the process and its children so far."""
        total = 0.0
        for p in [self.ps, *self.ps.children(recursive=True)]:
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
        return total

    def sample_rss(self) -> int:
        rss = 0
        for p in [self.ps, *self.ps.children(recursive=True)]:
            try:
                rss += p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        self.peak_rss = max(self.peak_rss, rss)
        return rss

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop(self.proc)
        self.log_path.unlink(missing_ok=True)


class Stack:
    """Redis + simulator (+ workers started on demand); ``with Stack() as s: ...``."""

    def __init__(self) -> None:
        self._exit = ExitStack()
        self.redis_url = ""
        self.sim_url = ""
        self.redis: redis.Redis[bytes]
        self.simulator: Process
        self.redis_server: EmbeddedRedis

    def __enter__(self) -> Stack:
        try:
            self.redis_server = self._exit.enter_context(EmbeddedRedis())
            self.redis_url = self.redis_server.url
            self.redis = redis.Redis.from_url(self.redis_url)
            self._exit.callback(self.redis.close)
            self.simulator = self._start_simulator()
        except BaseException:
            self._exit.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._exit.close()

    def _start_simulator(self) -> Process:
        port = free_port()
        args = [sys.executable, "-m", "worker.cli", "simulate", "--port", str(port)]
        args += ["--ttft-ms", "0", "--tps", "0", "--api-key", API_KEY]
        proc = Process(args, dict(os.environ), "simulator")
        self._exit.callback(proc.stop)
        self.sim_url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            proc.check()
            try:
                return httpx.get(f"{self.sim_url}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, 30, "the simulator")
        return proc

    def worker_env(self, **settings: Any) -> dict[str, str]:
        """The environment of a worker: this stack's Redis and simulator, and ``settings``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_WORKER_")}
        env.update(
            {
                "LLM_WORKER_REDIS_URL": self.redis_url,
                "LLM_WORKER_API_BASE_URL": self.sim_url,
                "LLM_WORKER_API_KEY": API_KEY,
                "LLM_WORKER_METRICS_PORT": str(free_port()),
                "LLM_WORKER_GATEWAY_METRICS_PORT": str(free_port()),
                "LLM_WORKER_LOG_LEVEL": "WARNING",
                "LLM_WORKER_ALLOWED_MODELS": "",
                # The baseline tasks read these (bench/baseline_app.py).
                "BENCH_REDIS_URL": self.redis_url,
                "BENCH_UPSTREAM_URL": self.sim_url,
                "BENCH_API_KEY": API_KEY,
            }
        )
        env.update({f"LLM_WORKER_{k.upper()}": str(v) for k, v in settings.items()})
        return env

    @contextmanager
    def worker(
        self, app: str, *, concurrency: int, queue: str, pool: str = "gevent", **settings: Any
    ) -> Iterator[Process]:
        """A Celery worker of ``app`` (``worker.celery_app`` or ``bench.baseline_app``)."""
        args = [sys.executable, "-m", "celery", "-A", app, "worker", "-P", pool]
        args += ["-c", str(concurrency), "-Q", queue, "--without-gossip", "--without-mingle"]
        args += ["--loglevel", "WARNING"]
        env = self.worker_env(concurrency=concurrency, queue=queue, pool=pool, **settings)
        proc = Process(args, env, f"worker-{app}")
        try:
            yield proc
        finally:
            proc.stop()

    @contextmanager
    def llmw_run(
        self,
        *,
        concurrency: int | None,
        processes: int | None,
        queue: str,
        **settings: Any,
    ) -> Iterator[Process]:
        """``llm-worker run --processes N`` (gevent), each process with ``concurrency`` jobs
        (``None``: the default, as a user who sets nothing gets it); the returned process's CPU
        time and RSS include its worker processes."""
        args = [
            sys.executable,
            "-m",
            "worker.cli",
            "run",
            "--queue",
            queue,
            "--loglevel",
            "WARNING",
        ]
        if concurrency is not None:
            args += ["--concurrency", str(concurrency), "--pool", "gevent"]
            settings["concurrency"] = concurrency
        if processes is not None:
            args += ["--processes", str(processes)]
        env = self.worker_env(queue=queue, **settings)
        proc = Process(args, env, "llm-worker-run")
        try:
            yield proc
        finally:
            proc.stop()

    def queue_idle(self, queue: str) -> bool:
        """Nothing waiting on ``queue`` (its list or its traffic classes) and nothing
        delivered but unacknowledged."""
        keys = TrafficKeys(queue)
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(queue)
        pipe.hlen("unacked")
        pipe.exists(*(keys.turns(priority) for priority in range(10)))
        waiting, unacked, classes = pipe.execute()
        return int(waiting) == 0 and int(unacked) == 0 and int(classes) == 0

    def drain(self, queue: str, worker: Process, timeout_s: float) -> float:
        """Wait until the queue is idle; returns the time it became so (monotonic)."""
        deadline = time.monotonic() + timeout_s
        while not self.queue_idle(queue):
            worker.check()
            worker.sample_rss()
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue {queue} not drained in {timeout_s} s")
            time.sleep(0.005)
        return time.monotonic()

    def release(self, queue: str) -> float:
        """Move every staged message onto ``queue`` at once; returns when (monotonic)."""
        at = time.monotonic()
        self.redis.rename(queue + STAGING_SUFFIX, queue)
        return at

    def commandstats(self) -> dict[str, int]:
        info = self.redis.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}

    def redis_cpu_s(self) -> float:
        assert self.redis_server.process is not None
        t = psutil.Process(self.redis_server.process.pid).cpu_times()
        return float(t.user + t.system)
