"""Offline, deterministic ViDoRe-style retrieval corpus: rendered report pages, questions, qrels.

Why this exists: the quantization experiments need a document-retrieval benchmark that runs with
no network and no hub (CI, air-gapped GPU boxes) and that is byte-for-byte reproducible, so a
score change can only come from the model. Pages look like excerpts of company reports (prose,
tables, bar charts). Every page carries numeric facts that occur on no other page and every query
asks for one of them, so each query has exactly one relevant page.

How uniqueness is guaranteed by construction:
- each page is about its own (company, metric) topic, so a question such as "What was the revenue
  of Norbright Labs in 2019?" can only be answered by that page;
- every number on every page is drawn without replacement from one pool of ``ddd.d`` values
  (three integer digits, one decimal). No other string on a page has a digit-dot-digit pattern,
  so an answer string occurs in exactly one page's text.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from colquant.files import atomic_directory

FORMAT_VERSION = 1
LAYOUTS = ("paragraphs", "table", "chart", "mixed")
DEFAULT_PAGE_SIZE = (448, 576)
MIN_PAGE_WIDTH = 224
# The value pool holds 9000 distinct numbers and a page uses at most 20 of them.
MAX_PAGES = 400
# Every layout carries at least 6 facts, so 5 distinct questions per page always exist.
MAX_QUERIES_PER_PAGE = 5
MAX_FACTS_PER_PAGE = 20

COMPANY_STEMS = (
    "Norbright", "Velmora", "Quillon", "Astrafen", "Brightwater", "Coldharbor", "Dunmere", "Eskari",
    "Fennlow", "Galvora", "Halcyra", "Ironvale", "Junoport", "Kestrane", "Lumacore", "Marrowind",
    "Nettleby", "Orvane", "Pellucid", "Quorra", "Redmarsh", "Silvane", "Tarrow", "Umbrell",
)
COMPANY_KINDS = (
    "Labs", "Systems", "Holdings", "Energy", "Logistics", "Foods", "Materials", "Robotics",
    "Therapeutics", "Networks",
)
METRICS = (  # (name, unit); every value lies in 100.0-999.9, so units are chosen to make that plausible
    ("revenue", "million USD"),
    ("operating cost", "million USD"),
    ("R&D spending", "million USD"),
    ("capital expenditure", "million EUR"),
    ("units shipped", "thousand units"),
    ("energy use", "GWh"),
    ("CO2 emissions", "kilotonnes"),
    ("water use", "megalitres"),
    ("active customers", "thousand"),
    ("freight volume", "kilotonnes"),
)
CITIES = (
    "Harwick", "Elmsworth", "Corvale", "Brisford", "Dunmoor", "Ashcombe", "Kelport", "Ravensby",
    "Westmere", "Oakhaven", "Stonebridge", "Larkfield", "Pinecrest", "Greywater", "Fairhollow",
    "Northcliff", "Saltmarsh", "Redbourne", "Silverton", "Hollowmere",
)
PRODUCTS = (
    "Aurora", "Nimbus", "Vertex", "Halo", "Quartz", "Ember", "Zephyr", "Orbit", "Cobalt", "Lumen",
    "Atlas", "Pulse", "Summit", "Prism", "Nova", "Vector",
)
DOCUMENT_KINDS = ("Annual report", "Sustainability report", "Quarterly review", "Investor briefing")
FIRST_YEAR, LAST_YEAR = 2012, 2024

# Sentences without numbers other than years, so they never collide with a fact value.
FILLERS = (
    "Management attributes the movement in {metric} mainly to demand in {city}.",
    "The {product} product line remained the main driver of activity during {year}.",
    "Figures are unaudited and may be restated in the next annual report.",
    "{company} expects {metric} to stay broadly in line with its long-term plan.",
    "The board reviewed the {metric} targets at its meeting in {city}.",
    "Comparisons with earlier periods exclude discontinued operations.",
    "Currency effects were broadly neutral over the reporting period.",
    "Regional teams in {city} and {city2} coordinated the data collection.",
    "A new reporting platform improved the accuracy of {metric} tracking in {year}.",
    "Analysts noted that {company} kept pace with its peer group on {metric}.",
    "Seasonal patterns were weaker than usual, especially in the fourth quarter.",
    "Further detail is given in the segment notes that follow.",
    "The audit committee found no material weakness in the underlying controls.",
    "Investment in the {product} range continued as planned despite supply delays.",
)
YEAR_SENTENCES = (
    "{Metric} of {company} in {year} was {value} {unit}.",
    "In {year}, {company} reported {metric} of {value} {unit}.",
    "{company} recorded {metric} of {value} {unit} in {year}.",
)
YEAR_QUESTIONS = (
    "What was the {metric} of {company} in {year}?",
    "How high was the {metric} of {company} in {year}?",
    "Which {metric} figure did {company} report for {year}?",
)
CITY_QUESTIONS = (
    "What was the {metric} of {company} in {city} in {year}?",
    "Which {metric} figure did {company} report for the {city} region in {year}?",
)
PRODUCT_QUESTIONS = (
    "What was the {metric} of the {product} product line of {company} in {year}?",
    "Which {metric} figure did {company} report for its {product} line in {year}?",
)

TEXT_COLOR = (25, 25, 25)
MUTED_COLOR = (110, 110, 110)
GRID_COLOR = (120, 120, 120)
LIGHT_GRID_COLOR = (225, 225, 225)
HEADER_FILL = (232, 236, 242)
BAR_COLOR = (52, 101, 164)


# --------------------------------------------------------------------------------------------
# Public data model


@dataclass(frozen=True)
class Page:
    """One rendered document page; ``text`` holds the strings drawn on it (for calibration)."""

    page_id: str
    image_path: Path
    text: str
    layout: str


@dataclass(frozen=True)
class Query:
    """A question answerable from exactly one page; ``answer`` is the fact value it asks for."""

    query_id: str
    text: str
    page_id: str
    answer: str


@dataclass(repr=False)
class Corpus:
    """Pages, queries and their relevance judgements, as read from ``root``."""

    root: Path
    pages: list[Page]
    queries: list[Query]

    def __post_init__(self) -> None:
        self._pages_by_id = {page.page_id: page for page in self.pages}

    def __len__(self) -> int:
        return len(self.pages)

    def __repr__(self) -> str:
        return f"Corpus(root={str(self.root)!r}, pages={len(self.pages)}, queries={len(self.queries)})"

    @property
    def qrels(self) -> dict[str, dict[str, int]]:
        """``{query_id: {page_id: 1}}``, the format retrieval metrics (e.g. MTEB/BEIR) expect."""
        return {query.query_id: {query.page_id: 1} for query in self.queries}

    def image(self, page_id: str) -> Image.Image:
        """The page image, fully loaded and RGB, so callers never hold an open file."""
        if page_id not in self._pages_by_id:
            raise KeyError(f"no page {page_id!r} in {self!r}")
        with Image.open(self._pages_by_id[page_id].image_path) as image:
            return image.convert("RGB")


# --------------------------------------------------------------------------------------------
# Content generation (no drawing here; one random.Random drives everything)


@dataclass(frozen=True)
class _Fact:
    value: str
    questions: tuple[str, ...]


@dataclass(frozen=True)
class _Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class _Chart:
    labels: tuple[str, ...]
    values: tuple[str, ...]
    y_label: str
    x_label: str
    height: int  # in pixels at the reference page size


_Block = str | _Table | _Chart  # a str block is a paragraph
_PageParts = tuple[str, list[_Block], list[_Fact]]  # title, blocks, facts


@dataclass(frozen=True)
class _PageContent:
    layout: str
    header: str
    title: str
    blocks: tuple[_Block, ...]
    footer: str
    facts: tuple[_Fact, ...]


@dataclass(frozen=True)
class _Topic:
    company: str
    metric: str
    unit: str

    @property
    def metric_title(self) -> str:
        """The metric with a capital first letter ("CO2 emissions" stays as is)."""
        return self.metric[0].upper() + self.metric[1:]


def _value_pool(rng: random.Random, n_pages: int) -> Iterator[str]:
    """Distinct fixed-width numbers, so no value is a substring of another number in the corpus."""
    return iter(f"{v / 10:.1f}" for v in rng.sample(range(1000, 10000), n_pages * MAX_FACTS_PER_PAGE))


def _years(rng: random.Random, count: int) -> list[int]:
    start = rng.randint(FIRST_YEAR, LAST_YEAR - count + 1)
    return list(range(start, start + count))


def _fillers(rng: random.Random, topic: _Topic, years: list[int], count: int) -> list[str]:
    """Context sentences about the page's topic; any year they name is one the page covers."""
    cities = rng.sample(CITIES, 2)
    fields = {
        "company": topic.company, "metric": topic.metric, "city": cities[0], "city2": cities[1],
        "product": rng.choice(PRODUCTS), "year": rng.choice(years),
    }
    return [template.format(**fields) for template in rng.sample(FILLERS, count)]


