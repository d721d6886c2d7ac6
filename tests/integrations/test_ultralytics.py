"""attnzoo in Ultralytics YOLO models: the AttnZoo YAML row at two width scales, attaching to a
model with pretrained weights, one offline training epoch per way, and reloading the trained
checkpoints in a fresh process. Any socket use fails the tests."""

from __future__ import annotations

import atexit
import copy
import json
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import attnzoo
from attnzoo.datasets import DetectionData, make_digit_scenes
from attnzoo.integrations import ultralytics as yz

# Ultralytics reads YOLO_OFFLINE / YOLO_CONFIG_DIR when it is first imported: set them before.
_CONFIG = Path(tempfile.mkdtemp(prefix="attnzoo-ultralytics-"))
atexit.register(shutil.rmtree, _CONFIG, ignore_errors=True)
yz.setup_offline(_CONFIG)
pytest.importorskip(
    "ultralytics", reason="needs the optional extra: pip install 'attnzoo[ultralytics]'"
)
from ultralytics import YOLO  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

# YOLOv8 with CBAM (reduction 8) after SPPF and ECA after the P3 output; the scale letter of the
# file name (yolov8n-..., yolov8s-...) picks the width. Head references shift by the new rows.
ATTN_YAML = """\
nc: 10
scales:
  n: [0.33, 0.25, 1024]
  s: [0.33, 0.50, 1024]
backbone:
  - [-1, 1, Conv, [64, 3, 2]] # 0
  - [-1, 1, Conv, [128, 3, 2]] # 1
  - [-1, 3, C2f, [128, True]] # 2
  - [-1, 1, Conv, [256, 3, 2]] # 3
  - [-1, 6, C2f, [256, True]] # 4
  - [-1, 1, Conv, [512, 3, 2]] # 5
  - [-1, 6, C2f, [512, True]] # 6
  - [-1, 1, Conv, [1024, 3, 2]] # 7
  - [-1, 3, C2f, [1024, True]] # 8
  - [-1, 1, SPPF, [1024, 5]] # 9
  - [-1, 1, AttnZoo, [cbam, {reduction: 8}]] # 10
head:
  - [-1, 1, nn.Upsample, [None, 2, "nearest"]] # 11
  - [[-1, 6], 1, Concat, [1]] # 12
  - [-1, 3, C2f, [512]] # 13
  - [-1, 1, nn.Upsample, [None, 2, "nearest"]] # 14
  - [[-1, 4], 1, Concat, [1]] # 15
  - [-1, 3, C2f, [256]] # 16
  - [-1, 1, AttnZoo, [eca]] # 17 (P3)
  - [-1, 1, Conv, [256, 3, 2]] # 18
  - [[-1, 13], 1, Concat, [1]] # 19
  - [-1, 3, C2f, [512]] # 20 (P4)
  - [-1, 1, Conv, [512, 3, 2]] # 21
  - [[-1, 10], 1, Concat, [1]] # 22
  - [-1, 3, C2f, [1024]] # 23 (P5)
  - [[17, 20, 23], 1, Detect, [nc]] # 24
"""
#: output widths of SPPF and of the P3 C2f in YOLOv8 (1024 and 256 times the width multiple)
WIDTHS = {"n": (256, 64), "s": (512, 128)}


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every socket connection or name lookup is recorded and refused (Ultralytics swallows
    some network errors, so the tests assert on the record, not on an exception)."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("attnzoo tests: network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture(scope="module")
def plain_n() -> DetectionModel:
    """YOLOv8n from Ultralytics' own YAML, 10 classes (build it once: tests must not change it)."""
    return DetectionModel("yolov8n.yaml", nc=10, verbose=False)


def _attn_yaml(folder: Path, scale: str) -> Path:
    path = folder / f"yolov8{scale}-attn.yaml"
    path.write_text(ATTN_YAML)
    return path


def test_register_is_idempotent_and_keeps_ultralytics_names() -> None:
    from ultralytics.nn import tasks

    assert yz.register() is yz.AttnZoo
    assert yz.register() is yz.AttnZoo
    assert tasks.AttnZoo is yz.AttnZoo
    with pytest.raises(ValueError, match="already names"):
        yz.register("C2f")  # Ultralytics' own layers stay untouched
    with pytest.raises(ValueError, match="identifier"):
        yz.register("nn.Attn")


