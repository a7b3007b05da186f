"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright, against
uvicorn serving the app with its executor in this process (as `trawler serve` does), and
local sites to crawl.

Sign in, submit a crawl from the form and watch it finish live, download its CSV, cancel
a running crawl, and the operations view (as an admin, at phone width, in dark mode). Every
page must load without a script error or a Content-Security-Policy violation.

Screenshots for docs/screenshots/ are made only with TRAWLER_SCREENSHOTS=1 (test_screenshots):
a normal test run writes nothing into the repository.
"""

from __future__ import annotations

import asyncio
import csv
import os
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn
from playwright.async_api import Browser, ConsoleMessage, Dialog, Page, async_playwright, expect

from app.database.connection import ConnectionManager
from app.main import create_app
from app.utils.runner import executor_hook
from tests.conftest import make_settings
from tests.integration.conftest import make_key
from tests.support.crawl_site import CrawlSite

pytestmark = pytest.mark.timeout(90)

CHROMIUM = os.environ.get("TRAWLER_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = os.environ.get("TRAWLER_SCREENSHOTS") == "1"
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
WAIT_MS = 30_000
_PROVOKED = re.compile(r"Failed to load resource: the server responded with a status of 4(01|22) ")


def _chromium_or_skip() -> None:
    """Skip only when .ci/run could not install Chromium (it says why) or on a developer's
    machine without it; in CI a missing browser is a failure."""
    if os.access(CHROMIUM, os.X_OK):
        return
    reason = os.environ.get("TRAWLER_BROWSER_SKIP")
    if reason:
        pytest.skip(reason)
    if os.environ.get("CI"):
        pytest.fail(f"no Chromium at {CHROMIUM}: .ci/run installs Debian's chromium package")
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)")


@dataclass
class Trawler:
    url: str
    user_key: str
    admin_key: str


@dataclass
class Watched:
    """A page and the problems the browser reported on it."""

    page: Page
    errors: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert not self.errors, self.errors


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    _chromium_or_skip()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def trawler(db_url: str, db: ConnectionManager) -> AsyncIterator[Trawler]:
    """`trawler serve` in this process: the app with its executor under uvicorn."""
    settings = make_settings(db_url, retry_base_s=0.05, worker_concurrency=16, shutdown_grace=1.0)
    app = create_app(settings, migrate=False, hooks=[executor_hook(settings)])
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert not task.done(), "uvicorn stopped during startup"
            assert time.monotonic() < deadline, "uvicorn did not start"
            await asyncio.sleep(0.02)
        yield Trawler(
            url=f"http://127.0.0.1:{port}",
            user_key=await make_key(db, "acme-analyst", tenant="acme"),
            admin_key=await make_key(db, "acme-ops", tenant="acme", admin=True),
        )
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        sock.close()


@pytest.fixture
async def watched(browser: Browser, trawler: Trawler) -> AsyncIterator[Watched]:
    context = await browser.new_context(
        base_url=trawler.url, viewport={"width": 1280, "height": 860}, accept_downloads=True
    )
    page = await context.new_page()
    watched = Watched(page)

    def on_console(message: ConsoleMessage) -> None:
        # script errors and CSP violations are reported here; so are pages answered with a
        # refusal the test provokes on purpose (a wrong key: 401), which are fine
        if message.type == "error" and not _PROVOKED.match(message.text):
            watched.errors.append(message.text)

    async def on_dialog(dialog: Dialog) -> None:
        await dialog.accept()  # "Cancel this job?" -> OK

    page.on("console", on_console)
    page.on("pageerror", lambda error: watched.errors.append(str(error)))
    page.on("dialog", on_dialog)
    try:
        yield watched
    finally:
        await context.close()  # closes the progress streams before the server stops


async def sign_in(page: Page, key: str) -> None:
    await page.goto("/ui/jobs")
    await expect(page).to_have_url("/ui/login?next=%2Fui%2Fjobs")
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page).to_have_url("/ui/jobs")
    await expect(page.get_by_role("heading", name="Jobs", level=1)).to_be_visible()


async def submit_crawl(page: Page, seed: str, *, max_depth: int = 3) -> str:
    """Fill in the form like a person; returns the new job's id."""
    await page.get_by_role("link", name="New job").first.click()
    await expect(page).to_have_url("/ui/jobs/new")
    await page.get_by_label("Crawl").check()
    await page.get_by_label("URLs", exact=True).fill(seed)
    await page.locator("#f-0-name").fill("title")
    await page.locator("#f-0-selector").fill("h1")
    await page.get_by_label("Maximum depth").fill(str(max_depth))
    await page.get_by_role("button", name="Submit job").click()
    await expect(page.locator("#job-status")).to_be_visible()
    job_id = page.url.rsplit("/", 1)[1]
    assert len(job_id) == 36, page.url
    return job_id


async def no_horizontal_scroll(page: Page) -> None:
    overflow = await page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"{page.url} is {overflow}px wider than the screen"


# --------------------------------------------------------------------------------------


