"""The README and docs/ stay readable: every relative link points to a file or directory
that exists (docs/decisions/ is linked as a folder), the README stays short, and it links every
page under docs/.

Pure text parsing: no network, no model, well under a second.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 15_000

_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)*?\1")
# [text](target) and ![alt](target); the target may be <...> and may carry a "title"
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
# [label]: target
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def link_targets(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link outside fenced code blocks and code spans."""
    targets = []
    fence = None
    for number, line in enumerate(text.splitlines(), start=1):
        opening = _FENCE.match(line)
        if fence is not None:
            if opening and opening.group(1) == fence:
                fence = None
            continue
        if opening:
            fence = opening.group(1)
            continue
        line = _CODE_SPAN.sub("", line)
        for match in (*_INLINE.finditer(line), *_REFERENCE.finditer(line)):
            targets.append((number, match.group(1).strip("<>")))
    return targets


def broken_links(path: Path) -> list[str]:
    broken = []
    for number, target in link_targets(path.read_text(encoding="utf-8")):
        if not target or target.startswith("#") or _SCHEME.match(target) or target.startswith("//"):
            continue  # an anchor in this page, or a URL (http:, https:, mailto:)
        relative = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if not (path.parent / relative).exists():
            broken.append(f"{path.relative_to(ROOT)}:{number}: {target}")
    return broken


def test_relative_links_point_to_existing_files():
    files = markdown_files()
    assert README.exists() and len(files) > 1, "README.md and docs/*.md are expected"
    broken = [entry for path in files for entry in broken_links(path)]
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_readme_is_at_most_15_kb():
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; keep it to {README_MAX_BYTES} and move detail to docs/"


def test_readme_links_every_top_level_docs_page():
    linked = {
        (README.parent / target.split("#", 1)[0]).resolve()
        for _, target in link_targets(README.read_text(encoding="utf-8"))
        if not _SCHEME.match(target)
    }
    missing = [str(page.relative_to(ROOT)) for page in sorted(DOCS.glob("*.md")) if page.resolve() not in linked]
    assert not missing, f"README.md's documentation section does not link: {', '.join(missing)}"


def test_the_link_parser_sees_links_and_skips_code():
    text = (
        "See [a](docs/a.md#x), ![img](pic.png \"title\"), [web](https://example.com) and [here](#top).\n"
        "`[not](a-link.md)` is code.\n"
        "```\n[also not](inside-fence.md)\n```\n"
        "[ref]: <docs/b c.md>\n"
    )
    assert [target for _, target in link_targets(text)] == [
        "docs/a.md#x", "pic.png", "https://example.com", "#top", "docs/b c.md",
    ]
