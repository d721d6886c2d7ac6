"""Decoding and NMS of YOLOv4-tiny head maps.

The reference behaviour (bubbliiiing/yolov4-tiny-pytorch ``utils/utils_bbox.py``: ``DecodeBox``
and its ``non_max_suppression``) is written below as plain loops over anchors, cells and classes;
the vectorised implementation must agree with it. A literal encoder writes head logits that decode
to given boxes, so a decode -> metrics round trip must give AP = 1.
"""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import nms

from attnzoo.detection import ANCHOR_MASKS, ANCHORS, decode_outputs, postprocess

torch.set_num_threads(2)
BIG = 12.0  # logit of "certainly yes"; -BIG is "certainly no"


def empty_outputs(batch: int, num_classes: int, size: tuple[int, int]) -> list[torch.Tensor]:
    """Head maps (p5, p4) whose every objectness logit is -BIG (nothing detected)."""
    outs = []
    for stride in (32, 16):
        out = torch.zeros(batch, 3, 5 + num_classes, size[0] // stride, size[1] // stride)
        out[:, :, 4:] = -BIG
        outs.append(out)
    return outs


def put(
    outs: list[torch.Tensor],
    image: int,
    head: int,
    slot: int,
    box: list[float],
    label: int,
    size: tuple[int, int],
    obj_logit: float = BIG,
    cell: tuple[int, int] | None = None,
) -> None:
    """Literal encoder: write logits at (head, anchor slot) of the box centre's cell (or ``cell``)
    so that the reference decoding gives back ``box`` (xyxy pixels) with class ``label``."""
    out = outs[head]
    gh, gw = out.shape[-2:]
    sh, sw = size[0] / gh, size[1] / gw
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2 / sw, (y1 + y2) / 2 / sh
    row, col = cell if cell is not None else (math.floor(cy), math.floor(cx))
    ox, oy = cx - col, cy - row
    assert 0 < ox < 1 and 0 < oy < 1, "box centre must lie in the chosen cell"
    aw, ah = ANCHORS[ANCHOR_MASKS[head][slot]]
    out[image, slot, 0, row, col] = math.log(ox / (1 - ox))
    out[image, slot, 1, row, col] = math.log(oy / (1 - oy))
    out[image, slot, 2, row, col] = math.log((x2 - x1) / aw)
    out[image, slot, 3, row, col] = math.log((y2 - y1) / ah)
    out[image, slot, 4, row, col] = obj_logit
    out[image, slot, 5:, row, col] = -BIG
    out[image, slot, 5 + label, row, col] = BIG


def flat(outs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, 3, 5+nc, h, w) maps viewed as the model's (B, 3*(5+nc), h, w) outputs."""
    return tuple(o.flatten(1, 2) for o in outs)


def reference_decode(outputs, size, anchors=ANCHORS, masks=ANCHOR_MASKS) -> torch.Tensor:
    """The reference's decode, one anchor and cell at a time (float64): normalised, then pixels."""
    rows = []
    for out, mask in zip(outputs, masks):
        b_, c, gh, gw = out.shape
        attrs = c // len(mask)
        p = out.double().view(b_, len(mask), attrs, gh, gw)
        per_image = [[] for _ in range(b_)]
        for b in range(b_):
            for a, idx in enumerate(mask):
                aw, ah = anchors[idx][0] / (size[1] / gw), anchors[idx][1] / (size[0] / gh)
                for j in range(gh):
                    for i in range(gw):
                        t = p[b, a, :, j, i]
                        x = (torch.sigmoid(t[0]) + i) / gw * size[1]
                        y = (torch.sigmoid(t[1]) + j) / gh * size[0]
                        w = torch.exp(t[2]) * aw / gw * size[1]
                        h = torch.exp(t[3]) * ah / gh * size[0]
                        per_image[b].append(
                            torch.cat(
                                [
                                    torch.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2]),
                                    torch.sigmoid(t[4:]),
                                ]
                            )
                        )
        rows.append(torch.stack([torch.stack(r) for r in per_image]))
    return torch.cat(rows, dim=1)


def reference_postprocess(outputs, size, conf, nms_iou, max_det):
    """The reference's NMS: per image, per class ``nms`` on obj * class prob; then our cap and
    clipping (highest scores first)."""
    result = []
    for det in reference_decode(outputs, size):
        cls_conf, cls_pred = det[:, 5:].max(dim=1)
        score = det[:, 4] * cls_conf
        keep_mask = score >= conf
        det, score, cls_pred = det[keep_mask], score[keep_mask], cls_pred[keep_mask]
        kept = []
        for c in cls_pred.unique():
            idx = (cls_pred == c).nonzero().squeeze(1)
            kept += idx[nms(det[idx, :4], score[idx], nms_iou)].tolist()
        kept = sorted(kept, key=lambda k: -float(score[k]))[:max_det]
        boxes = det[kept, :4].clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, size[1])
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, size[0])
        result.append({"boxes": boxes, "scores": score[kept], "labels": cls_pred[kept]})
    return result


