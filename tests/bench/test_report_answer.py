"""The bench report leads with the answer: forest plot, chance level, table; per-class accuracy;
panels from every class; collapsible sections; the baseline named; captions that fit the data.

Sections are built from hand-made results (no training), except one small bench on a
class-sorted image folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from attnzoo.bench import report as rep
from attnzoo.bench.data import BenchData, TensorImageSet
from attnzoo.bench.engine import (
    Bench,
    BenchConfig,
    BenchResult,
    resolve_baseline,
    statistics,
    write_results,
)
from attnzoo.bench.run import run
from attnzoo.bench.tasks.classify import TASK
from attnzoo.cli import main
from attnzoo.specs import parse_attentions

CLASSES = ["circle", "square", "triangle"]
CONFIG = {"model": "cifar_resnet8", "epochs": 2, "batch_size": 32, "lr": 0.1, "weight_decay": 5e-4}


def _data(per_class: int = 4, classes: list[str] = CLASSES) -> BenchData:
    """A class-sorted folder-like dataset without boxes."""
    labels = torch.arange(len(classes)).repeat_interleave(per_class)
    gen = torch.Generator().manual_seed(0)
    split = TensorImageSet(torch.rand(len(labels), 3, 8, 8, generator=gen), labels)
    return BenchData(
        name="/data/shapes",
        train=split,
        test=split,
        classes=list(classes),
        description="image folder /data/shapes: 3 classes",
    )


def _confusion(acc_per_class: list[int], per_class: int = 4) -> list[list[int]]:
    """Each class k has ``acc_per_class[k]`` right answers, the rest predicted as class 0/1."""
    k = len(acc_per_class)
    m = [[0] * k for _ in range(k)]
    for c, right in enumerate(acc_per_class):
        m[c][c] = right
        m[c][(c + 1) % k] = per_class - right
    return m


def _result(
    tmp_path: Path,
    accs: dict[str, list[float]],
    baseline: str | None = "auto",
    confusions: dict[str, list] | None = None,
) -> BenchResult:
    """Summary and runs through the bench's own statistics and results writer."""
    specs = parse_attentions(list(accs))
    seeds = list(range(len(next(iter(accs.values())))))
    base = resolve_baseline(specs, None) if baseline == "auto" else baseline
    results = {}
    for label, values in accs.items():
        for seed, acc in zip(seeds, values):
            results[(label, seed)] = {
                "attention": label,
                "seed": seed,
                "test_acc": acc,
                "test_n": 12,
                "train_acc": acc,
                "train_loss": 1.0,
                "train_seconds": 0.1,
                "history": [{"epoch": 1, "test_acc": acc, "train_loss": 1.0}],
                "confusion": None if confusions is None else confusions[label][seed],
            }
    bench = Bench(
        config=BenchConfig(seeds=seeds),
        task=TASK,
        specs=specs,
        baseline=base,
        model_name="cifar_resnet8",
        builder=None,
        out=tmp_path,
        run_config=CONFIG,
    )
    runs, summary = statistics(bench, results)
    write_results(bench, runs, summary, "cmd", partial=False)
    return BenchResult(out=tmp_path, runs=runs, summary=summary, baseline=base, config=CONFIG)


def _html(result: BenchResult, data: BenchData | None = None) -> str:
    data = data or _data()
    part = TASK.report(result, data, BenchConfig(localise=False), [])
    secs = rep.build_sections(result, data, CONFIG, {"torch": "x"}, "cmd", part)
    return rep.render_html("report", secs)


def _sections(page: str) -> list[tuple[str, bool]]:
    """(title, collapsed) of each h2 in order."""
    out = []
    for m in re.finditer(r"(<details><summary>)?<h2>([^<]+)</h2>", page):
        out.append((m.group(2), m.group(1) is not None))
    return out


