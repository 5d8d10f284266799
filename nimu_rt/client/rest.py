"""The REST half of the Python client: one method per generation route.

Answers are decoded into the service's own records
(:class:`~nimu_rt.models.Generation`, :class:`~nimu_rt.models.Event`). A
problem+json answer raises :class:`ApiError` carrying the problem's
``status``, ``code`` and members; a service that cannot be reached raises
:class:`ServiceUnreachable`. Both belong to the :mod:`nimu_rt.errors` tree.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec

from nimu_rt.errors import NimuError, Unavailable
from nimu_rt.models import Event, Generation

_generation = msgspec.json.Decoder(Generation)


class ApiError(NimuError):
    """The service answered with a problem document.

    ``status`` and ``code`` are the problem's; ``problem`` is the whole
    document (e.g. ``currentStatus`` of a refused transition).
    """

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(str(problem.get("detail") or problem.get("title") or status))
        self.status = status  # type: ignore[misc]
        self.code = str(problem.get("code", "http_error"))  # type: ignore[misc]
        self.problem = problem


class ServiceUnreachable(Unavailable):
    """No answer from the service: connection refused, reset or timed out."""

    code = "service_unreachable"


class RestClient:
    """Generation routes for one bearer token.

    It does not retry: a failed call raises, and the caller decides.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
            transport=transport,
        )

    async def aclose(self) -> None:
        """Close the HTTP connections; safe to call twice."""
        await self._http.aclose()

    async def create(
        self, prompt: str, *, idempotency_key: str | None = None, **options: Any
    ) -> Generation:
        """Create a generation; ``options`` are the wire names (camelCase).

        The answer carries clarification questions
        (``pending_clarification``) or the price (``awaiting_confirmation``).
        """
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        body = {"prompt": prompt, **options}
        answer = await self._call(
            "POST", "/api/generations", json=body, headers=headers
        )
        return _generation.decode(answer.content)

    async def clarify(self, generation_id: str, answers: dict[str, str]) -> Generation:
        answer = await self._call(
            "POST",
            f"/api/generations/{generation_id}/clarify",
            json={"answers": answers},
        )
        return _generation.decode(answer.content)

    async def confirm(self, generation_id: str, accepted_cost_usd: float) -> Generation:
        """Accept the price shown and queue the generation."""
        answer = await self._call(
            "POST",
            f"/api/generations/{generation_id}/confirm",
            json={"acceptedCostUsd": accepted_cost_usd},
        )
        return _generation.decode(answer.content)

    async def cancel(self, generation_id: str) -> Generation:
        answer = await self._call("POST", f"/api/generations/{generation_id}/cancel")
        return _generation.decode(answer.content)

    async def get(
        self,
        generation_id: str,
        *,
        since_seq: int | None = None,
        wait_s: float | None = None,
    ) -> Generation | None:
        """The current snapshot; with ``since_seq``, None if it is unchanged.

        With ``wait_s`` as well, the service holds the request until the seq
        changes or ``wait_s`` passes (long-polling, capped by the server);
        the HTTP timeout is stretched to cover the wait.
        """
        params: dict[str, Any] = {}
        if since_seq is not None:
            params["sinceSeq"] = since_seq
        timeout: Any = httpx.USE_CLIENT_DEFAULT
        if wait_s is not None:
            params["waitSeconds"] = wait_s
            current = self._http.timeout
            timeout = httpx.Timeout(
                connect=current.connect,
                read=(current.read or 0.0) + wait_s,
                write=current.write,
                pool=current.pool,
            )
        headers = None
        if since_seq is not None and wait_s is None:
            headers = {"If-None-Match": f'"{since_seq}"'}
        answer = await self._call(
            "GET",
            f"/api/generations/{generation_id}",
            params=params,
            headers=headers,
            timeout=timeout,
        )
        if answer.status_code == 304:
            return None
        return _generation.decode(answer.content)

    async def events(
        self, generation_id: str, since_seq: int = 0
    ) -> AsyncIterator[Event]:
        """The stored events after ``since_seq``, page by page."""
        cursor: str | None = str(since_seq)
        while cursor is not None:
            answer = await self._call(
                "GET",
                f"/api/generations/{generation_id}/events",
                params={"sinceSeq": cursor, "limit": 1000},
            )
            page = msgspec.json.decode(answer.content)
            for event in msgspec.convert(page["items"], list[Event]):
                yield event
            cursor = page.get("nextCursor")

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            answer = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceUnreachable(f"{method} {path}: {exc!r}") from exc
        if answer.status_code >= 400:
            try:
                problem = answer.json()
            except ValueError:
                problem = {"detail": answer.text[:200]}
            if not isinstance(problem, dict):
                problem = {"detail": str(problem)[:200]}
            raise ApiError(answer.status_code, problem)
        return answer
