"""Extraction specs: validated CSS/XPath field selectors, field extraction and built-in fields."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, get_args
from urllib.parse import urljoin, urlsplit

from lxml import etree
from lxml import html as lxml_html
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from selectolax.lexbor import LexborHTMLParser, LexborNode, SelectolaxError

from app.scraper.markdown import clean_html, html_to_markdown, image_urls

__all__ = [
    "BUILTINS",
    "MAX_FIELDS",
    "CompiledField",
    "CompiledSpec",
    "Document",
    "ExtractSpec",
    "FieldName",
    "FieldSpec",
    "InvalidSelector",
    "InvalidSpec",
    "builtins",
    "compile_spec",
    "content_builtin",
    "extract",
    "validate_spec",
]

MAX_FIELDS: Final = 100
MAX_SELECTOR_CHARS: Final = 2000
FIELD_NAME_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_.-]*$"

FieldName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=FIELD_NAME_PATTERN)
]
_FIELD_NAME_RE: Final = re.compile(FIELD_NAME_PATTERN)
_ATTR_NAME_RE: Final = re.compile(r"^[^\s\"'>/=\x00-\x1f]+$")
# Attributes whose values are URLs; they come back absolute, resolved against <base href>.
_URL_ATTRS: Final = frozenset(
    {"href", "src", "action", "formaction", "poster", "cite", "longdesc", "background"}
)
_LINK_SCHEMES: Final = ("http:", "https:")
_URL_NOISE: Final = str.maketrans("", "", "\t\n\r")

ValueKind = Literal["text", "html", "attr"]
Engine = Literal["css", "xpath", "builtin"]
# title, description, canonical, links and language come from builtins(); the others are
# page renderings computed on demand (content_builtin), each only when a field asks for it.
Builtin = Literal[
    "title",
    "description",
    "canonical",
    "links",
    "language",
    "markdown",
    "markdown_main",
    "html",
    "html_main",
    "raw_html",
    "metadata",
    "images",
]
BUILTINS: Final[tuple[str, ...]] = get_args(Builtin)


class InvalidSpec(ValueError):
    """The extraction spec is malformed (bad field name, too many fields, bad field spec)."""


class InvalidSelector(InvalidSpec):
    """A CSS or XPath selector does not compile; the message names the field."""

    def __init__(self, field: str | None, engine: Engine, selector: str, detail: str) -> None:
        self.field = field
        self.engine = engine
        self.selector = selector
        self.detail = detail
        where = f"field {field!r}: " if field is not None else ""
        label = "CSS" if engine == "css" else "XPath"
        super().__init__(f"{where}invalid {label} selector {selector!r}: {detail}")


# Selectors are probed against an empty but complete document: lexbor parses the selector
# even when nothing can match, and XPath evaluation surfaces errors that compilation misses
# (unknown namespace prefixes and functions).
_PROBE_HTML: Final = "<html><head></head><body></body></html>"
_UTF8_HTML_PARSER: Final = lxml_html.HTMLParser(encoding="utf-8")
_PROBE_XPATH_DOC: Final = lxml_html.document_fromstring(
    _PROBE_HTML.encode(), parser=_UTF8_HTML_PARSER
)


def _check_css(selector: str, field: str | None = None) -> None:
    try:
        # A fresh tree per check: a lexbor parser's selector engine is not safe to share
        # between threads, and validation may run in a worker thread of the API.
        LexborHTMLParser(_PROBE_HTML).css(selector)
    except (SelectolaxError, ValueError, TypeError) as exc:
        raise InvalidSelector(field, "css", selector, str(exc) or "syntax error") from exc


def _compile_xpath(selector: str, field: str | None = None) -> etree.XPath:
    try:
        compiled = etree.XPath(selector, smart_strings=True)
        compiled(_PROBE_XPATH_DOC)
    except (etree.XPathError, ValueError, TypeError) as exc:
        raise InvalidSelector(field, "xpath", selector, str(exc) or "syntax error") from exc
    return compiled


def _split_value(value: str) -> tuple[ValueKind, str | None]:
    if value == "text":
        return "text", None
    if value == "html":
        return "html", None
    return "attr", value[5:]


class FieldSpec(BaseModel):
    """One named field: exactly one of ``css``/``xpath``, what to take, first match or all."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    css: str | None = Field(default=None, min_length=1, max_length=MAX_SELECTOR_CHARS)
    xpath: str | None = Field(default=None, min_length=1, max_length=MAX_SELECTOR_CHARS)
    # a built-in page property instead of a selector (see builtins())
    builtin: Builtin | None = None
    value: str = "text"
    all: bool = False

    @field_validator("value")
    @classmethod
    def _check_value(cls, value: str) -> str:
        if value in ("text", "html"):
            return value
        if value.startswith("attr:"):
            # HTML attribute names are case-insensitive; both parsers store them lower-case.
            name = value[5:].strip().lower()
            if name and _ATTR_NAME_RE.match(name):
                return f"attr:{name}"
        raise ValueError(f"value must be 'text', 'html' or 'attr:<name>', got {value!r}")

    @model_validator(mode="after")
    def _check_selector(self) -> FieldSpec:
        if sum(x is not None for x in (self.css, self.xpath, self.builtin)) != 1:
            raise ValueError("exactly one of 'css', 'xpath' or 'builtin' is required")
        if self.builtin is not None:
            return self
        # Compiled here so an API schema using FieldSpec rejects bad selectors with a 422.
        if self.css is not None:
            _check_css(self.css)
        else:
            assert self.xpath is not None
            _compile_xpath(self.xpath)
        return self

    @property
    def engine(self) -> Engine:
        if self.builtin is not None:
            return "builtin"
        return "css" if self.css is not None else "xpath"

    @property
    def selector(self) -> str:
        selector = self.css or self.xpath or self.builtin
        assert selector is not None
        return selector


