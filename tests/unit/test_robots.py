"""robots.txt policy: Google's status rules, groups, wildcards, crawl-delay, sitemaps, caching."""

from __future__ import annotations

import orjson
import pytest

from app.scraper.fetch import DEFAULT_USER_AGENT
from app.scraper.robots import (
    ERROR_TTL_S,
    MAX_ROBOTS_BYTES,
    SUCCESS_TTL_S,
    RobotsPolicy,
    product_token,
    robots_url,
)

pytestmark = pytest.mark.timeout(10)

UA = DEFAULT_USER_AGENT  # "TrawlerBot/0.1 (+https://...)"
SITE = "https://shop.example"


def policy(body: str | bytes, status: int = 200) -> RobotsPolicy:
    return RobotsPolicy.from_response(status, body, None)


def test_product_token() -> None:
    assert product_token(UA) == "TrawlerBot"
    assert product_token("Mozilla/5.0 (compatible; FooBot/2.1; +http://foo)") == "FooBot"
    assert product_token("curl/8.0") == "curl"
    assert product_token("") == "*"


def test_robots_url() -> None:
    assert robots_url("https://shop.example:8443/a/b?c#d") == "https://shop.example:8443/robots.txt"


@pytest.mark.parametrize(
    ("rules", "path", "allowed"),
    [
        # Google's documented examples
        ("Disallow: /fish*", "/fish", False),
        ("Disallow: /fish*", "/fish.html", False),
        ("Disallow: /fish*", "/fishheads/yummy.html", False),
        ("Disallow: /fish*", "/Fish.asp", True),
        ("Disallow: /*.php$", "/filename.php", False),
        ("Disallow: /*.php$", "/folder/filename.php", False),
        ("Disallow: /*.php$", "/filename.php?parameters", True),
        ("Disallow: /*.php$", "/filename.php5", True),
        ("Disallow: /*.gif$", "/img/a.gif", False),
        ("Disallow: /*.gif$", "/img/a.gif?size=2", True),
        ("Disallow: /fish/", "/fish/salmon.htm", False),
        ("Disallow: /fish/", "/fish", True),
        ("Disallow: /*?", "/page?x=1", False),
        ("Disallow: /*?", "/page", True),
        # precedence: the longest match wins, a tie goes to Allow
        ("Allow: /p\nDisallow: /", "/page", True),
        ("Allow: /folder\nDisallow: /folder", "/folder/page", True),
        ("Allow: /page\nDisallow: /*.html", "/page.html", False),
        ("Allow: /$\nDisallow: /", "/", True),
        ("Allow: /$\nDisallow: /", "/page.htm", False),
        ("Disallow: /private/\nAllow: /private/public/", "/private/public/x", True),
        ("Disallow: /private/\nAllow: /private/public/", "/private/other", False),
        # an empty Disallow allows everything
        ("Disallow:", "/anything", True),
        # percent-encoding compares equal to the character
        ("Disallow: /caf%C3%A9", "/café", False),
    ],
)
def test_allow_disallow_with_wildcards(rules: str, path: str, allowed: bool) -> None:
    robots = policy(f"User-agent: *\n{rules}\n")
    assert robots.mode == "rules"
    assert robots.allowed(SITE + path, UA) is allowed


GROUPS = """
# comment line
User-agent: *
Disallow: /private/
Crawl-delay: 1

User-agent: TrawlerBot
Disallow: /no-trawler/
Crawl-delay: 2.5

User-agent: OtherBot
User-agent: ThirdBot
Disallow: /

Sitemap: https://shop.example/sitemap.xml
Sitemap: https://shop.example/news-sitemap.xml.gz
"""


def test_user_agent_group_matched_by_product_token() -> None:
    robots = policy(GROUPS)
    # TrawlerBot has its own group: the * group does not apply to it at all
    assert robots.allowed(SITE + "/private/x", UA)
    assert not robots.allowed(SITE + "/no-trawler/x", UA)
    assert not robots.allowed(SITE + "/no-trawler/x", "trawlerbot")  # case-insensitive
    assert robots.crawl_delay(UA) == 2.5
    # an unnamed agent falls back to *
    assert not robots.allowed(SITE + "/private/x", "SomeCrawler/1.0")
    assert robots.allowed(SITE + "/no-trawler/x", "SomeCrawler/1.0")
    assert robots.crawl_delay("SomeCrawler/1.0") == 1.0
    # a group can name several agents
    assert not robots.allowed(SITE + "/x", "OtherBot/3")
    assert not robots.allowed(SITE + "/x", "ThirdBot")
    assert robots.crawl_delay("OtherBot") is None
    # a token that only contains a group's name elsewhere does not match that group
    assert not robots.allowed(SITE + "/private/x", "NotTrawlerBot/1.0")


def test_browser_style_user_agent_matches_its_compatible_token() -> None:
    robots = policy(GROUPS)
    ua = "Mozilla/5.0 (compatible; TrawlerBot/0.1; +https://example.org/bot)"
    assert not robots.allowed(SITE + "/no-trawler/x", ua)
    assert robots.allowed(SITE + "/private/x", ua)


def test_sitemaps_lines_in_file_order() -> None:
    assert policy(GROUPS).sitemaps == [
        "https://shop.example/sitemap.xml",
        "https://shop.example/news-sitemap.xml.gz",
    ]
    assert RobotsPolicy.from_response(404, None, None).sitemaps == []


