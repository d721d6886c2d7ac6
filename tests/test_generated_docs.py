"""The README's module table, docs/module-reference.md and the bench's options are current.

All are written by ``tools/gen_docs.py`` from ``attnzoo.available()`` / ``attnzoo.info()``, the
classes' docstrings and the command line's parser; registering, renaming or re-documenting a
module, or changing an option, makes these fail until ``python tools/gen_docs.py`` is run.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

import attnzoo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "tools" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_docs"] = module
    spec.loader.exec_module(module)
    return module


def test_readme_module_table_is_current(gen: ModuleType) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert gen.readme_with_table(readme) == readme, "run: python tools/gen_docs.py"


def test_module_reference_is_current(gen: ModuleType) -> None:
    page = (ROOT / "docs" / "module-reference.md").read_text(encoding="utf-8")
    assert page == gen.module_reference(), "run: python tools/gen_docs.py"


def test_bench_options_are_current(gen: ModuleType) -> None:
    page = (ROOT / "docs" / "bench.md").read_text(encoding="utf-8")
    assert gen.bench_page_with_options(page) == page, "run: python tools/gen_docs.py"


def test_bench_options_list_every_option_with_its_default(gen: ModuleType) -> None:
    from attnzoo.cli import build_parser

    table = gen.cli_options("bench")
    usage = build_parser().parse_args(["bench"])  # the defaults argparse fills in
    for option in ("--attention", "--seeds", "--out", "--no-progress"):
        assert f"| `{option}" in table
    assert f"(default: {usage.out})" in table  # %(default)s is expanded
    assert "%(" not in table


def test_table_has_one_row_per_registered_module(gen: ModuleType) -> None:
    rows = [ln for ln in gen.module_table().splitlines()[2:] if ln.startswith("| [`")]
    assert [r.split("`")[1] for r in rows] == attnzoo.available()
    se = next(r for r in rows if r.startswith("| [`se`]"))
    assert f"| {attnzoo.info('se').count_params(256):,} |" in se


def test_docstring_sections_become_lists(gen: ModuleType) -> None:
    class Example:
        """One line with ``code`` and :class:`Thing`.

        Args:
            channels: input channels ``C``.
            reduction: a long description that goes on
                over a second line.
        """

    text = gen.docstring_markdown(Example)
    assert "One line with `code` and `Thing`." in text
    assert "- `channels`: input channels `C`." in text
    assert "- `reduction`: a long description that goes on over a second line." in text
    assert "    " not in text  # no indented line, which Markdown would render as code


def test_readme_without_markers_is_an_error(gen: ModuleType) -> None:
    with pytest.raises(ValueError, match="README.md: expected the markers"):
        gen.readme_with_table("# no table here\n")
