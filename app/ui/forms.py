"""The submit form: its values, and the request it stands for, validated by the API's own
schemas (ScrapeCreate / CrawlCreate), with each error placed next to the input it is about.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from pydantic import ValidationError
from starlette.datastructures import FormData

from app.api.schemas import CrawlCreate, FollowRules, JobSpecBase, Politeness, ScrapeCreate

Kind = Literal["scrape", "crawl"]
MIN_FIELD_ROWS: Final = 3
MAX_FIELD_ROWS: Final = 50
ENGINES: Final = ("css", "xpath", "builtin")
VALUES: Final = ("text", "html", "attr")

_FOLLOW_DEFAULTS = FollowRules()
_POLITENESS_DEFAULTS = Politeness()

# form input -> where it goes in the request body (and back, for errors)
NUMBER_INPUTS: Final[dict[str, tuple[str, ...]]] = {
    "max_depth": ("follow", "max_depth"),
    "max_pages": ("follow", "max_pages"),
    "per_host_concurrency": ("politeness", "per_host_concurrency"),
    "delay_ms": ("politeness", "delay_ms"),
    "priority": ("priority",),
    "max_attempts": ("max_attempts",),
    "timeout_s": ("options", "timeout_s"),
}
LINES_INPUTS: Final[dict[str, tuple[str, ...]]] = {
    "include": ("follow", "include"),
    "exclude": ("follow", "exclude"),
}
CHECKBOXES: Final[dict[str, tuple[str, ...]]] = {
    "same_site": ("follow", "same_site"),
    "sitemaps": ("follow", "sitemaps"),
    "respect_robots": ("politeness", "respect_robots"),
}


@dataclass
class FieldRow:
    """One extract field as typed into the form."""

    name: str = ""
    engine: str = "css"
    selector: str = ""
    value: str = "text"
    attr: str = ""
    all: bool = False

    @property
    def blank(self) -> bool:
        return not self.name.strip() and not self.selector.strip()


@dataclass
class JobForm:
    """The form's values (re-shown as typed when something is wrong) and its errors by
    input name ("" for the form as a whole)."""

    kind: Kind = "crawl"
    urls: str = ""
    rows: list[FieldRow] = field(default_factory=list)
    numbers: dict[str, str] = field(default_factory=dict)
    lines: dict[str, str] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def blank(cls, kind: Kind = "crawl") -> JobForm:
        form = cls(kind=kind)
        form.numbers = {
            "max_depth": str(_FOLLOW_DEFAULTS.max_depth),
            "max_pages": str(_FOLLOW_DEFAULTS.max_pages),
            "per_host_concurrency": str(_POLITENESS_DEFAULTS.per_host_concurrency),
            "delay_ms": str(_POLITENESS_DEFAULTS.delay_ms),
            "priority": "0",
            "max_attempts": "3",
            "timeout_s": "30",
        }
        form.lines = {"include": "", "exclude": ""}
        form.checks = {
            "same_site": _FOLLOW_DEFAULTS.same_site,
            "sitemaps": _FOLLOW_DEFAULTS.sitemaps,
            "respect_robots": _POLITENESS_DEFAULTS.respect_robots,
        }
        form.pad_rows()
        return form

    @classmethod
    def parse(cls, data: FormData) -> JobForm:
        def text_of(name: str) -> str:
            value = data.get(name)
            return value if isinstance(value, str) else ""

        kind: Kind = "scrape" if text_of("kind") == "scrape" else "crawl"
        form = cls(kind=kind, urls=text_of("urls"))
        form.numbers = {name: text_of(name).strip() for name in NUMBER_INPUTS}
        form.lines = {name: text_of(name) for name in LINES_INPUTS}
        form.checks = {name: text_of(name) == "on" for name in CHECKBOXES}
        for i in range(MAX_FIELD_ROWS):
            prefix = f"f-{i}-"
            if not any(key.startswith(prefix) for key in data):
                continue
            engine = text_of(prefix + "engine")
            value = text_of(prefix + "value")
            form.rows.append(
                FieldRow(
                    name=text_of(prefix + "name").strip(),
                    engine=engine if engine in ENGINES else "css",
                    selector=text_of(prefix + "selector").strip(),
                    value=value if value in VALUES else "text",
                    attr=text_of(prefix + "attr").strip(),
                    all=text_of(prefix + "all") == "on",
                )
            )
        return form

    def pad_rows(self, extra: int = 0) -> None:
        """Blank rows to type into: at least MIN_FIELD_ROWS, one free row, plus `extra`."""
        self.rows = [row for row in self.rows if not row.blank]
        wanted = max(MIN_FIELD_ROWS, len(self.rows) + 1) + extra
        while len(self.rows) < min(wanted, MAX_FIELD_ROWS):
            self.rows.append(FieldRow())

    def add_error(self, name: str, message: str) -> None:
        self.errors.setdefault(name, []).append(message)

    def ordered_errors(self) -> list[tuple[str, str]]:
        """(input, message) in the order the inputs appear on the form (the summary's)."""
        return [
            (name, message)
            for name in sorted(self.errors, key=_position)
            for message in self.errors[name]
        ]

    # ----------------------------------------------------------------------------------

    def url_lines(self) -> list[tuple[int, str]]:
        """(line number, URL) of the non-blank lines."""
        return [
            (n, line.strip()) for n, line in enumerate(self.urls.splitlines(), 1) if line.strip()
        ]

    def to_request(self) -> JobSpecBase | None:
        """The validated request, or None with the errors recorded on the form."""
        body, row_of_field = self._body()
        model = ScrapeCreate if self.kind == "scrape" else CrawlCreate
        try:
            request = model.model_validate(body)
        except ValidationError as error:
            # the schema's verdict on everything the form's own checks let through
            self._place(error.errors(), row_of_field, skip=set(self.errors))
            return None
        return None if self.errors else request

    def _body(self) -> tuple[dict[str, Any], dict[str, int]]:
        body: dict[str, Any] = {}
        url_key = "urls" if self.kind == "scrape" else "seeds"
        body[url_key] = [url for _, url in self.url_lines()]
        if not body[url_key]:
            self.add_error("urls", "Enter at least one URL.")
        extract: dict[str, Any] = {}
        row_of_field: dict[str, int] = {}
        for i, row in enumerate(self.rows):
            if row.blank:
                continue
            if not row.name:
                self.add_error(f"f-{i}-name", "Give the field a name.")
                continue
            if not row.selector:
                what = "built-in name" if row.engine == "builtin" else "selector"
                self.add_error(f"f-{i}-selector", f"Enter a {what}.")
                continue
            if row.name in extract:
                self.add_error(f"f-{i}-name", f"Another field is already called {row.name!r}.")
                continue
            if row.value == "attr" and not row.attr:
                self.add_error(f"f-{i}-attr", "Name the attribute to take (e.g. href).")
                continue
            spec: dict[str, Any] = {row.engine: row.selector, "all": row.all}
            spec["value"] = f"attr:{row.attr}" if row.value == "attr" else row.value
            extract[row.name] = spec
            row_of_field[row.name] = i
        body["extract"] = extract
        for name, path in NUMBER_INPUTS.items():
            raw = self.numbers.get(name, "")
            if raw == "" or (self.kind == "scrape" and path[0] in ("follow", "politeness")):
                continue  # the schema's default
            _put(body, path, raw)  # the schema parses (and refuses) the number
        if self.kind == "crawl":
            for name, path in LINES_INPUTS.items():
                patterns = [line.strip() for line in self.lines.get(name, "").splitlines()]
                _put(body, path, [p for p in patterns if p])
            for name, path in CHECKBOXES.items():
                _put(body, path, self.checks.get(name, False))
        return body, row_of_field

    def _place(
        self, errors: Sequence[Mapping[str, Any]], row_of_field: dict[str, int], skip: set[str]
    ) -> None:
        """Each schema error under its input; inputs in `skip` already have their message."""
        lines = self.url_lines()
        for error in errors:
            loc = tuple(error.get("loc", ()))
            name, message = _input_of(loc, row_of_field), _message(error)
            if name == "urls" and len(loc) > 1 and isinstance(loc[1], int) and loc[1] < len(lines):
                message = f"Line {lines[loc[1]][0]}: {message}"
            elif name == "":
                where = ".".join(str(p) for p in loc)
                message = f"{where}: {message}" if where else message
            if name not in skip:
                self.add_error(name, message)


def _input_of(loc: tuple[Any, ...], row_of_field: dict[str, int]) -> str:
    """The form input a schema error is about ("" for the form as a whole)."""
    head = loc[0] if loc else ""
    if head in ("urls", "seeds"):
        return "urls"
    if head == "extract" and len(loc) > 1 and str(loc[1]) in row_of_field:
        i = row_of_field[str(loc[1])]
        if loc[-1] == "[key]":
            return f"f-{i}-name"
        return f"f-{i}-attr" if "value" in loc[2:] else f"f-{i}-selector"
    for name, path in (*NUMBER_INPUTS.items(), *LINES_INPUTS.items(), *CHECKBOXES.items()):
        if loc[: len(path)] == path:
            return name
    return ""


_PARTS: Final = ("name", "selector", "attr")
_LATER_INPUTS: Final = (
    "max_depth",
    "max_pages",
    "per_host_concurrency",
    "delay_ms",
    "include",
    "exclude",
    "priority",
    "max_attempts",
    "timeout_s",
)


def _position(name: str) -> tuple[int, int, int]:
    if name == "":
        return (0, 0, 0)
    if name == "urls":
        return (1, 0, 0)
    if name.startswith("f-"):
        _, row, part = name.split("-", 2)
        return (2, int(row), _PARTS.index(part) if part in _PARTS else 0)
    return (3, _LATER_INPUTS.index(name) if name in _LATER_INPUTS else 99, 0)


def _put(body: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    target = body
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = value


def _message(error: Mapping[str, Any]) -> str:
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return message[:1].upper() + message[1:]
