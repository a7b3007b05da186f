"""URL canonicalization: one spelling per resource, so per-job dedupe sees equal URLs."""

from __future__ import annotations

import hashlib
import re
from urllib.parse import quote, urlsplit, urlunsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}
# characters left as they are when re-quoting a path or query (RFC 3986 reserved + '%')
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_QUERY_SAFE = "/?:@!$&'()*+,;=-._~%"


_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _pct(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def _requote(part: str, safe: str) -> str:
    # decode only unreserved characters, upper-case the rest, encode what must be:
    # "%7euser" and "~user" become one spelling while "%2F" stays distinct from "/"
    return quote(_PCT.sub(_pct, part), safe=safe)


def _remove_dot_segments(path: str) -> str:
    # RFC 3986 section 5.2.4
    output: list[str] = []
    for segment in path.split("/")[1:]:
        if segment == "..":
            if output:
                output.pop()
        elif segment != ".":
            output.append(segment)
    trailing = path.endswith(("/.", "/.."))
    return "/" + "/".join(output) + ("/" if trailing and output else "")


def canonicalize_url(url: str) -> str:
    """Lower-case scheme and host, drop default port, fragment and empty query.

    Raises ValueError for URLs that are not absolute http(s) URLs with a host.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("only http and https URLs are supported")
    if not parts.hostname:
        raise ValueError("URL has no host")
    host = parts.hostname.lower().rstrip(".")
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError as error:
        raise ValueError(f"invalid host name: {error}") from error
    if ":" in host:
        host = f"[{host}]"
    port = parts.port  # raises ValueError for a non-numeric or out-of-range port
    netloc = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    if parts.username or parts.password:
        raise ValueError("credentials in URLs are not accepted")
    path = _requote(_remove_dot_segments(parts.path or "/"), _PATH_SAFE)
    query = _requote(parts.query, _QUERY_SAFE) if parts.query else ""
    return urlunsplit((scheme, netloc, path, query, ""))


def url_hash(canonical_url: str) -> bytes:
    return hashlib.sha256(canonical_url.encode("utf-8", "surrogatepass")).digest()


def url_host(canonical_url: str) -> str:
    """The politeness key: host[:port] of a canonical URL (default ports already dropped)."""
    return urlsplit(canonical_url).netloc.lower()
