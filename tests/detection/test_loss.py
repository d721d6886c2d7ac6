"""YOLOv4-tiny assignment and loss against a literal per-box port of the reference, in float64.

The oracle (``literal_yolo_loss.py`` beside this file) follows bubbliiiing/yolov4-tiny-pytorch's
``YOLOLoss`` step by step with Python loops over images and boxes; the vectorised code must give
the same assignment tensors, the same ignore mask, the same loss parts and the same gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
from literal_yolo_loss import literal_yolo_loss
from torchvision.ops import complete_box_iou_loss

from attnzoo.detection import (
    ANCHOR_MASKS,
    ANCHORS,
    YoloV4Tiny,
    YoloV4TinyLoss,
    assign_targets,
    box_ciou,
)
from attnzoo.detection.loss import _best_anchors, _gather_boxes, _ignored

torch.set_num_threads(2)

NC = 5
SIZES = [(416, 416), (128, 160)]
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def random_boxes(gen: torch.Generator, n: int, size: tuple[int, int]) -> torch.Tensor:
    """``n`` xyxy boxes with centres inside the image and anchor-like sizes, clipped to it."""
    height, width = size
    anchors = torch.tensor(ANCHORS, dtype=torch.float64)
    centre = torch.rand(n, 2, generator=gen, dtype=torch.float64) * torch.tensor(
        [width, height], dtype=torch.float64
    )
    wh = anchors[torch.randint(0, 6, (n,), generator=gen)] * (
        0.5 + 1.5 * torch.rand(n, 2, generator=gen, dtype=torch.float64)
    )
    lo = (centre - wh / 2).clamp(min=0)
    hi = torch.minimum(centre + wh / 2, torch.tensor([width, height], dtype=torch.float64))
    return torch.cat([lo, hi], 1)


def special_boxes(size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two boxes in one cell (same anchor, different classes), an anchor-0 box, an anchor-3 box,
    boxes touching the image borders, a whole-image box."""
    height, width = size
    boxes = torch.tensor(
        [
            [40.0, 40.0, 63.0, 66.0],  # 23 x 26: anchor 1, cell of the next box
            [41.0, 39.0, 64.0, 65.0],  # same cell and anchor, listed later: its box wins
            [100.0, 60.0, 108.0, 71.0],  # 8 x 11: best anchor 0, unused -> next best used anchor
            [10.0, 20.0, 91.0, 102.0],  # 81 x 82: anchor 3, positive in both heads
            [0.0, 0.0, 30.0, 25.0],  # top-left border
            [width - 37.0, height - 58.0, width, height],  # bottom-right border, anchor 2
            [0.0, 0.0, float(width), float(height)],  # the whole image
        ],
        dtype=torch.float64,
    )
    return boxes, torch.tensor([0, 3, 1, 2, 4, 0, 1])


def make_batch(size: tuple[int, int], seed: int = 0, *, empty: bool = False):
    """Targets for 4 images (random, empty, special, random) and random float64 head maps."""
    gen = torch.Generator().manual_seed(seed)
    targets = []
    for n in (9, 0, None, 15):
        if empty or n == 0:
            targets.append(
                {
                    "boxes": torch.zeros(0, 4, dtype=torch.float64),
                    "labels": torch.zeros(0, dtype=torch.long),
                }
            )
        elif n is None:
            boxes, labels = special_boxes(size)
            targets.append({"boxes": boxes, "labels": labels})
        else:
            targets.append(
                {
                    "boxes": random_boxes(gen, n, size),
                    "labels": torch.randint(0, NC, (n,), generator=gen),
                }
            )
    height, width = size
    outputs = tuple(
        (
            0.7
            * torch.randn(
                4, 3 * (5 + NC), height // s, width // s, generator=gen, dtype=torch.float64
            )
        ).requires_grad_()
        for s in (32, 16)
    )
    return outputs, targets


def dense(head, batch, grid, nc=NC):
    """The reference's ``y_true`` layout ``(B, 3, h, w, 5 + nc)`` from a HeadTargets."""
    y = torch.zeros(batch, 3, *grid, 5 + nc, dtype=torch.float64)
    b, k, j, i = head.index.unbind(1)
    y[b, k, j, i, :4] = head.box
    y[b, k, j, i, 4] = 1
    y[b, k, j, i, 5:] = head.cls
    return y


def literal(outputs, targets, **kw):
    return literal_yolo_loss(outputs, targets, NC, anchors=ANCHORS, anchor_masks=ANCHOR_MASKS, **kw)


