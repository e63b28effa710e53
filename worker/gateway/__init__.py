"""``llm-worker gateway``: Anthropic's HTTP API in front of the queue (see :mod:`.app`)."""
