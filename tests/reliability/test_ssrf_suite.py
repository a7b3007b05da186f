"""Scenario 7: SSRF. Every spelling of a private target, directly and behind an open redirect.

A listener records every connection to one port on 0.0.0.0 and [::1]; each local target
points at that port. A control run with the guard off shows that every local target really
reaches the listener; with the guard on (the default) nothing may.

Promise: all refused by default, at submission (422, nothing stored) or at fetch (the page
fails with a "blocked" error), and nothing is connected.
"""

from __future__ import annotations

import asyncio
import re
import socket
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlencode

import httpx
import pytest
from aiohttp import web

from app.database.connection import ConnectionManager
from app.main import create_app
from app.scraper.fetch import Fetcher
from app.scraper.ssrf import BlockedTarget, SSRFGuard
from tests.conftest import make_settings
from tests.integration.conftest import Headers
from tests.support.jobs import create_job, pages_of, scalar, wait_terminal
from tests.support.listener import ConnectionRecorder, recording_listener
from tests.support.servers import LocalServer, serve
from tests.support.workers import worker_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

GUARD = SSRFGuard()


def private_hostname() -> str | None:
    """A host name (not localhost & co, which are refused by name) that resolves only to
    blocked addresses on this machine: the machine's own name usually does."""
    name = socket.gethostname()
    try:
        infos = socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)
    except OSError:
        return None
    addresses = {str(info[4][0]) for info in infos}
    if not addresses or not all(GUARD.is_blocked_ip(a) for a in addresses):
        return None
    try:
        GUARD.check_url(f"http://{name}/")
    except BlockedTarget:
        return None  # refused by its name already: not the case this is for
    return name


HOSTNAME = private_hostname()


def local_targets(port: int) -> list[str]:
    """Targets that reach the recording listener when nothing stops them."""
    targets = [
        f"http://127.0.0.1:{port}/",
        f"http://localhost:{port}/",
        f"http://[::1]:{port}/",
        f"http://0.0.0.0:{port}/",
        f"http://2130706433:{port}/",
        f"http://0x7f000001:{port}/",
        f"http://[::ffff:127.0.0.1]:{port}/",
    ]
    if HOSTNAME is not None:
        targets.append(f"http://{HOSTNAME}:{port}/")
    return targets


def remote_targets(port: int) -> list[str]:
    """Private and metadata addresses that are not on this machine (nothing to record:
    they must be refused before any connection is tried)."""
    return [
        "http://169.254.169.254/latest/meta-data/",
        f"http://10.0.0.1:{port}/",
        f"http://172.16.0.1:{port}/",
        f"http://192.168.0.1:{port}/",
    ]


@pytest.fixture
async def listener() -> AsyncIterator[ConnectionRecorder]:
    async with recording_listener() as recorder:
        yield recorder


