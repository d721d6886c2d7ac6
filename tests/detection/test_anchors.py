"""k-means anchors with the 1 - IoU distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnzoo.detection import kmeans_anchors
from attnzoo.detection.anchors import shape_iou

torch.set_num_threads(2)
CENTRES = torch.tensor([[12.0, 16.0], [60.0, 35.0], [40.0, 110.0], [220.0, 300.0]])


def clustered(n_per: int = 60, seed: int = 0) -> torch.Tensor:
    """Box sizes around CENTRES, +-8 % multiplicative noise, shuffled."""
    gen = torch.Generator().manual_seed(seed)
    wh = CENTRES.repeat_interleave(n_per, 0) * (
        1 + 0.08 * (2 * torch.rand(4 * n_per, 2, generator=gen) - 1)
    )
    return wh[torch.randperm(len(wh), generator=gen)]


def test_recovers_well_separated_clusters_sorted_by_area() -> None:
    wh = clustered()
    anchors = kmeans_anchors(wh, k=4)
    assert anchors.shape == (4, 2) and anchors.dtype == torch.float32
    expected = CENTRES[(CENTRES[:, 0] * CENTRES[:, 1]).argsort()]
    torch.testing.assert_close(anchors, expected, rtol=0.05, atol=0)
    # a fixed point of the median update: each anchor is the median of the boxes it owns
    owner = shape_iou(wh.double(), anchors.double()).argmax(1)
    for j in range(4):
        torch.testing.assert_close(anchors[j].double(), wh[owner == j].double().median(0).values)


def test_deterministic_and_accepts_numpy() -> None:
    wh = clustered(seed=1)
    first = kmeans_anchors(wh, k=6, seed=3)
    assert torch.equal(first, kmeans_anchors(wh.numpy(), k=6, seed=3))
    areas = first[:, 0] * first[:, 1]
    assert bool((areas[1:] >= areas[:-1]).all())


def test_shape_iou_values() -> None:
    iou = shape_iou(torch.tensor([[2.0, 4.0]]), torch.tensor([[2.0, 4.0], [4.0, 2.0], [1.0, 1.0]]))
    torch.testing.assert_close(iou, torch.tensor([[1.0, 4.0 / 12.0, 1.0 / 8.0]]))


@pytest.mark.parametrize(
    ("wh", "k", "match"),
    [
        (torch.rand(4, 2) + 1, 6, "distinct"),
        (torch.ones(10, 2), 2, "distinct"),
        (torch.tensor([[1.0, 2.0], [0.0, 3.0], [4.0, 5.0]]), 2, "positive"),
        (torch.tensor([[1.0, 2.0], [float("nan"), 3.0], [4.0, 5.0]]), 2, "finite"),
        (torch.rand(10, 3) + 1, 2, r"\(N, 2\)"),
        (torch.rand(10, 2) + 1, 0, "k must be"),
        (np.ones((0, 2)), 1, "distinct"),
    ],
)
def test_bad_input(wh, k: int, match: str) -> None:
    with pytest.raises(ValueError, match=f"kmeans_anchors: .*{match}"):
        kmeans_anchors(wh, k=k)


def test_bad_type() -> None:
    with pytest.raises(TypeError, match="kmeans_anchors: wh"):
        kmeans_anchors([[1.0, 2.0]], k=1)
