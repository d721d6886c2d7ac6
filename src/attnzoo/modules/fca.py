"""Multi-spectral channel attention (FcaNet).

Qin, Zhang, Wu, Li, "FcaNet: Frequency Channel Attention Networks", ICCV 2021.
Official code: https://github.com/cfzd/FcaNet (``model/layer.py``: ``MultiSpectralAttentionLayer``,
``MultiSpectralDCTLayer``, ``get_freq_indices``).
"""

from __future__ import annotations

import math

import torch
import torch.fx
from torch import Tensor, nn

from attnzoo.ops.query import Query
from attnzoo.ops.validation import check_choice, check_input, check_positive_int
from attnzoo.registry import register

__all__ = [
    "FREQ_SEL_METHODS",
    "MultiSpectralAttention",
    "MultiSpectralDCT",
    "fca_param_count",
    "frequency_indices",
    "dct_filters",
]

_NAME = "MultiSpectralAttention"

# The official 7x7 frequency orders (u, v): "top" by the single-frequency ImageNet accuracies of
# the paper's ablation, "low" in zig-zag order from (0, 0), "bot" the worst first; one digit per
# frequency, u in the first string, v in the second.
_ORDERS = {
    "top": ("00600114513000324635526553342261", "01052020060463526333511242113053"),
    "low": ("00110221203401301234501234561234", "01012012230043154321065432106543"),
    "bot": ("61332412445146256162243355625536", "64466314456522514350311242115333"),
}
#: the official ``freq_sel_method`` values
FREQ_SEL_METHODS = tuple(f"{k}{n}" for k in ("top", "bot", "low") for n in (1, 2, 4, 8, 16, 32))


def frequency_indices(method: str) -> tuple[list[int], list[int]]:
    """The official ``get_freq_indices``: the first ``n`` frequencies ``(u, v)`` of a 7x7 DCT
    in the order ``top``, ``bot`` or ``low`` (``method = "top16"`` etc.)."""
    check_choice(_NAME, "freq_sel_method", method, FREQ_SEL_METHODS)
    xs, ys = _ORDERS[method[:3]]
    n = int(method[3:])
    return [int(u) for u in xs[:n]], [int(v) for v in ys[:n]]


def _basis(pos: int, freq: int, size: int) -> float:
    """Orthonormal DCT-II basis ``cos(pi f (p + 1/2) / N) / sqrt(N)``, times ``sqrt 2`` if
    ``f > 0``."""
    value = math.cos(math.pi * freq * (pos + 0.5) / size) / math.sqrt(size)
    return value if freq == 0 else value * math.sqrt(2)


def dct_filters(channels: int, size: tuple[int, int], method: str = "top16") -> Tensor:
    """The fixed filter bank ``(C, h, w)``: channel group ``i`` (``C / n`` channels) holds the 2-D
    DCT basis of frequency ``(u_i, v_i)``, the 7x7 frequencies scaled by ``h // 7``, ``w // 7``."""
    us, vs = frequency_indices(method)
    h, w = size
    part = channels // len(us)
    bank = torch.zeros(channels, h, w, dtype=torch.float64)
    for i, (u, v) in enumerate(zip(us, vs)):
        u, v = u * (h // 7), v * (w // 7)
        col = torch.tensor([_basis(t, u, h) for t in range(h)], dtype=torch.float64)
        row = torch.tensor([_basis(t, v, w) for t in range(w)], dtype=torch.float64)
        bank[i * part : (i + 1) * part] = col[:, None] * row[None, :]
    return bank.float()


def _pool_matrix(out: int, size: int, like: Tensor) -> Tensor:
    """``(out, size)`` matrix of adaptive average pooling along one axis: row ``p`` averages the
    input bin ``[floor(p size / out), ceil((p + 1) size / out))``, as
    ``adaptive_avg_pool2d``. Built from the (possibly symbolic) size, so exported graphs keep
    dynamic sizes; the identity when ``size == out``. An FX leaf: it reads a size."""
    p = torch.arange(out, device=like.device)
    start = torch.div(p * size, out, rounding_mode="floor")
    end = torch.div((p + 1) * size + out - 1, out, rounding_mode="floor")
    pos = torch.arange(size, device=like.device)
    inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]


torch.fx.wrap("_pool_matrix")


def _check_args(channels: int, reduction: int, freq_sel_method: str, dct_size: object) -> tuple:
    check_positive_int(_NAME, "channels", channels)
    check_positive_int(_NAME, "reduction", reduction)
    us, _ = frequency_indices(freq_sel_method)
    if channels % len(us):
        raise ValueError(
            f"{_NAME}: channels ({channels}) must be divisible by the number of frequencies "
            f"({len(us)}) of freq_sel_method={freq_sel_method!r}"
        )
    size = (dct_size, dct_size) if isinstance(dct_size, int) else dct_size
    if not (
        isinstance(size, tuple | list)
        and len(size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 7 for s in size)
    ):
        raise ValueError(
            f"{_NAME}: dct_size must be an int >= 7 or (h, w) of such ints; got {dct_size!r}"
        )
    return int(size[0]), int(size[1])


