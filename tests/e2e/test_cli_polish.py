"""The `trawler` command as people and scripts meet it: `--help` lists every command,
`--json` prints JSON alone, `jobs list` is a table, `--wait` follows a real crawl to a
summary (a live bar on a terminal, plain lines in a pipe), and expected failures are one
red line. Each test starts its processes concurrently: the CLI's start-up dominates."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import typer

from app import __version__
from app.api.schemas import CrawlCreate, ScrapeCreate
from app.cli import app as cli_app
from app.commands import jobs_app, keys_app
from app.database.connection import ConnectionManager
from app.database.migrations import head_revision
from app.services import apikeys
from app.services import jobs as job_service
from tests.e2e.conftest import clean_env, trawler_command
from tests.e2e.test_cli import one_line_error, run_trawler
from tests.integration.test_export import insert_job, tricky_pages
from tests.support.crawl_site import CrawlSite
from tests.support.site import LocalSite

pytestmark = pytest.mark.timeout(90)

ANSI = "\x1b"
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/none"  # nothing listens: refused at once


def _env(db_url: str, **extra: str) -> dict[str, str]:
    # a wide "terminal" so that help and tables are never wrapped
    return clean_env(
        TRAWLER_DATABASE_URL=db_url, TRAWLER_LOG_LEVEL="WARNING", COLUMNS="200", **extra
    )


async def _all(cwd: Path, env: dict[str, str], *commands: list[str]) -> list[tuple[int, str, str]]:
    return list(await asyncio.gather(*(run_trawler(*c, env=env, cwd=cwd) for c in commands)))


def _json_only(code: int, out: str, err: str) -> Any:
    """The JSON a `--json` command printed: stdout must hold that and nothing else."""
    assert code == 0, err
    assert ANSI not in out, out
    return json.loads(out)


def _summary(command: Any) -> str:
    """The first paragraph of a command's help: what `--help` lists it with."""
    return str(command.help or "").split("\n\n")[0].strip()


# --------------------------------------------------------------------------- help, version


async def test_help_lists_every_command_with_a_one_line_summary(tmp_path: Path) -> None:
    # what is registered on the typer app, so that a new command cannot be forgotten
    root = typer.main.get_command(cli_app)
    assert isinstance(root, typer.core.TyperGroup)
    registered = {c.callback.__name__ for c in cli_app.registered_commands if c.callback}
    assert len(root.commands) == len(registered) + len(cli_app.registered_groups)
    groups = {
        name: command
        for name, command in root.commands.items()
        if isinstance(command, typer.core.TyperGroup)
    }
    assert set(groups) == {"jobs", "apikey"}
    assert len(groups["jobs"].commands) == len(jobs_app.registered_commands)
    assert len(groups["apikey"].commands) == len(keys_app.registered_commands)

    env = clean_env(COLUMNS="200")
    runs = await _all(tmp_path, env, ["--help"], *([name, "--help"] for name in groups))
    listings = [(root, runs[0]), *((groups[n], r) for n, r in zip(groups, runs[1:], strict=True))]
    for group, (code, out, err) in listings:
        assert code == 0, err
        for name, command in group.commands.items():
            summary = _summary(command)
            assert summary and "\n" not in summary, f"{name}: no one-line summary"
            lines = [line for line in out.splitlines() if re.search(rf"\b{name}\b", line)]
            assert any(summary in line for line in lines), f"{name} / {summary!r} not in:\n{out}"


async def test_version_json(tmp_path: Path) -> None:
    code, out, err = await run_trawler("version", "--json", env=clean_env(), cwd=tmp_path)
    data = _json_only(code, out, err)
    assert data["name"] == "trawler" and data["version"] == __version__


# --------------------------------------------------------------------------- read commands


async def _jobs(db: ConnectionManager) -> dict[str, uuid.UUID]:
    """Jobs of tenant acme, oldest first: a finished one with pages, two scrapes (one
    cancelled), and a crawl."""
    made = {"export": await insert_job(db, tricky_pages(), tenant="acme")}
    requests = {
        "scrape": ScrapeCreate(urls=["https://a.example/1", "https://a.example/2"]),
        "cancelled": ScrapeCreate(urls=["https://a.example/3"]),
        "crawl": CrawlCreate(seeds=["https://b.example/"]),
    }
    for label, request in requests.items():
        async with db.session() as session:
            job, _ = await job_service.submit_job(session, "acme", request)
        made[label] = job.id
    async with db.session() as session:
        await job_service.cancel_job(session, "acme", made["cancelled"])
    return made


