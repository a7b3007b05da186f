"""Webhook routes: a job's delivery log, and redelivery of one event."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path, status

from app.api.deps import PageParamsDep, PrincipalDep, SessionDep
from app.api.routes.common import API_PREFIX, decode_page_cursor, encode_page_cursor
from app.api.schemas import WebhookDeliveryPublic, WebhookLogPublic
from app.services import webhooks

router = APIRouter(prefix=f"{API_PREFIX}/jobs", tags=["webhooks"])

# a bigint: a larger number overflowed the query parameter (a 500)
DeliveryId = Annotated[int, Path(ge=1, le=2**63 - 1)]


@router.get("/{job_id}/webhooks", response_model=WebhookLogPublic)
async def delivery_log(
    job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep, page: PageParamsDep
) -> WebhookLogPublic:
    """The job's webhook (no secret, header names only) and its deliveries, newest first."""
    before = decode_page_cursor(page.cursor) or None
    hook, items, last = await webhooks.delivery_log(
        await session.connection(), principal.tenant, job_id, limit=page.limit, before=before
    )
    return WebhookLogPublic(webhook=hook, items=items, next_cursor=encode_page_cursor(last))


@router.post(
    "/{job_id}/webhooks/{delivery_id}/redeliver",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=WebhookDeliveryPublic,
)
async def redeliver(
    job_id: uuid.UUID, delivery_id: DeliveryId, session: SessionDep, principal: PrincipalDep
) -> WebhookDeliveryPublic:
    """Send a delivered or failed event again (same event id); 409 while it is pending."""
    return await webhooks.redeliver(
        await session.connection(), principal.tenant, job_id, delivery_id
    )
