"""attnzoo.bench.run / ``attnzoo bench``: validation before training, outputs, resume after kill."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import attnzoo
from attnzoo.bench.run import run
from attnzoo.cli import main
from attnzoo.specs import parse_attentions

TINY = dict(
    epochs=1, seeds=[0, 1], batch_size=32, n_train=96, n_test=37, progress=False, profile=True
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny convolutions are fastest on one thread, and a shared CI machine is not slowed down
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory, _one_thread):
    out = tmp_path_factory.mktemp("bench")
    result = run("none,se", out=out, **TINY)
    return out, result


def test_parse_attentions_with_kwargs() -> None:
    specs = parse_attentions("none, se ,cbam:reduction=8,kernel_size=3,eca:kernel_size=5")
    assert [s.name for s in specs] == ["none", "se", "cbam", "eca"]
    assert dict(specs[2].kwargs) == {"reduction": 8, "kernel_size": 3}
    assert specs[2].label == "cbam:kernel_size=3,reduction=8"
    assert dict(specs[3].kwargs) == {"kernel_size": 5}
    with pytest.raises(ValueError, match="more than once"):
        parse_attentions("se,se")


# ---------------------------------------------------------------------------------------------
# errors before any training
def _no_runs(out: Path) -> bool:
    return not (out / "runs").exists()


def test_unknown_attention_lists_available(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown attention 'sse'.*Available: none.*cbam"):
        run("none,sse", out=tmp_path, **TINY)
    assert _no_runs(tmp_path)


def test_kwargs_a_module_does_not_take(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"takes no argument 'ratio'.*reduction"):
        run("none,cbam:ratio=8", out=tmp_path, **TINY)
    assert _no_runs(tmp_path)


def test_bad_kwarg_value_is_reported_with_the_module(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot build cifar_resnet8 with se:reduction=0"):
        run("none,se:reduction=0", out=tmp_path, **TINY)
    assert _no_runs(tmp_path)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"epochs": 0}, "--epochs must be an integer >= 1"),
        ({"batch_size": -1}, "--batch-size"),
        ({"seeds": []}, "--seeds is empty"),
        ({"seeds": [1, 1]}, "duplicates"),
        ({"lr": 0.0}, "--lr"),
        ({"model": "resnet9000"}, "unknown --model 'resnet9000'.*cifar_resnet8"),
        ({"data": "cifar10"}, "needs the folder"),
    ],
)
def test_bad_numbers_and_names(tmp_path: Path, kwargs, match) -> None:
    args = {**TINY, **kwargs}
    with pytest.raises(ValueError, match=match):
        run("none,se", out=tmp_path, **args)
    assert _no_runs(tmp_path)


def test_missing_data_folder_and_unwritable_out(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        run("none", out=tmp_path / "o", data=str(tmp_path / "missing"), **TINY)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable|not a folder"):
        run("none", out=blocker / "sub", **TINY)


def test_cli_reports_errors_with_exit_code_2(tmp_path: Path, capsys) -> None:
    code = main(["bench", "--attention", "none,nope", "--out", str(tmp_path), "--no-progress"])
    assert code == 2
    assert "unknown attention 'nope'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# outputs
def test_results_json_csv_and_report(tiny_bench) -> None:
    out, _ = tiny_bench
    payload = json.loads((out / "results.json").read_text())
    assert payload["complete"] is True
    assert [(r["attention"], r["seed"]) for r in payload["runs"]] == [
        ("none", 0),
        ("none", 1),
        ("se", 0),
        ("se", 1),
    ]
    for r in payload["runs"]:
        assert r["test_n"] == 37  # the whole test set
        assert len(r["history"]) == 1
        assert 0.0 <= r["test_acc"] <= 1.0
    summ = {s["attention"]: s for s in payload["summary"]}
    accs = [r["test_acc"] for r in payload["runs"] if r["attention"] == "se"]
    assert summ["se"]["test_acc"] == pytest.approx(sum(accs) / 2)
    base = {r["seed"]: r["test_acc"] for r in payload["runs"] if r["attention"] == "none"}
    se = {r["seed"]: r["test_acc"] for r in payload["runs"] if r["attention"] == "se"}
    assert summ["se"]["diff_vs_none"] == pytest.approx((se[0] - base[0] + se[1] - base[1]) / 2)
    assert summ["se"]["diff_low"] <= summ["se"]["diff_vs_none"] <= summ["se"]["diff_high"]
    assert summ["se"]["params"] > summ["none"]["params"] > 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["row"] for r in rows] == ["run"] * 4 + ["summary"] * 2
    md = (out / "report.md").read_text()
    assert "Δ vs none" in md and "attnzoo.bench.run" in md and "torch" in md
    for name in ("accuracy", "acc_vs_params", "acc_vs_latency", "curves", "samples"):
        png = (out / "figures" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
    html = (out / "report.html").read_text()
    # 7 standard figures (forest, confusion, accuracy, 2 trade-offs, curves, samples) + the
    # Grad-CAM comparison (neither none nor se has a spatial map panel)
    assert html.count("data:image/png;base64,") == 7 + 1
    assert 'src="http' not in html and "href=" not in html  # self-contained


def test_checkpoints_load_with_weights_only(tiny_bench) -> None:
    out, _ = tiny_bench
    ckpt = torch.load(out / "runs" / "se" / "seed0" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 0 and "state_dict" in ckpt and len(ckpt["bench_history"]) == 1
    assert any(".attention." in k for k in ckpt["state_dict"])


def test_rerun_skips_finished_runs_and_refuses_other_settings(tiny_bench) -> None:
    out, first = tiny_bench
    again = run("none,se", out=out, **{**TINY, "profile": False, "report": False})
    assert sorted(again.skipped) == ["none/seed0", "none/seed1", "se/seed0", "se/seed1"]
    assert [r["test_acc"] for r in again.runs] == [r["test_acc"] for r in first.runs]
    with pytest.raises(ValueError, match=r"other settings.*lr"):
        run("none,se", out=out, **{**TINY, "lr": 0.05})


def test_same_seed_same_data_order_across_attentions(tiny_bench) -> None:
    # the baseline's initial weights differ from SE's (more modules), but the batches must not:
    # both use SeededSampler(seed) -> identical permutations per epoch
    from attnzoo.bench.data import SeededSampler

    a, b = SeededSampler(96, seed=1), SeededSampler(96, seed=1)
    assert list(a) == list(b)


# ---------------------------------------------------------------------------------------------
# resume after SIGKILL
def _cli(out: Path, epochs: int = 4) -> list[str]:
    return [
        sys.executable,
        "-m",
        "attnzoo.cli",
        "bench",
        "--attention",
        "none,eca",
        "--seeds",
        "1",
        "--epochs",
        str(epochs),
        "--batch-size",
        "32",
        "--n-train",
        "160",
        "--n-test",
        "41",
        "--out",
        str(out),
        "--no-progress",
        "--no-profile",
        "--threads",
        "1",
    ]


def _strip_times(runs: list[dict]) -> list[dict]:
    keep = []
    for r in runs:
        r = {k: v for k, v in r.items() if k not in ("train_seconds", "resumed_from_epoch")}
        r["history"] = [{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]]
        keep.append(r)
    return keep


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(_cli(ref_out), check=True, env=env, capture_output=True, timeout=600)

    proc = subprocess.Popen(
        _cli(cut_out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = cut_out / "runs" / "eca" / "seed0" / "last.ckpt"
    deadline = time.monotonic() + 600
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the bench ended before it could be killed"
    assert (cut_out / "runs" / "none" / "seed0" / "result.json").is_file()
    assert not (cut_out / "runs" / "eca" / "seed0" / "result.json").exists()
    killed_epoch = torch.load(ckpt, weights_only=True)["epoch"]
    assert 0 <= killed_epoch < 3
    none_result = (cut_out / "runs" / "none" / "seed0" / "result.json").read_text()

    done = subprocess.run(
        _cli(cut_out), check=True, env=env, capture_output=True, text=True, timeout=600
    )
    assert "1 finished runs reused" in done.stderr  # stdout holds the results table only
    assert (cut_out / "runs" / "none" / "seed0" / "result.json").read_text() == none_result
    ref = json.loads((ref_out / "results.json").read_text())
    cut = json.loads((cut_out / "results.json").read_text())
    resumed = {r["attention"]: r["resumed_from_epoch"] for r in cut["runs"]}
    assert resumed["eca"] >= 1
    assert _strip_times(cut["runs"]) == _strip_times(ref["runs"])
    assert [s["test_acc"] for s in cut["summary"]] == [s["test_acc"] for s in ref["summary"]]
    assert attnzoo.info("eca")  # the module under test really is the registry's


def test_load_run_model_gives_the_trained_network(tiny_bench) -> None:
    from attnzoo.bench.checkpoints import load_run_model
    from attnzoo.bench.data import load_data
    from attnzoo.bench.tasks.classify import evaluate

    out, result = tiny_bench
    model, cfg = load_run_model(out / "runs" / "se" / "seed1")
    assert cfg["attention"] == "se" and cfg["seed"] == 1 and not model.training
    data = load_data("digits", n_train=96, n_test=37)
    correct, total = evaluate(model, data.test)
    acc = next(r["test_acc"] for r in result.runs if r["attention"] == "se" and r["seed"] == 1)
    assert correct == round(acc * total)
    with pytest.raises(ValueError, match="not a bench run folder"):
        load_run_model(out)