async def test_read_commands_print_tables_and_json(
    tmp_path: Path, db_url: str, db: ConnectionManager
) -> None:
    made = await _jobs(db)
    ids = {label: str(ident) for label, ident in made.items()}
    async with db.session() as session:
        kept, _key = await apikeys.create_key(session, "ci", "acme")
        gone, _key = await apikeys.create_key(session, "old", "acme", admin=True)
        await apikeys.revoke_key(session, gone.id)
    acme = ["--tenant", "acme"]
    runs = await _all(
        tmp_path,
        _env(db_url),
        ["jobs", "list", *acme],
        ["jobs", "list", *acme, "--json"],
        ["jobs", "list", *acme, "--kind", "crawl", "--json"],
        ["jobs", "list", *acme, "--status", "cancelled,completed", "--json"],
        ["jobs", "list", *acme, "--limit", "1", "--json"],
        ["jobs", "show", ids["scrape"], *acme],
        ["jobs", "show", ids["scrape"], *acme, "--json"],
        ["apikey", "list", "--json"],
        ["export", ids["export"], *acme, "-o", "out.jsonl", "-f", "jsonl", "--json"],
    )
    table, listed, crawls, finished, newest, shown, show_json, keys, exported = runs

    code, out, err = table
    assert code == 0, err
    assert ANSI not in out + err  # a pipe: no colour, no cursor movement
    rows = {line.split()[1]: line for line in out.splitlines() if re.search(r"[0-9a-f]{8}-", line)}
    assert set(rows) == set(ids.values()), out  # whole ids: never wrapped or cut in a pipe
    assert "cancelled" in rows[ids["cancelled"]] and "crawl" in rows[ids["crawl"]]
    assert "0/2" in rows[ids["scrape"]] and "queued" in rows[ids["scrape"]]
    for header in ("id", "kind", "status", "progress", "created", "age"):
        assert header in out.splitlines()[1]

    jobs = _json_only(*listed)
    assert [j["id"] for j in jobs] == [ids[k] for k in ("crawl", "cancelled", "scrape", "export")]
    assert {"id", "kind", "status", "progress", "created_at", "spec"} <= set(jobs[0])
    assert [j["id"] for j in _json_only(*crawls)] == [ids["crawl"]]
    assert {j["id"] for j in _json_only(*finished)} == {ids["cancelled"], ids["export"]}
    assert [j["id"] for j in _json_only(*newest)] == [ids["crawl"]]

    code, out, err = shown
    assert code == 0, err
    assert ids["scrape"] in out and "queued" in out and "0/2 done" in out

    job = _json_only(*show_json)
    assert job["id"] == ids["scrape"] and job["kind"] == "scrape" and job["status"] == "queued"
    assert job["progress"] == {"total": 2, "queued": 2, "running": 0, "succeeded": 0, "failed": 0}

    listed_keys = {k["id"]: k for k in _json_only(*keys)}
    assert listed_keys[str(kept.id)]["revoked"] is False
    assert listed_keys[str(gone.id)]["revoked"] is True
    assert listed_keys[str(gone.id)]["role"] == "admin"
    assert all("hash" not in name and name != "key" for k in listed_keys.values() for name in k)

    summary = _json_only(*exported)
    pages = tricky_pages()
    assert summary["rows"] == len(pages) and summary["format"] == "jsonl"
    assert Path(summary["output"]) == tmp_path / "out.jsonl"
    assert summary["bytes"] == (tmp_path / "out.jsonl").stat().st_size
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == len(pages)


# --------------------------------------------------------------------------- --wait


