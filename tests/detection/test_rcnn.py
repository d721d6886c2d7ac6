"""Faster / Cascade R-CNN builders on attention backbones (attnzoo.detection.rcnn)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import resnet50 as tv_resnet50
from torchvision.ops.misc import FrozenBatchNorm2d

from attnzoo.detection import (
    CascadeRoIHeads,
    cascade_rcnn_resnet50_fpn,
    cascade_rcnn_small,
    faster_rcnn_resnet50_fpn,
    faster_rcnn_small,
    load_faster_rcnn_weights,
)
from attnzoo.detection.rcnn import SMALL_WIDTHS, KeepSizeTransform
from attnzoo.models import attached


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=gen), torch.rand(3, 64, 96, generator=gen)]
    targets = [
        {"boxes": torch.tensor([[8.0, 10.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # no object
    ]
    return images, targets


@pytest.mark.parametrize("builder", [faster_rcnn_small, cascade_rcnn_small])
def test_small_builders_train_and_detect(builder) -> None:
    torch.manual_seed(0)
    model = builder(3)
    images, targets = _batch()
    losses = model.train()(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} == set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.body.conv1.weight.grad is not None
    with torch.no_grad():
        out = model.eval()(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    # images keep their size (no resize): boxes lie inside each image
    assert isinstance(model.transform, KeepSizeTransform)
    for det, img in zip(out, images):
        if len(det["boxes"]):
            assert float(det["boxes"][:, 2].max()) <= img.shape[-1]
            assert float(det["boxes"][:, 3].max()) <= img.shape[-2]
        assert det["labels"].min() >= 1 if len(det["labels"]) else True
    assert isinstance(model.roi_heads, CascadeRoIHeads) == (builder is cascade_rcnn_small)


def test_attention_goes_into_every_block_with_its_closed_form_parameters() -> None:
    plain, se = faster_rcnn_small(2), faster_rcnn_small(2, "se", reduction=8)
    paths = [a.path for a in attached(se.backbone.body)]
    assert paths == [f"layer{i}.0.attention" for i in range(1, 5)]
    # SE(C, r=8): fc1 C -> C/8 and fc2 C/8 -> C, with biases
    want = sum(2 * c * (c // 8) + c // 8 + c for c in SMALL_WIDTHS)
    assert _params(se) - _params(plain) == want
    assert attached(plain.backbone.body) == []


def test_keywords_are_routed_to_the_detector_the_cascade_and_the_attention() -> None:
    m = cascade_rcnn_small(
        2, "se", stage_iou_thresholds=(0.5, 0.7), box_score_thresh=0.2, rpn_post_nms_top_n_test=9
    )
    assert m.roi_heads.num_stages == 2 and len(m.roi_heads.box_heads) == 2
    assert m.roi_heads.stage_iou_thresholds == (0.5, 0.7) and m.roi_heads.score_thresh == 0.2
    assert m.rpn._post_nms_top_n["testing"] == 9
    assert m.backbone.body.layer1[0].attention.fc1.out_features == SMALL_WIDTHS[0] // 16
    integral = cascade_rcnn_small(2, mode="integral")
    assert (len(integral.roi_heads.box_heads), len(integral.roi_heads.box_predictors)) == (1, 3)
    iterative = cascade_rcnn_small(2, mode="iterative")
    assert (len(iterative.roi_heads.box_heads), len(iterative.roi_heads.box_predictors)) == (1, 1)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: faster_rcnn_small(1), ValueError, r"faster_rcnn_small: num_classes .* >= 2"),
        (lambda: faster_rcnn_small(2, mode="integral"), ValueError, "Cascade R-CNN options"),
        (lambda: cascade_rcnn_small(2, reduction=4), ValueError, "unknown keyword.*reduction"),
        (
            lambda: faster_rcnn_resnet50_fpn(3, weights_backbone=3),
            TypeError,
            "weights_backbone must be a state dict or a local file",
        ),
        (
            lambda: faster_rcnn_resnet50_fpn(3, trainable_backbone_layers=6),
            ValueError,
            r"trainable_backbone_layers must be in \[0, 5\]",
        ),
    ],
)
def test_bad_arguments_are_named(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


def test_resnet50_builders_load_local_backbone_weights_and_freeze_as_torchvision(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    state = tv_resnet50().state_dict()
    torch.save(state, tmp_path / "r50.pth")
    model = cascade_rcnn_resnet50_fpn(3, "se", weights_backbone=tmp_path / "r50.pth")
    body = model.backbone.body
    assert torch.equal(body.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    # 3 trainable stages by default with weights (layer2-4); the new attention always trains
    assert not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad
    assert body.layer1[0].attention.fc1.weight.requires_grad
    assert len(model.roi_heads.box_heads) == 3
    assert model.roi_heads.box_heads[0].fc7.out_features == 1024
    scratch = faster_rcnn_resnet50_fpn(3)  # no weights: plain BatchNorm, every stage trains
    assert isinstance(scratch.backbone.body.bn1, torch.nn.BatchNorm2d)
    assert all(p.requires_grad for p in scratch.backbone.parameters())


def test_faster_rcnn_weights_load_into_the_cascades_shared_parts() -> None:
    torch.manual_seed(0)
    faster, cascade = faster_rcnn_small(2, "se"), cascade_rcnn_small(2, "se")
    report = load_faster_rcnn_weights(cascade, faster.state_dict())
    got = cascade.state_dict()
    for key in (
        "backbone.body.layer2.0.conv1.weight",
        "backbone.fpn.layer_blocks.0.0.weight",
        "rpn.head.conv.0.0.weight",
        "backbone.body.layer1.0.attention.fc1.weight",
    ):
        assert torch.equal(got[key], faster.state_dict()[key]) and key in report.mapped
    assert torch.equal(
        got["roi_heads.box_heads.0.fc6.weight"],
        faster.state_dict()["roi_heads.box_head.fc6.weight"],
    )
    # new: the later stages; skipped: the class-specific regressor (8 outputs vs agnostic 4)
    assert any(k.startswith("roi_heads.box_heads.2.") for k in report.missing)
    assert [m[0] for m in report.mismatched] == [
        "roi_heads.box_predictors.0.bbox_pred.weight",
        "roi_heads.box_predictors.0.bbox_pred.bias",
    ]


@pytest.mark.slow
def test_cascade_overfits_a_handful_of_scenes() -> None:
    from attnzoo.bench.tasks.detect import load_detection_data
    from attnzoo.bench.tasks.detect_rcnn import build_rcnn_optimizer, rcnn_predict, rcnn_targets
    from attnzoo.datasets import collate_detection
    from attnzoo.detection.metrics import VOCMeanAP

    data = load_detection_data("scenes:digit", image_size=64, n_train=4, n_test=1)
    images, targets = collate_detection([data.train[i] for i in range(4)])
    torch.manual_seed(0)
    model = cascade_rcnn_small(2)
    steps = 40  # train AP50 0.83 here (0.46 after 20 steps)
    opt, sched = build_rcnn_optimizer(model, 0.02, 1e-4, steps)
    for _ in range(steps):
        loss = sum(model.train()(list(images), rcnn_targets(targets)).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        dets, _ = rcnn_predict(model.eval(), images)
    metric = VOCMeanAP(1)
    metric.update(dets, targets)
    assert metric.compute()["map50"] >= 0.5
