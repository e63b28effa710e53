"""worker.logs: secret redaction, content omission, and the one JSON/console pipeline."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from worker.logs import Redactor, configure_logging
from worker.settings import load_settings

CANARY = "sk-canary-XYZ"


def _redact(secrets: list[str] | None = None, *, log_content: bool = False, **event: Any) -> Any:
    return Redactor(secrets if secrets is not None else [CANARY], log_content=log_content)(
        None, "info", dict(event)
    )


# --- Redactor ----------------------------------------------------------------------------


def test_key_in_the_event_text_is_replaced() -> None:
    """The API key inside the event message is replaced by a marker."""
    out = _redact(event=f"calling upstream with {CANARY} now")
    assert CANARY not in out["event"]
    assert out["event"].startswith("calling upstream with ")
    assert "[redacted]" in out["event"]


def test_key_in_nested_dicts_and_lists_is_replaced() -> None:
    """The key is found at any depth of dicts, lists and tuples."""
    out = _redact(
        event="e",
        request={"headers": [{"x": f"a{CANARY}b"}], "retry": ("ok", CANARY)},
    )
    assert CANARY not in repr(out)
    assert out["request"]["headers"][0]["x"] == "a[redacted]b"
    assert out["request"]["retry"][0] == "ok"


@pytest.mark.parametrize("key", ["authorization", "Authorization", "api_key", "x-api-key", "token"])
def test_secret_named_fields_are_replaced_whole(key: str) -> None:
    """A field named like a secret is replaced, whatever it holds, at top level or nested."""
    top = _redact(secrets=[], event="e", **{key: "anything-at-all"})
    assert top[key] == "[redacted]"
    nested = _redact(secrets=[], event="e", headers={key: "anything-at-all"})
    assert nested["headers"][key] == "[redacted]"


@pytest.mark.parametrize("text", ["Bearer xyz.abc-123", "bearer xyz", "auth: BEARER  abc/def="])
def test_bearer_tokens_are_replaced_even_when_not_the_configured_key(text: str) -> None:
    """Any 'Bearer <token>' string loses its token, keeping the scheme word."""
    out = _redact(secrets=[], event="e", header=text)
    assert "[redacted]" in out["header"]
    assert "xyz" not in out["header"]
    assert "abc" not in out["header"]


def test_bearer_with_the_configured_key_is_replaced() -> None:
    """'Bearer <api key>' loses the key."""
    out = _redact(event="e", header=f"Bearer {CANARY}")
    assert CANARY not in out["header"]
    assert out["header"].lower().startswith("bearer ")


@pytest.mark.parametrize("key", ["messages", "system", "prompt", "text", "content", "completion"])
def test_content_fields_are_omitted_by_default(key: str) -> None:
    """Prompt and completion text is not logged unless log_content is on."""
    out = _redact(event="e", **{key: "my private prompt"})
    assert "my private prompt" not in repr(out)
    assert key in out


def test_nested_content_is_omitted_by_default() -> None:
    """Prompt and completion text inside dicts and lists is omitted at any depth."""
    out = _redact(
        event="e",
        request={
            "model": "m",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "my private prompt"}],
        },
        events=[
            {"delta": {"type": "text_delta", "text": "private answer"}},
            {"delta": {"type": "input_json_delta", "partial_json": '{"q": "private tool arg"'}},
            {"content_block": {"type": "tool_use", "input": {"q": "private tool arg"}}},
        ],
    )
    text = repr(out)
    for private in ("my private prompt", "private answer", "private tool arg"):
        assert private not in text
    assert out["request"]["model"] == "m"
    assert out["request"]["max_tokens"] == 5
    assert out["request"]["messages"] == "[content omitted]"
    assert out["events"][0]["delta"]["type"] == "text_delta"


def test_nested_content_is_kept_with_log_content_but_the_key_is_not() -> None:
    """With log_content on, nested text is kept and the API key inside it still goes."""
    out = _redact(
        log_content=True,
        event="e",
        request={"messages": [{"role": "user", "content": f"use {CANARY} please"}]},
    )
    assert out["request"]["messages"][0]["content"] == "use [redacted] please"


def test_key_in_bytes_and_dict_keys_is_replaced() -> None:
    """The API key is removed from bytes values and from dict keys too."""
    out = _redact(event="e", raw=f"x{CANARY}".encode(), headers={f"k-{CANARY}": "v"})
    assert CANARY not in repr(out)


def test_content_fields_are_kept_with_log_content() -> None:
    """With log_content=True, content fields are logged (still redacted of secrets)."""
    out = _redact(log_content=True, event="e", text=f"hello {CANARY}", messages=[{"a": "b"}])
    assert out["text"] == "hello [redacted]"
    assert out["messages"] == [{"a": "b"}]


def test_other_values_pass_through() -> None:
    """Numbers, None and ordinary strings are left as they are."""
    out = _redact(event="upstream_retry_scheduled", attempt=2, delay_s=1.5, job_id="j1", x=None)
    assert out == {
        "event": "upstream_retry_scheduled",
        "attempt": 2,
        "delay_s": 1.5,
        "job_id": "j1",
        "x": None,
    }


def test_empty_secret_is_ignored() -> None:
    """An empty secret (no key configured) does not mangle every string."""
    out = _redact(secrets=[""], event="nothing to hide")
    assert out["event"] == "nothing to hide"


# --- configure_logging ----------------------------------------------------------------------


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Put the root logger and structlog back as they were after the test; no stray .env."""
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, noisy_level in noisy.items():
            logging.getLogger(name).setLevel(noisy_level)
        structlog.reset_defaults()


