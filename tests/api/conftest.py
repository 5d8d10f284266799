"""The generation routes are tested with the queue paused.

A confirmed generation then stays ``queued``, so these tests see exactly the
changes their own requests made; dispatch and the pipeline are tested in
tests/jobs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import Api


@pytest.fixture
async def api(api_factory: Callable[..., Any]) -> Api:
    api = await api_factory()
    await api.pause_queue()
    return api
