"""The REST API over a :class:`~balloonist.daemon.control.Controller`: an ASGI app.

Endpoints (JSON; sizes out as ``*_bytes`` integers, in as strings with a unit)::

    GET   /v1/status          the whole newest Status
    GET   /v1/host            host memory, free, swap, state, time, period
    GET   /v1/guests          every guest: spec, target, actual, working set, counters
    GET   /v1/guests/{name}   one guest (404 if unknown)
    PATCH /v1/guests/{name}   {"min": "512MiB", "max": "2GiB", "shares": 2000,
                               "min_cpus": 1, "max_cpus": 4, "cpu_shares": 2000}, any subset
    GET   /v1/history?since=V the last minutes of periods, as columns (for charts)
    GET   /v1/policy          policy name and tax rate
    PATCH /v1/policy          {"tax_rate": 0.5}
    GET   /v1/events          server-sent events: one ``status`` event per new period
    GET   /metrics            Prometheus text (see balloonist.api.metrics)
    GET   /openapi.json       this description

Every ``/v1`` endpoint but ``/v1/events`` answers 503 until the daemon has finished its
first period; the event stream simply starts with the first status. A change (PATCH)
is validated at once, answered 202 and applied at the start of the next period; a bad
one is a 422 whose ``detail`` names the field and the rule, and changes nothing.

The web dashboard is served at ``/dashboard/`` (``/`` redirects there); see
:mod:`balloonist.api.dashboard`.

With a ``token``, every request, ``/metrics`` and ``/openapi.json`` included, needs
``Authorization: Bearer <token>``, or it is answered 401; only the dashboard's static
files, which hold no data, are served without it. There are no HTML docs pages
(``/docs``): they would load scripts from a CDN, which a host daemon has no business
serving.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
from collections.abc import AsyncIterator, Sequence
from functools import cached_property
from typing import Annotated, Any, Final

from fastapi import FastAPI, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from prometheus_client.exposition import choose_encoder
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from balloonist.api.dashboard import add_dashboard, is_public
from balloonist.api.metrics import make_registry
from balloonist.api.models import (
    ErrorOut,
    FieldError,
    GuestChangeOut,
    GuestListOut,
    GuestOut,
    GuestPatch,
    HistoryOut,
    HistoryQuery,
    HostOut,
    PolicyChangeOut,
    PolicyOut,
    PolicyPatch,
    StatusOut,
)
from balloonist.config import format_loc
from balloonist.daemon.control import Controller, GuestChange
from balloonist.daemon.status import Status
from balloonist.errors import ConfigError

#: How often an event stream looks for a new status: well under any sensible period
#: (the daemon's default is 1 s), and cheap (a reference read).
EVENT_POLL_S: Final = 0.1
#: A comment line this often keeps proxies and clients from timing out an idle stream.
EVENT_KEEPALIVE_S: Final = 15.0
#: Tokens shorter than this are too easy to guess.
MIN_TOKEN_CHARS: Final = 16

NO_STATUS_DETAIL: Final = "no status yet: the daemon has not finished its first period"
AUTH_DETAIL: Final = "missing or wrong bearer token"

JSON: Final = "application/json"

#: The fields of a guest change, as the request names them.
PATCH_FIELDS: Final = ("min", "max", "shares", "min_cpus", "max_cpus", "cpu_shares")

GuestName = Annotated[str, Path(description="The VM's name.", examples=["web"])]


def check_token(token: str) -> str:
    """A bearer token must be printable ASCII without spaces (it travels in a header),
    and long enough not to be guessed. Raises ConfigError; never quotes the token."""
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the API token is shorter than {MIN_TOKEN_CHARS} characters")
    if not all(33 <= ord(c) <= 126 for c in token):
        raise ConfigError("the API token must be printable ASCII without spaces")
    return token


class ApiError(Exception):
    """An error answer: status code, one-line detail, and for 422 the field errors."""

    def __init__(
        self,
        status_code: int,
        detail: str,
        *,
        errors: Sequence[FieldError] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.body = ErrorOut(detail=detail, errors=list(errors))
        self.headers = headers


def _error_response(
    status_code: int, body: ErrorOut, headers: dict[str, str] | None = None
) -> Response:
    return Response(body.model_dump_json(), status_code, headers=headers, media_type=JSON)


class BearerAuth:
    """ASGI middleware: every HTTP request but the dashboard's static files needs
    ``Authorization: Bearer <token>``.

    Constant-time comparison (``hmac.compare_digest``); the token is never logged, and
    neither is the header (nothing here logs at all)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self._app = app
        self._token = check_token(token).encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and not is_public(scope["path"])
            and not self._allowed(Headers(scope=scope))
        ):
            response = _error_response(
                401, ErrorOut(detail=AUTH_DETAIL), headers={"WWW-Authenticate": "Bearer"}
            )
            await response(scope, receive, send)
            return
        await self._app(scope, receive, send)

    def _allowed(self, headers: Headers) -> bool:
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        # Compare even when the scheme is wrong, so timing says nothing about which part
        # was wrong; compare_digest needs bytes for non-ASCII input.
        given = credentials.strip().encode("utf-8", "replace")
        same = hmac.compare_digest(given, self._token)
        return same and scheme.lower() == "bearer"


