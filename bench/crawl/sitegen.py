"""A deterministic synthetic shop to crawl: product pages, list pages, categories, an index.

    python bench/crawl/sitegen.py OUT_DIR [--pages 20000] [--seed 7]

Exactly ``--pages`` HTML pages, all reachable from ``/``:

- ``/`` links to every category, its first list page, and the info pages;
- ``/c/<slug>/`` (one category per ~1,000 pages) links to all its list pages;
- ``/c/<slug>/page/<k>.html`` lists 20 products of the category (prev/next pagination);
- ``/p/<id>.html`` product pages, 8-15 KB each, with the fields every crawler extracts
  (``FIELDS``: title, price, sku, description, category) and ~20 links: navigation, a
  breadcrumb, 12 related products (absolute and relative hrefs) and a fragment link;
- ``/info/<k>.html`` 0-2 filler pages so that the total is exactly ``--pages``.

``manifest.json`` next to the pages holds the counts and each product's expected fields,
which the benchmark compares with what every crawler stored. Pure standard library: the
Scrapy run (in a venv of its own) imports ``FIELDS`` and ``collapse`` from here too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# field -> CSS selector; the value is the element's text with whitespace collapsed
FIELDS: dict[str, str] = {
    "title": "h1.title",
    "price": "span.price",
    "sku": "span.sku",
    "description": "p.description",
    "category": "a.category",
}
PER_LIST = 20
PAGES_PER_CATEGORY = 1000
RELATED = 12
MIN_PRODUCT_BYTES = 8 * 1024
MAX_PRODUCT_BYTES = 15 * 1024
FORMAT = 3  # bump when the generated site changes (cached sites are regenerated)


def _split_words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_ADJECTIVES = _split_words(
    "sturdy compact deluxe classic modern rustic elegant vintage portable premium "
    "lightweight durable ergonomic foldable wireless smart organic handmade refined bold"
)
_MATERIALS = _split_words(
    "oak steel bamboo ceramic linen copper walnut cotton leather glass marble wool "
    "aluminium porcelain granite canvas"
)
_NOUNS = _split_words(
    "kettle lamp chair desk backpack blender mug shelf rug jacket speaker clock vase "
    "skillet toaster pillow bench stool cabinet mirror"
)
_CATEGORY_WORDS = _split_words(
    "Kitchen Garden Outdoor Office Lighting Textiles Furniture Audio Travel Bath Decor "
    "Storage Tools Pets Toys Sports Crafts Books Music Health Beauty Baby Auto Party"
)
_WORDS = _split_words(
    "the a quality design made with care for everyday use built to last easy clean "
    "simple setup perfect gift home work travel stylish finish comfortable grip "
    "reliable performance tested durable material fits any room daily routine great "
    "value family friendly modern look classic feel carefully crafted shipped fast "
    "satisfied customers recommend it highly sturdy build smooth surface warm tone"
)
_REVIEWERS = _split_words("Ana Ben Chloe Dev Eli Fatima Gus Hana Ivan Jo Kai Lena Mo Nia Omar")


def peak_rss_kb() -> int:
    """This process's peak RSS in KiB: VmHWM of /proc/self/status.

    Not getrusage's ru_maxrss: on Linux that keeps the high-water mark of the process image
    exec replaced, i.e. the RSS of the (forked) parent that started us.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def collapse(text: str | None) -> str | None:
    """Whitespace-collapsed text, as Trawler's ``"value": "text"`` returns it."""
    return None if text is None else " ".join(text.split())


