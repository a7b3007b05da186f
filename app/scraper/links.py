"""Link discovery for crawls: absolute http(s) URLs a page points to, in document order."""

from __future__ import annotations

from typing import Final
from urllib.parse import urljoin, urlsplit

from selectolax.lexbor import LexborHTMLParser

from app.scraper.extract import Document

__all__ = ["discover_links", "page_nofollow"]

# <a> and <area> are what users click; <link rel=next/prev> is pagination in <head>.
_SELECTOR: Final = 'a[href], area[href], link[href], base[href], meta[name="robots" i][content]'
_PAGINATION_RELS: Final = frozenset({"next", "prev", "previous"})
_HTTP_PREFIXES: Final = ("http://", "https://")
# WHATWG URL parsing removes these anywhere in a URL; browsers follow such hrefs.
_URL_NOISE: Final = str.maketrans("", "", "\t\n\r")
_META_ROBOTS: Final = 'meta[name="robots" i][content]'


def _says_nofollow(content: str | None) -> bool:
    words = (content or "").lower().replace(",", " ").split()
    return "nofollow" in words or "none" in words


def page_nofollow(tree: LexborHTMLParser) -> bool:
    """True when ``<meta name=robots>`` says ``nofollow`` or ``none`` for the whole page."""
    return any(_says_nofollow(node.attributes.get("content")) for node in tree.css(_META_ROBOTS))


def _base_from(href: str | None, page_url: str) -> str:
    # Only an http(s) base is accepted, so a hostile <base href="javascript:..."> cannot
    # turn every relative link into nothing.
    if href:
        href = href.strip().translate(_URL_NOISE)
        if href:
            try:
                candidate = urljoin(page_url, href)
            except ValueError:
                return page_url
            if candidate.lower().startswith(_HTTP_PREFIXES):
                return candidate
    return page_url


class _Resolver:
    """urljoin against one base with fast paths; urljoin costs microseconds per call."""

    __slots__ = ("_base", "_directory", "_no_query", "_origin", "_scheme")

    def __init__(self, base: str) -> None:
        self._base = base
        parts = urlsplit(base)
        self._scheme = parts.scheme.lower()
        self._origin = f"{self._scheme}://{parts.netloc}"
        path = parts.path or "/"
        self._directory = self._origin + path[: path.rfind("/") + 1]
        self._no_query = self._origin + parts.path

    def resolve(self, href: str) -> str | None:
        """Absolute URL for ``href`` (stripped, non-empty) without its fragment, or None
        when it is not an http(s) URL with a host."""
        if "\\" in href or "/." in href or href[0] == ".":
            return self._slow(href)
        first = href[0]
        if first == "/":
            url = f"{self._scheme}:{href}" if href[:2] == "//" else self._origin + href
        elif first == "?":
            url = self._no_query + href
        else:
            colon = href.find(":")
            prefix = href[:colon]
            if colon > 0 and "/" not in prefix and "?" not in prefix and "#" not in prefix:
                scheme = prefix.lower()
                if scheme not in ("http", "https"):
                    return None  # mailto:, javascript:, tel:, data:, ftp:, ...
                if href[colon + 1 : colon + 3] != "//":
                    return self._slow(href)  # "http:page.html" is relative in RFC 3986
                url = scheme + href[colon:]
            else:
                url = self._directory + href
        return _finish(url)

    def _slow(self, href: str) -> str | None:
        if "\\" in href:
            # Browsers read "\" as "/" in http(s) URLs (before the query).
            head, sep, tail = href.partition("?")
            href = head.replace("\\", "/") + sep + tail
        try:
            url = urljoin(self._base, href)
        except ValueError:  # e.g. an unbalanced IPv6 bracket
            return None
        scheme, sep, rest = url.partition(":")
        scheme = scheme.lower()
        if not sep or scheme not in ("http", "https"):
            return None
        return _finish(scheme + ":" + rest)


def _finish(url: str) -> str | None:
    url = url.split("#", 1)[0]
    # "http:///path" and "http://" have no host to fetch from.
    start = url.find("//") + 2
    if start >= len(url) or url[start] in "/?":
        return None
    if "[" in url or "]" in url:
        try:
            urlsplit(url).port  # noqa: B018 - validates IPv6 brackets and the port
        except ValueError:
            return None
    return url


def discover_links(
    html: str | LexborHTMLParser | Document,
    base_url: str,
    *,
    follow_nofollow: bool = False,
    limit: int | None = None,
) -> list[str]:
    """Absolute http(s) URLs to follow from a page, deduplicated, in document order; the
    first `limit` of them (a page of a million links must not take the worker's memory
    and event loop for a minute).

    Sources: ``<a href>``, ``<area href>`` and ``<link rel=next|prev href>`` (both directions
    of pagination: a crawl seeded mid-series still reaches the earlier pages; dedupe makes
    the back links free). Relative hrefs resolve against the first http(s) ``<base href>``,
    else ``base_url`` (the page's final URL). Skipped: ``mailto:``, ``javascript:``,
    ``tel:``, ``data:`` and every other non-http(s) scheme, fragment-only links, and unless
    ``follow_nofollow``: links with ``rel=nofollow`` and all links of a page whose
    ``<meta name=robots>`` says ``nofollow``/``none``. Fragments are dropped; URLs are not
    canonicalized here (the frontier does that, with the job's query policy).

    Pass the LexborHTMLParser or extract.Document already built for extraction to avoid
    parsing the page twice.
    """
    if isinstance(html, Document):
        tree = html.lexbor
    else:
        tree = html if isinstance(html, LexborHTMLParser) else LexborHTMLParser(html)
    # One selector pass over the tree; <base> and <meta robots> apply to the whole page,
    # so they are read before any link is resolved.
    nodes = tree.css(_SELECTOR)
    base = base_url
    base_seen = False
    for node in nodes:
        tag = node.tag
        if tag == "meta":
            if not follow_nofollow and _says_nofollow(node.attributes.get("content")):
                return []
        elif tag == "base" and not base_seen:
            base_seen = True  # HTML: only the first <base href> counts
            base = _base_from(node.attributes.get("href"), base_url)
    resolver = _Resolver(base)
    seen: set[str] = set()
    links: list[str] = []
    for node in nodes:
        if limit is not None and len(links) >= limit:
            break
        tag = node.tag
        attrs = node.attributes
        href = attrs.get("href")
        if not href or tag == "base" or tag == "meta":
            continue
        rel = attrs.get("rel")
        if tag == "link":
            if not rel or _PAGINATION_RELS.isdisjoint(rel.lower().split()):
                continue  # stylesheets, icons, alternates, canonical...
        elif rel and not follow_nofollow and "nofollow" in rel.lower().split():
            continue
        href = href.strip()
        if "\t" in href or "\n" in href or "\r" in href:
            href = href.translate(_URL_NOISE)
        if not href or href[0] == "#":
            continue  # fragment-only: the same document
        url = resolver.resolve(href)
        if url is not None and url not in seen:
            seen.add(url)
            links.append(url)
    return links
