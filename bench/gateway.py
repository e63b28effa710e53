"""Gateway: what ``llm-worker gateway`` adds to one request at a time, against the same request
sent straight to the upstream, in the same round. At the defaults the gateway runs a lone
request itself (its fast path, ``worker/gateway/fast_path.py``); a worker runs at its defaults
beside it, for the jobs the fast path leaves to the queue.

Requests go one after another (no concurrency), each alternating between the two paths so
that drift hits both alike, over one kept-alive connection per path: a non-streamed
``/v1/messages`` of 10 output tokens from an upstream that answers at once, and the time to
the first streamed ``content_block_delta`` of the same request with ``stream: true``. The
job is written to Redis before the upstream is called (durability is kept).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson

from bench.jobs import request
from bench.stack import API_KEY, Process, Stack, wait_for
from bench.stats import median
from worker.client.core import qualified_id
from worker.dev.embedded import free_port
from worker.gateway.app import JOB_ID_HEADER
from worker.keys import Keys

PROMPT = "Say ten words [[sim tokens=10]]"
GATEWAY_KEY = "sk-bench-gateway-0000"
#: The gateway key's tenant: the job's Redis id is ``<tenant>/<the id the client sees>``.
TENANT = "bench"
QUEUE = "q-gateway"


@contextmanager
def _gateway(stack: Stack) -> Iterator[str]:
    port = free_port()
    env = stack.worker_env(queue=QUEUE, gateway_api_keys=f"{TENANT}:{GATEWAY_KEY}")
    args = [sys.executable, "-m", "worker.cli", "gateway", "--port", str(port)]
    proc = Process(args, env, "gateway")
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        proc.check()
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(up, 30, "the gateway")
        yield url
    finally:
        proc.stop()


def _time_once(
    client: httpx.Client, path: str, body: dict[str, Any], stages: list[tuple[str, float, float]]
) -> float:
    """Seconds until the whole answer (non-streamed) or the first text delta (streamed);
    a gateway's non-streamed answer adds ``(job id, sent, answered)`` (epoch) to ``stages``."""
    started, sent = time.perf_counter(), time.time()
    if not body.get("stream"):
        response = client.post(path, json=body)
        response.raise_for_status()
        if response.json().get("type") != "message":
            raise RuntimeError(f"not a message: {response.text[:200]}")
        took = time.perf_counter() - started
        if JOB_ID_HEADER in response.headers:
            job_id = qualified_id(TENANT, response.headers[JOB_ID_HEADER])
            stages.append((job_id, sent, sent + took))
        return took
    with client.stream("POST", path, json=body) as response:
        response.raise_for_status()
        first = None
        for line in response.iter_lines():  # read to the end: the connection is reused
            if first is None and line.startswith("data: ") and '"content_block_delta"' in line:
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("the stream ended without a text delta")
    return first


def _round(
    stack: Stack, direct: httpx.Client, gateway: httpx.Client, requests: int, stream: bool
) -> dict[str, float]:
    body = request(PROMPT, stream=stream, max_tokens=64)
    d_times, g_times = [], []
    stages: list[tuple[str, float, float]] = []
    for _ in range(requests):
        d_times.append(_time_once(direct, "/messages", body, stages))
        g_times.append(_time_once(gateway, "/v1/messages", body, stages))
    d, g = median(d_times) * 1000, median(g_times) * 1000
    return {"direct_p50_ms": d, "gateway_p50_ms": g, "added_p50_ms": g - d} | _stages(stack, stages)


def _stages(stack: Stack, stages: list[tuple[str, float, float]]) -> dict[str, float]:
    """Where a gateway request's time goes (p50 ms), from the job's own clock readings: until
    the submit (``submitted_at``, read just before the write is sent), until the job started
    (the claim's clock: on the queue path the queue, dispatch and claim; on the fast path the
    claim goes with the write, so its round trip falls in the next stage), the attempt (the
    upstream call), and from its end to the client's answer."""
    if not stages:
        return {}
    keys = Keys("llmw")
    pipe = stack.redis.pipeline(transaction=False)
    for job_id, _, _ in stages:
        pipe.hget(keys.job(job_id), "submitted_at")
        pipe.xrange(keys.events(job_id))
    replies = pipe.execute()
    parts: dict[str, list[float]] = {
        "to_written_ms": [],
        "written_to_started_ms": [],
        "attempt_ms": [],
        "ended_to_answer_ms": [],
    }
    for (_, sent, answered), submitted, entries in zip(
        stages, replies[::2], replies[1::2], strict=True
    ):
        if submitted is None or not entries:
            continue
        first = orjson.loads(entries[0][1][b"data"])["ts"]
        last = orjson.loads(entries[-1][1][b"data"])["ts"]
        written = float(submitted)
        for key, value in zip(
            parts, (written - sent, first - written, last - first, answered - last), strict=True
        ):
            parts[key].append(value * 1000)
    return {key: median(values) for key, values in parts.items()}


def run(*, requests: int, repeat: int) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, float]]] = {"message": [], "first_chunk": []}
    with (
        Stack() as stack,
        stack.llmw_run(concurrency=None, processes=None, queue=QUEUE) as worker,
        _gateway(stack) as url,
    ):
        headers = {"x-api-key": GATEWAY_KEY, "anthropic-version": "2023-06-01"}
        direct_headers = {"authorization": f"Bearer {API_KEY}", "anthropic-version": "2023-06-01"}
        with (
            httpx.Client(base_url=stack.sim_url, headers=direct_headers, timeout=30) as direct,
            httpx.Client(base_url=url, headers=headers, timeout=30) as gateway,
        ):
            for stream in (False, True):  # warm-up: connections, imports, every process
                _round(stack, direct, gateway, 20, stream)
            for _ in range(repeat):
                worker.check()
                rounds["message"].append(_round(stack, direct, gateway, requests, False))
                rounds["first_chunk"].append(_round(stack, direct, gateway, requests, True))
    summary = {kind: {k: median([r[k] for r in rs]) for k in rs[0]} for kind, rs in rounds.items()}
    return {"requests": requests, "repeat": repeat, "rounds": rounds, "summary": summary}
