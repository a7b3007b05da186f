"""Extraction specs: validation, CSS/XPath fields, value kinds, base href and built-ins."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urljoin

import pytest
from pydantic import BaseModel, ValidationError

from app.scraper.extract import (
    Document,
    ExtractSpec,
    FieldSpec,
    InvalidSelector,
    InvalidSpec,
    _UrlResolver,
    builtins,
    compile_spec,
    extract,
    validate_spec,
)

pytestmark = pytest.mark.timeout(10)

URL = "https://shop.example/catalog/item.html?id=7"

PAGE = """<!doctype html>
<html lang=" en-GB ">
<head>
  <title>  Blue   Widget | Shop </title>
  <meta name="Description" content="  The best
     blue widget. ">
  <link rel="stylesheet" href="/s.css">
  <link rel="Canonical" href="/p/blue-widget">
</head>
<body>
  <h1 class="name">Blue <b>Widget</b></h1>
  <p class="price" data-currency="EUR"> 10,00&nbsp;€ </p>
  <p class="price sale">8,00 €</p>
  <img id="hero" src="img/hero.png" alt="Hero">
  <input id="agree" type="checkbox" checked>
  <ul class="tags"><li>blue</li><li> tools </li><li>sale</li></ul>
  <nav>
    <a href="/c/widgets">Widgets</a>
    <a href="related.html#reviews">Related</a>
    <a href="#top">Top</a>
    <a href="mailto:shop@example.com">Mail</a>
    <a href="javascript:void(0)">JS</a>
    <a href="tel:+123">Call</a>
    <a href="data:text/plain,hi">Data</a>
    <a href="//cdn.example/file.pdf">PDF</a>
    <a href="https://other.example/x?y=1">Other</a>
    <a href="/c/widgets">Widgets again</a>
    <a href=" ../up/ ">Up</a>
    <a>No href</a>
  </nav>
