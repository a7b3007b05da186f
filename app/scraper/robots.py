"""robots.txt policy: Google's fetch-outcome rules and protego parsing, cacheable as JSON."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

from protego import Protego

__all__ = [
    "ERROR_TTL_S",
    "MAX_CRAWL_DELAY_S",
    "MAX_ROBOTS_BYTES",
    "SUCCESS_TTL_S",
    "RobotsMode",
    "RobotsPolicy",
    "product_token",
    "robots_url",
]

# Google reads the first 500 KiB of a robots.txt and ignores the rest.
MAX_ROBOTS_BYTES: Final = 500 * 1024
# Google caches robots.txt for up to 24 hours.
SUCCESS_TTL_S: Final = 24 * 3600.0
# An unreachable robots.txt blocks the host "for a while"; retried after this long.
ERROR_TTL_S: Final = 600.0
# A Crawl-delay beyond this is read as this (an "inf" or a typo must not park a host forever).
MAX_CRAWL_DELAY_S: Final = 3600.0

RobotsMode = Literal["rules", "allow_all", "disallow_all"]

# Fetch errors after which the file's content is unknown: the host may be down or hostile.
_UNREACHABLE_KINDS: Final = frozenset(
    {"timeout", "connect", "reset", "blocked", "invalid", "decode", "too_large"}
)
_PRODUCT = re.compile(r"[A-Za-z0-9_-]+")
_COMPATIBLE = re.compile(r"compatible;\s*([A-Za-z0-9_-]+)", re.I)


def product_token(user_agent: str) -> str:
    """The product token robots.txt groups are matched against.

    ``TrawlerBot/0.1 (+https://...)`` -> ``TrawlerBot``;
    ``Mozilla/5.0 (compatible; FooBot/1.0; +http://...)`` -> ``FooBot``.
    """
    compatible = _COMPATIBLE.search(user_agent)
    if compatible is not None and user_agent.lstrip().lower().startswith("mozilla/"):
        return compatible.group(1)
    match = _PRODUCT.search(user_agent)
    return match.group(0) if match else "*"


def robots_url(url: str) -> str:
    """The robots.txt URL governing ``url`` (same scheme, host and port)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/robots.txt", "", ""))


def _decode(body: str | bytes | None) -> str:
    if body is None:
        return ""
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    # Bounded in bytes as Google does; a cut multi-byte character becomes U+FFFD. NULs go:
    # they mean nothing in robots.txt and PostgreSQL refuses them in jsonb text.
    text = raw[:MAX_ROBOTS_BYTES].decode("utf-8", "replace").removeprefix("\ufeff")
    return text.replace("\x00", "")


@dataclass(slots=True)
class RobotsPolicy:
    """What one host's robots.txt fetch means for crawling it.

    Build with ``from_response`` (fetch outcome) or ``from_json`` (the cached form). The
    mode follows Google's documented handling:

    - 2xx: the body is parsed (first 500 KiB, UTF-8); an empty or unparsable body allows all;
    - 3xx left unresolved (the fetcher follows redirects; a chain over its limit arrives as
      ``too_many_redirects``) and 4xx other than 429, including 401/403: allow all;
    - 429, 5xx and network failures (timeout, connect, reset, blocked, invalid response,
      undecodable or oversized body): disallow all, for ``ERROR_TTL_S`` only, then retry.

    ``ttl_s`` says how long the answer may be cached: 24 h for a definite answer
    (2xx, 4xx), 10 min for a failure. ``expires_at`` is ``fetched_at + ttl_s``.
    """

    mode: RobotsMode
    status_code: int | None = None
    error_kind: str | None = None
    body: str = ""
    ttl_s: float = SUCCESS_TTL_S
    fetched_at: float = field(default_factory=time.time)
    _parser: Protego | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_response(
        cls,
        status_code: int | None,
        body: str | bytes | None,
        error_kind: str | None,
        *,
        fetched_at: float | None = None,
        error_ttl_s: float = ERROR_TTL_S,
        success_ttl_s: float = SUCCESS_TTL_S,
    ) -> RobotsPolicy:
        """Policy for a fetch of /robots.txt that ended with ``status_code`` (None when no
        response arrived), ``body`` (bytes preferred: robots.txt is UTF-8 whatever its
        Content-Type says) and the fetcher's ``error_kind`` (None, or FetchResult's)."""
        when = time.time() if fetched_at is None else fetched_at
        mode: RobotsMode
        text = ""
        ttl = success_ttl_s
        if error_kind == "too_many_redirects":
            mode = "allow_all"  # Google: past its redirect limit, treated as a 404
        elif error_kind in _UNREACHABLE_KINDS or status_code is None:
            mode, ttl = "disallow_all", error_ttl_s
        elif 200 <= status_code < 300:
            text = _decode(body)
            mode = "rules"
        elif status_code == 429 or status_code >= 500:
            mode, ttl = "disallow_all", error_ttl_s
        else:
            mode = "allow_all"  # 3xx without a usable Location, 4xx (401 and 403 too)
        return cls(
            mode=mode,
            status_code=status_code,
            error_kind=error_kind,
            body=text,
            ttl_s=ttl,
            fetched_at=when,
        )

    @classmethod
    def allow_all(cls) -> RobotsPolicy:
        """For crawls with ``respect_robots`` false."""
        return cls(mode="allow_all")

    @property
    def parser(self) -> Protego | None:
        """The parsed rules (lazily: cached policies are often only checked for expiry)."""
        if self.mode != "rules":
            return None
        if self._parser is None:
            self._parser = Protego.parse(self.body)
        return self._parser

    @property
    def expires_at(self) -> float:
        return self.fetched_at + self.ttl_s

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at

    def allowed(self, url: str, user_agent: str) -> bool:
        """May ``user_agent`` fetch ``url``? Groups are matched on its product token."""
        if self.mode == "allow_all":
            return True
        if self.mode == "disallow_all":
            return False
        parser = self.parser
        assert parser is not None
        return parser.can_fetch(url, product_token(user_agent))

    def crawl_delay(self, user_agent: str) -> float | None:
        """Seconds between requests asked of ``user_agent``'s group (None when unset)."""
        parser = self.parser
        if parser is None:
            return None
        delay = parser.crawl_delay(product_token(user_agent))
        if delay is None or delay != delay or delay < 0:  # unset, NaN or negative
            return None
        return min(float(delay), MAX_CRAWL_DELAY_S)

    @property
    def sitemaps(self) -> list[str]:
        """``Sitemap:`` URLs, in file order (they are site-wide, not per group)."""
        parser = self.parser
        if parser is None:
            return []
        return [url.strip() for url in parser.sitemaps if url.strip()]

    def to_json(self) -> dict[str, Any]:
        """The cacheable form: the raw (bounded) body and the outcome, re-parsed on load."""
        return {
            "mode": self.mode,
            "status_code": self.status_code,
            "error_kind": self.error_kind,
            "body": self.body,
            "ttl_s": self.ttl_s,
            "fetched_at": self.fetched_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RobotsPolicy:
        """Inverse of ``to_json``; raises ValueError for a malformed value."""
        mode = data.get("mode")
        if mode not in ("rules", "allow_all", "disallow_all"):
            raise ValueError(f"invalid robots policy mode: {mode!r}")
        try:
            status = data.get("status_code")
            kind = data.get("error_kind")
            return cls(
                mode=mode,
                status_code=None if status is None else int(status),
                error_kind=None if kind is None else str(kind),
                body=_decode(str(data.get("body") or "")),
                ttl_s=float(data.get("ttl_s", SUCCESS_TTL_S)),
                fetched_at=float(data.get("fetched_at", 0.0)),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid cached robots policy: {exc}") from exc
