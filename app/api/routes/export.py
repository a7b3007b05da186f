"""Export route: a job's pages streamed as CSV, JSONL, JSON or XLSX (app.services.export)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.api.deps import DbDep, PrincipalDep
from app.api.routes.common import API_PREFIX
from app.services import export as export_service
from app.services.export import Export, ExportFormat, ExportRequest, StatusFilter

router = APIRouter(prefix=f"{API_PREFIX}/export", tags=["export"])


class ExportResponse(StreamingResponse):
    """Streams an Export and, whatever happens to the response (finished, client gone,
    failed), closes it: the export's database connection goes back at once."""

    def __init__(self, export: Export) -> None:
        super().__init__(
            export.chunks(),
            media_type=export.media_type,
            headers={
                "Content-Disposition": f'attachment; filename="{export.filename}"',
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # a proxy must not buffer the whole file
            },
        )
        self.export = export

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.export.aclose()


_CONTENT: dict[str, dict[str, object]] = {m: {} for m in export_service.MEDIA_TYPES.values()}


@router.get(
    "/jobs/{job_id}",
    response_class=ExportResponse,
    status_code=200,  # FastAPI cannot read it off ExportResponse's signature
    responses={200: {"content": _CONTENT, "description": "the file, streamed"}},
)
async def export_job(
    job_id: uuid.UUID,
    db: DbDep,
    principal: PrincipalDep,
    format_: Annotated[ExportFormat, Query(alias="format")] = "csv",
    fields: Annotated[
        list[str] | None,
        Query(description="columns to keep, in order: repeat or comma-separate (url,price)"),
    ] = None,
    status_: Annotated[
        StatusFilter, Query(alias="status", description="pages fetched ok, failed, or all")
    ] = "all",
    bom: Annotated[bool, Query(description="CSV only: start with a UTF-8 BOM")] = False,
) -> ExportResponse:
    """One consistent snapshot of the job's stored pages (it may still be running).

    CSV/XLSX columns: url, final_url, status_code, ok, depth, fetched_at, error, then one
    per extract field (alphabetical); lists are JSON text in a cell. JSONL: one page
    object per line; JSON: one array of them. Another tenant's job is a 404.
    """
    request = ExportRequest(
        format=format_,
        fields=export_service.parse_fields(fields),
        status=status_,
        bom=bom,
    )
    export = await export_service.open_export(db, principal.tenant, job_id, request)
    return ExportResponse(export)
