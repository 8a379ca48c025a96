"""Point the book's Colab buttons at the executed notebooks.

Colab opens ``.ipynb`` files only, while the chapters are MyST Markdown. The book workflow
publishes every executed chapter as ``<chapter>.ipynb`` on the branch ``notebooks`` of the
repository; this extension rewrites the Colab link of each page to that file. Other launch
buttons (Binder) keep the Markdown source, which jupytext opens as a notebook.
"""

from __future__ import annotations

NOTEBOOK_BRANCH = "notebooks"


def point_colab_at_notebooks(app, pagename, templatename, context, doctree):
    repository = app.config.html_theme_options.get("repository_url", "").rstrip("/")
    owner_and_name = repository.removeprefix("https://github.com/")
    chapter = pagename.rsplit("/", 1)[-1]
    for group in context.get("header_buttons", []):
        for button in group.get("buttons", []):
            if button.get("text") == "Colab":
                button["url"] = (f"https://colab.research.google.com/github/{owner_and_name}/"
                                 f"blob/{NOTEBOOK_BRANCH}/{chapter}.ipynb")


def setup(app):
    # after sphinx-book-theme has added its launch buttons (priority 501)
    app.connect("html-page-context", point_colab_at_notebooks, priority=600)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
