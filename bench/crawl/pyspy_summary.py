"""Summarise a py-spy profile recorded with ``--format raw`` (collapsed stacks).

    python bench/crawl/pyspy_summary.py profile.txt [--top 15]

Three views of where one worker's CPU went (shares of the samples py-spy took while the
worker was running, idle samples excluded):

- stage: each sample goes to the innermost frame in Trawler's own code (``app/...``),
  grouped into pipeline stages (fetch, parse + extract, link discovery, scope and URL
  canonicalization, robots, database writes/claims, executor bookkeeping); samples with
  no Trawler frame are library callbacks run by the event loop (aiohttp's protocol,
  asyncpg's protocol, the loop itself);
- Trawler function: the share of samples with that function anywhere on the stack
  (inclusive: its callees count);
- library: the package of the innermost frame (self time: whose code was running);
- function: the innermost frames (self time), top N.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# innermost app/ file -> stage (first match wins)
STAGES: tuple[tuple[str, str], ...] = (
    ("app/scraper/fetch.py", "fetch (HTTP client calls)"),
    ("app/scraper/ssrf.py", "fetch (HTTP client calls)"),
    ("app/scraper/extract.py", "parse + extract fields"),
    ("app/scraper/links.py", "link discovery"),
    ("app/scraper/scope.py", "scope + URL canonicalization"),
    ("app/scraper/urls.py", "scope + URL canonicalization"),
    ("app/services/frontier.py", "enqueue discovered links (frontier)"),
    ("app/scraper/robots.py", "robots.txt"),
    ("app/services/robots_cache.py", "robots.txt"),
    ("app/services/queue.py", "database: claim / complete / store pages"),
    ("app/services/state.py", "database: claim / complete / store pages"),
    ("app/database/", "database: claim / complete / store pages"),
    ("app/utils/handlers.py", "handler glue (PageHandler)"),
    ("app/utils/executor.py", "executor (claim loop, writer, bookkeeping)"),
    # the outermost app frame (`trawler worker` -> asyncio.Runner): no Trawler function is
    # on the stack, uvloop's C code is running (socket reads/writes, timers, callbacks)
    ("app/cli.py", "event loop (uvloop C code: socket I/O, timers, task switching)"),
    ("app/commands.py", "event loop (uvloop C code: socket I/O, timers, task switching)"),
    ("app/", "other Trawler code"),
)
# no app/ frame in the stack: whose callback was the event loop running
OUTSIDE: tuple[tuple[str, str], ...] = (
    ("aiohttp", "outside Trawler frames: aiohttp protocol callbacks"),
    ("asyncpg", "outside Trawler frames: asyncpg protocol callbacks"),
    ("sqlalchemy", "outside Trawler frames: SQLAlchemy"),
    ("asyncio", "outside Trawler frames: event loop"),
    ("uvloop", "outside Trawler frames: event loop"),
)


def _file_of(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame)
    if match is None:
        return frame, ""
    return match.group("func"), match.group("file")


def package(path: str) -> str:
    """``aiohttp/client.py`` -> aiohttp, ``app/scraper/extract.py`` -> app/scraper/extract.py."""
    if path.startswith("app/"):
        return path
    head = path.split("/", 1)[0]
    if head.endswith(".py"):
        head = head[:-3]
    return head or "?"


@dataclass
class Profile:
    samples: int = 0
    stages: Counter[str] = field(default_factory=Counter)
    libraries: Counter[str] = field(default_factory=Counter)
    functions: Counter[str] = field(default_factory=Counter)
    app_functions: Counter[str] = field(default_factory=Counter)  # on the stack (inclusive)


def load(path: Path) -> Profile:
    profile = Profile()
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        profile.samples += count
        func, file = _file_of(frames[-1])
        profile.functions[f"{func} ({file})"] += count
        profile.libraries[package(file)] += count
        innermost_app = None
        on_stack: set[str] = set()
        for frame in reversed(frames):
            f_func, f_file = _file_of(frame)
            if f_file.startswith("app/"):
                if innermost_app is None:
                    innermost_app = (f_func, f_file)
                on_stack.add(f"{f_func} ({f_file})")
        for name in on_stack:
            profile.app_functions[name] += count
        if innermost_app is not None:
            stage = next(name for prefix, name in STAGES if innermost_app[1].startswith(prefix))
        else:
            stage = next(
                (name for prefix, name in OUTSIDE if package(file) == prefix),
                f"outside Trawler frames: {package(file)}",
            )
        profile.stages[stage] += count
    return profile


def render(profile: Profile, top: int = 15) -> list[str]:
    total = profile.samples or 1

    def table(title: str, counter: Counter[str], n: int) -> list[str]:
        lines = [f"| {title} | share |", "| --- | ---: |"]
        for name, count in counter.most_common(n):
            lines.append(f"| {name.replace('|', '/')} | {count / total:.1%} |")
        return lines

    # entry points (the CLI, the event loop runner) are on every stack: leave them out
    inclusive = Counter({name: n for name, n in profile.app_functions.items() if n < 0.95 * total})
    return [
        f"{profile.samples:,} samples.",
        "",
        *table("stage (innermost Trawler frame)", profile.stages, 20),
        "",
        *table("Trawler function (inclusive: on the stack)", inclusive, top + 10),
        "",
        *table("library (self time)", profile.libraries, top),
        "",
        *table("function (self time)", profile.functions, top),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("raw", type=Path, help="py-spy record --format raw output")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    print("\n".join(render(load(args.raw), args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
