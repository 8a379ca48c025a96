"""Small helpers that let the book's chapters run both in the book and as plain notebooks.

In the book (built by jupyter-book with ``myst_nb``) :func:`glue` stores a value under a name
so that the prose can quote it (``{glue:text}`name```). In a plain Jupyter, Colab or Binder
session, where ``myst_nb`` is usually absent, the exported notebook already carries the
values in its text, and :func:`glue` only shows the value when asked to.
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
