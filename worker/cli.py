"""``llm-worker``: run a worker, submit and follow jobs, run the simulator or the local stack.

Imports stay inside the commands: ``run`` must patch gevent before anything opens a socket,
and ``--help`` should not pay for Celery.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
EXIT_FAILED = 1


def _settings(**overrides: Any) -> Any:
    from worker.settings import load_settings

    return load_settings(**{k: v for k, v in overrides.items() if v is not None})


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


# -- run ---------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(
        pool=args.pool,
        concurrency=args.concurrency,
        processes=args.processes,
        queue=args.queue,
        log_level=args.loglevel,
    )
    if settings.api_key is None:
        _console(stderr=True).print(
            "llm-worker run: LLM_WORKER_API_KEY is not set. A production worker needs the "
            "upstream's API key; for a local stack with the simulator use `llm-worker dev`."
        )
        return EXIT_USAGE
    if settings.pool in {"gevent", "eventlet"} and settings.processes == 1:
        # (A supervisor of several processes runs no jobs itself: nothing to patch.)
        from celery import maybe_patch_concurrency

        maybe_patch_concurrency(["celery", "worker", "-P", settings.pool])
    # (After the patch: redis imports ssl, which gevent must patch first.)
    from worker.connections.clients import RedisClusterUnsupported, check_not_cluster
    from worker.process.main import run_worker

    try:
        check_not_cluster(settings)
    except RedisClusterUnsupported as exc:
        _console(stderr=True).print(f"llm-worker run: {exc}", markup=False)
        return EXIT_USAGE
    return run_worker(settings)


# -- submit / watch / status / cancel ------------------------------------------------------


def _request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.json:
        text = sys.stdin.read() if args.json == "-" else Path(args.json).read_text(encoding="utf-8")
        try:
            request = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"llm-worker submit: {args.json} is not JSON: {exc}") from None
        if not isinstance(request, dict):
            raise SystemExit(f"llm-worker submit: {args.json} must hold a JSON object")
        if args.stream is not None:
            request["stream"] = args.stream
        return request
    if not args.prompt:
        raise SystemExit("llm-worker submit: give a prompt, or a request with --json FILE")
    request = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "messages": [{"role": "user", "content": args.prompt}],
        "stream": True if args.stream is None else args.stream,
    }
    for name in ("system", "temperature", "top_p", "top_k"):
        value = getattr(args, name)
        if value is not None:
            request[name] = value
    if args.stop:
        request["stop_sequences"] = args.stop
    return request


def cmd_submit(args: argparse.Namespace) -> int:
    from worker.client.sync import Client
    from worker.errors import LLMWorkerError

    request = _request_from_args(args)
    metadata = None
    if args.metadata:
        try:
            metadata = json.loads(args.metadata)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"llm-worker submit: --metadata is not JSON: {exc}") from None
    with Client() as client:
        try:
            job = client.submit(
                request,
                job_id=args.job_id,
                metadata=metadata,
                priority=args.priority,
                tenant=args.tenant,
                deadline_s=args.deadline,
            )
        except LLMWorkerError as exc:
            _console(stderr=True).print(f"llm-worker submit: {exc}", markup=False)
            return EXIT_USAGE
        if not args.wait:
            print(job.job_id)
            return 0
        _console(stderr=True).print(f"job {job.job_id}", markup=False)
        return _follow(job, timeout=args.timeout, raw=False)


def _follow(job: Any, *, timeout: float | None, raw: bool) -> int:  # noqa: PLR0911, PLR0912 - one branch per event type
    """Print a job's text as it streams; a retry starts the answer again, visibly."""
    from worker import events as ev
    from worker.errors import JobNotFound

    out, err = sys.stdout, _console(stderr=True)
    printed_text = False
    try:
        for event in job.events(timeout=timeout):
            if raw:
                out.write(json.dumps(event) + "\n")
                out.flush()
                if event["type"] in ev.TERMINAL_TYPES:
                    return 0 if event["type"] == ev.COMPLETED else EXIT_FAILED
                continue
            kind = event["type"]
            if kind == ev.CHUNK:
                text = ev.text_of(event)
                printed_text = printed_text or bool(text)
                out.write(text)
                out.flush()
            elif kind == ev.RETRY:
                printed_text = False
                err.print(
                    f"\n[attempt {event['attempt']} failed: {event.get('reason')}; "
                    f"retrying in {event.get('delay_s')} s, the answer restarts]",
                    markup=False,
                )
            elif kind == ev.COMPLETED:
                message = event["message"]
                if not printed_text:
                    out.write(
                        "".join(
                            b.get("text", "")
                            for b in message.get("content", [])
                            if b.get("type") == "text"
                        )
                    )
                for block in message.get("content", []):
                    if block.get("type") == "tool_use":
                        out.write(f"\n[tool_use {block['name']}: {json.dumps(block['input'])}]")
                usage = message.get("usage", {})
                out.write("\n")
                err.print(
                    f"[completed: {message.get('stop_reason')}, "
                    f"{usage.get('input_tokens')} in / {usage.get('output_tokens')} out]",
                    markup=False,
                )
                return 0
            elif kind in ev.TERMINAL_TYPES:
                err.print(f"\n[{kind}: {event.get('error')}]", markup=False)
                return EXIT_FAILED
    except JobNotFound as exc:
        err.print(str(exc), markup=False)
        return EXIT_USAGE
    except TimeoutError as exc:
        err.print(str(exc), markup=False)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return EXIT_FAILED


