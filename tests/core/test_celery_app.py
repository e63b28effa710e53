"""The Celery app under gevent: what Celery's start binds before gevent patches it."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Celery's own start: patch for the pool named on the command line, then import the app.
START = """
import sys
sys.argv = ["celery", "-A", "worker.celery_app", "worker", "-P", "gevent"]
from celery import maybe_patch_concurrency
maybe_patch_concurrency()
import time
from kombu.utils import functional
import worker.celery_app
from celery import signals
{signal}
print(functional.sleep is time.sleep)
"""


@pytest.mark.parametrize(
    ("signal", "cooperative"),
    [
        ("signals.worker_init.send(sender=None)", "True"),
        ("", "False"),  # the check can fail: before the worker starts, kombu's is unpatched
    ],
)
def test_kombu_reconnect_sleeps_cooperatively_under_gevent(signal: str, cooperative: str) -> None:
    """After worker_init, kombu's retry loop sleeps with gevent's sleep: its broker reconnect
    no longer freezes every greenlet (lease renewals, running streams) between attempts."""
    done = subprocess.run(
        [sys.executable, "-c", START.format(signal=signal)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip().splitlines()[-1] == cooperative
