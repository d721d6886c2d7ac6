"""SegmentationLoss: hand-computed cross-entropy, ignore_index, preset weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.segmentation import LOSS_WEIGHTS, SegmentationLoss


def _ce(logits: list[float], label: int) -> float:
    return -(logits[label] - math.log(sum(math.exp(v) for v in logits)))


def test_cross_entropy_by_hand_with_ignore_index():
    # one image, 2 classes, 1 x 3 pixels; the third pixel is ignored
    logits = torch.tensor([[[[2.0, 0.0, 5.0]], [[1.0, 3.0, -5.0]]]])
    target = torch.tensor([[[0, 1, 255]]])
    expected = (_ce([2.0, 1.0], 0) + _ce([0.0, 3.0], 1)) / 2
    parts = SegmentationLoss("official")({"out": logits}, target)
    assert parts["out"].item() == pytest.approx(expected, rel=1e-6)
    assert parts["loss"].item() == pytest.approx(expected, rel=1e-6)
    changed = logits.clone()
    changed[..., 2] = torch.tensor([-9.0, 9.0])[:, None]  # the ignored pixel does not count
    assert SegmentationLoss()({"out": changed}, target)["loss"].item() == pytest.approx(expected)


def test_preset_weights():
    assert LOSS_WEIGHTS["official"] == {"out": 1.0, "pam": 1.0, "cam": 1.0}
    assert LOSS_WEIGHTS["mmseg"] == {"out": 1.0, "pam": 1.0, "cam": 1.0, "aux": 0.4}
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0] = 255
    outs = {k: torch.randn(2, 3, 4, 5) for k in ("out", "pam", "cam", "aux")}
    ce = {k: F.cross_entropy(v, target, ignore_index=255) for k, v in outs.items()}
    official = SegmentationLoss("official")({k: outs[k] for k in ("out", "pam", "cam")}, target)
    torch.testing.assert_close(official["loss"], ce["out"] + ce["pam"] + ce["cam"])
    mmseg = SegmentationLoss("mmseg")(outs, target)
    torch.testing.assert_close(mmseg["aux"], 0.4 * ce["aux"])
    torch.testing.assert_close(mmseg["loss"], ce["out"] + ce["pam"] + ce["cam"] + 0.4 * ce["aux"])
    single = SegmentationLoss("mmseg")({"out": outs["out"]}, target)  # absent outputs skipped
    torch.testing.assert_close(single["loss"], ce["out"])
    with pytest.raises(ValueError, match="aux"):
        SegmentationLoss("official")(outs, target)


def test_all_ignored_gives_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = SegmentationLoss()({"out": logits}, torch.full((1, 2, 2), 255))["loss"]
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="preset"):
        SegmentationLoss("paper")
    with pytest.raises(TypeError, match="int64"):
        SegmentationLoss()({"out": torch.randn(1, 2, 3, 3)}, torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="does not match"):
        SegmentationLoss()({"out": torch.randn(1, 2, 4, 3)}, torch.zeros(1, 3, 3, dtype=torch.long))