# ---------------------------------------------------------------------------------------------
# the answer first
def test_forest_plot_and_chance_level_come_before_the_table(tmp_path: Path) -> None:
    result = _result(tmp_path, {"none": [0.80, 0.82], "se": [0.85, 0.86], "cbam": [0.79, 0.80]})
    page = _html(result)
    assert _sections(page)[0] == ("Result", False)
    first_img, first_table = page.index("<img"), page.index("<table")
    assert 'alt="Left: test top-1' in page[first_img : first_img + 200]  # the forest plot
    assert first_img < page.index("Chance level: 33.3 %") < first_table
    # the forest plot has one panel per score: accuracy, Δ accuracy
    png = rep.plot_forest(
        result.summary,
        {
            s["attention"]: rep.mean_ci(
                [r["test_acc"] for r in result.runs if r["attention"] == s["attention"]]
            )
            for s in result.summary
        },
        "none",
        1 / 3,
    )
    assert png.startswith(b"\x89PNG")
    assert "Near chance" not in page


def test_results_near_chance_are_flagged(tmp_path: Path) -> None:
    # 38 % on 3 balanced classes: within 5 points of chance (33.3 %)
    result = _result(tmp_path, {"none": [0.90, 0.92], "se": [0.38, 0.38]})
    page = _html(result)
    assert "Near chance" in page and "<code>se</code> (38.0 %)" in page
    assert "38.00 ± 0.00 (near chance)" in page and "90.00" in page
    assert "91.00 ± 1.41 (near chance)" not in page
    # a CI reaching chance is flagged even with a mean 10 points above it
    assert rep.near_chance(0.43, 0.30, 1 / 3) and not rep.near_chance(0.43, 0.40, 1 / 3)
    assert rep.near_chance(0.20, float("nan"), 1 / 3)  # below chance
    assert not rep.near_chance(0.60, float("nan"), 1 / 3)


