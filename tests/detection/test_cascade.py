"""Cascade R-CNN heads: parity with torchvision's RoIHeads, per-stage semantics, modes, loader."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign, box_iou

from attnzoo.detection import (
    CascadeRoIHeads,
    cascade_box_heads,
    load_faster_rcnn_weights,
    rescale_stage_detections,
)

NUM_CLASSES = 3  # with background
SHAPES = [(64, 64), (64, 64)]
WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
IOUS = (0.5, 0.6, 0.7)


def _gt() -> list[dict[str, torch.Tensor]]:
    return [
        {
            "boxes": torch.tensor([[4.0, 6.0, 30.0, 34.0], [30.0, 20.0, 60.0, 44.0]]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.tensor([[10.0, 12.0, 50.0, 40.0]]), "labels": torch.tensor([2])},
    ]


def _proposals(
    targets, n_jitter: int = 24, n_random: int = 12, seed: int = 0, dtype=torch.float32
) -> list[torch.Tensor]:
    """Jittered ground truth (IoUs spread over 0.3-1) plus random boxes, per image."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in targets:
        gt = t["boxes"].double()
        base = gt[torch.randint(len(gt), (n_jitter,), generator=g)]
        wh = (base[:, 2:] - base[:, :2]).repeat(1, 2)
        jitter = base + wh * (torch.rand(n_jitter, 4, generator=g, dtype=torch.float64) - 0.5) * 0.5
        xy = torch.rand(n_random, 2, generator=g, dtype=torch.float64) * 40
        rand = torch.cat(
            [xy, xy + 8 + torch.rand(n_random, 2, generator=g, dtype=torch.float64) * 16], 1
        )
        out.append(torch.cat([jitter, rand]).clamp(0, 64).to(dtype))
    return out


def _features(dtype=torch.float32, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        name: torch.randn(2, 4, s, s, generator=g, dtype=dtype).requires_grad_(requires_grad)
        for name, s in (("0", 16), ("1", 8))
    }


def _pool() -> MultiScaleRoIAlign:
    return MultiScaleRoIAlign(["0", "1"], output_size=4, sampling_ratio=2)


def _cascade(num_stages: int = 3, dtype=torch.float32, **kw) -> CascadeRoIHeads:
    """Heads of 16 features on 4x4 pools; one head (and predictor) where the mode shares it."""
    torch.manual_seed(0)
    heads, preds = cascade_box_heads(
        4, 4, 16, NUM_CLASSES, num_stages=num_stages, class_agnostic=kw.get("class_agnostic", True)
    )
    mode = kw.get("mode", "cascade")
    if mode != "cascade":
        heads = heads[:1]
    if mode == "iterative":
        preds = preds[:1]
    kw.setdefault("batch_size_per_image", 32)
    cascade = CascadeRoIHeads(_pool(), heads, preds, **kw)
    return cascade.to(dtype)


