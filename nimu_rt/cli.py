"""The ``nimu-rt`` command: serve, migrate, token, veo3-sim, setup-bucket.

Every subcommand reads the same settings (see :mod:`nimu_rt.config`). A bad
setting ends the command with one line on stderr naming the key, and exit
status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from nimu_rt import __version__, logs
from nimu_rt.config import Settings, load_settings
from nimu_rt.errors import NimuError

Handler = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the nimu-rt command; returns its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except NimuError as exc:
        print(f"nimu-rt: {exc.detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="nimu-rt",
        description="Real-time backend for paid Veo 3 video generation.",
        epilog="Settings: config/default.toml, the file in $NIMU_CONFIG, then"
        " NIMU_<SECTION>_<KEY> environment variables.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(title="commands", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the server",
        description="Run the HTTP and WebSocket server. With no settings it runs"
        " the embedded default in the current directory: SQLite and files under"
        " ./data, the built-in Veo 3 simulator, and a printed dev token.",
    )
    serve.add_argument("--host", help="address to bind (default: server.host)")
    serve.add_argument(
        "--port",
        type=int,
        help="port to bind (default: $PORT when set, else server.port; 0 picks"
        " a free port)",
    )
    serve.set_defaults(handler=cmd_serve)

    migrate = commands.add_parser(
        "migrate",
        help="apply database migrations",
        description="Apply pending schema migrations to the configured database"
        " and exit. Safe to run concurrently and repeatedly.",
    )
    migrate.set_defaults(handler=cmd_migrate)

    token = commands.add_parser(
        "token",
        help="print a bearer token",
        description="Print a signed bearer token, alone on stdout, for the"
        " configured secret (or the embedded default's dev key).",
    )
    token.add_argument("--user", required=True, help="user id (the sub claim)")
    token.add_argument(
        "--role",
        choices=["user", "admin", "service"],
        default="user",
        help="role claim; admin and service unlock operator routes",
    )
    token.add_argument(
        "--ttl",
        type=int,
        metavar="SECONDS",
        help="lifetime (default: auth.dev_token_ttl_s)",
    )
    token.set_defaults(handler=cmd_token)

    sim = commands.add_parser(
        "veo3-sim",
        help="run the Veo 3 simulator alone",
        description="Serve the built-in Veo 3 simulator: Google's Gemini and"
        " Vertex wire formats, real MP4s, prompt markers such as [sim:safety]"
        " and the [simulator] settings' fault injection. See the README's"
        " 'Veo 3 simulator' section for a curl session.",
    )
    sim.add_argument("--host", default="127.0.0.1", help="address to bind")
    sim.add_argument(
        "--port", type=int, default=8090, help="port to bind (0 picks a free one)"
    )
    sim.set_defaults(handler=cmd_veo3_sim)

    setup_bucket = commands.add_parser(
        "setup-bucket",
        help="apply CORS and lifecycle rules to the R2 bucket",
        description="Write the bucket's CORS rule (origins from"
        " storage.cors_origins; Range allowed, ETag and Content-Range exposed)"
        " and a lifecycle rule aborting multipart uploads left unfinished for"
        " storage.abort_incomplete_after_days. Other rules are kept; running it"
        " again changes nothing. Needs storage.backend = \"r2\".",
    )
    setup_bucket.set_defaults(handler=cmd_setup_bucket)
    return parser


def _settings_for_serve(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    elif os.environ.get("PORT"):
        overrides["port"] = os.environ["PORT"]
    return load_settings(overrides={"server": overrides} if overrides else None)


def cmd_serve(args: argparse.Namespace) -> int:
    """``nimu-rt serve``: run the server until a signal stops it."""
    import uvicorn

    from nimu_rt.api.ws import uvicorn_options
    from nimu_rt.app import Services, create_app
    from nimu_rt.sockets import listening_socket

    settings = _settings_for_serve(args)
    logs.configure(settings.logging)
    _tune_garbage_collector()
    # Listening now, before the banner: a client that reads the URL and
    # connects at once waits in the backlog instead of being refused.
    try:
        sock = listening_socket(settings.server.host, settings.server.port)
    except OSError as exc:
        print(
            f"nimu-rt: cannot listen on {settings.server.host}:"
            f"{settings.server.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 1
    port = sock.getsockname()[1]
    if port != settings.server.port:
        settings = load_settings(
            overrides={"server": {"host": settings.server.host, "port": port}}
        )

    async def run() -> None:
        services = Services(settings)
        # Started here rather than in uvicorn's lifespan so that a startup
        # problem ends the command with one clear line, not a traceback.
        await services.start()
        try:
            app = create_app(settings, services=services)
            config = uvicorn.Config(
                app,
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=int(settings.server.shutdown_grace_s),
                proxy_headers=True,
                **uvicorn_options(settings),
            )
            _print_banner(settings, services)
            await uvicorn.Server(config).serve(sockets=[sock])
        finally:
            await services.stop()

    run_server(run())
    return 0


def run_server(main: Coroutine[Any, Any, None]) -> None:
    """Run a server's coroutine on uvloop where it is installed.

    uvloop's transports cost a fraction of asyncio's per socket write, and a
    status read or a WebSocket frame is little more than socket writes
    (measured with bench/polling.py and bench/fanout.py). Windows has no
    uvloop; asyncio's own loop runs there.
    """
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


# Young-generation collections run after this many new container objects
# (CPython's default: 700), older ones after these many younger collections.
GC_THRESHOLDS = (20_000, 20, 20)


def _tune_garbage_collector() -> None:
    """Collect cyclic garbage less often than CPython's defaults do.

    Every frame a server sends allocates futures, handles and coroutines,
    and each waiting connection holds a few that live until its next frame.
    With the defaults, young collections run every 700 allocations and
    promote everything in flight to the old generation, which then needs a
    full collection every few seconds under load: a pause of about 0.1 s
    per 1,000 open WebSockets (measured with bench/fanout.py), and a fifth
    of the CPU. Rarer young collections let those objects die young. The
    cost is that cyclic garbage lives a little longer. Only the server
    process does this; tests and other commands keep the defaults.
    """
    gc.set_threshold(*GC_THRESHOLDS)


def _print_banner(settings: Settings, services: object) -> None:
    from nimu_rt.app import Services

    assert isinstance(services, Services)
    lines = [f"nimu-rt {__version__} serving on {settings.base_url}"]
    lines.append(f"  store: {services.store.kind} ({_redact(settings.database_url)})")
    if not settings.auth.jwt_secret:
        token = services.auth.issue("dev")
        lines.append("  dev token (user 'dev'; admin: nimu-rt token --user NAME"
                     " --role admin):")
        lines.append(f"  {token}")
    print("\n".join(lines), flush=True)


def _redact(url: str) -> str:
    """The URL without its password, for printing."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}@{host}"