class _View:
    """One Status with its API forms, computed once per version however many clients
    ask (the status is a frozen snapshot, so the cache cannot go stale)."""

    def __init__(self, status: Status) -> None:
        self.status = status
        self.model = StatusOut.of(status)

    @cached_property
    def status_json(self) -> bytes:
        return self.model.model_dump_json().encode()

    @cached_property
    def guests_json(self) -> bytes:
        listing = GuestListOut(
            version=self.model.version, time_s=self.model.time_s, guests=self.model.guests
        )
        return listing.model_dump_json().encode()

    @cached_property
    def event(self) -> bytes:
        # model_dump_json writes one line, which is what an SSE data field must be.
        return b"event: status\nid: %d\ndata: %s\n\n" % (self.model.version, self.status_json)

    def guest(self, name: str) -> GuestOut | None:
        return next((g for g in self.model.guests if g.name == name), None)


class _Views:
    def __init__(self, controller: Controller) -> None:
        self._controller = controller
        self._last: _View | None = None

    def current(self) -> _View | None:
        status = self._controller.status()
        if status is None:
            return None
        last = self._last
        if last is not None and last.status is status:
            return last
        # Races between requests only compute the same view twice: harmless.
        view = _View(status)
        self._last = view
        return view

    def require(self) -> _View:
        view = self.current()
        if view is None:
            raise ApiError(503, NO_STATUS_DETAIL, headers={"Retry-After": "1"})
        return view


def _json(model: BaseModel | bytes, status_code: int = 200) -> Response:
    body = model if isinstance(model, bytes) else model.model_dump_json().encode()
    return Response(body, status_code, media_type=JSON)


def _field_errors(exc: RequestValidationError) -> list[FieldError]:
    out = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        # ("body", "min") -> "min"; ("path", "name") -> "name"; ("body",) -> "body".
        if len(loc) > 1 and loc[0] in {"body", "path", "query", "header"}:
            loc = loc[1:]
        kind = str(err.get("type", "value_error"))
        if kind == "extra_forbidden":
            message = "unknown field"
        elif kind == "missing":
            message = "required field is missing"
        else:
            message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        out.append(FieldError(field=format_loc(loc) or "body", message=message, type=kind))
    return out


#: A ``GuestChange`` field (as a ConfigError's ``field`` names it) -> the API's name.
_API_FIELD: Final = {"min_bytes": "min", "max_bytes": "max"}


def _config_field(exc: ConfigError, candidates: Sequence[str]) -> str:
    """The request field a ConfigError from the controller is about: the one it names,
    if the request set it, else the only field the request set."""
    if exc.field is not None and (named := _API_FIELD.get(exc.field, exc.field)) in candidates:
        return named
    return candidates[0] if len(candidates) == 1 else "body"


def _config_error(exc: ConfigError, candidates: Sequence[str]) -> ApiError:
    field = _config_field(exc, candidates)
    return ApiError(
        422, str(exc), errors=[FieldError(field=field, message=exc.message, type="config")]
    )


