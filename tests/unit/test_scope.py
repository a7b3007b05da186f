"""Crawl scope: hosts (same site, www, subdomains, external), patterns, depth and trap guards."""

from __future__ import annotations

import pytest

from app.scraper.scope import CrawlScope, registrable_domain, site_host

pytestmark = pytest.mark.timeout(10)


def test_registrable_domain_uses_the_bundled_public_suffix_list() -> None:
    assert registrable_domain("www.shop.example.co.uk") == "example.co.uk"
    assert registrable_domain("a.b.example.com") == "example.com"
    assert registrable_domain("EXAMPLE.com.") == "example.com"
    # private suffixes separate sites hosted under one provider
    assert registrable_domain("alice.github.io") == "alice.github.io"
    assert registrable_domain("bob.github.io") != registrable_domain("alice.github.io")
    # hosts that have no registrable part are their own
    assert registrable_domain("localhost") == "localhost"
    assert registrable_domain("127.0.0.1") == "127.0.0.1"
    assert registrable_domain("::1") == "::1"
    assert registrable_domain("co.uk") == "co.uk"


def test_site_host_ignores_www() -> None:
    assert site_host("WWW.Example.com") == "example.com"
    assert site_host("www2.example.com") == "www2.example.com"


def test_same_site_default_treats_www_as_the_same_host() -> None:
    scope = CrawlScope(["https://www.example.com/start"])
    assert scope.admits("https://www.example.com/a", 1) is None
    assert scope.admits("https://example.com/a", 1) is None
    assert scope.admits("http://example.com/a", 1) is None  # scheme does not change the site
    assert scope.admits("https://example.com:8443/a", 1) is None
    assert scope.admits("https://shop.example.com/a", 1) == "external host"
    assert scope.admits("https://example.org/a", 1) == "external host"
    assert scope.admits("https://notexample.com/a", 1) == "external host"


def test_any_seed_host_is_in_scope() -> None:
    scope = CrawlScope(["https://a.example/", "https://b.example/x"])
    assert scope.admits("https://a.example/1", 1) is None
    assert scope.admits("https://b.example/2", 1) is None
    assert scope.admits("https://c.example/3", 1) == "external host"


def test_subdomains_opt_in_uses_registrable_domain() -> None:
    scope = CrawlScope(["https://www.example.co.uk/"], allow_subdomains=True)
    assert scope.admits("https://shop.example.co.uk/a", 1) is None
    assert scope.admits("https://deep.er.example.co.uk/a", 1) is None
    assert scope.admits("https://example.co.uk/a", 1) is None
    assert scope.admits("https://other.co.uk/a", 1) == "external host"
    gh = CrawlScope(["https://alice.github.io/"], allow_subdomains=True)
    assert gh.admits("https://blog.alice.github.io/", 1) is None
    assert gh.admits("https://bob.github.io/", 1) == "external host"


def test_external_allowed_when_asked() -> None:
    for scope in (
        CrawlScope(["https://example.com/"], allow_external=True),
        CrawlScope(["https://example.com/"], same_site=False),
    ):
        assert scope.admits("https://anything.example.net/x", 1) is None