def cmd_migrate(args: argparse.Namespace) -> int:
    """``nimu-rt migrate``: apply pending migrations and exit."""
    from nimu_rt.store import create_store

    settings = load_settings()
    logs.configure(settings.logging)

    async def run() -> list[int]:
        store = create_store(settings)
        await store.open()
        try:
            return await store.migrate()
        finally:
            await store.close()

    applied = asyncio.run(run())
    if applied:
        print(f"applied migrations {', '.join(map(str, applied))}")
    else:
        print("the schema is up to date")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """``nimu-rt token``: print a signed bearer token, alone on stdout."""
    from nimu_rt.auth import TokenAuthority, principal_from_claims, signing_secret

    settings = load_settings()
    principal_from_claims({"sub": args.user, "role": args.role})
    authority = TokenAuthority(settings, signing_secret(settings))
    print(authority.issue(args.user, role=args.role, ttl_s=args.ttl))
    return 0


def cmd_veo3_sim(args: argparse.Namespace) -> int:
    """Serve the Veo 3 simulator until interrupted (Ctrl+C)."""
    from nimu_rt.veo3.simulator import SimulatorServer

    settings = load_settings()
    logs.configure(settings.logging)

    async def run() -> None:
        server = SimulatorServer(settings, host=args.host, port=args.port)
        try:
            base_url = await server.start()
        except OSError as exc:
            raise NimuError(
                f"cannot listen on {args.host}:{args.port}: {exc.strerror}"
            ) from None
        print(f"Veo 3 simulator on {base_url} (stats: {base_url}/_sim/stats)",
              flush=True)
        try:
            await server.wait()
        finally:
            await server.stop()

    asyncio.run(run())
    return 0


def cmd_setup_bucket(args: argparse.Namespace) -> int:
    """``nimu-rt setup-bucket``: apply CORS and lifecycle rules to the bucket."""
    from nimu_rt.errors import ConfigError
    from nimu_rt.storage.bucket import setup_bucket
    from nimu_rt.storage.r2 import R2Storage

    settings = load_settings()
    logs.configure(settings.logging)
    if settings.storage.backend != "r2":
        raise ConfigError(
            "storage.backend: setup-bucket configures an R2 bucket; the local"
            " backend needs no setup"
        )

    async def run() -> list[str]:
        storage = R2Storage(settings.storage)
        await storage.open()
        try:
            return await setup_bucket(storage)
        finally:
            await storage.close()

    for line in asyncio.run(run()):
        print(f"{settings.storage.bucket}: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