def test_attnzoo_row_errors_name_the_choices(no_network: list) -> None:
    with pytest.raises(ValueError, match="Did you mean 'cbam'.*Available: .*eca"):
        yz.AttnZoo("cbma")
    with pytest.raises(TypeError, match="cbam takes no keyword argument ratio; it takes .*reduct"):
        yz.AttnZoo("cbam", {"ratio": 8})
    with pytest.raises(TypeError, match="mapping of keyword arguments"):
        yz.AttnZoo("cbam", [8])
    with pytest.raises(ValueError, match="preset must be one of"):
        yz.AttnZoo("cbam", {"preset": "yolov5"})
    yz.register()
    cfg = {"nc": 2, "backbone": [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "AttnZoo", ["se2"]]]}
    cfg["head"] = [[[1], 1, "Detect", ["nc"]]]
    with pytest.raises(ValueError, match="unknown attention 'se2'"):
        DetectionModel(cfg, verbose=False)
    assert no_network == []


def test_first_forward_in_training_mode_is_refused() -> None:
    layer = yz.AttnZoo("se", {"reduction": 4})
    with pytest.raises(RuntimeError, match="optimiser"):
        layer(torch.zeros(1, 8, 4, 4))
    layer.eval()
    out = layer(torch.randn(2, 8, 5, 3))
    assert out.shape == (2, 8, 5, 3) and layer.attn.fc1.in_features == 8
    assert yz.AttnZoo("eca", channels=32).attn.channels == 32


@pytest.mark.parametrize("scale", ["n", pytest.param("s", marks=pytest.mark.slow)])
def test_yaml_rows_fit_every_width_scale(
    tmp_path: Path, scale: str, plain_n: DetectionModel, no_network: list
) -> None:
    yz.register()
    model = DetectionModel(str(_attn_yaml(tmp_path, scale)), nc=10, verbose=False)
    plain = plain_n if scale == "n" else DetectionModel(f"yolov8{scale}.yaml", nc=10, verbose=False)
    sppf, p3 = WIDTHS[scale]
    assert model.model[10].attn.channel.fc1.in_features == sppf
    assert model.model[17].attn.channels == p3
    closed_form = attnzoo.info("cbam").count_params(sppf, reduction=8) + attnzoo.info(
        "eca"
    ).count_params(p3)
    assert _params(model) - _params(plain) == closed_form
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 96))
    boxes = out[0] if isinstance(out, (tuple, list)) else out
    assert boxes.shape[0] == 1 and torch.isfinite(boxes).all()
    assert no_network == []


def test_attach_keeps_every_pretrained_key(
    tmp_path: Path, plain_n: DetectionModel, no_network: list
) -> None:
    pretrained = copy.deepcopy(plain_n)
    torch.save({"model": pretrained, "train_args": {}}, tmp_path / "pretrained.pt")
    model = DetectionModel("yolov8n.yaml", nc=10, verbose=False)  # other random weights
    yz.attach_to_yolo(model, "cbam", at=[6, 8, -14], identity_init=True, reduction=8)
    new = yz.load_yolo_weights(model, tmp_path / "pretrained.pt")

    plain_keys = set(pretrained.state_dict())
    assert set(new) == set(model.state_dict()) - plain_keys
    assert {k.split(".attention_out.")[0] for k in new} == {"model.6", "model.8", "model.9"}
    state = model.state_dict()
    for key, value in pretrained.state_dict().items():
        assert torch.equal(state[key], value), key
    x = torch.rand(2, 3, 64, 64)
    pretrained.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], pretrained(x)[0], rtol=0, atol=0)
    assert no_network == []


def test_attach_refuses_conv_layers_and_bad_indices(plain_n: DetectionModel) -> None:
    model = plain_n
    with pytest.raises(ValueError, match="layer 7 is a Conv.*fuse"):
        yz.attach_to_yolo(model, "se", at=[7])
    with pytest.raises(ValueError, match="layer indices 0..22"):
        yz.attach_to_yolo(model, "se", at=[23])
    with pytest.raises(ValueError, match="unknown attention"):
        yz.attention_trainer("cbma", at=[6])
    assert attnzoo.attached(model) == []


def test_attention_trainer_is_an_ultralytics_detection_trainer() -> None:
    from ultralytics.models.yolo.detect import DetectionTrainer

    trainer = yz.attention_trainer("eca", at=9, identity_init=False, kernel_size=5)
    assert issubclass(trainer, yz.AttnZooDetectionTrainer)
    assert issubclass(yz.AttnZooDetectionTrainer, DetectionTrainer)
    assert (trainer.attnzoo_attention, trainer.attnzoo_at) == ("eca", (9,))
    assert (trainer.attnzoo_identity_init, trainer.attnzoo_kwargs) == (False, {"kernel_size": 5})
    with pytest.raises(ValueError, match="at= is empty"):
        yz.attention_trainer("eca", at=[])


