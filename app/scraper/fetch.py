"""HTTP fetching: one pooled aiohttp session per worker, bounded bodies, guarded redirects."""

from __future__ import annotations

import asyncio
import codecs
import email.utils
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Final, Literal, Self

import aiohttp
import charset_normalizer
from aiohttp import http_exceptions
from multidict import CIMultiDict
from yarl import URL

from app.scraper.ssrf import (
    BlockedResolution,
    BlockedTarget,
    GuardedResolver,
    InvalidTarget,
    SSRFGuard,
)

try:  # aiohttp decodes br/zstd only when their optional packages are installed
    from aiohttp.compression_utils import HAS_BROTLI, HAS_ZSTD
except ImportError:  # pragma: no cover - older aiohttp without these flags
    HAS_BROTLI = HAS_ZSTD = False

__all__ = [
    "DEFAULT_USER_AGENT",
    "ErrorKind",
    "FetchResult",
    "Fetcher",
    "decode_body",
    "parse_retry_after",
]

DEFAULT_USER_AGENT: Final = "TrawlerBot/0.1 (+https://github.com/trawler)"
MiB: Final = 1024 * 1024

ErrorKind = Literal[
    "timeout",
    "connect",
    "reset",
    "too_large",
    "too_many_redirects",
    "blocked",
    "http",
    "invalid",
    "decode",
]

_RETRYABLE_KINDS: Final[frozenset[str]] = frozenset({"timeout", "connect", "reset"})
_RETRYABLE_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})
_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
# Credentials must not follow a redirect to another origin (what browsers and curl do).
_CREDENTIAL_HEADERS: Final = ("Authorization", "Cookie", "Proxy-Authorization")
_RETRY_AFTER_CAP_S: Final = 3600.0
_REDIRECT_BODY_DRAIN: Final = 64 * 1024
_SNIFF_BYTES: Final = 4096
_DETECT_SAMPLE_BYTES: Final = 32 * 1024

_ACCEPT: Final = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
_ACCEPT_ENCODING: Final = ", ".join(
    ["gzip", "deflate"] + (["br"] if HAS_BROTLI else []) + (["zstd"] if HAS_ZSTD else [])
)


@dataclass(slots=True)
class FetchResult:
    """Outcome of one fetch. Network and target problems are data here, never exceptions."""

    url: str
    final_url: str
    status_code: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None
    is_html: bool = False
    text: str | None = None
    body_bytes: int = 0
    encoding: str | None = None
    elapsed_ms: int = 0
    redirects: list[str] = field(default_factory=list)
    error: str | None = None
    error_kind: ErrorKind | None = None
    retryable: bool = False
    retry_after: float | None = None
    # The raw (decompressed) body, only when fetch(..., want_bytes=True) asked for it.
    body: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status_code is not None and 200 <= self.status_code < 300


# ---------------------------------------------------------------------------------------------
# Retry-After and Content-Type parsing


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), capped at 1 h."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # HTTP-dates are GMT; "-0000" parses as naive
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), _RETRY_AFTER_CAP_S)


def _parse_content_type(value: str | None) -> tuple[str | None, str | None]:
    if not value:
        return None, None
    raw_media, _, params = value.partition(";")
    charset: str | None = None
    for param in params.split(";"):
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset":
            charset = val.strip().strip("\"'").strip() or None
    return raw_media.strip().lower() or None, charset


# ---------------------------------------------------------------------------------------------
# Body decoding

_HTML_TYPES: Final = frozenset({"text/html", "application/xhtml+xml"})
_TEXT_TYPES: Final = frozenset(
    {
        "application/json",
        "application/xml",
        "application/javascript",
        "application/ecmascript",
        "application/x-javascript",
        "application/x-www-form-urlencoded",
        "application/rss+xml",
        "application/atom+xml",
        "application/ld+json",
        "application/manifest+json",
        "image/svg+xml",
    }
)
_JSON_TYPES: Final = frozenset({"application/json"})

