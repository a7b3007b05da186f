"""SSRF guard: every spelling of a private target is refused; public targets and allow-lists pass."""

from __future__ import annotations

import ipaddress
import socket

import aiohttp
import pytest
from aiohttp import web

from app.scraper.ssrf import (
    BlockedResolution,
    BlockedTarget,
    GuardedResolver,
    InvalidTarget,
    SSRFGuard,
    parse_ipv4_like,
)

pytestmark = pytest.mark.timeout(10)

BLOCKED_URLS = [
    ("http://127.0.0.1/", "loopback"),
    ("http://localhost/", "local"),
    ("http://LocalHost./admin", "local"),
    ("http://app.localhost:8080/", "local"),
    ("http://metadata.google.internal/", "internal"),
    ("http://[::1]/", "loopback"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://0/", "unspecified"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://10.1.2.3/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://172.31.255.255/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://2130706433/", "loopback"),  # decimal integer
    ("http://0x7f000001/", "loopback"),  # hex integer
    ("http://0x7F.0.0.1/", "loopback"),  # hex part
    ("http://0177.0.0.1/", "loopback"),  # octal part
    ("http://127.1/", "loopback"),  # short form
    ("http://127.0.1/", "loopback"),
    ("http://127.0.0.1.:8000/", "loopback"),  # trailing dot
    ("http://[::ffff:127.0.0.1]/", "IPv4-mapped"),
    ("http://[::ffff:7f00:1]/", "IPv4-mapped"),
    ("http://[::ffff:169.254.169.254]/", "metadata"),
    ("http://[fd00:ec2::254]/", "metadata"),
    ("http://100.64.0.1/", "carrier-grade NAT"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fec0::1]/", "site-local"),
    ("http://[fc00::1]/", "unique local"),
    ("http://[ff02::1]/", "multicast"),
    ("http://224.0.0.1/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://255.255.255.255/", "broadcast"),
    ("http://198.18.0.1/", "benchmarking"),
    ("http://192.0.2.10/", "documentation"),
    ("http://[2002:7f00:1::]/", "6to4"),  # 6to4 wrapping 127.0.0.1
    ("http://[2002:a00:1::]/", "6to4"),  # 6to4 wrapping 10.0.0.1
    ("http://[64:ff9b::a9fe:a9fe]/", "NAT64"),  # NAT64 wrapping 169.254.169.254
    ("http://[64:ff9b:1::1]/", "NAT64"),
    ("http://[::127.0.0.1]/", "IPv4-compatible"),
    ("http://①②⑦.0.0.1/", "loopback"),  # full-width digits normalise to 127.0.0.1
    ("http://user:pass@10.0.0.1:8080/", "private"),
]


@pytest.mark.parametrize(("url", "reason"), BLOCKED_URLS)
def test_blocked_by_default(url: str, reason: str) -> None:
    guard = SSRFGuard()
    with pytest.raises(BlockedTarget) as caught:
        guard.check_url(url)
    assert not isinstance(caught.value, InvalidTarget)
    assert reason.lower() in str(caught.value).lower()
    assert caught.value.reason


@pytest.mark.parametrize(
    "url",
    [
        "http://93.184.216.34/",
        "https://[2606:4700::1111]/",
        "https://example.com/path?q=1",
        "http://8.8.8.8:8080/",
        "http://[64:ff9b::808:808]/",  # NAT64 of a public address
        "http://[2002:808:808::1]/",  # 6to4 of a public address
        "https://xn--bcher-kva.example/",
        "http://172.32.0.1/",  # just outside 172.16/12
        "http://100.128.0.1/",  # just outside 100.64/10
    ],
)
def test_public_targets_allowed(url: str) -> None:
    SSRFGuard().check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/",
        "javascript:alert(1)",
        "http:///nohost",
        "example.com/no-scheme",
        "http://1.2.3.999/",
        "http://[::1/",
    ],
)
def test_invalid_urls(url: str) -> None:
    with pytest.raises(InvalidTarget):
        SSRFGuard().check_url(url)
    with pytest.raises(BlockedTarget):  # InvalidTarget is a BlockedTarget for callers
        SSRFGuard(allow_private=True).check_url(url)