def _json_lines(err: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


@pytest.mark.usefixtures("restore_logging")
def test_stdlib_log_is_one_redacted_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A Celery (stdlib) log line is rendered as one JSON object without the key."""
    configure_logging(load_settings(api_key=CANARY, log_format="json"))
    logging.getLogger("celery").warning("key %s", CANARY)
    err = capsys.readouterr().err
    assert CANARY not in err
    lines = _json_lines(err)
    assert len(lines) == 1
    assert lines[0]["event"] == "key [redacted]"
    assert lines[0]["level"] == "warning"
    assert lines[0]["logger"] == "celery"
    assert "timestamp" in lines[0]


@pytest.mark.usefixtures("restore_logging")
def test_structlog_log_is_one_redacted_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A structlog event with a bearer header is one JSON object without the key."""
    configure_logging(load_settings(api_key=CANARY, log_format="json"))
    structlog.get_logger().info("evt", header=f"Bearer {CANARY}", attempt=2)
    err = capsys.readouterr().err
    assert CANARY not in err
    lines = _json_lines(err)
    assert len(lines) == 1
    assert lines[0]["event"] == "evt"
    assert lines[0]["attempt"] == 2
    assert lines[0]["level"] == "info"


@pytest.mark.usefixtures("restore_logging")
def test_the_gateways_producer_keys_are_redacted_too(capsys: pytest.CaptureFixture[str]) -> None:
    """A named and a bare gateway key, wherever they appear in a line, are replaced; the
    tenant's name is not a secret and stays."""
    named, bare = "gw-named-secret-1", "gw-bare-secret-2"
    configure_logging(load_settings(gateway_api_keys=f"team-a:{named},{bare}", log_format="json"))
    structlog.get_logger().info(f"saw {named}", detail=[bare], tenant="team-a")
    err = capsys.readouterr().err
    assert named not in err
    assert bare not in err
    assert _json_lines(err)[0]["tenant"] == "team-a"


@pytest.mark.usefixtures("restore_logging")
def test_contextvars_are_merged_into_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """Values bound with structlog.contextvars appear in every line."""
    configure_logging(load_settings(log_format="json"))
    with structlog.contextvars.bound_contextvars(job_id="job-1", attempt=3):
        structlog.get_logger().info("upstream_call")
    [line] = _json_lines(capsys.readouterr().err)
    assert line["job_id"] == "job-1"
    assert line["attempt"] == 3


@pytest.mark.usefixtures("restore_logging")
def test_content_is_omitted_from_rendered_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """With log_content off (the default), a prompt passed as a field is not written."""
    configure_logging(load_settings(log_format="json"))
    structlog.get_logger().info("evt", messages=[{"role": "user", "content": "my secret plan"}])
    assert "my secret plan" not in capsys.readouterr().err


@pytest.mark.usefixtures("restore_logging")
def test_console_format_renders_redacted_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """The console renderer works for both kinds of log and also redacts the key."""
    configure_logging(load_settings(api_key=CANARY, log_format="console"))
    logging.getLogger("celery").warning("key %s", CANARY)
    structlog.get_logger().info("evt", header=f"Bearer {CANARY}")
    err = capsys.readouterr().err
    assert CANARY not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 2
    assert "key [redacted]" in lines[0]
    assert "evt" in lines[1]
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[1])


@pytest.mark.usefixtures("restore_logging")
def test_log_level_filters_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """Below LOG_LEVEL nothing is written; httpx is quieted to WARNING."""
    configure_logging(load_settings(log_level="WARNING", log_format="json"))
    logging.getLogger("celery").info("hidden")
    structlog.get_logger().info("hidden_too")
    logging.getLogger("celery").error("shown")
    lines = _json_lines(capsys.readouterr().err)
    assert [line["event"] for line in lines] == ["shown"]
    assert logging.getLogger("httpx").level >= logging.WARNING


@pytest.mark.usefixtures("restore_logging")
def test_configure_twice_keeps_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    """Configuring again replaces the handler rather than doubling every line."""
    configure_logging(load_settings(log_format="json"))
    configure_logging(load_settings(log_format="json"))
    logging.getLogger("celery").warning("once")
    assert len(_json_lines(capsys.readouterr().err)) == 1