def _year_facts(rng: random.Random, topic: _Topic, years: list[int],
                values: Iterator[str]) -> list[tuple[str, _Fact]]:
    """Prose sentences stating the topic's metric for whole years, each with its fact."""
    out = []
    for year in years:
        fields = {"company": topic.company, "metric": topic.metric, "Metric": topic.metric_title,
                  "unit": topic.unit, "year": year, "value": next(values)}
        sentence = rng.choice(YEAR_SENTENCES).format(**fields)
        questions = tuple(q.format(**fields) for q in YEAR_QUESTIONS)
        out.append((sentence, _Fact(fields["value"], questions)))
    return out


def _city_table(rng: random.Random, topic: _Topic, n_cities: int, years: list[int],
                values: Iterator[str]) -> tuple[_Table, list[_Fact]]:
    """A region-by-year table; every cell is a fact."""
    rows, facts = [], []
    for city in rng.sample(CITIES, n_cities):
        cells = [next(values) for _ in years]
        rows.append((city, *cells))
        for year, value in zip(years, cells):
            fields = {"company": topic.company, "metric": topic.metric, "city": city, "year": year}
            facts.append(_Fact(value, tuple(q.format(**fields) for q in CITY_QUESTIONS)))
    header = ("Region", *(str(year) for year in years))
    return _Table(header, tuple(rows)), facts


