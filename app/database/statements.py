"""SQL written once with `:name` parameters, run through SQLAlchemy or straight on asyncpg.

A hot path that sends a single statement gains little from SQLAlchemy's statement and
result machinery: on the asyncpg connection under a pooled connection, the same SQL with
`$n` placeholders is prepared once per connection by asyncpg's statement cache and costs
a fraction of the CPU. `Statement` keeps the two forms of one text together, so the SQL
exists once whichever way a caller runs it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias, cast

import asyncpg
from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection

# `:name` parameters (not `::type` casts)
_NAMED_PARAM = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")

# what a Statement runs on: a SQLAlchemy connection, or the asyncpg one under it
Executor: TypeAlias = "AsyncConnection | asyncpg.Connection"


def positional(sql: str, names: Sequence[str]) -> str:
    """The statement with asyncpg's `$n` placeholders, numbered in the order of `names`."""
    found = set(_NAMED_PARAM.findall(sql))
    if found != set(names):
        raise ValueError(f"parameters {sorted(found)} do not match {sorted(names)}")
    return _NAMED_PARAM.sub(lambda m: f"${names.index(m.group(1)) + 1}", sql)


class Statement:
    """One SQL text: `text` for SQLAlchemy, `raw` + `names` for the driver.

    A parameter used several times is one `$n` on the driver, so PostgreSQL must deduce
    one type for all its uses: give it a CAST where the contexts differ.
    """

    __slots__ = ("names", "raw", "text")

    def __init__(self, sql: str) -> None:
        self.names: tuple[str, ...] = tuple(dict.fromkeys(_NAMED_PARAM.findall(sql)))
        self.raw = positional(sql, self.names)
        self.text: TextClause = text(sql)

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        return [params[name] for name in self.names]

    async def fetch_one(
        self, conn: Executor, params: Mapping[str, Any]
    ) -> Mapping[Any, Any] | None:
        """The first row (by column name), or None."""
        if isinstance(conn, asyncpg.Connection):
            # asyncpg's Record reads by column name like a mapping
            record = await conn.fetchrow(self.raw, *self.args(params))
            return cast(Mapping[Any, Any] | None, record)
        row: Mapping[Any, Any] | None = (await conn.execute(self.text, params)).mappings().first()
        return row
