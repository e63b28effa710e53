"""httpcore's connection pool with its request assignment in linear time.

httpcore 1.0 (``ConnectionPool._assign_requests_to_connections``, run whenever a request
enters or leaves the pool) asks, for every idle connection, how many connections the pool
holds by building a list of ``is_idle()`` over all of them: ``len([c.is_idle() for c in
self._connections])``, which is ``len(self._connections)`` at N calls a time. With one
connection per concurrent job that is N^2 calls per request: at -c 100 with short jobs it was
a quarter of the worker's CPU (py-spy, ``bench.overhead``).

:class:`LinearPool` runs the same steps in the same order with the same outcome, without the
quadratic count (and it looks for idle connections only when it needs one). It is used only
with the httpcore versions its code was taken from; others keep their own.
"""

from __future__ import annotations

import httpcore

#: The httpcore releases whose ``_assign_requests_to_connections`` this module reproduces.
_SAME_CODE = ("1.0.",)


class LinearPool(httpcore.ConnectionPool):
    def _assign_requests_to_connections(self) -> list[httpcore.ConnectionInterface]:
        closing_connections: list[httpcore.ConnectionInterface] = []

        # Clean up connections that are closed, have expired their keep-alive, or are idle
        # beyond the keep-alive allowance (httpcore compares the count of all connections).
        for connection in list(self._connections):
            if connection.is_closed():
                self._connections.remove(connection)
            elif connection.has_expired() or (
                connection.is_idle() and len(self._connections) > self._max_keepalive_connections
            ):
                self._connections.remove(connection)
                closing_connections.append(connection)

        # Assign queued requests to connections: an existing one that can take the request,
        # else a new one, else a new one in place of an idle one.
        for pool_request in [r for r in self._requests if r.is_queued()]:
            origin = pool_request.request.url.origin
            available = next(
                (c for c in self._connections if c.can_handle_request(origin) and c.is_available()),
                None,
            )
            if available is not None:
                pool_request.assign_to_connection(available)
            elif len(self._connections) < self._max_connections:
                connection = self.create_connection(origin)
                self._connections.append(connection)
                pool_request.assign_to_connection(connection)
            else:
                idle = next((c for c in self._connections if c.is_idle()), None)
                if idle is not None:
                    self._connections.remove(idle)
                    closing_connections.append(idle)
                    connection = self.create_connection(origin)
                    self._connections.append(connection)
                    pool_request.assign_to_connection(connection)

        return closing_connections


def linear_assignment(pool: httpcore.ConnectionPool) -> None:
    """Make an ``httpcore.ConnectionPool`` (httpx's transport's ``_pool``) a
    :class:`LinearPool`, keeping its state, when httpcore is a version it reproduces."""
    if type(pool) is httpcore.ConnectionPool and httpcore.__version__.startswith(_SAME_CODE):
        pool.__class__ = LinearPool
