"""A small client of the daemon's REST API (``balloonist status``, ``set``, ``watch``).

Over the daemon's unix socket (no token: the socket's mode is the access control), or
over TCP with a bearer token::

    with ApiClient.unix(path) as api:          # or ApiClient.tcp(url, token=...)
        status = api.status()                  # StatusOut
        api.change_guest("web", max="2GiB")    # GuestChangeOut; applies next period
        for status in api.events(): ...        # one StatusOut per period (SSE)

Every failure is a :class:`ApiClientError` with a one-line message:

- :class:`DaemonUnavailableError` (not ConfigError: exit code 1): nobody answers on the
  socket or URL, the daemon has not finished its first period (503), it timed out,
  or its event stream ended.
- :class:`ApiRejectedError` (a ConfigError: exit code 2, bad input): the daemon refused the
  request: 422 (its one-line ``detail`` is the message), 404 (unknown guest),
  401 (missing or wrong token).
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import httpx
from pydantic import ValidationError

from balloonist.api.models import GuestChangeOut, StatusOut
from balloonist.errors import BalloonistError, ConfigError

#: Seconds to wait for an answer to one request.
REQUEST_TIMEOUT_S: Final = 10.0
#: Seconds an event stream may stay silent: twice the server's keep-alive interval
#: (``api.app.EVENT_KEEPALIVE_S``), so a live daemon never trips it.
EVENT_READ_TIMEOUT_S: Final = 30.0
#: The host name in requests over the unix socket (any name would do).
_UDS_BASE_URL: Final = "http://api"

_M = TypeVar("_M", StatusOut, GuestChangeOut)


class ApiClientError(BalloonistError):
    """Base of the client's errors."""


class DaemonUnavailableError(ApiClientError):
    """No daemon answers, it is not ready yet, or it went away."""


class ApiRejectedError(ConfigError, ApiClientError):
    """The daemon refused the request (bad value, unknown guest, wrong token)."""

    def __init__(self, message: str, *, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class ApiClient:
    """A synchronous client over one httpx connection pool; close it (or use ``with``)."""

    def __init__(self, client: httpx.Client, where: str) -> None:
        self._client = client
        #: What the messages name: the socket's path or the URL.
        self.where = where

    @classmethod
    def unix(cls, path: Path, *, timeout_s: float = REQUEST_TIMEOUT_S) -> ApiClient:
        client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(path)),
            base_url=_UDS_BASE_URL,
            timeout=timeout_s,
        )
        return cls(client, str(path))

    @classmethod
    def tcp(
        cls, url: str, *, token: str | None = None, timeout_s: float = REQUEST_TIMEOUT_S
    ) -> ApiClient:
        base = url.rstrip("/")
        if not base.startswith(("http://", "https://")) or base in ("http:/", "https:/"):
            raise ConfigError(f"{url!r} is not an http:// or https:// URL", where="--api-url")
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        client = httpx.Client(base_url=base, headers=headers, timeout=timeout_s)
        return cls(client, base)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- requests -------------------------------------------------------------------

    def status_json(self) -> dict[str, Any]:
        """``GET /v1/status`` as the daemon sent it."""
        body = self._request("GET", "/v1/status")
        if not isinstance(body, dict):
            raise ApiClientError(f"{self.where}: unexpected answer to /v1/status")
        return body

    def status(self) -> StatusOut:
        return self._model(StatusOut, self.status_json(), "/v1/status")

    def change_guest(
        self,
        name: str,
        *,
        min: str | None = None,
        max: str | None = None,
        shares: int | None = None,
        min_cpus: int | None = None,
        max_cpus: int | None = None,
        cpu_shares: int | None = None,
    ) -> GuestChangeOut:
        """``PATCH /v1/guests/{name}``: accepted changes apply at the next period."""
        given = {
            "min": min,
            "max": max,
            "shares": shares,
            "min_cpus": min_cpus,
            "max_cpus": max_cpus,
            "cpu_shares": cpu_shares,
        }
        patch: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        path = f"/v1/guests/{_quote(name)}"
        return self._model(GuestChangeOut, self._request("PATCH", path, json=patch), path)

    def events(self) -> Iterator[StatusOut]:
        """One status per period from ``GET /v1/events``, the current one first; ends
        only by the caller stopping, or with DaemonUnavailableError if the stream ends."""
        timeout = httpx.Timeout(REQUEST_TIMEOUT_S, read=EVENT_READ_TIMEOUT_S)
        try:
            with self._client.stream("GET", "/v1/events", timeout=timeout) as response:
                if response.status_code != 200:
                    response.read()
                    raise self._answer_error(response)
                for event, data in parse_sse(response.iter_lines()):
                    if event == "status":
                        yield self._model(StatusOut, _loads(data, self.where), "/v1/events")
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        raise DaemonUnavailableError(f"{self.where}: the daemon ended the event stream (stopped?)")

    # -- plumbing -------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        if response.status_code >= 400:
            raise self._answer_error(response)
        return _loads(response.text, self.where)

    def _transport_error(self, exc: httpx.HTTPError) -> ApiClientError:
        if isinstance(exc, httpx.ConnectError):
            return DaemonUnavailableError(
                f"no daemon answers on {self.where} (is `balloonist daemon` running?)"
            )
        if isinstance(exc, httpx.TimeoutException):
            return DaemonUnavailableError(f"{self.where}: the daemon did not answer in time")
        return DaemonUnavailableError(f"{self.where}: {type(exc).__name__}: {exc}")

    def _answer_error(self, response: httpx.Response) -> ApiClientError:
        code = response.status_code
        detail = _detail(response)
        if code == 401:
            return ApiRejectedError(
                f"{self.where}: {detail or 'unauthorized'} (check --api-token-file)",
                status_code=code,
            )
        if code in (400, 404, 409, 422):
            return ApiRejectedError(detail or f"{self.where}: HTTP {code}", status_code=code)
        if code == 503:
            return DaemonUnavailableError(f"{self.where}: {detail or 'not ready'}")
        return ApiClientError(f"{self.where}: HTTP {code}: {detail or response.reason_phrase}")

    def _model(self, model: type[_M], body: Any, path: str) -> _M:
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise ApiClientError(
                f"{self.where}: unexpected answer to {path} ({exc.error_count()} errors; "
                "is the daemon another version?)"
            ) from None


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """Server-sent events as (event, data) pairs: ``data:`` lines joined with newlines,
    dispatched at a blank line; comments (``:``) and ``id:``/``retry:`` ignored."""
    event = "message"
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise ApiClientError(f"{where}: the answer is not JSON (is this balloonist?)") from None


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    detail = body.get("detail") if isinstance(body, dict) else None
    return " ".join(str(detail).split()) if detail else ""


__all__ = [
    "ApiClient",
    "ApiClientError",
    "ApiRejectedError",
    "DaemonUnavailableError",
    "parse_sse",
]
