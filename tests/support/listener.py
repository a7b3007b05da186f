"""A TCP listener that records every connection made to it: proof that nothing connected.

One port on 0.0.0.0 (every local IPv4 address: 127.0.0.0/8, the host's own addresses,
0.0.0.0) and the same port on [::1]. Each connection gets a minimal HTTP answer, so a fetch
that does get through ends at once instead of waiting for a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 9\r\n\r\nreachable"


@dataclass
class ConnectionRecorder:
    port: int = 0
    connections: list[tuple[str, str]] = field(default_factory=list)  # (local, peer) addresses

    def clear(self) -> None:
        self.connections.clear()


def _bind_pair() -> tuple[socket.socket, socket.socket]:
    """An IPv4 socket on 0.0.0.0 and an IPv6 one on ::1 with the same free port."""
    for _ in range(50):
        v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        v4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        v4.bind(("0.0.0.0", 0))
        port = v4.getsockname()[1]
        v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            v6.bind(("::1", port))
        except OSError:
            v4.close()
            v6.close()
            continue
        return v4, v6
    raise RuntimeError("no port free on both 0.0.0.0 and ::1")


@asynccontextmanager
async def recording_listener() -> AsyncIterator[ConnectionRecorder]:
    recorder = ConnectionRecorder()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        local = writer.get_extra_info("sockname")
        peer = writer.get_extra_info("peername")
        recorder.connections.append((str(local[0]), str(peer[0])))
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
            writer.write(_ANSWER)
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    v4, v6 = _bind_pair()
    recorder.port = v4.getsockname()[1]
    servers = [await asyncio.start_server(accept, sock=sock) for sock in (v4, v6)]
    try:
        yield recorder
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