async def test_sign_in_crawl_watch_it_finish_and_download_the_csv(
    watched: Watched, trawler: Trawler, tmp_path: Path
) -> None:
    page = watched.page
    # a wrong key first: refused, with the reason next to the field
    await page.goto("/ui/login")
    await page.get_by_label("API key").fill("trw_AAAAAAAA_" + "x" * 40)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("alert")).to_contain_text("not valid, or it was revoked")
    await expect(page.get_by_label("API key")).to_have_attribute("aria-invalid", "true")

    await sign_in(page, trawler.user_key)
    async with CrawlSite(categories=3, items=4, delay=0.15).serve() as site:
        job_id = await submit_crawl(page, site.url("/"), max_depth=2)
        await expect(page.get_by_role("status").first).to_have_text("Job submitted.")
        # the page stays put while the progress stream moves it along to the end
        await page.evaluate("window.__loaded = 'once'")
        await expect(page.locator("#job-status")).to_have_text("completed", timeout=WAIT_MS)
        assert await page.evaluate("window.__loaded") == "once", "the page was reloaded"
        expected = site.expected_pages(2)
        await expect(page.locator("#progress-text")).to_have_text(
            f"{len(expected) + 1} of {len(expected) + 1} pages done: {len(expected)} succeeded, "
            "0 failed, 1 not fetched. Status: completed."
        )
        assert await page.locator("#job-progress").get_attribute("class") == (
            "bar big status-completed"
        )
        assert (
            await page.evaluate("document.getElementById('job-progress').value")
            == len(expected) + 1
        )
        await expect(page.locator("#live-state")).to_have_text("This job has finished.")
        # the sections refreshed with the status: the stored pages and the finished actions
        await expect(page.locator("#job-pages tbody tr")).to_have_count(len(expected))
        await expect(page.get_by_role("button", name="Delete")).to_be_visible()
        await expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)

        async with page.expect_download() as download_info:
            await page.get_by_role("link", name="CSV", exact=True).click()
        download = await download_info.value
        assert download.suggested_filename.endswith(".csv")
        saved = tmp_path / "pages.csv"
        await download.save_as(saved)
        with saved.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert {row["url"] for row in rows} == expected
        assert all(row["ok"] == "true" and row["status_code"] == "200" for row in rows)
        by_url = {row["url"]: row["title"] for row in rows}
        assert by_url[site.url("/")] == "home"
        assert by_url[site.url("/item/2-3")] == "item/2-3"
        assert list(rows[0])[:7] == [
            "url",
            "final_url",
            "status_code",
            "ok",
            "depth",
            "fetched_at",
            "error",
        ]

    # the list shows it, finished, with a full bar
    await page.get_by_role("link", name="Jobs", exact=True).first.click()
    row = page.locator("#job-rows tr", has=page.locator(f'a[href="/ui/jobs/{job_id}"]'))
    await expect(row.locator(".badge")).to_have_text("completed")
    await expect(row.locator(".progress-text")).to_have_text(
        f"{len(expected) + 1} / {len(expected) + 1}"
    )
    watched.assert_clean()


async def test_cancel_a_running_job(watched: Watched, trawler: Trawler) -> None:
    page = watched.page
    await sign_in(page, trawler.user_key)
    async with CrawlSite(categories=4, items=10, delay=1.0).serve() as slow:
        job_id = await submit_crawl(page, slow.url("/"))
        await expect(page.locator("#job-status")).to_have_text("running", timeout=WAIT_MS)
        # the jobs list polls the running job's row
        await page.goto("/ui/jobs?status=active")
        await expect(page.locator("#jobs-live")).to_have_text(
            "1 active job on this page, updated live."
        )
        await page.locator(f'a[href="/ui/jobs/{job_id}"]').click()
        await page.get_by_role("button", name="Cancel job").click()  # confirmed by on_dialog
        await expect(page.get_by_role("status").first).to_have_text("Job cancelled.")
        await expect(page.locator("#job-status")).to_have_text("cancelled")
        await expect(page.get_by_role("button", name="Resume")).to_be_visible()
    async with httpx.AsyncClient(base_url=trawler.url) as api:
        response = await api.get(
            f"/api/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {trawler.user_key}"}
        )
    job = response.json()
    assert job["status"] == "cancelled"
    assert job["progress"]["queued"] == job["progress"]["running"] == 0
    assert job["progress"]["succeeded"] < 40  # it was stopped well before the end
    await page.goto("/ui/jobs?status=cancelled")
    await expect(page.locator(f'a[href="/ui/jobs/{job_id}"]')).to_be_visible()
    watched.assert_clean()


