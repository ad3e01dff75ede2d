"""What the embedded corpus's pages say and what its queries ask: topics, facts, questions.

No drawing here (`colquant.evaluate.page_render` draws a `PageContent`); one `random.Random` drives every
choice, so a seed gives the same pages and queries everywhere. Uniqueness by construction (each
page its own (company, metric) topic, every number drawn without replacement from one pool of
``ddd.d`` values) is explained in `colquant.evaluate.corpus`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

LAYOUTS = ("paragraphs", "table", "chart", "mixed")
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


@dataclass(frozen=True)
class Query:
    """A question answerable from exactly one page; ``answer`` is the fact value it asks for."""

    query_id: str
    text: str
    page_id: str
    answer: str


@dataclass(frozen=True)
class _Fact:
    value: str
    questions: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Chart:
    labels: tuple[str, ...]
    values: tuple[str, ...]
    y_label: str
    x_label: str
    height: int  # in pixels at the reference page size


Block = str | Table | Chart  # a str block is a paragraph
_PageParts = tuple[str, list[Block], list[_Fact]]  # title, blocks, facts


@dataclass(frozen=True)
class PageContent:
    layout: str
    header: str
    title: str
    blocks: tuple[Block, ...]
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
                values: Iterator[str]) -> tuple[Table, list[_Fact]]:
    """A region-by-year table; every cell is a fact."""
    rows, facts = [], []
    for city in rng.sample(CITIES, n_cities):
        cells = [next(values) for _ in years]
        rows.append((city, *cells))
        for year, value in zip(years, cells):
            fields = {"company": topic.company, "metric": topic.metric, "city": city, "year": year}
            facts.append(_Fact(value, tuple(q.format(**fields) for q in CITY_QUESTIONS)))
    header = ("Region", *(str(year) for year in years))
    return Table(header, tuple(rows)), facts


def _product_chart(rng: random.Random, topic: _Topic, n_products: int, year: int, values: Iterator[str],
                   height: int) -> tuple[Chart, list[_Fact]]:
    """A bar chart of one year by product line; every bar is a fact."""
    products = rng.sample(PRODUCTS, n_products)
    bar_values = [next(values) for _ in products]
    facts = []
    for product, value in zip(products, bar_values):
        fields = {"company": topic.company, "metric": topic.metric, "product": product, "year": year}
        facts.append(_Fact(value, tuple(q.format(**fields) for q in PRODUCT_QUESTIONS)))
    chart = Chart(tuple(products), tuple(bar_values), f"{topic.metric_title} ({topic.unit}), {year}",
                   "Product line", height)
    return chart, facts


def _paragraphs_page(rng: random.Random, topic: _Topic, values: Iterator[str]) -> _PageParts:
    years = _years(rng, 6)
    stated = _year_facts(rng, topic, years, values)
    fillers = _fillers(rng, topic, years, 8)
    blocks: list[Block] = []
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
    blocks: list[Block] = [" ".join([fillers[0], *(sentence for sentence, _ in stated), fillers[1]])]
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


def generate_contents(rng: random.Random, n_pages: int) -> list[PageContent]:
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
        contents.append(PageContent(layout, header, title, tuple(blocks), f"Page {index + 1}", tuple(facts)))
    return contents


def page_id_of(index: int) -> str:
    return f"p{index:04d}"


def make_queries(rng: random.Random, contents: list[PageContent], n_queries: int) -> list[Query]:
    """Spread queries evenly over pages (distinct facts per page), then shuffle their order."""
    base, extra = divmod(n_queries, len(contents))
    bonus = set(rng.sample(range(len(contents)), extra))
    drafts = []
    for index, content in enumerate(contents):
        count = base + (1 if index in bonus else 0)
        for fact in rng.sample(content.facts, count):
            drafts.append((rng.choice(fact.questions), page_id_of(index), fact.value))
    rng.shuffle(drafts)
    return [Query(f"q{i:04d}", text, page_id, answer) for i, (text, page_id, answer) in enumerate(drafts)]


def _block_text(block: Block) -> str:
    if isinstance(block, Table):
        return "\n".join(" | ".join(row) for row in (block.header, *block.rows))
    if isinstance(block, Chart):
        bars = [f"{label} {value}" for label, value in zip(block.labels, block.values)]
        ticks = " ".join(str(tick) for tick in chart_ticks(block.values))
        return "\n".join([block.y_label, ticks, *bars, block.x_label])
    return block


def page_text(content: PageContent) -> str:
    """The strings drawn on the page, in reading order; paragraphs unwrapped."""
    return "\n".join([content.header, content.title, *map(_block_text, content.blocks), content.footer])


def chart_ticks(values: tuple[str, ...]) -> list[int]:
    """Y-axis ticks every 200 up to the first multiple of 200 above the largest bar."""
    top = int(max(float(v) for v in values) // 200 + 1) * 200
    return list(range(0, top + 1, 200))
