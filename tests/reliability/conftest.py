"""Reliability scenarios (issue 7): faults, load and hostile input against the real pieces.

Each scenario asserts its promise and prints what it measured (run with ``-s`` to see it);
docs/RELIABILITY.md records the results.
"""

from __future__ import annotations

import pytest

from app.database.connection import ConnectionManager
from tests.integration.conftest import Headers, bearer, make_key


@pytest.fixture
async def headers(db: ConnectionManager) -> Headers:
    """A user key of tenant "reliability" in the per-test database."""
    return bearer(await make_key(db, "reliability"))