@pytest.mark.parametrize("size", SIZES)
def test_assignment_equals_literal_port(size):
    outputs, targets = make_batch(size)
    ref = literal(outputs, targets)
    grids = [tuple(o.shape[2:]) for o in outputs]
    heads = assign_targets(targets, grids, size, NC)
    for head, grid, y_true, noobj in zip(heads, grids, ref["y_true"], ref["noobj_assigned"]):
        torch.testing.assert_close(dense(head, 4, grid), y_true, **TIGHT)
        assert torch.equal(head.obj, noobj == 0)
    assert sum(len(h.index) for h in heads) > 20  # the comparison is not vacuous


def test_special_cases_assignment():
    size = (416, 416)
    boxes, labels = special_boxes(size)
    p5, p4 = assign_targets([{"boxes": boxes, "labels": labels}], [(13, 13), (26, 26)], size, NC)
    p4_rows = {tuple(r): n for n, r in enumerate(p4.index.tolist())}
    # two boxes in cell (row 3, col 3) of P4, anchor 1 = slot 0: the later box, both classes
    n = p4_rows[(0, 0, 3, 3)]
    torch.testing.assert_close(
        p4.box[n], torch.tensor([52.5, 52.0, 23.0, 26.0], dtype=torch.float64) / 16
    )
    assert p4.cls[n].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    # 8 x 11 px: best anchor 0 is in no mask -> anchor 1 (P4 slot 0), cell (row 4, col 6)
    assert (0, 0, 4, 6) in p4_rows
    # 81 x 82 px: anchor 3, positive in P5 (slot 0) and in P4 (slot 2)
    assert [0, 0, 1, 1] in p5.index.tolist() and (0, 2, 3, 3) in p4_rows
    # best anchors: 1, 1, 1 (0 is unused), 3, 1 (30 x 25 px), 2, 5 (the whole image)
    gt = _gather_boxes(
        [{"boxes": boxes, "labels": labels}], size, NC, torch.float64, torch.device("cpu"), "test"
    )
    best = _best_anchors(gt, torch.tensor(ANCHORS, dtype=torch.float64), ANCHOR_MASKS, size)
    assert best.tolist() == [1, 1, 1, 3, 1, 2, 5]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_parts_and_gradients_equal_literal_port(size, smoothing):
    outputs, targets = make_batch(size, seed=1)
    ours = YoloV4TinyLoss(NC, label_smoothing=smoothing)(outputs, targets)
    grads = torch.autograd.grad(ours["loss"], outputs)
    ref = literal(outputs, targets, label_smoothing=smoothing)
    ref_grads = torch.autograd.grad(ref["loss"], outputs)
    for part in ("loss", "box", "obj", "cls"):
        torch.testing.assert_close(ours[part], ref[part], **TIGHT)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **TIGHT)
    assert all(ours[p] > 0 for p in ("box", "obj", "cls"))


def test_unused_best_anchor_takes_next_best_used_one():
    # anchor 0 unused and best for a 10 x 14 box; the next best is anchor 2, not 1
    anchors = ((10, 14), (100, 100), (12, 16), (81, 82), (135, 169), (344, 319))
    outputs, targets = make_batch((416, 416), seed=7)
    targets[1] = {
        "boxes": torch.tensor([[50.0, 60.0, 60.0, 74.0]], dtype=torch.float64),
        "labels": torch.tensor([2]),
    }
    heads = assign_targets(targets, [(13, 13), (26, 26)], (416, 416), NC, anchors=anchors)
    assert [1, 1, 4, 3] in heads[1].index.tolist()  # P4 slot 1 = anchor 2, cell (4, 3)
    ours = YoloV4TinyLoss(NC, anchors=anchors)(outputs, targets)
    ref = literal_yolo_loss(outputs, targets, NC, anchors=anchors, anchor_masks=ANCHOR_MASKS)
    for part in ("loss", "box", "obj", "cls"):
        torch.testing.assert_close(ours[part], ref[part], **TIGHT)