def test_include_and_exclude_patterns_on_the_absolute_url() -> None:
    scope = CrawlScope(
        ["https://shop.example/"],
        include=[r"/products?/", r"/category/"],
        exclude=[r"\?sort=", r"/products/secret"],
    )
    assert scope.admits("https://shop.example/products/1", 1) is None
    assert scope.admits("https://shop.example/product/2", 1) is None
    assert scope.admits("https://shop.example/category/shoes", 1) is None
    assert scope.admits("https://shop.example/about", 1) == "not matched by include patterns"
    assert scope.admits("https://shop.example/category/x?sort=asc", 1) == "excluded by pattern"
    assert scope.admits("https://shop.example/products/secret/1", 1) == "excluded by pattern"
    # patterns see the scheme and host too
    only_https = CrawlScope(["https://shop.example/"], include=[r"^https://shop\.example/"])
    assert only_https.admits("http://shop.example/x", 1) == "not matched by include patterns"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"include": ["("]}, "invalid include pattern '\\('"),
        ({"exclude": ["[a-"]}, "invalid exclude pattern"),
        ({"exclude": ["a" * 1001]}, "longer than 1000"),
        ({"include": ["x"] * 101}, "too many include patterns"),
        ({"max_depth": -1}, "max_depth"),
        ({"max_repeated_segments": 0}, "max_repeated_segments"),
        ({"ignore_query": "nonsense"}, "ignore_query"),
    ],
)
def test_invalid_options_raise_value_error(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        CrawlScope(["https://example.com/"], **kwargs)  # type: ignore[arg-type]


def test_seeds_must_be_valid_urls() -> None:
    with pytest.raises(ValueError, match="at least one seed"):
        CrawlScope([])
    with pytest.raises(ValueError, match="invalid seed 'ftp://x'"):
        CrawlScope(["ftp://x"])
    with pytest.raises(ValueError, match="list of URLs"):
        CrawlScope("https://example.com/")


def test_max_depth() -> None:
    scope = CrawlScope(["https://example.com/"], max_depth=2)
    assert scope.admits("https://example.com/a", 0) is None
    assert scope.admits("https://example.com/a", 2) is None
    assert scope.admits("https://example.com/a", 3) == "too deep"
    assert CrawlScope(["https://example.com/"]).admits("https://example.com/a", 10_000) is None


def test_calendar_trap_is_bounded_by_depth() -> None:
    scope = CrawlScope(["https://example.com/calendar/2024/01"], max_depth=3)
    admitted = 0
    # every month page links to the next month, forever; depth grows by one per hop
    for depth, month in enumerate(range(2, 200), start=1):
        url = f"https://example.com/calendar/{2024 + month // 12}/{month % 12 + 1:02d}"
        if scope.admits(url, depth) is not None:
            break
        admitted += 1
    assert admitted == 3


def test_url_length_limit() -> None:
    scope = CrawlScope(["https://example.com/"], max_url_length=64)
    base = "https://example.com/"
    assert scope.admits(base + "a" * (64 - len(base)), 1) is None
    assert scope.admits(base + "a" * (65 - len(base)), 1) == "url too long"
    default = CrawlScope(["https://example.com/"])
    assert default.admits(base + "x" * 3000, 1) == "url too long"


@pytest.mark.parametrize(
    ("path", "trapped"),
    [
        ("/x/x/x", False),
        ("/x/x/x/x", True),
        ("/a/b/a/b", False),
        ("/a/b/a/b/a/b", True),
        ("/a/b/c/a/b/c/a/b/c", True),
        ("/shop/a/shop/b/shop/c", False),
        ("/shop/a/shop/b/shop/c/shop/d", True),
        ("/2024/01/01/post", False),
        ("/docs/v1/docs/v2/guide", False),
        ("/a//////b", False),
        ("/p/q/r/s/t/u/v/w", False),
    ],
)
def test_repeated_path_segments(path: str, trapped: bool) -> None:
    scope = CrawlScope(["https://example.com/"])
    reason = scope.admits("https://example.com" + path, 1)
    assert (reason == "repeated path segment") is trapped, reason


def test_repeated_segment_limit_is_configurable() -> None:
    strict = CrawlScope(["https://example.com/"], max_repeated_segments=1)
    assert strict.admits("https://example.com/a/a", 1) == "repeated path segment"
    assert strict.admits("https://example.com/a/b/a", 1) == "repeated path segment"
    assert strict.admits("https://example.com/a/b", 1) is None


def test_canonicalize_applies_the_query_policy() -> None:
    scope = CrawlScope(["https://Example.com/?utm_source=x"], ignore_query=[":tracking", ":sort"])
    assert scope.seeds == ("https://example.com/",)
    assert scope.canonicalize("https://example.com/p?b=1&utm_medium=m&a=2#f") == (
        "https://example.com/p?a=2&b=1"
    )
    with pytest.raises(ValueError, match="only http"):
        scope.canonicalize("mailto:x@example.com")


def test_non_http_urls_are_refused() -> None:
    scope = CrawlScope(["https://example.com/"], allow_external=True)
    assert scope.admits("ftp://example.com/x", 1) == "not an http(s) url"
    assert scope.admits("https:///nohost", 1) == "not an http(s) url"
    assert scope.admits("http://[::1/x", 1) == "not an http(s) url"
