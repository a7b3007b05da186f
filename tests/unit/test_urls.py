"""URL canonicalization: equivalent spellings meet, distinct resources stay apart, query policy."""

from __future__ import annotations

import pytest

from app.scraper.urls import (
    TRACKING_PARAMS,
    QueryPolicy,
    canonicalize_url,
    url_hash,
    url_host,
)

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("variants", "canonical"),
    [
        (
            [
                "http://example.com/",
                "HTTP://EXAMPLE.COM/",
                "http://Example.com:80/",
                "http://example.com",
                "http://example.com/#top",
                "http://example.com/?",
                "http://example.com.:80/?#",
                "  http://example.com/  ",
            ],
            "http://example.com/",
        ),
        (
            ["https://example.com:443/a", "https://example.com/a#x", "https://EXAMPLE.com/a?"],
            "https://example.com/a",
        ),
        (
            [
                "https://example.com/~user/",
                "https://example.com/%7Euser/",
                "https://example.com/%7euser/",
            ],
            "https://example.com/~user/",
        ),
        (
            [
                "https://example.com/a/b/../c/./d",
                "https://example.com/a/./c/d",
                "https://example.com/x/../a/c/d",
                "https://example.com/../a/c/d",
            ],
            "https://example.com/a/c/d",
        ),
        (
            [
                "https://example.com/caf%c3%a9",
                "https://example.com/café",
                "https://example.com/caf%C3%A9",
            ],
            "https://example.com/caf%C3%A9",
        ),
        (
            ["https://example.com/a%2db", "https://example.com/a-b"],
            "https://example.com/a-b",
        ),
        (
            [
                "https://bücher.example/",
                "https://BÜCHER.example/",
                "https://xn--bcher-kva.example/",
            ],
            "https://xn--bcher-kva.example/",
        ),
        (["http://[::1]:8080/x", "http://[::1]:8080/x#f"], "http://[::1]:8080/x"),
    ],
)
def test_equivalent_forms_canonicalize_equal(variants: list[str], canonical: str) -> None:
    for variant in variants:
        assert canonicalize_url(variant) == canonical, variant
    assert len({url_hash(canonicalize_url(v)) for v in variants}) == 1


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("https://example.com/a%2Fb", "https://example.com/a/b"),  # encoded slash is data
        ("https://example.com/a?x=1&y=2", "https://example.com/a?y=2&x=1"),  # order kept
        ("https://example.com/a", "https://example.com/a/"),
        ("https://example.com/A", "https://example.com/a"),  # paths are case-sensitive
        ("http://example.com/", "https://example.com/"),
        ("https://example.com:8443/", "https://example.com/"),
        ("https://example.com/?a", "https://example.com/?a="),
        ("https://example.com/?q=a+b", "https://example.com/?q=a%2Bb"),
        ("https://www.example.com/", "https://example.com/"),
    ],
)
def test_distinct_resources_stay_distinct(left: str, right: str) -> None:
    assert canonicalize_url(left) != canonicalize_url(right)
    assert url_hash(canonicalize_url(left)) != url_hash(canonicalize_url(right))


def test_percent_escapes_are_upper_cased_and_needed_escapes_added() -> None:
    assert canonicalize_url("https://e.com/a%2fb%3a?x=%2f%3d") == "https://e.com/a%2Fb%3A?x=%2F%3D"
    assert canonicalize_url("https://e.com/a b?q=a b") == "https://e.com/a%20b?q=a%20b"
    # a stray "%" is left as browsers leave it (and stays stable)
    assert canonicalize_url("https://e.com/a%zz") == "https://e.com/a%zz"


