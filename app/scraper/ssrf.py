"""SSRF guard: refuse URLs and resolved addresses that point into private or special networks."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from typing import Final

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

__all__ = [
    "BlockedResolution",
    "BlockedTarget",
    "GuardedResolver",
    "InvalidTarget",
    "SSRFGuard",
    "parse_ipv4_like",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_ALLOWED_SCHEMES: Final = frozenset({"http", "https"})


class BlockedTarget(Exception):
    """A URL or address the guard refuses to fetch; the message says which and why."""

    def __init__(
        self, host: str, reason: str, address: str | None = None, *, message: str | None = None
    ) -> None:
        self.host = host
        self.reason = reason
        self.address = address
        if message is None:
            if address is not None and address != host:
                message = f"blocked target {host!r} (resolves to {address}): {reason}"
            else:
                message = f"blocked target {host!r}: {reason}"
        super().__init__(message)


class InvalidTarget(BlockedTarget):
    """The URL is malformed or uses a scheme we never fetch (rejected, not a network policy)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(url, reason, message=f"invalid URL {url!r}: {reason}")


class BlockedResolution(OSError):
    """Raised by GuardedResolver when every address of a host is blocked.

    An OSError so that aiohttp wraps it in ClientConnectorDNSError (a connection error);
    the fetcher unwraps ``blocked`` to report error_kind "blocked".
    """

    def __init__(self, blocked: BlockedTarget) -> None:
        super().__init__(str(blocked))
        self.blocked = blocked


