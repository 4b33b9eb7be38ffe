"""The web dashboard: static files the daemon serves beside its API.

The page (``api/web/``: HTML, our script, a style sheet) holds no data: it asks the
API for everything with the same bearer token any client needs, kept in the browser's
session storage. So the page and its scripts are the one part of a token-protected
server that answers without a token: they are the same for every daemon.

The chart library is plotly.js, as the ``plotly`` package from PyPI ships it: it comes
with balloonist's own installation, and nothing third-party is copied into this
repository.

Every response carries a Content-Security-Policy that lets the page load scripts and
connect only to this server, and refuses to be framed.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Final

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from balloonist.errors import ConfigError

#: Where the dashboard lives; ``/`` redirects there.
DASHBOARD_PATH: Final = "/dashboard"
#: The chart library, under the dashboard's path.
PLOTLY_PATH: Final = f"{DASHBOARD_PATH}/vendor/plotly.min.js"

WEB_DIR: Final = Path(__file__).with_name("web")

#: plotly.js injects its own <style> elements, so styles may be inline; scripts may not.
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)
SECURITY_HEADERS: Final = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)


def is_public(path: str) -> bool:
    """Whether a request path is part of the dashboard's static files (served without
    a token; see the module docstring). Everything else needs one."""
    return path in ("/", DASHBOARD_PATH) or path.startswith(DASHBOARD_PATH + "/")


def plotly_js() -> Path:
    """plotly.min.js from the installed ``plotly`` package."""
    try:
        path = Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))
    except ModuleNotFoundError:
        raise ConfigError("the dashboard needs the plotly package: pip install plotly") from None
    if not path.is_file():
        raise ConfigError(f"{path}: plotly.min.js is missing from the plotly package")
    return path


class _SecurityHeaders:
    """ASGI wrapper adding SECURITY_HEADERS to every response of ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self._app(scope, receive, send_with_headers)


def add_dashboard(app: FastAPI) -> None:
    """Serve the dashboard at DASHBOARD_PATH (and redirect ``/`` to it)."""
    plotly = plotly_js()  # fail at start-up, not at the first page load

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(f"{DASHBOARD_PATH}/", status_code=307)

    @app.get(PLOTLY_PATH, include_in_schema=False)
    async def plotly_file() -> FileResponse:
        headers = {name.decode(): value.decode() for name, value in SECURITY_HEADERS}
        return FileResponse(plotly, media_type="text/javascript", headers=headers)

    app.mount(
        DASHBOARD_PATH,
        _SecurityHeaders(StaticFiles(directory=WEB_DIR, html=True)),
        name="dashboard",
    )


__all__ = ["DASHBOARD_PATH", "PLOTLY_PATH", "add_dashboard", "is_public"]
