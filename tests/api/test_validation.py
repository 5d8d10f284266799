"""Bad input gets a clear problem+json answer and stores nothing."""

from __future__ import annotations

import pytest

from tests.api.test_generations import CLEAR_PROMPT, assert_problem
from tests.conftest import Api


async def stored_count(api: Api, user: str = "alice") -> int:
    r = await api.client.get("/api/generations", headers=api.headers(user))
    return len(r.json()["items"])


async def post_raw(api: Api, content: bytes, content_type="application/json"):
    return await api.client.post(
        "/api/generations",
        content=content,
        headers={**api.headers(), "Content-Type": content_type},
    )


@pytest.mark.parametrize(
    ("tried", "body", "path", "message"),
    [
        ("prompt of the wrong type", b'{"prompt": 5}', "$.prompt", "Expected `str`"),
        ("missing prompt", b"{}", "$", "Object missing required field `prompt`"),
        ("unknown field", b'{"prompt": "x", "promt": 1}', "$",
         "Object contains unknown field `promt`"),
        ("unknown aspect ratio", b'{"prompt": "x", "aspectRatio": "4:3"}',
         "$.aspectRatio", "Invalid enum value '4:3'"),
        ("duration as a string", b'{"prompt": "x", "durationSeconds": "8"}',
         "$.durationSeconds", "Expected `int | null`, got `str`"),
        ("unsupported duration", b'{"prompt": "x", "durationSeconds": 5}',
         "$.durationSeconds", "Invalid enum value 5"),
        ("audio flag as a number", b'{"prompt": "x", "generateAudio": 1}',
         "$.generateAudio", "Expected `bool | null`, got `int`"),
        ("body is a list", b'["prompt"]', "$", "Expected `object`, got `array`"),
    ],
)
async def test_wrong_shapes_are_422_with_the_json_path(api, tried, body, path, message):
    r = await post_raw(api, body)
    doc = assert_problem(r, 422, "validation_failed")
    assert doc["errors"][0]["path"] == path, tried
    assert doc["errors"][0]["message"].startswith(message), tried
    assert await stored_count(api) == 0


@pytest.mark.parametrize(
    ("tried", "body", "path", "message"),
    [
        ("blank prompt", {"prompt": "   "}, "$.prompt", "must not be empty"),
        ("prompt over the limit", {"prompt": "x" * 2001}, "$.prompt",
         "must be at most 2000 characters after trimming (got 2001)"),
        ("escape character", {"prompt": "a fox \x1b[31m red"}, "$.prompt",
         "contains the control character U+001B"),
        ("NUL character", {"prompt": "a fox\x00"}, "$.prompt",
         "contains the control character U+0000"),
        ("bidi override", {"prompt": "a fox \u202e"}, "$.prompt",
         "contains the control character U+202E"),
        ("control in negative prompt", {"prompt": CLEAR_PROMPT,
         "negativePrompt": "\x07"}, "$.negativePrompt", "contains the control"),
        ("unknown model", {"prompt": CLEAR_PROMPT, "model": "veo-9"}, "$.model",
         "unknown model"),
        ("1080p for 4 seconds", {"prompt": CLEAR_PROMPT, "resolution": "1080p",
         "durationSeconds": 4}, "$.durationSeconds", "1080p needs"),
        ("another user's reference image", {"prompt": CLEAR_PROMPT,
         "referenceImageKey": "refs/bob/1.png"}, "$.referenceImageKey",
         "must be a key returned by /api/storage/uploads"),
        ("conversation id with spaces", {"prompt": CLEAR_PROMPT,
         "conversationId": "a b"}, "$.conversationId", "must be 1-255 printable"),
    ],
)
async def test_bad_values_are_422_and_nothing_is_stored(
    api, tried, body, path, message
):
    r = await api.client.post("/api/generations", json=body, headers=api.headers())
    doc = assert_problem(r, 422, "validation_failed")
    assert doc["errors"][0]["path"] == path, tried
    assert doc["errors"][0]["message"].startswith(message), tried
    assert await stored_count(api) == 0