def cmd_watch(args: argparse.Namespace) -> int:
    from worker.client.sync import Client
    from worker.errors import JobNotFound

    with Client() as client:
        try:
            job = client.get(args.job_id, tenant=args.tenant)
        except JobNotFound as exc:
            _console(stderr=True).print(str(exc), markup=False)
            return EXIT_USAGE
        return _follow(job, timeout=args.timeout, raw=args.raw)


def cmd_status(args: argparse.Namespace) -> int:
    from worker.client.sync import Client
    from worker.errors import JobNotFound

    with Client() as client:
        try:
            status = client.get(args.job_id, tenant=args.tenant).status()
        except JobNotFound as exc:
            _console(stderr=True).print(str(exc), markup=False)
            return EXIT_USAGE
    print(json.dumps(status, indent=2))
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    import time

    from worker.accounting.pricing import usd_text
    from worker.accounting.usage import read_usage
    from worker.client.sync import Client

    if args.days < 1 or args.days > 400:
        _console(stderr=True).print("llm-worker usage: --days must be 1-400", markup=False)
        return EXIT_USAGE
    with Client() as client:
        rows = read_usage(
            client.redis, client.keys, tenant=args.tenant, days=args.days, now=time.time()
        )
    if args.json:
        print(json.dumps([row.as_json() for row in rows], indent=2))
        return 0
    header = ("day", "tenant", "model", "jobs", "input_tokens", "output_tokens", "cost_usd")
    table = [header] + [
        (
            r.day,
            r.tenant or "(none)",
            r.model,
            str(r.jobs),
            str(r.input_tokens),
            str(r.output_tokens),
            usd_text(r.cost_pusd),
        )
        for r in rows
    ]
    total = sum(r.cost_pusd for r in rows)
    table.append(("total", "", "", str(sum(r.jobs for r in rows)), "", "", usd_text(total)))
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from worker.client.sync import Client
    from worker.errors import JobNotFound

    with Client() as client:
        try:
            job = client.get(args.job_id, tenant=args.tenant)
            changed = job.cancel()
        except JobNotFound as exc:
            _console(stderr=True).print(str(exc), markup=False)
            return EXIT_USAGE
        state = job.status()["state"]
    if not changed:
        _console(stderr=True).print(f"job {args.job_id} had already ended: {state}", markup=False)
        return EXIT_FAILED
    print(f"{args.job_id}: {'cancelled' if state == 'cancelled' else 'cancellation requested'}")
    return 0


# -- batch ---------------------------------------------------------------------------------


def _traffic_arguments(parser: argparse.ArgumentParser, *, batch: bool) -> None:
    default_priority = "2" if batch else "5"
    default_deadline = "BATCH_DEADLINE_S (24 h)" if batch else "JOB_DEADLINE_S"
    parser.add_argument(
        "--priority",
        type=int,
        help=f"0-9, higher served first (default {default_priority})",
    )
    parser.add_argument("--tenant", help="the team the job(s) belong to")
    parser.add_argument(
        "--deadline",
        type=float,
        metavar="SECONDS",
        help=f"the job's life from submission (default {default_deadline})",
    )


def cmd_batch(args: argparse.Namespace) -> int:
    from worker.client.batch_run import BatchOptions, run_batch

    return run_batch(
        Path(args.file),
        Path(args.out),
        batch_id=args.batch_id,
        timeout_s=args.timeout,
        options=BatchOptions(priority=args.priority, tenant=args.tenant, deadline_s=args.deadline),
    )


