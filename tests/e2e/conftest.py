"""End-to-end fixtures: the `trawler` command as a user runs it, and empty databases."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests import pg


def trawler_command() -> list[str]:
    script = Path(sys.executable).with_name("trawler")
    if script.exists():
        return [str(script)]  # the console script pip installed
    return [sys.executable, "-m", "app.cli"]


def clean_env(**values: str) -> dict[str, str]:
    """The test runner's environment without TRAWLER_* (a developer's settings must not leak)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAWLER_")}
    env.update(values)
    return env


@pytest.fixture
async def fresh_database(pg_server: str) -> AsyncIterator[str]:
    """An empty database: the command under test has to migrate it itself."""
    name = pg.unique_name("trawler_e2e")
    await pg.admin_execute(pg_server, f'CREATE DATABASE "{name}"')
    yield pg.with_database(pg_server, name)
    await pg.admin_execute(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
