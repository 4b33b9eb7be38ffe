"""Schemathesis against the OpenAPI description: generated requests, valid and not,
never get a 5xx, an undocumented status, or a body that breaks its own schema.

The event stream is left out: it never ends, which a generated test cannot wait for
(test_server.py covers it over a real socket). For a guest change, the check that
every schema-valid body is accepted is left out: some refusals are rules JSON schema
cannot state (min above max, max above the guest's memory, a size above 1 PiB or a
fraction of a byte); test_app.py checks each of those is a 422 naming its field."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.checks import CheckFunction
from schemathesis.specs.openapi.checks import positive_data_acceptance

from balloonist.api import create_app
from tests.api.fake import FakeController, make_status

#: Enough to reach every documented status of every operation, small enough for CI.
EXAMPLES_PER_OPERATION = 30
TOKEN = "s3cret-token-0123456789abcdef"

open_schema = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(FakeController(make_status()), token=None)
).exclude(path="/v1/events")

token_app = create_app(FakeController(make_status()), token=TOKEN)
token_schema = schemathesis.openapi.from_asgi(
    "/openapi.json", token_app, headers={"Authorization": f"Bearer {TOKEN}"}
).exclude(path="/v1/events")

fuzz = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def excluded(case: Case[Any]) -> list[CheckFunction]:
    guest_change = case.method == "PATCH" and case.path == "/v1/guests/{name}"
    return [positive_data_acceptance] if guest_change else []


@open_schema.parametrize()
@fuzz
def test_api_keeps_its_description(case: Case[Any]) -> None:
    case.call_and_validate(excluded_checks=excluded(case))


@token_schema.parametrize()
@fuzz
def test_api_with_token_keeps_its_description(case: Case[Any]) -> None:
    case.call_and_validate(
        headers={"Authorization": f"Bearer {TOKEN}"}, excluded_checks=excluded(case)
    )