# -- gateway -------------------------------------------------------------------------------


def cmd_gateway(args: argparse.Namespace) -> int:
    settings = _settings()
    err = _console(stderr=True)
    if not settings.gateway_api_keys and settings.gateway_api_keys_file is None:
        err.print(
            "llm-worker gateway: neither LLM_WORKER_GATEWAY_API_KEYS nor "
            "LLM_WORKER_GATEWAY_API_KEYS_FILE is set. Give the producers' API keys "
            "(comma-separated name:key pairs, or a file of name:sha256 lines); the gateway does "
            "not serve without them.",
            markup=False,
        )
        return EXIT_USAGE
    from worker.gateway.auth import KeyRing, KeysFileError

    try:
        ring = KeyRing(
            [k.get_secret_value() for k in settings.gateway_api_keys],
            settings.gateway_api_keys_file,
        )
    except KeysFileError as exc:
        err.print(f"llm-worker gateway: LLM_WORKER_GATEWAY_API_KEYS_FILE: {exc}", markup=False)
        return EXIT_USAGE
    if not ring.keys:
        err.print(
            "llm-worker gateway: the keys file lists no key, and LLM_WORKER_GATEWAY_API_KEYS "
            "is not set; the gateway does not serve without keys.",
            markup=False,
        )
        return EXIT_USAGE
    from worker.connections.clients import RedisClusterUnsupported, check_not_cluster
    from worker.gateway.app import serve

    try:
        check_not_cluster(settings)
    except RedisClusterUnsupported as exc:
        _console(stderr=True).print(f"llm-worker gateway: {exc}", markup=False)
        return EXIT_USAGE
    port = settings.gateway_port if args.port is None else args.port
    _console(stderr=True).print(f"gateway on http://{args.host}:{port}", markup=False)
    from worker.gateway.exporter import MetricsPortUnavailable

    try:
        serve(settings, host=args.host, port=port)
    except MetricsPortUnavailable as exc:
        err.print(f"llm-worker gateway: {exc}", markup=False)
        return EXIT_USAGE
    return 0


# -- dlq -----------------------------------------------------------------------------------


def _dlq_selection(args: argparse.Namespace, dead: Any) -> Any:
    """The entries a requeue/purge names: ids, or --all (optionally of one --reason)."""
    if args.all == bool(args.ids):
        raise _Usage("name dead-letter ids, or --all (optionally with --reason), not both")
    if args.ids:
        if args.reason:
            raise _Usage("--reason selects with --all, not with ids")
        return dead.get(args.ids)
    return dead.entries(reason=args.reason)


class _Usage(Exception):
    pass


def cmd_dlq(args: argparse.Namespace) -> int:
    from worker.client.dead_letters import DeadLetterError, DeadLetters
    from worker.client.sync import Client

    err = _console(stderr=True)
    with Client() as client:
        dead = DeadLetters(client)
        try:
            if args.action == "list":
                return _dlq_list(dead, args)
            entries = _dlq_selection(args, dead)
            if args.action == "requeue":
                failed = 0
                for outcome in dead.requeue(entries):
                    if outcome.job is None:
                        failed += 1
                        err.print(f"{outcome.entry.entry_id}: kept: {outcome.error}", markup=False)
                    else:
                        print(
                            f"{outcome.entry.entry_id}: job {outcome.entry.job_id or '-'} "
                            f"requeued as {outcome.job.job_id}"
                        )
                return EXIT_FAILED if failed else 0
            if args.ids is None or not args.ids:
                if not args.yes:
                    raise _Usage("purging every dead letter needs --yes")
                if args.reason is None:
                    print(f"purged {dead.purge()} dead letters")
                    return 0
            print(f"purged {dead.purge(entries)} dead letters")
            return 0
        except (DeadLetterError, _Usage) as exc:
            err.print(f"llm-worker dlq {args.action}: {exc}", markup=False)
            return EXIT_USAGE