async def test_wait_follows_jobs_to_a_summary(tmp_path: Path, db_url: str) -> None:
    env = _env(db_url, TRAWLER_ALLOW_PRIVATE_NETWORKS="true", TRAWLER_POLL_INTERVAL="0.2")
    async with LocalSite().serve() as site, CrawlSite().serve() as crawl_site:
        scraped, crawled, failed = await _all(
            tmp_path,
            env,
            ["scrape", site.url("/page/1"), site.url("/page/2"), site.url("/missing"), "--wait"],
            ["crawl", crawl_site.url("/"), "--max-depth", "1", "--wait", "--json"],
            ["scrape", site.url("/missing"), "--wait"],
        )

    code, out, err = scraped
    assert code == 0, err
    assert ANSI not in out + err  # not a terminal: plain progress lines, no control codes
    first, counts = out.splitlines()[:2]
    assert first.startswith("completed scrape job ")
    assert "2 succeeded, 1 failed, 0 skipped (of 3 pages" in counts
    assert "completed: 3/3 pages" in err, err  # the last progress line, on stderr

    # a crawl: every page of depth <= 1 fetched, /private skipped by robots.txt
    data = _json_only(*crawled)
    assert data["kind"] == "crawl" and data["status"] == "completed"
    summary = data["summary"]
    assert (summary["succeeded"], summary["failed"], summary["skipped"]) == (5, 0, 1)
    assert summary["total"] == 6 and summary["elapsed_s"] > 0

    # a job that failed: its summary, then one red line and exit status 1
    code, out, err = failed
    assert code == 1
    assert out.startswith("failed scrape job ") and "0 succeeded, 1 failed" in out
    assert "failed" in one_line_error(err)


async def test_wait_on_a_terminal_draws_a_live_bar(tmp_path: Path, db_url: str) -> None:
    """stderr on a terminal gets the rich bar; stdout, a pipe, still gets plain text."""
    env = _env(db_url, TRAWLER_ALLOW_PRIVATE_NETWORKS="true", TERM="xterm-256color")
    leader, follower = pty.openpty()
    async with LocalSite().serve() as site:
        site.delay = 0.2
        proc = await asyncio.create_subprocess_exec(
            *trawler_command(),
            "scrape",
            *(site.url(f"/page/{n}") for n in range(6)),
            "--wait",
            env=env,
            cwd=tmp_path,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=follower,
        )
        os.close(follower)
        terminal = asyncio.create_task(asyncio.to_thread(_read_all, leader))
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        screen = (await terminal).decode(errors="replace")
    assert proc.returncode == 0, screen
    assert "\x1b[?25l" in screen and "\x1b[2K" in screen  # cursor hidden, line redrawn
    assert "━" in screen  # the bar itself
    assert "pages/s" in screen and "ETA" in screen and "6/6" in screen
    assert ANSI not in out.decode() and "6 succeeded, 0 failed" in out.decode()


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    with contextlib.suppress(OSError):  # EIO once the process has closed the terminal
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


# --------------------------------------------------------------------------- failures


async def test_expected_failures_are_one_red_line(
    tmp_path: Path, db_url: str, fresh_database: str
) -> None:
    unknown = str(uuid.uuid4())
    cases: list[tuple[str, list[str], str, int]] = [
        (db_url, ["scrape", "notaurl"], "invalid URL 'notaurl'", 1),
        (db_url, ["jobs", "show", unknown], f"job {unknown} not found", 1),
        (db_url, ["jobs", "cancel", unknown, "--json"], f"job {unknown} not found", 1),
        (db_url, ["export", "nope"], "not a job id: 'nope'", 1),
        (db_url, ["jobs", "list", "--status", "done"], "unknown status 'done'", 1),
        (db_url, ["apikey", "revoke", unknown], f"key {unknown} not found", 1),
        (db_url, ["scrape", "--bogus", "https://example.com/"], "No such option: --bogus", 2),
        (UNREACHABLE, ["jobs", "list", "--json"], "refused", 1),
        (UNREACHABLE, ["scrape", "https://example.com/", "--wait"], "refused", 1),
        (fresh_database, ["jobs", "show", unknown], "run `trawler migrate`", 1),
    ]
    runs = await asyncio.gather(
        *(run_trawler(*args, env=_env(url), cwd=tmp_path) for url, args, _, _ in cases)
    )
    for (_url, args, message, status), (code, out, err) in zip(cases, runs, strict=True):
        assert code == status, (args, err)
        assert out == "", (args, out)  # nothing on stdout, not even with --json
        line = one_line_error(err)
        assert [x for x in err.splitlines() if x.strip()] == [line], (args, err)
        assert message in line, (args, line)
    assert head_revision() in one_line_error(runs[-1][2])  # says which schema it needs
