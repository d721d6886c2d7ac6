"""Pixel-pair attention kernels that never build the N x N affinity matrix.

Shared by the non-local block (``modules/nonlocal_.py``), SAGAN self-attention (``sagan.py``) and
DANet's position attention (``danet.py``). Every function takes *position-major* tensors:

- queries ``q``: ``(B, N, D)``: one row per output position (N = H*W, T*H*W or L);
- keys ``k``: ``(B, M, D)`` and values ``v``: ``(B, M, Dv)``: one row per key position
  (M = N, or fewer after sub-sampling).

and returns ``(B, N, Dv)``: ``y_i = sum_j w(i, j) v_j``. The ``*_affinity`` functions build the
``(B, N, M)`` weights ``w`` explicitly; they exist for visualisation (``attention_map``) and are
never called by a ``forward``.

Memory and time (per batch element):

================================  ==========================  =================  ==============
weights ``w(i, j)``               function                    time               extra memory
================================  ==========================  =================  ==============
``softmax_j(s * q_i . k_j)``      :func:`softmax_attention`   O(N M D)           O(N D) (SDPA)
``(s * q_i . k_j) / M``           :func:`dot_product_attention`  O((N + M) D Dv)  O(D Dv)
``ReLU(a_i + b_j) / M``           :func:`relu_sum_attention`  O((N + M) log(N + M) + (N + M) Dv)
                                                                                 O((N + M) Dv)
================================  ==========================  =================  ==============

All of them are built from differentiable torch ops (gradients flow to ``q``, ``k``, ``v``, ``a``,
``b``), compile with ``torch.compile(fullgraph=True)``, export with ``torch.export`` and to ONNX
with dynamic batch and sizes. They accept any floating dtype; under autocast the matrix products
run in the autocast dtype. :func:`softmax_attention` is an FX leaf (``torch.fx.wrap``): symbolic
tracing records it as one call, because it chooses its kernel from static tensor properties.

Second derivatives (``torch.autograd.grad(..., create_graph=True)``: gradient penalties, Hessian
products, ``gradgradcheck``). The fused CPU kernel behind SDPA has no derivative of its backward.
:func:`softmax_attention` therefore evaluates the explicit formula ``softmax(s q k^T) v``
(twice differentiable; it builds the ``N x M`` matrix) when the inputs are float64 and gradients
are being recorded, the setting of gradient checks. For double backward in float32 or bfloat16
(e.g. the gradient penalty of a GAN discriminator), run that forward pass under PyTorch's
``torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)``. Ordinary training
never builds the ``N x M`` matrix.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

__all__ = [
    "to_positions",
    "from_positions",
    "softmax_attention",
    "softmax_affinity",
    "dot_product_attention",
    "dot_product_affinity",
    "relu_sum_attention",
    "relu_sum_affinity",
]


def to_positions(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B, N, C)`` with ``N = prod(spatial)``.

    A view whenever the spatial dims can be merged: free for channels-last inputs (the result is
    then contiguous), a transposed view for standard-contiguous ones.
    """
    return x.flatten(2).transpose(1, 2)


def from_positions(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B, N, C)`` -> ``(B, C, *spatial)`` with the spatial size of ``like``.

    A view; for a contiguous ``y`` it has channels-last strides, so a following 1x1 conv runs
    channels-last, and ``like + conv(result)`` keeps the memory format of ``like`` (the first
    operand decides the layout of the result). Copying to ``like``'s layout instead was measured
    no faster on CPU.
    """
    return y.transpose(1, 2).unflatten(2, like.shape[2:])


def _common_dtype(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Cast to one dtype (autocast can leave e.g. raw float32 queries next to bf16 values)."""
    dtype = tensors[-1].dtype
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def _records_float64_grad(*tensors: torch.Tensor) -> bool:
    """Float64 inputs and a graph being recorded: the setting of gradient (and Hessian) checks."""
    return (
        torch.is_grad_enabled()
        and any(t.dtype == torch.float64 for t in tensors)
        and any(t.requires_grad for t in tensors)
    )


def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """``y_i = sum_j softmax_j(scale * q_i . k_j) v_j`` through
    :func:`torch.nn.functional.scaled_dot_product_attention` (fused, O(N D) memory).

    Note the explicit ``scale``: SDPA's own default is ``1/sqrt(D)``, whereas the non-local block,
    SAGAN and DANet use no scaling (``scale=1.0``). In float64 with gradients being recorded it
    uses the explicit, twice-differentiable formula instead (see the module docstring).
    """
    if _records_float64_grad(q, k, v):
        q, k, v = _common_dtype(q, k, v)
        return softmax_affinity(q, k, scale) @ v
    # The fused CPU kernel needs equal query/value widths and a unit stride in the last dim;
    # otherwise SDPA silently falls back to its math path, which builds the (N, M) matrix. Zero
    # columns appended to q and k leave q . k unchanged; zero value columns give zero outputs
    # that are cut off. All copies are O((N + M) max(D, Dv)).
    q, k, v = _common_dtype(q, k, v)
    d, dv = q.shape[-1], v.shape[-1]
    if d < dv:
        q, k = F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d))
    elif dv < d:
        v = F.pad(v, (0, d - dv))
    q, k, v = (t.contiguous().unsqueeze(1) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, scale=scale).squeeze(1)
    return y[..., :dv] if dv < d else y


