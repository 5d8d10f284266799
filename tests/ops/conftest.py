"""Helpers for the operations tests: an app served from a thread of its own.

Schemathesis calls the API synchronously; the app it calls must therefore
run on an event loop other than the test's, in a thread, still under a real
uvicorn on a loopback port.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from nimu_rt.api.ws import uvicorn_options
from nimu_rt.app import Services, create_app
from tests.support import WAIT_S, free_socket, make_settings


@dataclass
class ThreadedApp:
    base_url: str
    services: Services

    def headers(self, user: str = "alice", role: str = "user") -> dict[str, str]:
        token = self.services.auth.issue(user, role=role)  # type: ignore[arg-type]
        return {"Authorization": f"Bearer {token}"}


@contextlib.contextmanager
def app_in_thread(
    data_dir: Path, overrides: dict[str, Any] | None = None
) -> Iterator[ThreadedApp]:
    """Serve the app (SQLite, simulator) on a loopback port from a thread."""
    settings = make_settings(data_dir, overrides)
    services = Services(settings)
    app = create_app(settings, services=services)
    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="on",
            **uvicorn_options(settings),
        )
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True
    )
    thread.start()
    started = threading.Event()
    try:
        # Bounded: uvicorn sets started once the lifespan and socket are up.
        for _ in range(int(WAIT_S / 0.01)):
            if server.started or not thread.is_alive():
                break
            started.wait(0.01)
        assert server.started, "the app did not start; see the log"
        yield ThreadedApp(f"http://127.0.0.1:{port}", services)
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
        sock.close()
