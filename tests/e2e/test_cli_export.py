"""`trawler export` as a process: files in every format, stdout, progress, clean failures."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path

import openpyxl
import pytest

from app.database.connection import ConnectionManager
from tests.e2e.conftest import clean_env, trawler_command
from tests.integration.test_export import TABLE, cell, insert_job, stored_pages, tricky_pages

pytestmark = pytest.mark.timeout(90)


async def _run(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, bytes, str]:
    proc = await asyncio.create_subprocess_exec(
        *trawler_command(),
        *args,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out, err.decode()


async def test_export_writes_files_with_a_progress_bar(
    tmp_path: Path, db_url: str, db: ConnectionManager
) -> None:
    job_id = await insert_job(db, tricky_pages(), tenant="acme")
    pages = await stored_pages(db, job_id)
    env = clean_env(TRAWLER_DATABASE_URL=db_url, TRAWLER_LOG_LEVEL="WARNING")

    code, out, err = await _run(
        "export", str(job_id), "-f", "csv", "-o", "out.csv", "--tenant", "acme",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, err
    n = len(pages)
    assert f"{n}/{n}" in err  # the bar: rows written of the snapshot's rows
    assert f"{n} rows" in out.decode() and "out.csv" in out.decode()
    rows = list(csv.reader(io.StringIO((tmp_path / "out.csv").read_bytes().decode(), newline="")))
    assert rows[0] == [*TABLE, "links", "price", "title"]
    assert [r[0] for r in rows[1:]] == [p["url"] for p in pages]
    assert [r[-1] for r in rows[1:]] == [cell(p["data"].get("title")) for p in pages]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]  # no temporary left

    # default file name, XLSX, only the failed pages
    code, out, err = await _run(
        "export", str(job_id), "--format", "xlsx", "--status", "error", "--tenant", "acme",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, err
    book = openpyxl.load_workbook(tmp_path / f"job-{job_id}-error.xlsx")
    urls = [row[0] for row in book.active.iter_rows(min_row=2, values_only=True)]
    assert urls == [p["url"] for p in pages if not p["ok"]]

    # standard output: the data alone on stdout, the summary on stderr
    code, out, err = await _run(
        "export", str(job_id), "-f", "jsonl", "-o", "-", "--fields", "url,price",
        "--tenant", "acme", env=env, cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, err
    objects = [json.loads(line) for line in out.splitlines()]
    assert objects == [{"url": p["url"], "data": {"price": p["data"].get("price")}} for p in pages]
    assert "written to standard output" in err


async def test_export_failures_are_one_red_line_and_leave_no_file(
    tmp_path: Path, db_url: str, db: ConnectionManager
) -> None:
    job_id = await insert_job(db, tricky_pages()[:2], tenant="acme")
    env = clean_env(TRAWLER_DATABASE_URL=db_url, TRAWLER_LOG_LEVEL="WARNING")
    cases = [
        (["--tenant", "other"], f"job {job_id} not found"),
        (["--fields", "url,nope"], "unknown field 'nope'"),
        (["-f", "xls"], "unknown format 'xls'"),
    ]
    for extra, message in cases:
        args = ["--tenant", "acme", *extra] if "--tenant" not in extra else extra
        code, _, err = await _run(
            "export", str(job_id), "-o", "out.csv", *args, env=env, cwd=tmp_path
        )
        assert code == 1, err
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], err
    code, _, err = await _run("export", "nope", env=env, cwd=tmp_path)
    assert code == 1 and "not a job id" in err
    assert list(tmp_path.iterdir()) == []