def _v4(cidr: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(cidr)


def _v6(cidr: str) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(cidr)


# Ordered: the first matching network gives the reason, so specific entries come first.
_V4_RULES: Final[tuple[tuple[ipaddress.IPv4Network, str], ...]] = (
    (_v4("169.254.169.254/32"), "cloud metadata endpoint"),
    (_v4("169.254.170.2/32"), "cloud metadata endpoint (ECS task metadata)"),
    (_v4("100.100.100.200/32"), "cloud metadata endpoint (Alibaba Cloud)"),
    # Azure's wireserver sits on a public address but only answers from inside Azure.
    (_v4("168.63.129.16/32"), "cloud metadata endpoint (Azure wireserver)"),
    (_v4("0.0.0.0/32"), "unspecified address"),
    # Linux routes connections to 0.0.0.0/8 to the local host.
    (_v4("0.0.0.0/8"), "'this network' address (reaches the local host)"),
    (_v4("127.0.0.0/8"), "loopback address"),
    (_v4("10.0.0.0/8"), "private address"),
    (_v4("172.16.0.0/12"), "private address"),
    (_v4("192.168.0.0/16"), "private address"),
    (_v4("100.64.0.0/10"), "carrier-grade NAT (shared) address"),
    (_v4("169.254.0.0/16"), "link-local address"),
    (_v4("192.0.0.0/24"), "IETF protocol assignment (reserved)"),
    (_v4("192.0.2.0/24"), "documentation address (reserved)"),
    (_v4("198.51.100.0/24"), "documentation address (reserved)"),
    (_v4("203.0.113.0/24"), "documentation address (reserved)"),
    (_v4("192.88.99.0/24"), "6to4 relay anycast (reserved)"),
    (_v4("198.18.0.0/15"), "benchmarking address (reserved)"),
    (_v4("224.0.0.0/4"), "multicast address"),
    (_v4("255.255.255.255/32"), "broadcast address"),
    (_v4("240.0.0.0/4"), "reserved address"),
)

_V6_RULES: Final[tuple[tuple[ipaddress.IPv6Network, str], ...]] = (
    (_v6("fd00:ec2::254/128"), "cloud metadata endpoint"),
    (_v6("::/128"), "unspecified address"),
    (_v6("::1/128"), "loopback address"),
    (_v6("64:ff9b:1::/48"), "local-use NAT64 address (private)"),
    (_v6("100::/64"), "discard-only address (reserved)"),
    (_v6("2001:db8::/32"), "documentation address (reserved)"),
    (_v6("3fff::/20"), "documentation address (reserved)"),
    (_v6("fc00::/7"), "unique local address (private)"),
    (_v6("fe80::/10"), "link-local address"),
    (_v6("fec0::/10"), "site-local address (deprecated, private)"),
    (_v6("ff00::/8"), "multicast address"),
)

# The same tables as (network int, mask int, reason): checked on every fetch and redirect hop,
# and integer masking is an order of magnitude cheaper than ``ip in IPv4Network``.
_IntRule = tuple[int, int, str]


def _int_rules(rules: Iterable[tuple[IPNetwork, str]]) -> tuple[_IntRule, ...]:
    return tuple((int(net.network_address), int(net.netmask), reason) for net, reason in rules)


def _first_reason(rules: tuple[_IntRule, ...], value: int) -> str | None:
    for network, mask, reason in rules:
        if value & mask == network:
            return reason
    return None


_V4_INT_RULES: Final = _int_rules(_V4_RULES)
_V6_INT_RULES: Final = _int_rules(_V6_RULES)

# Addresses that carry an IPv4 address inside them; the kernel or a translator may deliver
# the packet to that IPv4 address, so the embedded address is checked like a real one.
_V6_MAPPED: Final = _v6("::ffff:0:0/96")
_V6_TRANSLATED: Final = _v6("::ffff:0:0:0/96")
_V6_COMPAT: Final = _v6("::/96")
_V6_NAT64: Final = _v6("64:ff9b::/96")
_V6_TEREDO: Final = _v6("2001::/32")
_V6_6TO4: Final = _v6("2002::/16")
_V6_IETF: Final = _v6("2001::/23")
_V6_GLOBAL_UNICAST: Final = _v6("2000::/3")

# Names that resolve to the local machine or to cloud/intranet infrastructure. This is
# defence in depth: the resolver's address check is what actually stops them.
_BLOCKED_NAMES: Final = frozenset(
    {
        "localhost",
        "localhost.localdomain",
        "ip6-localhost",
        "ip6-loopback",
        "metadata",
        "instance-data",
    }
)
_BLOCKED_SUFFIXES: Final = (".localhost", ".localdomain", ".local", ".internal", ".home.arpa")

_NUMERIC_LABEL = re.compile(r"(?:0[xX][0-9a-fA-F]*|[0-9]+)")
_NUMERIC_HOST = re.compile(
    r"(?:(?:0[xX][0-9a-fA-F]*|[0-9]+)\.){0,3}(?:0[xX][0-9a-fA-F]*|[0-9]+)\.?"
)
_HOST_CHARS = re.compile(r"[A-Za-z0-9._-]+")


def _parse_ipv4_part(part: str) -> int | None:
    if not part:
        return None
    if part[:2] in ("0x", "0X"):
        digits = part[2:]
        # inet_aton and the WHATWG URL parser both read a bare "0x" as zero.
        return int(digits, 16) if digits else 0
    if len(part) > 1 and part[0] == "0":
        try:
            return int(part, 8)
        except ValueError:
            return None
    return int(part) if part.isdigit() else None


def parse_ipv4_like(host: str) -> ipaddress.IPv4Address | None:
    """Parse a host the way inet_aton does (``127.1``, ``0x7f000001``, ``0177.0.0.1``, ...).

    Returns None when the host is not a numeric IPv4 form. A single trailing dot is accepted
    because URL parsers and resolvers treat ``127.0.0.1.`` as the same address.
    """
    if _NUMERIC_HOST.fullmatch(host) is None:
        return None  # a host name (the common case): one regex and out
    text = host[:-1] if host.endswith(".") else host
    parts = text.split(".")
    values: list[int] = []
    for part in parts:
        value = _parse_ipv4_part(part)
        if value is None:
            return None
        values.append(value)
    *head, last = values
    if any(v > 255 for v in head):
        return None
    # The last part fills every byte the earlier parts did not: "127.1" is 127.0.0.1.
    if last >= 1 << (8 * (4 - len(head))):
        return None
    number = last
    for index, value in enumerate(head):
        number |= value << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


def _ends_in_number(host: str) -> bool:
    labels = (host[:-1] if host.endswith(".") else host).split(".")
    return bool(labels) and _NUMERIC_LABEL.fullmatch(labels[-1]) is not None


def _parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    networks: list[IPNetwork] = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"invalid CIDR in allow list: {cidr!r}: {exc}") from exc
    return tuple(networks)