ExtractSpec = Annotated[dict[FieldName, FieldSpec], Field(max_length=MAX_FIELDS)]
_SPEC_ADAPTER: Final[TypeAdapter[dict[str, FieldSpec]]] = TypeAdapter(ExtractSpec)


@dataclass(frozen=True, slots=True)
class CompiledField:
    name: str
    engine: Engine
    selector: str
    kind: ValueKind
    attr: str | None
    many: bool
    xpath: etree.XPath | None = None


@dataclass(frozen=True, slots=True)
class CompiledSpec:
    """A validated spec, ready to run on many pages (cache one per job)."""

    fields: tuple[CompiledField, ...]
    needs_css: bool
    needs_xpath: bool

    def __len__(self) -> int:
        return len(self.fields)


def _spec_error(name: str, exc: ValidationError) -> InvalidSpec:
    error = exc.errors()[0]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, InvalidSelector):
        return InvalidSelector(name, cause.engine, cause.selector, cause.detail)
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    loc = ".".join(str(part) for part in error.get("loc", ()))
    return InvalidSpec(f"field {name!r}: {loc + ': ' if loc else ''}{message}")


def compile_spec(spec: Mapping[str, FieldSpec | Mapping[str, Any]]) -> CompiledSpec:
    """Validate and compile every field eagerly; raises InvalidSpec/InvalidSelector.

    Accepts FieldSpec objects or their JSON form (as stored with a job).
    """
    if len(spec) > MAX_FIELDS:
        raise InvalidSpec(f"too many fields: {len(spec)} (at most {MAX_FIELDS})")
    fields: list[CompiledField] = []
    for name, raw in spec.items():
        if not isinstance(name, str) or len(name) > 64 or not _FIELD_NAME_RE.match(name):
            raise InvalidSpec(
                f"invalid field name {name!r}: 1-64 characters, letters, digits, '_', '.', '-',"
                " not starting with a digit, '.' or '-'"
            )
        if isinstance(raw, FieldSpec):
            field_spec = raw
        else:
            try:
                field_spec = FieldSpec.model_validate(raw)
            except ValidationError as exc:
                raise _spec_error(name, exc) from exc
        kind, attr = _split_value(field_spec.value)
        if field_spec.builtin is not None:
            fields.append(
                CompiledField(name, "builtin", field_spec.builtin, kind, attr, field_spec.all)
            )
        elif field_spec.css is not None:
            _check_css(field_spec.css, name)
            fields.append(CompiledField(name, "css", field_spec.css, kind, attr, field_spec.all))
        else:
            selector = field_spec.selector
            compiled = _compile_xpath(selector, name)
            fields.append(
                CompiledField(name, "xpath", selector, kind, attr, field_spec.all, compiled)
            )
    return CompiledSpec(
        fields=tuple(fields),
        needs_css=any(f.engine == "css" for f in fields),
        needs_xpath=any(f.engine == "xpath" for f in fields),
    )