def _dlq_list(dead: Any, args: argparse.Namespace) -> int:
    import datetime as dt

    entries = dead.entries(reason=args.reason, limit=args.limit)
    if args.json:
        for entry in entries:
            print(json.dumps(entry.to_json()))
        return 0
    from rich.table import Table

    table = Table(title=f"{len(dead)} dead letters")
    table.add_column("id", no_wrap=True)
    table.add_column("time (UTC)", no_wrap=True)
    table.add_column("job", overflow="fold")
    table.add_column("reason", no_wrap=True)
    table.add_column("payload", no_wrap=True, overflow="ellipsis", max_width=40)
    for entry in entries:
        when = dt.datetime.fromtimestamp(entry.ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        preview = entry.payload.decode("utf-8", "replace")
        table.add_row(
            entry.entry_id,
            when,
            entry.job_id or "-",
            entry.reason,
            preview[:60] + ("…" if len(preview) > 60 else ""),
        )
    console = _console()
    if not console.is_terminal:
        console.width = 200  # piped: keep each entry on one line for grep
    console.print(table)
    return 0


# -- simulate / dev / demo -----------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> int:
    from worker.simulator import FaultMix, RateLimits, SimulatorConfig, serve

    try:
        # --retry-after-s applies to forced 429s too (directives), and wins over the JSON's.
        timing = {} if args.retry_after_s is None else {"retry_after_s": args.retry_after_s}
        faults = FaultMix.from_json(args.faults, **timing) if args.faults else FaultMix(**timing)
        limits = RateLimits(rpm=args.rpm, tpm=args.tpm, window_s=args.window_s)
    except ValueError as exc:
        _console(stderr=True).print(f"llm-worker simulate: {exc}", markup=False)
        return EXIT_USAGE
    config = SimulatorConfig(
        host=args.host,
        port=args.port,
        seed=args.seed,
        ttft_s=args.ttft_ms / 1000.0,
        tokens_per_s=args.tps,
        api_key=args.api_key,
        faults=faults,
        rate_limits=limits,
        models=tuple(m.strip() for m in (args.models or "").split(",") if m.strip()),
    )
    _console(stderr=True).print(f"simulator on http://{args.host}:{args.port}", markup=False)
    serve(config)
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from worker.dev.stack import run_dev

    code: int = run_dev(concurrency=args.concurrency)
    return code


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.dev.demo import run_demo

    code: int = run_demo(
        jobs=args.jobs, concurrency=args.concurrency, tps=args.tps, metrics=args.metrics
    )
    return code


# -- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:  # noqa: PLR0915 - one flat list of every flag
    parser = argparse.ArgumentParser(
        prog="llm-worker",
        description="Queue Anthropic-style /messages calls on Redis and run them with Celery.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a worker (plus its /metrics, /healthz, /readyz server)")
    run.add_argument("--pool", choices=["gevent", "eventlet", "threads", "prefork", "solo"])
    run.add_argument("--concurrency", type=int)
    run.add_argument(
        "--processes",
        help="worker processes, each with --concurrency jobs, under one supervisor "
        "(gevent, threads, solo; default auto: one per usable core)",
    )
    run.add_argument("--queue")
    run.add_argument("--loglevel")
    run.set_defaults(func=cmd_run)

    submit = sub.add_parser("submit", help="submit one job (--wait prints the text as it streams)")
    submit.add_argument("prompt", nargs="?", help="the user message")
    submit.add_argument("--json", metavar="FILE", help="the whole request as JSON ('-' for stdin)")
    submit.add_argument("--model", default="deepseek-ai/DeepSeek-V3")
    submit.add_argument("--max-tokens", type=int, default=1024)
    submit.add_argument("--system")
    submit.add_argument("--temperature", type=float)
    submit.add_argument("--top-p", dest="top_p", type=float)
    submit.add_argument("--top-k", dest="top_k", type=int)
    submit.add_argument("--stop", action="append", help="a stop sequence (repeatable)")
    submit.add_argument("--stream", dest="stream", action="store_true", default=None)
    submit.add_argument("--no-stream", dest="stream", action="store_false")
    submit.add_argument("--job-id")
    submit.add_argument("--metadata", help="a JSON object returned with the result")
    _traffic_arguments(submit, batch=False)
    submit.add_argument("--wait", action="store_true", help="follow the job and print its text")
    submit.add_argument("--timeout", type=float, help="seconds to wait with --wait")
    submit.set_defaults(func=cmd_submit)

    watch = sub.add_parser("watch", help="replay a job's events and follow it to the end")
    watch.add_argument("job_id")
    watch.add_argument("--tenant", help="the tenant the job belongs to")
    watch.add_argument("--raw", action="store_true", help="print every event as a JSON line")
    watch.add_argument("--timeout", type=float)
    watch.set_defaults(func=cmd_watch)

    status = sub.add_parser("status", help="print a job's state as JSON")
    status.add_argument("job_id")
    status.add_argument("--tenant", help="the tenant the job belongs to")
    status.set_defaults(func=cmd_status)

    usage = sub.add_parser(
        "usage", help="tokens and cost per tenant, model and UTC day (exact, from Redis)"
    )
    usage.add_argument("--tenant", help="only this tenant")
    usage.add_argument("--days", type=int, default=7, help="the last N UTC days (default 7)")
    usage.add_argument("--json", action="store_true", help="print JSON rows")
    usage.set_defaults(func=cmd_usage)

    cancel = sub.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.add_argument("--tenant", help="the tenant the job belongs to")
    cancel.set_defaults(func=cmd_cancel)

    batch = sub.add_parser(
        "batch",
        help="run a JSONL file of {custom_id, params} requests; resumable",
        description="Validate every line (a file with bad lines is refused, nothing "
        "submitted), submit the requests, show progress, and write one result line per "
        "custom_id. Running the same command again after an interruption submits nothing "
        "twice and completes the results file.",
    )
    batch.add_argument("file", help="requests, one JSON object per line")
    batch.add_argument("--out", required=True, help="results JSONL (appended to on a rerun)")
    batch.add_argument(
        "--batch-id",
        help="name the batch (default: from the file's bytes, so an edited file is a new batch)",
    )
    batch.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    _traffic_arguments(batch, batch=True)
    batch.set_defaults(func=cmd_batch)

    gateway = sub.add_parser(
        "gateway", help="serve Anthropic's /v1/messages and Message Batches over the queue"
    )
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=int, help="default: LLM_WORKER_GATEWAY_PORT (8000)")
    gateway.set_defaults(func=cmd_gateway)

    dlq = sub.add_parser("dlq", help="list, requeue or purge the dead letters")
    dlq_sub = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    dlq_list = dlq_sub.add_parser("list", help="show the dead letters, oldest first")
    dlq_list.add_argument("--reason", help="only this reason (e.g. http_400, delivery_limit)")
    dlq_list.add_argument("--limit", type=int, help="at most this many")
    dlq_list.add_argument("--json", action="store_true", help="one JSON object per line")
    for action, text in (
        ("requeue", "submit the requests again as new jobs and drop the entries"),
        ("purge", "delete dead letters"),
    ):
        cmd = dlq_sub.add_parser(action, help=text)
        cmd.add_argument("ids", nargs="*", metavar="ID", help="dead-letter ids (from `dlq list`)")
        cmd.add_argument("--all", action="store_true", help="every entry (of --reason, if given)")
        cmd.add_argument("--reason", help="with --all: only this reason")
        if action == "purge":
            cmd.add_argument("--yes", action="store_true", help="confirm purging with --all")
    dlq.set_defaults(func=cmd_dlq)

    sim = sub.add_parser("simulate", help="serve the fake Anthropic-compatible upstream")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8080)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--ttft-ms", type=float, default=50.0)
    sim.add_argument("--tps", type=float, default=0.0, help="tokens per second (0 = no delay)")
    sim.add_argument("--api-key", help="the only Bearer token accepted (default: any)")
    sim.add_argument("--faults", help='fault mix as JSON, e.g. {"429": 0.1, "cut": 0.02}')
    sim.add_argument(
        "--retry-after-s", type=float, help="retry-after of injected 429s (default 1, or --faults')"
    )
    sim.add_argument("--rpm", type=int, help="requests per minute before 429")
    sim.add_argument("--tpm", type=int, help="tokens per minute before 429")
    sim.add_argument(
        "--window-s", type=float, default=60.0, help="the window --rpm and --tpm count over"
    )
    sim.add_argument("--models", help="comma-separated models served (default: any)")
    sim.set_defaults(func=cmd_simulate)

    dev = sub.add_parser("dev", help="embedded Redis + simulator + worker; stays up")
    dev.add_argument("--concurrency", type=int, default=100)
    dev.set_defaults(func=cmd_dev)

    demo = sub.add_parser("demo", help="the dev stack, a fan-out of sample jobs, a summary")
    demo.add_argument("--jobs", type=int, default=60)
    demo.add_argument("--concurrency", type=int, default=100)
    demo.add_argument("--tps", type=float, default=40.0, help="simulated tokens per second")
    demo.add_argument(
        "--metrics", action="store_true", help="print the worker's /metrics samples at the end"
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from worker.errors import SettingsError

    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except SettingsError as exc:
        _console(stderr=True).print(f"llm-worker {args.command}: {exc}", markup=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
