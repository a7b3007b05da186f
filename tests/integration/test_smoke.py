"""Smoke: the app starts on a migrated database and answers its probes."""

import httpx

from app.database.migrations import head_revision


async def test_ready_and_live(client: httpx.AsyncClient) -> None:
    live = await client.get("/health/live")
    assert live.status_code == 200
    ready = await client.get("/health/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["revision"] == head_revision()