def validate_spec(data: Any) -> dict[str, FieldSpec]:
    """Validate a JSON-shaped spec (names, count, every field); raises pydantic ValidationError."""
    return _SPEC_ADAPTER.validate_python(data)


# ---------------------------------------------------------------------------------------------
# Documents


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _absolute(base: str, value: str) -> str:
    value = value.strip().translate(_URL_NOISE)
    try:
        return urljoin(base, value)
    except ValueError:  # e.g. an unbalanced IPv6 bracket: keep what the page said
        return value


class _UrlResolver:
    """urljoin against one base, with fast paths for the common href shapes.

    urljoin costs several microseconds per call, which dominated link extraction on
    link-dense pages; hrefs that need real RFC 3986 work (dot segments, other schemes,
    backslashes, stray whitespace) still go through urljoin.
    """

    __slots__ = ("_base", "_cache", "_directory", "_no_query", "_origin", "_scheme")

    def __init__(self, base: str) -> None:
        self._base = base
        parts = urlsplit(base)
        self._scheme = parts.scheme
        self._origin = f"{parts.scheme}://{parts.netloc}"
        path = parts.path or "/"
        self._directory = self._origin + path[: path.rfind("/") + 1]
        self._no_query = self._origin + parts.path
        # Pages repeat hrefs (menus, and fields that read the same links as builtins).
        self._cache: dict[str, str] = {}

    def resolve(self, href: str) -> str:
        resolved = self._cache.get(href)
        if resolved is None:
            resolved = self._cache[href] = self._resolve(href)
        return resolved

    def _resolve(self, href: str) -> str:
        if not href or not self._scheme or _NEEDS_URLJOIN.search(href):
            return _absolute(self._base, href)
        if href.startswith(("http://", "https://")):
            return href
        if href[0] == "/":
            return f"{self._scheme}:{href}" if href[:2] == "//" else self._origin + href
        if ":" in href.split("/", 1)[0]:
            return _absolute(self._base, href)  # another scheme (mailto:, javascript:, ...)
        if href[0] == "?":
            return self._no_query + href
        if href[0] == "#":
            query = urlsplit(self._base).query
            return self._no_query + (f"?{query}" if query else "") + href
        return self._directory + href


# Leading/trailing whitespace, dot segments, backslashes and embedded tabs/newlines need
# urljoin's full treatment (and the noise stripping in _absolute).
_NEEDS_URLJOIN: Final = re.compile(r"^[\s.]|\s$|/\.|[\\\t\n\r]")


