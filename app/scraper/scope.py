"""Crawl scope: which discovered URLs a crawl follows (hosts, patterns, depth, trap guards)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Final
from urllib.parse import urlsplit

from publicsuffixlist import PublicSuffixList

from app.scraper.urls import IgnoreQuery, QueryPolicy, canonicalize_url

__all__ = [
    "MAX_PATTERNS",
    "MAX_PATTERN_CHARS",
    "CrawlScope",
    "registrable_domain",
    "site_host",
]

MAX_PATTERNS: Final = 100
MAX_PATTERN_CHARS: Final = 1000
# A block of segments repeated back-to-back this many times is a loop (/a/b/a/b/a/b);
# longer blocks than this are not looked for (traps repeat short relative links).
_MAX_BLOCK: Final = 6

# Reasons returned by CrawlScope.admits (stable strings: stored as the skip reason).
URL_TOO_LONG: Final = "url too long"
TOO_DEEP: Final = "too deep"
NOT_HTTP: Final = "not an http(s) url"
EXTERNAL_HOST: Final = "external host"
EXCLUDED: Final = "excluded by pattern"
NOT_INCLUDED: Final = "not matched by include patterns"
REPEATED_SEGMENT: Final = "repeated path segment"


@lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    # The list ships inside the package (no network); loading it takes ~50 ms, so once.
    return PublicSuffixList()


@lru_cache(maxsize=4096)
def registrable_domain(host: str) -> str:
    """The registrable domain ("eTLD+1") of ``host`` per the bundled Public Suffix List.

    ``www.shop.example.co.uk`` -> ``example.co.uk``; private suffixes count, so two
    ``*.github.io`` sites are different sites. IP addresses, single labels (``localhost``)
    and bare public suffixes are their own registrable domain.
    """
    host = host.lower().strip("[]").rstrip(".")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass  # a name, not an address: ask the suffix list
    else:
        return host
    return _psl().privatesuffix(host) or host


def site_host(host: str) -> str:
    """``host`` lower-cased without a leading ``www.``: the same site for ``same_site``."""
    host = host.lower().rstrip(".")
    return host[4:] if host.startswith("www.") else host


def _compile(patterns: Iterable[str], kind: str) -> tuple[re.Pattern[str], ...]:
    compiled: list[re.Pattern[str]] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"{kind} pattern must be a string, got {pattern!r}")
        if len(pattern) > MAX_PATTERN_CHARS:
            raise ValueError(f"{kind} pattern is longer than {MAX_PATTERN_CHARS} characters")
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise ValueError(f"invalid {kind} pattern {pattern!r}: {exc}") from exc
    if len(compiled) > MAX_PATTERNS:
        raise ValueError(f"too many {kind} patterns: {len(compiled)} (at most {MAX_PATTERNS})")
    return tuple(compiled)


def _repeated(segments: list[str], limit: int) -> bool:
    """True when one segment occurs more than ``limit`` times, or a block of 2 or more
    segments occurs ``limit`` times back-to-back."""
    counts: dict[str, int] = {}
    for segment in segments:
        counts[segment] = counts.get(segment, 0) + 1
        if counts[segment] > limit:
            return True
    if len(counts) == len(segments):
        return False  # no segment twice: no block can repeat either
    n = len(segments)
    for size in range(2, min(_MAX_BLOCK, n // limit) + 1):
        run = 0  # positions so far where segments[i] == segments[i - size]
        for i in range(size, n):
            if segments[i] == segments[i - size]:
                run += 1
                if run >= size * (limit - 1):
                    return True
            else:
                run = 0
    return False


class CrawlScope:
    """The follow rules of one crawl job, compiled once; ``admits`` is called per link.

    - Hosts: ``same_site`` (default) admits the seeds' hosts, ``www.`` ignored
      (``example.com`` == ``www.example.com``); ``allow_subdomains`` widens that to every
      host under a seed's registrable domain (``shop.example.co.uk`` for a seed on
      ``example.co.uk``); ``same_site=False`` or ``allow_external=True`` admits any host.
    - ``include``/``exclude``: regular expressions searched (``re.search``) in the
      canonical absolute URL; exclude wins; with include patterns a URL must match one.
    - ``max_depth``: seeds are depth 0; a link found on a depth-d page has depth d + 1.
      None means unlimited. This also bounds calendar-style infinite spaces.
    - Trap guards: URLs longer than ``max_url_length`` characters; a path segment that
      occurs more than ``max_repeated_segments`` times (``/x/x/x/x`` with 3), or a block
      of segments repeated back-to-back that many times (``/a/b/a/b/a/b``).
    - ``ignore_query``: the job's query policy (see urls.QueryPolicy.parse), applied by
      ``canonicalize``.

    Invalid patterns or options raise ValueError with a message fit for a 422.
    """

    __slots__ = (
        "_exclude",
        "_include",
        "_seed_domains",
        "_seed_hosts",
        "allow_external",
        "allow_subdomains",
        "max_depth",
        "max_repeated_segments",
        "max_url_length",
        "query_policy",
        "same_site",
        "seeds",
    )

    def __init__(
        self,
        seeds: Sequence[str],
        *,
        same_site: bool = True,
        allow_subdomains: bool = False,
        allow_external: bool = False,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        max_depth: int | None = None,
        max_url_length: int = 2048,
        max_repeated_segments: int = 3,
        ignore_query: IgnoreQuery = False,
    ) -> None:
        if isinstance(seeds, str):
            raise ValueError("seeds must be a list of URLs, not one string")
        if max_depth is not None and max_depth < 0:
            raise ValueError("max_depth must be >= 0")
        if max_url_length < 16:
            raise ValueError("max_url_length must be at least 16")
        if max_repeated_segments < 1:
            raise ValueError("max_repeated_segments must be >= 1")
        self.query_policy = QueryPolicy.parse(ignore_query)
        self.same_site = same_site
        self.allow_subdomains = allow_subdomains
        self.allow_external = allow_external or not same_site
        self.max_depth = max_depth
        self.max_url_length = max_url_length
        self.max_repeated_segments = max_repeated_segments
        self._include = _compile(include, "include")
        self._exclude = _compile(exclude, "exclude")
        canonical: list[str] = []
        for seed in seeds:
            try:
                canonical.append(self.canonicalize(seed))
            except ValueError as exc:
                raise ValueError(f"invalid seed {seed!r}: {exc}") from exc
        if not canonical:
            raise ValueError("at least one seed URL is required")
        self.seeds = tuple(canonical)
        hosts = [urlsplit(url).hostname or "" for url in canonical]
        self._seed_hosts = frozenset(site_host(host) for host in hosts)
        self._seed_domains = frozenset(registrable_domain(host) for host in hosts)

    def canonicalize(self, url: str) -> str:
        """The job's canonical form of ``url`` (raises ValueError when it has none)."""
        return canonicalize_url(url, ignore_query=self.query_policy)

    def host_in_scope(self, host: str) -> bool:
        if self.allow_external:
            return True
        if site_host(host) in self._seed_hosts:
            return True
        return self.allow_subdomains and registrable_domain(host) in self._seed_domains

    def admits(self, url: str, depth: int) -> str | None:
        """None when ``url`` (canonical, see ``canonicalize``) at ``depth`` is in scope,
        else a short reason: "url too long", "too deep", "not an http(s) url",
        "external host", "excluded by pattern", "not matched by include patterns",
        "repeated path segment". Cheapest checks run first."""
        if len(url) > self.max_url_length:
            return URL_TOO_LONG
        if self.max_depth is not None and depth > self.max_depth:
            return TOO_DEEP
        try:
            parts = urlsplit(url)
            host = parts.hostname
        except ValueError:
            return NOT_HTTP
        if parts.scheme not in ("http", "https") or not host:
            return NOT_HTTP
        if not self.host_in_scope(host):
            return EXTERNAL_HOST
        if any(pattern.search(url) for pattern in self._exclude):
            return EXCLUDED
        if self._include and not any(pattern.search(url) for pattern in self._include):
            return NOT_INCLUDED
        segments = [segment for segment in parts.path.split("/") if segment]
        if len(segments) > self.max_repeated_segments and _repeated(
            segments, self.max_repeated_segments
        ):
            return REPEATED_SEGMENT
        return None
