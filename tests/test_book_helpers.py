"""The book's helpers: the Markdown tables of the chapters, read back by a Markdown parser."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from markdown_it import MarkdownIt

from minunet.book import markdown_table


class _Cells(HTMLParser):
    """The text of every ``<th>`` and ``<td>`` of an HTML table, row by row."""

    def __init__(self):
        super().__init__()
        self.rows, self.paragraphs, self._cell, self._in_paragraph = [], [], None, False

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("th", "td"):
            self._cell = ""
        elif tag == "p":
            self._in_paragraph = True
            self.paragraphs.append("")

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            self.rows[-1].append(self._cell)
            self._cell = None
        elif tag == "p":
            self._in_paragraph = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        elif self._in_paragraph:
            self.paragraphs[-1] += data


def _rendered(markdown: str) -> _Cells:
    parser = _Cells()
    parser.feed(MarkdownIt("commonmark").enable("table").render(markdown))
    return parser


def test_table_renders_every_cell_in_its_place():
    rows = [["synthetic", 41, 3.5], ["a | b", "", "1e-07"]]
    table = markdown_table(["image", "", "error"], rows)
    parsed = _rendered(table.data)
    assert parsed.rows == [["image", "", "error"], ["synthetic", "41", "3.5"],
                           ["a | b", "", "1e-07"]]
    assert parsed.paragraphs == []


def test_text_above_the_table_is_a_paragraph_of_its_own():
    table = markdown_table(["a", "b"], [[1, 2]], above="**Case 1**, two threads")
    parsed = _rendered(table.data)
    assert parsed.paragraphs == ["Case 1, two threads"]
    assert parsed.rows == [["a", "b"], ["1", "2"]]


def test_a_header_alone_is_a_table_without_rows():
    assert _rendered(markdown_table(["x", "y"], []).data).rows == [["x", "y"]]


def test_a_row_of_the_wrong_length_is_named():
    with pytest.raises(ValueError, match=r"rows\[1\] has 3 cells, expected 2"):
        markdown_table(["a", "b"], [[1, 2], [1, 2, 3]])