class Document:
    """One page, parsed at most once per engine and only when a field needs that engine."""

    __slots__ = ("_base", "_lexbor", "_lxml", "_lxml_done", "_resolver", "html", "url")

    def __init__(self, html: str, url: str) -> None:
        self.html = html
        self.url = url
        self._lexbor: LexborHTMLParser | None = None
        self._lxml: lxml_html.HtmlElement | None = None
        self._lxml_done = False
        self._base: str | None = None
        self._resolver: _UrlResolver | None = None

    @property
    def lexbor(self) -> LexborHTMLParser:
        if self._lexbor is None:
            self._lexbor = LexborHTMLParser(self.html)
        return self._lexbor

    @property
    def lxml(self) -> lxml_html.HtmlElement | None:
        """The lxml tree, or None for a document lxml cannot parse (e.g. empty)."""
        if not self._lxml_done:
            self._lxml_done = True
            try:
                # Bytes with an explicit parser encoding: lxml refuses str input that carries
                # an XML encoding declaration, and the text is already decoded anyway.
                self._lxml = lxml_html.document_fromstring(
                    self.html.encode("utf-8", "surrogatepass"), parser=_UTF8_HTML_PARSER
                )
            except (etree.ParserError, etree.XMLSyntaxError, ValueError):
                self._lxml = None
        return self._lxml

    @property
    def base_url(self) -> str:
        """The URL relative links resolve against: <base href> when present and http(s)."""
        if self._base is None:
            href: str | None = None
            if self._lexbor is None and self._lxml is not None:
                found = self._lxml.xpath("(//base[@href])[1]/@href")
                href = str(found[0]) if found else None
            else:
                node = self.lexbor.css_first("base[href]")
                href = node.attributes.get("href") if node is not None else None
            base = self.url
            if href and href.strip():
                candidate = _absolute(self.url, href)
                if candidate.lower().startswith(_LINK_SCHEMES):
                    base = candidate
            self._base = base
        return self._base

    def absolute(self, href: str) -> str:
        """``href`` resolved against the document base (<base href> or the page URL)."""
        if self._resolver is None:
            self._resolver = _UrlResolver(self.base_url)
        return self._resolver.resolve(href)


# ---------------------------------------------------------------------------------------------
# Field extraction


def _css_value(node: LexborNode, field: CompiledField, doc: Document) -> str | None:
    if field.kind == "text":
        return _collapse(node.text())
    if field.kind == "html":
        html = node.html
        return html if html is not None else ""
    assert field.attr is not None
    value = node.attributes.get(field.attr)
    if value is None:
        # Present-but-valueless attributes (<input disabled>) read as "", absent as None.
        return "" if field.attr in node.attributes else None
    if field.attr in _URL_ATTRS:
        return doc.absolute(value)
    return value


def _run_css(field: CompiledField, doc: Document) -> Any:
    tree = doc.lexbor
    if not field.many:
        node = tree.css_first(field.selector)
        return None if node is None else _css_value(node, field, doc)
    values = (_css_value(node, field, doc) for node in tree.css(field.selector))
    return [v for v in values if v is not None]


def _xpath_item(item: Any, field: CompiledField, doc: Document) -> Any:
    if isinstance(item, etree._Element):
        if not isinstance(item.tag, str):  # comment or processing instruction
            text = item.text or ""
            return _collapse(text) if field.kind == "text" else text
        if field.kind == "text":
            return _collapse(etree.tostring(item, method="text", encoding=str, with_tail=False))
        if field.kind == "html":
            return etree.tostring(item, method="html", encoding=str, with_tail=False)
        assert field.attr is not None
        value = item.get(field.attr)
        if value is not None and field.attr in _URL_ATTRS:
            return doc.absolute(value)
        return value
    if isinstance(item, str):
        # Attribute or text-node results (//a/@href, //p/text()) and string() values.
        attrname = getattr(item, "attrname", None)
        if getattr(item, "is_attribute", False) and attrname in _URL_ATTRS:
            return doc.absolute(str(item))
        return _collapse(item) if field.kind == "text" else str(item)
    if isinstance(item, bool):
        return item
    if isinstance(item, float):
        return int(item) if item.is_integer() else item
    return str(item)  # namespace tuples and other exotica


