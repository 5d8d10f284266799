"""nimu-client.js in a real browser (Debian's chromium, driven by Playwright).

A small page on the app's own origin imports /static/nimu-client.js and
follows a generation to ``completed``: once over the WebSocket, once with the
WebSocket unreachable, through the long-polling fallback.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import Api
from tests.realtime.conftest import (
    LIFECYCLE,
    queued_generation,
    set_progress,
    set_status,
)
from tests.support import WAIT_S, postgres_required

CHROMIUM = "/usr/bin/chromium"

pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not os.path.exists(CHROMIUM):
        message = (
            f"{CHROMIUM} is missing: install Debian's chromium"
            " (apt-get install -y chromium; .ci/run does)"
        )
        if postgres_required():
            pytest.fail("NIMU_REQUIRE_POSTGRES is set (CI): " + message)
        pytest.skip("SKIPPED, NO BROWSER: " + message)
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-extensions",
                "--no-first-run",
            ],
            timeout=WAIT_S * 3 * 1000,
        )
        try:
            yield browser
        finally:
            await browser.close()


async def open_page(browser: Any, api: Api) -> Any:
    """The watch page the app serves, next to nimu-client.js."""
    page = await browser.new_page()
    page.set_default_timeout(WAIT_S * 1000)
    await page.goto(f"{api.base_url}/static/watch.html")
    await page.wait_for_function("() => typeof window.nimuWatch === 'function'")
    return page


async def updates(page: Any) -> list[dict[str, Any]]:
    """The page's update log, one item per snapshot or event."""
    return await page.eval_on_selector_all(
        "#log li",
        """items => items.map((li) => ({
            status: li.dataset.status,
            seq: Number(li.dataset.seq),
            progress: Number(li.dataset.progress),
            eventSeq: li.dataset.eventSeq ? Number(li.dataset.eventSeq) : null,
        }))""",
    )


async def drive_to_completion(api: Api, page: Any, gid: str) -> None:
    """Each change is made once the page shows the one before it."""
    await page.wait_for_selector("#status:text-is('queued')")
    for status in LIFECYCLE:
        await set_status(api, gid, status)
        await page.wait_for_selector(f"#status:text-is('{status}')")
        if status == "generating":
            await set_progress(api, gid, 50)
            await page.wait_for_selector("#percent:text-is('50')")


async def test_the_browser_client_follows_a_generation_over_the_websocket(
    api: Api, browser: Any
):
    gid = (await queued_generation(api))["id"]
    page = await open_page(browser, api)
    # As a person would: paste the token and the id, press Follow.
    await page.fill("#token", api.token("alice"))
    await page.fill("#generation", gid)
    await page.click("button")
    await drive_to_completion(api, page, gid)

    seen = await updates(page)
    first = seen[0]
    assert (first["status"], first["progress"], first["eventSeq"]) == (
        "queued",
        0,
        None,
    )
    # Then one update per event, in seq order, nothing missing.
    after = first["seq"] + 1
    expected = list(range(after, after + len(seen) - 1))
    assert [u["eventSeq"] for u in seen[1:]] == expected
    assert seen[-1]["status"] == "completed"
    assert await page.text_content("#mode") == "websocket"
    r = await api.client.get(f"/api/generations/{gid}", headers=api.headers())
    assert seen[-1]["seq"] == r.json()["seq"]


async def test_the_browser_client_falls_back_to_long_polling(api: Api, browser: Any):
    gid = (await queued_generation(api))["id"]
    page = await open_page(browser, api)
    await page.evaluate(
        """([id, token]) => {
            window.nimuWatch(id, {
                token,
                // Nothing listens on port 9 of the loopback: every
                // WebSocket attempt fails.
                wsUrl: "ws://127.0.0.1:9/ws",
                minBackoffMs: 50,
                wsFailuresBeforePolling: 2,
                pollWaitSeconds: 5,
            });
        }""",
        [gid, api.token("alice")],
    )
    await drive_to_completion(api, page, gid)

    seen = await updates(page)
    assert seen[-1]["status"] == "completed"
    assert all(u["eventSeq"] is None for u in seen)  # snapshots, by polling
    seqs = [u["seq"] for u in seen]
    assert seqs == sorted(set(seqs))
    assert await page.evaluate("() => window.nimuClient.mode") == "polling"
    await page.evaluate("() => window.nimuClient.close()")
