"""How the project reaches Redis: :mod:`worker.connections.urls` parses and checks Redis URLs
(one server, or kombu's Sentinel form), free of I/O, so that settings can use it without
importing redis; :mod:`worker.connections.clients` builds every Redis client from settings."""