# WHATWG Encoding Standard: browsers decode these labels with a superset codec, so pages
# labelled latin-1 really are windows-1252 and must be decoded that way.
_WHATWG_SUPERSETS: Final = {
    "latin-1": "cp1252",
    "iso8859-1": "cp1252",
    "ascii": "cp1252",
    "iso8859-9": "cp1254",
    "iso8859-11": "cp874",
    "tis-620": "cp874",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "euc_kr": "cp949",
    "shift_jis": "cp932",
}
# Codecs that cannot be a web page's encoding or that enable script smuggling (UTF-7).
_REFUSED_CODECS: Final = frozenset(
    {"utf-7", "unicode-escape", "raw-unicode-escape", "idna", "punycode", "undefined"}
)
# charset-normalizer cannot tell Western European text from these rarely-used single-byte
# encodings on short samples; the web's overwhelmingly common windows-1252 wins near-ties.
_RARE_LATIN: Final = frozenset(
    {"cp1257", "iso8859_13", "iso8859_4", "iso8859_10", "cp775", "mac_latin2", "hp_roman8"}
)
_DETECT_TIE_MARGIN: Final = 0.1

_BOMS: Final = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_META_CHARSET = re.compile(rb"""<meta\b[^>]*?charset\s*=\s*["']?\s*([A-Za-z0-9_:.+-]+)""", re.I)
_XML_DECL = re.compile(rb"""^\s*<\?xml\b[^>]*?encoding\s*=\s*["']([A-Za-z0-9_.+-]+)["']""")
_HTML_SNIFF = re.compile(
    rb"^(?:\xef\xbb\xbf)?\s*(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html|head|body)\b", re.I | re.S
)


def _codec_for(label: str | None) -> str | None:
    """Python codec for an HTTP/HTML charset label, or None when unknown or unsafe."""
    if not label:
        return None
    try:
        info = codecs.lookup(label.strip().lower())
    except LookupError:
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in _REFUSED_CODECS:
        return None
    return _WHATWG_SUPERSETS.get(info.name, info.name)


def _detect(sample: bytes) -> str | None:
    matches = charset_normalizer.from_bytes(sample)
    best = matches.best()
    if best is None:
        return None
    if "cp1252" in best.could_be_from_charset:
        return "cp1252"  # same decoding, the label operators recognise
    if best.encoding in _RARE_LATIN:
        for match in matches:
            if "cp1252" in match.could_be_from_charset and (
                match.chaos <= best.chaos + _DETECT_TIE_MARGIN
            ):
                return "cp1252"
    return _codec_for(best.encoding)


def _choose_encoding(body: bytes, media: str | None, declared: str | None) -> tuple[str, int]:
    """Return (codec, bytes to skip). Order: BOM, header charset, in-document declaration,
    valid UTF-8, statistical detection, UTF-8. A BOM outranks the header as in browsers."""
    for bom, bom_codec in _BOMS:
        if body.startswith(bom):
            return bom_codec, len(bom)
    if media in _JSON_TYPES:
        return "utf-8", 0  # RFC 8259: JSON exchanged between systems is UTF-8
    codec = _codec_for(declared)
    if codec is not None:
        return codec, 0
    head = body[:_SNIFF_BYTES]
    found = _XML_DECL.match(head) or _META_CHARSET.search(head)
    if found is not None:
        codec = _codec_for(found.group(1).decode("ascii"))
        if codec is not None:
            # An in-document UTF-16 label is read through ASCII, so it cannot be true.
            return ("utf-8" if codec.startswith("utf-16") else codec), 0
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        pass  # not UTF-8: fall through to statistical detection
    else:
        return "utf-8", 0
    detected = _detect(body[:_DETECT_SAMPLE_BYTES])
    return (detected or "utf-8"), 0


def decode_body(body: bytes, content_type: str | None) -> tuple[str | None, str | None, bool]:
    """Decode a response body. Returns (text, encoding, is_html).

    text is None for binary types (images, archives, ...): only metadata is kept for those.
    Without a Content-Type the body is sniffed. Invalid bytes become U+FFFD; never raises.
    """
    media, declared = _parse_content_type(content_type)
    if media is None:
        if _HTML_SNIFF.match(body[:_SNIFF_BYTES]) is not None:
            media = "text/html"
        elif body and b"\x00" not in body[:1024]:
            media = "text/plain"
        else:
            return None, None, False
    is_html = media in _HTML_TYPES
    textual = (
        is_html
        or media.startswith("text/")
        or media in _TEXT_TYPES
        or media.endswith(("+xml", "+json"))
    )
    if not textual:
        return None, None, False
    codec, skip = _choose_encoding(body, media, declared)
    return codecs.decode(body[skip:] if skip else body, codec, errors="replace"), codec, is_html