async def test_every_bad_field_is_listed(api: Api):
    r = await api.client.post(
        "/api/generations",
        json={"prompt": "", "negativePrompt": "\x1b", "conversationId": " "},
        headers=api.headers(),
    )
    doc = assert_problem(r, 422, "validation_failed")
    assert [e["path"] for e in doc["errors"]] == [
        "$.prompt",
        "$.negativePrompt",
        "$.conversationId",
    ]


async def test_malformed_json_is_400(api: Api):
    r = await post_raw(api, b'{"prompt": "a fox"')
    assert_problem(r, 400, "malformed_json")
    assert await stored_count(api) == 0


async def test_a_form_body_is_415(api: Api):
    r = await post_raw(api, b"prompt=a+fox", "application/x-www-form-urlencoded")
    assert_problem(r, 415, "unsupported_media_type")
    assert await stored_count(api) == 0


async def test_a_body_over_the_limit_is_413(api: Api):
    body = b'{"prompt": "' + b"x" * 70_000 + b'"}'
    r = await post_raw(api, body)
    assert_problem(r, 413, "payload_too_large")
    assert await stored_count(api) == 0


async def test_clarify_answers_are_checked(api: Api):
    generation = await api.create(prompt="a cat")
    url = f"/api/generations/{generation['id']}/clarify"

    r = await api.client.post(
        url,
        json={"answers": {"detail": "It sleeps", "mood": "happy",
                          "setting": "a roof \x1b"}},
        headers=api.headers(),
    )
    doc = assert_problem(r, 422, "validation_failed")
    assert {e["path"]: e["message"] for e in doc["errors"]} == {
        "$.answers.mood": "no such question",
        "$.answers.setting": "contains the control character U+001B",
        "$.answers.style": "this question needs an answer",
    }
    r = await api.client.get(
        f"/api/generations/{generation['id']}", headers=api.headers()
    )
    assert r.json()["status"] == "pending_clarification"
    assert r.json()["seq"] == 1


async def test_negative_accepted_cost_is_422(api: Api):
    generation = await api.create(prompt=CLEAR_PROMPT)
    r = await api.client.post(
        f"/api/generations/{generation['id']}/confirm",
        json={"acceptedCostUsd": -1},
        headers=api.headers(),
    )
    assert_problem(r, 422, "validation_failed")


@pytest.mark.parametrize(
    ("query", "path"),
    [
        ("limit=0", "$query.limit"),
        ("limit=abc", "$query.limit"),
        ("limit=101", "$query.limit"),
        ("limit=1.5", "$query.limit"),
        ("status=done", "$query.status"),
        ("cursor=%%%", "$query.cursor"),
    ],
)
async def test_bad_list_queries(api: Api, query, path):
    r = await api.client.get(f"/api/generations?{query}", headers=api.headers())
    doc = assert_problem(r, 422, "validation_failed")
    assert doc["errors"][0]["path"] == path


@pytest.mark.parametrize("wait", ["abc", "nan", "-1", "inf"])
async def test_a_bad_long_poll_wait_is_refused_with_its_bounds(api: Api, wait):
    # Tried: a word, NaN, a negative and an infinite wait on a status read.
    created = await api.create()
    r = await api.client.get(
        f"/api/generations/{created['id']}?waitSeconds={wait}",
        headers=api.headers(),
    )
    doc = assert_problem(r, 422, "validation_failed")
    assert doc["errors"][0]["path"] == "$query.waitSeconds"
    assert doc["errors"][0]["message"].startswith("must be a number from 0 to")


async def test_unknown_ids_and_routes_are_404_problems(api: Api):
    r = await api.client.get("/api/generations/not-an-id", headers=api.headers())
    assert_problem(r, 404, "not_found")
    r = await api.client.get(
        "/api/generations/01a23d13-562a-7570-8379-83894941c262",
        headers=api.headers(),
    )
    assert_problem(r, 404, "not_found")
    r = await api.client.get("/api/nothing-here", headers=api.headers())
    assert_problem(r, 404, "not_found")
    r = await api.client.delete("/api/generations", headers=api.headers())
    assert_problem(r, 405, "method_not_allowed")
