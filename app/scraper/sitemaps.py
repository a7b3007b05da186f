"""Sitemaps: bounded, XXE-safe parsing of urlset/index/RSS/Atom/text files and index walking."""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol
from urllib.parse import urljoin, urlsplit, urlunsplit

from lxml import etree

from app.scraper.fetch import FetchResult
from app.scraper.urls import canonicalize_url

__all__ = [
    "MAX_SITEMAP_BYTES",
    "MAX_SITEMAP_URLS",
    "SitemapFetcher",
    "SitemapResult",
    "collect_sitemap_urls",
    "parse_sitemap",
    "sitemap_start_urls",
]

logger = logging.getLogger(__name__)

# The sitemap protocol's limits for one file: 50,000 URLs and 50 MiB uncompressed.
MAX_SITEMAP_URLS: Final = 50_000
MAX_SITEMAP_BYTES: Final = 50 * 1024 * 1024

_GZIP_MAGIC: Final = b"\x1f\x8b"
# Bytes fed to the XML parser between two prunings of its tree (bounds the tree's size).
_CHUNK: Final = 256 * 1024
_UTF8_BOM: Final = b"\xef\xbb\xbf"
_HTTP_PREFIXES: Final = ("http://", "https://")
_UTF16_BOMS: Final = (b"\xff\xfe", b"\xfe\xff")
# Parsing a big file in a worker thread keeps the event loop (heartbeats, other fetches)
# responsive; small files are cheaper to parse inline than to hand over.
_THREAD_THRESHOLD: Final = 256 * 1024
_ROOTS: Final = frozenset({"urlset", "sitemapindex", "rss", "feed"})
# Elements that reach Python (any namespace): the roots' start and the URL carriers' end.
_WANTED_TAGS: Final = ["{*}loc", "{*}link", *(f"{{*}}{name}" for name in _ROOTS)]
# Hostile files can hold millions of <loc> elements (duplicates, image:loc...): each costs
# Python time, so a file stops after this many, whatever they were.
_MAX_EVENTS: Final = 10 * MAX_SITEMAP_URLS


@dataclass(slots=True)
class SitemapResult:
    """Page URLs (``urlset``, RSS, Atom, text) and nested sitemaps (``sitemapindex``)."""

    urls: list[str] = field(default_factory=list)
    sitemaps: list[str] = field(default_factory=list)
    truncated: bool = False  # a size or count bound stopped the parse early
    error: str | None = None  # what was wrong with the file; what came before it is kept


class _Limit(Exception):
    """Internal control flow: a bound was reached."""


def _chunks(body: bytes, max_bytes: int, result: SitemapResult) -> Iterator[bytes]:
    """The file's bytes in pieces: gunzipped when it starts with the gzip magic (detected,
    not trusted from headers), never more than ``max_bytes`` in all."""
    if not body.startswith(_GZIP_MAGIC):
        if len(body) > max_bytes:
            result.truncated = True
        for start in range(0, min(len(body), max_bytes), _CHUNK):
            yield body[start : min(start + _CHUNK, max_bytes)]
        return
    produced = 0
    data = body
    while data.startswith(_GZIP_MAGIC):  # concatenated gzip members are one file
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        while not inflater.eof:
            # max_length bounds memory however well the input compresses (gzip bombs);
            # an empty input still flushes output zlib is holding back.
            piece = inflater.decompress(data, min(_CHUNK, max_bytes - produced + 1))
            data = inflater.unconsumed_tail
            if piece:
                produced += len(piece)
                if produced > max_bytes:
                    result.truncated = True
                    yield piece[: len(piece) - (produced - max_bytes)]
                    return
                yield piece
            elif not data:
                break  # no input left and no progress: the stream ends early
        if not inflater.eof:
            result.error = "truncated gzip stream"
            return
        data = inflater.unused_data


_LOCAL_NAMES: dict[str, str] = {}


def _local(tag: object) -> str:
    # Sitemaps in the wild use the protocol namespace, old ones, or none: match local names.
    if not isinstance(tag, str):
        return ""  # comments and processing instructions
    name = _LOCAL_NAMES.get(tag)
    if name is None:
        name = tag.rpartition("}")[2]
        if len(_LOCAL_NAMES) < 1024:  # bounded: tag names come from untrusted files
            _LOCAL_NAMES[tag] = name
    return name


