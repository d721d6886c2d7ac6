"""Non-local blocks (1-D, 2-D, 3-D) with the four pairwise functions of the paper.

Wang, Girshick, Gupta, He, "Non-local Neural Networks", CVPR 2018.
Official code (Caffe2): https://github.com/facebookresearch/video-nonlocal-net
(``lib/models/nonlocal_helper.py``); the widely used PyTorch port is
https://github.com/AlexHex7/Non-local_pytorch (``lib/non_local_*.py``).

The file is called ``nonlocal_.py`` because ``nonlocal`` is a Python keyword.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.ops import pairwise
from attnzoo.ops.pairwise import (
    dot_product_affinity,
    dot_product_attention,
    from_positions,
    relu_sum_affinity,
    relu_sum_attention,
    softmax_affinity,
    to_positions,
)
from attnzoo.ops.query import Query, pixel_pair_map
from attnzoo.ops.validation import check_choice, check_input, check_positive_int
from attnzoo.registry import register

__all__ = ["NonLocal1d", "NonLocal2d", "NonLocal3d", "nonlocal_param_count"]

MODES = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")
_SOFTMAX_MODES = ("embedded_gaussian", "gaussian")
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {2: F.max_pool2d, 3: F.max_pool3d}
#: sub-sampling window: 2 along every spatial axis, but never along time in 3-D (official code)
_POOL_KERNEL = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}


def _inter(channels: int, inter_channels: int | None) -> int:
    """Embedding width: ``C // 2`` and at least 1 (official), unless given."""
    return max(1, channels // 2) if inter_channels is None else inter_channels


def _check_args(
    cls_name: str, channels: int, mode: str, inter_channels: int | None, use_scale: bool
) -> int:
    check_positive_int(cls_name, "channels", channels)
    check_choice(cls_name, "mode", mode, MODES)
    if inter_channels is not None:
        check_positive_int(cls_name, "inter_channels", inter_channels)
    if use_scale and mode not in _SOFTMAX_MODES:
        raise ValueError(
            f"{cls_name}: use_scale=True applies only to the softmax modes {_SOFTMAX_MODES} (as in "
            f"the official code, which scales only before its softmax); got mode={mode!r}. "
            "Pass use_scale=False."
        )
    return _inter(channels, inter_channels)


def nonlocal_param_count(
    channels: int,
    *,
    mode: str = "embedded_gaussian",
    inter_channels: int | None = None,
    sub_sample: bool = True,
    bn_layer: bool = True,
    use_scale: bool = False,
    pool_before_conv: bool = False,
    pool_ceil_mode: bool = True,
) -> int:
    """Closed-form parameter count of :class:`NonLocal2d` (and 1-D/3-D; same keywords).

    With ``I = inter_channels``: ``g`` conv ``C I + I``; ``theta`` and ``phi`` convs ``2 (C I + I)``
    (not in gaussian mode); output conv ``W`` ``I C + C``; its BatchNorm ``2 C`` (``bn_layer``);
    the concatenation projection ``2 I`` (no bias).
    """
    inter = _check_args("NonLocal", channels, mode, inter_channels, use_scale)
    conv = channels * inter + inter
    count = conv + (0 if mode == "gaussian" else 2 * conv) + inter * channels + channels
    count += 2 * channels if bn_layer else 0
    count += 2 * inter if mode == "concatenation" else 0
    return count


class _NonLocalNd(nn.Module):
    """Non-local block: ``z = x + W(y)``, ``y_i = 1/C(x) sum_j f(x_i, x_j) g(x_j)`` (Wang et al.,
    "Non-local Neural Networks", CVPR 2018).

    Equation in words: every output position ``i`` receives a weighted sum of the embeddings
    ``g(x_j) = W_g x_j`` of all (key) positions ``j``, the weights being a pairwise affinity
    ``f(x_i, x_j)`` normalised by ``C(x)``; a 1x1 convolution ``W`` (+ BatchNorm) maps the result
    back to ``C`` channels and it is added to the input. ``mode`` chooses ``f`` and ``C(x)``:

    - ``"embedded_gaussian"`` (default): ``softmax_j(theta_i . phi_j)`` with ``theta``/``phi``
      1x1 convs ``C -> inter_channels``;
    - ``"gaussian"``: ``softmax_j(x_i . x_j)`` on the raw input, no theta/phi convs (with
      ``sub_sample`` the keys are the max-pooled input, as in the PyTorch port);
    - ``"dot_product"``: ``theta_i . phi_j / M``;
    - ``"concatenation"``: ``ReLU(w^T [theta_i, phi_j]) / M`` with a learned ``w`` (a bias-free
      1x1 conv ``2 inter -> 1`` named ``concat_project``, as in the PyTorch port).

    ``M`` is the number of key positions (``N`` = T*H*W, or the sub-sampled count): the official
    code divides by the affinity's last dimension.

    Shapes: ``(B, C, L)`` / ``(B, C, H, W)`` / ``(B, C, T, H, W)`` -> same shape, dtype and memory
    format. ``forward`` never materialises the ``N x M`` affinity: the softmax modes call
    :func:`torch.nn.functional.scaled_dot_product_attention` (``scale=1`` unless ``use_scale``),
    dot_product is evaluated as ``theta (phi^T g) / M`` (linear in N), and concatenation exactly
    with a sort and prefix sums in O((N + M) log(N + M)) (:mod:`attnzoo.ops.pairwise`).
    :meth:`attention_map` returns the ``(B, N, M)`` weights ``f / C(x)`` for visualisation.
    Double backward of the softmax modes: automatic in float64; in float32 under
    ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` (see :mod:`attnzoo.ops.pairwise`).

    Args:
        channels: input channels ``C``.
        mode: pairwise function, one of ``"embedded_gaussian"``, ``"gaussian"``,
            ``"dot_product"``, ``"concatenation"``.
        inter_channels: embedding width; ``None`` means ``C // 2`` (at least 1), as in both
            official codes.
        sub_sample: max-pool ``phi`` and ``g`` (the keys and values, never the queries) with a
            2 (1-D), 2x2 (2-D) or 1x2x2 (3-D, time not pooled) window and stride; the output keeps
            the query positions. Default ``True`` (the facebookresearch config ``USE_MAXPOOL`` and
            the PyTorch port).
        bn_layer: ``W`` is a 1x1 conv followed by BatchNorm whose weight and bias start at 0
            (official). Without BN, ``W``'s weight and bias start at 0. Either way the block is the
            identity at initialisation.
        use_scale: multiply the affinity by ``d ** -0.5`` before the softmax, ``d`` being the
            length of the vectors in the dot product (``inter_channels``; ``C`` in gaussian mode).
            The facebookresearch code does this (``USE_SCALE = True``, ``dim_inner ** -0.5``); the
            paper's equations and the PyTorch port do not, hence default ``False``. Only valid in
            the softmax modes (the official code scales only before its softmax).
        pool_before_conv: with ``sub_sample``, pool ``x`` and then apply the ``phi``/``g`` convs
            (facebookresearch) instead of pooling the conv outputs (PyTorch port, default). The two
            differ because a max does not commute with a 1x1 conv.
        pool_ceil_mode: how sub-sampling treats odd sizes. ``True`` (default): a last, partial
            window covers the odd row/column (``ceil(H/2)`` keys), so every input position is
            a candidate key and 1x1 or 1xW maps work. ``False``: the official behaviour
            (``floor(H/2)``): the last odd row/column never serves as a key, and maps with a
            spatial size of 1 (2x2 window) raise an error. Identical on even sizes.

    Weight initialisation: ``theta``, ``phi``, ``g`` and ``W``'s conv use PyTorch's default init
    (as the PyTorch port; facebookresearch draws N(0, 0.01) with zero bias); the zero-init of the
    last layer is as in both official codes.

    Other variants:
        - AlexHex7/Non-local_pytorch (its embedded-Gaussian block): the defaults;
        - facebookresearch/video-nonlocal-net (softmax, scale, pool then conv):
          ``preset="facebookresearch"`` = ``use_scale=True, pool_before_conv=True``;
        - timm's ``NonLocalAttn(C, use_scale=False, rd_ratio=r)``: ``NonLocal2d(C,
          inter_channels=make_divisible(C * r, 8), sub_sample=False)``. timm's ``use_scale=True``
          scales by ``C ** -0.5`` (not ``inter ** -0.5``); multiply ``theta``'s weight and bias by
          ``(inter / C) ** 0.5`` with ``use_scale=True`` to reproduce it.

    Attention for visualisation: :meth:`attention_map`.
    """

    spatial_dims: int = 2

    def __init__(
        self,
        channels: int,
        *,
        mode: str = "embedded_gaussian",
        inter_channels: int | None = None,
        sub_sample: bool = True,
        bn_layer: bool = True,
        use_scale: bool = False,
        pool_before_conv: bool = False,
        pool_ceil_mode: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        inter = _check_args(name, channels, mode, inter_channels, use_scale)
        dims = self.spatial_dims
        conv = _CONV[dims]
        self.channels = channels
        self.inter_channels = inter
        self.mode = mode
        self.sub_sample = bool(sub_sample)
        self.bn_layer = bool(bn_layer)
        self.use_scale = bool(use_scale)
        self.pool_before_conv = bool(pool_before_conv)
        self.pool_ceil_mode = bool(pool_ceil_mode)

        self.g = conv(channels, inter, kernel_size=1)
        if mode != "gaussian":
            self.theta = conv(channels, inter, kernel_size=1)
            self.phi = conv(channels, inter, kernel_size=1)
        if mode == "concatenation":
            # w_f of the paper, laid out like the PyTorch port's ``concat_project[0]`` (a Conv2d
            # whatever the dimension): weight[0, :I] acts on theta, weight[0, I:] on phi.
            self.concat_project = nn.Conv2d(2 * inter, 1, kernel_size=1, bias=False)
        if bn_layer:
            self.W = nn.Sequential(conv(inter, channels, kernel_size=1), _BN[dims](channels))
            nn.init.zeros_(self.W[1].weight)
            nn.init.zeros_(self.W[1].bias)
        else:
            self.W = conv(inter, channels, kernel_size=1)
            nn.init.zeros_(self.W.weight)
            nn.init.zeros_(self.W.bias)

    # ------------------------------------------------------------------------------------------
    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        kernel = _POOL_KERNEL[self.spatial_dims]
        pooled_sizes = x.shape[-2:] if self.spatial_dims > 1 else x.shape[-1:]
        if not self.pool_ceil_mode and min(pooled_sizes) < 2:
            raise ValueError(
                f"{type(self).__name__}: with sub_sample=True and pool_ceil_mode=False every "
                f"pooled spatial size must be >= 2, got input shape {tuple(x.shape)}; use "
                "pool_ceil_mode=True (the default) for such maps"
            )
        if self.spatial_dims == 1:
            # max_pool1d specialises the length in torch.export (-> static ONNX graphs); the same
            # window as a (2, 1) pool on (B, C, L, 1) stays dynamic.
            pooled = F.max_pool2d(x.unsqueeze(-1), (2, 1), (2, 1), ceil_mode=self.pool_ceil_mode)
            return pooled.squeeze(-1)
        return _POOL[self.spatial_dims](x, kernel, kernel, ceil_mode=self.pool_ceil_mode)

    def _keys_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the key/value path (pooled first in the facebookresearch variant)."""
        return self._pool(x) if self.sub_sample and self.pool_before_conv else x

    def _key_path(self, x: torch.Tensor, kx: torch.Tensor, conv: nn.Module | None) -> torch.Tensor:
        """``phi`` or ``g``: conv (if any) then pooling, or pooling then conv."""
        if conv is None:  # gaussian phi: the raw (pooled) input
            return self._pool(x) if self.sub_sample else x
        if self.sub_sample and not self.pool_before_conv:
            return self._pool(conv(x))
        return conv(kx)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Position-major ``theta (B, N, d)``, ``phi (B, M, d)``, ``g (B, M, inter)``."""
        kx = self._keys_input(x)
        if self.mode == "gaussian":
            theta, phi = x, self._key_path(x, kx, None)
        else:
            theta, phi = self.theta(x), self._key_path(x, kx, self.phi)
        g = self._key_path(x, kx, self.g)
        return to_positions(theta), to_positions(phi), to_positions(g)

    def _scale(self) -> float:
        """``d ** -0.5`` (``use_scale``) with ``d`` the length of the dot-product vectors."""
        if not self.use_scale:
            return 1.0
        return float(self.channels if self.mode == "gaussian" else self.inter_channels) ** -0.5

    def _concat_scores(
        self, theta: torch.Tensor, phi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``a_i = w_theta . theta_i`` ``(B, N)`` and ``b_j = w_phi . phi_j`` ``(B, M)``.

        ``concat_project`` is linear without bias, so ``w^T [theta_i, phi_j] = w^T [theta_i, 0] +
        w^T [0, phi_j]``: one call of ``concat_project`` on the ``N + M`` half-zero columns
        ``[theta_i, 0]`` and ``[0, phi_j]`` gives every ``a_i`` and ``b_j`` (hooks on it fire; a
        wrapper around it takes effect).
        """
        n = theta.shape[1]
        pairs = torch.cat(
            [F.pad(theta, (0, self.inter_channels)), F.pad(phi, (self.inter_channels, 0))], dim=1
        )  # (B, N + M, 2I)
        scores = self.concat_project(pairs.transpose(1, 2).unsqueeze(-1)).flatten(1)
        return scores[:, :n], scores[:, n:]

    def _check(self, x: torch.Tensor) -> None:
        check_input(type(self).__name__, x, self.channels, spatial_dims=self.spatial_dims)

    # ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        theta, phi, g = self._project(x)
        if self.mode in _SOFTMAX_MODES:
            y = pairwise.softmax_attention(theta, phi, g, scale=self._scale())
        elif self.mode == "dot_product":
            y = dot_product_attention(theta, phi, g)
        else:
            y = relu_sum_attention(*self._concat_scores(theta, phi), g)
        return x + self.W(from_positions(y, x))

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised affinity ``f(x_i, x_j) / C(x)``, shape ``(B, N, M)``.

        ``N`` is the number of positions of ``x`` (flattened in C order: ``L``, ``H*W`` or
        ``T*H*W``) and ``M`` the number of keys (``N``, or the sub-sampled count). Rows sum to 1
        in the softmax modes. Materialises ``N x M`` values: for visualisation only.
        """
        rows, _ = self.affinity_rows(x)
        return rows(slice(None))

    @torch.no_grad()
    def affinity_rows(
        self, x: torch.Tensor
    ) -> tuple[Callable[[slice], torch.Tensor], tuple[int, ...]]:
        """The rows of :meth:`attention_map` on demand, without the ``N x M`` matrix.

        Returns ``(rows, key_shape)``: ``rows(queries)`` gives the affinity rows of the query
        positions ``queries`` (a slice of the ``N`` flattened positions) as ``(B, n, M)``; the
        projections are computed once. ``key_shape`` is the spatial shape of the ``M`` keys
        (sub-sampled when ``sub_sample``). Used by :func:`attnzoo.viz.attention_maps`.
        """
        self._check(x)
        theta, phi, _ = self._project(x)
        key_shape = tuple(self._pool(x[:, :1]).shape[2:] if self.sub_sample else x.shape[2:])
        if self.mode in _SOFTMAX_MODES:
            scale = self._scale()
            return (lambda q: softmax_affinity(theta[:, q], phi, scale=scale)), key_shape
        if self.mode == "dot_product":
            return (lambda q: dot_product_affinity(theta[:, q], phi)), key_shape
        a, b = self._concat_scores(theta, phi)
        return (lambda q: relu_sum_affinity(a[:, q], b)), key_shape

    #: the maps depend on ``query`` (see :mod:`attnzoo.ops.query`)
    attention_query: ClassVar[bool] = True

    def attention_maps(self, x: torch.Tensor, *, query: Query = "mean") -> dict[str, torch.Tensor]:
        """``{"spatial": (B, *keys)}``: the row of :meth:`attention_map` of the query point
        ``query`` (indices of ``x``'s grid: ``(l,)``, ``(y, x)`` or ``(t, y, x)``, or fractions in
        ``[0, 1]``), or (``"mean"``) the mean over all query rows, on the key grid: ``(L',)``,
        ``(h', w')`` or ``(T, h', w')``, pooled to ``ceil(size / 2)`` with ``sub_sample`` (time
        is not pooled). Computed from :meth:`affinity_rows`, never the ``N x M`` matrix."""
        rows, keys = self.affinity_rows(x)
        where = f"{type(self).__name__}.attention_maps"
        return {"spatial": pixel_pair_map(rows, keys, x, query, where)}

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, mode={self.mode!r}, inter_channels={self.inter_channels}, "
            f"sub_sample={self.sub_sample}, bn_layer={self.bn_layer}, use_scale={self.use_scale}"
        )


_META: dict[str, Any] = dict(
    family="pixel-pair",
    paper="Non-local Neural Networks",
    venue="CVPR",
    year=2018,
    code="https://github.com/facebookresearch/video-nonlocal-net",
    presets={"facebookresearch": {"use_scale": True, "pool_before_conv": True}},
    param_count=nonlocal_param_count,
    identity_at_init=True,
)


@register("nonlocal1d", spatial_dims=1, **_META)
class NonLocal1d(_NonLocalNd):
    __doc__ = (_NonLocalNd.__doc__ or "").replace(
        "Non-local block", "1-D non-local block on ``(B, C, L)``", 1
    )
    spatial_dims = 1


@register("nonlocal2d", spatial_dims=2, **_META)
class NonLocal2d(_NonLocalNd):
    __doc__ = (_NonLocalNd.__doc__ or "").replace(
        "Non-local block", "2-D non-local block on ``(B, C, H, W)``", 1
    )
    spatial_dims = 2


@register("nonlocal3d", spatial_dims=3, **_META)
class NonLocal3d(_NonLocalNd):
    __doc__ = (_NonLocalNd.__doc__ or "").replace(
        "Non-local block", "3-D (space-time) non-local block on ``(B, C, T, H, W)``", 1
    )
    spatial_dims = 3
