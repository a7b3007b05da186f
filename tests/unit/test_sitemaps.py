"""Sitemap parsing: urlset, index, gzip, text, feeds, bounds, broken and hostile XML."""

from __future__ import annotations

import gzip
import time
import tracemalloc
from pathlib import Path

import pytest

from app.scraper.sitemaps import (
    MAX_SITEMAP_URLS,
    parse_sitemap,
    sitemap_start_urls,
)

pytestmark = pytest.mark.timeout(30)

BASE = "https://shop.example/sitemap.xml"

URLSET = b"""<?xml version="1.0" encoding="UTF-8"?>
<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9"
        xmlns:image="http://www.google.com/schemas/sitemap-image/1.1">
  <url>
    <loc>https://shop.example/p/1</loc>
    <lastmod>2024-01-01</lastmod>
    <image:image><image:loc>https://shop.example/img/1.png</image:loc></image:image>
  </url>
  <url><loc>
      https://shop.example/p/2?a=1&amp;b=2
  </loc></url>
  <url><loc>https://shop.example/p/1</loc></url>
  <url><loc>/p/relative</loc></url>
  <url><loc>ftp://files.example/x</loc></url>
  <url><loc></loc></url>
  <url><loc><![CDATA[https://shop.example/p/cdata]]></loc></url>
</urlset>
"""

EXPECTED = [
    "https://shop.example/p/1",
    "https://shop.example/p/2?a=1&b=2",
    "https://shop.example/p/relative",
    "https://shop.example/p/cdata",
]

INDEX = b"""<?xml version="1.0" encoding="UTF-8"?>
<sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">
  <sitemap><loc>https://shop.example/sitemap-products.xml.gz</loc><lastmod>2024-01-01</lastmod></sitemap>
  <sitemap><loc>https://shop.example/sitemap-pages.xml</loc></sitemap>
</sitemapindex>
"""


def test_urlset() -> None:
    result = parse_sitemap(URLSET, base_url=BASE)
    assert result.urls == EXPECTED  # image:loc is not a page; dupes, ftp and empty dropped
    assert result.sitemaps == []
    assert not result.truncated
    assert result.error is None


def test_urlset_without_namespace_and_with_bom() -> None:
    body = b"\xef\xbb\xbf  \n<urlset><url><loc>https://a.example/x</loc></url></urlset>"
    assert parse_sitemap(body, base_url=BASE).urls == ["https://a.example/x"]


def test_declared_encoding_is_honoured() -> None:
    body = (
        '<?xml version="1.0" encoding="ISO-8859-1"?>'
        "<urlset><url><loc>https://a.example/caf\u00e9</loc></url></urlset>"
    ).encode("latin-1")
    assert parse_sitemap(body, base_url=BASE).urls == ["https://a.example/caf\u00e9"]


def test_sitemap_index() -> None:
    result = parse_sitemap(INDEX, base_url=BASE)
    assert result.sitemaps == [
        "https://shop.example/sitemap-products.xml.gz",
        "https://shop.example/sitemap-pages.xml",
    ]
    assert result.urls == []


def test_gzip_detected_by_magic_bytes_not_name() -> None:
    result = parse_sitemap(gzip.compress(URLSET), base_url="https://shop.example/sitemap")
    assert result.urls == EXPECTED
    assert parse_sitemap(gzip.compress(INDEX), base_url=BASE).sitemaps[0].endswith(".xml.gz")


def test_concatenated_gzip_members_are_one_file() -> None:
    half = len(URLSET) // 2
    body = gzip.compress(URLSET[:half]) + gzip.compress(URLSET[half:])
    assert parse_sitemap(body, base_url=BASE).urls == EXPECTED


def test_truncated_or_corrupt_gzip_reports_an_error_without_raising() -> None:
    cut = parse_sitemap(gzip.compress(URLSET)[:-30], base_url=BASE)
    assert cut.error == "truncated gzip stream"
    corrupt = parse_sitemap(b"\x1f\x8b\x08\x00garbage-garbage", base_url=BASE)
    assert corrupt.urls == []
    assert corrupt.error is not None
    assert "gzip" in corrupt.error


def test_plain_text_sitemap() -> None:
    body = (
        b"https://shop.example/a\r\n"
        b"  https://shop.example/b  \n"
        b"\n"
        b"not a url\n"
        b"/relative/is/not/allowed/in/text\n"
        b"https://shop.example/a\n"
        b"https://shop.example/caf\xc3\xa9"
    )
    assert parse_sitemap(body, base_url=BASE).urls == [
        "https://shop.example/a",
        "https://shop.example/b",
        "https://shop.example/caf\u00e9",
    ]
    gz = parse_sitemap(gzip.compress(body), base_url=BASE)
    assert len(gz.urls) == 3


def test_rss_and_atom_feeds() -> None:
    rss = b"""<?xml version="1.0"?><rss version="2.0"><channel>
      <link>https://shop.example/</link>
      <item><title>A</title><link>https://shop.example/news/a</link></item>
      <item><link>https://shop.example/news/b</link></item>
    </channel></rss>"""
    assert parse_sitemap(rss, base_url=BASE).urls == [
        "https://shop.example/news/a",
        "https://shop.example/news/b",
    ]
    atom = b"""<?xml version="1.0"?><feed xmlns="http://www.w3.org/2005/Atom">
      <link href="https://shop.example/feed" rel="self"/>
      <entry><link href="https://shop.example/post/1"/></entry>
      <entry><link rel="alternate" href="https://shop.example/post/2"/>
             <link rel="enclosure" href="https://shop.example/file.mp3"/></entry>
    </feed>"""
    assert parse_sitemap(atom, base_url=BASE).urls == [
        "https://shop.example/post/1",
        "https://shop.example/post/2",
    ]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", "empty sitemap"),
        (b"   \n\t ", "empty sitemap"),
        (b"<html><head><title>404</title></head><body>nope</body></html>", "not a sitemap"),
        (b"<<<>>>", "no XML root"),
    ],
)
def test_not_a_sitemap(body: bytes, error: str) -> None:
    result = parse_sitemap(body, base_url=BASE)
    assert result.urls == []
    assert result.error is not None
    assert error in result.error


