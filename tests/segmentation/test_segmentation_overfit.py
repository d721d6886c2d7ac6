"""danet_small learns the built-in scenes: a tiny overfit well above the all-background mIoU."""

from __future__ import annotations

import pytest
import torch

from attnzoo.datasets import SegmentationDataset, scenes_segmentation
from attnzoo.segmentation import SEGMENTATION_MODELS, SegmentationLoss, SegmentationMetrics


@pytest.fixture
def one_thread(torch_threads):
    """The model is tiny: a second thread only adds synchronisation (badly so on a busy CPU)."""
    torch_threads(1)


def test_danet_small_overfits_a_few_scenes(one_thread):
    train, _ = scenes_segmentation(4, 1, canvas=32, objects=(1, 2), scales=(2, 3), seed=0)
    ds = SegmentationDataset(train, train=False)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.stack([ds[i][1] for i in range(len(ds))])
    torch.manual_seed(0)
    model = SEGMENTATION_MODELS["danet_small"](11)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = SegmentationLoss("official")
    model.train()
    for _ in range(40):
        loss = loss_fn(model(x), y)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ours, background = SegmentationMetrics(11), SegmentationMetrics(11)
    with torch.no_grad():
        ours.update(model(x)["out"], y)
    background.update(torch.zeros_like(y), y)
    miou, base = ours.compute()["miou"].item(), background.compute()["miou"].item()
    assert base < 0.2  # background IoU ~0.9 over the ~6 classes present
    assert miou > 0.4 and miou > 2.5 * base
