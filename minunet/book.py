"""Small helpers that let the book's chapters run both in the book and as plain notebooks.

In the book (built by jupyter-book with ``myst_nb``) :func:`glue` stores a value under a name
so that the prose can quote it (``{glue:text}`name```). In a plain Jupyter, Colab or Binder
session, where ``myst_nb`` is usually absent, the exported notebook already carries the
values in its text, and :func:`glue` only shows the value when asked to. The chapters'
results tables are Markdown, made by :func:`markdown_table`.
"""

from __future__ import annotations


def glue(name: str, value, display: bool = True) -> None:
    """``myst_nb.glue`` when it is installed; otherwise display ``value`` if ``display``."""
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        if display:
            from IPython.display import display as show

            show(value)
        return
    myst_glue(name, value, display=display)


def listing(function, docstring: bool = False):
    """The source of ``function`` (or a method) as a Markdown code block, for quoting the
    package in the text; its docstring is left out unless ``docstring`` (the prose says it).
    """
    import ast
    import inspect
    import textwrap

    from IPython.display import Markdown

    source = textwrap.dedent(inspect.getsource(function))
    definition = ast.parse(source).body[0]
    if not docstring and ast.get_docstring(definition) is not None:
        lines = source.splitlines(keepends=True)
        doc = definition.body[0]
        source = "".join(lines[: doc.lineno - 1] + lines[doc.end_lineno :])
    return Markdown(f"```python\n{source}```")


def markdown_table(header, rows, above: str = ""):
    """A Markdown table to display in a notebook: ``header`` (the column titles) over
    ``rows`` (one sequence of cells each, as many as the titles; each cell shown as
    ``str(cell)``), with the text ``above`` (Markdown, may be empty) before it.

    A ``|`` inside a cell is escaped, so that it stays in its cell.
    """
    from IPython.display import Markdown

    header = [str(title) for title in header]
    lines = [_markdown_row(header), "|" + " --- |" * len(header)]
    for index, row in enumerate(rows):
        cells = [str(cell) for cell in row]
        if len(cells) != len(header):
            raise ValueError(f"rows[{index}] has {len(cells)} cells, expected "
                             f"{len(header)} (one per title of header)")
        lines.append(_markdown_row(cells))
    text = "\n".join(lines)
    return Markdown(f"{above}\n\n{text}" if above else text)


def _markdown_row(cells) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"