def test_saturated_probabilities_are_clipped_as_the_reference():
    outputs, targets = make_batch((128, 160), seed=8)
    scale = torch.ones(3, 5 + NC, 1, 1, dtype=torch.float64)
    scale[:, 4:] = 60.0  # objectness and class logits far beyond the 1e-7 clip
    outputs = tuple((o.detach() * scale.view(1, -1, 1, 1)).requires_grad_() for o in outputs)
    ours = YoloV4TinyLoss(NC)(outputs, targets)
    ref = literal(outputs, targets)
    for part in ("loss", "obj", "cls"):
        torch.testing.assert_close(ours[part], ref[part], **TIGHT)
    grads = torch.autograd.grad(ours["loss"], outputs)
    ref_grads = torch.autograd.grad(ref["loss"], outputs)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **TIGHT)
    # in float32 the clip sits at a different distance from 1: still the reference's values
    single = tuple(o.detach().float() for o in outputs)
    ours, ref = YoloV4TinyLoss(NC)(single, targets), literal(single, targets)
    for part in ("obj", "cls"):
        torch.testing.assert_close(ours[part], ref[part], rtol=1e-5, atol=0)


@pytest.mark.parametrize("size", SIZES)
def test_ignore_rule_equals_literal_port(size):
    outputs, targets = make_batch(size, seed=2)
    ref = literal(outputs, targets)
    gt = _gather_boxes(targets, size, NC, torch.float64, torch.device("cpu"), "test")
    anchors = torch.tensor(ANCHORS, dtype=torch.float64)
    n_ignored = 0
    for level, (out, mask) in enumerate(zip(outputs, ANCHOR_MASKS)):
        grid = tuple(out.shape[2:])
        stride = torch.tensor([size[1] / grid[1], size[0] / grid[0]], dtype=torch.float64)
        pred = out.detach().view(4, 3, 5 + NC, *grid)
        ignored = _ignored(pred, anchors[list(mask)] / stride, gt, grid, 0.5)
        assigned = ref["noobj_assigned"][level] == 0
        assert torch.equal(ignored & ~assigned, (ref["noobj"][level] == 0) & ~assigned)
        n_ignored += int((ignored & ~assigned).sum())
    assert n_ignored > 0  # the rule is exercised


def test_empty_images_and_empty_batch():
    outputs, targets = make_batch((128, 160), seed=3, empty=True)
    parts = YoloV4TinyLoss(NC)(outputs, targets)
    ref = literal(outputs, targets)
    assert parts["box"] == 0 and parts["cls"] == 0 and parts["obj"] > 0
    torch.testing.assert_close(parts["loss"], ref["loss"], **TIGHT)
    parts["loss"].backward()
    for out in outputs:
        grad = out.grad.view(4, 3, 5 + NC, *out.shape[2:])
        assert torch.isfinite(out.grad).all()
        assert grad[:, :, 4].abs().min() > 0 and grad[:, :, :4].abs().max() == 0


def test_gradients_only_where_expected():
    outputs, targets = make_batch((416, 416), seed=4)
    YoloV4TinyLoss(NC)(outputs, targets)["loss"].backward()
    heads = assign_targets(targets, [(13, 13), (26, 26)], (416, 416), NC)
    for out, head in zip(outputs, heads):
        grad = out.grad.view(4, 3, 5 + NC, *out.shape[2:])
        assert torch.isfinite(grad).all()
        box_and_cls = torch.cat([grad[:, :, :4], grad[:, :, 5:]], 2).abs().amax(2)
        assert torch.equal(box_and_cls > 0, head.obj)  # box/class gradients at positives only
        assert (grad[:, :, 4][head.obj] != 0).all()


def test_ciou_equals_torchvision():
    gen = torch.Generator().manual_seed(5)
    centre = torch.rand(500, 4, generator=gen, dtype=torch.float64) * 10
    wh = 0.2 + 5 * torch.rand(500, 4, generator=gen, dtype=torch.float64)
    b1 = torch.cat([centre[:, :2], wh[:, :2]], 1)
    b2 = torch.cat([centre[:, 2:], wh[:, 2:]], 1)

    def xyxy(b):
        return torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)

    ours = 1 - box_ciou(b1, b2)
    theirs = complete_box_iou_loss(xyxy(b1), xyxy(b2))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert (ours > 1).any() and (ours < 1).any()  # overlapping and disjoint pairs both present
    same = box_ciou(b1, b1)
    torch.testing.assert_close(same, torch.ones_like(same))


def test_float32_matches_float64():
    outputs, targets = make_batch((128, 160), seed=6)
    loss = YoloV4TinyLoss(NC)
    ref = loss(outputs, targets)
    single = loss(
        tuple(o.detach().float() for o in outputs),
        [{"boxes": t["boxes"].float(), "labels": t["labels"]} for t in targets],
    )
    assert single["loss"].dtype == torch.float32
    for part in ("loss", "box", "obj", "cls"):
        torch.testing.assert_close(single[part].double(), ref[part].detach(), rtol=1e-4, atol=1e-6)


