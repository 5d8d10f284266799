"""The listening socket the servers use: connections without Nagle's delay."""

from __future__ import annotations

import asyncio
import socket

import pytest

from nimu_rt.sockets import listening_socket
from tests.support import WAIT_S


async def test_accepted_connections_send_small_writes_at_once() -> None:
    # What a user would notice otherwise: ~40 ms added to every response of
    # a kept-alive connection and to the second of two WebSocket frames.
    sock = listening_socket("127.0.0.1", 0)
    accepted: asyncio.Queue[int] = asyncio.Queue()

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("socket")
        await accepted.put(peer.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(handle, sock=sock)
    try:
        port = sock.getsockname()[1]
        async with asyncio.timeout(WAIT_S):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            nodelay = await accepted.get()
        writer.close()
        assert nodelay == 1
    finally:
        server.close()
        await server.wait_closed()


def test_a_taken_port_is_refused_and_nothing_is_left_open() -> None:
    first = listening_socket("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        # SO_REUSEADDR does not allow two listeners on one port.
        with pytest.raises(OSError):
            listening_socket("127.0.0.1", port)
    finally:
        first.close()