def _product_chart(rng: random.Random, topic: _Topic, n_products: int, year: int, values: Iterator[str],
                   height: int) -> tuple[_Chart, list[_Fact]]:
    """A bar chart of one year by product line; every bar is a fact."""
    products = rng.sample(PRODUCTS, n_products)
    bar_values = [next(values) for _ in products]
    facts = []
    for product, value in zip(products, bar_values):
        fields = {"company": topic.company, "metric": topic.metric, "product": product, "year": year}
        facts.append(_Fact(value, tuple(q.format(**fields) for q in PRODUCT_QUESTIONS)))
    chart = _Chart(tuple(products), tuple(bar_values), f"{topic.metric_title} ({topic.unit}), {year}",
                   "Product line", height)
    return chart, facts


def _paragraphs_page(rng: random.Random, topic: _Topic, values: Iterator[str]) -> _PageParts:
    years = _years(rng, 6)
    stated = _year_facts(rng, topic, years, values)
    fillers = _fillers(rng, topic, years, 8)
    blocks: list[_Block] = []
    for group in (stated[0:2], stated[2:4], stated[4:5], stated[5:6]):
        blocks.append(" ".join([fillers.pop(), *(sentence for sentence, _ in group), fillers.pop()]))
    title = f"{topic.company}: {topic.metric} review {years[0]}-{years[-1]}"
    return title, blocks, [fact for _, fact in stated]


def _table_page(rng: random.Random, topic: _Topic, values: Iterator[str]) -> _PageParts:
    years = _years(rng, 4)
    table, facts = _city_table(rng, topic, 5, years, values)
    fillers = _fillers(rng, topic, years, 4)
    intro = " ".join([*fillers[:2], f"All figures are in {topic.unit}."])
    title = f"{topic.company}: {topic.metric} by region ({topic.unit})"
    return title, [intro, table, " ".join(fillers[2:])], facts


def _chart_page(rng: random.Random, topic: _Topic, values: Iterator[str]) -> _PageParts:
    year = rng.randint(FIRST_YEAR, LAST_YEAR)
    chart, facts = _product_chart(rng, topic, 6, year, values, height=250)
    fillers = _fillers(rng, topic, [year], 4)
    title = f"{topic.company}: {topic.metric} by product line, {year}"
    return title, [" ".join(fillers[:2]), chart, " ".join(fillers[2:])], facts


