"""The schema is owned by migrations: they must produce exactly what the models declare."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.config import normalize_database_url
from app.database.migrations import alembic_config, current_revision, head_revision, upgrade_to_head
from app.database.models import Base
from tests import pg


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection,
        opts={"compare_type": True, "compare_server_default": True},
    )
    return list(compare_metadata(context, Base.metadata))


def _downgrade_to_base(connection: Connection) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.downgrade(cfg, "base")


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


@pytest.fixture
async def empty_engine(pg_server: str) -> AsyncIterator[AsyncEngine]:
    """A database with nothing in it (not cloned from the migrated template)."""
    name = pg.unique_name("trawler_mig")
    await pg.admin_execute(pg_server, f'CREATE DATABASE "{name}"')
    engine = create_async_engine(normalize_database_url(pg.with_database(pg_server, name)))
    yield engine
    await engine.dispose()
    await pg.admin_execute(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_migrations_match_models(db_url: str) -> None:
    engine = create_async_engine(normalize_database_url(db_url))
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(_diff)
            revision = await conn.scalar(text("SELECT version_num FROM alembic_version"))
    finally:
        await engine.dispose()
    assert revision == head_revision()
    assert diff == [], f"models and migrations disagree; write a migration for: {diff}"


async def test_upgrade_downgrade_upgrade(empty_engine: AsyncEngine) -> None:
    model_tables = set(Base.metadata.tables)

    assert await upgrade_to_head(empty_engine) == head_revision()
    async with empty_engine.connect() as conn:
        assert model_tables <= await conn.run_sync(_tables)

    async with empty_engine.begin() as conn:
        await conn.run_sync(_downgrade_to_base)
    assert await current_revision(empty_engine) is None
    async with empty_engine.connect() as conn:
        assert await conn.run_sync(_tables) <= {"alembic_version"}

    assert await upgrade_to_head(empty_engine) == head_revision()
    async with empty_engine.connect() as conn:
        assert await conn.run_sync(_diff) == []
        # the data the initial migration seeds comes back too
        assert await conn.scalar(text("SELECT count(*) FROM cluster_state")) == 1


async def test_upgrade_is_idempotent(empty_engine: AsyncEngine) -> None:
    first = await upgrade_to_head(empty_engine)
    second = await upgrade_to_head(empty_engine)
    assert first == second == head_revision()
