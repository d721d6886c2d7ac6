"""Localisation scores, panels and ``attnzoo cam`` on a tiny trained bench."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from attnzoo.bench import localisation as loc
from attnzoo.bench.checkpoints import load_run_model
from attnzoo.bench.data import load_data
from attnzoo.bench.run import run
from attnzoo.cli import main

TINY = dict(
    epochs=1,
    seeds=[0, 1],
    batch_size=32,
    n_train=96,
    n_test=37,
    progress=False,
    profile=False,
    panel_images=3,
)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("loc")
    result = run("none,cbam", out=out, **TINY)
    yield out, result
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def data():
    return load_data("digits", n_train=96, n_test=37)


def _hand_scores(model, data) -> tuple[float, float]:
    """Pointing game and energy from first principles: Grad-CAM per image, then the box."""
    from attnzoo import viz

    cams = viz.cam(model, data.test.images, targets=data.test.labels)
    hits, energy = [], []
    for c, (x0, y0, x1, y1) in zip(cams.double(), data.test.boxes.tolist()):
        # documented rule: a hit when at least half of the maximal pixels lie in the box; a
        # constant map never hits
        ys, xs = torch.nonzero(c == c.max(), as_tuple=True)
        inside = ((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)).double().mean()
        hits.append(float(inside >= 0.5 and c.max() > c.min()))
        energy.append(float(c[y0:y1, x0:x1].sum() / c.sum()) if c.sum() > 0 else 0.0)
    return sum(hits) / len(hits), sum(energy) / len(energy)


def test_scores_are_recorded_per_run_and_summarised(bench, data) -> None:
    out, _ = bench
    payload = json.loads((out / "results.json").read_text())
    for r in payload["runs"]:
        assert 0.0 <= r["pointing_game"] <= 1.0 and 0.0 <= r["energy_in_box"] <= 1.0
        assert r["cam_method"] == "gradcam"
    summ = {s["attention"]: s for s in payload["summary"]}
    cbam = [r["pointing_game"] for r in payload["runs"] if r["attention"] == "cbam"]
    assert summ["cbam"]["pointing_game"] == pytest.approx(sum(cbam) / 2)
    base = {r["seed"]: r["pointing_game"] for r in payload["runs"] if r["attention"] == "none"}
    att = {r["seed"]: r["pointing_game"] for r in payload["runs"] if r["attention"] == "cbam"}
    assert summ["cbam"]["pointing_diff"] == pytest.approx((att[0] - base[0] + att[1] - base[1]) / 2)
    area = (
        (data.test.boxes[:, 2] - data.test.boxes[:, 0])
        * (data.test.boxes[:, 3] - data.test.boxes[:, 1])
    ).float() / (32 * 32)
    assert summ["none"]["chance"] == pytest.approx(float(area.mean()), rel=1e-6)


def test_cached_scores_match_a_from_scratch_computation(bench, data) -> None:
    out, _ = bench
    run_dir = out / "runs" / "cbam" / "seed1"
    cached = json.loads((run_dir / loc.LOCALISATION_FILE).read_text())["scores"]
    model, _ = load_run_model(run_dir)
    pointing, energy = _hand_scores(model, data)
    assert cached["n"] == 37
    assert cached["pointing_game"] == pytest.approx(pointing, abs=1e-9)
    assert cached["energy_in_box"] == pytest.approx(energy, abs=1e-9)


def test_localise_run_reuses_its_cache_and_recomputes_for_another_method(
    bench, data, monkeypatch
) -> None:
    out, _ = bench
    run_dir = out / "runs" / "none" / "seed0"
    first = loc.localise_run(run_dir, data)

    def boom(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(loc, "score_localisation", boom)
    assert loc.localise_run(run_dir, data) == first
    with pytest.raises(AssertionError, match="recomputed"):
        loc.localise_run(run_dir, data, method="eigencam")


def test_localise_run_needs_boxes(bench, data) -> None:
    out, _ = bench
    data_nobox = load_data("digits", n_train=96, n_test=37)
    data_nobox.test.boxes = None
    with pytest.raises(ValueError, match="no boxes"):
        loc.localise_run(out / "runs" / "none" / "seed0", data_nobox)


def test_summarize_localisation_on_known_values() -> None:
    per_run = {
        ("none", 0): {
            "pointing_game": 0.50,
            "energy_in_box": 0.30,
            "chance": 0.25,
            "method": "gradcam",
        },
        ("none", 1): {
            "pointing_game": 0.60,
            "energy_in_box": 0.40,
            "chance": 0.25,
            "method": "gradcam",
        },
        ("se", 0): {
            "pointing_game": 0.70,
            "energy_in_box": 0.35,
            "chance": 0.25,
            "method": "gradcam",
        },
        ("se", 1): {
            "pointing_game": 0.74,
            "energy_in_box": 0.45,
            "chance": 0.25,
            "method": "gradcam",
        },
    }
    rows = {r["attention"]: r for r in loc.summarize_localisation(["none", "se"], [0, 1], per_run)}
    assert rows["none"]["pointing_game"] == pytest.approx(0.55)
    assert rows["none"]["pointing_game_std"] == pytest.approx(0.005**0.5)
    assert rows["se"]["energy_in_box"] == pytest.approx(0.40)
    assert rows["se"]["pointing_diff"] == pytest.approx(0.17)  # (0.20 + 0.14) / 2
    assert rows["se"]["energy_diff"] == pytest.approx(0.05)  # (0.05 + 0.05) / 2
    assert rows["se"]["energy_diff_low"] == pytest.approx(0.05)  # no spread: a zero-width CI
    assert "pointing_diff" not in rows["none"]


def test_report_has_the_table_and_the_panels(bench) -> None:
    out, result = bench
    md = (out / "report.md").read_text()
    assert "## Where the network looks" in md
    assert "pointing game %" in md and "chance %" in md
    # none has no spatial map: its Grad-CAM is in the comparison only (no maps_none panel)
    assert not (out / "figures" / "maps_none.png").exists()
    for name in ("cam_compare", "maps_cbam"):
        path = out / "figures" / f"{name}.png"
        assert path.read_bytes().startswith(PNG), name
        assert f"figures/{name}.png" in md
        with Image.open(path) as im:
            assert im.size[0] > 200 and im.size[1] > 200
    headers, rows = result.table()
    assert "pointing game %" in headers and "energy in box %" in headers
    html = (out / "report.html").read_text()
    # forest, confusion, accuracy, curves, samples (profile=False: no trade-off plots) + the
    # comparison panel and cbam's attention maps
    assert html.count("data:image/png;base64,") == 5 + 2


def test_no_localise_skips_scores_and_panels(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    run("none", out=tmp_path, **{**TINY, "seeds": [0], "localise": False})
    payload = json.loads((tmp_path / "results.json").read_text())
    assert "pointing_game" not in payload["runs"][0]
    assert "Where the network looks" not in (tmp_path / "report.md").read_text()
    assert not list(tmp_path.glob("runs/*/*/" + loc.LOCALISATION_FILE))


def test_bad_cam_method_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown --cam-method 'gradcamm'"):
        run("none", out=tmp_path, **{**TINY, "cam_method": "gradcamm"})
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# attnzoo cam
def _valid_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes().startswith(PNG)
    with Image.open(path) as im:
        im.load()
        return im.size


def test_cam_cli_on_a_bench_folder_puts_attentions_side_by_side(bench, tmp_path, capsys) -> None:
    out, _ = bench
    code = main(
        ["cam", "--checkpoint", str(out), "--n", "4", "--seed", "1", "--out", str(tmp_path)]
    )
    assert code == 0
    printed = capsys.readouterr().out.split()
    names = sorted(Path(p).name for p in printed)
    assert names == ["cam_compare.png", "maps_cbam.png"]  # none: no spatial map to show
    for p in printed:
        _valid_png(Path(p))


def test_cam_cli_on_one_run_with_an_image_folder(bench, tmp_path, capsys) -> None:
    out, _ = bench
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        arr = (torch.rand(20, 24, 3) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"im{i}.png")
    (folder / "notes.txt").write_text("not an image")
    code = main(
        [
            "cam",
            "--checkpoint",
            str(out / "runs" / "cbam" / "seed0"),
            "--images",
            str(folder),
            "--method",
            "gradcam++",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert [Path(p).name for p in printed] == ["maps_cbam.png"]
    _valid_png(Path(printed[0]))


def test_cam_cli_errors(bench, tmp_path, capsys) -> None:
    out, _ = bench
    assert main(["cam", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "neither a bench run folder" in capsys.readouterr().err
    assert main(["cam", "--checkpoint", str(out), "--seed", "7", "--out", str(tmp_path / "o")]) == 2
    assert "no run of seed 7" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        main(
            ["cam", "--checkpoint", str(out), "--images", str(empty), "--out", str(tmp_path / "o")]
        )
        == 2
    )
    assert "holds no image file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --images and --data are exclusive
        main(["cam", "--checkpoint", str(out), "--images", "a", "--data", "digits"])
