"""The instance's web console under /console: server-rendered pages for admins and members over
the same `operations` the REST API uses, with a little vendored JavaScript and CSS."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from api.console.router import router

STATIC = Path(__file__).parent / "static"


def install(app: FastAPI) -> None:
    # The static files first: the router's catch-all would answer their paths otherwise.
    app.mount("/console/static", StaticFiles(directory=STATIC), name="console-static")
    app.include_router(router)