class _Collector:
    def __init__(self, result: SitemapResult, base_url: str, max_urls: int) -> None:
        self.result = result
        self.base_url = base_url
        self.max_urls = max_urls
        self._seen: set[str] = set()

    def add(self, raw: str | None, *, nested: bool, relative: bool = True) -> None:
        if not raw:
            return
        url = raw.strip()
        if not url:
            return
        if not url[:8].lower().startswith(_HTTP_PREFIXES):
            if not relative:
                return
            try:
                # The protocol wants absolute URLs; relative ones are resolved, not dropped.
                url = urljoin(self.base_url, url)
            except ValueError:
                return
            if not url[:8].lower().startswith(_HTTP_PREFIXES):
                return
        if url in self._seen:
            return
        target = self.result.sitemaps if nested else self.result.urls
        if len(target) >= self.max_urls:
            self.result.truncated = True
            raise _Limit
        self._seen.add(url)
        target.append(url)


def _prune(root: etree._Element) -> None:
    """Drop every finished element: all but the last child on the path of open elements.

    Called between chunks, after their events were handled, so the tree holds about one
    chunk's worth of nodes however many the file has (no event is needed per element).
    """
    node = root
    while len(node):
        if len(node) > 1:
            del node[:-1]
        node = node[-1]


def _parse_xml(chunks: Iterable[bytes], collector: _Collector) -> None:
    parser = etree.XMLPullParser(
        events=("start", "end"),
        tag=_WANTED_TAGS,  # other elements make no Python-level events at all
        # No XXE, no DTD fetching, no billion laughs: entities stay unexpanded references.
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
        recover=True,
        remove_comments=True,
        remove_pis=True,
    )
    root_element: etree._Element | None = None
    root: str | None = None
    result = collector.result
    events = candidates = 0
    try:
        for chunk in chunks:
            parser.feed(chunk)
            for event, element in parser.read_events():
                if root is None:
                    root_element = element.getroottree().getroot()
                    root = _local(root_element.tag)
                    if root not in _ROOTS:
                        result.error = f"not a sitemap: root element <{root}>"
                        return
                if event != "end":
                    continue
                events += 1
                if events > _MAX_EVENTS:
                    result.truncated = True
                    return
                name = _local(element.tag)
                parent = element.getparent()
                parent_name = _local(parent.tag) if parent is not None else ""
                if name == "loc":
                    if parent_name == "url" and root == "urlset":
                        nested = False
                    elif parent_name == "sitemap" and root == "sitemapindex":
                        nested = True
                    else:
                        continue  # image:loc, video:loc and other extensions
                    value = element.text
                elif name == "link" and parent_name == "item" and root == "rss":
                    nested, value = False, element.text
                elif (
                    name == "link"
                    and parent_name == "entry"
                    and root == "feed"
                    and element.get("rel", "alternate") == "alternate"
                ):
                    nested, value = False, element.get("href")
                else:
                    continue
                candidates += 1
                if candidates > MAX_SITEMAP_URLS:  # the protocol's per-file limit, dupes too
                    result.truncated = True
                    return
                collector.add(value, nested=nested)
            if root_element is not None:
                _prune(root_element)
        closed = parser.close()
    except etree.XMLSyntaxError as exc:
        result.error = f"invalid XML: {exc}"
        return
    if root is None:
        name = _local(closed.tag) if closed is not None else ""
        if not name:
            result.error = "no XML root element (empty or unparsable)"
        elif name not in _ROOTS:
            result.error = f"not a sitemap: root element <{name}>"


def _parse_text(chunks: Iterable[bytes], collector: _Collector) -> None:
    # The protocol's text format: one URL per line, UTF-8.
    pending = b""
    for chunk in chunks:
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            collector.add(line.decode("utf-8", "replace"), nested=False, relative=False)
    if not collector.result.truncated:  # else the last line was cut by the size bound
        collector.add(pending.decode("utf-8", "replace"), nested=False, relative=False)