def test_invalid_xml_keeps_what_came_before() -> None:
    body = (
        b"<urlset><url><loc>https://a.example/1</loc></url>"
        b"<url><loc>https://a.example/2</loc></url><url><loc>https://a.ex"
    )
    result = parse_sitemap(body, base_url=BASE)
    assert result.urls[:2] == ["https://a.example/1", "https://a.example/2"]
    mismatched = parse_sitemap(
        b"<urlset><url><loc>https://a.example/1</loc></url></wrong><url>", base_url=BASE
    )
    assert mismatched.urls == ["https://a.example/1"]


def test_xxe_external_entity_is_not_resolved(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-VALUE")
    dtd = tmp_path / "evil.dtd"
    dtd.write_text(f'<!ENTITY leak SYSTEM "file://{secret}">')
    body = f"""<?xml version="1.0"?>
<!DOCTYPE urlset [
  <!ENTITY xxe SYSTEM "file://{secret}">
  <!ENTITY % remote SYSTEM "file://{dtd}">
  %remote;
  <!ENTITY net SYSTEM "http://127.0.0.1:9/steal">
]>
<urlset>
  <url><loc>https://a.example/&xxe;</loc></url>
  <url><loc>&xxe;</loc></url>
  <url><loc>https://a.example/&leak;</loc></url>
  <url><loc>https://a.example/&net;</loc></url>
  <url><loc>https://a.example/ok</loc></url>
</urlset>""".encode()
    result = parse_sitemap(body, base_url=BASE)
    assert "TOP-SECRET-VALUE" not in repr(result)
    assert "https://a.example/ok" in result.urls


def test_billion_laughs_is_harmless_and_quick() -> None:
    entities = '<!ENTITY lol0 "lollollollollollollollollollol">' + "".join(
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)
    )
    body = (
        f'<?xml version="1.0"?><!DOCTYPE urlset [{entities}]>'
        "<urlset><url><loc>https://a.example/&lol9;</loc></url>"
        "<url><loc>https://a.example/fine</loc></url></urlset>"
    ).encode()
    started = time.perf_counter()
    result = parse_sitemap(body, base_url=BASE)
    assert time.perf_counter() - started < 2
    # libxml2 gives up on the file at the entity; nothing is ever expanded
    assert all(len(url) < 100 for url in result.urls)
    assert "lollol" not in repr(result)


def test_url_count_bound() -> None:
    body = (
        b"<urlset>"
        + b"".join(
            b"<url><loc>https://a.example/p/%d</loc></url>" % i for i in range(MAX_SITEMAP_URLS + 5)
        )
        + b"</urlset>"
    )
    result = parse_sitemap(body, base_url=BASE)
    assert len(result.urls) == MAX_SITEMAP_URLS == 50_000
    assert result.urls[-1] == "https://a.example/p/49999"
    assert result.truncated
    small = parse_sitemap(body, base_url=BASE, max_urls=3)
    assert small.urls == [f"https://a.example/p/{i}" for i in range(3)]
    assert small.truncated


def test_plain_size_bound() -> None:
    body = b"".join(b"https://a.example/p/%d\n" % i for i in range(1000))
    result = parse_sitemap(body, base_url=BASE, max_bytes=100)
    assert result.truncated
    # 100 bytes hold four whole lines; the cut fifth line is not taken as a URL
    assert result.urls == [f"https://a.example/p/{i}" for i in range(4)]
    xml = b"<urlset>" + b"".join(
        b"<url><loc>https://a.example/p/%d</loc></url>" % i for i in range(9)
    )
    cut = parse_sitemap(xml + b"</urlset>", base_url=BASE, max_bytes=len(xml) - 10)
    assert cut.truncated
    assert cut.urls == [f"https://a.example/p/{i}" for i in range(8)]


def test_gzip_bomb_is_bounded_in_size_and_memory() -> None:
    # ~60 MiB of XML that gzips to well under 1 MiB: past the protocol's 50 MiB limit
    record = b"<url><loc>https://a.example/p</loc></url>"
    inflated = b"<urlset>" + record * (60 * 1024 * 1024 // len(record)) + b"</urlset>"
    bomb = gzip.compress(inflated, compresslevel=1)
    del inflated
    assert len(bomb) < 1024 * 1024
    tracemalloc.start()
    try:
        result = parse_sitemap(bomb, base_url=BASE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.truncated
    assert result.urls == ["https://a.example/p"]
    assert peak < 16 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB: the body was not streamed"


def test_sitemap_start_urls() -> None:
    assert sitemap_start_urls("https://shop.example:8443/a/b?c") == [
        "https://shop.example:8443/sitemap.xml"
    ]
    assert sitemap_start_urls(
        "https://shop.example/", ["https://shop.example/s1.xml", "https://shop.example/s1.xml"]
    ) == ["https://shop.example/s1.xml"]