def test_message_names_host_and_reason() -> None:
    with pytest.raises(BlockedTarget) as caught:
        SSRFGuard().check_url("http://0x7f000001/")
    message = str(caught.value)
    assert "0x7f000001" in message
    assert "127.0.0.1" in message
    assert "loopback" in message
    assert caught.value.address == "127.0.0.1"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("192.168.257", "192.168.1.1"),
        ("0x0a.0x00.0x00.0x01", "10.0.0.1"),
        ("0", "0.0.0.0"),
        ("example.com", None),
        ("1.2.3.4.5", None),
        ("256.1.1.1", None),
        ("08.0.0.1", None),  # 8 is not an octal digit
        ("4294967296", None),
    ],
)
def test_parse_ipv4_like_matches_inet_aton(host: str, expected: str | None) -> None:
    parsed = parse_ipv4_like(host)
    assert (str(parsed) if parsed else None) == expected
    try:
        aton: str | None = socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        aton = None
    if host != "example.com":
        assert aton == expected


def test_is_blocked_ip() -> None:
    guard = SSRFGuard()
    assert guard.is_blocked_ip("127.0.0.1") == "loopback address"
    assert guard.is_blocked_ip(ipaddress.ip_address("169.254.169.254")) == "cloud metadata endpoint"
    assert guard.is_blocked_ip("::ffff:10.0.0.1") is not None
    assert guard.is_blocked_ip("93.184.216.34") is None
    assert guard.is_blocked_ip("2606:4700::1111") is None
    assert guard.is_blocked_ip("not an ip") is not None


def test_allow_private_lifts_everything() -> None:
    guard = SSRFGuard(allow_private=True)
    for url, _ in BLOCKED_URLS:
        guard.check_url(url)
    assert guard.is_blocked_ip("169.254.169.254") is None


def test_allow_cidrs_lift_only_those_networks() -> None:
    guard = SSRFGuard(allow_cidrs=["127.0.0.0/8", "10.20.0.0/16"])
    guard.check_url("http://127.0.0.1:8000/")
    guard.check_url("http://2130706433/")
    guard.check_url("http://[::ffff:127.0.0.1]/")  # the embedded address is allowed
    guard.check_url("http://10.20.30.40/")
    guard.check_url("http://localhost:8000/")  # with an allow-list the resolver decides
    for url in ("http://10.21.0.1/", "http://169.254.169.254/", "http://[::1]/"):
        with pytest.raises(BlockedTarget):
            guard.check_url(url)
    with pytest.raises(ValueError, match="invalid CIDR"):
        SSRFGuard(allow_cidrs=["not-a-network"])


async def test_resolver_refuses_name_resolving_to_loopback() -> None:
    resolver = GuardedResolver(SSRFGuard())
    with pytest.raises(BlockedResolution) as caught:
        await resolver.resolve("localhost", 80, socket.AF_UNSPEC)
    assert isinstance(caught.value, OSError)
    assert caught.value.blocked.address in ("127.0.0.1", "::1")
    assert "loopback" in str(caught.value)
    await resolver.close()


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "127.1", "0177.0.0.1"])
async def test_resolver_catches_numeric_forms(host: str) -> None:
    # getaddrinfo itself turns these into 127.0.0.1; the resolver checks the result.
    resolver = GuardedResolver(SSRFGuard())
    with pytest.raises(BlockedResolution, match=r"127\.0\.0\.1"):
        await resolver.resolve(host, 80, socket.AF_INET)


async def test_resolver_allows_allow_listed_addresses() -> None:
    resolver = GuardedResolver(SSRFGuard(allow_cidrs=["127.0.0.0/8"]))
    results = await resolver.resolve("localhost", 8080, socket.AF_INET)
    assert results
    assert {r["host"] for r in results} == {"127.0.0.1"}
    assert all(r["port"] == 8080 for r in results)


async def test_session_with_guarded_resolver_never_connects() -> None:
    # End to end through aiohttp: the resolver's refusal becomes a connection error and the
    # server on 127.0.0.1 sees nothing.
    hits = 0

    async def handler(_: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.Response(text="secret")

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(SSRFGuard()))
        async with aiohttp.ClientSession(connector=connector) as session:
            with pytest.raises(aiohttp.ClientConnectorDNSError) as caught:
                await session.get(f"http://localhost:{port}/")
        assert isinstance(caught.value.os_error, BlockedResolution)
        assert hits == 0
    finally:
        await runner.cleanup()
