"""/openapi.json: generated from the routes and their msgspec types."""

from __future__ import annotations

import msgspec
import pytest
from openapi_spec_validator import validate
from starlette.routing import Route, WebSocketRoute

from nimu_rt.api.openapi import OPERATIONS, build_openapi, route_operations
from nimu_rt.api.schemas import ConfirmBody, CreateGenerationBody
from nimu_rt.api.tokens import ScopedToken, TokenBody
from nimu_rt.app import create_app
from nimu_rt.models import Generation
from tests.conftest import Api

REF = "#/components/schemas/{name}"


@pytest.fixture
def backend() -> str:
    # The document does not depend on the store.
    return "sqlite"


def _app_routes(api: Api) -> list:
    settings = api.services.settings
    return create_app(settings, services=api.services).routes


async def test_every_route_of_the_app_is_documented_and_nothing_else(api: Api):
    routes = _app_routes(api)
    served = set(route_operations(routes))
    # Every Route and WebSocketRoute of the app, every method it declares.
    declared = {
        (m, r.path.replace("{key:path}", "{key}"))
        for r in routes
        if isinstance(r, Route)
        for m in (r.methods or ())
        if m != "HEAD" or ("HEAD", r.path.replace("{key:path}", "{key}")) in OPERATIONS
    } | {("GET", r.path) for r in routes if isinstance(r, WebSocketRoute)}
    assert served == declared
    assert served == set(OPERATIONS), (
        f"undocumented: {sorted(served - set(OPERATIONS))};"
        f" documented but gone: {sorted(set(OPERATIONS) - served)}"
    )
    doc = build_openapi(routes)
    documented = {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
    }
    assert documented == served


async def test_the_served_document_is_valid_openapi_3_1(api: Api):
    r = await api.client.get("/openapi.json")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["openapi"] == "3.1.0"
    validate(doc)
    assert doc == msgspec.json.decode(
        msgspec.json.encode(build_openapi(_app_routes(api)))
    )


async def test_bodies_and_answers_are_the_types_the_routes_use(api: Api):
    doc = (await api.client.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    _, expected = msgspec.json.schema_components(
        [Generation, CreateGenerationBody, ConfirmBody, TokenBody, ScopedToken],
        ref_template=REF,
    )
    for name, schema in expected.items():
        assert schemas[name] == schema, name
    create = doc["paths"]["/api/generations"]["post"]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": REF.format(name="CreateGenerationBody")}
    assert create["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": REF.format(name="Generation")
    }
    # A typo in a field name is refused by the decoder, and said so here.
    assert set(schemas["CreateGenerationBody"]["required"]) == {"prompt"}
    assert "conversationId" in schemas["CreateGenerationBody"]["properties"]


async def test_errors_security_and_scopes_are_described(api: Api):
    doc = (await api.client.get("/openapi.json")).json()
    problem = {"$ref": REF.format(name="Problem")}
    confirm = doc["paths"]["/api/generations/{id}/confirm"]["post"]
    for status in ("400", "401", "403", "404", "409", "413", "415", "422", "429"):
        content = confirm["responses"][status]["content"]
        assert content == {"application/problem+json": {"schema": problem}}
    assert confirm["security"] == [{"bearer": []}]
    assert "spend_cap_exceeded" in confirm["description"]
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    assert doc["paths"]["/api/queue"]["get"]["x-roles"] == ["admin", "service"]
    read = doc["paths"]["/api/generations/{id}"]["get"]
    assert read["x-scoped-token"] is True
    assert "x-scoped-token" not in doc["paths"]["/api/generations"]["post"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
