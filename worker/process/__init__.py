"""The ``llm-worker run`` process: its entry, the supervisor of several processes, the
metrics and health server, and the proofs of consumption behind ``/healthz``."""
