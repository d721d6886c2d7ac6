"""Helpers shared by the pixel-pair tests (non-local, SAGAN, DANet).

- :func:`assert_same_forward_and_grads` compares a module with a reference formula on the same
  parameters: outputs, and gradients of a random projection w.r.t. the input and every
  parameter;
- :class:`LargestTensor` records the largest tensor any aten op produces, to prove that no
  ``N x M`` affinity is built.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def assert_same_forward_and_grads(
    module: nn.Module,
    reference: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    atol: float = 1e-10,
    rtol: float = 1e-10,
) -> None:
    """``module(x)`` equals ``reference(x)``, and so do the gradients of ``<y, r>`` with respect to
    ``x`` and to every parameter of ``module`` (the reference reads the same parameters)."""
    x = x.detach().clone().requires_grad_()
    params = [p for p in module.parameters()]
    names = ["input"] + [n for n, _ in module.named_parameters()]
    y = module(x)
    y_ref = reference(x)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    r = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad((y * r).sum(), [x, *params], allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * r).sum(), [x, *params], allow_unused=True)
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert g is not None and g_ref is not None, f"no gradient for {name}"
        torch.testing.assert_close(
            g, g_ref, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}"
        )


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0
        self.op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out
