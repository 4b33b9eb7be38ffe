"""With a token (the TCP app), every path needs ``Authorization: Bearer <token>``, but
the dashboard's static files, which hold no data."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.types import ASGIApp, Message

from balloonist.api import create_app
from balloonist.errors import ConfigError
from tests.api.fake import FakeController, make_status

TOKEN = "s3cret-token-0123456789abcdef"
PATHS = [
    "/v1/status",
    "/v1/host",
    "/v1/guests",
    "/v1/guests/web",
    "/v1/history",
    "/v1/policy",
    "/metrics",
    "/openapi.json",
]


@pytest.fixture
def client() -> TestClient:
    return TestClient(create_app(FakeController(make_status()), token=TOKEN))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong-token-0123456789abcdef",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        f"Basic {TOKEN}",
        TOKEN,
        "Bearer",
    ],
)
def test_missing_or_wrong_token_is_401(
    client: TestClient, path: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = client.get(path, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {"detail": "missing or wrong bearer token", "errors": []}


@pytest.mark.parametrize("path", PATHS)
def test_right_token_is_served(client: TestClient, path: str) -> None:
    response = client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200


def test_scheme_is_case_insensitive(client: TestClient) -> None:
    response = client.get("/v1/host", headers={"Authorization": f"bearer {TOKEN}"})
    assert response.status_code == 200


def test_refused_change_changes_nothing() -> None:
    fake = FakeController(make_status())
    client = TestClient(create_app(fake, token=TOKEN))
    assert client.patch("/v1/guests/web", json={"shares": 5}).status_code == 401
    assert client.patch("/v1/policy", json={"tax_rate": 0.1}).status_code == 401
    assert fake.guest_changes == [] and fake.policy_changes == []


def test_openapi_declares_the_bearer_scheme(client: TestClient) -> None:
    spec = client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "401" in spec["paths"]["/v1/host"]["get"]["responses"]


def test_token_never_logged(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        client.get("/v1/host", headers={"Authorization": f"Bearer {TOKEN}"})
        client.get("/v1/host", headers={"Authorization": "Bearer wrong-token-0123456789"})
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("token", ["x7Qp", "has space in the middle!", "tab\there-0123456789"])
def test_unusable_token_is_a_config_error(token: str) -> None:
    with pytest.raises(ConfigError) as caught:
        create_app(FakeController(), token=token)
    assert token not in str(caught.value)


def raw_get(app: ASGIApp, path: str) -> tuple[int, bytes]:
    """GET ``path`` exactly as given: HTTP clients tidy dot segments away, and a
    hostile one would not."""
    answer: dict[str, Any] = {"body": b""}

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"api")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    return answer["status"], answer["body"]


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/../v1/status",
        "/dashboard/../../v1/guests",
        "/dashboard//v1/status",
        "/dashboard/vendor/../../v1/status",
        "/dashboardx",
        "/dashboard/../metrics",
    ],
)
def test_no_path_through_the_dashboard_reaches_data_without_a_token(path: str) -> None:
    app = create_app(FakeController(make_status()), token=TOKEN)
    status, body = raw_get(app, path)
    assert status in {401, 404}, (status, body[:200])
    assert b"web" not in body and b"balloonist_" not in body


def test_the_dashboard_page_and_its_scripts_need_no_token(client: TestClient) -> None:
    for path in ["/dashboard/", "/dashboard/dashboard.js", "/dashboard/vendor/plotly.min.js"]:
        response = client.get(path)
        assert response.status_code == 200, path
        assert "script-src 'self'" in response.headers["content-security-policy"]
    page = client.get("/dashboard/").text
    assert TOKEN not in page and "web" not in page  # no data in the page itself