@pytest.fixture
async def guarded_api(db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The API with the production default: the SSRF guard on, no allow-list."""
    application = create_app(make_settings(db_url, allow_private_networks=False), migrate=False)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://trawler.test") as c:
            yield c


def non_canonical(url: str) -> bool:
    """The decimal-integer IPv4 host: the HTTP client (yarl) itself refuses it as an
    invalid URL. (It takes the hex form 0x7f000001 as a host name, which resolves.)"""
    return "//2130706433:" in url


def refusal(url: str) -> str:
    """What the page's error must say for ``url``."""
    return "blocked target|invalid URL|invalid request" if non_canonical(url) else "blocked target"


async def _control(listener: ConnectionRecorder) -> None:
    """With the guard off every local target connects (the listener sees each one), except
    the decimal-integer form, which the HTTP client refuses whatever the guard says."""
    async with Fetcher(guard=SSRFGuard(allow_private=True), total_timeout=3.0) as fetcher:
        for url in local_targets(listener.port):
            before = len(listener.connections)
            result = await fetcher.fetch(url)
            if non_canonical(url):
                assert result.error_kind == "invalid", (url, result.error)
                continue
            assert result.ok and result.text == "reachable", (url, result.error)
            assert len(listener.connections) == before + 1, url
    listener.clear()


async def test_refused_at_submission_and_nothing_stored(
    guarded_api: httpx.AsyncClient,
    db: ConnectionManager,
    headers: Headers,
    listener: ConnectionRecorder,
) -> None:
    await _control(listener)
    accepted = []
    for url in local_targets(listener.port) + remote_targets(listener.port):
        for path, body in (
            ("/api/v1/scrape", {"urls": [url]}),
            ("/api/v1/crawl", {"seeds": [url]}),
        ):
            response = await guarded_api.post(path, headers=headers, json=body)
            if HOSTNAME is not None and f"//{HOSTNAME}:" in url:
                # a name is only known to be private once resolved: refused at fetch
                assert response.status_code == 202, response.text
                accepted.append(uuid.UUID(response.json()["id"]))
                continue
            assert response.status_code == 422, (url, response.text)
            assert "not allowed" in response.json()["detail"], response.text
    assert await scalar(db, "SELECT count(*) FROM jobs") == len(accepted)
    assert await scalar(db, "SELECT count(*) FROM tasks") == len(accepted)
    assert listener.connections == []


async def test_refused_at_fetch_by_default_and_nothing_connected(
    db_url: str, db: ConnectionManager, listener: ConnectionRecorder
) -> None:
    """Jobs that reached the queue anyway (an API with another guard, a direct insert) are
    refused by a worker with the default guard."""
    await _control(listener)
    targets = local_targets(listener.port) + remote_targets(listener.port)
    job_id = await create_job(db, targets, max_attempts=1, options={"timeout_s": 3})
    async with worker_process(db_url, TRAWLER_ALLOW_PRIVATE_NETWORKS="false"):
        row = await wait_terminal(db, job_id, timeout=30)
    assert row["status"] == "failed" and row["failed"] == len(targets), row
    pages = {p["url"]: p for p in await pages_of(db, job_id)}
    assert len(pages) == len(targets)
    for page in pages.values():
        assert not page["ok"]
        assert re.search(refusal(page["url"]), page["error"] or ""), (page["url"], page["error"])
        assert page["status_code"] is None
    assert listener.connections == [], listener.connections
    print(
        f"\n[ssrf at fetch] {len(targets)} targets refused, 0 connections: "
        + ", ".join(f"{p['url']} -> {p['error'].split(': ', 1)[-1]}" for p in pages.values())
    )


async def test_open_redirects_to_private_targets_are_refused(
    db_url: str, db: ConnectionManager, listener: ConnectionRecorder
) -> None:
    """A "public" page (127.0.0.2, the only allow-listed address) redirects to each private
    target; the hop is refused and nothing is connected."""
    await _control(listener)

    async def to_target(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": request.query["target"]})

    targets = local_targets(listener.port) + remote_targets(listener.port)
    redirector: LocalServer
    async with serve({"/to": to_target}, host="127.0.0.2") as redirector:
        starts = [redirector.url("/to?" + urlencode({"target": t})) for t in targets]
        job_id = await create_job(db, starts, max_attempts=1, options={"timeout_s": 3})
        async with worker_process(
            db_url,
            TRAWLER_ALLOW_PRIVATE_NETWORKS="false",
            TRAWLER_ALLOWED_CIDRS='["127.0.0.2/32"]',
        ):
            row = await wait_terminal(db, job_id, timeout=30)
        assert redirector.requests == len(targets), "every redirect was followed to its hop"
    assert row["status"] == "failed" and row["failed"] == len(targets), row
    pages = {p["url"]: p for p in await pages_of(db, job_id)}
    for start, target in zip(starts, targets, strict=True):
        page = pages[start]
        assert not page["ok"]
        assert page["status_code"] == 302, page  # the redirect arrived; its hop was refused
        assert re.search(refusal(target), page["error"] or ""), (target, page["error"])
    assert listener.connections == [], listener.connections
    print(
        f"\n[ssrf via open redirect] {len(targets)} redirects to private targets refused at "
        "the hop (page status 302, error 'blocked target'), 0 connections"
    )


async def test_the_listener_sees_a_plain_connection(listener: ConnectionRecorder) -> None:
    """The proof's own control: a connection to the port is recorded (v4 and v6)."""
    for host in ("127.0.0.1", "::1"):
        _, writer = await asyncio.open_connection(host, listener.port)
        writer.close()
        await writer.wait_closed()
    await asyncio.sleep(0.05)
    assert {local for local, _ in listener.connections} == {"127.0.0.1", "::1"}
