"""attnzoo.fast.FastMultiScaleRoIAlign: torchvision's pooler, its CPU inference on threads."""

from __future__ import annotations

import threading
from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from attnzoo import fast
from attnzoo.fast import poolers

NAMES = ["0", "1", "2", "3"]
IMAGE_SIZES = [(512, 640), (384, 512)]  # large enough for boxes of every level


def _features(channels: int = 8) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sizes = [(128, 160), (64, 80), (32, 40), (16, 20)]  # strides 4 .. 32
    maps = {n: torch.randn(2, channels, h, w, generator=g) for n, (h, w) in zip(NAMES, sizes)}
    maps["pool"] = torch.randn(2, channels, 2, 3, generator=g)  # not pooled from
    return OrderedDict(maps)


def _boxes(counts: tuple[int, ...] = (150, 90)) -> list[torch.Tensor]:
    """Boxes of every scale (tiny to image-sized), so every pyramid level gets RoIs."""
    g = torch.Generator().manual_seed(1)
    out = []
    for n, (h, w) in zip(counts, IMAGE_SIZES):
        side = torch.exp(torch.rand(n, 2, generator=g) * 6.4) + 1  # 2 .. 600 px
        centre = torch.rand(n, 2, generator=g) * torch.tensor([w, h])
        xy1 = (centre - side / 2).clamp(min=0)
        xy2 = torch.minimum(centre + side / 2, torch.tensor([w, h], dtype=torch.float32))
        whole = torch.tensor([[0.0, 0.0, w, h]] * min(n, 3))  # the coarsest level's
        out.append(torch.cat([torch.cat([xy1, xy2], dim=1), whole]))
    return out


class _Threads:
    """Names of the threads torchvision's ``roi_align`` is called from through the pooler."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        inner = poolers.roi_align

        def recorded(*args, **kwargs):
            self.names.append(threading.current_thread().name)
            return inner(*args, **kwargs)

        monkeypatch.setattr(poolers, "roi_align", recorded)

    def threaded(self) -> bool:
        return any(n.startswith("attnzoo-roi-align") for n in self.names)


@pytest.fixture
def two_threads(torch_threads):
    torch_threads(2)


def _pair(names=NAMES) -> tuple[MultiScaleRoIAlign, MultiScaleRoIAlign]:
    ref = MultiScaleRoIAlign(names, 7, 2)
    return ref, fast.accelerate(MultiScaleRoIAlign(names, 7, 2))


@pytest.mark.parametrize("names", [NAMES, ["1"]], ids=["four-levels", "one-level"])
def test_threaded_inference_equals_torchvision_bit_for_bit(names, two_threads, monkeypatch):
    ref, accel = _pair(names)
    assert type(accel) is fast.FastMultiScaleRoIAlign
    x, boxes = _features(), _boxes()
    calls = _Threads(monkeypatch)
    with torch.no_grad(), fast.enabled():
        got = accel(x, boxes, IMAGE_SIZES)
    assert calls.threaded()
    with torch.no_grad():
        want = ref(x, boxes, IMAGE_SIZES)
    assert got.shape == (sum(len(b) for b in boxes), 8, 7, 7) and len(got) > 200
    assert torch.equal(got, want)
    if len(names) > 1:  # the boxes do reach every level
        levels = ref.map_levels(boxes)
        assert set(levels.flatten().tolist()) == {0, 1, 2, 3}


def test_images_without_boxes(two_threads):
    ref, accel = _pair()
    x, boxes = _features(), _boxes((0, 40))
    with torch.no_grad(), fast.enabled():
        got = accel(x, boxes, IMAGE_SIZES)
        empty = accel(x, [b[:0] for b in boxes], IMAGE_SIZES)
        assert torch.equal(got, ref(x, boxes, IMAGE_SIZES))
    assert empty.shape == (0, 8, 7, 7)


@pytest.mark.parametrize("case", ["switch-off", "grad", "one-thread"])
def test_torchvision_forward_runs_outside_cpu_inference(case, two_threads, monkeypatch):
    ref, accel = _pair()
    x, boxes = _features(), _boxes()
    if case == "grad":
        x = OrderedDict((k, v.requires_grad_()) for k, v in x.items())
    if case == "one-thread":
        torch.set_num_threads(1)  # the fixture restores the count
    calls = _Threads(monkeypatch)
    with torch.set_grad_enabled(case == "grad"), fast.enabled(case != "switch-off"):
        got = accel(x, boxes, IMAGE_SIZES)
    assert calls.names == []  # torchvision's own module called its own roi_align
    torch.testing.assert_close(got, ref(x, boxes, IMAGE_SIZES), rtol=0, atol=0)
    if case == "grad":
        got.sum().backward()
        assert all(v.grad is not None for k, v in x.items() if k in NAMES)


def test_plain_swaps_back():
    _, accel = _pair()
    assert type(fast.plain(accel)) is MultiScaleRoIAlign


def test_detection_builders_use_it_while_the_switch_is_on(two_threads, monkeypatch):
    from attnzoo.detection import cascade_rcnn_small

    torch.manual_seed(0)
    off = cascade_rcnn_small(3).eval()
    with fast.enabled():
        on = cascade_rcnn_small(3).eval()
    assert type(off.roi_heads.box_roi_pool) is MultiScaleRoIAlign
    assert type(on.roi_heads.box_roi_pool) is fast.FastMultiScaleRoIAlign
    on.load_state_dict(off.state_dict())
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    with torch.no_grad():
        want = off(images)
        calls = _Threads(monkeypatch)
        with fast.enabled():
            got = on(images)
    assert calls.threaded()
    assert sum(len(d["boxes"]) for d in want) > 0
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