class _RecordingPool(nn.Module):
    """Wraps a RoI pool and records the boxes of every call."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool, self.calls = pool, []

    def forward(self, features, boxes, image_shapes):
        self.calls.append([b.detach().clone() for b in boxes])
        return self.pool(features, boxes, image_shapes)


def _record_logits(cascade: CascadeRoIHeads) -> list[tuple[torch.Tensor, torch.Tensor]]:
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for p in cascade.box_predictors:
        p.register_forward_hook(lambda m, i, o: outputs.append((o[0].detach(), o[1].detach())))
    return outputs


def _capture_samples(cascade: CascadeRoIHeads) -> list:
    """Record ``(stage, input box counts, StageSamples)`` of every training stage."""
    seen = []
    original = cascade._samples

    def wrapped(stage, proposals, *args, **kw):
        s = original(stage, proposals, *args, **kw)
        seen.append((stage, [len(p) for p in proposals], s))
        return s

    cascade._samples = wrapped
    return seen


# ------------------------------------------------------------------ parity with torchvision
def test_one_stage_equals_torchvision_roi_heads():
    pool, targets = _pool(), _gt()
    torch.manual_seed(0)
    head, pred = TwoMLPHead(4 * 16, 16), FastRCNNPredictor(16, NUM_CLASSES)
    tv = RoIHeads(pool, head, pred, 0.5, 0.5, 32, 0.25, None, 0.05, 0.5, 100)
    ours = CascadeRoIHeads(
        pool,
        [head],
        [pred],
        stage_iou_thresholds=(0.5,),
        stage_bbox_reg_weights=((10.0, 10.0, 5.0, 5.0),),
        stage_loss_weights=(1.0,),
        class_agnostic=False,
        batch_size_per_image=32,
        positive_fraction=0.25,
        box_loss_beta=1 / 9,
    )
    feats, props = _features(), _proposals(targets)
    grads = []
    for model in (tv, ours):
        model.train()
        head.zero_grad()
        torch.manual_seed(5)
        _, losses = model(feats, [p.clone() for p in props], SHAPES, targets)
        sum(losses.values()).backward()
        grads.append((losses, head.fc6.weight.grad.clone()))
    (l_tv, g_tv), (l_ours, g_ours) = grads
    assert l_tv.keys() == l_ours.keys() == {"loss_classifier", "loss_box_reg"}
    assert l_ours["loss_box_reg"] > 0
    for k in l_tv:
        torch.testing.assert_close(l_ours[k], l_tv[k], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_ours, g_tv, rtol=1e-5, atol=1e-8)
    tv.eval(), ours.eval()
    with torch.no_grad():
        d_tv, _ = tv(feats, props, SHAPES)
        d_ours, _ = ours(feats, props, SHAPES)
    assert sum(len(d["boxes"]) for d in d_tv) > 10
    for a, b in zip(d_tv, d_ours):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ training semantics
@pytest.mark.parametrize("convention", ["mmdet", "detectron2"])
def test_stage_positives_reach_their_iou_threshold(convention):
    cascade = _cascade(convention=convention)
    seen = _capture_samples(cascade)
    targets = _gt()
    cascade.train()
    torch.manual_seed(0)
    cascade(_features(), _proposals(targets), SHAPES, targets)
    assert [t for t, _, _ in seen] == [0, 1, 2]
    for t, _, s in seen:
        for props, labels, tg in zip(s.proposals, s.labels, targets):
            iou, idx = box_iou(props, tg["boxes"]).max(dim=1)
            pos = labels > 0
            assert pos.any()
            assert (iou[pos] >= IOUS[t]).all() and (iou[~pos] < IOUS[t]).all()
            assert torch.equal(labels[pos], tg["labels"][idx[pos]])
    sizes = [[len(p) for p in s.proposals] for _, _, s in seen]
    for (_, _, before), (_, inputs, _) in zip(seen, seen[1:]):
        if convention == "mmdet":  # the refined RoIs minus those that were ground truth
            assert inputs == [len(p) - int(g.sum()) for p, g in zip(before.proposals, before.is_gt)]
            assert any(g.any() for g in before.is_gt)
        else:  # every refined (here all non-empty) RoI
            assert inputs == [len(p) for p in before.proposals]
    if convention == "mmdet":  # re-sampled every stage
        assert all(n <= 32 for stage in sizes for n in stage)
    else:  # later stages match every refined box without re-sampling or adding ground truth
        assert sizes[1] == sizes[0] == sizes[2]
        assert not any(s.is_gt[0].any() for t, _, s in seen if t > 0)


@pytest.mark.parametrize("convention", ["mmdet", "detectron2"])
def test_collapsed_boxes_are_dropped_by_detectron2_only(convention):
    cascade = _cascade(convention=convention)
    seen = _capture_samples(cascade)
    with torch.no_grad():  # stage 1 shrinks every box to zero width and height
        cascade.box_predictors[0].bbox_pred.weight.zero_()
        cascade.box_predictors[0].bbox_pred.bias.copy_(torch.tensor([0.0, 0.0, -500.0, -500.0]))
    cascade.train()
    targets = _gt()
    _, losses = cascade(_features(), _proposals(targets), SHAPES, targets)
    sum(losses.values()).backward()
    (_, _, first), (_, inputs, _), _ = seen
    if convention == "detectron2":  # nothing left after stage 1: empty stages still train
        assert inputs == [0, 0]
        assert cascade.last_stage_losses["loss_classifier_stage2"] == 0
    else:
        assert inputs == [len(p) - int(g.sum()) for p, g in zip(first.proposals, first.is_gt)]
    assert torch.isfinite(losses["loss_classifier"])


def test_later_stage_losses_do_not_reach_earlier_stages():
    cascade = _cascade(stage_loss_weights=(0.0, 1.0, 0.0))
    cascade.train()
    targets = _gt()
    _, losses = cascade(_features(), _proposals(targets), SHAPES, targets)
    sum(losses.values()).backward()
    for module in (cascade.box_heads[0], cascade.box_predictors[0]):
        assert all(p.grad is None or not p.grad.any() for p in module.parameters())
    assert cascade.box_predictors[1].bbox_pred.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("convention", ["mmdet", "detectron2"])
def test_regression_targets_decode_to_ground_truth_with_each_stage_coder(convention):
    cascade = _cascade(dtype=torch.float64, convention=convention)
    captured = []
    original = cascade._regression_targets

    def wrapped(stage, s):
        out = original(stage, s)
        captured.append((stage, s, out))
        return out

    cascade._regression_targets = wrapped
    targets = [{"boxes": t["boxes"].double(), "labels": t["labels"]} for t in _gt()]
    cascade.train()
    torch.manual_seed(0)
    cascade(_features(torch.float64), _proposals(targets, dtype=torch.float64), SHAPES, targets)
    assert [t for t, _, _ in captured] == [0, 1, 2]
    for t, s, deltas in captured:
        labels = torch.cat(s.labels)
        pos = labels > 0
        props, gt = torch.cat(s.proposals)[pos], torch.cat(s.matched_gt)[pos]
        decoded = det_utils.BoxCoder(WEIGHTS[t]).decode_single(deltas, props)
        torch.testing.assert_close(decoded, gt, rtol=0, atol=1e-10)
        other = det_utils.BoxCoder(WEIGHTS[(t + 1) % 3]).decode_single(deltas, props)
        assert not torch.allclose(other, gt)


def test_stage_loss_weights_scale_the_loss_exactly():
    results = []
    for weights in ((1.0, 0.5, 0.25), (2.0, 0.0, 3.0)):
        cascade = _cascade(stage_loss_weights=weights)
        cascade.train()
        torch.manual_seed(0)
        targets = _gt()
        _, losses = cascade(_features(), _proposals(targets), SHAPES, targets)
        assert set(losses) == {"loss_classifier", "loss_box_reg"}
        stages = cascade.last_stage_losses
        assert set(stages) == {
            f"loss_{k}_stage{t}" for k in ("classifier", "box_reg") for t in (1, 2, 3)
        }
        for kind in ("classifier", "box_reg"):
            expected = sum(w * stages[f"loss_{kind}_stage{t + 1}"] for t, w in enumerate(weights))
            torch.testing.assert_close(losses[f"loss_{kind}"].detach(), expected)
        results.append(stages)
    for k in results[0]:  # same RNG, same per-stage losses whatever the weights
        torch.testing.assert_close(results[0][k], results[1][k])


@pytest.mark.parametrize(
    ("mode", "convention"),
    [
        ("cascade", "mmdet"),
        ("cascade", "detectron2"),
        ("iterative", "mmdet"),
        ("integral", "mmdet"),
    ],
)
def test_images_without_boxes_train(mode, convention):
    cascade = _cascade(mode=mode, convention=convention, class_agnostic=mode != "integral")
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    cascade.train()
    for targets in ([_gt()[0], empty], [empty, empty]):
        feats = _features(requires_grad=True)
        _, losses = cascade(feats, _proposals(_gt()), SHAPES, targets)
        total = sum(losses.values())
        assert torch.isfinite(total)
        total.backward()
        assert torch.isfinite(feats["0"].grad).all()
    assert losses["loss_box_reg"] == 0 and losses["loss_classifier"] > 0
    cascade.eval()  # an image without proposals at test time
    with torch.no_grad():
        dets, _ = cascade(_features(), [_proposals(_gt())[0], torch.zeros(0, 4)], SHAPES)
    assert len(dets[0]["boxes"]) > 0 and dets[1]["boxes"].shape == (0, 4)


def test_detectron2_preset_scales_feature_gradients_by_one_over_stages():
    grads = []
    for scale in (None, 1.0):  # preset (1/3) and the same training unscaled
        cascade = _cascade(convention="detectron2", feature_grad_scale=scale)
        assert cascade.stage_loss_weights == (1.0, 1.0, 1.0) and cascade.box_loss_beta == 0.0
        cascade.train()
        feats = _features(requires_grad=True)
        torch.manual_seed(0)
        targets = _gt()
        _, losses = cascade(feats, _proposals(targets), SHAPES, targets)
        sum(losses.values()).backward()
        grads.append((feats["0"].grad, cascade.box_heads[1].fc6.weight.grad))
    (f_d2, h_d2), (f_ref, h_ref) = grads
    assert f_ref.abs().sum() > 0
    torch.testing.assert_close(f_d2, f_ref / 3)
    torch.testing.assert_close(h_d2, h_ref)  # the heads' own parameters are not scaled


# ------------------------------------------------------------------ inference semantics
class _OraclePredictor(nn.Module):
    """Regresses every input box exactly onto its best-overlapping ground-truth box."""

    def __init__(self, pool: _RecordingPool, gt: list[torch.Tensor], weights) -> None:
        super().__init__()
        self.pool, self.gt, self.coder = pool, gt, det_utils.BoxCoder(weights)

    def forward(self, x):
        boxes = self.pool.calls[-1]
        targets = [g[box_iou(b, g).argmax(1)] for b, g in zip(boxes, self.gt)]
        deltas = self.coder.encode_single(torch.cat(targets), torch.cat(boxes))
        return x.new_zeros(x.shape[0], NUM_CLASSES), deltas


@pytest.mark.parametrize("mode", ["cascade", "iterative"])
def test_oracle_predictor_makes_later_stage_inputs_the_ground_truth(mode):
    targets = _gt()
    gt = [t["boxes"].double() for t in targets]
    pool = _RecordingPool(_pool())
    n = 3 if mode == "cascade" else 1
    stage_weights = WEIGHTS if mode == "cascade" else (WEIGHTS[0],) * 3
    heads = [nn.Flatten() for _ in range(n)]
    preds = [_OraclePredictor(pool, gt, stage_weights[t]) for t in range(n)]
    cascade = (
        CascadeRoIHeads(
            pool, heads, preds, mode=mode, stage_iou_thresholds=IOUS, detections_per_img=1000
        )
        .double()
        .eval()
    )
    props = _proposals(targets, dtype=torch.float64)
    dets, _ = cascade(_features(torch.float64), props, SHAPES)
    assert len(pool.calls) == 3
    first = [g[box_iou(p, g).argmax(1)] for p, g in zip(props, gt)]
    for later in pool.calls[1:]:
        for boxes, expected in zip(later, first):
            torch.testing.assert_close(boxes, expected, rtol=0, atol=1e-9)
    for det, g in zip(dets, gt):  # every detection is a ground-truth box
        assert len(det["boxes"]) > 0
        assert torch.isclose(box_iou(det["boxes"], g).max(1).values, g.new_ones(())).all()


def _all_candidates(**kw) -> dict:
    """Evaluation keeping every (RoI, class) candidate: no threshold, no suppression."""
    return {"score_thresh": 0.0, "nms_thresh": 1.0, "detections_per_img": 10_000, **kw}


@pytest.mark.parametrize("average", ["prob", "logit"])
def test_score_ensemble_and_last_stage_boxes_by_hand(average):
    cascade = _cascade(**_all_candidates(score_average=average))
    pool = cascade.box_roi_pool = _RecordingPool(cascade.box_roi_pool)
    for p in cascade.box_predictors:  # larger deltas than the initialisation
        nn.init.normal_(p.bbox_pred.weight, std=0.05)
    outputs = _record_logits(cascade)
    cascade.eval()
    cascade.return_stages = True
    props = _proposals(_gt())
    with torch.no_grad():
        dets, losses = cascade(_features(), props, SHAPES)
    assert losses == {} and len(outputs) == len(pool.calls) == 3
    logits = [lg for lg, _ in outputs]
    if average == "prob":
        scores = torch.stack([F.softmax(lg, -1) for lg in logits]).mean(0)
    else:
        scores = F.softmax(torch.stack(logits).mean(0), -1)
    counts = [len(p) for p in props]
    got = torch.cat([d["scores"] for d in dets]).sort().values
    torch.testing.assert_close(got, scores[:, 1:].reshape(-1).sort().values)
    last = det_utils.BoxCoder(WEIGHTS[2]).decode_single(outputs[2][1], torch.cat(pool.calls[2]))
    for det, boxes in zip(dets, last.split(counts)):
        expected = boxes.clamp(0, 64).repeat_interleave(NUM_CLASSES - 1, 0)
        torch.testing.assert_close(det["boxes"].sort(0).values, expected.sort(0).values)
    for t in range(3):  # each stage alone: its softmax, its boxes
        stage = torch.cat([d["stages"][t]["scores"] for d in dets]).sort().values
        own = F.softmax(logits[t], -1)[:, 1:].reshape(-1).sort().values
        torch.testing.assert_close(stage, own)
    # stage t+1 classifies stage t's regression of its input boxes
    refined = det_utils.BoxCoder(WEIGHTS[0]).decode_single(outputs[0][1], torch.cat(props))
    torch.testing.assert_close(torch.cat(pool.calls[1]), refined.clamp(0, 64))


def test_iterative_mode_trains_one_stage_and_applies_the_head_repeatedly():
    cascade = _cascade(mode="iterative")
    assert cascade.num_stages == 3 and len(cascade.box_heads) == len(cascade.box_predictors) == 1
    pool = cascade.box_roi_pool = _RecordingPool(cascade.box_roi_pool)
    cascade.train()
    targets = _gt()
    _, losses = cascade(_features(), _proposals(targets), SHAPES, targets)
    assert len(pool.calls) == 1
    assert set(cascade.last_stage_losses) == {"loss_classifier_stage1", "loss_box_reg_stage1"}
    torch.testing.assert_close(
        losses["loss_classifier"].detach(), cascade.last_stage_losses["loss_classifier_stage1"]
    )
    pool.calls.clear()
    cascade.eval()
    with torch.no_grad():
        cascade(_features(), _proposals(targets), SHAPES)
    assert len(pool.calls) == 3


def test_integral_mode_classifiers_at_rising_thresholds_on_one_regressor():
    cascade = _cascade(mode="integral", **_all_candidates())
    pool = cascade.box_roi_pool = _RecordingPool(cascade.box_roi_pool)
    outputs = _record_logits(cascade)
    targets = _gt()
    cascade.train()
    torch.manual_seed(0)
    _, losses = cascade(_features(), _proposals(targets), SHAPES, targets)
    assert len(pool.calls) == 1 and len(outputs) == 3
    rois = pool.calls[0]
    stages = cascade.last_stage_losses
    assert set(stages) == {"loss_box_reg_stage1"} | {f"loss_classifier_stage{t}" for t in (1, 2, 3)}
    for t, (logits, _) in enumerate(outputs):
        labels = []
        for r, tg in zip(rois, targets):
            iou, idx = box_iou(r, tg["boxes"]).max(1)
            labels.append(torch.where(iou >= IOUS[t], tg["labels"][idx], 0))
        labels = torch.cat(labels)
        assert labels.gt(0).any()
        torch.testing.assert_close(
            stages[f"loss_classifier_stage{t + 1}"], F.cross_entropy(logits, labels)
        )
    expected = sum(
        w * stages[f"loss_classifier_stage{t + 1}"] for t, w in enumerate((1.0, 0.5, 0.25))
    )
    torch.testing.assert_close(losses["loss_classifier"].detach(), expected)
    # evaluation: one pooling, the three classifiers averaged, predictor 1's boxes
    pool.calls.clear(), outputs.clear()
    cascade.eval()
    props = _proposals(targets)
    with torch.no_grad():
        dets, _ = cascade(_features(), props, SHAPES)
    assert len(pool.calls) == 1
    scores = torch.stack([F.softmax(lg, -1) for lg, _ in outputs]).mean(0)
    got = torch.cat([d["scores"] for d in dets]).sort().values
    torch.testing.assert_close(got, scores[:, 1:].reshape(-1).sort().values)
    boxes = det_utils.BoxCoder(WEIGHTS[0]).decode_single(outputs[0][1], torch.cat(props))
    expected = boxes.clamp(0, 64).repeat_interleave(NUM_CLASSES - 1, 0)
    torch.testing.assert_close(
        torch.cat([d["boxes"] for d in dets]).sort(0).values, expected.sort(0).values
    )


def test_class_specific_cascade_trains_and_detects():
    cascade = _cascade(num_stages=2, class_agnostic=False)
    assert cascade.box_predictors[0].bbox_pred.out_features == 4 * NUM_CLASSES
    assert cascade.stage_bbox_reg_weights == WEIGHTS[:2]
    cascade.train()
    targets = _gt()
    _, losses = cascade(_features(), _proposals(targets), SHAPES, targets)
    assert losses["loss_box_reg"] > 0
    cascade.eval()
    with torch.no_grad():
        dets, _ = cascade(_features(), _proposals(targets), SHAPES)
    assert all(d["boxes"].shape[1] == 4 and len(d["boxes"]) > 0 for d in dets)


# ------------------------------------------------------------------ inside FasterRCNN
class _Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.out_channels = 4

    def forward(self, x):
        return OrderedDict([("0", self.conv(x))])


def _faster() -> FasterRCNN:
    torch.manual_seed(0)
    return FasterRCNN(
        _Backbone(),
        num_classes=None,
        min_size=64,
        max_size=64,
        rpn_anchor_generator=AnchorGenerator(((16, 32),), ((1.0,),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 4, 2),
        box_head=TwoMLPHead(4 * 16, 16),
        box_predictor=FastRCNNPredictor(16, NUM_CLASSES),
        rpn_pre_nms_top_n_train=40,
        rpn_post_nms_top_n_train=20,
        rpn_pre_nms_top_n_test=40,
        rpn_post_nms_top_n_test=20,
        box_batch_size_per_image=32,
        box_score_thresh=0.0,
    )


def test_drop_in_for_faster_rcnn_and_faster_rcnn_weights_loader():
    faster, model = _faster(), _faster()
    nn.init.normal_(faster.roi_heads.box_head.fc6.weight)
    heads, preds = cascade_box_heads(4, 4, 16, NUM_CLASSES)
    model.roi_heads = CascadeRoIHeads(
        model.roi_heads.box_roi_pool, heads, preds, batch_size_per_image=32, score_thresh=0.0
    )
    report = load_faster_rcnn_weights(model, faster.state_dict())
    assert report.mapped["backbone.conv.weight"] == "backbone.conv.weight"
    assert report.mapped["roi_heads.box_head.fc6.weight"] == "roi_heads.box_heads.0.fc6.weight"
    assert "roi_heads.box_predictor.cls_score.weight" in report.mapped
    assert any(k.startswith("rpn.") for k in report.mapped)
    assert {k for k, _, _ in report.mismatched} == {
        "roi_heads.box_predictors.0.bbox_pred.weight",
        "roi_heads.box_predictors.0.bbox_pred.bias",
    }
    assert report.missing and all(
        k.startswith(
            ("roi_heads.box_heads.1", "roi_heads.box_heads.2", "roi_heads.box_predictors.")
        )
        for k in report.missing
    )
    assert "roi_heads.box_heads.2.fc7.weight" in report.missing and not report.unexpected
    assert torch.equal(
        model.roi_heads.box_heads[0].fc6.weight, faster.roi_heads.box_head.fc6.weight
    )
    with pytest.raises(TypeError, match="CascadeRoIHeads"):
        load_faster_rcnn_weights(faster, model.state_dict())

    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 96)]
    targets = [_gt()[0], {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    model.train()
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} == set(losses)
    model.eval()
    model.roi_heads.return_stages = True
    with torch.no_grad():
        dets = model(images)
    for det, (h, w) in zip(dets, [(64, 64), (48, 96)]):  # rescaled to the input images
        assert len(det["boxes"]) > 0 and len(det["stages"]) == 3
        assert det["boxes"][:, 2].max() <= w and det["boxes"][:, 3].max() <= h
    assert dets[1]["stages"][0]["image_size"].tolist() == [32, 64]
    rescale_stage_detections(dets, [(64, 64), (48, 96)])
    stage = dets[1]["stages"][2]
    assert stage["image_size"].tolist() == [48, 96] and stage["boxes"][:, 2].max() > 64


# ------------------------------------------------------------------ argument checks
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"stage_iou_thresholds": (0.5, 0.6, 1.0)}, "stage_iou_thresholds"),
        ({"stage_iou_thresholds": (0.5, 0.6)}, "box_heads"),
        ({"stage_loss_weights": (1.0, 0.5)}, "stage_loss_weights"),
        ({"stage_loss_weights": (1.0, -0.5, 1.0)}, "stage_loss_weights"),
        ({"stage_bbox_reg_weights": ((1, 1, 1),) * 3}, "stage_bbox_reg_weights"),
        ({"mode": "boosted"}, "mode"),
        ({"convention": "caffe"}, "convention"),
        ({"score_average": "max"}, "score_average"),
        ({"mode": "iterative"}, "box_heads"),
        ({"positive_fraction": 0.0}, "positive_fraction"),
        ({"batch_size_per_image": 0}, "batch_size_per_image"),
        ({"detections_per_img": 0}, "detections_per_img"),
        ({"score_thresh": 1.5}, "score_thresh"),
    ],
)
def test_bad_arguments_raise(kw, match):
    heads, preds = cascade_box_heads(4, 4, 16, NUM_CLASSES)
    with pytest.raises(ValueError, match=f"CascadeRoIHeads.*{match}"):
        CascadeRoIHeads(_pool(), heads, preds, **kw)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="cascade_box_heads: resolution"):
        cascade_box_heads(4, 0, 16, NUM_CLASSES)
    with pytest.raises(ValueError, match="CascadePredictor: num_classes"):
        cascade_box_heads(4, 4, 16, 1)
    heads, preds = cascade_box_heads(4, 4, 16, NUM_CLASSES, num_stages=4)
    with pytest.raises(ValueError, match="CascadeRoIHeads.*at most 3 stages"):
        CascadeRoIHeads(_pool(), heads, preds)
    cascade = _cascade(class_agnostic=True)
    cascade.class_agnostic = False  # predictors still return 4 deltas
    cascade.train()
    with pytest.raises(ValueError, match=r"CascadeRoIHeads.*\(N, 12\)"):
        cascade(_features(), _proposals(_gt()), SHAPES, _gt())
    with pytest.raises(ValueError, match="CascadeRoIHeads.*target"):
        cascade(_features(), _proposals(_gt()), SHAPES, None)
    bad = [{"boxes": t["boxes"], "labels": t["labels"].int()} for t in _gt()]
    with pytest.raises(TypeError, match="CascadeRoIHeads.*int64"):
        cascade(_features(), _proposals(_gt()), SHAPES, bad)