def test_chance_level_uses_the_most_frequent_class() -> None:
    balanced = rep.chance_level(torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    assert balanced["chance"] == pytest.approx(1 / 3)
    skewed = rep.chance_level(torch.tensor([0, 0, 0, 1, 2, 1, 0, 0]), 4)
    assert skewed["uniform"] == 0.25 and skewed["majority_class"] == 0
    assert skewed["chance"] == pytest.approx(5 / 8)


def test_mean_ci_matches_the_t_interval() -> None:
    m, lo, hi = rep.mean_ci([0.80, 0.82, 0.84])
    assert m == pytest.approx(0.82)
    assert hi - m == pytest.approx(4.303 * 0.02 / 3**0.5, rel=1e-3)
    assert rep.mean_ci([0.5])[1] != rep.mean_ci([0.5])[1]  # nan with one seed


# ---------------------------------------------------------------------------------------------
# per-class accuracy
def test_per_class_accuracy_from_recorded_confusions(tmp_path: Path) -> None:
    conf = {
        "none": [_confusion([4, 2, 0]), _confusion([4, 2, 2])],
        "se": [_confusion([4, 4, 2]), _confusion([4, 4, 4])],
    }
    result = _result(tmp_path, {"none": [0.5, 8 / 12], "se": [10 / 12, 1.0]}, confusions=conf)
    pooled = rep.pooled_confusions(result.runs, 3)
    assert pooled["none"].diagonal().tolist() == [8, 4, 2]
    page = _html(result)
    assert ("Per-class accuracy", False) in _sections(page)
    sec = page[page.index("<h2>Per-class accuracy</h2>") :]
    assert 'alt="Confusion matrices' in sec
    # triangle: none 2/8 = 25 %, se 6/8 = 75 % (+50 points)
    assert "<td>triangle</td><td>4</td><td>25.0</td><td>75.0 (+50.0)</td>" in sec
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["runs"][0]["confusion"] == _confusion([4, 2, 0])


def test_results_without_confusions_still_render(tmp_path: Path) -> None:
    page = _html(_result(tmp_path, {"none": [0.5, 0.6], "se": [0.6, 0.7]}))
    assert "Not available" in page and 'alt="Confusion' not in page


# ---------------------------------------------------------------------------------------------
# panels and samples from every class
def test_sample_per_class_covers_every_class_of_a_sorted_set() -> None:
    labels = torch.arange(3).repeat_interleave(40)  # class-sorted, like a folder
    idx = rep.sample_per_class(labels, 6)
    assert sorted(labels[idx].tolist()) == [0, 0, 1, 1, 2, 2]
    assert idx == rep.sample_per_class(labels, 6)  # deterministic
    assert len(set(idx)) == 6
    ten = torch.arange(10).repeat_interleave(5)
    assert len(set(ten[rep.sample_per_class(ten, 4)].tolist())) == 4
    assert sorted(rep.sample_per_class(torch.tensor([2, 2, 1]), 10)) == [0, 1, 2]
    # an unbalanced set: every class first, then the rest
    skew = torch.tensor([0] * 30 + [1, 2])
    assert set(skew[rep.sample_per_class(skew, 3)].tolist()) == {0, 1, 2}


# ---------------------------------------------------------------------------------------------
# layout and wording
def test_long_sections_are_collapsed_and_the_page_stays_self_contained(tmp_path: Path) -> None:
    page = _html(_result(tmp_path, {"none": [0.8, 0.9], "se": [0.85, 0.9]}))
    sections = dict(_sections(page))
    assert sections["Result"] is False and sections["Data"] is False
    for title in ("How to read the numbers", "More plots", "Runs", "Reproduce"):
        assert sections[title] is True, title
    assert page.count("<details>") == page.count("</details>") == 4
    assert not re.search(r'(src|href)="(?!data:)', page)


def test_folder_data_captions_do_not_mention_digits(tmp_path: Path) -> None:
    page = _html(_result(tmp_path, {"none": [0.8, 0.9], "se": [0.85, 0.9]}))
    assert "digit" not in page.lower()
    assert "<td>circle</td><td>4</td><td>4</td>" in page  # images per class used


# ---------------------------------------------------------------------------------------------
# the baseline
def test_without_none_there_is_no_delta_against_a_non_baseline(tmp_path: Path) -> None:
    result = _result(tmp_path, {"se": [0.80, 0.82], "cbam": [0.85, 0.86]})
    assert result.baseline is None
    headers, rows = result.table()
    assert not any("Δ" in h for h in headers)
    assert "baseline" not in {c for row in rows for c in row}
    assert all("diff_vs_baseline" not in s for s in result.summary)
    page = _html(result)
    assert "No baseline" in page and "--baseline NAME" in page


def test_an_explicit_baseline_is_named_everywhere(tmp_path: Path) -> None:
    result = _result(
        tmp_path, {"none": [0.7, 0.8], "se": [0.80, 0.82], "cbam": [0.85, 0.86]}, baseline="se"
    )
    headers, rows = result.table()
    assert "Δ vs se [95% CI]" in headers
    by = {r[0]: r for r in rows}
    assert by["se"][2] == "baseline" and by["none"][2].startswith("-6.00")
    cbam = next(s for s in result.summary if s["attention"] == "cbam")
    assert cbam["diff_vs_baseline"] == pytest.approx(0.045) and "diff_vs_none" not in cbam
    page = _html(result)
    assert "Δ vs se" in page and "Δ vs none" not in page
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["baseline"] == "se"


def test_baseline_must_be_one_of_the_attentions(tmp_path: Path) -> None:
    specs = parse_attentions("none,se,cbam:reduction=8")
    assert resolve_baseline(specs, None) == "none"
    assert resolve_baseline(specs, "cbam:reduction=8") == "cbam:reduction=8"
    assert resolve_baseline(parse_attentions("se,cbam"), None) is None
    with pytest.raises(
        ValueError,
        match=r"--baseline 'eca' is not among the attentions "
        r"\(none, se, cbam:reduction=8\)",
    ):
        resolve_baseline(specs, "eca")
    with pytest.raises(ValueError, match="--baseline 'eca'"):
        run("none,se", baseline="eca", out=tmp_path, epochs=1, seeds=[0], progress=False)
    assert not (tmp_path / "runs").exists()


def test_cli_baseline_option(tmp_path: Path, capsys) -> None:
    code = main(
        [
            "bench",
            "--attention",
            "se,cbam",
            "--baseline",
            "none",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 2
    assert "--baseline 'none' is not among the attentions (se, cbam)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# a real bench on a class-sorted folder
def _folder(root: Path, n: int) -> Path:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for k, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                arr = torch.rand(12, 12, 3, generator=gen) * 0.3
                arr[..., k] += 0.6  # a learnable colour cue
                Image.fromarray((arr * 255).to(torch.uint8).numpy()).save(
                    root / split / name / f"{i}.png"
                )
    return root


@pytest.mark.slow
def test_bench_on_a_class_sorted_folder_reports_every_class(tmp_path: Path, monkeypatch) -> None:
    from attnzoo.bench import localisation

    seen = {}
    real = localisation.write_panels

    def spy(models, images, display, out_dir, **kw):
        seen["labels"] = kw["labels"].tolist()
        return real(models, images, display, out_dir, **kw)

    monkeypatch.setattr(localisation, "write_panels", spy)
    data = _folder(tmp_path / "shapes", 8)
    torch.set_num_threads(1)
    result = run(
        "none,cbam",
        data=str(data),
        n_train=12,
        out=tmp_path / "out",
        epochs=1,
        seeds=[0],
        batch_size=8,
        image_size=12,
        progress=False,
        profile=False,
        panel_images=3,
    )
    page = result.report_html.read_text()
    assert sorted(seen["labels"]) == [0, 1, 2]  # the panels show every class
    for name in CLASSES:  # every class trained on and reported per class
        assert f"<td>{name}</td><td>4</td><td>8</td>" in page
        assert re.search(rf"<td>{name}</td><td>8</td><td>[\d.]+</td>", page)
    assert "digit" not in page.lower()  # no boxes: no digit captions
    assert page.index('alt="Left: test top-1') < page.index("<table")
    assert not (tmp_path / "out" / "figures" / "maps_none.png").exists()
    assert (tmp_path / "out" / "figures" / "maps_cbam.png").is_file()
    assert all(r["confusion"] is not None for r in result.runs)
    assert sum(map(sum, result.runs[0]["confusion"])) == 24


def test_grad_cam_is_not_repeated_for_modules_without_spatial_maps(
    tmp_path: Path, monkeypatch
) -> None:
    from attnzoo import viz
    from attnzoo.bench.localisation import write_panels
    from attnzoo.models import cifar_resnet8

    drawn: dict[str, list[str]] = {}
    real = viz.save_panel

    def spy(path, images, columns, **kw):
        drawn[Path(path).name] = list(columns)
        return real(path, images, columns, **kw)

    monkeypatch.setattr(viz, "save_panel", spy)
    torch.manual_seed(0)
    models = {
        "none": cifar_resnet8(attention=None, num_classes=3).eval(),
        "se": cifar_resnet8(attention="se", num_classes=3).eval(),
        "cbam": cifar_resnet8(attention="cbam", num_classes=3).eval(),
    }
    images = torch.rand(2, 3, 16, 16)
    paths = write_panels(
        models, images, images, tmp_path, labels=torch.tensor([0, 2]), classes=CLASSES
    )
    assert sorted(p.name for p in paths) == ["cam_compare.png", "maps_cbam.png"]
    assert drawn["cam_compare.png"] == ["none", "se", "cbam"]
    assert drawn["maps_cbam.png"] and not any("CAM" in h for h in drawn["maps_cbam.png"])
    # one network alone: its panel carries its Grad-CAM
    write_panels({"none": models["none"]}, images, images, tmp_path / "one")
    assert drawn["maps_none.png"] == ["Grad-CAM"]
