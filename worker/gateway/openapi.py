"""The gateway's OpenAPI document, written by hand: the routes are few and their bodies are
Anthropic's, described by reference rather than copied."""

from __future__ import annotations

from typing import Any

from worker import __version__
from worker.settings import Settings

_ERROR = {"$ref": "#/components/schemas/Error"}
_ANTHROPIC = "https://docs.anthropic.com/en/api"


def _responses(ok: str, media: str = "application/json", schema: Any = None) -> dict[str, Any]:
    body = {media: {"schema": schema or {"type": "object"}}}
    errors = {
        "400": "invalid request (every bad field is named)",
        "401": "no valid producer key",
        "404": "no such job or batch of the caller's tenant (another tenant's is the same 404)",
        "413": "body over the size limit",
        "429": "the tenant's queued quota, or the gateway's bound for one key, is reached "
        "(retry-after)",
        "503": "the gateway's overall bound is reached, or Redis is busy (retry-after)",
        "502": "the upstream failed the job, or refused this service's own key (never a 401)",
    }
    out: dict[str, Any] = {"200": {"description": ok, "content": body}}
    for code, text in errors.items():
        out[code] = {"description": text, "content": {"application/json": {"schema": _ERROR}}}
    return out


def _op(summary: str, ok: str, *, body: str | None = None, **kw: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": _responses(ok, **kw)}
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object", "description": body}}},
        }
    return op


def _id(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def openapi_document(settings: Settings) -> dict[str, Any]:
    sse = "text/event-stream"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llm-worker gateway",
            "version": __version__,
            "description": "Anthropic-compatible /v1/messages and Message Batches, run as "
            "queued, rate-limited, retried jobs; plus the jobs themselves. Request and "
            f"response bodies are Anthropic's ({_ANTHROPIC}). Bodies over "
            f"{settings.max_request_bytes} bytes (messages) or "
            f"{settings.gateway_max_body_bytes} bytes (batches) are refused with 413.",
        },
        "security": [{"apiKey": []}, {"bearer": []}],
        "paths": {
            "/v1/messages": {
                "post": {
                    **_op(
                        "Create a message (a job); streamed when stream is true",
                        "the final message, or its SSE stream (ids resume with Last-Event-ID)",
                        body=f"Anthropic's Messages request ({_ANTHROPIC}/messages)",
                    ),
                    "parameters": [
                        {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
                        {"name": "llm-worker-job-id", "in": "header", "schema": {"type": "string"}},
                    ],
                }
            },
            "/v1/messages/batches": {
                "post": _op(
                    "Create a Message Batch",
                    "the MessageBatch",
                    body='{"requests": [{"custom_id", "params"}]}',
                ),
                "get": {
                    **_op("List Message Batches, newest first", "a page of MessageBatch"),
                    "parameters": [
                        {"name": n, "in": "query", "schema": {"type": t}}
                        for n, t in (
                            ("limit", "integer"),
                            ("before_id", "string"),
                            ("after_id", "string"),
                        )
                    ],
                },
            },
            "/v1/messages/batches/{batch_id}": {
                "get": {
                    **_op("Retrieve a Message Batch", "the MessageBatch"),
                    "parameters": [_id("batch_id")],
                }
            },
            "/v1/messages/batches/{batch_id}/cancel": {
                "post": {
                    **_op("Cancel a Message Batch", "the MessageBatch"),
                    "parameters": [_id("batch_id")],
                }
            },
            "/v1/messages/batches/{batch_id}/results": {
                "get": {
                    **_op(
                        "Results of an ended batch",
                        "one result per line",
                        media="application/x-jsonl",
                    ),
                    "parameters": [_id("batch_id")],
                }
            },
            "/v1/jobs/{job_id}": {
                "get": {
                    **_op("A job's state", "the job's public status as JSON"),
                    "parameters": [_id("job_id")],
                }
            },
            "/v1/jobs/{job_id}/events": {
                "get": {
                    **_op(
                        "A job's events, replayed then live",
                        "SSE, one job event per frame",
                        media=sse,
                    ),
                    "parameters": [
                        _id("job_id"),
                        {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
                    ],
                }
            },
            "/v1/usage": {
                "get": {
                    **_op(
                        "The caller's usage",
                        "jobs and tokens per UTC day and model, and totals, of the caller's "
                        "tenant only",
                    ),
                    "parameters": [
                        {
                            "name": name,
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "format": "date"},
                            "description": text,
                        }
                        for name, text in (
                            ("start", "first UTC day (default: 29 days before end)"),
                            ("end", "last UTC day, included (default: today)"),
                        )
                    ],
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Redis reachable",
                    "security": [],
                    "responses": {"200": {"description": "ok"}},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": {"description": "ok"}},
                }
            },
        },
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["type", "error"],
                    "properties": {
                        "type": {"const": "error"},
                        "error": {
                            "type": "object",
                            "properties": {
                                "type": {"type": "string"},
                                "message": {"type": "string"},
                            },
                        },
                    },
                }
            },
        },
    }