</body>
</html>"""


def run(spec: dict[str, Any], html: str = PAGE, url: str = URL) -> dict[str, Any]:
    return extract(html, url, compile_spec(spec))


def test_css_text_first_and_all() -> None:
    data = run(
        {
            "name": {"css": "h1.name"},
            "price": {"css": ".price"},
            "prices": {"css": ".price", "all": True},
            "tags": {"css": ".tags li", "all": True},
            "missing": {"css": "table"},
            "missing_all": {"css": "table", "all": True},
        }
    )
    assert data["name"] == "Blue Widget"
    assert data["price"] == "10,00 €"  # whitespace (incl. nbsp) collapsed and stripped
    assert data["prices"] == ["10,00 €", "8,00 €"]
    assert data["tags"] == ["blue", "tools", "sale"]
    assert data["missing"] is None
    assert data["missing_all"] == []


def test_css_html_and_attributes() -> None:
    data = run(
        {
            "title_html": {"css": "h1", "value": "html"},
            "currency": {"css": ".price", "value": "attr:data-currency"},
            "hero": {"css": "#hero", "value": "attr:src"},
            "alt": {"css": "#hero", "value": "attr:ALT"},
            "checked": {"css": "#agree", "value": "attr:checked"},
            "absent": {"css": "#hero", "value": "attr:title"},
            "hrefs": {"css": "nav a", "value": "attr:href", "all": True},
        }
    )
    assert data["title_html"] == '<h1 class="name">Blue <b>Widget</b></h1>'
    assert data["currency"] == "EUR"
    assert data["hero"] == "https://shop.example/catalog/img/hero.png"
    assert data["alt"] == "Hero"
    assert data["checked"] == ""  # present without a value
    assert data["absent"] is None
    assert data["hrefs"][0] == "https://shop.example/c/widgets"
    assert "mailto:shop@example.com" in data["hrefs"]
    assert "https://shop.example/up/" in data["hrefs"]
    assert len(data["hrefs"]) == 11  # the <a> without href is skipped


def test_xpath_elements_strings_and_numbers() -> None:
    data = run(
        {
            "name": {"xpath": "//h1"},
            "name_html": {"xpath": "//h1", "value": "html"},
            "tags": {"xpath": "//ul[@class='tags']/li", "all": True},
            "hrefs": {"xpath": "//nav/a/@href", "all": True},
            "first_href": {"xpath": "//nav/a/@href"},
            "alt": {"xpath": "//img/@alt"},
            "texts": {"xpath": "//ul/li/text()", "all": True},
            "count": {"xpath": "count(//nav/a)"},
            "ratio": {"xpath": "count(//nav/a) div 8"},
            "has_nav": {"xpath": "boolean(//nav)"},
            "heading": {"xpath": "string(//h1)"},
            "hero": {"xpath": "//img", "value": "attr:src"},
            "none": {"xpath": "//table"},
            "counted": {"xpath": "count(//li)", "all": True},
        }
    )
    assert data["name"] == "Blue Widget"
    assert data["name_html"] == '<h1 class="name">Blue <b>Widget</b></h1>'
    assert data["tags"] == ["blue", "tools", "sale"]
    assert data["hrefs"][0] == "https://shop.example/c/widgets"  # @href results are absolute
    assert data["first_href"] == "https://shop.example/c/widgets"
    assert data["alt"] == "Hero"
    assert data["texts"] == ["blue", "tools", "sale"]
    assert data["count"] == 12
    assert isinstance(data["count"], int)
    assert data["ratio"] == 1.5
    assert data["has_nav"] is True
    assert data["heading"] == "Blue Widget"
    assert data["hero"] == "https://shop.example/catalog/img/hero.png"
    assert data["none"] is None
    assert data["counted"] == [3]


def test_css_and_xpath_agree() -> None:
    css = run({"v": {"css": ".tags li", "all": True}})["v"]
    xpath = run({"v": {"xpath": "//*[@class='tags']/li", "all": True}})["v"]
    assert css == xpath


def test_base_href_is_honoured() -> None:
    html = """<html><head><base href="https://static.example/assets/"></head><body>
      <a href="one.html">1</a><img src="/root.png"><a href="https://abs.example/">2</a>
    </body></html>"""
    data = run(
        {
            "links": {"css": "a", "value": "attr:href", "all": True},
            "img": {"xpath": "//img", "value": "attr:src"},
        },
        html,
    )
    assert data["links"] == ["https://static.example/assets/one.html", "https://abs.example/"]
    assert data["img"] == "https://static.example/root.png"
    assert builtins(html, URL)["links"] == [
        "https://static.example/assets/one.html",
        "https://abs.example/",
    ]


def test_relative_and_non_http_base_href() -> None:
    relative = '<html><head><base href="/sub/dir/"></head><a href="x">x</a></html>'
    assert builtins(relative, URL)["links"] == ["https://shop.example/sub/dir/x"]
    hostile = '<html><head><base href="javascript:alert(1)//"></head><a href="x">x</a></html>'
    assert builtins(hostile, URL)["links"] == ["https://shop.example/catalog/x"]


def test_builtins() -> None:
    data = builtins(PAGE, URL)
    assert data["title"] == "Blue Widget | Shop"
    assert data["description"] == "The best blue widget."
    assert data["canonical"] == "https://shop.example/p/blue-widget"
    assert data["language"] == "en-GB"
    assert data["links"] == [
        "https://shop.example/c/widgets",
        "https://shop.example/catalog/related.html",  # fragment dropped
        "https://cdn.example/file.pdf",
        "https://other.example/x?y=1",
        "https://shop.example/up/",
    ]


def test_builtins_on_empty_and_bare_documents() -> None:
    assert builtins("", URL) == {
        "title": None,
        "description": None,
        "canonical": None,
        "links": [],
        "language": None,
    }
    assert builtins("<p>no head</p>", URL)["title"] is None
    assert run({"x": {"xpath": "//p"}}, "") == {"x": None}


def test_document_shares_one_parse_and_parses_lazily() -> None:
    doc = Document(PAGE, URL)
    spec = compile_spec({"name": {"css": "h1"}})
    assert extract(doc, URL, spec) == {"name": "Blue Widget"}
    assert doc._lxml_done is False  # no XPath field: lxml never ran
    first_tree = doc.lexbor
    builtins(doc, URL)
    assert doc.lexbor is first_tree
    assert spec.needs_css
    assert not spec.needs_xpath


@pytest.mark.parametrize(
    ("spec", "engine", "fragment"),
    [
        ({"css": "..["}, "CSS", "'..['"),
        ({"css": "div >"}, "CSS", "'div >'"),
        ({"css": "a:nth-child("}, "CSS", "'a:nth-child('"),
        ({"css": "p::bogus-pseudo"}, "CSS", "bogus"),
        ({"xpath": "//a["}, "XPath", "'//a['"),
        ({"xpath": "//x:y"}, "XPath", "namespace"),
        ({"xpath": "nosuchfn()"}, "XPath", "function"),
    ],
)
def test_invalid_selectors_name_the_field(spec: dict[str, str], engine: str, fragment: str) -> None:
    with pytest.raises(InvalidSelector) as caught:
        compile_spec({"price": spec})
    message = str(caught.value)
    assert message.startswith("field 'price': invalid " + engine + " selector")
    assert fragment.lower() in message.lower()
    assert caught.value.field == "price"
    assert isinstance(caught.value, ValueError)


def test_fieldspec_rejects_bad_selector_at_validation() -> None:
    with pytest.raises(ValidationError, match=r"invalid CSS selector '\.\.\['"):
        FieldSpec(css="..[")
    with pytest.raises(ValidationError, match="invalid XPath selector"):
        FieldSpec.model_validate({"xpath": "//a["})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"css": "a", "value": "attr:"}, "value must be 'text', 'html' or 'attr:<name>'"),
        ({"css": "a", "value": "attr:  "}, "value must be 'text', 'html' or 'attr:<name>'"),
        ({"css": "a", "value": "txt"}, "value must be 'text', 'html' or 'attr:<name>'"),
        ({"css": "a", "value": "inner_html"}, "value must be"),
        ({"css": "a", "xpath": "//a"}, "exactly one of 'css', 'xpath' or 'builtin'"),
        ({}, "exactly one of 'css', 'xpath' or 'builtin'"),
        ({"css": "a", "regex": ".*"}, "Extra inputs are not permitted"),
        ({"css": ""}, "at least 1 character"),
    ],
)
def test_bad_field_specs(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FieldSpec.model_validate(spec)
    with pytest.raises(InvalidSpec, match=r"^field 'f': "):
        compile_spec({"f": spec})


def test_value_attr_name_is_normalised() -> None:
    assert FieldSpec(css="a", value="attr: HREF ").value == "attr:href"


def test_field_names_and_count() -> None:
    good = {"title": {"css": "h1"}, "a.b-c_d": {"css": "p"}, "_x": {"xpath": "//p"}}
    assert set(validate_spec(good)) == set(good)
    for name in ("", "1abc", "-x", "has space", "x" * 65):
        with pytest.raises(ValidationError):
            validate_spec({name: {"css": "h1"}})
        with pytest.raises(InvalidSpec, match="invalid field name"):
            compile_spec({name: {"css": "h1"}})
    too_many = {f"f{i}": {"css": "p"} for i in range(101)}
    with pytest.raises(ValidationError):
        validate_spec(too_many)
    with pytest.raises(InvalidSpec, match="too many fields"):
        compile_spec(too_many)


def test_spec_in_an_api_model_gives_field_location() -> None:
    class ScrapeRequest(BaseModel):
        extract: ExtractSpec = {}

    request = ScrapeRequest.model_validate({"extract": {"title": {"css": "h1"}}})
    assert request.extract["title"].css == "h1"
    with pytest.raises(ValidationError) as caught:
        ScrapeRequest.model_validate({"extract": {"price": {"css": "..["}}})
    error = caught.value.errors()[0]
    assert error["loc"] == ("extract", "price")
    assert "invalid CSS selector '..['" in error["msg"]


def test_json_roundtrip_compiles() -> None:
    spec = validate_spec({"links": {"xpath": "//a", "value": "attr:href", "all": True}})
    dumped = {name: field.model_dump(exclude_none=True) for name, field in spec.items()}
    assert dumped == {"links": {"xpath": "//a", "value": "attr:href", "all": True}}
    assert len(compile_spec(dumped)) == 1


def test_xml_declaration_and_legacy_meta_do_not_break_xpath() -> None:
    html = '<?xml version="1.0" encoding="iso-8859-1"?><html><head><meta charset="koi8-r">'
    html += "</head><body><p>Привет é</p></body></html>"
    assert run({"p": {"xpath": "//p"}}, html) == {"p": "Привет é"}


def test_url_resolver_matches_urljoin() -> None:
    bases = [
        "https://shop.example/catalog/item.html?id=7",
        "http://a.example/c/d/",
        "https://u:p@h.example:8443/dir/file.html?q=1#frag",
        "http://h.example/",
        "http://h.example",
    ]
    hrefs = [
        "a",
        "a/b?c=d#e",
        "/abs",
        "//cdn.example/y",
        "?q=2",
        "#frag",
        "http://o.example/x",
        "https://o.example/x/../y",
        "../up",
        "./here",
        ".",
        "..",
        " spaced ",
        "mailto:a@b.example",
        "javascript:x()",
        "HTTP://UP.example/x",
        "a b",
        "a:b/c",
        "\\\\evil",
        "a\tb",
        "é/ü",
        "data:text/html,hi",
        "",
    ]
    for base in bases:
        resolver = _UrlResolver(base)
        for href in hrefs:
            expected = urljoin(base, href.strip().replace("\t", ""))
            assert resolver.resolve(href) == expected, (base, href)


def test_extraction_is_fast() -> None:
    # 15 KB page, 20 links, 5 fields: one parse plus fields plus built-ins.
    links = "".join(f'<a href="/c/{i}">Category {i}</a>' for i in range(20))
    filler = "<div class='row'><p>Lorem ipsum dolor sit amet, consectetur elit.</p></div>"
    body = f"<nav>{links}</nav><h1>Widget</h1><span class='price'>$10</span>"
    body += "<div class='sku'>SKU-1</div><img class='main' src='/i.png'>"
    html = f"<html><head><title>T</title></head><body>{body}{filler * 180}</body></html>"
    assert 14_000 < len(html) < 17_000
    spec = compile_spec(
        {
            "title": {"css": "h1"},
            "price": {"css": ".price"},
            "sku": {"css": ".sku"},
            "img": {"css": "img.main", "value": "attr:src"},
            "cats": {"css": "nav a", "value": "attr:href", "all": True},
        }
    )

    def once() -> None:
        doc = Document(html, URL)
        data = extract(doc, URL, spec)
        assert len(data["cats"]) == 20
        assert len(builtins(doc, URL)["links"]) == 20

    for _ in range(20):
        once()
    rounds = 200
    started = time.perf_counter()
    for _ in range(rounds):
        once()
    per_page = (time.perf_counter() - started) / rounds
    # Typically ~0.3-0.5 ms on a shared 2-core box; the bound leaves room for noisy CI.
    assert per_page < 0.005, f"{per_page * 1000:.2f} ms per page"


def test_builtin_fields_share_the_parse_and_resolve_links() -> None:
    compiled = compile_spec(
        {"t": {"builtin": "title"}, "l": {"builtin": "links"}, "h": {"css": "h1"}}
    )
    html = (
        "<html><head><title> The  title </title></head>"
        "<body><h1>H</h1><a href='/a'>a</a><a href='mailto:x@y'>m</a></body></html>"
    )
    assert extract(html, "http://e.com/p", compiled) == {
        "t": "The title",
        "l": ["http://e.com/a"],
        "h": "H",
    }
