"""Write every chapter as an executed Jupyter notebook that runs outside the book.

    python book/export_notebooks.py [--html _build/html] [--out notebooks]

For each chapter ``book/NN_name.md`` (a MyST notebook) this writes ``notebooks/NN_name.ipynb``
with its outputs. The outputs come from the book build (``_build/jupyter_execute``, where
jupyter-book leaves each executed chapter) when that is newer than the chapter; otherwise the
chapter is executed here, in an empty temporary folder, so that it cannot lean on files of the
repository. The MyST-only markup of the prose is then turned into what a plain Jupyter shows:

* ``{glue:text}`name``` becomes the value the chapter glued under ``name``;
* ``{cite}`key``` becomes "(Author Year)" from ``references.bib``;
* a ``:::{dropdown} Title`` block becomes an HTML ``<details>`` block (still collapsible).

With ``--html`` the notebooks are also copied into the built site (``<html>/notebooks/``),
where the landing page links to them.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
EXECUTED = ROOT / "_build" / "jupyter_execute" / "book"
TIMEOUT_S = 900


def chapters() -> list[Path]:
    """The executable chapters: book/NN_*.md files with a jupytext kernel header."""
    return sorted(p for p in (ROOT / "book").glob("[0-9][0-9]_*.md")
                  if "\nkernelspec:" in p.read_text())


def executed_notebook(chapter: Path) -> nbformat.NotebookNode:
    """The chapter with outputs: from the book build if it is up to date, else run here."""
    built = EXECUTED / f"{chapter.stem}.ipynb"
    if built.is_file() and built.stat().st_mtime >= chapter.stat().st_mtime:
        notebook = nbformat.read(built, as_version=4)
        # the book build keeps the glued values beside the notebook, not in its outputs
        glued = built.with_suffix(".glue.json")
        if glued.is_file():
            notebook.metadata["glued"] = json.loads(glued.read_text())
        return notebook
    notebook = jupytext.read(chapter)
    with tempfile.TemporaryDirectory(prefix="minunet-notebook-") as folder:
        NotebookClient(notebook, timeout=TIMEOUT_S, kernel_name="python3",
                       resources={"metadata": {"path": folder}}).execute()
    return notebook


def glued_values(notebook) -> dict[str, str]:
    """name -> text of every value glued by the notebook (myst_nb marks them 'scrapbook')."""
    outputs = list(notebook.metadata.pop("glued", {}).values())
    outputs += [output for cell in notebook.cells for output in cell.get("outputs", [])]
    values = {}
    for output in outputs:
        name = output.get("metadata", {}).get("scrapbook", {}).get("name")
        # a kernel's own output keeps myst_nb's prefix on the type: "<prefix>text/plain"
        text = [v for k, v in output.get("data", {}).items() if k.endswith("text/plain")]
        if name and text:
            values[name] = str(text[0]).strip("'\"")
    return values


def citations(bib_text: str) -> dict[str, str]:
    """bibtex key -> "Author Year" (first author's surname; "et al." for three or more)."""
    cited = {}
    for key, body in re.findall(r"@\w+\{([^,]+),(.*?)\n\}", bib_text, flags=re.S):
        author = re.search(r"author\s*=\s*[{\"](.+?)[}\"],?\s*\n", body, flags=re.S)
        year = re.search(r"year\s*=\s*[{\"]?(\d{4})", body)
        names = [a.strip() for a in (author.group(1) if author else key).split(" and ")]
        surnames = [n.split(",")[0].strip("{} ") if "," in n else n.split()[-1].strip("{}")
                    for n in names]
        who = surnames[0] if len(surnames) == 1 else (
            f"{surnames[0]} and {surnames[1]}" if len(surnames) == 2 else f"{surnames[0]} et al.")
        cited[key.strip()] = f"{who} {year.group(1) if year else ''}".strip()
    return cited


def plain_markdown(text: str, values: dict[str, str], cited: dict[str, str]) -> str:
    """MyST roles and dropdowns of one Markdown cell, rewritten for a plain Jupyter."""
    def glue(match):
        name = match.group(1)
        if name not in values:
            raise KeyError(f"{{glue:text}}`{name}` is quoted but never glued")
        return values[name]

    def cite(match):
        return "(" + "; ".join(cited.get(k.strip(), k.strip())
                               for k in match.group(1).split(",")) + ")"

    text = re.sub(r"\{glue:text\}`([^`]+)`", glue, text)
    text = re.sub(r"\{cite(?::p|:t)?\}`([^`]+)`", cite, text)
    text = re.sub(r"^:::\{dropdown\}\s*(.*)$", r"<details><summary>\1</summary>\n", text,
                  flags=re.M)
    return re.sub(r"^:::\s*$", "\n</details>", text, flags=re.M)


def export(out: Path, html: Path | None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    cited = citations((ROOT / "references.bib").read_text())
    written = []
    for chapter in tqdm(chapters(), desc="notebooks", unit="chapter"):
        notebook = executed_notebook(chapter)
        values = glued_values(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "markdown":
                cell.source = plain_markdown(cell.source, values, cited)
        notebook.metadata.pop("jupytext", None)
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                           "language": "python"}
        target = out / f"{chapter.stem}.ipynb"
        partial = target.with_suffix(".ipynb.partial")
        partial.write_text(json.dumps(nbformat.from_dict(notebook), indent=1) + "\n")
        partial.replace(target)  # atomic: a reader never sees half a notebook
        written.append(target)
    if html is not None:
        (html / "notebooks").mkdir(parents=True, exist_ok=True)
        for path in written:
            shutil.copy2(path, html / "notebooks" / path.name)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "notebooks",
                        help="folder for the notebooks (default: notebooks/)")
    parser.add_argument("--html", type=Path, default=None,
                        help="a built book (e.g. _build/html) to copy the notebooks into")
    args = parser.parse_args(argv)
    if args.html is not None and not (args.html / "index.html").is_file():
        print(f"error: --html {args.html} is not a built book (no index.html)", file=sys.stderr)
        return 2
    for path in export(args.out, args.html):
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
