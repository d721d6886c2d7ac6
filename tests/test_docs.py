"""Every ```python block of README.md and docs/*.md runs as written.

Rules:
- Each block runs on its own, in a fresh namespace and a temporary working directory: a reader
  copies one block at a time, so every block has its own imports and inputs.
- A block preceded by the line ``<!-- no-run: reason -->`` is not run (too slow, needs a GPU, a
  download or data that is not here). :data:`NO_RUN` lists those blocks by file and first code
  line, so adding one to the docs is a visible change here too; keep that list short.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_RUN_MARK = re.compile(r"<!--\s*no-run:\s*(.+?)\s*-->")
README_MAX_LINES = 250
CODE_LANGUAGES = ("python", "bash", "text")
#: phrases that refer to unpublished sources or the project's internal history
INTERNAL = re.compile(r"document(s)? 00[0-9]|the documents|session [0-9]|issue [0-9]+", re.I)

#: (file, first code line) of every block marked ``<!-- no-run: ... -->``
NO_RUN = {
    ("bench.md", "import attnzoo.bench"),  # trains 3 attentions x 3 seeds x 8 epochs (minutes)
    ("segmentation.md", "from attnzoo.datasets import read_mask_folder"),  # data on disk
    ("segmentation.md", "import attnzoo.bench"),  # trains 4 heads x 3 seeds (minutes)
    ("ultralytics.md", "from attnzoo.integrations.ultralytics import attention_trainer"),
}


def _blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """``(line, code, no_run_reason)`` of the ```python blocks of a Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, code = i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                code.append(lines[i])
                i += 1
            before = next((ln for ln in reversed(lines[: start - 1]) if ln.strip()), "")
            mark = NO_RUN_MARK.search(before)
            out.append((start + 1, "\n".join(code) + "\n", mark.group(1) if mark else None))
        i += 1
    return out


ALL = [(p, line, code, reason) for p in DOC_FILES for line, code, reason in _blocks(p)]
#: blocks that take more than a few seconds on a 2-core CPU, by a phrase of their code
SLOW = (
    "viz.cam(",  # Grad-CAM, Grad-CAM++ and attention maps of a CBAM-ResNet-50
    "count(resnet50(",
)  # builds seven ImageNet-size networks
RUN = [
    pytest.param(
        p,
        line,
        code,
        id=f"{p.name}:{line}",
        marks=[pytest.mark.slow] if any(k in code for k in SLOW) else [],
    )
    for p, line, code, reason in ALL
    if reason is None
]


def _first_line(code: str) -> str:
    return next(ln.strip() for ln in code.splitlines() if ln.strip())


def test_docs_have_python_blocks_and_the_no_run_list_is_exact() -> None:
    assert len(ALL) >= 10, [p.name for p, *_ in ALL]
    marked = {(p.name, _first_line(code)) for p, _, code, reason in ALL if reason is not None}
    assert marked == NO_RUN


def test_every_code_block_says_what_it_is() -> None:
    """A fenced block is Python (run by this file), shell or plain text, so a reader knows which
    blocks are checked; a bare fence is neither."""
    fences = [
        (p.name, i + 1, line.strip()[3:])
        for p in DOC_FILES
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines())
        if line.strip().startswith("```")
    ]
    openers = fences[::2]  # fences alternate: opening, closing
    assert all(lang == "" for *_, lang in fences[1::2]), "unbalanced code fences"
    assert [f for f in openers if f[2] not in CODE_LANGUAGES] == []


def test_readme_is_a_landing_page() -> None:
    """The README stays short: reference and how-to text belongs in docs/."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_docs_cite_public_sources_only() -> None:
    """Code, docs and benchmarks cite papers and public repositories, not private notes."""
    files = [*DOC_FILES, *(ROOT / "src").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    hits = [
        f"{f.relative_to(ROOT)}:{i}: {line.strip()}"
        for f in files
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
        if INTERNAL.search(line)
    ]
    assert hits == []


def _slug(heading: str) -> str:
    """GitHub's (and mkdocs') anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_readme_links_resolve() -> None:
    """Every relative link of the README names an existing file and, if any, a heading in it
    (mkdocs checks the links between docs/ pages; the README is not one of them)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", readme):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path
        if not file.exists():
            broken.append(target)
        elif anchor:
            headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(target)
    assert broken == []


@pytest.mark.parametrize(("path", "line", "code"), RUN)
def test_python_block_runs(
    path: Path, line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # blocks may write files (panels, checkpoints)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = {"__name__": "__docs__"}
    exec(compile(code, f"{path.name}:{line}", "exec"), namespace)  # noqa: S102
