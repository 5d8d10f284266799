"""A TCP proxy in front of the S3 server: records requests, injects faults.

It speaks just enough HTTP/1.1 to find where each request starts (client
requests carry a Content-Length; responses are passed through untouched), so
the storage code under test talks to it exactly as to R2. A fault answers
one chosen request with a 503 SlowDown, or cuts the connection, the way a
loaded R2 or a broken network would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit


@dataclass
class Seen:
    """One request that reached the proxy."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    content_length: int

    @property
    def part_number(self) -> int | None:
        raw = self.query.get("partNumber")
        return int(raw) if raw is not None else None

    @property
    def operation(self) -> str:
        """The S3 operation, as far as the tests need to tell them apart."""
        q = self.query
        if self.method == "PUT" and "partNumber" in q:
            return "UploadPart"
        if self.method == "POST" and "uploads" in q:
            return "CreateMultipartUpload"
        if self.method == "POST" and "uploadId" in q:
            return "CompleteMultipartUpload"
        if self.method == "DELETE" and "uploadId" in q:
            return "AbortMultipartUpload"
        if self.method == "GET" and "uploadId" in q:
            return "ListParts"
        if self.method == "PUT" and "cors" in q:
            return "PutBucketCors"
        if self.method == "PUT" and "lifecycle" in q:
            return "PutBucketLifecycleConfiguration"
        if self.method == "PUT" and "x-amz-copy-source" in self.headers:
            return "CopyObject"
        if self.method == "PUT":
            return "PutObject"
        return f"{self.method} {self.path}"


@dataclass
class Fault:
    """Answer requests matching ``match`` with ``action``, ``times`` times."""

    match: Callable[[Seen], bool]
    action: str  # "503" or "reset"
    times: int = 1
    hits: int = field(default=0)


_SLOW_DOWN = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/xml\r\n"
    b"Connection: close\r\n"
    b"Content-Length: 118\r\n\r\n"
    b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>"
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate."
    b"</Message></Error>"
)


class S3Proxy:
    """Forwards to ``upstream`` (``http://host:port``); see the module doc."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self.seen: list[Seen] = []
        self.faults: list[Fault] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> S3Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def fail(self, match: Callable[[Seen], bool], action: str, times: int = 1) -> None:
        self.faults.append(Fault(match, action, times))

    def ops(self, operation: str) -> list[Seen]:
        return [s for s in self.seen if s.operation == operation]

    def _fault_for(self, seen: Seen) -> str | None:
        for fault in self.faults:
            if fault.hits < fault.times and fault.match(seen):
                fault.hits += 1
                return fault.action
        return None

    async def _handle(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        upstream_reader, upstream_writer = await asyncio.open_connection(
            self._host, self._port
        )
        pump = asyncio.create_task(self._pipe(upstream_reader, client_writer))
        try:
            while True:
                try:
                    head = await client_reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                seen = _parse(head)
                self.seen.append(seen)
                action = self._fault_for(seen)
                if action == "reset":
                    client_writer.transport.abort()
                    return
                if action == "503":
                    if seen.headers.get("expect", "").lower() != "100-continue":
                        await client_reader.readexactly(seen.content_length)
                    client_writer.write(_SLOW_DOWN)
                    await client_writer.drain()
                    client_writer.close()
                    return
                upstream_writer.write(head)
                remaining = seen.content_length
                while remaining:
                    chunk = await client_reader.read(min(remaining, 1 << 16))
                    if not chunk:
                        return
                    upstream_writer.write(chunk)
                    await upstream_writer.drain()
                    remaining -= len(chunk)
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await pump
            upstream_writer.close()
            client_writer.close()
            self._handlers.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(1 << 16):
                writer.write(chunk)
                await writer.drain()
        writer.close()


def _parse(head: bytes) -> Seen:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    url = urlsplit(target)
    query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
    return Seen(
        method=method,
        path=url.path,
        query=query,
        headers=headers,
        content_length=int(headers.get("content-length", "0")),
    )