# ---------------------------------------------------------------------------------------------
# The fetcher


@dataclass(slots=True)
class _Progress:
    """What is known so far, so a failure mid-way still reports status, hops and headers."""

    url: str
    final_url: str
    redirects: list[str] = field(default_factory=list)
    status_code: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None
    retry_after: float | None = None
    body_bytes: int = 0

    def failure(
        self, kind: ErrorKind, message: str, *, retryable: bool | None = None
    ) -> FetchResult:
        return FetchResult(
            url=self.url,
            final_url=self.final_url,
            status_code=self.status_code,
            headers=self.headers,
            content_type=self.content_type,
            body_bytes=self.body_bytes,
            redirects=self.redirects,
            error=message,
            error_kind=kind,
            retryable=(kind in _RETRYABLE_KINDS) if retryable is None else retryable,
            retry_after=self.retry_after,
        )


class _TooManyRedirects(Exception):
    """Internal control flow: the redirect limit was hit or a loop was found."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


def _headers_dict(headers: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in headers.items():
        name = key.lower()
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def _origin(url: URL) -> tuple[str, str | None, int | None]:
    return url.scheme, url.raw_host, url.port


def _os_reason(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _classify(exc: BaseException) -> tuple[ErrorKind, str, bool | None]:
    """Map a client exception to (error_kind, human message, retryable override)."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        if isinstance(exc.os_error, BlockedResolution):
            return "blocked", str(exc.os_error.blocked), None
        permanent = isinstance(exc.os_error, socket.gaierror) and exc.os_error.errno in (
            socket.EAI_NONAME,
            getattr(socket, "EAI_NODATA", socket.EAI_NONAME),
        )
        reason = _os_reason(exc.os_error)
        return "connect", f"DNS lookup failed for {exc.host}: {reason}", not permanent
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return "connect", f"TLS error with {exc.host}:{exc.port}: {exc}", False
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = _os_reason(exc.os_error)
        return "connect", f"cannot connect to {exc.host}:{exc.port}: {reason}", None
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "reset", "server closed the connection before the response was complete", None
    if isinstance(exc, http_exceptions.ContentEncodingError):
        return "decode", f"cannot decode the response body: {exc.message}", False
    if isinstance(exc, aiohttp.ClientPayloadError):
        cause = exc.__cause__
        if isinstance(cause, http_exceptions.ContentEncodingError):
            return "decode", f"cannot decode the response body: {cause.message}", False
        detail = cause.message if isinstance(cause, http_exceptions.HttpProcessingError) else exc
        return "reset", f"connection broken while reading the body: {detail}", None
    if isinstance(exc, aiohttp.InvalidURL):
        return "invalid", f"invalid URL: {exc}", None
    if isinstance(exc, http_exceptions.HttpProcessingError):
        return "invalid", f"malformed HTTP response: {exc.message or type(exc).__name__}", False
    if isinstance(exc, aiohttp.ClientResponseError):
        return "invalid", f"malformed HTTP response: {exc.message}", False
    if isinstance(exc, ConnectionResetError | BrokenPipeError | aiohttp.ClientOSError):
        return "reset", f"connection reset: {_os_reason(exc)}", None
    if isinstance(exc, aiohttp.ClientConnectionError | OSError):
        return "connect", f"connection error: {_os_reason(exc)}", None
    return "invalid", f"request failed: {type(exc).__name__}: {exc}", False