async def test_operations_view_phone_width_and_dark_mode(
    watched: Watched, trawler: Trawler
) -> None:
    page = watched.page
    await sign_in(page, trawler.admin_key)
    await page.get_by_role("link", name="Operations").click()
    await expect(page.get_by_role("heading", name="Operations", level=1)).to_be_visible()
    # the executor of this process, heartbeating
    workers = page.locator("section[aria-labelledby=workers-title] tbody tr")
    await expect(workers).to_have_count(1)
    await expect(workers.locator(".badge")).to_have_text("running")
    await expect(workers.locator("td[data-label='Last heartbeat']")).to_contain_text(" s ago")
    await expect(page.locator("svg[role=img] title").first).to_have_text(
        "Pages per minute, last 60 minutes"
    )
    assert await page.locator("svg .bar-group").count() == 60
    await expect(page.locator("#pool-in-use")).to_be_visible()

    await page.get_by_role("button", name="Pause claiming").click()
    await expect(page.locator("#queue-state")).to_have_text("paused")
    await page.get_by_role("button", name="Resume claiming").click()
    await expect(page.locator("#queue-state")).to_have_text("claiming")

    # a phone: nothing wider than the screen, tables as stacked cards
    await page.set_viewport_size({"width": 390, "height": 844})
    for path in ("/ui/ops", "/ui/jobs", "/ui/jobs/new"):
        await page.goto(path)
        await no_horizontal_scroll(page)

    # dark mode: light text on a dark page
    await page.emulate_media(color_scheme="dark")
    await page.goto("/ui/ops")
    colors = await page.evaluate(
        "[getComputedStyle(document.body).backgroundColor, getComputedStyle(document.body).color]"
    )
    assert colors == ["rgb(15, 19, 26)", "rgb(230, 233, 239)"], colors
    watched.assert_clean()


# --------------------------------------------------------------------------------------
# docs/screenshots/*.png (opt-in)


@pytest.mark.skipif(not SCREENSHOTS, reason="set TRAWLER_SCREENSHOTS=1 to write docs/screenshots")
async def test_screenshots(watched: Watched, trawler: Trawler) -> None:
    page = watched.page
    SHOTS.mkdir(parents=True, exist_ok=True)
    await sign_in(page, trawler.admin_key)
    async with (
        CrawlSite(categories=5, items=8, delay=0.05).serve() as site,
        CrawlSite(categories=6, items=20, delay=0.6).serve() as slow,
    ):
        api = httpx.AsyncClient(
            base_url=trawler.url, headers={"Authorization": f"Bearer {trawler.admin_key}"}
        )
        async with api:
            for i in range(3):
                body = {"urls": [site.url(f"/item/{i}-{j}") for j in range(8)]}
                body["extract"] = {"title": {"css": "h1", "value": "text"}}
                assert (await api.post("/api/v1/scrape", json=body)).status_code == 202
            missing = {
                "urls": ["http://127.0.0.1:9/gone", "http://127.0.0.1:9/x"],
                "max_attempts": 1,
            }
            failing = await api.post("/api/v1/scrape", json=missing)
            assert failing.status_code == 202
            crawl_id = await submit_crawl(page, site.url("/"))
            await expect(page.locator("#job-status")).to_have_text("completed", timeout=WAIT_MS)
            await page.reload()
            await page.screenshot(path=SHOTS / "job-detail.png", full_page=True)
            await page.goto(f"/ui/jobs/{failing.json()['id']}")
            await expect(page.locator("#job-status")).to_have_text("failed", timeout=WAIT_MS)
            await page.reload()
            await page.screenshot(path=SHOTS / "job-failed.png", full_page=True)
            slow_body = {
                "seeds": [slow.url("/")],
                "extract": {"title": {"css": "h1", "value": "text"}},
                "follow": {"max_depth": 2},
            }
            assert (await api.post("/api/v1/crawl", json=slow_body)).status_code == 202
            running = await submit_crawl(page, slow.url("/"))
            await expect(page.locator("#job-status")).to_have_text("running", timeout=WAIT_MS)
            await page.wait_for_timeout(3000)
            await page.screenshot(path=SHOTS / "job-running.png", full_page=False)
            await page.goto("/ui/jobs")
            await page.wait_for_timeout(2500)
            await page.screenshot(path=SHOTS / "jobs.png", full_page=True)
            await page.goto("/ui/ops")
            await page.wait_for_timeout(500)
            await page.screenshot(path=SHOTS / "operations.png", full_page=True)
            await page.goto("/ui/jobs/new")
            await page.get_by_label("URLs", exact=True).fill("https://shop.example/\nnot a url")
            await page.locator("#f-0-name").fill("price")
            await page.locator("#f-0-selector").fill(".price[")
            await page.get_by_role("button", name="Submit job").click()
            await expect(page.locator("#error-summary")).to_be_visible()
            await page.screenshot(path=SHOTS / "submit-errors.png", full_page=True)
            await page.emulate_media(color_scheme="dark")
            await page.goto(f"/ui/jobs/{crawl_id}")
            await page.screenshot(path=SHOTS / "job-detail-dark.png", full_page=False)
            await page.goto("/ui/ops")
            await page.screenshot(path=SHOTS / "operations-dark.png", full_page=True)
            await page.set_viewport_size({"width": 390, "height": 844})
            await page.emulate_media(color_scheme="light")
            await page.goto("/ui/jobs")
            await page.screenshot(path=SHOTS / "jobs-phone.png", full_page=False)
            await page.goto(f"/ui/jobs/{running}")
            await page.screenshot(path=SHOTS / "job-running-phone.png", full_page=False)
    for name in ("jobs", "job-detail", "operations"):
        assert (SHOTS / f"{name}.png").stat().st_size > 10_000