@dataclass(frozen=True)
class Layout:
    pages: int
    categories: int
    products: int
    products_per_category: list[int]
    lists_per_category: list[int]
    info: int

    @property
    def lists(self) -> int:
        return sum(self.lists_per_category)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def plan(pages: int) -> Layout:
    """Counts of each page kind adding up to exactly ``pages`` (at least 4)."""
    if pages < 4:
        raise ValueError("a site needs at least 4 pages (index, category, list, product)")
    categories = max(1, min(len(_CATEGORY_WORDS), round(pages / PAGES_PER_CATEGORY)))
    # the most products whose list pages still fit; filler info pages take the rest
    best = None
    low, high = 1, pages
    while low <= high:
        products = (low + high) // 2
        per_cat = _split(products, categories)
        lists = [max(1, -(-n // PER_LIST)) for n in per_cat]
        used = 1 + categories + sum(lists) + products
        if used <= pages:
            best = (products, per_cat, lists, pages - used)
            low = products + 1
        else:
            high = products - 1
    if best is None or best[0] < categories:
        raise ValueError(f"{pages} pages are too few for {categories} categories")
    products, per_cat, lists, info = best
    return Layout(pages, categories, products, per_cat, lists, info)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _sentence(rng: random.Random) -> str:
    text = _words(rng, rng.randint(8, 18))
    return text[0].upper() + text[1:] + "."


class Site:
    """Generates the pages of one layout with one seed."""

    def __init__(self, layout: Layout, seed: int) -> None:
        self.layout = layout
        self.rng = random.Random(seed)
        rng = self.rng
        self.category_names = [f"{w} Goods" for w in _CATEGORY_WORDS[: layout.categories]]
        self.category_slugs = [w.lower() for w in _CATEGORY_WORDS[: layout.categories]]
        # product ids 1..P, category blocks in order; list page of product = its rank // 20
        self.product_category: list[int] = []
        self.product_list: list[int] = []
        for cat, count in enumerate(layout.products_per_category):
            for rank in range(count):
                self.product_category.append(cat)
                self.product_list.append(rank // PER_LIST + 1)
        self.names = [
            f"{rng.choice(_ADJECTIVES).title()} {rng.choice(_MATERIALS).title()} "
            f"{rng.choice(_NOUNS).title()} {i + 1}"
            for i in range(layout.products)
        ]

    # ------------------------------------------------------------------ urls
    def product_url(self, pid: int) -> str:
        return f"/p/{pid}.html"

    def category_url(self, cat: int) -> str:
        return f"/c/{self.category_slugs[cat]}/"

    def list_url(self, cat: int, k: int) -> str:
        return f"/c/{self.category_slugs[cat]}/page/{k}.html"

    def info_url(self, k: int) -> str:
        return f"/info/{k}.html"

    # ------------------------------------------------------------------ pages
    @staticmethod
    def _page(title: str, body: str) -> str:
        return (
            '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f"<title>{title} | Bench Shop</title>\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"</head>\n<body>\n{body}\n</body></html>\n"
        )

    def _nav(self) -> str:
        rng = self.rng
        cats = rng.sample(range(self.layout.categories), min(3, self.layout.categories))
        links = " ".join(
            f'<a href="{self.category_url(c)}">{self.category_names[c]}</a>' for c in cats
        )
        return f'<header><nav><a href="/">Home</a> {links}</nav></header>'

    @staticmethod
    def _footer() -> str:
        return (
            '<footer><p>Bench Shop, a synthetic site. <a href="/">Back to the shop</a></p></footer>'
        )

    def index(self) -> str:
        items = []
        for cat in range(self.layout.categories):
            items.append(
                f'<li><a href="{self.category_url(cat)}">{self.category_names[cat]}</a> '
                f'(<a href="{self.list_url(cat, 1)}">first page</a>)</li>'
            )
        info = "".join(
            f'<li><a href="{self.info_url(k)}">Info {k}</a></li>'
            for k in range(1, self.layout.info + 1)
        )
        body = (
            f"{self._nav()}\n<main><h1>Bench Shop</h1>\n<ul class='categories'>"
            f"{''.join(items)}</ul>\n<ul class='info'>{info}</ul></main>\n{self._footer()}"
        )
        return self._page("Bench Shop", body)

    def category(self, cat: int) -> str:
        n = self.layout.lists_per_category[cat]
        pages = " ".join(f'<a href="{self.list_url(cat, k)}">{k}</a>' for k in range(1, n + 1))
        body = (
            f"{self._nav()}\n<main><h1>{self.category_names[cat]}</h1>\n"
            f"<p>{_sentence(self.rng)}</p>\n<nav class='pages'>{pages}</nav></main>\n"
            f"{self._footer()}"
        )
        return self._page(self.category_names[cat], body)

    def listing(self, cat: int, k: int, first_pid: int, count: int) -> str:
        rng = self.rng
        n = self.layout.lists_per_category[cat]
        rows = []
        for pid in range(first_pid, first_pid + count):
            rows.append(
                f'<li class="item"><a href="{self.product_url(pid)}">{self.names[pid - 1]}</a>'
                f' <span class="list-price">${rng.randint(5, 900)}.{rng.randint(0, 99):02d}</span>'
                "</li>"
            )
        pager = []
        if k > 1:
            pager.append(f'<a rel="prev" href="{self.list_url(cat, k - 1)}">previous</a>')
        if k < n:
            pager.append(f'<a rel="next" href="{self.list_url(cat, k + 1)}">next</a>')
        body = (
            f"{self._nav()}\n<main><h1>{self.category_names[cat]}, page {k}</h1>\n"
            f'<p><a href="{self.category_url(cat)}">All pages of this category</a></p>\n'
            f"<ul class='items'>{''.join(rows)}</ul>\n<nav>{' '.join(pager)}</nav></main>\n"
            f"{self._footer()}"
        )
        return self._page(f"{self.category_names[cat]} page {k}", body)

    def product(self, pid: int) -> tuple[str, list[str]]:
        """The page and its expected field values (in FIELDS order)."""
        rng = self.rng
        cat = self.product_category[pid - 1]
        name = self.names[pid - 1]
        price = f"${rng.randint(5, 900)}.{rng.randint(0, 99):02d}"
        sku = f"SKU-{pid:06d}-{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}{rng.randint(0, 9)}"
        description = " ".join(_sentence(rng) for _ in range(rng.randint(3, 6)))
        category = self.category_names[cat]
        total = self.layout.products
        related = []
        for _ in range(RELATED):
            other = rng.randint(1, total)
            style = rng.random()
            if style < 0.5:
                href = self.product_url(other)  # root-relative
            elif style < 0.8:
                href = f"{other}.html"  # relative to /p/
            else:
                href = f"../p/{other}.html"  # dot segments
            related.append(f'<li><a href="{href}">{self.names[other - 1]}</a></li>')
        specs = "".join(
            f"<tr><th>{rng.choice(_WORDS).title()}</th><td>{_words(rng, rng.randint(2, 6))}</td>"
            "</tr>"
            for _ in range(rng.randint(4, 10))
        )
        head = (
            f"{self._nav()}\n<main>\n<div class='breadcrumb'><a href=\"/\">Home</a> &rsaquo; "
            f'<a class="category" href="{self.category_url(cat)}">{category}</a> &rsaquo; '
            f'<a href="{self.list_url(cat, self.product_list[pid - 1])}">'
            f"Page {self.product_list[pid - 1]}</a></div>\n"
            f'<h1 class="title">{name}</h1>\n'
            f'<div class="buy"><span class="price">{price}</span> '
            f'<span class="sku">{sku}</span> <a href="#reviews">Read the reviews</a></div>\n'
            f'<p class="description">{description}</p>\n'
            f"<table class='specs'>{specs}</table>\n"
        )
        tail = (
            f"<section class='related'><h2>Related products</h2><ul>{''.join(related)}</ul>"
            f"</section>\n</main>\n{self._footer()}"
        )
        target = rng.randint(MIN_PRODUCT_BYTES, MAX_PRODUCT_BYTES)
        reviews: list[str] = []
        size = len(self._page(name, head + tail)) + 60
        while True:
            review = (
                f"<article class='review'><h3>{rng.choice(_REVIEWERS)} "
                f"rated it {rng.randint(1, 5)}/5</h3><p>"
                + " ".join(_sentence(rng) for _ in range(rng.randint(2, 5)))
                + "</p></article>"
            )
            if size + len(review) > target:
                break
            reviews.append(review)
            size += len(review) + 1
        section = f"<section id='reviews'><h2>Reviews</h2>\n{chr(10).join(reviews)}"
        page = self._page(name, f"{head}{section}</section>\n{tail}")
        # pad to the target exactly, so every page lands in [8 KB, 15 KB]
        filler = target - len(page.encode()) - len("<p class='note'></p>")
        if filler > 0:
            note = _words(rng, filler // 3 + 1)[:filler]
            page = self._page(name, f"{head}{section}<p class='note'>{note}</p></section>\n{tail}")
        return page, [name, price, sku, description, category]


def _ready(out: Path, pages: int, seed: int) -> dict[str, Any] | None:
    manifest = out / "manifest.json"
    if not manifest.exists():
        return None
    try:
        data: dict[str, Any] = json.loads(manifest.read_text())
    except ValueError:
        return None
    if data.get("pages") == pages and data.get("seed") == seed and data.get("format") == FORMAT:
        return data
    return None


def generate(out: Path, pages: int, seed: int = 7, *, force: bool = False) -> dict[str, Any]:
    """Write the site into ``out`` (reused when already generated with the same arguments);
    returns the manifest."""
    if not force and (cached := _ready(out, pages, seed)) is not None:
        return cached
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.perf_counter()
    layout = plan(pages)
    site = Site(layout, seed)
    paths: list[str] = []
    expected: dict[str, list[str]] = {}
    product_sizes: list[int] = []
    total_bytes = 0

    def write(url: str, html: str) -> None:
        nonlocal total_bytes
        rel = url.lstrip("/")
        target = out / (rel + "index.html" if rel.endswith("/") or not rel else rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        data = html.encode()
        target.write_bytes(data)
        total_bytes += len(data)
        paths.append(url)

    write("/", site.index())
    pid = 1
    for cat in range(layout.categories):
        write(site.category_url(cat), site.category(cat))
        remaining = layout.products_per_category[cat]
        for k in range(1, layout.lists_per_category[cat] + 1):
            count = min(PER_LIST, remaining)
            write(site.list_url(cat, k), site.listing(cat, k, pid, count))
            for p in range(pid, pid + count):
                html, values = site.product(p)
                write(site.product_url(p), html)
                expected[site.product_url(p)] = values
                product_sizes.append(len(html.encode()))
            pid += count
            remaining -= count
    for k in range(1, layout.info + 1):
        write(
            site.info_url(k), site._page(f"Info {k}", f"<main><p>{_sentence(site.rng)}</p></main>")
        )
    (out / "robots.txt").write_text("User-agent: *\nAllow: /\n")
    if len(paths) != pages or len(set(paths)) != pages:
        raise AssertionError(
            f"generated {len(paths)} pages ({len(set(paths))} distinct), not {pages}"
        )
    # nginx workers run as an unprivileged user: the tree must be world-readable
    for root, dirs, _files in os.walk(out):
        os.chmod(root, 0o755)
        for d in dirs:
            os.chmod(Path(root) / d, 0o755)
    manifest = {
        "format": FORMAT,
        "pages": pages,
        "seed": seed,
        "products": layout.products,
        "lists": layout.lists,
        "categories": layout.categories,
        "info": layout.info,
        "bytes": total_bytes,
        "product_bytes": {
            "min": min(product_sizes),
            "max": max(product_sizes),
            "mean": round(sum(product_sizes) / len(product_sizes)),
        },
        "fields": FIELDS,
        "paths": paths,
        "expected": expected,
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--pages", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args()
    manifest = generate(args.out, args.pages, args.seed, force=args.force)
    summary = {k: v for k, v in manifest.items() if k not in ("paths", "expected")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