class SSRFGuard:
    """Decides whether a URL or an address may be fetched.

    By default every loopback, private, link-local, multicast, reserved and cloud-metadata
    address is refused. ``allow_cidrs`` re-admits specific networks (e.g. a staging subnet
    or ``127.0.0.0/8`` in tests); ``allow_private=True`` turns the guard off entirely.
    """

    __slots__ = ("_allow_networks", "_allow_v4", "_allow_v6", "allow_private")

    def __init__(self, allow_private: bool = False, allow_cidrs: Sequence[str] = ()) -> None:
        self.allow_private = allow_private
        self._allow_networks = _parse_networks(allow_cidrs)
        self._allow_v4 = _int_rules((n, "") for n in self._allow_networks if n.version == 4)
        self._allow_v6 = _int_rules((n, "") for n in self._allow_networks if n.version == 6)

    @property
    def allow_networks(self) -> tuple[IPNetwork, ...]:
        return self._allow_networks

    def _is_allowed(self, ip: IPAddress) -> bool:
        rules = self._allow_v4 if ip.version == 4 else self._allow_v6
        return _first_reason(rules, int(ip)) is not None

    def is_blocked_ip(self, ip: IPAddress | str) -> str | None:
        """Return why ``ip`` is refused, or None when it may be fetched."""
        if isinstance(ip, str):
            try:
                ip = ipaddress.ip_address(ip)
            except ValueError:
                return f"not an IP address: {ip!r}"
        if self.allow_private or self._is_allowed(ip):
            return None
        if isinstance(ip, ipaddress.IPv4Address):
            return self._v4_reason(ip)
        return self._v6_reason(ip)

    def _v4_reason(self, ip: ipaddress.IPv4Address) -> str | None:
        return _first_reason(_V4_INT_RULES, int(ip))

    def _embedded_reason(self, kind: str, embedded: ipaddress.IPv4Address) -> str | None:
        if self._is_allowed(embedded):
            return None
        inner = self._v4_reason(embedded)
        if inner is None:
            return None
        return f"{kind} embeds {embedded} ({inner})"

    def _v6_reason(self, ip: ipaddress.IPv6Address) -> str | None:
        if ip.scope_id is not None:
            ip = ipaddress.IPv6Address(ip.compressed.split("%", 1)[0])
        reason = _first_reason(_V6_INT_RULES, int(ip))
        if reason is not None:
            return reason
        low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip in _V6_MAPPED:
            return self._embedded_reason("IPv4-mapped IPv6 address", low32)
        if ip in _V6_TRANSLATED:
            return self._embedded_reason("IPv4-translated IPv6 address", low32)
        if ip in _V6_NAT64:
            return self._embedded_reason("NAT64 address", low32)
        if ip in _V6_COMPAT:
            return f"deprecated IPv4-compatible IPv6 address (embeds {low32})"
        if ip in _V6_6TO4:
            assert ip.sixtofour is not None
            return self._embedded_reason("6to4 address", ip.sixtofour)
        if ip in _V6_TEREDO:
            assert ip.teredo is not None
            server, client = ip.teredo
            return self._embedded_reason("Teredo address", client) or self._embedded_reason(
                "Teredo address (server)", server
            )
        if ip in _V6_IETF:
            return "IETF protocol assignment (reserved)"
        if ip not in _V6_GLOBAL_UNICAST:
            return "reserved address (outside global unicast 2000::/3)"
        return None

    def _check_ip(self, host: str, ip: IPAddress) -> None:
        reason = self.is_blocked_ip(ip)
        if reason is not None:
            raise BlockedTarget(host, reason, str(ip))

    def _name_blocked(self, name: str) -> bool:
        if name in _BLOCKED_NAMES or name.endswith(_BLOCKED_SUFFIXES):
            # With an explicit allow-list the resolver's address check decides, so that
            # e.g. allow_cidrs=["127.0.0.0/8"] makes http://localhost:8000/ reachable.
            return not self._allow_networks
        return False

    def check_url(self, url: str | URL) -> None:
        """Refuse ``url`` unless it is http(s) with a host that is not a blocked address.

        IP literals in every form a resolver accepts are parsed and checked here; host
        names that resolve to blocked addresses are caught by GuardedResolver at fetch time.
        Raises BlockedTarget (InvalidTarget for malformed URLs).
        """
        if isinstance(url, URL):
            parsed = url
        else:
            try:
                parsed = URL(url)
            except (ValueError, TypeError) as exc:
                raise InvalidTarget(str(url), str(exc) or "unparsable URL") from exc
        self.check_parsed(parsed)

    def check_parsed(self, url: URL) -> None:
        """check_url for an already parsed yarl URL (the object the HTTP client will use)."""
        scheme = (url.scheme or "").lower()
        if scheme not in _ALLOWED_SCHEMES:
            what = f"unsupported scheme {scheme!r}" if scheme else "missing scheme"
            raise InvalidTarget(str(url), f"{what} (only http and https are allowed)")
        host = url.raw_host
        if not host:
            raise InvalidTarget(str(url), "URL has no host")
        host = host.lower()
        address: IPAddress | None
        if ":" in host:
            try:
                address = ipaddress.IPv6Address(host)
            except ValueError as exc:
                raise InvalidTarget(str(url), f"invalid IPv6 address {host!r}") from exc
        else:
            address = parse_ipv4_like(host)
            if address is None:
                if _ends_in_number(host):
                    # WHATWG: a host whose last label is numeric must be an IPv4 address.
                    raise InvalidTarget(str(url), f"invalid IPv4 address {host!r}")
                if _HOST_CHARS.fullmatch(host) is None:
                    raise InvalidTarget(str(url), f"invalid characters in host {host!r}")
        if self.allow_private:
            return
        if address is not None:
            self._check_ip(host, address)
        elif self._name_blocked(host.rstrip(".")):
            raise BlockedTarget(host, "local or internal host name")