def test_canonical_form_is_a_fixed_point() -> None:
    for url in [
        "HTTPS://Bücher.Example:443/a/./b/../%7ec?b=2&a=%2f#f",
        "http://e.com/a%2Fb?utm_source=x&b=1",
    ]:
        once = canonicalize_url(url, ignore_query="sort")
        assert canonicalize_url(once, ignore_query="sort") == once


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/", "only http and https"),
        ("mailto:a@example.com", "only http and https"),
        ("/relative/path", "only http and https"),
        ("http:///path", "no host"),
        ("http://user:pw@example.com/", "credentials"),
        ("http://example.com:99999/", "out of range"),
        ("http://example.com:abc/", "(?i)port"),
    ],
)
def test_invalid_urls_raise(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        canonicalize_url(url)


def test_url_host_and_hash() -> None:
    canonical = canonicalize_url("https://WWW.Example.com:8443/x")
    # the politeness key is the origin's host[:port]; a default port is dropped
    assert url_host(canonical) == "www.example.com:8443"
    assert url_host(canonicalize_url("https://WWW.Example.com:443/x")) == "www.example.com"
    assert len(url_hash(canonical)) == 32


# --- query policy ---------------------------------------------------------------------------

URL = "https://e.com/p?b=2&utm_source=news&a=1&utm_medium=mail&fbclid=XYZ&a=0&sessionid=9"


def test_default_keeps_query_including_tracking_params() -> None:
    assert canonicalize_url(URL) == URL
    assert canonicalize_url(URL, ignore_query=False) == URL


def test_strip_all_query() -> None:
    assert canonicalize_url(URL, ignore_query=True) == "https://e.com/p"
    assert canonicalize_url("https://e.com/?a=1#f", ignore_query=True) == "https://e.com/"


def test_sort_is_stable_for_repeated_names() -> None:
    assert (
        canonicalize_url(URL, ignore_query="sort")
        == "https://e.com/p?a=1&a=0&b=2&fbclid=XYZ&sessionid=9&utm_medium=mail&utm_source=news"
    )
    # two orders of the same parameters meet
    assert canonicalize_url("https://e.com/?y=2&x=1", ignore_query="sort") == canonicalize_url(
        "https://e.com/?x=1&y=2", ignore_query="sort"
    )


def test_strip_named_and_glob_parameters() -> None:
    assert (
        canonicalize_url(URL, ignore_query=["utm_*", "SESSIONID"])
        == "https://e.com/p?b=2&a=1&fbclid=XYZ&a=0"
    )
    # names compare in canonical spelling: utm%5Fsource is utm_source
    assert (
        canonicalize_url("https://e.com/?utm%5Fsource=x&k=1", ignore_query=["utm_*"])
        == "https://e.com/?k=1"
    )


def test_tracking_only_when_asked() -> None:
    assert (
        canonicalize_url(URL, ignore_query="tracking") == "https://e.com/p?b=2&a=1&a=0&sessionid=9"
    )
    assert (
        canonicalize_url(URL, ignore_query=[":tracking", "sessionid", ":sort"])
        == "https://e.com/p?a=1&a=0&b=2"
    )
    assert "utm_*" in TRACKING_PARAMS and "gclid" in TRACKING_PARAMS


def test_query_emptied_by_stripping_drops_question_mark() -> None:
    assert canonicalize_url("https://e.com/a?utm_source=x&&", ignore_query="tracking") == (
        "https://e.com/a"
    )


def test_query_policy_parse() -> None:
    assert QueryPolicy.parse(False).is_identity
    assert QueryPolicy.parse(True) == QueryPolicy(strip_all=True)
    assert QueryPolicy.parse("sort") == QueryPolicy(sort=True)
    assert QueryPolicy.parse(["A", ":sort"]) == QueryPolicy(strip=("a",), sort=True)
    policy = QueryPolicy(strip=("x",))
    assert QueryPolicy.parse(policy) is policy
    assert canonicalize_url("https://e.com/?x=1&y=2", ignore_query=policy) == "https://e.com/?y=2"
    for bad in ("everything", ["ok", ""], [1]):
        with pytest.raises(ValueError, match="ignore_query"):
            QueryPolicy.parse(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ignore_query"):
        canonicalize_url("https://e.com/?a=1", ignore_query="bogus")
