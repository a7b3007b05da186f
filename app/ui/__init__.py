"""The web dashboard at /ui: server-rendered pages (Jinja2), htmx and a little JavaScript,
vendored static files; the same services and the same API keys as the REST API."""

from __future__ import annotations

from pathlib import Path

from starlette.staticfiles import StaticFiles

from app.ui.render import STATIC_PREFIX, UI_PREFIX
from app.ui.routes import router

__all__ = ["STATIC_DIR", "STATIC_PREFIX", "UI_PREFIX", "router", "static_files"]

STATIC_DIR = Path(__file__).parent / "static"


def static_files() -> StaticFiles:
    """The vendored CSS, JavaScript and icon (mounted at STATIC_PREFIX)."""
    return StaticFiles(directory=STATIC_DIR, check_dir=True)
