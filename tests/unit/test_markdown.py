"""Page content built-ins: cleaned HTML, main content, Markdown, metadata, images."""

from __future__ import annotations

import re
from typing import Any

import pytest

from app.scraper.extract import (
    BUILTINS,
    Document,
    compile_spec,
    content_builtin,
    extract,
    validate_spec,
)
from app.scraper.markdown import clean_html, html_to_markdown

pytestmark = pytest.mark.timeout(10)

URL = "https://docs.example/guide/start.html"


def _md(html: str, *, main: bool = True, url: str = URL) -> str:
    return str(content_builtin(html, "markdown_main" if main else "markdown", url))


def _resolve(href: str) -> str:
    return Document("", URL).absolute(href)


def test_markdown_of_common_elements() -> None:
    html = """<body><h1>Start</h1><h2>Install</h2>
    <p>Run <code>pip install x</code>, then <em>wait</em> and <strong>smile</strong>.</p>
    <ol><li>one</li><li>two<ul><li>two-a</li></ul></li></ol>
    <pre><code>x = 1
y = 2</code></pre>
    <blockquote>quoted</blockquote>
    <table><tr><th>Name</th><th>Size</th></tr><tr><td>a</td><td>1</td></tr></table>
    <p><a href="../api/">API</a> <img src="/logo.png" alt="logo"></p></body>"""
    markdown = _md(html, main=False)
    assert markdown.startswith("# Start\n\n## Install")
    assert "Run `pip install x`, then *wait* and **smile**." in markdown
    assert "1. one\n2. two\n   - two-a" in markdown
    assert "```\nx = 1\ny = 2\n```" in markdown
    assert "> quoted" in markdown
    squeezed = re.sub(" +", " ", markdown)  # GFM table cells are padded to the column
    assert "| Name | Size |\n| ---- | ---- |\n| a | 1 |" in squeezed
    # links and images absolute, against the page URL
    assert "[API](https://docs.example/api/)" in markdown
    assert "![logo](https://docs.example/logo.png)" in markdown


def test_main_content_prefers_main_and_drops_furniture() -> None:
    html = """<html><body><header><a href="/">Docs home</a></header>
    <nav>Menu</nav><div class="sidebar">Side</div>
    <main><header><h1>Guide</h1></header><p>Body text.</p>
    <nav class="toc">Contents</nav><aside>Note aside</aside></main>
    <footer>Legal</footer><script>x()</script><style>p{}</style></body></html>"""
    markdown = _md(html)
    # the article's own header is content; navigation, asides and the site around are not
    assert markdown == "# Guide\n\nBody text."
    whole = _md(html, main=False)
    for text in ("Docs home", "Menu", "Side", "Guide", "Contents", "Note aside", "Legal"):
        assert text in whole
    assert "x()" not in whole and "p{}" not in whole


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('<div role="main"><p>Role main.</p></div><nav>N</nav>', "Role main."),
        ('<div id="content"><p>By id.</p></div><footer>F</footer>', "By id."),
        ("<article><p>Only article.</p></article><aside>A</aside>", "Only article."),
        # an empty <main> is no main content: the next candidate wins
        ("<main></main><article><p>Article.</p></article>", "Article."),
    ],
)
def test_main_content_candidates(body: str, expected: str) -> None:
    assert _md(f"<html><body>{body}</body></html>") == expected


def test_without_a_main_element_the_body_minus_furniture_is_used() -> None:
    html = """<body><header><h1>Site</h1></header><nav>N</nav>
    <article><header><h2>First</h2></header><p>one</p></article>
    <article><h2>Second</h2><p>two</p></article><footer>F</footer></body>"""
    # two articles: neither is "the" content; the site header goes, theirs stay
    assert _md(html) == "## First\n\none\n\n## Second\n\ntwo"


