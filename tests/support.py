"""Helpers for tests that run real processes: the simulator, workers, waiting with timeouts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from worker.dev.embedded import free_port
from worker.settings import SEED_MODELS, Settings, settings_from_env

ROOT = Path(__file__).resolve().parent.parent
TEST_API_KEY = "sk-test-canary-7f3a9c"

#: Where processes started by tests keep their logs and metric files: a folder under pytest's
#: temporary directory, set once per session (``tests/conftest.py``), removed when it passes.
WORK_DIR: Path | None = None


def work_path(name: str) -> Path:
    """A fresh path under the session's work folder."""
    if WORK_DIR is None:
        raise RuntimeError("tests.support.WORK_DIR is not set (the session fixture sets it)")
    return WORK_DIR / f"{name}-{uuid.uuid4().hex[:8]}"


def wait_for(
    predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def start_simulator(
    *extra: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "simulate",
            "--port",
            str(port),
            "--ttft-ms",
            "0",
            "--api-key",
            TEST_API_KEY,
            *extra,
        ],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(
                f"simulator exited: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, 20, "the simulator")
    return proc, url


def upstream_requests(simulator_url: str) -> int:
    """How many requests the simulator has received so far."""
    stats = httpx.get(f"{simulator_url}/stats", params={"log": 0}, timeout=5).json()
    return int(stats["requests"])


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 15) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def worker_env(redis_url: str, simulator_url: str, **settings: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_WORKER_")}
    env.update(
        {
            "LLM_WORKER_REDIS_URL": redis_url,
            "LLM_WORKER_API_BASE_URL": simulator_url,
            "LLM_WORKER_API_KEY": TEST_API_KEY,
            "LLM_WORKER_METRICS_PORT": str(free_port()),
            "LLM_WORKER_LOG_LEVEL": "WARNING",
            "LLM_WORKER_BACKOFF_BASE_S": "0.05",
            "LLM_WORKER_BACKOFF_MAX_S": "0.2",
            # Any model reaches the upstream, so tests can see how upstream rejections are handled.
            "LLM_WORKER_ALLOWED_MODELS": "",
        }
    )
    env.update({f"LLM_WORKER_{k.upper()}": str(v) for k, v in settings.items()})
    return env


class WorkerProcess:
    """A real worker in a subprocess; ``ready()`` proves it by running a canary job."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        # What the worker puts in a temporary folder (a supervisor's metric files) lands under
        # the session's work folder, not in the system's.
        tmp = work_path("tmp")
        tmp.mkdir()
        env = {**env, "TMPDIR": str(tmp)}
        self.env = env
        self.log_path = work_path("worker").with_suffix(".log")
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def settings(self) -> Settings:
        return settings_from_env(self.env)

    def ready(self, timeout_s: float = 60) -> WorkerProcess:
        from worker.client.sync import Client

        with Client(self.settings()) as client:
            job = client.submit(
                {
                    "model": SEED_MODELS[4],
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": "canary"}],
                }
            )
            try:
                job.result(timeout=timeout_s)
            except TimeoutError:
                raise RuntimeError(f"worker not ready; its log:\n{self.log()[-3000:]}") from None
        return self

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc, timeout_s=30)
        self._log.close()

    def http_get(self, path: str) -> httpx.Response:
        """GET ``path`` from the worker's metrics and health server."""
        port = self.env["LLM_WORKER_METRICS_PORT"]
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10)


def celery_worker_args(
    pool: str = "gevent", concurrency: int = 50, queue: str = "llmw"
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "-P",
        pool,
        "-c",
        str(concurrency),
        "-Q",
        queue,
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "WARNING",
    ]


def written_keys(client: Any) -> set[bytes]:
    """The keys a producer can create: everything under the client's key prefix, and its
    queue (a snapshot to compare; other tests' keys expiring in between do not matter)."""
    keys = set(client.redis.scan_iter(match=f"{client.keys.prefix}:*", count=1000))
    if client.redis.exists(client.settings.queue):
        keys.add(client.settings.queue.encode())
    return keys


def new_keys(client: Any, before: set[bytes], queue_len: int = 0) -> set[bytes]:
    """Keys created since ``before`` was taken, plus the queue if it grew past ``queue_len``."""
    grown = client.redis.llen(client.settings.queue) > queue_len
    return (written_keys(client) - before) | ({b"<queue grew>"} if grown else set())


def make_request(
    prompt: str = "Hello", *, stream: bool = True, max_tokens: int = 256, **extra: Any
) -> dict[str, Any]:
    return {
        "model": "deepseek-ai/DeepSeek-V3",
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": prompt}],
        **extra,
    }


def events_so_far(job: Any) -> list[dict[str, Any]]:
    """A job's events published until now, without waiting for more."""
    from worker import events as ev

    entries = job.client.redis.xrange(job.client.keys.events(job.job_id))
    return [ev.loads(fields[b"data"]) for _id, fields in entries]


def terminals(events: list[dict[str, Any]]) -> list[str]:
    """The terminal event types among ``events`` (exactly one for a job that ended)."""
    from worker import events as ev

    return [e["type"] for e in events if e["type"] in ev.TERMINAL_TYPES]


def streaming(jobs: list[Any]) -> int:
    """Jobs whose current attempt has published at least one chunk."""
    from worker import events as ev

    count = 0
    for job in jobs:
        kinds = [e["type"] for e in events_so_far(job)]
        if kinds and kinds[-1] == ev.CHUNK:
            count += 1
    return count


#: A ``message_start`` event of an empty message, for streams built in tests.
MESSAGE_START: dict[str, Any] = {
    "type": "message_start",
    "message": {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 1},
    },
}


def sse_body(*events: dict[str, Any]) -> bytes:
    """An upstream SSE body carrying ``events``, one ``event:``/``data:`` frame each."""
    return b"".join(
        b"event: " + str(e["type"]).encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n"
        for e in events
    )


def start_gateway_process(
    env: dict[str, str], log_path: Path | None = None, *, metrics_port: int | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """``llm-worker gateway`` in its own process with ``env``, on a free port, once it answers
    ``/healthz``; its stderr to ``log_path`` (else kept for the error if it exits at start).
    Its ``/metrics`` on ``metrics_port``, else on another free port (gateways run side by
    side)."""
    port = free_port()
    env = {**env, "LLM_WORKER_GATEWAY_METRICS_PORT": str(metrics_port or free_port())}
    log = log_path.open("wb") if log_path else subprocess.PIPE
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "gateway", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            if log_path is not None:
                raise RuntimeError(f"gateway exited: {log_path.read_text()}")
            raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "gateway exited")
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, 30, "the gateway")
    return proc, url