def create_app(
    controller: Controller,
    *,
    token: str | None,
    shutdown: threading.Event | None = None,
) -> FastAPI:
    """The API over ``controller``.

    ``token``: when set, every request needs it as a bearer token (see the module
    docstring); None serves without authentication (for the owner-only unix socket).
    ``shutdown``: set it to end the open event streams (the server does, when stopping).
    """
    if token is not None:
        check_token(token)  # here, not when the middleware is first built, at a request
    errors: dict[int | str, dict[str, Any]] = {
        503: {"model": ErrorOut, "description": NO_STATUS_DETAIL},
    }
    if token is not None:
        errors[401] = {"model": ErrorOut, "description": AUTH_DETAIL}
    # The scheme is declared for the OpenAPI description only (auto_error=False);
    # BearerAuth enforces it on every path, /openapi.json included.
    security = [Security(HTTPBearer(auto_error=False))] if token is not None else []

    app = FastAPI(
        title="balloonist",
        summary="Memory ballooning for QEMU/KVM guests: the host daemon's API.",
        version="1",
        docs_url=None,
        redoc_url=None,
        dependencies=security,
        responses=errors,
    )
    if token is not None:
        app.add_middleware(BearerAuth, token=token)
    views = _Views(controller)
    # The order routes are added in is the OpenAPI description's order.
    _add_error_handlers(app)
    _add_reads(app, views)
    _add_guest_change(app, controller, views)
    _add_history_and_policy(app, controller, views)
    _add_streams(app, views, shutdown if shutdown is not None else threading.Event(), controller)
    add_dashboard(app)
    return app


_INVALID: Final[dict[int | str, dict[str, Any]]] = {
    400: {"model": ErrorOut, "description": "The body could not be read as JSON text."},
    422: {"model": ErrorOut, "description": "A field broke a rule; nothing changed."},
}
_UNKNOWN: Final[dict[int | str, dict[str, Any]]] = {
    404: {"model": ErrorOut, "description": "No such guest."}
}


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as an ErrorOut body: ours, FastAPI's validation, Starlette's HTTP."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return _error_response(exc.status_code, exc.body, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        fields = _field_errors(exc)
        detail = "; ".join(f"{e.field}: {e.message}" for e in fields)
        return _error_response(422, ErrorOut(detail=detail, errors=fields))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers) if exc.headers else {}
        if exc.status_code == 405:
            # Starlette's Allow names only the first route that matched the path; a
            # path with GET and PATCH routes must list both.
            headers["Allow"] = ", ".join(_allowed_methods(app, request.scope))
        return _error_response(exc.status_code, ErrorOut(detail=str(exc.detail)), headers)


def _add_reads(app: FastAPI, views: _Views) -> None:
    """The status, the host and the guests, as the newest period left them."""

    @app.get("/v1/status", response_model=StatusOut, tags=["status"])
    async def get_status() -> Response:
        """The whole newest status: host, guests, policy, daemon counters."""
        return _json(views.require().status_json)

    @app.get("/v1/host", response_model=HostOut, tags=["status"])
    async def get_host() -> Response:
        """Host memory as the policy sees it, its state, and the period's time."""
        return _json(views.require().model.host_view())

    @app.get("/v1/guests", response_model=GuestListOut, tags=["guests"])
    async def list_guests() -> Response:
        """Every guest: spec, target, actual, working-set estimate, counters."""
        return _json(views.require().guests_json)

    @app.get("/v1/guests/{name}", response_model=GuestOut, tags=["guests"], responses=_UNKNOWN)
    async def get_guest(name: GuestName) -> Response:
        """One guest."""
        guest = views.require().guest(name)
        if guest is None:
            raise ApiError(404, f"no guest named {name!r}")
        return _json(guest)


def _add_guest_change(app: FastAPI, controller: Controller, views: _Views) -> None:
    """PATCH a guest: checked now, applied at the next period."""

    @app.patch(
        "/v1/guests/{name}",
        response_model=GuestChangeOut,
        status_code=202,
        tags=["guests"],
        responses={**_UNKNOWN, **_INVALID},
    )
    def patch_guest(name: GuestName, patch: GuestPatch) -> Response:
        """Change a guest's min, max or shares, or for a guest whose processors are
        shared its min_cpus, max_cpus or cpu_shares; fields left out stay as they are.

        Sizes are strings with a unit ("512MiB"). Accepted changes (202) take effect
        at the start of the next period; a rejected one (422) changes nothing."""
        if views.require().status.guest(name) is None:
            raise ApiError(404, f"no guest named {name!r}")
        change = GuestChange(
            min_bytes=patch.min_bytes,
            max_bytes=patch.max_bytes,
            shares=patch.shares,
            min_cpus=patch.min_cpus,
            max_cpus=patch.max_cpus,
            cpu_shares=patch.cpu_shares,
        )
        try:
            controller.change_guest(name, change)
        except ConfigError as exc:
            latest = controller.status()
            if latest is not None and latest.guest(name) is None:
                raise ApiError(404, f"no guest named {name!r}") from None
            fields = [k for k in PATCH_FIELDS if getattr(patch, k) is not None]
            raise _config_error(exc, fields or ["body"]) from None
        accepted = GuestChangeOut(
            name=name,
            min_bytes=change.min_bytes,
            max_bytes=change.max_bytes,
            shares=change.shares,
            min_cpus=change.min_cpus,
            max_cpus=change.max_cpus,
            cpu_shares=change.cpu_shares,
        )
        return _json(accepted, 202)


