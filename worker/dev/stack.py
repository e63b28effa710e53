"""The local stack of ``llm-worker dev`` and ``demo``: embedded Redis, simulator, one worker.

What the environment provides is used as it is: ``LLM_WORKER_REDIS_URL`` (else an embedded
Redis) and ``LLM_WORKER_API_KEY`` (else the simulator, and we say so). Everything we start is
stopped on exit, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from types import FrameType
from typing import Any

import httpx

from worker.connections.urls import mask_credentials
from worker.dev.embedded import EmbeddedRedis, free_port
from worker.settings import ENV_PREFIX, Settings, load_settings, settings_from_env

SIMULATOR_KEY = "sk-simulator-local"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _wait(predicate: Any, timeout_s: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start within {timeout_s} s")
        time.sleep(0.05)


class DevStack:
    """``with DevStack() as stack: Client(stack.settings)``."""

    def __init__(
        self,
        *,
        concurrency: int = 100,
        sim_tps: float = 40.0,
        sim_ttft_ms: float = 200.0,
        say: Any = print,
    ) -> None:
        self.concurrency = concurrency
        self.sim_tps = sim_tps
        self.sim_ttft_ms = sim_ttft_ms
        self.say = say
        self.redis: EmbeddedRedis | None = None
        self.processes: list[subprocess.Popen[bytes]] = []
        self.env: dict[str, str] = {}
        self.simulator_url: str | None = None
        self.metrics_port = 0

    @property
    def settings(self) -> Settings:
        return settings_from_env(self.env)

    def start(self) -> DevStack:
        base = load_settings()
        env = dict(os.environ)
        if f"{ENV_PREFIX}REDIS_URL" not in os.environ:
            self.redis = EmbeddedRedis().start()
            env[f"{ENV_PREFIX}REDIS_URL"] = self.redis.url
            self.say(f"redis      {self.redis.url} (embedded: {self.redis.binary})")
        else:
            self.say(f"redis      {mask_credentials(base.redis_url)} (from {ENV_PREFIX}REDIS_URL)")
        if base.api_key is None:
            port = free_port()
            sim = self._spawn(
                [
                    "simulate",
                    "--port",
                    str(port),
                    "--api-key",
                    SIMULATOR_KEY,
                    "--tps",
                    str(self.sim_tps),
                    "--ttft-ms",
                    str(self.sim_ttft_ms),
                ],
                env,
            )
            self.simulator_url = f"http://127.0.0.1:{port}"
            _wait(self._simulator_up, 20, "the simulator", sim)
            env[f"{ENV_PREFIX}API_BASE_URL"] = self.simulator_url
            env[f"{ENV_PREFIX}API_KEY"] = SIMULATOR_KEY
            self.say(
                f"upstream   {self.simulator_url} (the simulator: {ENV_PREFIX}API_KEY is not set)"
            )
        else:
            self.say(f"upstream   {base.api_base_url} (with your API key)")
        self.metrics_port = base.metrics_port if _port_free(base.metrics_port) else free_port()
        env[f"{ENV_PREFIX}METRICS_PORT"] = str(self.metrics_port)
        env[f"{ENV_PREFIX}CONCURRENCY"] = str(self.concurrency)
        env.setdefault(f"{ENV_PREFIX}LOG_LEVEL", "WARNING")
        env.setdefault(f"{ENV_PREFIX}LOG_FORMAT", "console")
        self.env = env
        worker = self._spawn(["run"], env)
        _wait(self._worker_up, 60, "the worker", worker)
        self.say(
            f"worker     pid {worker.pid}, {self.settings.pool} pool x{self.concurrency}; "
            f"metrics http://127.0.0.1:{self.metrics_port}/metrics"
        )
        return self

    def _spawn(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", *args], env=env, stdin=subprocess.DEVNULL
        )
        self.processes.append(proc)
        return proc

    def _simulator_up(self) -> bool:
        try:
            return httpx.get(f"{self.simulator_url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def _worker_up(self) -> bool:
        try:
            return (
                httpx.get(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1).status_code
                == 200
            )
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> DevStack:
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_term)
        self._previous_sigterm = previous
        # A shell starting us in the background (`cmd &`) leaves SIGINT ignored, and Python
        # then keeps it ignored: Ctrl-C (or a supervisor's SIGINT) would not stop the stack.
        self._previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
        signal.signal(signal.SIGTERM, self._previous_sigterm)
        signal.signal(signal.SIGINT, self._previous_sigint)


def run_dev(*, concurrency: int) -> int:
    """Start the stack and keep it up until Ctrl-C."""
    try:
        with DevStack(concurrency=concurrency) as stack:
            url = stack.env[f"{ENV_PREFIX}REDIS_URL"]
            print(
                f"\nready. In another shell:\n  export {ENV_PREFIX}REDIS_URL={url}\n"
                "  llm-worker submit 'Hello' --wait\nCtrl-C stops everything.",
                flush=True,
            )
            signal.pause()
    except KeyboardInterrupt:
        print("\nstopped.")
    return 0