class Fetcher:
    """Fetches pages over one keep-alive connection pool; one instance per worker process.

    ``fetch`` never raises for network or target problems: they come back as FetchResult
    with ``error``/``error_kind`` set. Use ``async with Fetcher(...)`` or call ``close()``.
    """

    def __init__(
        self,
        *,
        user_agent: str = DEFAULT_USER_AGENT,
        max_body_bytes: int = 10 * MiB,
        max_redirects: int = 10,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        total_timeout: float = 30.0,
        guard: SSRFGuard | None = None,
        limit: int = 100,
        ttl_dns_cache: int = 60,
    ) -> None:
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        if max_redirects < 0:
            raise ValueError("max_redirects must be >= 0")
        self.user_agent = user_agent
        self.max_body_bytes = max_body_bytes
        self.max_redirects = max_redirects
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.total_timeout = total_timeout
        self.guard = guard if guard is not None else SSRFGuard()
        self.limit = limit
        self._ttl_dns_cache = ttl_dns_cache
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def __aenter__(self) -> Self:
        self._ensure_session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("Fetcher is closed")
        if self._session is None:
            # Created lazily because aiohttp binds the session to the running event loop.
            resolver = None if self.guard.allow_private else GuardedResolver(self.guard)
            connector = aiohttp.TCPConnector(
                limit=self.limit,
                limit_per_host=0,  # per-host politeness is the executor's job
                ttl_dns_cache=self._ttl_dns_cache,
                resolver=resolver,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # The total budget is enforced by asyncio.timeout around the whole chain.
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=None,
                    sock_connect=self.connect_timeout,
                    sock_read=self.read_timeout,
                ),
                # One session serves every tenant's jobs: cookies must never leak between them.
                cookie_jar=aiohttp.DummyCookieJar(),
                # Proxy variables would route around the SSRF resolver.
                trust_env=False,
                auto_decompress=True,
                max_line_size=16384,
                max_field_size=16384,
            )
        return self._session

    def _request_headers(
        self, headers: Mapping[str, str] | None, user_agent: str | None
    ) -> CIMultiDict[str]:
        merged: CIMultiDict[str] = CIMultiDict(
            {
                "User-Agent": self.user_agent,
                "Accept": _ACCEPT,
                "Accept-Encoding": _ACCEPT_ENCODING,
                "Accept-Language": "en;q=0.9, *;q=0.5",
            }
        )
        if headers:
            for key, value in headers.items():
                merged[key] = value
        if user_agent:
            merged["User-Agent"] = user_agent
        return merged

    async def fetch(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        user_agent: str | None = None,
        method: str = "GET",
        want_bytes: bool = False,
    ) -> FetchResult:
        """Fetch ``url`` following redirects; never raises for network or target problems.

        ``want_bytes`` also keeps the raw body in ``FetchResult.body`` (for gzip files,
        XML with its own encoding declaration, and other non-text types).
        """
        started = time.perf_counter()
        progress = _Progress(url=url, final_url=url)
        budget = self.total_timeout if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(budget):
                result = await self._fetch_chain(
                    progress, headers, user_agent, method.upper(), want_bytes
                )
        except TimeoutError as exc:
            result = progress.failure("timeout", self._timeout_message(exc, budget))
        except BlockedTarget as exc:
            kind: ErrorKind = "invalid" if isinstance(exc, InvalidTarget) else "blocked"
            result = progress.failure(kind, str(exc), retryable=False)
        except _TooManyRedirects as exc:
            result = progress.failure("too_many_redirects", str(exc), retryable=False)
        except (aiohttp.ClientError, http_exceptions.HttpProcessingError, OSError) as exc:
            kind, message, retryable = _classify(exc)
            result = progress.failure(kind, message, retryable=retryable)
        except ValueError as exc:
            # yarl/aiohttp reject malformed URLs and header values with ValueError.
            result = progress.failure("invalid", f"invalid request: {exc}", retryable=False)
        result.elapsed_ms = int((time.perf_counter() - started) * 1000)
        return result

    def _timeout_message(self, exc: TimeoutError, budget: float) -> str:
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return f"connect timed out after {self.connect_timeout:g}s"
        if isinstance(exc, aiohttp.SocketTimeoutError):
            return f"read timed out: no data for {self.read_timeout:g}s"
        return f"timed out after {budget:g}s (total budget for redirects and body)"

    async def _fetch_chain(
        self,
        progress: _Progress,
        headers: Mapping[str, str] | None,
        user_agent: str | None,
        method: str,
        want_bytes: bool = False,
    ) -> FetchResult:
        session = self._ensure_session()
        request_headers = self._request_headers(headers, user_agent)
        current = URL(progress.url)
        seen: set[str] = set()
        for hop in range(self.max_redirects + 1):
            current = current.with_fragment(None)
            # Report the caller's own spelling until a redirect actually happens.
            progress.final_url = progress.url if hop == 0 else str(current)
            # Every hop is checked: a public page may redirect to a private address.
            self.guard.check_parsed(current)
            seen.add(progress.final_url)
            async with session.request(
                method, current, headers=request_headers, allow_redirects=False
            ) as resp:
                self._record_head(progress, resp)
                location = resp.headers.get("Location")
                if resp.status not in _REDIRECT_STATUSES or not location:
                    return await self._read_final(progress, resp, method, want_bytes)
                target = current.join(URL(location))
                await self._drain_redirect(resp)
            progress.redirects.append(progress.final_url)
            if _origin(target) != _origin(current):
                for name in _CREDENTIAL_HEADERS:
                    request_headers.popall(name, None)
            if resp.status == 303 or (resp.status in (301, 302) and method not in ("GET", "HEAD")):
                method = "GET"  # what browsers do; we never resend a body anyway
            target_key = str(target.with_fragment(None))
            if target_key in seen:
                raise _TooManyRedirects(f"redirect loop: {target_key} was already visited")
            current = target
        raise _TooManyRedirects(f"more than {self.max_redirects} redirects (the limit)")

    @staticmethod
    def _record_head(progress: _Progress, resp: aiohttp.ClientResponse) -> None:
        progress.status_code = resp.status
        progress.headers = _headers_dict(resp.headers)
        progress.content_type = _parse_content_type(resp.headers.get("Content-Type"))[0]
        progress.retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        progress.body_bytes = 0

    @staticmethod
    async def _drain_redirect(resp: aiohttp.ClientResponse) -> None:
        # A short redirect body is read so the connection can be reused; a long one is
        # cheaper to drop than to download.
        remaining = _REDIRECT_BODY_DRAIN
        while remaining > 0:
            chunk = await resp.content.readany()
            if not chunk:
                return
            remaining -= len(chunk)
        resp.close()

    def _too_large(self, progress: _Progress, detail: str) -> FetchResult:
        return progress.failure(
            "too_large",
            f"response body exceeds the {self.max_body_bytes}-byte limit ({detail})",
            retryable=False,
        )

    async def _read_final(
        self, progress: _Progress, resp: aiohttp.ClientResponse, method: str, want_bytes: bool
    ) -> FetchResult:
        limit = self.max_body_bytes
        declared = resp.content_length
        if declared is not None and declared > limit:
            resp.close()  # never start downloading what we already know we will refuse
            return self._too_large(progress, f"Content-Length is {declared}")
        buffer = bytearray()
        if method != "HEAD":
            # Counted after decompression, chunk by chunk, so gzip bombs and endless bodies
            # stop as soon as they pass the limit; aiohttp inflates in bounded pieces.
            async for chunk in resp.content.iter_any():
                progress.body_bytes += len(chunk)
                if progress.body_bytes > limit:
                    resp.close()
                    return self._too_large(progress, f"stopped after {progress.body_bytes} bytes")
                buffer += chunk
        body = bytes(buffer)
        text, encoding, is_html = decode_body(body, resp.headers.get("Content-Type"))
        status = resp.status
        result = FetchResult(
            url=progress.url,
            final_url=progress.final_url,
            status_code=status,
            headers=progress.headers,
            content_type=progress.content_type,
            is_html=is_html,
            text=text,
            body_bytes=len(body),
            encoding=encoding,
            redirects=progress.redirects,
            retry_after=progress.retry_after,
            body=body if want_bytes else None,
        )
        if not 200 <= status < 300:
            result.error = f"HTTP {status}"
            result.error_kind = "http"
            result.retryable = status in _RETRYABLE_STATUSES
        return result
