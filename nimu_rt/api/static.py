"""``/static``: the browser client (``nimu-client.js``) and its files.

Served from the package's ``static`` directory, without auth: nothing there
is secret. Not meant for the product's own pages, which a CDN serves.
"""

from __future__ import annotations

from pathlib import Path

from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

routes = [Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static")]
