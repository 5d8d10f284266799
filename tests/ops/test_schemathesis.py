"""Schemathesis over /openapi.json: generated requests, answers checked.

Requests are made from the document (valid and invalid ones, bounded in
number per operation) against the real app, and every answer must be no
server error, a documented status, a documented content type and a body
that matches its schema.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from nimu_rt.api import all_routes
from nimu_rt.api.openapi import WEBSOCKET_PATHS, build_openapi
from tests.ops.conftest import ThreadedApp, app_in_thread

schema = schemathesis.openapi.from_dict(build_openapi(all_routes())).exclude(
    path=list(WEBSOCKET_PATHS)
)
# Examples per operation: few in the suite (about 30 operations); set
# NIMU_TEST_SCHEMATHESIS_EXAMPLES=200 for a longer, randomised exploration.
EXPLORE = os.environ.get("NIMU_TEST_SCHEMATHESIS_EXAMPLES")
EXAMPLES = int(EXPLORE or 6)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedApp]:
    overrides = {
        # Generated requests come fast from one address; limits are tested
        # in tests/security.
        "security": {"rate_limits": False},
        "realtime": {"longpoll_max_wait_s": 0.2},
    }
    with app_in_thread(tmp_path_factory.mktemp("schemathesis"), overrides) as app:
        yield app


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    # The same examples every run, unless a longer exploration was asked for.
    derandomize=EXPLORE is None,
    suppress_health_check=list(HealthCheck),
)
def test_every_answer_keeps_the_contract(case: schemathesis.Case, live: ThreadedApp):
    # An operator's token reaches every route; what users may not do is
    # tested in tests/security.
    case.call_and_validate(
        base_url=live.base_url,
        headers=live.headers("ops", "admin"),
        checks=CHECKS,
        timeout=10,
    )
