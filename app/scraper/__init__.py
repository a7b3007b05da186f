"""Scraping: SSRF guard, HTTP fetching and HTML extraction for the executor and the API."""

from app.scraper.extract import (
    CompiledSpec,
    Document,
    ExtractSpec,
    FieldSpec,
    InvalidSelector,
    InvalidSpec,
    builtins,
    compile_spec,
    extract,
)
from app.scraper.fetch import Fetcher, FetchResult
from app.scraper.ssrf import BlockedTarget, GuardedResolver, InvalidTarget, SSRFGuard

__all__ = [
    "BlockedTarget",
    "CompiledSpec",
    "Document",
    "ExtractSpec",
    "FetchResult",
    "Fetcher",
    "FieldSpec",
    "GuardedResolver",
    "InvalidSelector",
    "InvalidSpec",
    "InvalidTarget",
    "SSRFGuard",
    "builtins",
    "compile_spec",
    "extract",
]
