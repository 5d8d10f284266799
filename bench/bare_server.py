"""The framework's limit: a bare Starlette route answering a constant.

Serves ``GET /api/generations/{id}`` with the bytes and ETag given in a
JSON file (a real snapshot, so the body is the same size as nimu_rt's), or
304 when ``If-None-Match`` matches, under exactly the uvicorn settings and
event loop ``nimu-rt serve`` uses. No auth, no store, no middleware.

    uv run python -m bench.bare_server --port P --snapshot FILE
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nimu_rt import cli
from nimu_rt.api.ws import uvicorn_options
from nimu_rt.config import load_settings
from nimu_rt.sockets import listening_socket


def make_app(body: bytes, etag: str) -> Starlette:
    async def get(request: Request) -> Response:
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        return Response(body, media_type="application/json", headers={"ETag": etag})

    return Starlette(routes=[Route("/api/generations/{id}", get)])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--snapshot", required=True)
    args = parser.parse_args(argv)
    snapshot = json.loads(Path(args.snapshot).read_text())
    app = make_app(snapshot["body"].encode(), snapshot["etag"])
    settings = load_settings(env={})
    sock = listening_socket("127.0.0.1", args.port)
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        proxy_headers=True,
        **uvicorn_options(settings),
    )
    print(f"bare server on http://127.0.0.1:{args.port}", flush=True)
    cli.run_server(uvicorn.Server(config).serve(sockets=[sock]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
