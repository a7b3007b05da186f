"""Readable page content: cleaned HTML (whole page or main content) and its Markdown."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from html_to_markdown import ConversionOptions, PreprocessingOptions, convert
from selectolax.lexbor import LexborHTMLParser, LexborNode

__all__ = ["clean_html", "html_to_markdown", "image_urls"]

Resolve = Callable[[str], str]
"""Turns an attribute value (href, src) into an absolute URL (the page's Document.absolute)."""

# Never content: code, styling, fallbacks for scripting, inert templates, embedded frames.
_NOT_CONTENT: Final = ("script", "style", "noscript", "template", "iframe", "object", "embed")

# Page furniture dropped for main content (Firecrawl's onlyMainContent). Semantic elements
# and ARIA landmarks first; the few class and id names are the unambiguous common ones.
# Broad names ("menu", "top", "side", "widget") and <form> are left alone: they too often
# wrap the content itself (ASP.NET pages live inside one <form>).
_BOILERPLATE: Final = ", ".join(
    (
        "nav",
        "aside",
        "footer",
        "dialog",
        "[role=navigation]",
        "[role=complementary]",
        "[role=contentinfo]",
        "[role=search]",
        "[role=dialog]",
        ".navbar",
        ".sidebar",
        "#sidebar",
        ".breadcrumb",
        ".breadcrumbs",
        "#breadcrumbs",
        ".cookie-banner",
        "#cookie-banner",
        ".cookie-consent",
        ".skip-link",
    )
)
# A site header outside any article is furniture; an article's own header holds its title.
_SITE_HEADER: Final = "header, [role=banner]"
# Where the main content is, most specific first; the first that has text wins.
_MAIN_CANDIDATES: Final = ("main", "[role=main]", "#main", "#content", ".main-content")

_URL_ATTRS: Final = (("a", "href"), ("img", "src"), ("area", "href"))
_HTTP: Final = ("http://", "https://")

# Only long-standing options: their names are stable across html-to-markdown 3.x. The
# cleaning (boilerplate, scripts, absolute URLs) is done here, so its preprocessing is off;
# no front matter (the title is in the document's metadata).
_OPTIONS: Final = ConversionOptions(
    heading_style="atx",
    bullets="-",
    autolinks=False,
    extract_metadata=False,
    preprocessing=PreprocessingOptions(enabled=False),
)


def _inside(node: LexborNode, tag: str) -> bool:
    parent = node.parent
    while parent is not None:
        if parent.tag == tag:
            return True
        parent = parent.parent
    return False


def _has_text(node: LexborNode) -> bool:
    return bool(node.text(deep=True, strip=True))


def _main_root(tree: LexborHTMLParser) -> LexborNode | None:
    """The element holding the main content: <main> and its equivalents, else the only
    <article>, else None (the whole body)."""
    for selector in _MAIN_CANDIDATES:
        for node in tree.css(selector):
            if _has_text(node):
                return node
    articles = [node for node in tree.css("article") if _has_text(node)]
    if len(articles) == 1:
        return articles[0]
    return None


def _absolutize(tree: LexborHTMLParser, resolve: Resolve) -> None:
    for tag, attr in _URL_ATTRS:
        for node in tree.css(f"{tag}[{attr}]"):
            value = node.attributes.get(attr)
            if not value:
                continue
            if tag == "img" and value.lstrip().lower().startswith("data:"):
                # inline images are base64 payloads: keep what they show in words
                node.replace_with(node.attributes.get("alt") or "")
                continue
            node.attrs[attr] = resolve(value)


def clean_html(html: str, resolve: Resolve, *, main_only: bool) -> str:
    """The page without scripts, styles and other non-content, links and images absolute.

    ``main_only``: only the main content (``<main>``, ``[role=main]``, the only
    ``<article>``...; the body when none is found) without navigation, sidebars, footers,
    dialogs and the site header. Returns the body (or main element) as HTML.
    """
    tree = LexborHTMLParser(html)
    root: LexborNode | None = None
    if main_only:
        root = _main_root(tree)
        if root is not None:
            # a fresh tree of the main element alone: the rest of the page is gone
            tree = LexborHTMLParser(root.html or "")
        for node in tree.css(_BOILERPLATE):
            node.decompose()
        if root is None:
            for node in tree.css(_SITE_HEADER):
                if not _inside(node, "article"):
                    node.decompose()
    tree.strip_tags(list(_NOT_CONTENT))
    _absolutize(tree, resolve)
    body = tree.body
    if body is None:
        return ""
    if root is not None:
        # the parser wrapped the element in html/body: hand back the element itself
        return body.inner_html or ""
    return body.html or ""


def html_to_markdown(html: str) -> str:
    """Markdown of (cleaned) HTML: ATX headings, '-' bullets, inline links, GFM tables."""
    if not html.strip():
        return ""
    return (convert(html, _OPTIONS).content or "").strip()


def image_urls(tree: LexborHTMLParser, resolve: Resolve) -> list[str]:
    """Absolute http(s) URLs of the page's images, deduplicated, in document order."""
    seen: dict[str, None] = {}
    for node in tree.css("img[src]"):
        src = (node.attributes.get("src") or "").strip()
        if not src or src.lower().startswith("data:"):
            continue
        url = resolve(src).split("#", 1)[0]
        if url.lower().startswith(_HTTP):
            seen.setdefault(url, None)
    return list(seen)
