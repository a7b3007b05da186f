"""The dashboard at /ui through the ASGI app: signing in and out, CSRF, tenancy, the
operations view, the submit form, the progress stream and exports, a database outage,
and the throughput figures. (The browser tests are in tests/e2e/test_ui_browser.py.)"""

from __future__ import annotations

import csv
import io
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import orjson
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.database.connection import ConnectionManager
from app.main import create_app
from app.services import apikeys
from app.ui.throughput import pages_per_minute
from tests.conftest import make_settings
from tests.integration.conftest import Count, Headers, SqlRun, make_key
from tests.integration.test_api_jobs import settle, submit, urls
from tests.support.db_proxy import Proxy, proxied_url, upstream_opener

UI = "/ui"
JOBS = "/api/v1/jobs"

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_LOGIN_TOKEN = re.compile(r'name="login_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    match = _CSRF.search(html)
    assert match, "no CSRF token in the page"
    return match.group(1)


async def login_token(client: httpx.AsyncClient) -> str:
    response = await client.get(f"{UI}/login")
    assert response.status_code == 200
    match = _LOGIN_TOKEN.search(response.text)
    assert match
    return match.group(1)


async def sign_in(client: httpx.AsyncClient, key: str) -> str:
    """Sign in through the form; returns the session's CSRF token."""
    token = await login_token(client)
    response = await client.post(
        f"{UI}/login", data={"api_key": key, "login_token": token, "next": f"{UI}/jobs"}
    )
    assert response.status_code == 303, response.text
    page = await client.get(f"{UI}/jobs")
    assert page.status_code == 200
    return csrf_of(page.text)


def set_cookie_headers(response: httpx.Response, name: str) -> list[str]:
    return [h for h in response.headers.get_list("set-cookie") if h.startswith(f"{name}=")]


async def new_client(app: FastAPI) -> httpx.AsyncClient:
    """A second browser: its own cookie jar."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://trawler.test")


# --------------------------------------------------------------------------------------
# signing in and out


async def test_sign_in_and_out(client: httpx.AsyncClient, api_key: str) -> None:
    # not signed in: every page sends to the sign-in form and back
    response = await client.get(f"{UI}/jobs?status=active")
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/login?next=%2Fui%2Fjobs%3Fstatus%3Dactive"
    assert (await client.get(UI)).headers["location"] == "/ui/jobs"

    form = await client.get(f"{UI}/login")
    assert form.status_code == 200
    assert '<label for="api-key">API key</label>' in form.text
    assert "<main" in form.text and 'lang="en"' in form.text
    assert "script-src 'self'" in form.headers["content-security-policy"]
    [login_cookie] = set_cookie_headers(form, "trawler_login")
    assert "HttpOnly" in login_cookie and "SameSite=strict" in login_cookie
    assert "Path=/ui" in login_cookie

    token = _LOGIN_TOKEN.search(form.text)
    assert token
    response = await client.post(
        f"{UI}/login",
        data={"api_key": api_key, "login_token": token.group(1), "next": "/ui/jobs?status=active"},
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/jobs?status=active"
    [session_cookie] = set_cookie_headers(response, "trawler_session")
    for attribute in ("HttpOnly", "SameSite=strict", "Path=/ui", "Max-Age=28800"):
        assert attribute in session_cookie
    assert "Secure" not in session_cookie  # plain http here; https requests get Secure

    page = await client.get(f"{UI}/jobs")
    assert page.status_code == 200
    assert "tenant-a" in page.text and "Signed in." in page.text
    assert 'href="/ui/ops"' not in page.text  # a user key has no operations view
    assert page.headers["cache-control"] == "no-store"
    # the flash message shows once
    assert "Signed in." not in (await client.get(f"{UI}/jobs")).text

    # signed in, the sign-in page goes straight on
    again = await client.get(f"{UI}/login?next=/ui/jobs/new")
    assert again.status_code == 303 and again.headers["location"] == "/ui/jobs/new"

    response = await client.post(f"{UI}/logout", data={"csrf_token": csrf_of(page.text)})
    assert response.status_code == 303 and response.headers["location"] == "/ui/login"
    [cleared] = set_cookie_headers(response, "trawler_session")
    assert "Max-Age=0" in cleared
    assert (await client.get(f"{UI}/jobs")).status_code == 303


@pytest.mark.parametrize(
    ("next_url", "lands_on"),
    [
        ("/ui/jobs/new?kind=scrape", "/ui/jobs/new?kind=scrape"),
        ("https://evil.example/ui/jobs", "/ui/jobs"),
        ("//evil.example/ui", "/ui/jobs"),
        ("/ui//evil.example", "/ui/jobs"),
        ("/api/v1/jobs", "/ui/jobs"),
        ("/ui\\@evil.example", "/ui/jobs"),
    ],
)
async def test_sign_in_returns_only_to_dashboard_pages(
    client: httpx.AsyncClient, api_key: str, next_url: str, lands_on: str
) -> None:
    token = await login_token(client)
    response = await client.post(
        f"{UI}/login", data={"api_key": api_key, "login_token": token, "next": next_url}
    )
    assert response.status_code == 303
    assert response.headers["location"] == lands_on


async def test_wrong_key_is_refused(client: httpx.AsyncClient, api_key: str) -> None:
    unknown = "trw_AAAAAAAA_" + "b" * 40
    for key, status in ((unknown, 401), (api_key + "x", 401), ("not a key", 401), ("", 422)):
        token = await login_token(client)
        response = await client.post(f"{UI}/login", data={"api_key": key, "login_token": token})
        assert response.status_code == status, key
        assert not set_cookie_headers(response, "trawler_session")
        assert 'aria-invalid="true"' in response.text and 'role="alert"' in response.text
        if status == 401:
            assert "not valid, or it was revoked" in response.text
        assert (await client.get(f"{UI}/jobs")).status_code == 303

    # a forged or mangled session cookie opens nothing either
    for value in (f"nonce.{unknown}", "garbage", "." + api_key, "x" * 400):
        client.cookies.set("trawler_session", value, domain="trawler.test", path="/ui")
        response = await client.get(f"{UI}/jobs")
        assert response.status_code == 303
        assert response.headers["location"].startswith("/ui/login")
        client.cookies.clear()


async def test_revoked_key_is_signed_out_at_once(
    client: httpx.AsyncClient, db: ConnectionManager
) -> None:
    key = await make_key(db, "soon-revoked")
    await sign_in(client, key)
    assert (await client.get(f"{UI}/jobs")).status_code == 200
    prefix = apikeys.parse_prefix(key)
    async with db.session() as session:
        rows = await apikeys.list_keys(session)
        [row] = [r for r in rows if r.prefix == prefix]
        await apikeys.revoke_key(session, row.id)
    response = await client.get(f"{UI}/jobs")
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/login?next=%2Fui%2Fjobs&expired=1"
    [cleared] = set_cookie_headers(response, "trawler_session")
    assert "Max-Age=0" in cleared
    # htmx polls get a 401 that sends the page to the sign-in form
    client.cookies.set("trawler_session", f"n.{key}", domain="trawler.test", path="/ui")
    poll = await client.get(f"{UI}/jobs/rows", headers={"HX-Request": "true"})
    assert poll.status_code == 401 and poll.headers["hx-redirect"].startswith("/ui/login")


# --------------------------------------------------------------------------------------
# CSRF


async def test_posts_without_this_sessions_token_are_refused(
    app: FastAPI,
    client: httpx.AsyncClient,
    api_key: str,
    auth_headers: Headers,
    count: Count,
) -> None:
    job = await submit(client, auth_headers, urls(2))
    cancel = f"{UI}/jobs/{job['id']}/cancel"
    csrf = await sign_in(client, api_key)

    async def status() -> str:
        response = await client.get(f"{JOBS}/{job['id']}", headers=auth_headers)
        return str(response.json()["status"])

    refused = [
        ({}, {}),
        ({"csrf_token": ""}, {}),
        ({"csrf_token": csrf[:-2] + "xx"}, {}),
        ({"csrf_token": csrf}, {"Origin": "https://evil.example"}),
        ({"csrf_token": csrf}, {"Origin": "null"}),
        ({"csrf_token": csrf}, {"Sec-Fetch-Site": "cross-site"}),
        ({"csrf_token": csrf}, {"Sec-Fetch-Site": "same-site"}),
    ]
    for data, headers in refused:
        response = await client.post(cancel, data=data, headers=headers)
        assert response.status_code == 403, (data, headers)
        assert "text/html" in response.headers["content-type"]
        assert await status() == "queued"

    # a token of another session of the same key is no good either
    async with await new_client(app) as other:
        other_csrf = await sign_in(other, api_key)
    assert other_csrf != csrf
    assert (await client.post(cancel, data={"csrf_token": other_csrf})).status_code == 403
    assert await status() == "queued"

    # nor for the submit form: nothing is created
    before = await count("jobs")
    response = await client.post(
        f"{UI}/jobs/new", data={"kind": "scrape", "urls": "https://a.example/x"}
    )
    assert response.status_code == 403
    assert await count("jobs") == before

    # the sign-in form needs the token set with it (no login CSRF)
    async with await new_client(app) as fresh:
        response = await fresh.post(f"{UI}/login", data={"api_key": api_key, "login_token": "x"})
        assert response.status_code == 403
        assert not set_cookie_headers(response, "trawler_session")

    # the real thing, from our own origin
    response = await client.post(
        cancel,
        data={"csrf_token": csrf},
        headers={"Origin": "http://trawler.test", "Sec-Fetch-Site": "same-origin"},
    )
    assert response.status_code == 303
    assert response.headers["location"] == f"/ui/jobs/{job['id']}"
    assert await status() == "cancelled"
    assert "Job cancelled." in (await client.get(response.headers["location"])).text


# --------------------------------------------------------------------------------------
# tenancy


async def test_a_tenant_sees_only_its_own_jobs(
    client: httpx.AsyncClient,
    api_key: str,
    auth_headers: Headers,
    other_headers: Headers,
    db: ConnectionManager,
) -> None:
    mine = await submit(client, auth_headers, ["https://mine.example/1"])
    theirs = await submit(client, other_headers, ["https://theirs.example/1"])
    await settle(db, theirs["id"], {"https://theirs.example/1": "succeeded"})
    csrf = await sign_in(client, api_key)

    listing = await client.get(f"{UI}/jobs")
    assert mine["id"] in listing.text and theirs["id"] not in listing.text
    for status in ("all", "active", "completed"):
        page = await client.get(f"{UI}/jobs?status={status}")
        assert theirs["id"][:8] not in page.text

    base = f"{UI}/jobs/{theirs['id']}"
    for path in ("", "/state", "/pages", "/events", "/export?format=csv", "/export?format=xlsx"):
        response = await client.get(base + path)
        assert response.status_code == 404, path
        assert "text/html" in response.headers["content-type"]
    for action in ("cancel", "retry", "resume", "delete"):
        response = await client.post(f"{base}/{action}", data={"csrf_token": csrf})
        assert response.status_code == 404, action
    still = await client.get(f"{JOBS}/{theirs['id']}", headers=other_headers)
    assert still.status_code == 200 and still.json()["status"] == "completed"

    # and its own job opens
    own = await client.get(f"{UI}/jobs/{mine['id']}")
    assert own.status_code == 200 and mine["id"] in own.text


async def test_malformed_ids_and_parameters_are_pages_not_crashes(
    client: httpx.AsyncClient, api_key: str
) -> None:
    await sign_in(client, api_key)
    missing = await client.get(f"{UI}/jobs/not-a-uuid")
    assert missing.status_code == 404 and "There is no such page." in missing.text
    unknown = await client.get(f"{UI}/jobs/{uuid.uuid4()}")
    assert unknown.status_code == 404 and "not found" in unknown.text
    bad_filter = await client.get(f"{UI}/jobs?status=exploded")
    assert bad_filter.status_code == 422 and "text/html" in bad_filter.headers["content-type"]
    bad_cursor = await client.get(f"{UI}/jobs?cursor=!!!")
    assert bad_cursor.status_code == 422 and "invalid cursor" in bad_cursor.text


# --------------------------------------------------------------------------------------
# the operations view


async def test_operations_view_needs_an_admin_key(
    app: FastAPI, client: httpx.AsyncClient, api_key: str, db: ConnectionManager, sql: SqlRun
) -> None:
    csrf = await sign_in(client, api_key)
    for path in (f"{UI}/ops", f"{UI}/ops/panels"):
        response = await client.get(path)
        assert response.status_code == 403
        assert "needs an admin API key" in response.text
    response = await client.post(f"{UI}/ops/pause", data={"csrf_token": csrf})
    assert response.status_code == 403
    assert (await sql("SELECT paused FROM cluster_state"))[0][0] is False

    admin_key = await make_key(db, "ops", admin=True)
    async with await new_client(app) as browser:
        admin_csrf = await sign_in(browser, admin_key)
        view = await browser.get(f"{UI}/ops")
        assert view.status_code == 200
        for text in ("Queue", "Connection pool", "Throughput", "Workers", "<svg", "<meter"):
            assert text in view.text
        assert 'href="/ui/ops" aria-current="page"' in view.text
        assert "No worker is running" in view.text  # this app runs no executor
        assert (await browser.get(f"{UI}/ops/panels")).status_code == 200

        # pause and resume, audited like the admin API's
        response = await browser.post(f"{UI}/ops/pause", data={"csrf_token": admin_csrf})
        assert response.status_code == 303 and response.headers["location"] == "/ui/ops"
        assert (await sql("SELECT paused FROM cluster_state"))[0][0] is True
        paused = await browser.get(f"{UI}/ops")
        assert "Resume claiming" in paused.text and "Claiming paused" in paused.text
        response = await browser.post(f"{UI}/ops/resume", data={"csrf_token": admin_csrf})
        assert response.status_code == 303
        assert (await sql("SELECT paused FROM cluster_state"))[0][0] is False
        audit = await sql("SELECT action, ok FROM admin_audit ORDER BY id")
        assert [tuple(row) for row in audit] == [("queue.pause", True), ("queue.resume", True)]
        # without the token, nothing happens
        assert (await browser.post(f"{UI}/ops/pause", data={})).status_code == 403
        assert (await sql("SELECT paused FROM cluster_state"))[0][0] is False


# --------------------------------------------------------------------------------------
# the submit form


async def test_submit_form_shows_errors_inline_and_creates_nothing(
    client: httpx.AsyncClient, api_key: str, count: Count, auth_headers: Headers
) -> None:
    csrf = await sign_in(client, api_key)
    form = await client.get(f"{UI}/jobs/new")
    assert form.status_code == 200
    for label in ('for="urls"', 'for="f-0-selector"', 'for="max_depth"', 'for="kind-crawl"'):
        assert label in form.text

    bad = {
        "csrf_token": csrf,
        "kind": "crawl",
        "urls": "https://ok.example/\n\nftp://nope.example/\n",
        "f-0-name": "title",
        "f-0-engine": "css",
        "f-0-selector": "h1[",
        "f-0-value": "text",
        "f-1-name": "link",
        "f-1-engine": "xpath",
        "f-1-selector": "//a",
        "f-1-value": "attr",
        "f-1-attr": "",
        "max_depth": "500",
        "max_pages": "ten",
        "include": "([unclosed",
    }
    response = await client.post(f"{UI}/jobs/new", data=bad)
    assert response.status_code == 422
    page = response.text
    assert 'role="alert"' in page and "problems to fix" in page
    # each message sits under its input, which says it is invalid
    for name, message in (
        ("urls", "Line 3: Invalid URL"),
        ("f-0-selector", "Invalid CSS selector"),
        ("f-1-attr", "Name the attribute"),
    ):
        assert f'id="{name}-error"' in page, name
        error = re.search(rf'<p class="field-error" id="{name}-error">(.*?)</p>', page, re.S)
        assert error and message in error.group(1), (name, error and error.group(1))
        assert re.search(rf'id="{name}"[^>]*aria-invalid="true"', page), name
    # the schema's errors for the number fields and the regular expressions are placed too
    for name in ("max_depth", "max_pages", "include"):
        assert f'id="{name}-error"' in page, name
    assert "ftp://nope.example/" in page  # what was typed comes back
    assert await count("jobs") == 0

    # fixed: accepted, and the job carries what the form said
    good = {
        "csrf_token": csrf,
        "idempotency_key": str(uuid.uuid4()),
        "kind": "scrape",
        "urls": "https://ok.example/a\nhttps://ok.example/b\n",
        "f-0-name": "title",
        "f-0-engine": "css",
        "f-0-selector": "h1",
        "f-0-value": "text",
        "f-1-name": "links",
        "f-1-engine": "css",
        "f-1-selector": "a",
        "f-1-value": "attr",
        "f-1-attr": "href",
        "f-1-all": "on",
        "f-2-name": "",
        "f-2-selector": "",
        "max_attempts": "2",
    }
    response = await client.post(f"{UI}/jobs/new", data=good)
    assert response.status_code == 303
    job_id = response.headers["location"].rsplit("/", 1)[1]
    job = (await client.get(f"{JOBS}/{job_id}", headers=auth_headers)).json()
    assert job["kind"] == "scrape" and job["progress"]["total"] == 2
    assert job["spec"]["extract"] == {
        "title": {"css": "h1", "xpath": None, "builtin": None, "value": "text", "all": False},
        "links": {"css": "a", "xpath": None, "builtin": None, "value": "attr:href", "all": True},
    }
    # a double click posts the same form twice: still one job
    again = await client.post(f"{UI}/jobs/new", data=good)
    assert again.headers["location"] == response.headers["location"]
    assert await count("jobs") == 1
    detail = await client.get(response.headers["location"])
    assert "Job submitted." in detail.text and 'id="progress-text"' in detail.text


async def test_submit_refused_by_the_ssrf_guard_shows_why(
    guarded_settings: Settings, count: Count, db: ConnectionManager
) -> None:
    application = create_app(guarded_settings, migrate=False)
    key = await make_key(db, "guarded")
    async with (
        application.router.lifespan_context(application),
        await new_client(application) as browser,
    ):
        csrf = await sign_in(browser, key)
        response = await browser.post(
            f"{UI}/jobs/new",
            data={"csrf_token": csrf, "kind": "crawl", "urls": "http://127.0.0.1:9/"},
        )
    assert response.status_code == 422
    assert re.search(r'id="urls-error">[^<]*is not allowed', response.text)
    assert await count("jobs") == 0


# --------------------------------------------------------------------------------------
# a job's page, its actions, its stream and its exports


async def test_job_page_actions_stream_and_exports(
    client: httpx.AsyncClient, api_key: str, auth_headers: Headers, db: ConnectionManager
) -> None:
    target = urls(3, host="shop.example")
    job = await submit(
        client, auth_headers, target, extract={"title": {"css": "h1", "value": "text"}}
    )
    await settle(
        db, job["id"], {target[0]: "succeeded", target[1]: "succeeded", target[2]: "failed"}
    )
    csrf = await sign_in(client, api_key)
    base = f"{UI}/jobs/{job['id']}"

    page = await client.get(base)
    assert page.status_code == 200
    assert "3 of 3 pages done: 2 succeeded, 1 failed. Status: completed." in page.text
    assert 'aria-live="polite"' in page.text
    for fmt in ("csv", "jsonl", "json", "xlsx"):
        assert f'href="{base}/export?format={fmt}"' in page.text
    assert "HTTP 503" in page.text and 'class="row-error"' in page.text
    failed_only = await client.get(f"{base}?pages=error")
    assert target[2] in failed_only.text and target[0] not in failed_only.text
    assert "Retry failed pages" in page.text and "Cancel job" not in page.text

    csv_response = await client.get(f"{base}/export?format=csv")
    assert csv_response.status_code == 200
    assert csv_response.headers["content-type"].startswith("text/csv")
    assert "attachment" in csv_response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(csv_response.text)))
    assert sorted(r["url"] for r in rows) == sorted(target)
    assert {r["url"]: r["title"] for r in rows if r["ok"] == "true"} == {
        target[0]: "T",
        target[1]: "T",
    }
    lines = (await client.get(f"{base}/export?format=jsonl")).text.splitlines()
    assert len(lines) == 3 and all(orjson.loads(line)["url"] in target for line in lines)
    assert len(orjson.loads((await client.get(f"{base}/export?format=json")).content)) == 3
    xlsx = await client.get(f"{base}/export?format=xlsx")
    assert xlsx.status_code == 200 and xlsx.content[:2] == b"PK"
    errors_only = await client.get(f"{base}/export?format=csv&status=error")
    assert [r["url"] for r in csv.DictReader(io.StringIO(errors_only.text))] == [target[2]]
    assert (await client.get(f"{base}/export?format=pdf")).status_code == 422

    # the stream of a finished job: its state, then its end
    stream = await client.get(f"{base}/events")
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = re.findall(r"event: (\w+)\ndata: (.*)\n", stream.text)
    assert [name for name, _ in events] == ["progress", "status"]
    assert orjson.loads(events[-1][1])["status"] == "completed"

    # fragments polled by the page
    state = await client.get(f"{base}/state", headers={"HX-Request": "true"})
    assert state.status_code == 200 and state.text.startswith("<section")
    assert "<html" not in state.text

    # retry, then a refused action shows the page with the reason (409), changing nothing
    response = await client.post(f"{base}/retry", data={"csrf_token": csrf})
    assert response.status_code == 303
    retried = (await client.get(f"{JOBS}/{job['id']}", headers=auth_headers)).json()
    assert retried["status"] == "queued" and retried["progress"]["queued"] == 1
    response = await client.post(f"{base}/delete", data={"csrf_token": csrf})
    assert response.status_code == 409
    assert "cancel it before deleting it" in response.text and 'role="alert"' in response.text
    assert (await client.get(f"{JOBS}/{job['id']}", headers=auth_headers)).status_code == 200
    response = await client.post(f"{base}/resume", data={"csrf_token": csrf})
    assert response.status_code == 409

    # cancel, then delete
    assert (await client.post(f"{base}/cancel", data={"csrf_token": csrf})).status_code == 303
    response = await client.post(f"{base}/delete", data={"csrf_token": csrf})
    assert response.status_code == 303 and response.headers["location"] == "/ui/jobs"
    assert "Job deleted." in (await client.get("/ui/jobs")).text
    assert (await client.get(f"{JOBS}/{job['id']}", headers=auth_headers)).status_code == 404


async def test_jobs_list_pages_with_the_keyset_cursor(
    client: httpx.AsyncClient, api_key: str, auth_headers: Headers
) -> None:
    ids = [
        (await submit(client, auth_headers, [f"https://p.example/{i}"]))["id"] for i in range(27)
    ]
    await sign_in(client, api_key)
    first = await client.get(f"{UI}/jobs")
    shown = set(re.findall(r'href="/ui/jobs/([0-9a-f-]{36})"', first.text))
    assert shown == set(ids[-25:])
    # active jobs on the page: the rows poll themselves
    assert 'hx-trigger="every 2s"' in first.text
    older = re.search(r'rel="next" href="(/ui/jobs\?cursor=[^"]+)"', first.text)
    assert older
    second = await client.get(older.group(1).replace("&amp;", "&"))
    assert set(re.findall(r'href="/ui/jobs/([0-9a-f-]{36})"', second.text)) == set(ids[:2])
    assert 'rel="next"' not in second.text
    rows = await client.get(f"{UI}/jobs/rows", headers={"HX-Request": "true"})
    assert rows.text.startswith('<tbody id="job-rows"')
    assert len(re.findall(r"<tr>", rows.text)) == 25
    none_failed = await client.get(f"{UI}/jobs?status=failed")
    assert "No jobs with this status yet." in none_failed.text


# --------------------------------------------------------------------------------------
# a database outage


@pytest.fixture
async def proxy(pg_server: str) -> AsyncIterator[Proxy]:
    p = Proxy(upstream_opener(pg_server))
    await p.start()
    yield p
    await p.close()


async def test_database_outage_is_a_quick_friendly_page(
    db_url: str, proxy: Proxy, db: ConnectionManager
) -> None:
    settings = make_settings(
        proxied_url(db_url, proxy.port), pool_size=2, max_overflow=0, pool_timeout=1.0
    )
    application = create_app(settings, migrate=False)
    key = await make_key(db, "outage")
    async with (
        application.router.lifespan_context(application),
        await new_client(application) as browser,
    ):
        csrf = await sign_in(browser, key)
        await proxy.cut("refuse")
        submission = {"csrf_token": csrf, "kind": "scrape", "urls": "https://a.example/"}
        for method, path in (
            ("GET", f"{UI}/jobs"),
            ("GET", f"{UI}/jobs/{uuid.uuid4()}"),
            ("POST", f"{UI}/jobs/new"),
        ):
            started = time.perf_counter()
            if method == "GET":
                response = await browser.get(path)
            else:
                response = await browser.post(path, data=submission)
            elapsed = time.perf_counter() - started
            assert response.status_code == 503, (path, response.status_code)
            assert elapsed < 2.0, elapsed
            assert "text/html" in response.headers["content-type"]
            assert response.headers["retry-after"]
            assert "database is unavailable" in response.text
            assert "nothing was changed" in response.text
        await proxy.restore()
        assert (await browser.get(f"{UI}/jobs")).status_code == 200


# --------------------------------------------------------------------------------------
# throughput figures


async def test_pages_per_minute_of_the_last_hour(
    db: ConnectionManager, sql: SqlRun, client: httpx.AsyncClient, auth_headers: Headers
) -> None:
    job = await submit(client, auth_headers, urls(40, host="t.example"))
    # 40 pages stored oldest first (page ids grow with time, as when workers store them):
    # minutes before now (the current minute is 0), some older than the hour
    offsets = [90] * 6 + [60] * 4 + [59] * 2 + [30] * 13 + [2] * 3 + [1] * 7 + [0] * 5
    assert len(offsets) == 40
    await sql(
        """
        INSERT INTO pages (job_id, task_id, url, ok, fetched_at)
        SELECT t.job_id, t.id, t.url, (row_number() OVER (ORDER BY t.id)) % 4 <> 0,
               date_trunc('minute', now()) + interval '1 second'
                   - make_interval(mins => (CAST(:offsets AS int[]))[row_number() OVER (ORDER BY t.id)])
        FROM tasks t WHERE t.job_id = :id
        """,
        id=job["id"],
        offsets=offsets,
    )
    async with db.engine.connect() as conn:
        result = await pages_per_minute(conn)
    assert len(result.minutes) == 60
    now_minute = result.minutes[-1].start
    by_offset = {
        round((now_minute - m.start).total_seconds() / 60): m.total for m in result.minutes
    }
    assert by_offset[0] == 5 and by_offset[1] == 7 and by_offset[2] == 3
    assert by_offset[30] == 13 and by_offset[59] == 2
    assert result.total == 5 + 7 + 3 + 13 + 2  # the 60 and 90 minutes old ones are out
    assert result.peak is not None and result.peak.total == 13
    assert sum(m.failed for m in result.minutes) == len(
        [i for i, o in enumerate(offsets, 1) if o < 60 and i % 4 == 0]
    )
    assert all(m.start.tzinfo is not None for m in result.minutes)
    assert now_minute <= datetime.now(UTC)


async def test_pages_per_minute_without_pages(db: ConnectionManager) -> None:
    async with db.engine.connect() as conn:
        result = await pages_per_minute(conn)
    assert len(result.minutes) == 60 and result.total == 0 and result.peak is None


async def test_a_bearer_header_does_not_open_the_dashboard(
    client: httpx.AsyncClient, admin_headers: Headers
) -> None:
    """The dashboard takes only its session cookie (whose posts carry a CSRF token)."""
    response = await client.get(f"{UI}/ops", headers=admin_headers)
    assert response.status_code == 303 and response.headers["location"].startswith("/ui/login")