def fca_param_count(
    channels: int,
    *,
    reduction: int = 16,
    freq_sel_method: str = "top16",
    dct_size: int | tuple[int, int] = 7,
) -> int:
    """Closed-form parameter count of :class:`MultiSpectralAttention`: ``2 C h`` with
    ``h = max(1, C // reduction)`` (two bias-free linear layers; the DCT filters are a fixed
    buffer, not parameters)."""
    _check_args(channels, reduction, freq_sel_method, dct_size)
    return 2 * channels * max(1, channels // reduction)


class MultiSpectralDCT(nn.Module):
    """The official ``MultiSpectralDCTLayer``: ``y_c = sum_{i,j} x_{c,i,j} D_{c,i,j}`` with the
    fixed filter bank ``weight`` (a buffer, :func:`dct_filters`) on an ``(h, w)`` input."""

    def __init__(self, channels: int, size: tuple[int, int], method: str) -> None:
        super().__init__()
        self.weight: Tensor
        self.register_buffer("weight", dct_filters(channels, size, method))

    def forward(self, x: Tensor) -> Tensor:
        return (x * self.weight).sum((2, 3))


@register(
    "fca",
    family="channel",
    paper="FcaNet: Frequency Channel Attention Networks",
    venue="ICCV",
    year=2021,
    code="https://github.com/cfzd/FcaNet",
    param_count=fca_param_count,
    spatial_dims=2,
    example_channels=64,
)
class MultiSpectralAttention(nn.Module):
    """FcaNet's multi-spectral channel attention: SE whose squeeze is a bank of fixed 2-D DCT
    filters instead of the mean (Qin et al., "FcaNet: Frequency Channel Attention Networks",
    ICCV 2021).

    Equation in words: the input is average-pooled to the DCT size ``(h, w)`` (adaptive pooling;
    nothing changes when it already has that size); the channels are split into ``n`` groups (16
    for ``"top16"``), group ``i`` is compressed by the 2-D DCT basis of frequency ``(u_i, v_i)``:
    ``Freq_c = sum_{i,j} x_{c,i,j} B^{u,v}_{i,j}`` (frequency ``(0, 0)`` is ``sqrt(h w)`` times
    the mean, i.e. SE's squeeze); then ``s = sigmoid(W2 ReLU(W1 Freq))`` with bias-free
    ``W1: C -> C / r``, ``W2: C / r -> C``; ``y = x * s``.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``, ``C`` divisible by ``n``. Any ``H, W`` (also
    smaller than the DCT size, where adaptive pooling repeats input pixels).

    Defaults from the official ``MultiSpectralAttentionLayer(C, dct_h, dct_w, reduction=16,
    freq_sel_method="top16")``: the "top16" frequencies (every official selection is
    ``freq_sel_method``: ``top``/``bot``/``low`` with 1, 2, 4, 8, 16 or 32 frequencies; see
    :data:`FREQ_SEL_METHODS`), DCT size 7x7. The official ResNets use ``dct_size`` equal to the
    stage's feature size at 224x224 input (``{64: 56, 128: 28, 256: 14, 512: 7}[planes]``, the
    7x7 frequencies scaled by ``dct_size // 7``): pass ``dct_size=56`` etc. to reproduce them.
    Names (``dct_layer.weight``, ``fc.0``, ``fc.2``) follow the official code, so its state
    dicts load.

    Difference from the official code: the official layer calls ``adaptive_avg_pool2d`` only
    when the input size differs from the DCT size, a branch on the size that breaks exported
    graphs with dynamic sizes. Here the pooling is always applied, written as two small matrix
    products ``A_h X A_w^T`` whose ``(h, H)`` and ``(w, W)`` averaging matrices are built from the
    input's size; they are identities when the size matches, so the result is the official one at
    every size, and ONNX / ``torch.export`` graphs stay dynamic.

    Args:
        channels: input channels ``C``.
        reduction: ``r``; the bottleneck is ``max(1, C // r)`` wide.
        freq_sel_method: the frequency selection, ``"top16"`` (official default).
        dct_size: ``(h, w)`` (or one int) of the DCT, at least 7.

    Attention: the gate ``s`` ``(B, C, 1, 1)`` is the output of the submodule ``self.fc[3]``
    (``nn.Sigmoid``, also ``self.gate``) and of :meth:`attention_map`.
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 16,
        freq_sel_method: str = "top16",
        dct_size: int | tuple[int, int] = 7,
    ) -> None:
        super().__init__()
        self.dct_h, self.dct_w = _check_args(channels, reduction, freq_sel_method, dct_size)
        self.channels = channels
        self.freq_sel_method = freq_sel_method
        hidden = max(1, channels // reduction)
        self.dct_layer = MultiSpectralDCT(channels, (self.dct_h, self.dct_w), freq_sel_method)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    @property
    def gate(self) -> nn.Module:
        """The final sigmoid (``self.fc[3]``)."""
        return self.fc[3]

    def pool(self, x: Tensor) -> Tensor:
        """Adaptive average pooling to the DCT size ``(B, C, h, w)``, as matrix products."""
        a_h = _pool_matrix(self.dct_h, x.shape[2], x)
        a_w = _pool_matrix(self.dct_w, x.shape[3], x)
        return torch.einsum("ph,bchw,qw->bcpq", a_h, x, a_w)

    def forward(self, x: Tensor) -> Tensor:
        """``x * sigmoid(W2 ReLU(W1 DCT(pool(x))))``."""
        return x * self.attention_map(x)

    def attention_map(self, x: Tensor) -> Tensor:
        """The channel gate ``s``, ``(B, C, 1, 1)``."""
        check_input(_NAME, x, self.channels)
        freq = self.dct_layer(self.pool(x))  # (B, C)
        return self.fc(freq)[:, :, None, None].to(x.dtype)

    def attention_maps(self, x: Tensor, *, query: Query = "mean") -> dict[str, Tensor]:
        """``{"channel": s}`` as ``(B, C)``; ``query`` is ignored."""
        return {"channel": self.attention_map(x).flatten(1)}

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, freq_sel_method={self.freq_sel_method!r}, "
            f"dct_size=({self.dct_h}, {self.dct_w})"
        )
