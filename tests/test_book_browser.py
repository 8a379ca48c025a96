"""The built book, opened in a real browser (headless Chromium).

These checks need ``make book`` to have written ``_build/html``; without it they skip
themselves, so a plain ``make test`` does not depend on a book build. CI runs them through
``make check-book`` right after ``make book``.

For every page in ``_toc.yml`` the browser must load the page, show the chapter's title, and
lay out every figure with a non-zero size, show no unrendered Markdown or MyST markup in its
prose (``|---|``, ``{glue:``, ``{cite}``), no warning or error output, no code block wider
than its box, and at least one real ``<table>`` where a chapter's results are tabular; a
screenshot of each page goes to
``_build/screenshots/``. A small crawler then follows every internal link and image source of
the site and checks that its target file, and its ``#anchor``, exist.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from PIL import Image

pytestmark = pytest.mark.book

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
BROWSER_TIMEOUT_S = 120
# Chapters whose computed results are tabular: each must show at least one real <table>.
CHAPTERS_WITH_TABLES = {f"book/{name}" for name in (
    "02_convolution", "03_transposed_convolution", "04_backpropagation", "05_patch_classifier",
    "06_fcn", "07_unet", "08_loss_and_weights", "09_training", "10_overlap_tile",
    "10_whole_slides", "11_counting", "13_frameworks")}

if not (SITE / "index.html").exists():
    pytest.skip("the book is not built (run `make book` first)", allow_module_level=True)


def find_browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium found (CI installs Debian's `chromium`)")


def toc_files() -> list[str]:
    """The source files listed in ``_toc.yml``, root first, in reading order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))
            walk(entry.get("chapters"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return files


def is_notebook(file: str) -> bool:
    """True for chapters that are executed notebooks (they have a jupytext header)."""
    return "\nkernelspec:" in (ROOT / f"{file}.md").read_text()


def source_title(file: str) -> str:
    """The text of the first level-1 heading of a chapter's Markdown source."""
    text = (ROOT / f"{file}.md").read_text()
    body = re.sub(r"^---\n.*?\n---\n", "", text, count=1, flags=re.S)  # jupytext header
    match = re.search(r"^# (.+)$", body, flags=re.M)
    assert match, f"{file}.md has no level-1 heading"
    return match.group(1).strip()


def normalise(text: str) -> str:
    """Collapse whitespace and undo the typographic quotes that Sphinx puts in headings."""
    straight = text.translate(str.maketrans({"\u2018": "'", "\u2019": "'",
                                             "\u201c": '"', "\u201d": '"'}))
    return " ".join(straight.split())


class _PageParser(HTMLParser):
    """Collects the text of <h1>, the <img> tags, every link target and every id, and the
    attributes of the measuring script's report."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.h1_text: list[str] = []
        self.images: list[dict[str, str]] = []
        self.targets: list[str] = []
        self.ids: set[str] = set()
        self.report: dict[str, str] = {}
        self._h1_depth = 0

    def handle_starttag(self, tag, attrs):
        attributes = {k: (v or "") for k, v in attrs}
        if attributes.get("id") == "measured-report":
            self.report = attributes
        if "id" in attributes:
            self.ids.add(attributes["id"])
        if tag == "a" and "name" in attributes:
            self.ids.add(attributes["name"])
        if tag == "h1":
            self._h1_depth += 1
            self.h1_text.append("")
        if tag == "img":
            self.images.append(attributes)
        for key in ("href", "src"):
            if key in attributes and tag in ("a", "img", "link", "script", "source"):
                self.targets.append(attributes[key])

    def handle_endtag(self, tag):
        if tag == "h1" and self._h1_depth:
            self._h1_depth -= 1

    def handle_data(self, data):
        if self._h1_depth:
            self.h1_text[-1] += data


def parse(markup: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(markup)
    return parser


# Runs after the page (and its images) have loaded; records what the browser laid out:
# every image's size, the prose text outside code (to find Markdown that did not render),
# the code blocks whose text is wider than their box, and how many tables were rendered.
_MEASURE_SCRIPT = """
<script>
window.addEventListener("load", () => {
  const main = document.querySelector("main") || document.body;
  // the page's own figures (the header's menus hold hidden icons)
  const article = main.querySelector("article") || main;
  for (const img of article.querySelectorAll("img")) {
    const box = img.getBoundingClientRect();
    img.setAttribute("data-natural", img.naturalWidth + "x" + img.naturalHeight);
    img.setAttribute("data-layout", Math.round(box.width) + "x" + Math.round(box.height));
  }
  const prose = article.cloneNode(true);
  for (const code of prose.querySelectorAll("pre, code, script, style")) code.remove();
  const report = document.createElement("div");
  report.id = "measured-report";
  report.setAttribute("data-prose", prose.textContent);
  const wide = [];
  for (const pre of article.querySelectorAll("pre")) {
    if (pre.scrollWidth > pre.clientWidth + 1) {
      const lines = pre.textContent.split("\\n");
      wide.push(lines.reduce((a, b) => (b.length > a.length ? b : a), ""));
    }
  }
  report.setAttribute("data-wide-code", JSON.stringify(wide));
  report.setAttribute("data-tables", String(article.querySelectorAll("table").length));
  document.body.appendChild(report);
  document.body.setAttribute("data-measured", "yes");
});
</script>
"""

# Text that only appears on a page when Markdown or a MyST role was shown instead of rendered.
RAW_MARKUP = re.compile(r"\|\s*:?-{3,}:?\s*\||\{glue:|\{cite\}|\{download\}|^:::", re.M)


def browser_args(browser: str, profile: Path) -> list[str]:
    return [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--window-size=1280,2000",
        "--virtual-time-budget=10000",
    ]


def run_browser(args: list[str]) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def browser():
    return find_browser()


@pytest.mark.parametrize("file", toc_files())
def test_page_loads_with_title_and_figures(file, browser, tmp_path):
    page = SITE / f"{file}.html"
    assert page.exists(), f"{file} is in _toc.yml but {page.relative_to(ROOT)} was not built"
    title = source_title(file)

    # A copy of the page with the measuring script, in the same folder so relative links work.
    probe = page.with_name(f".probe-{page.name}")
    markup = page.read_text()
    assert "output stderr" not in markup, f"{file} shows a warning or error output (stderr)"
    probe.write_text(markup.replace("</body>", _MEASURE_SCRIPT + "</body>"))
    try:
        dom = run_browser(browser_args(browser, tmp_path / "profile")
                          + ["--dump-dom", probe.as_uri()])
    finally:
        probe.unlink()

    assert 'data-measured="yes"' in dom, "the page did not finish loading in the browser"
    parsed = parse(dom)
    headings = [normalise(t) for t in parsed.h1_text]
    plain_title = normalise(html.unescape(re.sub(r"[`*]", "", title)))
    assert any(plain_title in h for h in headings), (
        f"title {plain_title!r} not among the page's headings {headings}"
    )
    raw = sorted({m.group(0).strip() for m in RAW_MARKUP.finditer(parsed.report["data-prose"])})
    assert not raw, f"{file} shows unrendered Markdown or MyST markup: {raw}"
    wide = json.loads(parsed.report["data-wide-code"])
    assert not wide, f"{file}: {len(wide)} code block(s) wider than their box, e.g. {wide[0]!r}"
    if file in CHAPTERS_WITH_TABLES:
        assert int(parsed.report["data-tables"]) > 0, f"{file} renders no <table>"
    figures = [img for img in parsed.images if "data-layout" in img]
    if is_notebook(file):
        assert figures, f"{file} is an executed chapter but shows no figure"
    for img in figures:
        natural = tuple(int(v) for v in img["data-natural"].split("x"))
        layout = tuple(int(v) for v in img["data-layout"].split("x"))
        assert min(natural) > 0, f"image {img.get('src')} did not load on {file}"
        assert min(layout) > 0, f"image {img.get('src')} has zero size on {file}"
        source = (page.parent / unquote(urlsplit(img["src"]).path)).resolve()
        if source.suffix.lower() == ".png" and source.exists():
            with Image.open(source) as picture:
                assert min(picture.size) > 0

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / f"{file.replace('/', '_')}.png"
    run_browser(browser_args(browser, tmp_path / "profile")
                + [f"--screenshot={shot}", page.as_uri()])
    with Image.open(shot) as picture:
        assert picture.size[0] > 0 and picture.size[1] > 0
        # A blank page would be a single colour.
        assert len(picture.convert("L").getcolors(maxcolors=1 << 16) or [0, 1]) > 1


def _site_pages() -> list[Path]:
    return sorted(p for p in SITE.rglob("*.html") if "_static" not in p.relative_to(SITE).parts)


def test_internal_links_and_anchors_exist():
    ids_of: dict[Path, set[str]] = {}

    def ids(path: Path) -> set[str]:
        if path not in ids_of:
            ids_of[path] = parse(path.read_text(errors="replace")).ids
        return ids_of[path]

    broken = []
    for page in _site_pages():
        for target in parse(page.read_text(errors="replace")).targets:
            parts = urlsplit(target)
            if parts.scheme or parts.netloc or target.startswith(("mailto:", "javascript:")):
                continue  # external, or not a file
            path = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
            if path.is_dir():
                path = path / "index.html"
            if not path.exists():
                broken.append(f"{page.relative_to(SITE)} -> {target} (no such file)")
                continue
            anchor = unquote(parts.fragment)
            if anchor and path.suffix == ".html" and anchor not in ids(path):
                broken.append(f"{page.relative_to(SITE)} -> {target} (no such anchor)")
    assert not broken, "broken internal links:\n" + "\n".join(broken)


def test_every_chapter_is_in_the_table_of_contents():
    listed = set(toc_files())
    chapters = {f"book/{p.stem}" for p in (ROOT / "book").glob("*.md")}
    assert chapters <= listed, f"chapters missing from _toc.yml: {sorted(chapters - listed)}"