def test_write_yolo_dataset(tmp_path: Path) -> None:
    image = np.zeros((40, 80, 3), np.uint8)
    boxes = np.array([[8.0, 4.0, 24.0, 36.0], [70.0, -2.0, 84.0, 10.0]], np.float32)
    data = DetectionData([image], [boxes], [np.array([1, 0])], ("cat", "dog"), ["a"])
    yaml_file = yz.write_yolo_dataset(data, data, tmp_path)
    assert (tmp_path / "images" / "val" / "a.png").is_file()
    lines = (tmp_path / "labels" / "train" / "a.txt").read_text().splitlines()
    # (8+24)/2/80 = 0.2, (4+36)/2/40 = 0.5, 16/80, 32/40; the second box clipped to (70,0,80,10)
    assert lines == [
        "1 0.200000 0.500000 0.200000 0.800000",
        "0 0.937500 0.125000 0.125000 0.250000",
    ]
    text = yaml_file.read_text()
    assert f'path: "{tmp_path.resolve()}"' in text and 'names: ["cat", "dog"]' in text
    other = DetectionData([image], [boxes], [np.array([1, 0])], ("cat", "cow"), ["a"])
    with pytest.raises(ValueError, match="same classes"):
        yz.write_yolo_dataset(data, other, tmp_path)


_RELOAD = """
import json, socket, sys, torch
attempts = []
def refuse(*args, **kwargs):
    attempts.append(args[:2])
    raise OSError("network")
socket.socket.connect = socket.create_connection = socket.getaddrinfo = refuse
from ultralytics import YOLO
out = {}
for name, path in json.loads(sys.argv[1]).items():
    model = YOLO(path)  # unpickles the model: imports attnzoo by the classes' module names
    calls = []
    for m in model.model.modules():
        if type(m).__name__ in ("AttnZoo", "IdentityInit"):
            m.register_forward_hook(lambda *a: calls.append(1))
    results = model.predict(sys.argv[2], imgsz=64, device="cpu", verbose=False)
    out[name] = {"calls": len(calls), "results": len(results)}
out["attnzoo_imported"] = "attnzoo" in sys.modules
out["attempts"] = attempts
print(json.dumps(out))
"""


@pytest.mark.slow
def test_train_one_epoch_offline_then_reload_in_a_fresh_process(
    tmp_path: Path, plain_n: DetectionModel, no_network: list
) -> None:
    yz.register()
    train, val = make_digit_scenes(32, 16, canvas=64, scales=(2, 3), objects=(1, 2), seed=1)
    data = yz.write_yolo_dataset(train, val, tmp_path / "digits")
    settings = dict(data=str(data), epochs=1, imgsz=64, batch=16, workers=0, device="cpu")
    settings.update(amp=False, plots=False, verbose=False, project=str(tmp_path / "runs"))

    # 1. the YAML way: AttnZoo rows, trained from scratch
    YOLO(str(_attn_yaml(tmp_path, "n"))).train(name="yaml", **settings)
    # 2. the attach way: an official YAML's "pretrained" checkpoint, trained with the trainer
    torch.save({"model": copy.deepcopy(plain_n), "train_args": {}}, tmp_path / "pretrained.pt")
    model = YOLO(str(tmp_path / "pretrained.pt"))
    trainer = yz.attention_trainer("cbam", at=[6, 8, 9], reduction=8)
    model.train(name="attach", trainer=trainer, **settings)
    # every pretrained tensor was loaded: the only new keys are the attention's
    attention = {k for k in model.trainer.model.state_dict() if ".attention_out." in k}
    assert attention and set(model.trainer.attnzoo_new_keys) == attention
    assert no_network == []

    weights = {w: str(tmp_path / "runs" / w / "weights" / "best.pt") for w in ("yaml", "attach")}
    image = tmp_path / "digits" / "images" / "val" / f"{val.names[0]}.png"
    done = subprocess.run(
        [sys.executable, "-c", _RELOAD, json.dumps(weights), str(image)],
        capture_output=True,
        text=True,
        timeout=300,
    )  # inherits YOLO_OFFLINE and YOLO_CONFIG_DIR from setup_offline
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["attnzoo_imported"] and report["attempts"] == []
    assert report["yaml"] == {"calls": 2, "results": 1}  # both AttnZoo rows ran after fuse()
    assert report["attach"] == {"calls": 3, "results": 1}


