"""detector_cam: EigenCAM / Grad-CAM maps of YOLOv4-tiny, detection targets, no side effects."""

from __future__ import annotations

import pytest
import torch

from attnzoo.detection import YoloV4Tiny, decode_outputs, postprocess
from attnzoo.viz import detector_cam
from attnzoo.viz.detection_cam import DetectionScoreTarget, default_detector_target_layers

pytest.importorskip("pytorch_grad_cam")
torch.set_num_threads(2)

SIZE = (64, 96)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return YoloV4Tiny(3, phi=1).eval()


@pytest.fixture(scope="module")
def images():
    """Two different scenes: noise with a bright square top-left / bottom-right."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, *SIZE, generator=gen) * 0.3
    x[0, :, 4:28, 4:28] = 1.0
    x[1, :, 36:60, 60:92] = 1.0
    return x


def hook_counts(m):
    return [
        (
            len(s._forward_hooks),
            len(s._forward_pre_hooks),
            len(s._backward_hooks),
            len(s._full_backward_hooks if hasattr(s, "_full_backward_hooks") else {}),
        )
        for s in m.modules()
    ]


@pytest.mark.parametrize("method", ["eigencam", "gradcam"])
def test_shapes_range_and_per_image_maps(model, images, method):
    maps = detector_cam(model, images, method=method)
    assert maps.shape == (2, *SIZE) and maps.dtype == torch.float32
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    assert all(float(m.max()) > 0.99 for m in maps)  # min-max normalised, not empty
    assert not torch.allclose(maps[0], maps[1], atol=1e-2)
    single = detector_cam(model, images[1:], method=method)
    torch.testing.assert_close(single[0], maps[1], rtol=0, atol=1e-4)  # per image


def test_gradcam_target_follows_the_predictions(model, images):
    with torch.no_grad():
        decoded = decode_outputs(model(images), SIZE)
    # two single detections: the candidates with the best obj * p_0 in the left and right halves
    centre_x = (decoded[0, :, 0] + decoded[0, :, 2]) / 2
    score = decoded[0, :, 4] * decoded[0, :, 5]
    left = int(torch.where(centre_x < SIZE[1] / 3, score, -1).argmax())
    right = int(torch.where(centre_x > 2 * SIZE[1] / 3, score, -1).argmax())

    def preds(i, label):
        return [
            {"boxes": decoded[0, i : i + 1, :4], "labels": torch.tensor([label])},
            {"boxes": decoded[1, :1, :4], "labels": torch.tensor([0])},
        ]

    m_left = detector_cam(model, images, method="gradcam", predictions=preds(left, 0))
    m_right = detector_cam(model, images, method="gradcam", predictions=preds(right, 0))
    m_label = detector_cam(model, images, method="gradcam", predictions=preds(left, 2))
    assert (m_left[0] - m_right[0]).abs().max() > 0.2
    assert (m_left[0] - m_label[0]).abs().max() > 0.05
    torch.testing.assert_close(m_left[1], m_right[1])  # image 1's target did not change
    # the detections' mass sits on their own side of the image
    assert m_left[0, :, : SIZE[1] // 2].sum() > m_left[0, :, SIZE[1] // 2 :].sum()
    assert m_right[0, :, SIZE[1] // 2 :].sum() > m_right[0, :, : SIZE[1] // 2].sum()


def test_gradcam_with_postprocess_predictions_and_an_empty_image(model, images):
    with torch.no_grad():
        preds = postprocess(model(images), SIZE, conf_threshold=0.0, max_detections=5)
    assert all(len(p["boxes"]) == 5 for p in preds)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    maps = detector_cam(model, images, method="gradcam", predictions=[preds[0], empty])
    assert float(maps[0].max()) > 0.99 and float(maps[1].abs().max()) == 0.0


def test_detection_score_target_matches_its_candidates():
    gen = torch.Generator().manual_seed(2)
    xy = torch.rand(50, 2, generator=gen) * 100
    out = torch.cat(
        [xy, xy + 5 + torch.rand(50, 2, generator=gen) * 30, torch.rand(50, 1 + 4, generator=gen)],
        1,
    )
    idx, labels = torch.tensor([7, 31, 7]), torch.tensor([0, 3, 2])
    boxes = out[idx, :4].clamp(max=100.0)  # clipped to a 100x100 image, like postprocess
    got = DetectionScoreTarget(boxes, labels)(out)
    expected = sum(out[i, 4] * out[i, 5 + c] for i, c in zip(idx.tolist(), labels.tolist()))
    torch.testing.assert_close(got, expected)
    empty = DetectionScoreTarget(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert float(empty(out)) == 0


def test_no_side_effects(images):
    torch.manual_seed(3)
    model = YoloV4Tiny(3, phi=4).train()
    model.head_p4[1].weight.requires_grad_(False)
    model.head_p5[1].bias.grad = torch.ones_like(model.head_p5[1].bias)
    hooks = hook_counts(model)
    assert sum(map(sum, hooks)) == 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("eigencam", "gradcam"):
        detector_cam(model, images, method=method)
        assert hook_counts(model) == hooks
        assert all(m.training for m in model.modules())
        assert not model.head_p4[1].weight.requires_grad
        assert model.head_p4[0].conv.weight.requires_grad
        assert torch.equal(model.head_p5[1].bias.grad, torch.ones(24))
        assert model.head_p4[0].conv.weight.grad is None
    after = model.state_dict()  # eval mode inside: BN running statistics untouched
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    bad = {"boxes": torch.zeros(1, 4), "labels": torch.tensor([9])}
    with pytest.raises(ValueError):
        detector_cam(model, images, method="gradcam", predictions=[bad, bad])
    assert hook_counts(model) == hooks and all(m.training for m in model.modules())


def test_target_layers(model, images):
    assert default_detector_target_layers(model) == [model.head_p5[0], model.head_p4[0]]
    by_path = detector_cam(model, images, target_layers="feat1_att")
    by_module = detector_cam(model, images, target_layers=[model.feat1_att])
    torch.testing.assert_close(by_path, by_module)
    assert not torch.allclose(by_path, detector_cam(model, images), atol=1e-2)
    with pytest.raises(ValueError, match="no module 'feat3_att'"):
        detector_cam(model, images, target_layers="feat3_att")
    with pytest.raises(ValueError, match="not part of the model"):
        detector_cam(model, images, target_layers=torch.nn.Conv2d(3, 3, 1))


def test_errors(model, images):
    with pytest.raises(TypeError, match="YoloV4Tiny"):
        detector_cam(torch.nn.Conv2d(3, 3, 1), images)
    with pytest.raises(ValueError, match="method must be one of"):
        detector_cam(model, images, method="scorecam")
    with pytest.raises(ValueError, match="EigenCAM uses no target"):
        detector_cam(model, images, predictions=[{}, {}])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        detector_cam(model, images[0])
    with pytest.raises(ValueError, match="list of 2 dicts"):
        detector_cam(model, images, method="gradcam", predictions=[{}])
    with pytest.raises(ValueError, match="'boxes' and 'labels'"):
        detector_cam(model, images, method="gradcam", predictions=[{}, {}])
    bad = {"boxes": torch.zeros(2, 4), "labels": torch.tensor([0])}
    with pytest.raises(ValueError, match=r"boxes \(M, 4\) and labels \(M,\)"):
        detector_cam(model, images, method="gradcam", predictions=[bad, bad])
    bad = {"boxes": torch.zeros(1, 4), "labels": torch.tensor([3])}
    with pytest.raises(ValueError, match=r"integers in \[0, 3\)"):
        detector_cam(model, images, method="gradcam", predictions=[bad, bad])