def test_no_matching_group_allows_all() -> None:
    robots = policy("User-agent: OtherBot\nDisallow: /\n")
    assert robots.allowed(SITE + "/x", UA)
    assert robots.crawl_delay(UA) is None


def test_crawl_delay_is_sanitised() -> None:
    assert policy("User-agent: *\nCrawl-delay: 99999\n").crawl_delay(UA) == 3600.0
    assert policy("User-agent: *\nCrawl-delay: soon\n").crawl_delay(UA) is None
    assert policy("User-agent: *\nCrawl-delay: -3\n").crawl_delay(UA) is None
    assert policy("User-agent: *\nCrawl-delay: nan\n").crawl_delay(UA) is None


def test_success_parses_with_long_ttl() -> None:
    robots = RobotsPolicy.from_response(
        200, "User-agent: *\nDisallow: /x\n", None, fetched_at=100.0
    )
    assert robots.mode == "rules"
    assert robots.ttl_s == SUCCESS_TTL_S == 86_400
    assert robots.expires_at == 100.0 + SUCCESS_TTL_S
    assert not robots.expired(now=100.0 + SUCCESS_TTL_S - 1)
    assert robots.expired(now=100.0 + SUCCESS_TTL_S)


def test_empty_or_garbage_body_allows_all() -> None:
    for body in ("", None, b"\x00\x01\x02binary junk", "<html><body>Not found</body></html>"):
        robots = RobotsPolicy.from_response(200, body, None)
        assert robots.allowed(SITE + "/anything", UA)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 451, 499])
def test_client_errors_allow_all(status: int) -> None:
    robots = RobotsPolicy.from_response(status, "User-agent: *\nDisallow: /\n", "http")
    assert robots.mode == "allow_all"
    assert robots.allowed(SITE + "/anything", UA)
    assert robots.ttl_s == SUCCESS_TTL_S
    assert robots.crawl_delay(UA) is None


@pytest.mark.parametrize(
    ("status", "error_kind"),
    [
        (429, "http"),
        (500, "http"),
        (503, "http"),
        (504, "http"),
        (None, "timeout"),
        (None, "connect"),
        (None, "reset"),
        (None, "blocked"),
        (200, "too_large"),
        (200, "decode"),
        (None, None),
    ],
)
def test_server_errors_and_unreachable_disallow_all_briefly(
    status: int | None, error_kind: str | None
) -> None:
    robots = RobotsPolicy.from_response(status, None, error_kind, fetched_at=0.0)
    assert robots.mode == "disallow_all"
    assert not robots.allowed(SITE + "/", UA)
    assert not robots.allowed(SITE + "/anything", UA)
    assert robots.ttl_s == ERROR_TTL_S == 600
    assert robots.expired(now=ERROR_TTL_S)


def test_redirect_limit_exceeded_counts_as_not_found() -> None:
    robots = RobotsPolicy.from_response(302, None, "too_many_redirects")
    assert robots.mode == "allow_all"


def test_body_bounded_to_500_kib() -> None:
    filler = "# " + "x" * 1000 + "\n"
    head = "User-agent: *\nDisallow: /early\n"
    body = head + filler * (MAX_ROBOTS_BYTES // len(filler) + 1) + "Disallow: /late\n"
    assert len(body.encode()) > MAX_ROBOTS_BYTES
    robots = policy(body)
    assert not robots.allowed(SITE + "/early", UA)
    assert robots.allowed(SITE + "/late", UA)  # past the limit: ignored, as Google does
    assert len(robots.body.encode()) <= MAX_ROBOTS_BYTES


def test_bytes_body_with_bom_and_bad_utf8() -> None:
    body = b"\xef\xbb\xbfUser-agent: *\nDisallow: /caf\xc3\xa9\nDisallow: /bad\xff\n"
    robots = policy(body)
    assert not robots.allowed(SITE + "/café", UA)
    assert robots.allowed(SITE + "/ok", UA)


def test_json_round_trip_reparses_rules() -> None:
    original = RobotsPolicy.from_response(200, GROUPS + "\x00", None, fetched_at=1234.5)
    data = orjson.loads(orjson.dumps(original.to_json()))  # what a jsonb column gives back
    assert "\x00" not in data["body"]
    restored = RobotsPolicy.from_json(data)
    assert restored == original
    assert restored.fetched_at == 1234.5
    assert restored.expires_at == original.expires_at
    assert not restored.allowed(SITE + "/no-trawler/x", UA)
    assert restored.crawl_delay(UA) == 2.5
    assert restored.sitemaps == original.sitemaps
    failed = RobotsPolicy.from_response(503, None, "http", fetched_at=5.0)
    again = RobotsPolicy.from_json(orjson.loads(orjson.dumps(failed.to_json())))
    assert again.mode == "disallow_all"
    assert again.ttl_s == ERROR_TTL_S
    assert again.status_code == 503


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"mode": "maybe"},
        {"mode": "rules", "ttl_s": "soon"},
        {"mode": "rules", "status_code": "x"},
    ],
)
def test_from_json_rejects_malformed(data: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="robots"):
        RobotsPolicy.from_json(data)


def test_allow_all_for_crawls_ignoring_robots() -> None:
    assert RobotsPolicy.allow_all().allowed(SITE + "/x", UA)
