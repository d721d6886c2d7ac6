"""Report rendering: atomic files, Markdown/HTML from sections, inline images, CSV, plots."""

from __future__ import annotations

import base64
import csv
import os
import re
from pathlib import Path

import pytest
import torch

from attnzoo.bench import report as rep


def _tiny_png() -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [1, 0])
    return rep._png(fig)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "results.json"
    rep.atomic_write_text(target, "one")
    rep.atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "results.json"
    rep.atomic_write_text(target, "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        rep.atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_sections_render_to_markdown_and_self_contained_html(tmp_path: Path) -> None:
    png = _tiny_png()
    sections = [
        rep.Section(
            "Summary",
            [
                rep.Text("Top-1 of **cbam** with `reduction=8` <b>escaped</b>"),
                rep.Table(["attention", "top-1"], [["none", "90.00"], ["a|b", "91.00"]], "Caption"),
                rep.Code("attnzoo bench --attention none,cbam"),
                rep.Figure("acc.png", png, "Accuracy plot"),
            ],
        )
    ]
    extra = [rep.Section("Grad-CAM (added later)", [rep.Text("- one\n- two")])]
    md_path, html_path = rep.write_report(tmp_path, "Report", sections, extra)
    md = md_path.read_text()
    assert md.startswith("# Report\n")
    assert "| attention | top-1 |" in md and "| a\\|b | 91.00 |" in md
    assert "![Accuracy plot](figures/acc.png)" in md
    assert "## Grad-CAM (added later)" in md
    assert (tmp_path / "figures" / "acc.png").read_bytes() == png
    page = html_path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<strong>cbam</strong>" in page and "<code>reduction=8</code>" in page
    assert "&lt;b&gt;escaped&lt;/b&gt;" in page  # user text is escaped
    assert "<li>one</li><li>two</li>" in page
    found = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(f) for f in found] == [png]
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch


def test_results_csv_has_run_and_summary_rows(tmp_path: Path) -> None:
    runs = [
        {"attention": "none", "seed": 0, "test_acc": 0.9, "history": [1, 2]},
        {"attention": "se", "seed": 0, "test_acc": 0.91},
    ]
    summary = [{"attention": "se", "n_seeds": 1, "test_acc": 0.91, "verdict": "n/a"}]
    rep.write_results_csv(tmp_path / "r.csv", runs, summary)
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [(r["row"], r["attention"]) for r in rows] == [
        ("run", "none"),
        ("run", "se"),
        ("summary", "se"),
    ]
    assert rows[0]["test_acc"] == "0.9" and "history" not in rows[0]


def test_formatting() -> None:
    assert rep.fmt_pct(0.91234, 0.0123) == "91.23 ± 1.23"
    assert rep.fmt_diff(0.012, -0.003, 0.027) == "+1.20 [-0.30, +2.70]"
    assert rep.fmt_diff(0.012, float("nan"), float("nan")) == "+1.20 (n/a)"


def test_plots_are_pngs() -> None:
    summary = [
        {
            "attention": "none",
            "test_acc": 0.9,
            "test_acc_std": 0.01,
            "params": 100,
            "latency_ms": 1.0,
        },
        {
            "attention": "se",
            "test_acc": 0.92,
            "test_acc_std": 0.02,
            "params": 120,
            "latency_ms": 1.2,
        },
    ]
    per_seed = {"none": [0.89, 0.91], "se": [0.9, 0.94]}
    hist = {
        "none": [
            [
                {"epoch": 1, "test_acc": 0.5, "train_loss": 2.0},
                {"epoch": 2, "test_acc": 0.9, "train_loss": 1.0},
            ]
        ]
    }
    imgs = torch.rand(3, 3, 8, 8)
    for png in (
        rep.plot_accuracy(summary, per_seed),
        rep.plot_tradeoff(summary, "params", "params", "t"),
        rep.plot_curves(hist),
        rep.plot_samples(imgs, [0, 1, 0], ["a", "b"], boxes=[(1, 1, 4, 4)] * 3),
    ):
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
