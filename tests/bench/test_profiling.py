"""attnzoo.bench.profiling: FLOP rules on a hand-counted model, rows, formats, memory."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.bench.profiling import (
    count_flops,
    format_rows,
    peak_memory_mb,
    profile,
    profile_model,
)

torch.set_num_threads(2)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.conv(x)))
        h = h * torch.sigmoid(h.mean((2, 3), keepdim=True))
        return torch.softmax(self.pool(h), dim=1)


def test_flop_rules_on_a_hand_counted_model() -> None:
    flops, extra = count_flops(Tiny().eval(), torch.randn(1, 3, 8, 8))
    assert flops == 2 * (8 * 8 * 8) * (3 * 3 * 3)  # 2 per multiply-add, conv only
    n = 8 * 8 * 8  # elements of the 8-channel 8x8 map
    expected = (
        2 * n  # BatchNorm: scale and shift
        + n  # ReLU
        + n  # mean over H, W (1 per input element)
        + 8  # sigmoid on the 8 means
        + n  # h * gate
        + 128 * 4  # 2x2 max-pool: 4 per output element, 8x4x4 outputs
        + 3 * 128
    )  # softmax: 3 per element
    assert extra == expected


def test_profile_rows_for_a_builder() -> None:
    rows = profile("resnet18", ["none", "se"], input_size=32, min_run_time=0.01, memory=False)
    assert [r.attention for r in rows] == ["none", "se"]
    base, se = rows
    se_params = sum(
        attnzoo.info("se").count_params(c) for c in [64] * 2 + [128] * 2 + [256] * 2 + [512] * 2
    )
    assert base.params == 11_689_512 and se.params_delta == se_params
    # SE's FCs are counted by FlopCounterMode as matmuls: 2 * (C * C/16) * 2 per block
    fc = sum(2 * 2 * c * (c // 16) for c in [64] * 2 + [128] * 2 + [256] * 2 + [512] * 2)
    assert se.flops - base.flops == fc
    assert se.extra_flops > base.extra_flops
    assert base.latency_ms is not None and base.latency_ms > 0 and base.peak_mb is None
    assert base.gmacs == base.flops / 2e9
    with pytest.raises(ValueError, match="Did you mean 'resnet50'"):
        profile("resnet5", ["none"])


def test_profile_single_module_and_memory() -> None:
    row = profile(Tiny(), torch.randn(2, 3, 8, 8), min_run_time=0.01)
    assert row.params == 8 * 27 + 16 and row.batch_size == 2 and row.peak_mb is None

    class Big(nn.Module):  # a 4 MiB temporary that the forward allocates and frees
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.repeat(1, 1024, 1, 1).sum()

    x = torch.randn(1, 1, 32, 32)
    peak = peak_memory_mb(Big(), x)
    assert peak is not None and 4.0 <= peak < 4.5
    row = profile_model(Tiny(), input_size=16, min_run_time=0.01)
    assert row.peak_mb is not None and row.peak_mb > 0


def test_formats() -> None:
    rows = profile("resnet18", ["none", "eca"], input_size=32, latency=False, memory=False)
    data = json.loads(format_rows(rows, "json"))
    assert [d["attention"] for d in data] == ["none", "eca"] and data[1]["params_delta"] > 0
    assert data[0]["latency_ms"] is None and data[0]["gmacs"] == rows[0].gmacs
    parsed = list(csv.DictReader(io.StringIO(format_rows(rows, "csv"))))
    assert int(parsed[1]["params"]) == rows[1].params and parsed[1]["attention"] == "eca"
    md = format_rows(rows, "md").splitlines()
    assert len(md) == 4 and md[0].startswith("| model | attention | params")
    assert "| resnet18 | eca |" in md[3] and "n/a" in md[3]
    table = format_rows(rows, "table").splitlines()
    assert table[0].split()[:3] == ["model", "attention", "params"] and len(table) == 4
    with pytest.raises(ValueError, match="format must be"):
        format_rows(rows, "xml")


@pytest.mark.parametrize("attention", ["cbam", "eca"])
def test_flops_count_the_plain_path_even_with_the_fast_switch_on(attention) -> None:
    # attnzoo.fast's custom ops hide their elementwise work from the counters, so counting
    # switches them off: an accelerated model counts what its plain twin counts.
    from attnzoo import fast

    model = attnzoo.models.resnet18(attention=attention).eval()
    x = torch.randn(1, 3, 32, 32)
    plain_counts = count_flops(model, x)
    fast.accelerate(model)
    assert type(model.layer1[0].attention).__name__.startswith("Fast")
    with fast.enabled():
        assert count_flops(model, x) == plain_counts