def parse_sitemap(
    body: bytes,
    *,
    base_url: str,
    max_urls: int = MAX_SITEMAP_URLS,
    max_bytes: int = MAX_SITEMAP_BYTES,
) -> SitemapResult:
    """Parse one sitemap file; never raises for bad content (see ``SitemapResult.error``).

    Accepts ``<urlset>`` (page URLs), ``<sitemapindex>`` (nested sitemaps), RSS 2.0 and
    Atom feeds (item/entry links) and plain text (one URL per line), gzip-compressed or
    not (by magic bytes). At most ``max_bytes`` decompressed bytes are read and at most
    ``max_urls`` URLs (and as many nested sitemaps) kept, per the protocol's limits;
    ``truncated`` says a bound was hit. Entities are never expanded and no DTD is loaded,
    so XXE and entity-expansion bombs come out as empty values. Only http(s) URLs are
    kept, in file order without duplicates; ``<image:loc>`` and other extensions are not
    page URLs and are ignored. Relative locations resolve against ``base_url``.
    """
    result = SitemapResult()
    collector = _Collector(result, base_url, max_urls)
    chunks = _chunks(body, max_bytes, result)
    try:
        first = b""
        for first in chunks:
            if first.strip():
                break
        if not first.strip():
            if result.error is None:
                result.error = "empty sitemap"
            return result
        head = first.lstrip(b" \t\r\n")
        stream = _prepend(first, chunks)
        if head.startswith((b"<", _UTF8_BOM, *_UTF16_BOMS)):
            _parse_xml(stream, collector)
        else:
            _parse_text(stream, collector)
    except _Limit:
        pass  # result.truncated is already set
    except zlib.error as exc:
        result.error = f"invalid gzip data: {exc}"
    return result


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


# ---------------------------------------------------------------------------------------------
# Walking sitemap indexes


class SitemapFetcher(Protocol):
    """What collect_sitemap_urls needs: app.scraper.fetch.Fetcher, or a polite wrapper."""

    async def fetch(self, url: str, *, want_bytes: bool = ...) -> FetchResult: ...


def sitemap_start_urls(origin_url: str, robots_sitemaps: Sequence[str] = ()) -> list[str]:
    """Where to look for a site's sitemaps: its robots.txt ``Sitemap:`` lines, else
    ``/sitemap.xml`` at the origin of ``origin_url``."""
    if robots_sitemaps:
        return list(dict.fromkeys(robots_sitemaps))
    parts = urlsplit(origin_url)
    return [urlunsplit((parts.scheme, parts.netloc, "/sitemap.xml", "", ""))]


def _key(url: str) -> str:
    try:
        return canonicalize_url(url)
    except ValueError:
        return url


async def collect_sitemap_urls(
    fetcher: SitemapFetcher,
    start_urls: Sequence[str],
    *,
    max_files: int = 20,
    max_urls: int = MAX_SITEMAP_URLS,
    max_bytes: int = MAX_SITEMAP_BYTES,
) -> list[str]:
    """Page URLs from the sitemaps at ``start_urls``, following indexes breadth-first.

    Fetches at most ``max_files`` files, one at a time (they usually sit on one host, and
    the crawl's own fetches share its politeness budget), and returns at most ``max_urls``
    page URLs, deduplicated in discovery order. Files that fail to fetch or parse are
    logged and skipped: a broken sitemap must not fail the crawl. Note the fetcher's own
    ``max_body_bytes`` also bounds each file (as received, after Content-Encoding).
    """
    queue: deque[str] = deque()
    queued: set[str] = set()
    for url in start_urls:
        key = _key(url)
        if key not in queued:
            queued.add(key)
            queue.append(url)
    found: dict[str, None] = {}  # insertion-ordered set
    files = 0
    while queue and files < max_files and len(found) < max_urls:
        url = queue.popleft()
        files += 1
        fetched = await fetcher.fetch(url, want_bytes=True)
        if not fetched.ok or fetched.body is None:
            logger.warning("sitemap %s skipped: %s", url, fetched.error or "no body")
            continue
        remaining = max_urls - len(found)
        base = fetched.final_url or url
        if len(fetched.body) > _THREAD_THRESHOLD:
            parsed = await asyncio.to_thread(
                parse_sitemap,
                fetched.body,
                base_url=base,
                max_urls=min(remaining, MAX_SITEMAP_URLS),
                max_bytes=max_bytes,
            )
        else:
            parsed = parse_sitemap(
                fetched.body,
                base_url=base,
                max_urls=min(remaining, MAX_SITEMAP_URLS),
                max_bytes=max_bytes,
            )
        if parsed.error is not None:
            logger.warning("sitemap %s: %s", url, parsed.error)
        for page in parsed.urls:
            found.setdefault(page, None)
        for nested in parsed.sitemaps:
            key = _key(nested)
            if key not in queued:
                queued.add(key)
                queue.append(nested)
    if queue and files >= max_files:
        logger.info("sitemap walk stopped at %d files; %d left unread", files, len(queue))
    return list(found)[:max_urls]
