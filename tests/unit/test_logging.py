"""app.logging: JSON lines carry the fixed keys plus `extra`; configuring twice is idempotent."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from collections.abc import Iterator

import pytest

from app.logging import bind_worker, configure_logging, log_context


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.mark.usefixtures("restore_root_logging")
def test_json_lines_have_fixed_keys_and_extra_fields() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    log = logging.getLogger("trawler.test")
    log.info("claimed %d tasks", 3, extra={"job_id": "j-1", "batch": 3})
    log.debug("hidden at INFO")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")

    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "INFO"
    assert first["logger"] == "trawler.test"
    assert first["msg"] == "claimed 3 tasks"
    assert first["job_id"] == "j-1" and first["batch"] == 3
    assert first["ts"].endswith("+00:00")
    assert "args" not in first and "exc" not in first
    assert second["level"] == "ERROR"
    assert "ValueError: boom" in second["exc"]


@pytest.mark.usefixtures("restore_root_logging")
def test_configuring_twice_keeps_one_handler_and_text_format() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("WARNING", "json", stream=first)
    configure_logging("INFO", "text", stream=second)
    logging.getLogger("trawler.test").info("hello")
    assert first.getvalue() == ""
    text = second.getvalue()
    assert text.count("hello") == 1
    assert "INFO" in text and "trawler.test: hello" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.usefixtures("restore_root_logging")
def test_context_fields_are_on_every_line_while_set() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    log = logging.getLogger("trawler.test")
    job = uuid.uuid4()
    with log_context(request_id="req-1", worker_id="w-1"):
        log.info("outer")
        with log_context(job_id=job):
            log.info("inner")
            log.info("explicit", extra={"job_id": "given"})
        log.info("outer again")
    log.info("outside")

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    fields = [
        {k: line.get(k) for k in ("msg", "request_id", "job_id", "worker_id")} for line in lines
    ]
    assert fields == [
        {"msg": "outer", "request_id": "req-1", "job_id": None, "worker_id": "w-1"},
        {"msg": "inner", "request_id": "req-1", "job_id": str(job), "worker_id": "w-1"},
        {"msg": "explicit", "request_id": "req-1", "job_id": "given", "worker_id": "w-1"},
        {"msg": "outer again", "request_id": "req-1", "job_id": None, "worker_id": "w-1"},
        {"msg": "outside", "request_id": None, "job_id": None, "worker_id": None},
    ]
    assert "request_id" not in lines[-1]  # unset fields are left out, not null


@pytest.mark.usefixtures("restore_root_logging")
async def test_a_bound_worker_id_follows_the_tasks_it_starts() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    log = logging.getLogger("trawler.test")

    async def loop_body() -> None:
        log.info("from a loop")

    async def worker() -> None:
        bind_worker("w-42")
        await asyncio.create_task(loop_body())

    await asyncio.create_task(worker())
    log.info("elsewhere")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["worker_id"] == "w-42" and first["msg"] == "from a loop"
    assert "worker_id" not in second


@pytest.mark.usefixtures("restore_root_logging")
def test_text_format_ignores_context_fields() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "text", stream=stream)
    with log_context(request_id="req-9"):
        logging.getLogger("trawler.test").info("plain")
    assert stream.getvalue().rstrip().endswith("trawler.test: plain")