def test_half_precision_maps_are_computed_in_float32():
    outputs, targets = make_batch((128, 160), seed=9)
    half = tuple(o.detach().half().requires_grad_() for o in outputs)
    parts = YoloV4TinyLoss(NC)(half, targets)
    ref = YoloV4TinyLoss(NC)(tuple(o.detach().float() for o in half), targets)
    assert parts["loss"].dtype == torch.float32
    torch.testing.assert_close(parts["loss"], ref["loss"])
    parts["loss"].backward()
    assert half[0].grad.dtype == torch.float16 and torch.isfinite(half[0].grad).all()


def test_trains_yolov4_tiny_parameters():
    torch.manual_seed(0)
    model = YoloV4Tiny(NC)
    images = torch.rand(2, 3, 64, 96)
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [50.0, 10.0, 90.0, 60.0]])
    targets = [
        {"boxes": boxes, "labels": torch.tensor([1, 4])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    parts = YoloV4TinyLoss(NC)(model(images), targets)
    parts["loss"].backward()
    assert math.isfinite(parts["loss"].item()) and parts["box"] > 0 and parts["cls"] > 0
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.head_p5[-1].weight.grad.abs().sum() > 0
    assert model.head_p4[-1].weight.grad.abs().sum() > 0


def _targets(boxes, labels):
    return [{"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}]


@pytest.mark.parametrize(
    "outputs, targets, match",
    [
        ((torch.zeros(1, 30, 2, 2),), _targets([[0, 0, 9, 9]], [0]), "2 head maps"),
        (
            (torch.zeros(1, 31, 2, 2), torch.zeros(1, 30, 4, 4)),
            _targets([[0, 0, 9, 9]], [0]),
            "channels",
        ),
        (
            (torch.zeros(1, 30, 2, 2), torch.zeros(1, 30, 3, 4)),
            _targets([[0, 0, 9, 9]], [0]),
            r"outputs\[1\]",
        ),
        (
            (torch.zeros(1, 30, 2, 2), torch.zeros(1, 30, 4, 4)),
            _targets([[0, 0, 9, 9]], [5]),
            r"labels must be in \[0, 5\)",
        ),
        (
            (torch.zeros(1, 30, 2, 2), torch.zeros(1, 30, 4, 4)),
            _targets([[0, 0, 9, 9]], [-1]),
            r"labels must be in \[0, 5\)",
        ),
        (
            (torch.zeros(1, 30, 2, 2), torch.zeros(1, 30, 4, 4)),
            _targets([[9, 0, 5, 9]], [0]),
            "xyxy",
        ),
        (
            (torch.zeros(1, 30, 2, 2), torch.zeros(1, 30, 4, 4)),
            _targets([[60, 0, 90, 9]], [0]),
            "centres must lie inside",
        ),
        (
            (torch.zeros(2, 30, 2, 2), torch.zeros(2, 30, 4, 4)),
            _targets([[0, 0, 9, 9]], [0]),
            "list of 2 dicts",
        ),
    ],
)
def test_bad_input_raises(outputs, targets, match):
    with pytest.raises(ValueError, match=f"YoloV4TinyLoss.*{match}"):
        YoloV4TinyLoss(NC)(outputs, targets)


def test_bad_arguments_raise():
    outputs = (torch.zeros(1, 30, 2, 2), torch.zeros(1, 30, 4, 4))
    with pytest.raises(TypeError, match="YoloV4TinyLoss.*labels integers"):
        YoloV4TinyLoss(NC)(outputs, [{"boxes": torch.zeros(1, 4), "labels": torch.zeros(1)}])
    with pytest.raises(ValueError, match="YoloV4TinyLoss.*balance"):
        YoloV4TinyLoss(NC, balance=(1.0,))
    with pytest.raises(ValueError, match="YoloV4TinyLoss.*anchor_masks"):
        YoloV4TinyLoss(NC, anchor_masks=((3, 4, 6), (1, 2, 3)))
    with pytest.raises(ValueError, match="YoloV4TinyLoss.*label_smoothing"):
        YoloV4TinyLoss(NC, label_smoothing=1.0)
    with pytest.raises(ValueError, match="assign_targets.*grid_sizes"):
        assign_targets(_targets([[0, 0, 9, 9]], [0]), [(2, 2)], (64, 64), NC)