def _mixed_page(rng: random.Random, topic: _Topic, values: Iterator[str]) -> _PageParts:
    years = _years(rng, 2)
    stated = _year_facts(rng, topic, years, values)
    fillers = _fillers(rng, topic, years, 3)
    blocks: list[_Block] = [" ".join([fillers[0], *(sentence for sentence, _ in stated), fillers[1]])]
    if rng.random() < 0.5:
        figure, figure_facts = _city_table(rng, topic, 3, years, values)
    else:
        figure, figure_facts = _product_chart(rng, topic, 4, years[-1], values, height=190)
    blocks += [figure, fillers[2]]
    title = f"{topic.company}: {topic.metric} summary {years[-1]}"
    return title, blocks, [fact for _, fact in stated] + figure_facts


_LAYOUT_BUILDERS = {
    "paragraphs": _paragraphs_page,
    "table": _table_page,
    "chart": _chart_page,
    "mixed": _mixed_page,
}


def _generate_contents(rng: random.Random, n_pages: int) -> list[_PageContent]:
    """All page contents; layouts are balanced (all four present from 4 pages on) and shuffled."""
    values = _value_pool(rng, n_pages)
    topics = [_Topic(f"{stem} {kind}", metric, unit)
              for stem in COMPANY_STEMS for kind in COMPANY_KINDS for metric, unit in METRICS]
    layouts = [LAYOUTS[i % len(LAYOUTS)] for i in range(n_pages)]
    rng.shuffle(layouts)
    contents = []
    for index, (topic, layout) in enumerate(zip(rng.sample(topics, n_pages), layouts)):
        title, blocks, facts = _LAYOUT_BUILDERS[layout](rng, topic, values)
        header = f"{topic.company} \u00b7 {rng.choice(DOCUMENT_KINDS)}"
        contents.append(_PageContent(layout, header, title, tuple(blocks), f"Page {index + 1}", tuple(facts)))
    return contents


def _page_id(index: int) -> str:
    return f"p{index:04d}"


def _make_queries(rng: random.Random, contents: list[_PageContent], n_queries: int) -> list[Query]:
    """Spread queries evenly over pages (distinct facts per page), then shuffle their order."""
    base, extra = divmod(n_queries, len(contents))
    bonus = set(rng.sample(range(len(contents)), extra))
    drafts = []
    for index, content in enumerate(contents):
        count = base + (1 if index in bonus else 0)
        for fact in rng.sample(content.facts, count):
            drafts.append((rng.choice(fact.questions), _page_id(index), fact.value))
    rng.shuffle(drafts)
    return [Query(f"q{i:04d}", text, page_id, answer) for i, (text, page_id, answer) in enumerate(drafts)]


def _block_text(block: _Block) -> str:
    if isinstance(block, _Table):
        return "\n".join(" | ".join(row) for row in (block.header, *block.rows))
    if isinstance(block, _Chart):
        bars = [f"{label} {value}" for label, value in zip(block.labels, block.values)]
        ticks = " ".join(str(tick) for tick in _ticks(block.values))
        return "\n".join([block.y_label, ticks, *bars, block.x_label])
    return block


def _page_text(content: _PageContent) -> str:
    """The strings drawn on the page, in reading order; paragraphs unwrapped."""
    return "\n".join([content.header, content.title, *map(_block_text, content.blocks), content.footer])


# --------------------------------------------------------------------------------------------
# Rendering


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line]


