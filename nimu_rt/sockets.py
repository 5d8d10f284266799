"""Listening sockets for the servers this process runs under uvicorn.

Why not a plain ``socket.socket(family, SOCK_STREAM)``: asyncio turns off
Nagle's algorithm (sets ``TCP_NODELAY``) only on sockets whose protocol is
``IPPROTO_TCP``, and a connection accepted from a listening socket created
with protocol 0 inherits that 0. On such connections a response written in
two pieces (uvicorn writes headers and body separately) or two WebSocket
frames in a row wait for the peer's delayed ACK: about 40 ms on Linux, on
every request of a kept-alive connection after the first few. Naming the
protocol makes asyncio set ``TCP_NODELAY`` on every accepted connection.
"""

from __future__ import annotations

import socket


def listening_socket(host: str, port: int, *, backlog: int = 2048) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` and listening.

    ``port`` 0 picks a free port (read it with ``getsockname()``). Raises
    OSError when the address cannot be bound; the socket is closed then.
    It does not accept connections itself: hand it to uvicorn's
    ``Server.serve(sockets=[...])``.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock
