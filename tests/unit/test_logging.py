"""app.logging: JSON lines carry the fixed keys plus `extra`; configuring twice is idempotent."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from app.logging import configure_logging


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
