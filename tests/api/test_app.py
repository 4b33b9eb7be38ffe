"""The API's contract over a fake controller: every endpoint, every error, and that a
refused change changes nothing."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from balloonist.api import create_app
from balloonist.daemon.control import GuestChange
from balloonist.daemon.ksm_control import KsmMode, KsmStatus
from balloonist.daemon.mechanisms import Freed, Mechanism
from balloonist.ksm import KsmKnobs, KsmTotals
from balloonist.model import HostTruth
from balloonist.units import GIB, MIB
from tests.api.fake import FakeController, make_guest, make_status


@pytest.fixture
def fake() -> FakeController:
    return FakeController(make_status())


@pytest.fixture
def client(fake: FakeController) -> TestClient:
    return TestClient(create_app(fake, token=None))


def only_error(body: dict[str, Any]) -> dict[str, Any]:
    assert len(body["errors"]) == 1, body
    error: dict[str, Any] = body["errors"][0]
    return error


def test_status_is_the_whole_snapshot(client: TestClient) -> None:
    body = client.get("/v1/status").json()
    assert body["version"] == 1
    assert body["host"]["state"] == "soft"
    assert [g["name"] for g in body["guests"]] == ["web", "db"]
    assert body["policy"] == {"name": "shares", "tax_rate": 0.75}
    assert body["counters"]["backend_errors_transient"] == 4


def test_host(client: TestClient) -> None:
    assert client.get("/v1/host").json() == {
        "memory_bytes": 6 * GIB,
        "free_bytes": 3 * GIB,
        "swap_bytes": 1 * GIB,
        "swap_used_bytes": 0,
        "state": "soft",
        "cpus": 8,
        "truth": None,  # a simulated host has no count of its own
        "ksm": None,
        "freed": None,
        "version": 1,
        "time_s": 1.0,
        "period_s": 1.0,
    }


def test_guests_list_and_one(client: TestClient) -> None:
    listing = client.get("/v1/guests").json()
    assert listing["version"] == 1
    web = listing["guests"][0]
    assert web == client.get("/v1/guests/web").json()
    assert web["allocation_target_bytes"] == 1536 * MIB
    assert web["allocated_bytes"] == 1 * GIB
    assert web["working_set_bytes"] == 700 * MIB
    assert web["reclaimed_bytes"] == 2 * GIB - 1 * GIB
    assert web["counters"] == {"stalls": 1}
    db = client.get("/v1/guests/db").json()
    assert db["free_bytes"] is None
    assert db["cooperative"] is False
    # what the host counts they hold, next to what the balloon says
    assert web["host"] == {
        "held_bytes": 900 * MIB,
        "guest_ram_bytes": 800 * MIB,
        "overhead_bytes": 100 * MIB,
        "ksm_merged_bytes": 30 * MIB,
        "ksm_saved_bytes": 20 * MIB,
        "unheld_bytes": 1 * GIB - 800 * MIB,  # allocated 1 GiB, the host holds 800 MiB of RAM
        "cap_bytes": None,
        "swapped_bytes": None,
    }
    assert db["host"] == {
        "held_bytes": GIB,
        "guest_ram_bytes": None,
        "overhead_bytes": None,
        "ksm_merged_bytes": None,
        "ksm_saved_bytes": None,
        "unheld_bytes": None,
        "cap_bytes": GIB,
        "swapped_bytes": 256 * MIB,
    }


def test_the_host_s_own_count_and_its_page_sharing() -> None:
    truth = HostTruth(
        memory_bytes=6 * GIB, held_bytes=5 * GIB, available_bytes=20 * GIB, free_bytes=1 * GIB
    )
    ksm = KsmStatus(
        KsmMode.LEFT_ALONE,
        KsmKnobs(1, 300, 20),
        KsmTotals(pages_shared=10, pages_sharing=200, full_scans=4, profit_bytes=700_000),
        reason="it was already running when balloonist started",
    )
    freed = Freed().then({Mechanism.SHARING: 5 * MIB, Mechanism.REPORTING: 7 * MIB})
    status = make_status()
    status = replace(status, host=replace(status.host, truth=truth), ksm=ksm, freed=freed)
    host = TestClient(create_app(FakeController(status), token=None)).get("/v1/host").json()
    assert host["truth"] == {
        "memory_bytes": 6 * GIB,
        "held_bytes": 5 * GIB,
        "available_bytes": 20 * GIB,
        "free_bytes": 1 * GIB,
    }
    assert host["ksm"] == {
        "mode": "left alone",
        "reason": "it was already running when balloonist started",
        "running": True,
        "pages_to_scan": 300,
        "sleep_ms": 20,
        "pages_shared": 10,
        "pages_sharing": 200,
        "saved_bytes": 700_000,
    }
    by_mechanism = {
        "sharing": 5 * MIB,
        "free_page_reporting": 7 * MIB,
        "ballooning": 0,
        "host_paging": 0,
    }
    assert host["freed"] == {"period_bytes": by_mechanism, "total_bytes": by_mechanism}


def test_a_guest_s_processors_when_they_are_shared(client: TestClient) -> None:
    web = client.get("/v1/guests/web").json()
    assert web["cpu"] == {
        "vcpus": 4,
        "min_cpus": 1,
        "max_cpus": 4,
        "shares": 1000,
        "allocation_target_cpus": 3,
        "online_vcpus": 2,
        "balloon_vcpus": 2,
        "balloon_target_vcpus": 1,
        "demand_vcpus": 2.5,
    }
    assert client.get("/v1/guests/db").json()["cpu"] is None


def test_patch_a_guest_s_processors(client: TestClient, fake: FakeController) -> None:
    response = client.patch("/v1/guests/web", json={"cpu_shares": 3000, "min_cpus": 2})
    assert response.status_code == 202
    assert response.json()["cpu_shares"] == 3000 and response.json()["min_cpus"] == 2
    assert fake.guest_changes == [("web", GuestChange(min_cpus=2, cpu_shares=3000))]


def test_patch_reads_the_former_processor_names(client: TestClient, fake: FakeController) -> None:
    response = client.patch("/v1/guests/web", json={"cpu_min": 2, "cpu_max": 3})
    assert response.status_code == 202
    assert (response.json()["min_cpus"], response.json()["max_cpus"]) == (2, 3)
    assert fake.guest_changes == [("web", GuestChange(min_cpus=2, max_cpus=3))]


@pytest.mark.parametrize(
    ("name", "body", "field", "rule"),
    [
        ("db", {"cpu_shares": 2000}, "cpu_shares", "processors are not shared"),
        ("web", {"min_cpus": 3, "max_cpus": 2}, "min_cpus", "min_cpus 3 is above max_cpus 2"),
        ("web", {"min_cpus": 0}, "min_cpus", "greater than or equal to 1"),
        ("web", {"max_cpus": "2"}, "max_cpus", "valid integer"),
    ],
)
def test_a_bad_processor_change_is_422_and_changes_nothing(
    client: TestClient, fake: FakeController, name: str, body: dict[str, Any], field: str, rule: str
) -> None:
    response = client.patch(f"/v1/guests/{name}", json=body)
    assert response.status_code == 422
    error = only_error(response.json())
    assert error["field"] == field and rule in error["message"], error
    assert fake.guest_changes == []


def test_unknown_guest_is_404_with_one_line(client: TestClient) -> None:
    response = client.get("/v1/guests/nope")
    assert response.status_code == 404
    assert response.json()["detail"] == "no guest named 'nope'"


def test_policy(client: TestClient) -> None:
    assert client.get("/v1/policy").json() == {"name": "shares", "tax_rate": 0.75}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/status", None),
        ("GET", "/v1/host", None),
        ("GET", "/v1/guests", None),
        ("GET", "/v1/guests/web", None),
        ("PATCH", "/v1/guests/web", {"shares": 5}),
        ("GET", "/v1/history", None),
        ("GET", "/v1/policy", None),
        ("PATCH", "/v1/policy", {"tax_rate": 0.5}),
    ],
)
def test_before_the_first_period_is_503(method: str, path: str, body: Any) -> None:
    fake = FakeController(None)
    response = TestClient(create_app(fake, token=None)).request(method, path, json=body)
    assert response.status_code == 503
    assert response.json()["detail"].startswith("no status yet")
    assert response.headers["retry-after"] == "1"
    assert fake.guest_changes == [] and fake.policy_changes == []


def test_patch_guest_accepts_sizes_with_units(client: TestClient, fake: FakeController) -> None:
    response = client.patch("/v1/guests/web", json={"min": "512MiB", "max": "1.5GiB"})
    assert response.status_code == 202
    assert response.json() == {
        "name": "web",
        "min_bytes": 512 * MIB,
        "max_bytes": 1536 * MIB,
        "shares": None,
        "min_cpus": None,
        "max_cpus": None,
        "cpu_shares": None,
    }
    assert fake.guest_changes == [("web", GuestChange(min_bytes=512 * MIB, max_bytes=1536 * MIB))]
    # Applied at the next period, as the daemon does.
    fake.advance()
    web = client.get("/v1/guests/web").json()
    assert (web["min_bytes"], web["max_bytes"], web["shares"]) == (512 * MIB, 1536 * MIB, 1000)


def test_patch_guest_shares(client: TestClient, fake: FakeController) -> None:
    assert client.patch("/v1/guests/db", json={"shares": 3000}).status_code == 202
    assert fake.guest_changes == [("db", GuestChange(shares=3000))]


@pytest.mark.parametrize(
    ("body", "field", "rule"),
    [
        ({"min": 512}, "min", "sizes are strings with a unit"),
        ({"min": "512"}, "min", "has no unit"),
        ({"max": "lots"}, "max", "is not a size"),
        ({"max": "1.5B"}, "max", "not a whole number of bytes"),
        ({"shares": 0}, "shares", "greater than or equal to 1"),
        ({"shares": "2000"}, "shares", "valid integer"),
        ({"shares": 2.5}, "shares", "valid integer"),
        ({"shares": 10**12}, "shares", "less than or equal to"),
        ({"mni": "1GiB"}, "mni", "unknown field"),
    ],
)
def test_invalid_guest_patch_is_422_naming_field_and_rule(
    client: TestClient, fake: FakeController, body: dict[str, Any], field: str, rule: str
) -> None:
    before = client.get("/v1/status").json()
    response = client.patch("/v1/guests/web", json=body)
    assert response.status_code == 422
    error = only_error(response.json())
    assert error["field"] == field
    assert rule in error["message"]
    assert response.json()["detail"].startswith(f"{field}: ")
    assert fake.guest_changes == []
    fake.advance()
    after = client.get("/v1/status").json()
    assert after["guests"] == before["guests"]


@pytest.mark.parametrize(
    ("body", "field", "rule"),
    [
        ({"min": "3GiB"}, "min", "min 3GiB is above max 2GiB"),
        ({"min": "1GiB", "max": "512MiB"}, "min", "min 1GiB is above max 512MiB"),
        ({"max": "4GiB"}, "max", "max 4GiB is above memory 2GiB"),
    ],
)
def test_change_the_daemon_refuses_is_422_with_its_message(
    client: TestClient, fake: FakeController, body: dict[str, Any], field: str, rule: str
) -> None:
    response = client.patch("/v1/guests/web", json=body)
    assert response.status_code == 422
    assert response.json()["detail"] == f"guest 'web': {rule}"
    error = only_error(response.json())
    assert (error["field"], error["message"], error["type"]) == (field, rule, "config")
    assert fake.guest_changes == []


def test_patch_unknown_guest_is_404(client: TestClient, fake: FakeController) -> None:
    response = client.patch("/v1/guests/nope", json={"shares": 5})
    assert response.status_code == 404
    assert response.json()["detail"] == "no guest named 'nope'"
    assert fake.guest_changes == []


def test_guest_gone_since_the_last_status_is_404(client: TestClient, fake: FakeController) -> None:
    # The daemon dropped the VM after the status the API looked at.
    fake.before_next_change = lambda: fake.publish(make_status(2, guests=()))
    response = client.patch("/v1/guests/web", json={"shares": 5})
    assert response.status_code == 404
    assert fake.guest_changes == []


def test_patch_body_must_be_a_json_object(client: TestClient) -> None:
    response = client.patch(
        "/v1/guests/web", content=b"not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    missing = client.patch("/v1/guests/web")
    assert missing.status_code == 422
    assert only_error(missing.json())["field"] == "body"


def test_patch_policy(client: TestClient, fake: FakeController) -> None:
    response = client.patch("/v1/policy", json={"tax_rate": 0.5})
    assert response.status_code == 202
    assert response.json() == {"tax_rate": 0.5}
    assert fake.policy_changes == [0.5]
    fake.advance()
    assert client.get("/v1/policy").json()["tax_rate"] == 0.5


@pytest.mark.parametrize(
    ("body", "rule"),
    [
        ({"tax_rate": 1.0}, "less than 1"),
        ({"tax_rate": -0.1}, "greater than or equal to 0"),
        ({"tax_rate": "0.5"}, "valid number"),
        ({"tax_rate": True}, "valid number"),
        ({}, "required field is missing"),
    ],
)
def test_invalid_policy_patch_is_422(
    client: TestClient, fake: FakeController, body: dict[str, Any], rule: str
) -> None:
    response = client.patch("/v1/policy", json=body)
    assert response.status_code == 422
    error = only_error(response.json())
    assert error["field"] == "tax_rate"
    assert rule in error["message"]
    assert fake.policy_changes == []


def test_openapi_describes_every_endpoint(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) == {
        "/v1/status",
        "/v1/host",
        "/v1/guests",
        "/v1/guests/{name}",
        "/v1/history",
        "/v1/policy",
        "/v1/events",
        "/metrics",
    }
    patch = spec["paths"]["/v1/guests/{name}"]["patch"]
    assert set(patch["responses"]) >= {"202", "404", "422", "503"}
    assert "GuestOut" in spec["components"]["schemas"]
    # No HTML pages served (they would pull scripts from a CDN).
    assert client.get("/docs").status_code == 404


def test_history_is_one_column_per_figure(client: TestClient, fake: FakeController) -> None:
    fake.advance()
    fake.publish(make_status(3, guests=(make_guest("web", allocated_bytes=3 * GIB // 2),)))
    body = client.get("/v1/history").json()
    assert body["version"] == [1, 2, 3]
    assert body["time_s"] == [1.0, 2.0, 3.0]
    assert body["host_state"] == ["soft"] * 3
    assert body["host_memory_bytes"] == [6 * GIB] * 3
    assert list(body["guests"]) == ["web", "db"]
    assert body["guests"]["web"]["allocated_bytes"] == [GIB, GIB, 3 * GIB // 2]
    # db left at version 3: null there, so every column lines up with time_s
    assert body["guests"]["db"]["allocated_bytes"] == [2 * GIB, 2 * GIB, None]
    assert body["guests"]["db"]["working_set_bytes"][:2] == [700 * MIB, 700 * MIB]
    # processors: web's are shared, db's are not
    assert body["host_cpus"] == [8, 8, 8]
    assert body["guests"]["web"]["online_vcpus"][:2] == [2, 2]
    assert body["guests"]["web"]["allocation_target_cpus"][:2] == [3, 3]
    assert body["guests"]["db"]["online_vcpus"] == [None, None, None]


def test_history_since_a_version(client: TestClient, fake: FakeController) -> None:
    fake.advance()
    fake.advance()
    assert client.get("/v1/history", params={"since": 2}).json()["version"] == [3]
    empty = client.get("/v1/history", params={"since": 3}).json()
    assert empty["version"] == [] and empty["guests"] == {}
    bad = client.get("/v1/history", params={"since": -1})
    assert bad.status_code == 422
    assert only_error(bad.json())["field"] == "since"
