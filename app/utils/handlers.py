"""Task handlers: what the executor does with one claimed task (fetch + extract)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.config import Settings
from app.scraper.extract import CompiledSpec, Document, compile_spec, extract
from app.scraper.fetch import Fetcher, FetchResult
from app.scraper.ssrf import SSRFGuard
from app.services.queue import ClaimedTask, Outcome, PageRow

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class JobContext:
    """What a worker needs to know about a job to run its tasks (immutable, cached)."""

    job_id: uuid.UUID
    kind: str
    spec: dict[str, Any]
    compiled: CompiledSpec | None
    timeout_s: float
    headers: dict[str, str] = field(default_factory=dict)
    user_agent: str | None = None
    per_host_concurrency: int = 8
    delay_s: float = 0.0


async def load_job_context(
    conn: AsyncConnection, job_ids: Sequence[uuid.UUID], settings: Settings
) -> list[JobContext]:
    rows = await conn.execute(
        text("SELECT id, kind, spec FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))"),
        {"ids": list(job_ids)},
    )
    return [context_from_spec(row[0], row[1], row[2], settings) for row in rows]


def context_from_spec(
    job_id: uuid.UUID, kind: str, spec: dict[str, Any], settings: Settings
) -> JobContext:
    options = spec.get("options") or {}
    politeness = spec.get("politeness") or {}
    extract_spec = spec.get("extract") or {}
    compiled = compile_spec(extract_spec) if extract_spec else None
    return JobContext(
        job_id=job_id,
        kind=kind,
        spec=spec,
        compiled=compiled,
        timeout_s=float(options.get("timeout_s") or 30),
        headers=dict(options.get("headers") or {}),
        user_agent=options.get("user_agent"),
        per_host_concurrency=int(
            politeness.get("per_host_concurrency") or settings.per_host_concurrency
        ),
        delay_s=float(politeness.get("delay_ms") or 0) / 1000.0,
    )


class TaskHandler(Protocol):
    async def __call__(self, task: ClaimedTask, ctx: JobContext) -> Outcome: ...

    async def close(self) -> None: ...


def page_from_fetch(task: ClaimedTask, result: FetchResult, data: dict[str, Any]) -> PageRow:
    return PageRow(
        url=task.url,
        final_url=result.final_url,
        status_code=result.status_code,
        ok=result.ok,
        depth=task.depth,
        content_type=result.content_type,
        elapsed_ms=result.elapsed_ms,
        data=data,
        error=result.error,
    )


def crash_outcome(task: ClaimedTask, error: BaseException) -> Outcome:
    message = f"internal error while processing the page: {type(error).__name__}"
    page = PageRow(
        url=task.url,
        final_url=None,
        status_code=None,
        ok=False,
        depth=task.depth,
        content_type=None,
        elapsed_ms=None,
        error=message,
    )
    return Outcome(task.id, task.job_id, "failed", page=page, error=message)


def exhausted(task: ClaimedTask, outcome: Outcome) -> Outcome:
    """A retryable failure on the last attempt: store it as failed, with its page."""
    error = f"{outcome.error} (after {task.attempts} attempts)"
    page = outcome.page
    if page is not None:
        page.error = error
    return Outcome(task.id, task.job_id, "failed", page=page, error=error)


class ScrapeHandler:
    """Fetch the URL, extract the job's fields, classify the result."""

    def __init__(self, settings: Settings, fetcher: Fetcher | None = None) -> None:
        self.fetcher = fetcher or Fetcher(
            user_agent=settings.user_agent,
            max_body_bytes=settings.max_body_bytes,
            max_redirects=settings.max_redirects,
            guard=SSRFGuard(
                allow_private=settings.allow_private_networks, allow_cidrs=settings.allowed_cidrs
            ),
            limit=max(settings.worker_concurrency, 10),
        )

    async def __call__(self, task: ClaimedTask, ctx: JobContext) -> Outcome:
        result = await self.fetcher.fetch(
            task.url, headers=ctx.headers, timeout_s=ctx.timeout_s, user_agent=ctx.user_agent
        )
        data: dict[str, Any] = {}
        if result.ok and result.text is not None and result.is_html and ctx.compiled:
            document = Document(result.text, result.final_url)
            data = extract(document, result.final_url, ctx.compiled)
        page = page_from_fetch(task, result, data)
        if result.ok:
            return Outcome(task.id, task.job_id, "succeeded", page=page)
        if result.retryable:
            return Outcome(
                task.id,
                task.job_id,
                "retry",
                page=page,
                error=result.error,
                retry_in_s=result.retry_after or 0.0,
                retry_after_host=result.retry_after is not None,
            )
        return Outcome(task.id, task.job_id, "failed", page=page, error=result.error)

    async def close(self) -> None:
        await self.fetcher.close()
