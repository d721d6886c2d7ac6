"""Self-attention layer of SAGAN.

Zhang, Goodfellow, Metaxas, Odena, "Self-Attention Generative Adversarial Networks", ICML 2019.
Official code (TensorFlow): https://github.com/brain-research/self-attention-gan
(``non_local.py``, ``sn_non_local_block_sim``); the popular PyTorch port:
https://github.com/heykeetae/Self-Attention-GAN (``sagan_models.py``,
``Self_Attn``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.ops import pairwise
from attnzoo.ops.pairwise import from_positions, softmax_affinity, to_positions
from attnzoo.ops.query import Query, pixel_pair_map
from attnzoo.ops.validation import check_choice, check_input, check_positive_int
from attnzoo.registry import register

__all__ = ["SAGANSelfAttention", "sagan_param_count"]

_NAME = "SAGANSelfAttention"
VARIANTS = ("pytorch", "tf")


def _widths(channels: int, variant: str, reduction: int) -> tuple[int, int]:
    """(query/key width, value width): ``C // reduction`` and ``C`` (pytorch) or ``C // 2`` (tf),
    each at least 1."""
    qk = max(1, channels // reduction)
    return qk, channels if variant == "pytorch" else max(1, channels // 2)


def _check_args(channels: int, variant: str, reduction: int) -> None:
    check_positive_int(_NAME, "channels", channels)
    check_choice(_NAME, "variant", variant, VARIANTS)
    check_positive_int(_NAME, "reduction", reduction)


def sagan_param_count(
    channels: int, *, variant: str = "pytorch", reduction: int = 8, pool_ceil_mode: bool = True
) -> int:
    """Closed-form parameter count of :class:`SAGANSelfAttention` (same keywords).

    ``pytorch``: query and key convs ``2 (C d + d)``, value conv ``C^2 + C``, ``gamma`` 1, with
    ``d = max(1, C // reduction)``. ``tf`` (no biases): ``2 C d + C v + v C + 1`` with
    ``v = max(1, C // 2)``.
    """
    _check_args(channels, variant, reduction)
    d, v = _widths(channels, variant, reduction)
    if variant == "pytorch":
        return 2 * (channels * d + d) + channels * v + v + 1
    return 2 * channels * d + 2 * channels * v + 1


@register(
    "sagan",
    family="pixel-pair",
    paper="Self-Attention Generative Adversarial Networks",
    venue="ICML",
    year=2019,
    code="https://github.com/brain-research/self-attention-gan",
    presets={"tf": {"variant": "tf"}},
    param_count=sagan_param_count,
    spatial_dims=2,
    example_channels=64,
    identity_at_init=True,
)
class SAGANSelfAttention(nn.Module):
    """SAGAN self-attention ``out = x + gamma * o`` (Zhang et al., "Self-Attention Generative
    Adversarial Networks", ICML 2019).

    Equation in words: queries ``q = W_q x`` and keys ``k = W_k x`` are 1x1 convs to
    ``C // reduction`` channels; ``beta_ij = softmax_j(q_i . k_j)`` (no scaling); the output at
    position ``i`` is ``o_i = sum_j beta_ij v_j``, added to the input with a learned scalar
    ``gamma`` that starts at 0 (so the layer is the identity at initialisation).

    ``variant`` selects between the two codes in use:

    - ``"pytorch"`` (default; heykeetae's port and DANet's PAM): ``q``, ``k``
      ``C -> C // 8`` and ``v`` ``C -> C``, 1x1 convs **with** bias, all ``N`` positions are keys,
      ``o = attention(v)``.
    - ``"tf"`` (the authors' TensorFlow code, ``sn_non_local_block_sim``): bias-free 1x1 convs,
      ``q``, ``k`` ``C -> C // 8``, ``v`` ``C -> C // 2``; keys and values are max-pooled 2x2
      (stride 2), so ``M = N / 4``; ``o = W_o attention(v)`` with an output conv ``C // 2 -> C``
      (named ``out_conv``). The TF code wraps every conv in spectral normalisation (a training
      regulariser of GANs); apply ``torch.nn.utils.parametrizations.spectral_norm`` to the convs
      to reproduce that.

    The paper's text describes a third layout (``v`` ``C -> C/8`` then ``W_v`` back to ``C``);
    ``variant="tf", reduction=8`` keeps q/k at ``C/8`` but, like the released code, uses ``C/2``
    for the value path.

    Shapes: ``(B, C, H, W)`` -> same shape, dtype and memory format; ``C // 8`` and ``C // 2``
    are at least 1. ``forward`` returns a tensor (the PyTorch port returns ``(out, attention)``)
    and never builds the ``N x M`` matrix: it calls
    :func:`torch.nn.functional.scaled_dot_product_attention` with ``scale=1.0``. Double backward
    (a discriminator's gradient penalty): automatic in float64; in float32 run the forward under
    ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` (see :mod:`attnzoo.ops.pairwise`).

    Args:
        channels: input channels ``C``.
        variant: ``"pytorch"`` (default) or ``"tf"``, see above.
        reduction: query/key reduction (paper's ``k``, 8 in both codes).
        pool_ceil_mode: ``tf`` variant only: the 2x2 pooling of keys/values on odd sizes keeps a
            last partial window (``True``, default; 1x1 maps work), or drops the odd row/column
            like TF's ``'valid'`` pooling (``False``; needs H, W >= 2). Identical on even sizes.

    Attention for visualisation: :meth:`attention_map` returns ``beta`` ``(B, N, M)``.
    """

    def __init__(
        self,
        channels: int,
        *,
        variant: str = "pytorch",
        reduction: int = 8,
        pool_ceil_mode: bool = True,
    ) -> None:
        super().__init__()
        _check_args(channels, variant, reduction)
        d, v = _widths(channels, variant, reduction)
        bias = variant == "pytorch"
        self.channels = channels
        self.variant = variant
        self.reduction = reduction
        self.pool_ceil_mode = bool(pool_ceil_mode)
        self.query_conv = nn.Conv2d(channels, d, kernel_size=1, bias=bias)
        self.key_conv = nn.Conv2d(channels, d, kernel_size=1, bias=bias)
        self.value_conv = nn.Conv2d(channels, v, kernel_size=1, bias=bias)
        if variant == "tf":
            self.out_conv = nn.Conv2d(v, channels, kernel_size=1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(1))

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "pytorch":
            return x
        if not self.pool_ceil_mode and min(x.shape[-2:]) < 2:
            raise ValueError(
                f"{_NAME}: variant='tf' with pool_ceil_mode=False needs H, W >= 2, got input "
                f"shape {tuple(x.shape)}; use pool_ceil_mode=True (the default) for such maps"
            )
        return F.max_pool2d(x, 2, 2, ceil_mode=self.pool_ceil_mode)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_input(_NAME, x, self.channels)
        q = to_positions(self.query_conv(x))
        k = to_positions(self._pool(self.key_conv(x)))
        v = to_positions(self._pool(self.value_conv(x)))
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        o = from_positions(pairwise.softmax_attention(q, k, v, scale=1.0), x)
        if self.variant == "tf":
            o = self.out_conv(o)
        return x + (self.gamma * o).to(x.dtype)  # float32 gamma must not promote bf16 inputs

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """``beta = softmax_j(q_i . k_j)``, ``(B, N, M)`` with ``N = H*W`` (row-major) and
        ``M = N`` (``pytorch``) or the pooled count (``tf``). Rows sum to 1. For visualisation."""
        rows, _ = self.affinity_rows(x)
        return rows(slice(None))

    @torch.no_grad()
    def affinity_rows(
        self, x: torch.Tensor
    ) -> tuple[Callable[[slice], torch.Tensor], tuple[int, ...]]:
        """``(rows, key_shape)``: ``rows(queries)`` gives the rows of :meth:`attention_map` for a
        slice of the ``N`` query positions, ``(B, n, M)``; ``key_shape`` is the keys' ``(h, w)``
        (pooled in the ``tf`` variant). No ``N x M`` matrix unless asked for all rows."""
        q, k, _ = self._qkv(x)
        key_shape = tuple(self._pool(x[:, :1]).shape[2:])
        return (lambda sl: softmax_affinity(q[:, sl], k, scale=1.0)), key_shape

    #: the maps depend on ``query`` (see :mod:`attnzoo.ops.query`)
    attention_query: ClassVar[bool] = True

    def attention_maps(self, x: torch.Tensor, *, query: Query = "mean") -> dict[str, torch.Tensor]:
        """``{"spatial": (B, h', w')}``: the row of :meth:`attention_map` of the query point
        ``query`` (``(y, x)`` or fractions in ``[0, 1]``), or (``"mean"``) the mean over all
        query rows, on the key grid (``variant="tf"``: 2x2 max-pooled, ``ceil(H/2), ceil(W/2)``).
        Computed from :meth:`affinity_rows`, never the ``N x M`` matrix."""
        rows, keys = self.affinity_rows(x)
        where = f"{type(self).__name__}.attention_maps"
        return {"spatial": pixel_pair_map(rows, keys, x, query, where)}

    def extra_repr(self) -> str:
        return f"{self.channels}, variant={self.variant!r}, reduction={self.reduction}"