def _ticks(values: tuple[str, ...]) -> list[int]:
    """Y-axis ticks every 200 up to the first multiple of 200 above the largest bar."""
    top = int(max(float(v) for v in values) // 200 + 1) * 200
    return list(range(0, top + 1, 200))


class _Canvas:
    """A page drawn top to bottom. Sizes are given at the reference page size and scaled, and
    drawing past the bottom margin raises, so a fact can never be silently clipped off a page."""

    def __init__(self, size: tuple[int, int]) -> None:
        width, height = size
        self.scale = min(width / DEFAULT_PAGE_SIZE[0], height / DEFAULT_PAGE_SIZE[1])
        self.image = Image.new("RGB", size, "white")
        self.draw = ImageDraw.Draw(self.image)
        self.width, self.height = width, height
        self.left, self.right = self.px(30), width - self.px(30)
        self.y = self.px(22)
        self.bottom = height - self.px(40)

    def px(self, value: float) -> int:
        return max(1, round(value * self.scale))

    def font(self, size: float) -> ImageFont.FreeTypeFont:
        return _font(self.px(size))

    def reserve(self, height: int) -> int:
        if self.y + height > self.bottom:
            raise RuntimeError(
                f"page content overflows a {self.width}x{self.height} page; this is a layout bug in "
                "colquant.corpus (the content generators produce too much for the page)")
        top = self.y
        self.y += height
        return top

    def text(self, xy: tuple[float, float], text: str, font: ImageFont.FreeTypeFont, *,
             fill: tuple[int, int, int] = TEXT_COLOR, anchor: str = "la", bold: bool = False) -> None:
        # The bundled font has no bold face; a second pass shifted by one pixel reads as bold.
        for dx in (0, 1) if bold else (0,):
            self.draw.text((xy[0] + dx, xy[1]), text, font=font, fill=fill, anchor=anchor)

    def paragraph(self, text: str, size: float, *, fill: tuple[int, int, int] = TEXT_COLOR,
                  bold: bool = False, gap_after: float = 9) -> None:
        font = self.font(size)
        line_height = round(font.size * 1.4)
        for line in _wrap(text, font, self.right - self.left):
            self.text((self.left, self.reserve(line_height)), line, font, fill=fill, bold=bold)
        self.y += self.px(gap_after)

    def rule(self, gap_after: float = 10) -> None:
        y = self.reserve(self.px(1))
        self.draw.line([(self.left, y), (self.right, y)], fill=GRID_COLOR, width=self.px(1))
        self.y += self.px(gap_after)

    def table(self, table: _Table) -> None:
        font, row_height, pad = self.font(11), self.px(22), self.px(6)
        first = round((self.right - self.left) * 0.34)
        step = (self.right - self.left - first) / (len(table.header) - 1)
        edges = [self.left] + [round(self.left + first + step * k) for k in range(len(table.header))]
        rows = (table.header, *table.rows)
        top = self.reserve(row_height * len(rows))
        self.draw.rectangle([self.left, top, self.right, top + row_height], fill=HEADER_FILL)
        for r, row in enumerate(rows):
            middle = top + r * row_height + row_height / 2
            for c, cell in enumerate(row):
                if c == 0:
                    self.text((edges[0] + pad, middle), cell, font, anchor="lm", bold=r == 0)
                else:
                    self.text((edges[c + 1] - pad, middle), cell, font, anchor="rm", bold=r == 0)
        line_width = self.px(1)
        for r in range(len(rows) + 1):
            y = top + r * row_height
            self.draw.line([(self.left, y), (self.right, y)], fill=GRID_COLOR, width=line_width)
        for x in edges:
            self.draw.line([(x, top), (x, top + row_height * len(rows))], fill=GRID_COLOR, width=line_width)
        self.y += self.px(12)

    def chart(self, chart: _Chart) -> None:
        label_font, value_font = self.font(10), self.font(9)
        height = self.px(chart.height)
        top = self.reserve(height)
        self.text((self.left, top), chart.y_label, label_font, fill=MUTED_COLOR)
        ticks = _ticks(chart.values)
        x0 = self.left + max(label_font.getlength(str(t)) for t in ticks) + self.px(6)
        x1 = self.right
        plot_top, plot_bottom = top + self.px(30), top + height - self.px(34)

        def y_of(value: float) -> float:
            return plot_bottom - (plot_bottom - plot_top) * value / ticks[-1]

        for tick in ticks:
            self.draw.line([(x0, y_of(tick)), (x1, y_of(tick))], fill=LIGHT_GRID_COLOR, width=self.px(1))
            self.text((x0 - self.px(4), y_of(tick)), str(tick), label_font, fill=MUTED_COLOR, anchor="rm")
        slot = (x1 - x0) / len(chart.values)
        for i, (label, value) in enumerate(zip(chart.labels, chart.values)):
            centre, half = x0 + slot * (i + 0.5), slot * 0.28
            bar_top = y_of(float(value))
            self.draw.rectangle([centre - half, bar_top, centre + half, plot_bottom], fill=BAR_COLOR)
            self.text((centre, bar_top - self.px(3)), value, value_font, anchor="mb")
            self.text((centre, plot_bottom + self.px(5)), label, label_font, anchor="mt")
        self.draw.line([(x0, plot_top), (x0, plot_bottom), (x1, plot_bottom)], fill=TEXT_COLOR,
                       width=self.px(1))
        self.text(((x0 + x1) / 2, top + height), chart.x_label, label_font, fill=MUTED_COLOR, anchor="mb")
        self.y += self.px(12)


def _render(content: _PageContent, page_size: tuple[int, int]) -> Image.Image:
    canvas = _Canvas(page_size)
    canvas.paragraph(content.header, 9, fill=MUTED_COLOR, gap_after=2)
    canvas.rule(gap_after=12)
    canvas.paragraph(content.title, 16, bold=True, gap_after=10)
    for block in content.blocks:
        if isinstance(block, _Table):
            canvas.table(block)
        elif isinstance(block, _Chart):
            canvas.chart(block)
        else:
            canvas.paragraph(block, 12)
    canvas.text((canvas.width / 2, canvas.height - canvas.px(22)), content.footer, canvas.font(9),
                fill=MUTED_COLOR, anchor="mm")
    return canvas.image


# --------------------------------------------------------------------------------------------
# Files


def _png_bytes(image: Image.Image) -> bytes:
    """PNG with no metadata chunks (no time, no text), so equal pixels give equal bytes."""
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _files_digest(files: dict[str, str]) -> str:
    """One sha256 over every file's path and sha256, so two corpora compare with one string."""
    listing = "".join(f"{name}\t{digest}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def _write_corpus(directory: Path, contents: list[_PageContent], queries: list[Query],
                  params: dict[str, Any], progress: bool) -> None:
    (directory / "pages").mkdir()
    files: dict[str, str] = {}
    page_records = []
    for index, content in enumerate(tqdm(contents, desc="Rendering corpus pages", disable=not progress)):
        page_id = _page_id(index)
        image_file = f"pages/{page_id}.png"
        files[image_file] = _write(directory / image_file, _png_bytes(_render(content, params["page_size"])))
        page_records.append({"page_id": page_id, "image": image_file, "text": _page_text(content),
                             "layout": content.layout})
    query_records = [{"query_id": q.query_id, "text": q.text, "page_id": q.page_id, "answer": q.answer}
                     for q in queries]
    qrel_records = [{"query_id": q.query_id, "page_id": q.page_id, "relevance": 1} for q in queries]
    for name, records in (("pages.jsonl", page_records), ("queries.jsonl", query_records),
                          ("qrels.jsonl", qrel_records)):
        files[name] = _write(directory / name, _jsonl(records))
    manifest = {**params, "files": files, "sha256": _files_digest(files)}
    # Written last: a directory with a manifest is a finished one.
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n",
                                             encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Public functions


def _check_int(name: str, value: Any, low: int, high: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}; {fix}")


def _params(n_pages: int, n_queries: int, seed: int, page_size: tuple[int, int]) -> dict[str, Any]:
    """Validate the build arguments and return them as stored in the manifest."""
    _check_int("n_pages", n_pages, 1, MAX_PAGES, f"pass between 1 and {MAX_PAGES} pages")
    _check_int("n_queries", n_queries, 1, MAX_QUERIES_PER_PAGE * n_pages,
               f"at most {MAX_QUERIES_PER_PAGE} queries per page exist; lower n_queries or raise n_pages")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}; pass e.g. seed=0")
    if (not isinstance(page_size, (tuple, list)) or len(page_size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in page_size)):
        raise ValueError(f"page_size must be a (width, height) pair of integers, got {page_size!r}; "
                         f"pass e.g. page_size={DEFAULT_PAGE_SIZE}")
    width, height = page_size
    if width < MIN_PAGE_WIDTH or height < width:
        raise ValueError(f"page_size must be portrait with width >= {MIN_PAGE_WIDTH} and height >= width, "
                         f"got {tuple(page_size)}; pass e.g. page_size={DEFAULT_PAGE_SIZE}")
    return {"format_version": FORMAT_VERSION, "seed": seed, "n_pages": n_pages, "n_queries": n_queries,
            "page_size": [width, height]}


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / "manifest.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); delete {root} and run "
                         "colquant.corpus.build_corpus again") from error