@pytest.mark.parametrize("size", [(64, 96), (96, 64)])
def test_decode_matches_reference_loops(size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    outputs = (
        torch.randn(2, 3 * 7, size[0] // 32, size[1] // 32, generator=gen),
        torch.randn(2, 3 * 7, size[0] // 16, size[1] // 16, generator=gen),
    )
    ours = decode_outputs(outputs, size)
    assert ours.shape == (2, 3 * (6 + 24), 7) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference_decode(outputs, size), rtol=1e-5, atol=1e-4)


def test_decode_is_differentiable_and_keeps_dtype() -> None:
    outputs = tuple(
        torch.randn(1, 3 * 6, s, s, dtype=torch.float64, requires_grad=True) for s in (2, 4)
    )
    det = decode_outputs(outputs, 64)
    assert det.dtype == torch.float64
    det[..., :5].sum().backward()
    assert all(o.grad is not None and o.grad.abs().sum() > 0 for o in outputs)


def test_postprocess_matches_reference_nms_on_random_maps() -> None:
    gen = torch.Generator().manual_seed(1)
    size = (96, 128)
    outputs = (
        torch.randn(3, 3 * 8, 3, 4, generator=gen) * 2,
        torch.randn(3, 3 * 8, 6, 8, generator=gen) * 2,
    )
    ours = postprocess(outputs, size, conf_threshold=0.2, nms_iou=0.45, max_detections=15)
    ref = reference_postprocess(outputs, size, 0.2, 0.45, 15)
    assert sum(len(r["scores"]) for r in ref) > 20  # the case is not trivial
    for o, r in zip(ours, ref):
        assert o["labels"].dtype == torch.long and o["boxes"].shape == (len(r["scores"]), 4)
        torch.testing.assert_close(o["scores"].double(), r["scores"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(o["boxes"].double(), r["boxes"], rtol=1e-5, atol=1e-3)
        assert torch.equal(o["labels"], r["labels"])


SIZE = (128, 160)


def test_nms_keeps_the_higher_score_of_one_class() -> None:
    outs = empty_outputs(1, 3, SIZE)
    box = [40.0, 30.0, 100.0, 90.0]
    put(outs, 0, 0, 0, box, label=1, size=SIZE, obj_logit=1.0)
    put(outs, 0, 0, 1, [41.0, 31.0, 101.0, 92.0], label=1, size=SIZE, obj_logit=3.0)
    (pred,) = postprocess(flat(outs), SIZE)
    assert len(pred["scores"]) == 1 and int(pred["labels"]) == 1
    assert float(pred["scores"]) == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item(), 1e-4)
    torch.testing.assert_close(
        pred["boxes"][0], torch.tensor([41.0, 31.0, 101.0, 92.0]), rtol=0, atol=1e-3
    )


def test_nms_is_per_class_and_per_image() -> None:
    outs = empty_outputs(2, 3, SIZE)
    box = [40.0, 30.0, 100.0, 90.0]
    put(outs, 0, 0, 0, box, label=0, size=SIZE, obj_logit=1.0)
    put(outs, 0, 0, 1, box, label=2, size=SIZE, obj_logit=3.0)  # same box, other class
    put(outs, 1, 0, 0, box, label=0, size=SIZE, obj_logit=2.0)  # same box, other image
    preds = postprocess(flat(outs), SIZE)
    assert preds[0]["labels"].tolist() == [2, 0]  # both kept, by score
    assert preds[1]["labels"].tolist() == [0]
    for pred in preds:
        for b in pred["boxes"]:
            torch.testing.assert_close(b, torch.tensor(box), rtol=0, atol=1e-3)


def test_threshold_cap_and_clipping() -> None:
    outs = empty_outputs(1, 2, SIZE)
    put(outs, 0, 1, 0, [-6.0, 4.0, 14.0, 30.0], label=0, size=SIZE, cell=(1, 0))  # over the edge
    put(outs, 0, 1, 1, [100.0, 100.0, 170.0, 140.0], label=1, size=SIZE, obj_logit=0.0)
    put(outs, 0, 0, 2, [60.0, 10.0, 90.0, 40.0], label=1, size=SIZE, obj_logit=-3.0)
    (pred,) = postprocess(flat(outs), SIZE, conf_threshold=0.1, max_detections=None)
    assert len(pred["scores"]) == 2  # sigmoid(-3) < 0.1 dropped
    torch.testing.assert_close(
        pred["boxes"],
        torch.tensor([[0.0, 4.0, 14.0, 30.0], [100.0, 100.0, 160.0, 128.0]]),
        rtol=0,
        atol=1e-3,
    )
    (capped,) = postprocess(flat(outs), SIZE, conf_threshold=0.01, max_detections=2)
    assert capped["scores"].tolist() == sorted(capped["scores"].tolist(), reverse=True)
    assert len(capped["scores"]) == 2 and float(capped["scores"][-1]) > 0.4


def test_nothing_detected_gives_empty_predictions() -> None:
    preds = postprocess(flat(empty_outputs(2, 4, SIZE)), SIZE)
    assert [p["boxes"].shape for p in preds] == [(0, 4), (0, 4)]
    assert preds[0]["labels"].dtype == torch.long and preds[0]["scores"].shape == (0,)


def test_decode_encode_round_trip_gives_ap_one() -> None:
    from attnzoo.detection import COCOMeanAP, VOCMeanAP

    gen = torch.Generator().manual_seed(3)
    num_classes, size = 4, (256, 320)
    outs = empty_outputs(3, num_classes, size)
    targets = []
    for image in range(3):
        cells = torch.randperm(6 * 8, generator=gen)[:4]  # distinct inner P5 cells
        boxes, labels = [], []
        for k, cell in enumerate(cells.tolist()):
            row, col = 1 + cell // 8, 1 + cell % 8
            w, h = (torch.rand(2, generator=gen) * 48 + 12).tolist()  # fits: half < one cell
            cx = (col + 0.1 + 0.8 * torch.rand(1, generator=gen).item()) * 32
            cy = (row + 0.1 + 0.8 * torch.rand(1, generator=gen).item()) * 32
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
            label = int(torch.randint(num_classes, (1,), generator=gen))
            head, slot = (0, k % 3) if k % 2 == 0 else (1, k % 3)
            put(outs, image, head, slot, box, label, size)
            boxes.append(box)
            labels.append(label)
        targets.append({"boxes": torch.tensor(boxes), "labels": torch.tensor(labels)})
    preds = postprocess(flat(outs), size)
    assert [len(p["scores"]) for p in preds] == [4, 4, 4]
    voc, coco = VOCMeanAP(num_classes), COCOMeanAP()
    voc.update(preds, targets)
    coco.update(preds, targets)
    assert voc.compute()["map50"] == pytest.approx(1.0, abs=1e-12)
    result = coco.compute()
    assert result["map"] == pytest.approx(1.0, abs=1e-6)
    assert result["map75"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"outputs": torch.zeros(1, 21, 2, 2)}, "tuple or list"),
        ({"outputs": (torch.zeros(1, 21, 2, 2),)}, "one entry per head"),
        ({"outputs": (torch.zeros(1, 20, 2, 2), torch.zeros(1, 20, 4, 4))}, "20 channels"),
        ({"outputs": (torch.zeros(1, 21, 2, 2), torch.zeros(1, 24, 4, 4))}, "classes per anchor"),
        ({"outputs": (torch.zeros(21, 2, 2), torch.zeros(1, 21, 4, 4))}, "4-D"),
        ({"input_size": (64,)}, "input_size"),
        ({"input_size": 0}, "input_size"),
        ({"anchors": [[10, 0]] * 6}, "anchors"),
        ({"anchor_masks": ((3, 4, 6), (1, 2, 3))}, "anchor_masks"),
    ],
)
def test_decode_bad_input(kwargs: dict, match: str) -> None:
    args = {"outputs": (torch.zeros(1, 21, 2, 2), torch.zeros(1, 21, 4, 4)), "input_size": 64}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        decode_outputs(args.pop("outputs"), args.pop("input_size"), **args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"conf_threshold": 1.5}, "conf_threshold"),
        ({"nms_iou": -0.1}, "nms_iou"),
        ({"max_detections": 0}, "max_detections"),
        ({"max_detections": 2.5}, "max_detections"),
    ],
)
def test_postprocess_bad_options(kwargs: dict, match: str) -> None:
    outputs = (torch.zeros(1, 21, 2, 2), torch.zeros(1, 21, 4, 4))
    with pytest.raises(ValueError, match=f"postprocess: {match}"):
        postprocess(outputs, 64, **kwargs)


def test_postprocess_takes_the_model_outputs() -> None:
    from attnzoo.detection import YoloV4Tiny

    model = YoloV4Tiny(3).eval()
    with torch.no_grad():
        outputs = model(torch.rand(2, 3, 64, 96))
    det = decode_outputs(outputs, (64, 96))
    assert det.shape == (2, 3 * (2 * 3 + 4 * 6), 8)
    preds = postprocess(outputs, (64, 96), conf_threshold=0.0, max_detections=7)
    assert [len(p["scores"]) for p in preds] == [7, 7]
    for p in preds:
        assert bool((p["boxes"][:, 0::2] <= 96).all() and (p["boxes"][:, 1::2] <= 64).all())
        assert bool((p["boxes"] >= 0).all()) and int(p["labels"].max()) < 3
