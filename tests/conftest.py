"""Shared fixtures and helpers: building registered modules with reproducible random weights."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

import attnzoo

# Two cores on CI: keep intra-op threads bounded and results deterministic.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def torch_threads():
    """``torch_threads(n)`` sets torch's intra-op thread count for the test; restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


SPATIAL_SIZES = {
    1: [(1,), (7,), (20,)],
    2: [(1, 1), (7, 7), (13, 20)],
    3: [(1, 1, 1), (3, 7, 7), (2, 5, 9)],
}


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and normalisation buffer random, well-scaled values.

    Zero-initialised parts (identity-at-init designs) would otherwise hide most of the maths from
    parity, gradient and export checks.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            std = 1.0 / math.sqrt(fan_in) if p.dim() > 1 else 0.5
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)
    return module


def assert_matches_reference(
    module: nn.Module,
    reference,
    x: torch.Tensor,
    *,
    grad_rtol: float = 1e-10,
    grad_atol: float = 1e-12,
) -> None:
    """``module(x)`` equals ``reference(x)`` (float64: to 1e-12), and so do the gradients with
    respect to ``x`` and every parameter of ``module`` for a random output gradient."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    params = list(module.parameters())
    y, ref = module(x1), reference(x2)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x1, *params], g)
    want = torch.autograd.grad(ref, [x2, *params], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=grad_rtol, atol=grad_atol)


def make(
    name: str,
    channels: int | None = None,
    *,
    seed: int = 0,
    randomize: bool = True,
    preset: str | None = None,
    **kwargs,
) -> nn.Module:
    meta = attnzoo.info(name)
    channels = meta.example_channels if channels is None else channels
    torch.manual_seed(seed)
    module = attnzoo.create(name, channels, preset=preset, **kwargs)
    return randomize_(module, seed) if randomize else module


def example_input(
    name: str,
    batch: int,
    spatial: tuple[int, ...],
    *,
    channels: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 1,
) -> torch.Tensor:
    meta = attnzoo.info(name)
    channels = meta.example_channels if channels is None else channels
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, channels, *spatial), generator=gen, dtype=dtype)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fast_switch_restored():
    """A test (or a README snippet run by one) that turns ``attnzoo.fast`` on leaves it as found."""
    from attnzoo import fast

    state = fast.is_enabled()
    yield
    fast.set_enabled(state)


def forward_backward_pair(
    a: nn.Module,
    b: nn.Module,
    x: torch.Tensor,
    *,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    grad_rtol: float = 1e-5,
    grad_atol: float = 1e-6,
) -> None:
    """Run ``a`` and ``b`` on copies of ``x``, backpropagate the same random gradient through
    both, and assert equal outputs and input gradients (the parameters' ``.grad`` are left set
    for the caller to compare)."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = a(x1), b(x2)
    torch.testing.assert_close(y1, y2, rtol=rtol, atol=atol)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=grad_rtol, atol=grad_atol)
