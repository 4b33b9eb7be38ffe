"""The dashboard's files as the API serves them (the page in a real browser is
test_dashboard_browser.py)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from balloonist.api import create_app
from balloonist.api.dashboard import PLOTLY_PATH, WEB_DIR
from tests.api.fake import FakeController, make_status


@pytest.fixture
def client() -> TestClient:
    return TestClient(create_app(FakeController(make_status()), token=None))


def test_root_redirects_to_the_dashboard(client: TestClient) -> None:
    response = client.get("/", follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == "/dashboard/"


def test_every_file_the_page_loads_is_served(client: TestClient) -> None:
    page = client.get("/dashboard/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^":]+)"', page.text)
    assert set(assets) == {"dashboard.css", "vendor/plotly.min.js", "dashboard.js"}
    for asset in assets:
        response = client.get(f"/dashboard/{asset}")
        assert response.status_code == 200, asset
        assert response.headers["x-content-type-options"] == "nosniff"


def test_plotly_comes_from_the_installed_package(client: TestClient) -> None:
    response = client.get(PLOTLY_PATH)
    assert response.headers["content-type"].startswith("text/javascript")
    assert response.text.lstrip().startswith("/**\n* plotly.js v")
    assert not (WEB_DIR / "vendor").exists()  # nothing third-party in the repository


def test_pages_may_not_be_framed_or_load_from_elsewhere(client: TestClient) -> None:
    csp = client.get("/dashboard/").headers["content-security-policy"]
    rules = dict(rule.strip().split(" ", 1) for rule in csp.split(";"))
    assert rules["default-src"] == "'none'"
    assert rules["script-src"] == "'self'"
    assert rules["connect-src"] == "'self'"
    assert rules["frame-ancestors"] == "'none'"


def test_the_dashboard_is_not_in_the_api_description(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not any(p == "/" or p.startswith("/dashboard") for p in paths)


def test_a_missing_file_is_404(client: TestClient) -> None:
    assert client.get("/dashboard/nothing.js").status_code == 404
