"""A fake Anthropic-compatible upstream: test double, dev upstream and benchmark target.

See :mod:`worker.simulator.app` for the HTTP surface, :mod:`worker.simulator.textgen` for
the deterministic answers and the ``[[sim ...]]`` directives,
:mod:`worker.simulator.stats` for ``GET /stats``, :mod:`worker.simulator.faults` for the
fault mix and :mod:`worker.simulator.limits` for the simulator's own rate limits.
"""

from __future__ import annotations

from worker.simulator.app import create_app
from worker.simulator.config import FaultMix, RateLimits, SimulatorConfig
from worker.simulator.server import ServerThread, running_simulator, serve

__all__ = [
    "FaultMix",
    "RateLimits",
    "ServerThread",
    "SimulatorConfig",
    "create_app",
    "running_simulator",
    "serve",
]