def _run_xpath(field: CompiledField, doc: Document) -> Any:
    root = doc.lxml
    if root is None:
        return [] if field.many else None
    assert field.xpath is not None
    try:
        result = field.xpath(root)
    except etree.XPathError:
        # Compiled and probed already; a document-specific evaluation failure is "no match".
        return [] if field.many else None
    if isinstance(result, list):
        values = [_xpath_item(item, field, doc) for item in result]
        if field.many:
            return [v for v in values if v is not None]
        return next((v for v in values if v is not None), None) if values else None
    value = _xpath_item(result, field, doc)
    return [value] if field.many else value


def extract(html: str | Document, base_url: str, compiled: CompiledSpec) -> dict[str, Any]:
    """Run every field: first match (None when nothing matches) or all matches (a list).

    ``text`` is whitespace-collapsed text content, ``html`` the outer HTML, ``attr:x`` the
    attribute value (URL attributes made absolute against <base href> or ``base_url``).
    Pass a Document to share one parse with ``builtins``.
    """
    doc = html if isinstance(html, Document) else Document(html, base_url)
    out: dict[str, Any] = {}
    page: dict[str, Any] | None = None
    for field in compiled.fields:
        if field.engine == "css":
            out[field.name] = _run_css(field, doc)
        elif field.engine == "xpath":
            out[field.name] = _run_xpath(field, doc)
        elif field.selector in _CONTENT_BUILTINS:
            out[field.name] = content_builtin(doc, field.selector)
        else:
            if page is None:
                page = builtins(doc, base_url)
            out[field.name] = page[field.selector]
    return out


# ---------------------------------------------------------------------------------------------
# Built-in fields


def _attr(node: LexborNode | None, name: str) -> str | None:
    if node is None:
        return None
    value = node.attributes.get(name)
    if value is None:
        return None
    value = _collapse(value)
    return value or None


def _links(doc: Document) -> list[str]:
    seen: set[str] = set()
    links: list[str] = []
    for node in doc.lexbor.css("a[href]"):
        href = node.attributes.get("href")
        if not href:
            continue
        href = href.strip()
        if not href or href.startswith("#"):
            continue  # fragment-only: the same document
        url = doc.absolute(href)
        if not url[:6].lower().startswith(_LINK_SCHEMES):
            continue  # mailto:, javascript:, tel:, data:, ftp:, ...
        url = url.split("#", 1)[0]
        if url not in seen:
            seen.add(url)
            links.append(url)
    return links


def builtins(html: str | Document, base_url: str) -> dict[str, Any]:
    """title, meta description, canonical URL, absolute http(s) links and the page language."""
    doc = html if isinstance(html, Document) else Document(html, base_url)
    tree = doc.lexbor
    title_node = tree.css_first("head > title") or tree.css_first("title")
    title = _collapse(title_node.text()) if title_node is not None else ""
    canonical = _attr(tree.css_first('link[rel~="canonical" i][href]'), "href")
    if canonical is not None:
        canonical = doc.absolute(canonical)
        if not canonical.lower().startswith(_LINK_SCHEMES):
            canonical = None
    return {
        "title": title or None,
        "description": _attr(tree.css_first('meta[name="description" i][content]'), "content"),
        "canonical": canonical,
        "links": _links(doc),
        "language": _attr(tree.css_first("html[lang]"), "lang"),
    }


# ---------------------------------------------------------------------------------------------
# Content built-ins: renderings of the whole page (what the Firecrawl-compatible API serves)