torch.fx.wrap("softmax_attention")


def softmax_affinity(q: torch.Tensor, k: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The ``(B, N, M)`` weights of :func:`softmax_attention` (materialised; for visualisation)."""
    q, k = _common_dtype(q, k)
    return torch.softmax(scale * (q @ k.transpose(1, 2)), dim=-1)


def dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """``y_i = sum_j (scale * q_i . k_j / M) v_j``, computed as ``q (k^T v) * scale / M``.

    Without a softmax the product re-associates: ``(q k^T) v = q (k^T v)``, where ``k^T v`` is only
    ``(B, D, Dv)``. Time and memory are linear in ``N`` and ``M``. ``M`` (the number of keys) is
    read from the tensor shape, so it follows dynamic sizes in compiled and exported graphs.
    """
    q, k, v = _common_dtype(q, k, v)
    context = torch.bmm(k.transpose(1, 2), v)  # (B, D, Dv); bmm takes the strides as they are
    return torch.bmm(q, context) * (scale / k.shape[1])


def dot_product_affinity(q: torch.Tensor, k: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The ``(B, N, M)`` weights of :func:`dot_product_attention` (materialised)."""
    q, k = _common_dtype(q, k)
    return (q @ k.transpose(1, 2)) * (scale / k.shape[1])


def _count_below(values: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """For every ``thresholds[b, i]``: how many ``values[b, j]`` are strictly below it.

    ``(B, M)``, ``(B, N)`` -> int64 ``(B, N)``. Equivalent to
    ``torch.searchsorted(values.sort().values, thresholds)`` but exportable to ONNX (which has no
    search-sorted operator): sort the concatenation ``[thresholds, values]`` once; the rank of a
    threshold in the merged order minus the thresholds before it is the number of values below it.
    Ties between a value and a threshold may fall either way; callers only use the count where a
    tie contributes exactly zero (``ReLU(0) = 0``).
    """
    n = thresholds.shape[1]
    merged = torch.cat([thresholds, values], dim=1).detach()
    order = torch.sort(merged, dim=1).indices  # (B, N + M)
    is_value = (order >= n).to(torch.int64)
    values_before = torch.cumsum(is_value, dim=1) - is_value  # exclusive prefix count
    per_entry = torch.zeros_like(values_before).scatter(1, order, values_before)
    return per_entry[:, :n]


def relu_sum_attention(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``y_i = sum_j ReLU(a_i + b_j) v_j / M`` exactly, without the ``(N, M)`` matrix.

    This is the non-local "concatenation" pairwise function, ``ReLU(w^T [theta_i, phi_j])`` with
    ``a_i = w_theta . theta_i`` and ``b_j = w_phi . phi_j``. The ReLU is non-zero only where
    ``b_j > -a_i``. With the keys sorted by decreasing ``b`` those form a prefix of length
    ``c_i = #{j : b_j > -a_i}``, and with prefix sums ``P_v`` of ``v`` and ``P_bv`` of ``b v`` in
    that order:

        ``sum_j ReLU(a_i + b_j) v_j = a_i P_v[c_i] + P_bv[c_i]``.

    Shapes: ``a`` ``(B, N)``, ``b`` ``(B, M)``, ``v`` ``(B, M, Dv)`` -> ``(B, N, Dv)``. Gradients
    flow to ``a``, ``b`` (through the sort values and the prefix sums) and ``v``; the counts ``c_i``
    are piecewise constant (derivative 0 almost everywhere), as is the ReLU's indicator.
    """
    a, b, v = _common_dtype(a, b, v)
    b_desc, order = torch.sort(b, dim=1, descending=True)
    v_desc = torch.gather(v, 1, order.unsqueeze(-1).expand_as(v))
    zero = v.new_zeros(v.shape[0], 1, v.shape[2])
    prefix_v = torch.cat([zero, torch.cumsum(v_desc, dim=1)], dim=1)  # (B, M + 1, Dv)
    prefix_bv = torch.cat([zero, torch.cumsum(b_desc.unsqueeze(-1) * v_desc, dim=1)], dim=1)
    count = _count_below(-b, a)  # #{j : -b_j < a_i} = #{j : b_j > -a_i}
    index = count.unsqueeze(-1).expand(-1, -1, v.shape[2])
    y = a.unsqueeze(-1) * torch.gather(prefix_v, 1, index) + torch.gather(prefix_bv, 1, index)
    return y / b.shape[1]


def relu_sum_affinity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The ``(B, N, M)`` weights ``ReLU(a_i + b_j) / M`` of :func:`relu_sum_attention`."""
    a, b = _common_dtype(a, b)
    return torch.relu(a.unsqueeze(-1) + b.unsqueeze(1)) / b.shape[1]