_AI_ADDRCONFIG: Final = socket.AI_ADDRCONFIG
_NUMERIC_FLAGS: Final = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
_NAME_FLAGS: Final = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that drops blocked addresses from every answer.

    aiohttp connects to exactly the addresses returned here, so a name cannot be re-resolved
    to a private address between the check and the connect (no DNS-rebinding window).
    Resolution uses the event loop's getaddrinfo, so numeric forms the URL check did not see
    (``2130706433``, ``0x7f000001``) come back as 127.0.0.1 and are refused here.
    """

    def __init__(self, guard: SSRFGuard, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._guard = guard
        self._loop = loop or asyncio.get_running_loop()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        infos = await self._loop.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, family=family, flags=_AI_ADDRCONFIG
        )
        allowed: list[ResolveResult] = []
        first_block: BlockedTarget | None = None
        for fam, _, proto, _, sockaddr in infos:
            address = str(sockaddr[0])
            reason = self._guard.is_blocked_ip(address.split("%", 1)[0])
            if reason is not None:
                first_block = first_block or BlockedTarget(host, reason, address)
                continue
            resolved_port = int(sockaddr[1])
            if fam == socket.AF_INET6 and len(sockaddr) >= 4 and sockaddr[3]:
                # Scoped (link-local) IPv6 needs the "%scope" suffix to be connectable.
                address, port_text = await self._loop.getnameinfo(
                    (sockaddr[0], sockaddr[1], sockaddr[2], sockaddr[3]), _NAME_FLAGS
                )
                resolved_port = int(port_text)
            allowed.append(
                ResolveResult(
                    hostname=host,
                    host=address,
                    port=resolved_port,
                    family=fam,
                    proto=proto,
                    flags=_NUMERIC_FLAGS,
                )
            )
        if not allowed:
            if first_block is not None:
                raise BlockedResolution(first_block)
            raise OSError(f"no usable address for host {host!r}")
        return allowed

    async def close(self) -> None:
        """Nothing to release: resolution borrows the event loop's getaddrinfo."""
