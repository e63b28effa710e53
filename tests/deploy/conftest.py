"""Fixtures shared by the deploy tests: the promtool binary, the series worker/metrics.py
exports, and a reader of the metric names a PromQL expression selects."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable

import pytest

# The series names each metric type puts on /metrics, by the suffix added to the family name.
# A histogram's bare family name is no series at all, so it is deliberately absent.
_SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
}
# Prometheus' own per-target series, allowed beside the worker's.
_PROMETHEUS_SERIES = {"up": ("job", "instance")}

_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`""")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_MATCHERS = re.compile(r"\{[^}]*\}")
_BRACKETS = re.compile(r"\[[^\]]*\]")
# An identifier not glued to a number, a variable or a longer name, and not called as a function.
_NAME = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()")
_KEYWORDS = frozenset({"and", "or", "unless", "offset", "bool", "inf", "nan", "start", "end"})


def metric_names_in(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords and label names excluded)."""
    stripped = _STRING.sub('""', expr)
    stripped = _GROUPING.sub(" ", stripped)
    stripped = _MATCHERS.sub(" ", stripped)
    stripped = _BRACKETS.sub(" ", stripped)
    return {name for name in _NAME.findall(stripped) if name.lower() not in _KEYWORDS}


@pytest.fixture(scope="session")
def exported_series() -> dict[str, tuple[str, ...]]:
    """Every series name worker/metrics.py exports (with type suffixes), mapped to its labels."""
    from prometheus_client.metrics import MetricWrapperBase

    import worker.metrics

    series: dict[str, tuple[str, ...]] = dict(_PROMETHEUS_SERIES)
    for obj in vars(worker.metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        labels = tuple(obj._labelnames)  # no public accessor; stable across prometheus_client
        for family in obj.describe():
            for suffix in _SERIES_SUFFIXES[family.type]:
                series[family.name + suffix] = labels
    return series


@pytest.fixture(scope="session")
def promql_metric_names() -> Callable[[str], set[str]]:
    """The PromQL metric-name reader, as a fixture so test modules need no import path."""
    return metric_names_in


@pytest.fixture(scope="session")
def promtool() -> str:
    """The promtool binary; skips (visibly) where it is not installed."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "promtool not found on PATH: install it with `apt-get install prometheus` "
            "(Debian/Ubuntu) or unpack a release from https://prometheus.io/download/"
        )
    return path