# ---------------------------------------------------------------------------------------------
# the detector of the detect bench
def test_yolo_detector_attends_to_every_detect_input(
    plain_n: DetectionModel, no_network: list
) -> None:
    model = yz.yolo_detector("yolov8n", 10, "cbam", reduction=8)
    assert isinstance(model, yz.UltralyticsDetector)
    assert sorted(a.path.split(".")[1] for a in attnzoo.attached(model.net)) == ["15", "18", "21"]
    widths = (64, 128, 256)  # the three neck outputs of YOLOv8n
    closed_form = sum(attnzoo.info("cbam").count_params(c, reduction=8) for c in widths)
    assert _params(model) - _params(plain_n) == closed_form
    assert model.net.args.box == 7.5  # Ultralytics' default gains for its criterion
    with pytest.raises(ValueError, match="no model YAML 'yolov99n.yaml'"):
        yz.yolo_detector("yolov99n", 10)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        yz.yolo_detector("yolov8n", 0)
    with pytest.raises(ValueError, match="attention options given without attention="):
        yz.yolo_detector("yolov8n", 10, reduction=8)
    assert no_network == []


def test_detector_loss_is_ultralytics_loss_per_image() -> None:
    model = yz.yolo_detector("yolov8n", 3).train()
    images = torch.rand(2, 3, 64, 96)
    targets = [
        {
            "boxes": torch.tensor([[8.0, 4.0, 40.0, 36.0], [50, 10, 90, 60]]),
            "labels": torch.tensor([2, 0]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    batch = yz._yolo_batch(images, targets)
    torch.testing.assert_close(
        batch["bboxes"],
        torch.tensor([[24 / 96, 20 / 64, 32 / 96, 32 / 64], [70 / 96, 35 / 64, 40 / 96, 50 / 64]]),
    )
    assert batch["batch_idx"].tolist() == [0, 0] and batch["cls"].view(-1).tolist() == [2, 0]
    torch.manual_seed(0)
    ours = model.loss(images, targets)
    torch.manual_seed(0)
    theirs, _ = model.net.loss(batch)
    torch.testing.assert_close(ours["loss"], theirs.sum() / 2)
    torch.testing.assert_close(torch.stack([ours[k] for k in ("box", "cls", "dfl")]), theirs / 2)
    ours["loss"].backward()  # one graph to every parameter
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_detector_predict_keeps_the_best_class_above_threshold_after_per_class_nms() -> None:
    model = yz.yolo_detector("yolov8n", 2).eval()
    # four anchors (cx, cy, w, h, score class 0, score class 1): 0 and 1 overlap in class 1,
    # 2 overlaps 1 in class 0 (kept: other class), 3 is under the threshold
    y = torch.tensor(
        [
            [20.0, 20, 10, 10, 0.1, 0.9],
            [21.0, 20, 10, 10, 0.2, 0.8],
            [21.0, 21, 10, 10, 0.7, 0.3],
            [60.0, 60, 10, 10, 0.05, 0.04],
        ]
    ).T[None]
    dets = model.predict(
        torch.zeros(1, 3, 64, 64), conf_threshold=0.06, nms_iou=0.5, output=(y, {})
    )
    assert dets[0]["labels"].tolist() == [1, 0]
    torch.testing.assert_close(dets[0]["scores"], torch.tensor([0.9, 0.7]))
    torch.testing.assert_close(
        dets[0]["boxes"], torch.tensor([[15.0, 15, 25, 25], [16.0, 16, 26, 26]])
    )
    with pytest.raises(RuntimeError, match=r"call \.eval\(\) first"):
        model.train().predict(torch.zeros(1, 3, 64, 64))


def test_detect_bench_trains_ultralytics_models_with_attention(
    tmp_path: Path, no_network: list
) -> None:
    """``attnzoo bench --task detect --model yolov8n --attention none,eca``: both arms train
    with Ultralytics' loss, are scored with the bench's mAP, and reload from their checkpoints."""
    from attnzoo.bench.checkpoints import load_run_model
    from attnzoo.bench.engine import BenchConfig
    from attnzoo.bench.run import run

    result = run(
        BenchConfig(
            "none,eca",
            task="detect",
            model="yolov8n",
            epochs=1,
            batch_size=8,
            n_train=16,
            n_test=8,
            image_size=64,
            seeds=(0,),
            out=tmp_path / "bench",
            localise=False,
            panel_images=2,
        )
    )
    runs = {r["attention"]: r for r in result.runs}
    assert set(runs) == {"none", "eca"}
    for r in runs.values():
        assert 0 <= r["map50"] <= 1 and {"train_box", "train_cls", "train_dfl"} <= set(r)
        assert r["test_n"] == 8
    model, _ = load_run_model(tmp_path / "bench" / "runs" / "eca" / "seed0")
    assert isinstance(model, yz.UltralyticsDetector) and attnzoo.attached(model.net)
    assert (tmp_path / "bench" / "report.html").is_file()
    assert no_network == []
