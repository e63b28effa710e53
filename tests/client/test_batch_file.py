"""Batch files, the pure parts: parsing with line numbers, ids, result shapes, recovery."""

from __future__ import annotations

import orjson
import pytest

from worker.client import batch_file as b
from worker.errors import RequestInvalid
from worker.settings import load_settings

SETTINGS = load_settings(allowed_models=())
PARAMS = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


def _line(custom_id: object, params: object = PARAMS, **extra: object) -> bytes:
    return orjson.dumps({"custom_id": custom_id, "params": params, **extra})


def test_a_good_file_parses_with_line_numbers_and_blank_lines_skipped() -> None:
    """Every line becomes one item carrying its 1-based line number."""
    content = b"\n".join([_line("a"), b"", _line("b-2_x"), b""])
    items = b.parse_batch_file(SETTINGS, content)
    assert [(i.line, i.custom_id) for i in items] == [(1, "a"), (3, "b-2_x")]
    assert items[0].params == PARAMS


def test_every_bad_line_is_named() -> None:
    """Bad JSON, bad custom_id, bad params, unknown fields and repeats are all reported."""
    content = b"\n".join(
        [
            _line("ok"),
            b"{not json",
            _line("has space"),
            _line("p", {**PARAMS, "max_tokens": 0}),
            _line("extra", surprise=1),
            _line("ok"),
            b"[1, 2]",
            orjson.dumps({"custom_id": "noparams"}),
        ]
    )
    with pytest.raises(RequestInvalid) as info:
        b.parse_batch_file(SETTINGS, content)
    assert b.bad_lines(info.value) == [2, 3, 4, 5, 6, 7, 8]
    locs = [e["loc"] for e in info.value.errors]
    assert "line 4: params.max_tokens" in locs
    assert "line 3: custom_id" in locs
    assert any("repeats line 1" in e["msg"] for e in info.value.errors)


def test_an_empty_file_is_refused() -> None:
    """A file with no requests is an error, not an empty batch."""
    with pytest.raises(RequestInvalid):
        b.parse_batch_file(SETTINGS, b"\n\n")


def test_ids_are_fixed_by_the_file_bytes_and_custom_id() -> None:
    """The same bytes give the same batch id; another file another; job ids are valid ids."""
    from worker.client.core import valid_job_id

    assert b.file_batch_id(b"x") == b.file_batch_id(b"x") != b.file_batch_id(b"y")
    job_id = b.job_id_for("B" * 40, "c" * 64)
    assert valid_job_id(job_id)


@pytest.mark.parametrize(
    ("state", "message", "error", "expected"),
    [
        ("queued", None, None, None),
        ("running", None, None, None),
        ("completed", {"id": "m"}, None, {"type": "succeeded", "message": {"id": "m"}}),
        ("completed", None, None, {"type": "expired"}),
        ("cancelled", None, {"type": "cancelled"}, {"type": "canceled"}),
        ("expired", None, None, {"type": "expired"}),
        (
            "failed",
            None,
            {"type": "invalid_request_error", "message": "bad", "status_code": 400},
            {
                "type": "errored",
                "error": {
                    "type": "error",
                    "error": {"type": "invalid_request_error", "message": "bad"},
                },
            },
        ),
        (
            "failed",
            None,
            {"type": "invalid_payload", "message": "junk", "status_code": None},
            {
                "type": "errored",
                "error": {
                    "type": "error",
                    "error": {"type": "api_error", "message": "invalid_payload: junk"},
                },
            },
        ),
    ],
)
def test_job_ends_map_to_anthropic_result_shapes(
    state: str, message: object, error: object, expected: object
) -> None:
    """Each terminal state gives Anthropic's result object; open jobs give none."""
    assert b.batch_result(state, message, error) == expected  # type: ignore[arg-type]


def test_recovery_keeps_complete_lines_and_drops_a_torn_tail() -> None:
    """A killed run's file: complete lines count, the cut last line is collected again."""
    good = b.result_line("a", {"type": "canceled"})
    dup = b.result_line("a", {"type": "expired"})
    content = good + dup + b"garbage\n" + b'{"custom_id": "b", "res'
    recovered = b.recover_results(content, ["a", "b"])
    assert recovered.done == {"a": good}
    assert recovered.dropped == 3
    assert recovered.foreign == []


def test_recovery_names_results_of_another_batch() -> None:
    """custom_ids the batch does not have are reported, never silently mixed in."""
    content = b.result_line("zzz", {"type": "canceled"})
    assert b.recover_results(content, ["a"]).foreign == ["zzz"]


def test_batch_files_are_validated_strictly_with_the_catalogue() -> None:
    """A batch line's params get the same strict checks as a submission: a string for a
    number, a boolean for max_tokens, a max_tokens over the model's maximum (named with both
    numbers), a custom_id with a trailing newline."""
    settings = load_settings(models={"m": {"max_tokens": 100}})
    content = b"\n".join(
        [
            _line("a", {**PARAMS, "max_tokens": "5"}),
            _line("b", {**PARAMS, "max_tokens": True}),
            _line("c", {**PARAMS, "max_tokens": 101}),
            _line("d\n"),
            _line("e", {**PARAMS, "stream": "yes"}),
        ]
    )
    with pytest.raises(RequestInvalid) as info:
        b.parse_batch_file(settings, content)
    by_loc = {e["loc"]: e["msg"] for e in info.value.errors}
    assert set(by_loc) == {
        "line 1: params.max_tokens",
        "line 2: params.max_tokens",
        "line 3: params.max_tokens",
        "line 4: custom_id",
        "line 5: params.stream",
    }
    assert "101" in by_loc["line 3: params.max_tokens"]
    assert "100" in by_loc["line 3: params.max_tokens"]


def test_an_upstream_refusing_our_key_is_an_api_error_in_results() -> None:
    """A job failed by the upstream's 401/403 is `errored` with api_error naming the upstream,
    not authentication_error (the batch's submitter did nothing wrong)."""
    error = {"type": "authentication_error", "message": "invalid key", "status_code": 401}
    result = b.batch_result("failed", None, error, upstream="api.example.test")
    assert result is not None
    inner = result["error"]["error"]
    assert inner["type"] == "api_error"
    assert "upstream api.example.test" in inner["message"]
