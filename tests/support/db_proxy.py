"""A TCP proxy a test owns between the app and PostgreSQL, to cut the database away.

Cuts:
- refuse: every proxied connection is dropped and nothing listens any more (server gone);
- blackhole: every proxied connection is dropped; new ones are accepted and never get a
  byte back (a dead host, a firewall that drops packets);
- freeze: open connections stay open but stop carrying data, new ones are black-holed
  (a network partition): the nastiest, as nothing ever fails on its own.

The shared PostgreSQL itself is never stopped: only the path to it is.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Literal

from sqlalchemy.engine import make_url

Cut = Literal["refuse", "blackhole", "freeze"]
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Proxy:
    """Forwards 127.0.0.1:<port> to the database server; can be cut and restored."""

    def __init__(self, open_upstream: Callable[[], Awaitable[Streams]]) -> None:
        self._open_upstream = open_upstream
        self.mode: Cut | Literal["up"] = "up"
        self.port = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self, mode: Cut) -> None:
        self.mode = mode
        if mode == "freeze":
            return  # the pipes stop forwarding; nothing is closed
        self._drop_all()
        if mode == "refuse" and self._server is not None:
            # nothing listens on the port any more: connects get RST (ECONNREFUSED)
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def restore(self) -> None:
        self.mode = "up"
        self._drop_all()  # the black-holed connections, so clients see them fail
        if self._server is None:
            await self.start()  # same port: the app's URL does not change

    async def close(self) -> None:
        self._drop_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def _drop_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                if self.mode == "up":
                    sink.write(data)
                    await sink.drain()
        except OSError:
            pass  # a reset on either side ends this direction; the other one follows
        finally:
            sink.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            if self.mode != "up":
                # accept and swallow: the client waits for an answer that never comes
                while await reader.read(65536):
                    pass
                return
            up_reader, upstream = await self._open_upstream()
            self._writers.add(upstream)
            await asyncio.gather(self._pipe(reader, upstream), self._pipe(up_reader, writer))
        except OSError:
            return  # the upstream refused or a side reset: the client sees its socket close
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()


def upstream_opener(server_url: str) -> Callable[[], Awaitable[Streams]]:
    url = make_url(server_url)
    socket_dir = url.query.get("host")
    if isinstance(socket_dir, str) and socket_dir.startswith("/"):
        path = f"{socket_dir}/.s.PGSQL.{url.port or 5432}"  # embedded test server

        async def _unix() -> Streams:
            return await asyncio.open_unix_connection(path)

        return _unix
    host, port = url.host or "127.0.0.1", url.port or 5432

    async def _tcp() -> Streams:
        return await asyncio.open_connection(host, port)

    return _tcp


def proxied_url(db_url: str, port: int) -> str:
    """``db_url`` (same database, user, password) reached through 127.0.0.1:``port``."""
    return (
        make_url(db_url)
        .set(host="127.0.0.1", port=port)
        .difference_update_query(["host"])
        .render_as_string(hide_password=False)
    )


_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104


class LostReplyProxy(Proxy):
    """A proxy that loses one reply: the COMMIT of a transaction that ran a statement
    matching ``marker`` (a regex over the SQL text of the client's Parse/Query messages),
    or the Sync of such a statement run outside BEGIN (it commits on its own), reaches the
    server, then the connection drops before the answer reaches the client.

    The server has committed; the client cannot know it (the classic ambiguous commit). It
    reads the PostgreSQL wire protocol of client -> server traffic to find that COMMIT, so
    it answers SSL requests with "no" itself: the stream stays readable.
    """

    def __init__(self, open_upstream: Callable[[], Awaitable[Streams]], marker: bytes) -> None:
        super().__init__(open_upstream)
        self._marker = re.compile(marker, re.I | re.S)
        self.armed = False
        self.tripped = asyncio.Event()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode != "up":
            await super()._accept(reader, writer)
            return
        self.accepted += 1
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        lost = asyncio.Event()
        try:
            up_reader, upstream = await self._open_upstream()
            self._writers.add(upstream)
            await asyncio.gather(
                self._client_to_server(reader, writer, upstream, lost),
                self._server_to_client(up_reader, writer, lost),
            )
        except OSError:
            return
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()

    async def _lose(self, out: bytearray, sink: asyncio.StreamWriter, lost: asyncio.Event) -> None:
        self.armed = False
        lost.set()
        sink.write(out)  # the commit (COMMIT, or the Sync of a lone statement) reaches the
        await sink.drain()  # server ...
        await asyncio.sleep(0.5)  # ... and is carried out
        self.tripped.set()  # ... but its answer never comes back

    async def _server_to_client(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, lost: asyncio.Event
    ) -> None:
        try:
            while data := await source.read(65536):
                if lost.is_set():
                    return  # the answer to the COMMIT, and anything after it, is lost
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            sink.transport.abort()

    async def _client_to_server(
        self,
        source: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        sink: asyncio.StreamWriter,
        lost: asyncio.Event,
    ) -> None:
        buffer = bytearray()
        startup = True
        marked: set[bytes] = set()  # prepared statements whose SQL matches the marker
        in_marked_transaction = False
        explicit = False  # inside BEGIN ... COMMIT (else a statement commits at its Sync)
        try:
            while data := await source.read(65536):
                buffer += data
                out = bytearray()
                while True:
                    if startup:  # untyped: SSLRequest / GSSENCRequest / StartupMessage
                        if len(buffer) < 8:
                            break
                        length = int.from_bytes(buffer[:4], "big")
                        if len(buffer) < length:
                            break
                        code = int.from_bytes(buffer[4:8], "big")
                        message = bytes(buffer[:length])
                        del buffer[:length]
                        if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                            client.write(b"N")  # no encryption: keep it parseable
                            await client.drain()
                            continue
                        out += message
                        startup = False
                        continue
                    if len(buffer) < 5:
                        break
                    length = int.from_bytes(buffer[1:5], "big")
                    if len(buffer) < 1 + length:
                        break
                    message = bytes(buffer[: 1 + length])
                    del buffer[: 1 + length]
                    out += message
                    kind, body = message[:1], message[5:]
                    if kind == b"P":  # Parse: name, query
                        name, _, rest = body.partition(b"\0")
                        if self._marker.search(rest.partition(b"\0")[0]):
                            marked.add(name)
                            in_marked_transaction = True
                    elif kind == b"B":  # Bind: portal, statement
                        statement = body.partition(b"\0")[2].partition(b"\0")[0]
                        if statement in marked:
                            in_marked_transaction = True
                    elif kind == b"S" and in_marked_transaction and not explicit:
                        # Sync after a marked statement outside BEGIN: it commits now
                        if self.armed:
                            await self._lose(out, sink, lost)
                            return
                        in_marked_transaction = False
                    elif kind == b"Q":  # simple query
                        query = body.rstrip(b"\0").strip().upper()
                        if query.startswith((b"BEGIN", b"START")):
                            explicit = True
                        if self._marker.search(body):
                            in_marked_transaction = True
                        elif query.startswith((b"COMMIT", b"END")):
                            explicit = False
                            if in_marked_transaction and self.armed:
                                await self._lose(out, sink, lost)
                                return
                            in_marked_transaction = False
                        elif query.startswith((b"ROLLBACK", b"ABORT")):
                            explicit = False
                            in_marked_transaction = False
                if out:
                    sink.write(out)
                    await sink.drain()
        except OSError:
            pass
        finally:
            sink.transport.abort()
            client.transport.abort()