def build_corpus(root: str | Path, *, n_pages: int = 60, n_queries: int = 120, seed: int = 0,
                 page_size: tuple[int, int] = DEFAULT_PAGE_SIZE, progress: bool = True) -> Corpus:
    """Generate the corpus into ``root`` (or load it if ``root`` already holds this exact build).

    The build renders into a hidden sibling directory and renames it onto ``root`` only when
    complete, so an interrupted build never leaves a half corpus that looks finished. An existing
    corpus built with other parameters is replaced; a directory holding anything else is refused.
    """
    params = _params(n_pages, n_queries, seed, page_size)
    root = Path(root)
    if (root / "manifest.json").is_file():
        manifest = _read_manifest(root)
        if all(manifest.get(key) == value for key, value in params.items()):
            return load_corpus(root)
    elif root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"root {root} exists and is not a colquant corpus (no manifest.json); pass a new "
                         "or empty directory so build_corpus does not overwrite unrelated files")
    rng = random.Random(seed)
    contents = _generate_contents(rng, n_pages)
    queries = _make_queries(rng, contents, n_queries)
    with atomic_directory(root) as building:
        _write_corpus(building, contents, queries, params, progress)
    return load_corpus(root)


def _verify_files(root: Path, manifest: dict[str, Any]) -> None:
    rebuild = f"delete {root} and run colquant.corpus.build_corpus again"
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{root / 'manifest.json'} has format_version {manifest.get('format_version')!r}, "
                         f"this code reads {FORMAT_VERSION}; {rebuild}")
    files = manifest.get("files", {})
    for required in ("pages.jsonl", "queries.jsonl", "qrels.jsonl"):
        if required not in files:
            raise ValueError(f"{root / 'manifest.json'} does not list {required}; {rebuild}")
    for name, digest in files.items():
        path = root / name
        if not path.is_file():
            raise ValueError(f"{path} is listed in manifest.json but missing; {rebuild}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise ValueError(f"{path} does not match its sha256 in manifest.json; {rebuild}")


def _verify_references(root: Path, manifest: dict[str, Any], pages: list[Page], queries: list[Query],
                       qrels: list[dict[str, Any]]) -> None:
    rebuild = f"delete {root} and run colquant.corpus.build_corpus again"
    if len(pages) != manifest["n_pages"] or len(queries) != manifest["n_queries"]:
        raise ValueError(f"{root / 'pages.jsonl'} or queries.jsonl disagree with the counts in "
                         f"manifest.json; {rebuild}")
    page_ids = {page.page_id for page in pages}
    for page in pages:
        if page.image_path.relative_to(root).as_posix() not in manifest["files"]:
            raise ValueError(f"{root / 'pages.jsonl'} names image {page.image_path} that manifest.json "
                             f"does not list; {rebuild}")
    for query in queries:
        if query.page_id not in page_ids:
            raise ValueError(f"{root / 'queries.jsonl'} refers to unknown page {query.page_id!r}; {rebuild}")
    expected = [{"query_id": q.query_id, "page_id": q.page_id, "relevance": 1} for q in queries]
    if qrels != expected:
        raise ValueError(f"{root / 'qrels.jsonl'} disagrees with queries.jsonl; {rebuild}")


def load_corpus(root: str | Path) -> Corpus:
    """Read a corpus written by :func:`build_corpus`, checking every file against the manifest."""
    root = Path(root)
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(
            f"no corpus at {root} (no manifest.json); build it with "
            f"colquant.corpus.build_corpus({str(root)!r}) first")
    manifest = _read_manifest(root)
    _verify_files(root, manifest)
    pages = [Page(r["page_id"], root / r["image"], r["text"], r["layout"])
             for r in _read_jsonl(root / "pages.jsonl")]
    queries = [Query(r["query_id"], r["text"], r["page_id"], r["answer"])
               for r in _read_jsonl(root / "queries.jsonl")]
    _verify_references(root, manifest, pages, queries, _read_jsonl(root / "qrels.jsonl"))
    return Corpus(root, pages, queries)


def corpus_statistics(corpus: Corpus) -> pd.DataFrame:
    """Per-layout page counts, mean text length and queries per page, plus an "all" row."""
    queries_per_page = Counter(query.page_id for query in corpus.queries)
    per_page = pd.DataFrame({
        "layout": [page.layout for page in corpus.pages],
        "text_chars": [len(page.text) for page in corpus.pages],
        "queries": [queries_per_page[page.page_id] for page in corpus.pages],
    })
    everything = per_page.assign(layout="all")
    stats = (pd.concat([per_page, everything])
             .groupby("layout", sort=False)
             .agg(pages=("text_chars", "size"), mean_text_chars=("text_chars", "mean"),
                  queries=("queries", "sum")))
    stats["queries_per_page"] = stats["queries"] / stats["pages"]
    order = [layout for layout in LAYOUTS if layout in stats.index] + ["all"]
    return stats.loc[order]
