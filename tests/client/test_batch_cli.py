"""``llm-worker batch``: a file of requests runs to one result per custom_id, resumably."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support import ROOT, WorkerProcess, make_request, new_keys, wait_for, written_keys
from worker.client import batch_file as b
from worker.client.sync import Client
from worker.errors import JobNotFound

pytestmark = pytest.mark.integration


def _write(path: Path, lines: list[dict[str, Any]]) -> bytes:
    content = b"".join(orjson.dumps(line) + b"\n" for line in lines)
    path.write_bytes(content)
    return content


def _batch(worker: WorkerProcess, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "batch", *args],
        cwd=ROOT,
        env=worker.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _finish(proc: subprocess.Popen[bytes], timeout_s: float = 180) -> tuple[int, str]:
    _out, err = proc.communicate(timeout=timeout_s)
    return proc.returncode, err.decode(errors="replace")


def _results(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def _submitted(client: Client) -> int:
    counts = client.redis.hgetall(client.keys.submitted_counts(client.settings.queue))
    return sum(int(v) for v in counts.values())


def test_thousand_lines_with_a_fault_mix_give_one_result_per_custom_id(
    worker: WorkerProcess, client: Client, tmp_path: Path
) -> None:
    """Transient faults are retried to success, permanent ones error, cancelled ones cancel."""
    lines = []
    expected: dict[str, str] = {}
    for i in range(1000):
        custom_id = f"req-{i:04d}"
        directive, model, kind = "tokens=2", "deepseek-ai/DeepSeek-V3", "succeeded"
        if i % 10 == 1:
            directive += " fault=500 fault_times=1"  # one retry, then fine
        elif i % 10 == 2:
            directive += " fault=cut fault_times=1"
        elif i % 50 == 3:
            model, kind = "no-such/model", "errored"  # the upstream's 400: final
        elif i % 100 == 4:
            directive, kind = "tokens=2 fault=503", "errored"  # every attempt fails
        elif i in (5, 6, 7):
            directive, kind = "tokens=2000 tps=20", "canceled"  # cancelled by the test below
        # Cancelling cuts a streamed answer; a non-streamed call that returns still completes.
        stream = kind == "canceled" or i % 3 != 0
        request = make_request(f"{custom_id} [[sim {directive}]]", stream=stream)
        lines.append({"custom_id": custom_id, "params": {**request, "model": model}})
        expected[custom_id] = kind
    path, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    content = _write(path, lines)
    before = _submitted(client)
    proc = _batch(worker, str(path), "--out", str(out), "--timeout", "170")
    batch_id = b.file_batch_id(content)
    for i in (5, 6, 7):
        job_id = b.job_id_for(batch_id, f"req-{i:04d}")

        def running(job_id: str = job_id) -> bool:
            try:
                return bool(client.get(job_id).status()["state"] == "running")
            except JobNotFound:
                return False

        wait_for(running, 60, f"{job_id} to run")
        assert client.get(job_id).cancel()
    code, err = _finish(proc)
    assert code == 0, err
    results = _results(out)
    assert len(results) == 1000
    got = {r["custom_id"]: r["result"]["type"] for r in results}
    assert got == expected
    assert _submitted(client) - before == 1000
    by_id = {r["custom_id"]: r["result"] for r in results}
    assert by_id["req-0000"]["message"]["type"] == "message"
    assert by_id["req-0003"]["error"]["error"]["type"] == "invalid_request_error"
    assert by_id["req-0004"]["error"] == {
        "type": "error",
        "error": {"type": "api_error", "message": by_id["req-0004"]["error"]["error"]["message"]},
    }
    assert "succeeded" in err


def test_interrupted_run_resumes_without_submitting_anything_twice(
    worker: WorkerProcess, client: Client, tmp_path: Path
) -> None:
    """SIGKILL mid-run, a torn last line, then a rerun: every result once, every job once."""
    lines = [
        {
            "custom_id": f"r{i}",
            "params": make_request(f"resume {i} {tmp_path.name} [[sim tokens=20 tps=60]]"),
        }
        for i in range(300)
    ]
    path, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    content = _write(path, lines)
    before = _submitted(client)
    proc = _batch(worker, str(path), "--out", str(out))
    wait_for(lambda: out.exists() and out.read_bytes().count(b"\n") >= 5, 60, "first results")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    written = _results(out)
    assert 5 <= len(written) < 300, "the run was not interrupted mid-way"
    with out.open("ab") as f:
        f.write(b'{"custom_id": "r1", "result": {"ty')  # a write cut by the kill
    code, err = _finish(_batch(worker, str(path), "--out", str(out)))
    assert code == 0, err
    results = _results(out)
    assert sorted(r["custom_id"] for r in results) == sorted(f"r{i}" for i in range(300))
    assert Counter(r["result"]["type"] for r in results) == {"succeeded": 300}
    assert results[: len(written)] == written  # earlier lines kept as they were
    assert _submitted(client) - before == 300
    batch_id = b.file_batch_id(content)
    status = client.get(b.job_id_for(batch_id, "r0")).status()
    assert status["metadata"] == {"batch_id": batch_id, "custom_id": "r0"}
    # A third run finds everything done: nothing submitted, the file unchanged.
    final = out.read_bytes()
    code, err = _finish(_batch(worker, str(path), "--out", str(out)))
    assert code == 0, err
    assert "0 to go" in err
    assert out.read_bytes() == final
    assert _submitted(client) - before == 300


def test_a_file_with_bad_lines_is_refused_naming_them(
    worker: WorkerProcess, client: Client, tmp_path: Path
) -> None:
    """Bad lines are listed by number and nothing reaches Redis."""
    good = {"custom_id": "fine", "params": make_request("fine")}
    path, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    path.write_bytes(
        orjson.dumps(good)
        + b"\n{oops\n"
        + orjson.dumps({"custom_id": "x", "params": {**make_request("y"), "max_tokens": 0}})
        + b"\n\n"
        + orjson.dumps(good)
        + b"\n"
    )
    before, queued = written_keys(client), client.redis.llen(client.settings.queue)
    code, err = _finish(_batch(worker, str(path), "--out", str(out)))
    assert code == 2
    assert "3 bad line(s): 2, 3, 5" in err
    assert "line 3: params.max_tokens" in err
    assert new_keys(client, before, queued) == set()
    assert not out.exists()


def test_results_of_another_batch_are_not_overwritten(
    worker: WorkerProcess, tmp_path: Path
) -> None:
    """An --out that holds another batch's results is refused and left as it was."""
    path, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    _write(path, [{"custom_id": "a", "params": make_request("a")}])
    out.write_bytes(b.result_line("other", {"type": "canceled"}))
    code, err = _finish(_batch(worker, str(path), "--out", str(out)))
    assert code == 2
    assert "another batch" in err
    assert out.read_bytes() == b.result_line("other", {"type": "canceled"})


def test_a_missing_file_is_a_clear_error(worker: WorkerProcess, tmp_path: Path) -> None:
    """A path that does not exist is named in the error."""
    code, err = _finish(_batch(worker, str(tmp_path / "nope.jsonl"), "--out", "x"))
    assert code == 2
    assert "nope.jsonl" in err
