"""``attnzoo bench --task detect``: the YOLOv4-tiny plug-in end to end, its schedule, optimiser,
models, data options and errors, resume after an interruption, and an overfit check."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from attnzoo.bench.run import run
from attnzoo.bench.tasks import detect
from attnzoo.bench.tasks.detect import (
    DetectConfig,
    WarmCosine,
    build_detect_optimizer,
    load_detection_data,
    yolov4_tiny,
)
from attnzoo.detection import YoloV4Tiny

pytest.importorskip("lightning")

TINY = dict(
    task="detect",
    data="scenes",
    attention="none,se",
    epochs=2,
    seeds=[0, 1],
    batch_size=4,
    n_train=8,
    n_test=4,
    image_size=64,
    progress=False,
    profile=False,
    panel_images=2,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory, _one_thread):
    out = tmp_path_factory.mktemp("detect")
    return out, run(out=out, **TINY)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------------------------------------
# schedule and optimiser
@pytest.mark.parametrize("total", [*range(1, 13), 17, 100, 1000])
def test_warm_cosine_is_defined_for_every_step_count(total: int) -> None:
    shape = WarmCosine(total, warmup=total, flat=total, min_ratio=0.01, warmup_ratio=0.1)
    values = [shape(i) for i in range(total)]
    assert all(math.isfinite(v) and 0.01 - 1e-12 <= v <= 1 + 1e-12 for v in values)
    after = values[shape.warmup :]
    assert all(a >= b - 1e-12 for a, b in zip(after, after[1:]))  # no rise after the warm-up
    assert shape.warmup + shape.flat < total or total < 3


def test_warm_cosine_follows_the_reference_shape() -> None:
    # 20 epochs of 10 steps: warm-up 1 epoch (0.05 E = 1), 1 flat epoch at the minimum
    shape = WarmCosine.for_epochs(20, 10, min_ratio=0.01, warmup_ratio=0.1)
    assert (shape.warmup, shape.flat) == (10, 10)
    assert shape(0) == pytest.approx(0.1)
    assert shape(5) == pytest.approx(0.1 + 0.9 * 0.25)  # quadratic: (5/10)^2
    assert shape(10) == pytest.approx(1.0)
    assert shape(10 + 90) == pytest.approx(0.01 + 0.99 * 0.5)  # half-way through the cosine
    assert shape(190) == shape(199) == pytest.approx(0.01)
    long = WarmCosine.for_epochs(300, 1)  # the reference's 300 epochs: 3 warm-up, 15 flat
    assert (long.warmup, long.flat) == (3, 15)


def test_optimizer_is_the_reference_sgd() -> None:
    model = YoloV4Tiny(3, phi=2)
    cfg = DetectConfig(epochs=2, lr=0.02)
    opt, sched = build_detect_optimizer(model, cfg, 5)
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.937
    decay, rest = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and rest["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim > 1 for p in decay["params"])
    assert all(p.ndim <= 1 for p in rest["params"])
    assert any(names[id(p)].endswith("bn.weight") for p in rest["params"])
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * 0.1)  # warm-up start
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)


# ---------------------------------------------------------------------------------------------
# models
@torch.no_grad()
def test_scratch_init_is_the_references() -> None:
    model = yolov4_tiny("cbam", num_classes=3)
    head = model.head_p4[1]
    assert abs(float(head.weight.std()) - 0.02) < 0.002
    bn = model.backbone.stem1.bn
    assert abs(float(bn.weight.mean()) - 1) < 0.01 and float(bn.bias.abs().max()) == 0
    gate = [m for m in model.feat1_att.modules() if isinstance(m, nn.Conv2d)]
    assert gate and all(abs(float(m.weight.std()) - 0.02) < 0.01 for m in gate)


def test_builder_gives_the_reference_phi_variants() -> None:
    for name, phi in (("se", 1), ("cbam", 2), ("eca", 3), ("ca", 4)):
        assert _params(yolov4_tiny(name, num_classes=5)) == _params(YoloV4Tiny(5, phi=phi))
    assert _params(yolov4_tiny(None, num_classes=5)) == _params(YoloV4Tiny(5))
    # keywords override the preset: the reference's CBAM (reduction 8) with reduction 4
    r4 = yolov4_tiny("cbam", num_classes=5, reduction=4)
    assert _params(r4) == _params(YoloV4Tiny(5, phi=2, reduction=4)) > _params(YoloV4Tiny(5, phi=2))
    # any other registry module goes to the same three places
    gc = yolov4_tiny("gc", num_classes=5)
    assert type(gc.feat1_att).__name__ != "Identity"
    assert {type(gc.feat1_att), type(gc.feat2_att), type(gc.upsample_att)} == {type(gc.feat1_att)}


# ---------------------------------------------------------------------------------------------
# errors before any training
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(data="pictures"), "unknown --data 'pictures'"),
        (dict(data="voc:/no/such/folder"), "not a VOC-layout folder"),
        (dict(data="voc:"), "voc needs a folder"),
        (dict(data="coco:/no/such.json:/tmp"), "annotation file"),
        (dict(data="coco:/only.json"), "coco needs an annotation file and an image folder"),
        (dict(data="scenes:/x"), "scenes takes no path"),
        (dict(model="resnet18"), "unknown --model 'resnet18'; detection models: yolov4_tiny"),
        (dict(attention="none,cbam:bogus=1"), "takes no argument 'bogus'"),
        (dict(attention="none,nosuch"), "unknown attention 'nosuch'"),
        (dict(image_size=100), "multiple of 32"),
        (dict(options={"eval_every": 0}), "eval_every must be an integer >= 1"),
        (dict(options={"nms": 0.3}), "takes no option 'nms'"),
    ],
)
def test_bad_options_are_clear_errors(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {**TINY, **kwargs}
    with pytest.raises(ValueError, match=match):
        run(out=tmp_path / "out", **args)
    assert not (tmp_path / "out" / "runs").exists()  # nothing trained


def test_coco_without_image_folder(tmp_path: Path) -> None:
    ann = tmp_path / "a.json"
    ann.write_text("{}")
    with pytest.raises(ValueError, match="image folder .* does not exist"):
        run(out=tmp_path / "out", **{**TINY, "data": f"coco:{ann}:{tmp_path / 'nope'}"})


def test_one_class_scenes() -> None:
    ten = load_detection_data("scenes", image_size=64, n_train=6, n_test=2, seed=4)
    one = load_detection_data("scenes:digit", image_size=64, n_train=6, n_test=2, seed=4)
    assert one.classes == ["digit"] and len(ten.classes) == 10
    for a, b in zip(ten.train.data.boxes, one.train.data.boxes):
        assert (a == b).all()  # the same scenes, only the labels merged
    assert all((lab == 0).all() for lab in one.train.data.labels + one.test.data.labels)
    assert any((lab > 0).any() for lab in ten.train.data.labels)


def test_voc_and_coco_folders_load(tmp_path: Path) -> None:
    from attnzoo.datasets import make_digit_scenes, write_coco, write_voc

    train, _ = make_digit_scenes(10, 1, canvas=64, seed=3)
    voc_root = write_voc(train, tmp_path / "voc", split="all")
    data = load_detection_data(f"voc:{voc_root}:all", image_size=96, seed=0)
    assert (len(data.train), len(data.test)) == (7, 3)  # 30 % held out
    image, target = data.train[0]
    assert image.shape == (3, 96, 96) and target["boxes"].shape[1] == 4
    assert data.classes == sorted(data.classes)
    ann = write_coco(train, tmp_path / "coco")
    coco = load_detection_data(
        f"coco:{ann}:{tmp_path / 'coco' / 'images'}", image_size=64, n_train=5, seed=0
    )
    assert (len(coco.train), len(coco.test)) == (5, 3)


# ---------------------------------------------------------------------------------------------
# a tiny bench end to end
def test_tiny_detect_bench_writes_results_and_report(tiny_bench) -> None:
    out, result = tiny_bench
    payload = json.loads((out / "results.json").read_text())
    assert payload["complete"] and payload["task"] == "detect" and payload["metric"] == "map50"
    runs = payload["runs"]
    assert {(r["attention"], r["seed"]) for r in runs} == {
        (a, s) for a in ("none", "se") for s in (0, 1)
    }
    for r in runs:
        assert 0.0 <= r["map50"] <= 1.0 and 0.0 <= r["map"] <= 1.0
        assert r["test_n"] == 4 and len(r["per_class_ap50"]) == 10
        assert [h["epoch"] for h in r["history"]] == [1, 2]
        assert all(k in r["history"][-1] for k in ("train_box", "train_obj", "train_cls"))
    se = next(s for s in payload["summary"] if s["attention"] == "se")
    assert se["diff_seeds"] == [0, 1] and se["diff_low"] <= se["diff_vs_baseline"]
    pairs = {(r["attention"], r["seed"]): r["map50"] for r in runs}
    assert se["diff_vs_baseline"] == pytest.approx(
        sum(pairs[("se", s)] - pairs[("none", s)] for s in (0, 1)) / 2
    )
    md = (out / "report.md").read_text()
    assert "mAP50 %" in md and "Per-class AP50" in md and "figures/detections.png" in md
    assert (out / "figures" / "detections.png").stat().st_size > 1000
    assert "figures/detections.png" not in (out / "report.html").read_text()  # inlined
    cfg = json.loads((out / "runs" / "se" / "seed0" / "config.json").read_text())
    assert cfg["task"] == "detect" and cfg["momentum"] == 0.937


def test_eval_every_skips_evaluations_but_not_the_last() -> None:
    cfg = DetectConfig(epochs=7, eval_every=3)
    assert [e for e in range(1, 8) if detect.is_eval_epoch(e, cfg)] == [3, 6, 7]


def test_resume_after_an_interruption_gives_identical_results(
    tiny_bench, tmp_path: Path, monkeypatch
) -> None:
    out, _ = tiny_bench
    cls = detect._module_class()
    original = cls.training_step

    class Killed(Exception):
        pass

    def dies_in_epoch_two(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise Killed
        return original(self, batch, batch_idx)

    cut = tmp_path / "cut"
    args = {**TINY, "attention": "se", "seeds": [1], "panel_images": 0}
    monkeypatch.setattr(cls, "training_step", dies_in_epoch_two)
    with pytest.raises(Killed):
        run(out=cut, **args)
    run_dir = cut / "runs" / "se" / "seed1"
    assert (run_dir / "last.ckpt").is_file() and not (run_dir / "result.json").exists()
    monkeypatch.setattr(cls, "training_step", original)
    run(out=cut, **args)

    def strip(r: dict) -> dict:
        r = {k: v for k, v in r.items() if k not in ("train_seconds", "resumed_from_epoch")}
        r["history"] = [{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]]
        return r

    resumed = json.loads((run_dir / "result.json").read_text())
    reference = json.loads((out / "runs" / "se" / "seed1" / "result.json").read_text())
    assert resumed["resumed_from_epoch"] == 1
    assert strip(resumed) == strip(reference)


# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_overfits_a_handful_of_images() -> None:
    """100 steps on 8 scenes through the task's module and builder (the reference's scratch
    initialisation): the loss falls several-fold and the mAP50 on those same images reaches 0.5."""
    import lightning.pytorch as pl

    from attnzoo.bench.tasks.detect import DetectionSplits, build_detect_module, detect_loaders
    from attnzoo.datasets import DetectionDataset, make_digit_scenes

    pl.seed_everything(0, verbose=False)
    train, _ = make_digit_scenes(8, 1, canvas=64, objects=(1, 2), clutter=0, seed=1)
    ds = DetectionDataset(train, 64)
    splits = DetectionSplits(
        name="overfit",
        description="",
        classes=list(train.classes),
        train=ds,
        test=ds,
        image_size=64,
    )
    cfg = DetectConfig(epochs=100, batch_size=8, lr=0.02, eval_every=100)
    module = build_detect_module(yolov4_tiny(None, num_classes=10), 10, cfg)
    train_loader, test_loader = detect_loaders(splits, cfg, seed=0)
    trainer = pl.Trainer(
        max_epochs=cfg.epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_loader, test_loader)
    first, last = module.history[0], module.history[-1]
    assert last["train_loss"] < first["train_loss"] / 4
    assert last["map50"] >= 0.5
