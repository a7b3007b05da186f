"""URL canonicalization: one spelling per resource, so per-job dedupe sees equal URLs."""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, Literal, TypeAlias
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = [
    "TRACKING_PARAMS",
    "IgnoreQuery",
    "QueryPolicy",
    "canonicalize_url",
    "url_hash",
    "url_host",
]

_DEFAULT_PORTS = {"http": 80, "https": 443}
# characters left as they are when re-quoting a path or query (RFC 3986 reserved + '%')
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_QUERY_SAFE = "/?:@!$&'()*+,;=-._~%"


_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")

# Parameters that only say where a visitor came from: stripping them never changes the
# page served. Matched case-insensitively; globs as in fnmatch.
TRACKING_PARAMS: Final[tuple[str, ...]] = (
    "utm_*",
    "gclid",
    "gclsrc",
    "gbraid",
    "wbraid",
    "dclid",
    "fbclid",
    "msclkid",
    "yclid",
    "twclid",
    "ttclid",
    "igshid",
    "li_fat_id",
    "mc_cid",
    "mc_eid",
    "mkt_tok",
    "_ga",
    "_gl",
    "_hsenc",
    "_hsmi",
    "__hssc",
    "__hstc",
    "__hsfp",
    "hsctatracking",
    "oly_anon_id",
    "oly_enc_id",
    "rb_clickid",
    "s_cid",
    "vero_conv",
    "vero_id",
    "wickedid",
)


@dataclass(frozen=True, slots=True)
class QueryPolicy:
    """How the query string takes part in a URL's identity. Build one per job and reuse it.

    ``strip_all`` drops the whole query; ``strip`` are parameter names or fnmatch globs
    (``utm_*``) removed case-insensitively; ``tracking`` also removes TRACKING_PARAMS;
    ``sort`` orders the remaining parameters by name (stable, so repeated names keep their
    relative order: ``a=2&a=1`` is not the same request as ``a=1&a=2`` for every server).
    """

    strip_all: bool = False
    strip: tuple[str, ...] = ()
    tracking: bool = False
    sort: bool = False

    @classmethod
    def parse(cls, value: IgnoreQuery) -> QueryPolicy:
        """Read the ``follow.ignore_query`` option.

        - ``False``: keep the query (percent-encoding normalised, an empty ``?`` dropped);
        - ``True``: drop every parameter;
        - ``"sort"``: sort parameters by name; ``"tracking"``: strip TRACKING_PARAMS;
        - a list of names/globs to strip, which may also hold the markers ``":sort"`` and
          ``":tracking"`` to combine, e.g. ``["sessionid", ":tracking", ":sort"]``.

        Raises ValueError for anything else.
        """
        if isinstance(value, QueryPolicy):
            return value
        if isinstance(value, bool):
            return cls(strip_all=value)
        if value == "sort":
            return cls(sort=True)
        if value == "tracking":
            return cls(tracking=True)
        if isinstance(value, str):
            raise ValueError(
                f"ignore_query must be true, false, 'sort', 'tracking' or a list of parameter"
                f" names, got {value!r}"
            )
        names: list[str] = []
        sort = tracking = False
        for item in value:
            if not isinstance(item, str) or not item.strip():
                raise ValueError(f"ignore_query entries must be non-empty strings, got {item!r}")
            item = item.strip()
            if item == ":sort":
                sort = True
            elif item == ":tracking":
                tracking = True
            else:
                names.append(item.lower())
        return cls(strip=tuple(names), tracking=tracking, sort=sort)

    @property
    def is_identity(self) -> bool:
        return not (self.strip_all or self.strip or self.tracking or self.sort)


IgnoreQuery: TypeAlias = bool | Literal["sort", "tracking"] | Sequence[str] | QueryPolicy
"""What ``canonicalize_url(..., ignore_query=...)`` accepts; see ``QueryPolicy.parse``."""

_KEEP_QUERY: Final = QueryPolicy()


@lru_cache(maxsize=256)
def _name_matcher(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    # One alternation of translated globs: a single regex call per parameter.
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


@lru_cache(maxsize=256)
def _policy_for(value: bool | str | tuple[str, ...]) -> QueryPolicy:
    return QueryPolicy.parse(value)


def _coerce_policy(value: IgnoreQuery) -> QueryPolicy:
    if isinstance(value, QueryPolicy):
        return value
    if isinstance(value, bool | str):
        return _policy_for(value)
    try:
        return _policy_for(tuple(value))
    except TypeError:  # unhashable entries: let parse() say what is wrong with them
        return QueryPolicy.parse(value)


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


def _apply_policy(query: str, policy: QueryPolicy) -> str:
    """``query`` is already requoted, so names compare in their one canonical spelling."""
    if policy.strip_all:
        return ""
    patterns = policy.strip + (TRACKING_PARAMS if policy.tracking else ())
    matcher = _name_matcher(patterns)
    kept: list[tuple[str, str]] = []
    for pair in query.split("&"):
        if not pair:
            continue  # "a=1&&b=2": empty pairs carry nothing
        name = pair.split("=", 1)[0]
        if matcher is not None and matcher.match(name.lower()):
            continue
        kept.append((name, pair))
    if policy.sort:
        kept.sort(key=lambda item: item[0])
    return "&".join(pair for _, pair in kept)


def canonicalize_url(url: str, *, ignore_query: IgnoreQuery = False) -> str:
    """One spelling per resource, for dedupe.

    Always: scheme and host lower-cased, IDNA host encoded to ASCII, trailing dot of the
    host and the default port (80/443) dropped, fragment dropped, empty path made "/",
    dot segments removed (RFC 3986 5.2.4), percent-encoding normalised (unreserved
    characters decoded, other escapes upper-cased, characters that need it encoded, so
    "%7E" == "~" but "%2F" != "/"), an empty query ("?") dropped. The order and spelling
    of query parameters is kept unless ``ignore_query`` says otherwise (QueryPolicy.parse:
    ``True`` strips the query, ``"sort"`` sorts it, a list strips named/globbed parameters;
    tracking parameters are only stripped when asked with ``"tracking"``/``":tracking"``).

    Raises ValueError for URLs that are not absolute http(s) URLs with a host, that carry
    credentials, or whose port or host is invalid; and for an invalid ``ignore_query``.
    """
    policy = _KEEP_QUERY if ignore_query is False else _coerce_policy(ignore_query)
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
    if query and not policy.is_identity:
        query = _apply_policy(query, policy)
    return urlunsplit((scheme, netloc, path, query, ""))


def url_hash(canonical_url: str) -> bytes:
    return hashlib.sha256(canonical_url.encode("utf-8", "surrogatepass")).digest()


def url_host(canonical_url: str) -> str:
    """The politeness key: host[:port] of a canonical URL (default ports already dropped).

    robots.txt and the per-host limits apply per origin: two servers on one address but
    different ports are two hosts.
    """
    return urlsplit(canonical_url).netloc.lower()
