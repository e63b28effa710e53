"""The hand-rolled alternative: one asyncio process, one ``httpx.AsyncClient``, N streams.

Run as ``python -m bench.direct URL API_KEY JOBS CONCURRENCY PROMPT`` in its own process (so
that its CPU time and peak RSS are its own); prints one JSON line: wall time, events read,
the CPU time it used reading them, and, for prompts with ``stamp=1``, each delta's delay from
leaving the simulator.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import httpx
import orjson

from bench.stack import MODEL


async def _one(
    http: httpx.AsyncClient, request: dict[str, Any], gate: asyncio.Semaphore, out: dict[str, Any]
) -> None:
    async with gate, http.stream("POST", "/messages", json=request) as response:
        response.raise_for_status()
        text: list[str] = []
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = orjson.loads(line[6:])
            out["events"] += 1
            if event["type"] == "content_block_delta":
                sent = event.get("sim_sent_at")
                if sent is not None:
                    out["delays_ms"].append((time.time() - sent) * 1000)
                text.append(event["delta"].get("text", ""))
        out["chars"] += len("".join(text))


async def run(url: str, api_key: str, jobs: int, concurrency: int, prompt: str) -> dict[str, Any]:
    request = {
        "model": MODEL,
        "max_tokens": 4096,
        "stream": True,
        "messages": [{"role": "user", "content": prompt}],
    }
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=min(concurrency, 64)
    )
    out: dict[str, Any] = {"events": 0, "chars": 0, "delays_ms": []}
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        base_url=url,
        headers={"authorization": f"Bearer {api_key}", "anthropic-version": "2023-06-01"},
        limits=limits,
        timeout=httpx.Timeout(60, pool=None),
    ) as http:
        started, cpu = time.monotonic(), time.process_time()
        await asyncio.gather(*(_one(http, request, gate, out) for _ in range(jobs)))
        out["wall_s"] = time.monotonic() - started
        out["cpu_s"] = time.process_time() - cpu
    return out


def main() -> None:
    url, api_key, jobs, concurrency, prompt = sys.argv[1:6]
    result = asyncio.run(run(url, api_key, int(jobs), int(concurrency), prompt))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
