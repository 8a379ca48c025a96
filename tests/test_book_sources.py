"""Static checks of the book's chapter sources (fast; no build, no kernel).

Every chapter listed in ``_toc.yml`` must exist; every executed chapter must be a MyST
notebook for the ``python3`` kernel that imports ``minunet``, follow the book's arc (ending
with a summary and exercises), cite only keys that ``references.bib`` defines, and paste
(``{glue:text}``) only values that one of its own cells glues. Placeholder text is not allowed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.book

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [entry["file"] for entry in part.get("chapters", [])]
    return files


def chapters() -> list[Path]:
    return sorted(p for p in BOOK.glob("*.md") if re.match(r"\d\d_", p.name))


def front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.S)
    return yaml.safe_load(match.group(1)) if match else {}


def code_cells(text: str) -> list[str]:
    return re.findall(r"^```\{code-cell\}[^\n]*\n(.*?)^```", text, flags=re.S | re.M)


def test_every_toc_entry_exists():
    for file in toc_files():
        assert (ROOT / f"{file}.md").is_file(), f"_toc.yml lists {file}, which does not exist"


def test_bibliography_keys_are_unique():
    keys = re.findall(r"^@\w+\{([^,]+),", (ROOT / "references.bib").read_text(), flags=re.M)
    assert keys and len(keys) == len(set(keys)), "references.bib has duplicate keys"


@pytest.mark.parametrize("path", chapters(), ids=lambda p: p.stem)
def test_chapter_is_an_executable_notebook(path):
    text = path.read_text()
    kernel = front_matter(text).get("kernelspec", {})
    assert kernel.get("name") == "python3", f"{path.name}: kernelspec name must be python3"
    cells = code_cells(text)
    assert cells, f"{path.name} has no code cell"
    assert any(re.search(r"^\s*(import minunet|from minunet)", c, flags=re.M) for c in cells), (
        f"{path.name} never imports minunet"
    )


@pytest.mark.parametrize("path", chapters(), ids=lambda p: p.stem)
def test_chapter_follows_the_arc(path):
    text = path.read_text()
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings[-2:] == ["Summary", "Exercises"], (
        f"{path.name} must end with '## Summary' and '## Exercises', has {headings[-2:]}"
    )
    exercises = text.split("## Exercises", 1)[1]
    assert len(re.findall(r"^\d+\. ", exercises, flags=re.M)) >= 3, (
        f"{path.name}: fewer than 3 exercises"
    )
    assert re.search(r"\bTODO\b|coming soon|\bTBD\b|lorem ipsum", text, flags=re.I) is None, (
        f"{path.name} contains placeholder text"
    )


@pytest.mark.parametrize("path", chapters(), ids=lambda p: p.stem)
def test_citations_and_glue_resolve(path):
    text = path.read_text()
    bib = (ROOT / "references.bib").read_text()
    known = set(re.findall(r"^@\w+\{([^,]+),", bib, flags=re.M))
    cited = {key.strip() for group in re.findall(r"\{cite\}`([^`]+)`", text)
             for key in group.split(",")}
    assert cited <= known, f"{path.name} cites unknown keys {sorted(cited - known)}"
    glued = set(re.findall(r"""glue\(\s*["']([^"']+)["']""", "\n".join(code_cells(text))))
    pasted = set(re.findall(r"\{glue(?::\w*)?\}`([^`]+)`", text))
    # a bare {glue:} pastes the value's repr, quotes included; {glue:text} pastes its text
    assert "{glue:}`" not in text, f"{path.name}: paste with {{glue:text}}, not {{glue:}}"
    assert pasted <= glued, f"{path.name} pastes values no cell glues: {sorted(pasted - glued)}"


@pytest.mark.parametrize("path", chapters(), ids=lambda p: p.stem)
def test_every_exercise_has_a_hint_and_a_solution(path):
    exercises = path.read_text().split("\n## Exercises\n", 1)[1]
    count = len(re.findall(r"^\d+\. ", exercises, flags=re.M))
    hints = len(re.findall(r"^:::\{dropdown\} Hint$", exercises, flags=re.M))
    solutions = len(re.findall(r"^:::\{dropdown\} Solution$", exercises, flags=re.M))
    assert hints == solutions == count, (
        f"{path.name}: {count} exercises, {hints} hints, {solutions} solutions"
    )


@pytest.mark.parametrize("path", chapters(), ids=lambda p: p.stem)
def test_code_fits_the_page(path):
    """Code lines of at most 80 characters (the width of the book's code boxes) and cells a
    reader can take in at once (a class or a figure may run a little longer)."""
    for cell in code_cells(path.read_text()):
        lines = cell.splitlines()
        wide = [line for line in lines if len(line) > 80]
        assert not wide, f"{path.name}: code line wider than 80 characters: {wide[0]!r}"
        assert len(lines) <= 40, f"{path.name}: a code cell of {len(lines)} lines"
