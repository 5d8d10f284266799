"""The daily spend cap holds under racing confirms, on both stores."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from typing import Any

from tests.conftest import Api

# The default generation (veo-3.1, 720p, 8 s, audio) costs 3.20 USD.
COST = 3.2
CAP = {"security": {"daily_spend_cap_usd": 5.0}}


async def confirm(api: Api, generation: dict[str, Any], user: str = "alice"):
    return await api.client.post(
        f"/api/generations/{generation['id']}/confirm",
        json={"acceptedCostUsd": generation["costEstimate"]["usd"]},
        headers=api.headers(user),
    )


async def status_of(api: Api, generation_id: str, user: str = "alice") -> str:
    r = await api.client.get(
        f"/api/generations/{generation_id}", headers=api.headers(user)
    )
    return r.json()["status"]


async def capped_apps(
    api_factory: Callable[..., Any], backend: str, cap: dict[str, Any]
) -> list[Api]:
    """One app on SQLite; two instances sharing the database on PostgreSQL."""
    count = 2 if backend == "postgres" else 1
    apps = [await api_factory(cap) for _ in range(count)]
    await apps[0].pause_queue()
    return apps


async def test_racing_confirms_cannot_both_take_the_last_dollars(
    api_factory: Callable[..., Any], backend: str
):
    # Room for two of the four: 2 x 3.20 = 6.40 <= 8.00 < 9.60.
    apps = await capped_apps(
        api_factory, backend, {"security": {"daily_spend_cap_usd": 8.0}}
    )
    creator = apps[0]
    generations = [await creator.create() for _ in range(4)]
    # All four at once, spread over the instances.
    answers = await asyncio.gather(
        *(confirm(apps[n % len(apps)], g) for n, g in enumerate(generations))
    )
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200, 200, 409, 409], [r.text for r in answers]
    for r in answers:
        if r.status_code == 409:
            problem = r.json()
            assert problem["code"] == "spend_cap_exceeded"
            assert problem["capUsd"] == 8.0
            assert problem["spentUsd"] == 6.4
            assert problem["remainingUsd"] == 1.6
            assert problem["costUsd"] == COST
            today = dt.datetime.now(dt.UTC).date()
            assert problem["resetsAt"] == f"{today + dt.timedelta(days=1)}T00:00:00Z"
    # The refused ones are untouched: still waiting for confirmation.
    states = sorted([await status_of(creator, g["id"]) for g in generations])
    assert states == ["awaiting_confirmation"] * 2 + ["queued"] * 2
    # The cap is per user: Bob still has his whole budget.
    bobs = await creator.create(user="bob")
    assert (await confirm(creator, bobs, "bob")).status_code == 200


async def test_failed_and_unstarted_cancels_free_the_budget_retries_use_it(
    api_factory: Callable[..., Any], backend: str
):
    (api,) = (await capped_apps(api_factory, backend, CAP))[:1]
    first, second = await api.create(), await api.create()
    assert (await confirm(api, first)).status_code == 200
    assert (await confirm(api, second)).json()["code"] == "spend_cap_exceeded"
    # Cancelled before it ever reached Veo 3: it will not be billed.
    r = await api.client.post(
        f"/api/generations/{first['id']}/cancel", headers=api.headers()
    )
    assert r.json()["status"] == "cancelled"
    assert (await confirm(api, second)).status_code == 200
    # A retry is paid again, so it must fit as well.
    r = await api.client.post(
        f"/api/generations/{first['id']}/retry", headers=api.headers()
    )
    assert (r.status_code, r.json()["code"]) == (409, "spend_cap_exceeded")
    assert await status_of(api, first["id"]) == "cancelled"
    # Once the other one failed (Veo 3 does not bill failures), it fits.
    r = await api.client.put(
        f"/api/generations/{second['id']}/status",
        json={"status": "failed"},
        headers=api.headers("ops", "admin"),
    )
    assert r.json()["status"] == "failed"
    r = await api.client.post(
        f"/api/generations/{first['id']}/retry", headers=api.headers()
    )
    assert r.status_code == 200 and r.json()["status"] == "queued"


async def test_yesterdays_spend_does_not_count(
    api_factory: Callable[..., Any], backend: str
):
    (api,) = (await capped_apps(api_factory, backend, CAP))[:1]
    first, second = await api.create(), await api.create()
    confirmed = (await confirm(api, first)).json()
    assert (await confirm(api, second)).status_code == 409
    # As if the first had been confirmed before the last UTC midnight.
    yesterday = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    await api.services.store.execute(
        "UPDATE jobs SET queued_at = $1 WHERE id = $2", yesterday, confirmed["jobId"]
    )
    assert (await confirm(api, second)).status_code == 200


async def test_no_cap_by_default(api: Api):
    await api.pause_queue()
    for _ in range(3):
        assert (await confirm(api, await api.create())).status_code == 200
