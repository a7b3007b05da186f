"""`trawler worker` must not load the web stack: FastAPI, Starlette, uvicorn, the app
itself, rich, alembic (issue 4: ~10 MB of RSS and ~0.3 s of start-up, for nothing).

Each check runs in a fresh interpreter: this one has imported everything already."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# loaded by `trawler serve` and the API only
FORBIDDEN = (
    "fastapi",
    "starlette",
    "uvicorn",
    "jinja2",
    "rich",
    "alembic",
    "app.main",
    "app.api.errors",
    "app.api.routes",
    "app.ui",
)

# `trawler worker` as the console script runs it (app.cli.main: app.commands, settings,
# logging, uvloop, open_database, the runner), with only the database left out: the
# reachability probe and the executor loop are stubbed, everything else is the real code.
WORKER_RUN = """
import json, sys
import app.cli as cli
import app.utils.runner as runner

async def reachable(*args, **kwargs):
    return None

async def run_worker(db, *, concurrency=None):
    return 0

cli._wait_reachable = reachable
runner.run_worker = run_worker
try:
    cli.main(["worker"])
except SystemExit as exit:
    code = exit.code
else:
    code = None
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _loaded(script: str) -> tuple[object, set[str]]:
    env = {
        **os.environ,
        # never reached (the probe is stubbed); set so no embedded server is started
        "TRAWLER_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/unused",
        "TRAWLER_LOG_LEVEL": "WARNING",
    }
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result.get("code"), set(result["modules"])


def _web_stack(modules: set[str]) -> list[str]:
    return sorted(
        name for name in modules if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    )


def test_worker_command_loads_no_web_stack() -> None:
    code, modules = _loaded(WORKER_RUN)
    assert code == 0
    assert "app.utils.executor" in modules  # the worker's code path was imported
    assert _web_stack(modules) == []


def test_executor_and_services_load_no_web_stack() -> None:
    script = """
    import json, sys
    import app.utils.executor, app.utils.runner, app.services.jobs, app.services.admin
    import app.services.export, app.services.firecrawl, app.services.preview
    print(json.dumps({"modules": sorted(sys.modules)}))
    """
    _code, modules = _loaded(script)
    assert _web_stack(modules) == []


def test_domain_errors_are_the_api_errors() -> None:
    """app.api.errors re-exports app.errors: one class each, whichever module raised it."""
    from app import errors
    from app.api import errors as api_errors

    for name in ("TrawlerError", "NotFound", "Conflict", "Unprocessable", "TooManyRequests"):
        assert getattr(api_errors, name) is getattr(errors, name)
    assert api_errors.UNSTORABLE_TEXT == errors.UNSTORABLE_TEXT
