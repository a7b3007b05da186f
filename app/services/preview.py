"""Scrape preview: fetch and extract one URL inline with the shared Fetcher; nothing stored."""

from __future__ import annotations

from app.api.schemas import PreviewCreate, PreviewPublic
from app.errors import Unprocessable
from app.scraper.extract import CompiledSpec, InvalidSpec, builtins, compile_spec, extract
from app.scraper.fetch import Fetcher
from app.scraper.ssrf import BlockedTarget, SSRFGuard
from app.scraper.urls import canonicalize_url


def check(guard: SSRFGuard, request: PreviewCreate) -> tuple[str, CompiledSpec]:
    """The canonical URL and the compiled spec; 422 for a refused target or a bad spec."""
    try:
        url = canonicalize_url(request.url)
        guard.check_url(url)
    except (ValueError, BlockedTarget) as error:
        raise Unprocessable(f"URL {request.url[:200]!r} is not allowed: {error}") from None
    try:
        return url, compile_spec(request.extract)
    except InvalidSpec as error:
        raise Unprocessable(str(error)) from None


async def preview(fetcher: Fetcher, guard: SSRFGuard, request: PreviewCreate) -> PreviewPublic:
    """Fetch `request.url` within its timeout and run the extract spec on it.

    `data` holds the extracted fields, or the built-in fields (title, description,
    canonical, links, language) when the spec is empty. Fetch failures are answered as
    data (`ok: false`, `error`); only a refused target or a bad spec is a 422 (check).
    """
    url, compiled = check(guard, request)
    options = request.options
    result = await fetcher.fetch(
        url,
        headers=options.headers,
        timeout_s=options.timeout_s,
        user_agent=options.user_agent,
    )
    data = {}
    if result.is_html and result.text is not None:
        if compiled.fields:
            data = extract(result.text, result.final_url, compiled)
        else:
            data = builtins(result.text, result.final_url)
    return PreviewPublic(
        url=url,
        final_url=result.final_url,
        status_code=result.status_code,
        ok=result.ok,
        elapsed_ms=result.elapsed_ms,
        data=data,
        error=result.error,
    )
