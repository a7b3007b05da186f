"""Real aiohttp.web servers (and bare TCP ones) on loopback addresses, observing what they serve."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class LocalServer:
    """A started server plus what it observed: requests served and distinct client sockets."""

    host: str
    port: int = 0
    requests: int = 0
    peers: set[tuple[str, int]] = field(default_factory=set)
    paths: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    @property
    def connections(self) -> int:
        return len(self.peers)


@asynccontextmanager
async def serve(routes: dict[str, Handler], host: str = "127.0.0.1") -> AsyncIterator[LocalServer]:
    """Run ``routes`` (path -> handler, GET and HEAD) on ``host`` with an ephemeral port."""
    server = LocalServer(host=host)

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        server.requests += 1
        server.paths.append(request.path_qs)
        transport = request.transport
        if transport is not None:
            peer = transport.get_extra_info("peername")
            if peer is not None:
                server.peers.add((str(peer[0]), int(peer[1])))
        return await handler(request)

    app = web.Application(middlewares=[observe])
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    # handler_cancellation: slow handlers stop when the client goes away, so cleanup is quick.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    server.port = int(runner.addresses[0][1])
    try:
        yield server
    finally:
        await runner.cleanup()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serve_raw(handler: RawHandler, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """A bare TCP server for responses no HTTP framework would send; yields its base URL."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        finally:
            writer.close()
            # The client may have hung up first: there is nothing left to flush then.
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(guarded, host, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.close()
        await server.wait_closed()