def test_inline_images_and_base_href() -> None:
    html = """<html><head><base href="https://cdn.example/assets/"></head><body><main>
    <p><img src="data:image/png;base64,iVBORw0KGgo=" alt="chart"> and
    <img src="pic.png" alt="pic"> <a href="page">p</a></p></main></body></html>"""
    markdown = _md(html)
    assert "base64" not in markdown and "chart" in markdown
    assert "![pic](https://cdn.example/assets/pic.png)" in markdown
    assert "[p](https://cdn.example/assets/page)" in markdown
    assert content_builtin(html, "images", URL) == ["https://cdn.example/assets/pic.png"]


def test_clean_html_outputs() -> None:
    html = '<html><head><title>T</title></head><body><nav>N</nav><main><a href="/x">x</a></main><script>s</script></body></html>'
    assert (
        clean_html(html, _resolve, main_only=True)
        == '<main><a href="https://docs.example/x">x</a></main>'
    )
    whole = clean_html(html, _resolve, main_only=False)
    assert whole == ('<body><nav>N</nav><main><a href="https://docs.example/x">x</a></main></body>')


@pytest.mark.parametrize("html", ["", "   ", "<html></html>", "just text", "<p>"])
def test_degenerate_documents(html: str) -> None:
    for name in ("markdown", "markdown_main", "html", "html_main", "images", "metadata"):
        content_builtin(html, name, URL)  # never raises
    assert html_to_markdown("") == ""
    assert _md("just text") in ("just text", "")
    assert content_builtin("", "metadata", URL) == {}


def test_metadata() -> None:
    html = """<html lang="fr"><head><title> Le  guide </title>
    <meta name="description" content="Tout savoir">
    <meta name="keywords" content="a, b"><meta name="robots" content="index">
    <meta property="og:title" content="OG title"><meta property="og:image" content="/i.png">
    <meta property="og:locale:alternate" content="en_GB">
    <meta property="og:locale:alternate" content="de_DE">
    <meta property="article:published_time" content="2024-01-02">
    <meta name="twitter:card" content="summary"><meta name="empty" content="">
    <meta charset="utf-8"><link rel="shortcut icon" href="/fav.ico"></head><body></body></html>"""
    meta = content_builtin(html, "metadata", URL)
    assert meta["title"] == "Le guide"
    assert meta["description"] == "Tout savoir"
    assert meta["language"] == "fr"
    assert meta["keywords"] == "a, b" and meta["robots"] == "index"
    assert meta["ogTitle"] == "OG title" and meta["og:title"] == "OG title"
    assert meta["ogImage"] == "/i.png"
    assert meta["ogLocaleAlternate"] == ["en_GB", "de_DE"]
    assert meta["publishedTime"] == "2024-01-02"
    assert meta["twitter:card"] == "summary"
    assert meta["favicon"] == "https://docs.example/fav.ico"
    assert "empty" not in meta and None not in meta.values()


def test_metadata_is_bounded() -> None:
    tags = "".join(f'<meta name="m{i}" content="{"v" * 5000}">' for i in range(500))
    meta = content_builtin(f"<html><head>{tags}</head></html>", "metadata", URL)
    assert len(meta) == 100
    assert all(len(value) == 2000 for value in meta.values())


def test_content_builtins_in_an_extract_spec() -> None:
    html = (
        "<html><head><title>T</title></head><body><nav>N</nav><main><h1>H</h1></main></body></html>"
    )
    spec: dict[str, Any] = {name: {"builtin": name} for name in BUILTINS}
    spec["h"] = {"css": "h1"}
    validated = validate_spec(spec)
    data = extract(html, URL, compile_spec(validated))
    assert data["markdown_main"] == "# H"
    assert data["markdown"] == "N\n\n# H"
    assert data["html_main"] == "<main><h1>H</h1></main>"
    assert data["raw_html"] == html
    assert data["metadata"] == {"title": "T"}
    assert data["title"] == "T" and data["h"] == "H"
    with pytest.raises(ValueError, match="builtin"):
        validate_spec({"x": {"builtin": "screenshot"}})
