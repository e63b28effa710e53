"""The README stays a front door, and the reference in docs/ stays whole and linked.

Pure: reads files as text (and ``Settings.model_fields``); no Redis, no processes.
"""

from __future__ import annotations

import re
from pathlib import Path

from worker.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

README_MAX_BYTES = 20_000
README_MAX_LINES = 250

# Settings fields that need no documentation. Empty: every field is documented; add a name
# here only for a field that is test-only or internal, with a comment saying why.
UNDOCUMENTED_SETTINGS: frozenset[str] = frozenset()

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
METRIC_DEF = re.compile(  # a metric whose name is its first argument (Model*: model label)
    r"\b(?:Model)?(Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*[\"']([A-Za-z_:][\w:]*)[\"']"
)


def markdown_files() -> list[Path]:
    """README.md and every page under docs/."""
    return [README, *sorted(DOCS.glob("**/*.md"))]


def prose(text: str) -> str:
    """Markdown without fenced code blocks or inline code, where links are not links."""
    return INLINE_CODE.sub("code", FENCE.sub("", text))


def relative_links(path: Path) -> list[str]:
    """The link and image targets in ``path`` that point into the repository."""
    targets = LINK.findall(prose(path.read_text(encoding="utf-8")))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\*|_(?=\W)|(?<=\W)_", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, duplicates numbered as GitHub does."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def has_word(text: str, word: str) -> bool:
    """Whether ``word`` appears in ``text`` as a whole name, not inside a longer one."""
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(word)}(?![A-Za-z0-9_])", text) is not None


def defined_metrics() -> set[str]:
    """Exported names of the Prometheus metrics the package defines, read from its source."""
    names: set[str] = set()
    for source in sorted((ROOT / "worker").rglob("*.py")):
        for kind, name in METRIC_DEF.findall(source.read_text(encoding="utf-8")):
            # prometheus_client exports a counter as NAME_total
            total = kind == "Counter" and not name.endswith("_total")
            names.add(f"{name}_total" if total else name)
    return names


def test_readme_is_a_front_door() -> None:
    """README.md fits 20,000 bytes and 250 lines and names `make run` and `make test`."""
    data = README.read_bytes()
    text = data.decode("utf-8")
    lines = len(text.splitlines())
    assert len(data) <= README_MAX_BYTES, f"README.md is {len(data)} bytes"
    assert lines <= README_MAX_LINES, f"README.md is {lines} lines"
    assert "make run" in text
    assert "make test" in text


def test_relative_links_resolve() -> None:
    """Every relative link in README.md and docs/ points to a file or directory that exists."""
    broken = []
    for path in markdown_files():
        for target in relative_links(path):
            file_part = target.split("#", 1)[0]
            if not file_part:
                continue  # a link to an anchor of the same page
            if not (path.parent / file_part).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_anchors_resolve() -> None:
    """Every `#anchor` of a relative link to a markdown file names a heading of that file."""
    broken = []
    for path in markdown_files():
        for target in relative_links(path):
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part) if file_part else path
            checkable = anchor and linked.suffix == ".md" and linked.is_file()
            if checkable and anchor not in anchors(linked):
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing headings:\n" + "\n".join(broken)


def test_readme_links_every_docs_page() -> None:
    """The README links every page under docs/."""
    linked = {(README.parent / t.split("#", 1)[0]).resolve() for t in relative_links(README)}
    pages = sorted(DOCS.glob("**/*.md"))
    assert pages, "docs/ has no pages"
    missing = [str(p.relative_to(ROOT)) for p in pages if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_every_setting_is_documented() -> None:
    """Each `Settings` field's `LLM_WORKER_*` variable appears in docs/settings.md."""
    text = (DOCS / "settings.md").read_text(encoding="utf-8")
    fields = set(Settings.model_fields) - UNDOCUMENTED_SETTINGS
    assert fields, "Settings has no fields"
    missing = sorted(
        f"{ENV_PREFIX}{name.upper()}"
        for name in fields
        if not has_word(text, f"{ENV_PREFIX}{name.upper()}")
    )
    assert not missing, f"settings missing from docs/settings.md: {missing}"


def test_every_metric_is_documented() -> None:
    """Each metric defined in worker/ (metrics.py, scrape.py, …) appears in docs/metrics.md."""
    metrics = defined_metrics()
    assert len(metrics) >= 15, f"found only {sorted(metrics)} in worker/"  # the regex still reads
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    missing = sorted(name for name in metrics if not has_word(text, name))
    assert not missing, f"metrics missing from docs/metrics.md: {missing}"
