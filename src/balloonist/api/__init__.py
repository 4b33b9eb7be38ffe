"""The daemon's REST API and Prometheus metrics, served over a
:class:`~balloonist.daemon.control.Controller`.

- :func:`create_app` (``api.app``): the ASGI app; endpoints in that module's docstring.
- :func:`serve` / :class:`ApiServer` (``api.server``): uvicorn in a background thread on
  an owner-only unix socket, and opt-in TCP with a bearer token.
- :func:`read_token`: the token from ``--api-token-file`` (mode 0600 or stricter);
  :func:`read_or_create_token` makes the file first when it is not there.
- ``api.dashboard``: the web dashboard's files, at ``/dashboard/``.
- ``api.metrics``: the metric names, read from the status at scrape time.
- ``api.models``: the request and response bodies (the OpenAPI schemas).
"""

from __future__ import annotations

from balloonist.api.app import create_app
from balloonist.api.server import (
    ApiServer,
    parse_tcp_address,
    read_or_create_token,
    read_token,
    serve,
)

__all__ = [
    "ApiServer",
    "create_app",
    "parse_tcp_address",
    "read_or_create_token",
    "read_token",
    "serve",
]
