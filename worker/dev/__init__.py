"""Local stacks: an embedded Redis, ``llm-worker dev`` and ``llm-worker demo``."""
