"""With a token (the TCP app), every path needs ``Authorization: Bearer <token>``."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from balloonist.api import create_app
from balloonist.errors import ConfigError
from tests.api.fake import FakeController, make_status

TOKEN = "s3cret-token-0123456789abcdef"
PATHS = [
    "/v1/status",
    "/v1/host",
    "/v1/guests",
    "/v1/guests/web",
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