def _add_history_and_policy(app: FastAPI, controller: Controller, views: _Views) -> None:
    """The last minutes for charts; the policy, and changing it."""

    @app.get(
        "/v1/history",
        response_model=HistoryOut,
        tags=["status"],
        responses={422: {"model": ErrorOut, "description": "since is not a whole number >= 0."}},
    )
    def get_history(query: Annotated[HistoryQuery, Query()]) -> Response:
        """The last minutes of periods (up to ten minutes at a 1 s period), one column
        per figure: host memory and state, and every guest's allocation, target, balloon
        and working set. What the dashboard charts."""
        views.require()
        return _json(HistoryOut.of(controller.history(query.since)))

    @app.get("/v1/policy", response_model=PolicyOut, tags=["policy"])
    async def get_policy() -> Response:
        """The policy's name and parameters."""
        return _json(views.require().model.policy)

    @app.patch(
        "/v1/policy",
        response_model=PolicyChangeOut,
        status_code=202,
        tags=["policy"],
        responses=_INVALID,
    )
    def patch_policy(patch: PolicyPatch) -> Response:
        """Change the policy's parameters; applied at the start of the next period."""
        views.require()
        try:
            controller.change_policy(tax_rate=patch.tax_rate)
        except ConfigError as exc:
            raise _config_error(exc, ["tax_rate"]) from None
        return _json(PolicyChangeOut(tax_rate=patch.tax_rate), 202)


def _add_streams(
    app: FastAPI, views: _Views, stopping: threading.Event, controller: Controller
) -> None:
    """Server-sent status events and the Prometheus metrics."""
    registry = make_registry(controller.status)

    @app.get(
        "/v1/events",
        tags=["status"],
        response_class=StreamingResponse,
        responses={
            200: {
                "description": (
                    "Server-sent events: a `status` event (data: the Status as JSON, id: "
                    "its version) now and after every period; a comment line every "
                    f"{EVENT_KEEPALIVE_S:.0f} s keeps the stream alive."
                ),
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            }
        },
    )
    async def events() -> StreamingResponse:
        """A stream of status events, the current one first."""
        return StreamingResponse(
            _event_stream(views, stopping),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get(
        "/metrics",
        tags=["metrics"],
        response_class=Response,
        responses={
            200: {
                "description": (
                    "Prometheus text format, or OpenMetrics when the Accept header asks."
                ),
                "content": {
                    "text/plain": {"schema": {"type": "string"}},
                    "application/openmetrics-text": {"schema": {"type": "string"}},
                },
            }
        },
    )
    def metrics(request: Request) -> Response:
        """Prometheus metrics, read from the newest status at scrape time."""
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(registry), media_type=content_type)


def _allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    methods: set[str] = set()
    for route in app.routes:
        if isinstance(route, APIRoute) and route.matches(scope)[0] is not Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)


async def _event_stream(views: _Views, stopping: threading.Event) -> AsyncIterator[bytes]:
    # Starlette cancels this generator when the client goes away; ``stopping`` ends it
    # when the server stops, so shutdown never waits on an open stream.
    yield b"retry: 1000\n\n"
    sent_version: int | None = None
    last_sent = time.monotonic()
    while not stopping.is_set():
        view = views.current()
        now = time.monotonic()
        if view is not None and view.status.version != sent_version:
            sent_version = view.status.version
            last_sent = now
            yield view.event
        elif now - last_sent >= EVENT_KEEPALIVE_S:
            last_sent = now
            yield b": keep-alive\n\n"
        await asyncio.sleep(EVENT_POLL_S)
