"""A real local webhook receiver: records every delivery attempt, can fail the first ones."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from tests.support.served import ServedSite


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float
    answered: int

    @property
    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = orjson.loads(self.body)
        return value

    @property
    def event(self) -> str:
        return self.headers.get("Trawler-Event", "")


class WebhookReceiver(ServedSite):
    """POST /hook answers 503 to the first `fail_first` requests, then 204."""

    def __init__(self, fail_first: int = 0) -> None:
        super().__init__()
        self.fail_first = fail_first
        self.received: list[Received] = []
        self._changed = asyncio.Event()
        self.app.router.add_post("/hook", self.hook)

    @property
    def hook_url(self) -> str:
        return self.url("/hook")

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = 503 if len(self.received) < self.fail_first else 204
        self.received.append(Received(dict(request.headers), body, time.monotonic(), status))
        self._changed.set()
        if status == 503:
            return web.Response(status=503, text="receiver down")
        return web.Response(status=204)

    def accepted(self, event: str | None = None) -> list[Received]:
        return [
            r for r in self.received if r.answered == 204 and (event is None or r.event == event)
        ]

    async def wait_for(self, predicate: Any, timeout: float = 20.0) -> None:
        """Until predicate(self) holds; fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"receiver condition not met after {timeout}s; got "
                    f"{[(r.event, r.answered) for r in self.received]}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