_CONTENT_BUILTINS: Final = frozenset(
    {"markdown", "markdown_main", "html", "html_main", "raw_html", "metadata", "images"}
)
# Limits on what <meta> tags can put into stored metadata (a page could carry thousands).
_MAX_META_TAGS: Final = 100
_MAX_META_VALUE_CHARS: Final = 2000
# <meta name|property> -> Firecrawl's metadata key; others are kept under their own name.
_META_KEYS: Final = {
    "keywords": "keywords",
    "robots": "robots",
    "og:title": "ogTitle",
    "og:description": "ogDescription",
    "og:url": "ogUrl",
    "og:image": "ogImage",
    "og:audio": "ogAudio",
    "og:determiner": "ogDeterminer",
    "og:locale": "ogLocale",
    "og:locale:alternate": "ogLocaleAlternate",
    "og:site_name": "ogSiteName",
    "og:video": "ogVideo",
    "dcterms.created": "dcTermsCreated",
    "dc.date.created": "dcDateCreated",
    "dc.date": "dcDate",
    "dcterms.type": "dcTermsType",
    "dc.type": "dcType",
    "dcterms.audience": "dcTermsAudience",
    "dcterms.subject": "dcTermsSubject",
    "dc.subject": "dcSubject",
    "dc.description": "dcDescription",
    "dcterms.keywords": "dcTermsKeywords",
    "article:modified_time": "modifiedTime",
    "article:published_time": "publishedTime",
    "article:tag": "articleTag",
    "article:section": "articleSection",
}
_LIST_META: Final = frozenset({"ogLocaleAlternate"})


def _add_meta(out: dict[str, Any], key: str, value: str, *, as_list: bool = False) -> None:
    current = out.get(key)
    if current is None:
        out[key] = [value] if as_list else value
    elif isinstance(current, list):
        current.append(value)
    elif current != value:
        out[key] = [current, value]


def _metadata(doc: Document) -> dict[str, Any]:
    """title, description, language, favicon, Open Graph / Dublin Core / article fields
    under Firecrawl's names, and every other <meta name|property> under its own name
    (a list when repeated). No null values: absent means absent."""
    tree = doc.lexbor
    title_node = tree.css_first("head > title") or tree.css_first("title")
    meta: dict[str, Any] = {}
    seen = 0
    for node in tree.css("meta[content]"):
        attrs = node.attributes
        name = attrs.get("property") or attrs.get("name")
        content = attrs.get("content")
        if not name or content is None:
            continue
        name = name.strip()
        content = _collapse(content)[:_MAX_META_VALUE_CHARS]
        if not name or not content or len(name) > 128:
            continue
        seen += 1
        if seen > _MAX_META_TAGS:
            break
        _add_meta(meta, name, content)
        key = _META_KEYS.get(name.lower())
        if key is not None:
            _add_meta(meta, key, content, as_list=key in _LIST_META)
    icon = _attr(tree.css_first('link[rel~="icon" i][href]'), "href")
    for key, value in (
        ("title", _collapse(title_node.text()) if title_node is not None else None),
        ("description", _attr(tree.css_first('meta[name="description" i][content]'), "content")),
        ("language", _attr(tree.css_first("html[lang]"), "lang")),
        ("favicon", doc.absolute(icon) if icon else None),
    ):
        if value:  # the page's own element wins over a <meta> of the same name
            meta[key] = value
    return meta


def content_builtin(html: str | Document, name: str, base_url: str | None = None) -> Any:
    """One content built-in of a page: ``markdown`` / ``markdown_main`` (the whole page or
    its main content as Markdown), ``html`` / ``html_main`` (the same as cleaned HTML),
    ``raw_html`` (the page as fetched), ``metadata`` (see _metadata) or ``images``."""
    doc = html if isinstance(html, Document) else Document(html, base_url or "")
    if name == "raw_html":
        return doc.html
    if name == "metadata":
        return _metadata(doc)
    if name == "images":
        return image_urls(doc.lexbor, doc.absolute)
    if name in ("markdown", "markdown_main", "html", "html_main"):
        cleaned = clean_html(doc.html, doc.absolute, main_only=name.endswith("_main"))
        return cleaned if name.startswith("html") else html_to_markdown(cleaned)
    raise ValueError(f"unknown content built-in {name!r}")
