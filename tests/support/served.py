"""Base of the local test sites: an aiohttp app on 127.0.0.1 with a shutdown signal."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Self

from aiohttp import web


class ServedSite:
    def __init__(self) -> None:
        self.app = web.Application()
        self.base = ""
        self._closing = asyncio.Event()

    async def _sleep(self, seconds: float) -> None:
        # ends early when the site shuts down, so teardown never waits on a "slow" page
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[Self]:
        runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            yield self
        finally:
            self._closing.set()
            await runner.cleanup()

    def url(self, path: str) -> str:
        return self.base + path
