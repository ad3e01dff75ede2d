"""Drawing a corpus page: a `PageContent` as a report-like PIL image (prose, tables, bar charts).

Sizes are given at the reference page size (`DEFAULT_PAGE_SIZE`) and scaled, and drawing past the
bottom margin raises, so a fact can never be silently clipped off a page.
"""

from __future__ import annotations

from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from colquant.evaluate.corpus_content import Chart, PageContent, Table, chart_ticks

DEFAULT_PAGE_SIZE = (448, 576)
TEXT_COLOR = (25, 25, 25)
MUTED_COLOR = (110, 110, 110)
GRID_COLOR = (120, 120, 120)
LIGHT_GRID_COLOR = (225, 225, 225)
HEADER_FILL = (232, 236, 242)
BAR_COLOR = (52, 101, 164)


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
                "colquant.evaluate.corpus (the content generators produce too much for the page)")
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

    def table(self, table: Table) -> None:
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

    def chart(self, chart: Chart) -> None:
        label_font, value_font = self.font(10), self.font(9)
        height = self.px(chart.height)
        top = self.reserve(height)
        self.text((self.left, top), chart.y_label, label_font, fill=MUTED_COLOR)
        ticks = chart_ticks(chart.values)
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


def render_page(content: PageContent, page_size: tuple[int, int]) -> Image.Image:
    canvas = _Canvas(page_size)
    canvas.paragraph(content.header, 9, fill=MUTED_COLOR, gap_after=2)
    canvas.rule(gap_after=12)
    canvas.paragraph(content.title, 16, bold=True, gap_after=10)
    for block in content.blocks:
        if isinstance(block, Table):
            canvas.table(block)
        elif isinstance(block, Chart):
            canvas.chart(block)
        else:
            canvas.paragraph(block, 12)
    canvas.text((canvas.width / 2, canvas.height - canvas.px(22)), content.footer, canvas.font(9),
                fill=MUTED_COLOR, anchor="mm")
    return canvas.image
